"""Loads `sae export`'s SAELens and sparsify layouts with those libraries and compares their
encodings of activation-like rows with `sae encode`'s.

Not part of `cargo test` (it needs PyTorch and the two libraries):

    pip install sae-lens eai-sparsify
    cargo build --release
    python tests/python/check_exports.py [path/to/sae]

It trains a short SAE of each architecture on the built-in synthetic data, writes 2000 rows
with `sae synth`, and for each SAE prints the largest difference between the codes the Python
library computes from the export and the codes `sae encode` wrote. Exit status 1 if any
difference that should be zero is above 1e-4 (relative to the largest code).
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

SAE = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    os.path.dirname(__file__), "..", "..", "target", "release", "sae")
TOLERANCE = 1e-4


def sae(*args):
    subprocess.run([SAE, *args], check=True, stdout=subprocess.DEVNULL)


def dense_codes(codes_dir, n_rows):
    meta = json.load(open(os.path.join(codes_dir, "codes.json")))
    f = meta["n_latents"]
    indices = np.load(os.path.join(codes_dir, "indices.npy"))
    values = np.load(os.path.join(codes_dir, "values.npy"))
    out = np.zeros((n_rows, f), dtype=np.float32)
    if meta["layout"] == "csr":
        indptr = np.load(os.path.join(codes_dir, "indptr.npy"))
        for b in range(n_rows):
            out[b, indices[indptr[b]:indptr[b + 1]]] = values[indptr[b]:indptr[b + 1]]
    else:
        np.put_along_axis(out, indices.astype(np.int64), values, axis=1)
    return out


def row_topk(run, x, k):
    """The k largest positive codes of each row, from the SAE's own weights, in numpy."""
    from safetensors.numpy import load_file
    w = load_file(os.path.join(run, "sae.safetensors"))
    pre = (x - w["b_dec_d"]) @ w["w_enc_fd"].T + w["b_enc_f"]
    post = np.maximum(pre, 0)
    keep = np.argpartition(-post, k - 1, axis=1)[:, :k]
    out = np.zeros_like(post)
    np.put_along_axis(out, keep, np.take_along_axis(post, keep, axis=1), axis=1)
    return out


def report(name, ours, theirs, must_match):
    scale = max(float(np.abs(ours).max()), 1e-12)
    diff = float(np.abs(ours - theirs).max()) / scale
    same_support = float(((ours != 0) == (theirs != 0)).mean())
    verdict = "ok" if diff <= TOLERANCE else ("MISMATCH" if must_match else "differs (expected)")
    print(f"{name:<28} max |Δcode|/max|code| = {diff:.2e}   same active set: {100 * same_support:.3f}%   {verdict}")
    return diff <= TOLERANCE or not must_match


def main():
    from sae_lens import SAE as SaeLens
    from sparsify import Sae as Sparsify

    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        sae("synth", "--out", f"{tmp}/data", "--rows", "2000", "--seed", "9")
        x = np.load(f"{tmp}/data/activations.npy")
        xt = torch.from_numpy(x)
        for arch in ["relu", "topk", "batchtopk", "jumprelu"]:
            run = f"{tmp}/{arch}"
            sae("train", "--arch", arch, "--steps", "600", "--out", run)
            sae("encode", run, "--data", f"{tmp}/data/activations.npy", "--out", f"{run}-codes")
            ours = dense_codes(f"{run}-codes", len(x))

            sae("export", run, "--format", "saelens", "--out", f"{run}-saelens",
                "--model-name", "gpt2", "--hook-name", "blocks.6.hook_resid_post")
            lens = SaeLens.load_from_disk(f"{run}-saelens", device="cpu")
            with torch.no_grad():
                theirs = lens.encode(xt).numpy()
            ok &= report(f"{arch} → SAELens ({lens.cfg.architecture()})", ours, theirs, True)
            names = (lens.cfg.metadata.model_name, lens.cfg.metadata.hook_name)
            if names != ("gpt2", "blocks.6.hook_resid_post"):
                print(f"{arch} → SAELens lost the model and hook names: {names}")
                ok = False

            if arch in ("topk", "batchtopk"):
                sae("export", run, "--format", "sparsify", "--out", f"{run}-sparsify")
                sp = Sparsify.load_from_disk(f"{run}-sparsify", device="cpu")
                with torch.no_grad():
                    enc = sp.encode(xt)
                theirs = np.zeros_like(ours)
                np.put_along_axis(theirs, enc.top_indices.numpy(), enc.top_acts.numpy(), axis=1)
                # sparsify keeps the top k of each row; a BatchTopK SAE keeps codes above θ.
                ok &= report(f"{arch} → sparsify (top-k)", ours, theirs, arch == "topk")
                if arch == "batchtopk":
                    # What sparsify should compute: the k largest of ReLU(pre) in each row.
                    ok &= report(f"{arch} → sparsify vs numpy top-k", row_topk(run, x, sp.cfg.k),
                                 theirs, True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
