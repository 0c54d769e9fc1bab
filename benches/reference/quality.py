#!/usr/bin/env python3
"""Train dictionary_learning 0.1.0's trainer for one architecture on the rows of a `.npy` file
and save the result as an `sae` SAE directory, so that `sae eval` scores the reference's
dictionary exactly as it scores `sae train`'s (FVE, L0, dead latents and, with
--true-features, MCC and firing F1).

Peer: PyPI `dictionary-learning==0.1.0`: `BatchTopKTrainer`, `TopKTrainer`,
`MatryoshkaBatchTopKTrainer`, `JumpReluTrainer`, `StandardTrainerAprilUpdate` (relu). The rows
are read in file order, `--batch` at a time, for `--steps` steps (wrapping around), so a run
sees exactly `steps × batch` tokens, as `sae train --steps S --batch-size B` on the same file
does (which shuffles them). The schedule is the one `sae train` resolves for the same flags:
warm-up min(1000, steps/10), decay from 80% of the steps, θ from min(1000, steps/2), sparsity
warm-up min(2000, steps/2), dead-latent window a tenth of the run (at most 10M tokens) unless
--dead-tokens is given; pass `--lr` to match a learning rate.

    python benches/reference/quality.py --arch batchtopk --data rows.npy --k 32 \\
        --dict-size 4096 --batch 1024 --steps 3000 --lr 5e-3 --out ref-batchtopk
    sae eval ref-batchtopk --data heldout.npy --true-features synth-dir

Nothing of the package is copied or modified; its `__init__` (which needs nnsight) is skipped
as in dictionary_learning_step.py.
"""
import argparse
import importlib
import importlib.util
import json
import os
import sys
import time
import types

import numpy as np
import torch as t


def trainers():
    spec = importlib.util.find_spec("dictionary_learning")
    if spec is None:
        sys.exit("dictionary_learning is not installed: pip install --no-deps dictionary-learning==0.1.0")
    pkg = list(spec.submodule_search_locations)[0]
    for name, path in [("dictionary_learning", pkg),
                       ("dictionary_learning.trainers", os.path.join(pkg, "trainers"))]:
        if name not in sys.modules:
            stub = types.ModuleType(name)
            stub.__path__ = [path]
            sys.modules[name] = stub
    m = lambda n: importlib.import_module(f"dictionary_learning.trainers.{n}")  # noqa: E731
    return m("batch_top_k"), m("top_k"), m("matryoshka_batch_top_k"), m("jumprelu"), m("standard")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", required=True,
                   choices=["batchtopk", "topk", "matryoshka", "jumprelu", "relu"])
    p.add_argument("--data", required=True)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--dict-size", type=int, required=True)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--l1", type=float, default=5.0)
    p.add_argument("--dead-tokens", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    t.set_num_threads(a.threads)
    BT, TK, MB, JR, ST = trainers()
    x_nd = np.load(a.data, mmap_mode="r")
    n, d = x_nd.shape
    steps, f = a.steps, a.dict_size
    warmup = min(1000, steps // 10)
    decay = steps // 5 * 4
    sparsity_warmup = min(2000, steps // 2)
    decay = decay if decay > warmup and decay > sparsity_warmup else None
    common = dict(steps=steps, activation_dim=d, dict_size=f, layer=0, lm_name="quality",
                  warmup_steps=warmup, decay_start=decay, seed=a.seed, device="cpu")
    if a.lr is not None:
        common["lr"] = a.lr
    if a.arch in ("batchtopk", "topk", "matryoshka"):
        extra = dict(k=a.k, threshold_start_step=min(1000, steps // 2))
        if a.arch == "matryoshka":
            extra["group_fractions"] = [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2 + 1 / 32]
        cls = {"batchtopk": BT.BatchTopKTrainer, "topk": TK.TopKTrainer,
               "matryoshka": MB.MatryoshkaBatchTopKTrainer}[a.arch]
        trainer = cls(**common, **extra)
        trainer.dead_feature_threshold = a.dead_tokens or min(10_000_000, steps * a.batch // 10)
    elif a.arch == "jumprelu":
        t.manual_seed(a.seed)  # the trainer records its seed but does not seed
        trainer = JR.JumpReluTrainer(**common, target_l0=float(a.k),
                                     sparsity_warmup_steps=sparsity_warmup)
    else:
        trainer = ST.StandardTrainerAprilUpdate(**common, l1_penalty=a.l1,
                                                sparsity_warmup_steps=sparsity_warmup)
    start = time.time()
    for step in range(steps):
        lo = (step * a.batch) % n
        idx = np.arange(lo, lo + a.batch) % n
        x = t.from_numpy(np.ascontiguousarray(x_nd[idx], dtype=np.float32))
        trainer.update(step, x)
    seconds = time.time() - start
    save(trainer, a, d, f)
    print(json.dumps({"arch": a.arch, "steps": steps, "batch": a.batch, "tokens": steps * a.batch,
                      "seconds": round(seconds, 1), "out": a.out}))


def save(trainer, a, d, f):
    """The trained dictionary as an `sae` SAE directory (sae.json + sae.safetensors)."""
    from safetensors.numpy import save_file
    ae = trainer.ae
    g = lambda v: v.detach().cpu().float().numpy()  # noqa: E731
    if a.arch == "relu":
        w_enc_fd, b_enc, w_dec_fd, b_dec = (g(ae.encoder.weight), g(ae.encoder.bias),
                                            g(ae.decoder.weight).T, g(ae.bias))
    elif a.arch in ("batchtopk", "topk"):
        w_enc_fd, b_enc, w_dec_fd, b_dec = (g(ae.encoder.weight), g(ae.encoder.bias),
                                            g(ae.decoder.weight).T, g(ae.b_dec))
    else:
        w_enc_fd, b_enc, w_dec_fd, b_dec = g(ae.W_enc).T, g(ae.b_enc), g(ae.W_dec), g(ae.b_dec)
    tensors = {"w_enc_fd": np.ascontiguousarray(w_enc_fd), "b_enc_f": b_enc,
               "w_dec_fd": np.ascontiguousarray(w_dec_fd), "b_dec_d": b_dec}
    arch = {"arch": a.arch}
    threshold = None
    if a.arch in ("batchtopk", "topk", "matryoshka"):
        arch["k"] = a.k
        theta = float(ae.threshold)
        if a.arch != "topk" and theta >= 0:
            threshold = theta
            tensors["threshold"] = np.array(theta, dtype=np.float32)
    if a.arch == "jumprelu":
        tensors["threshold_f"] = g(ae.threshold)
    os.makedirs(a.out, exist_ok=True)
    # np.ascontiguousarray would make θ one-dimensional; it is a scalar.
    save_file({k: np.array(v, dtype=np.float32, order="C") for k, v in tensors.items()},
              os.path.join(a.out, "sae.safetensors"))
    with open(os.path.join(a.out, "sae.json"), "w") as fh:
        json.dump({"format": 1, "config": {"d_model": d, "dict_size": f, **arch},
                   "threshold": threshold}, fh, indent=1)


if __name__ == "__main__":
    main()
