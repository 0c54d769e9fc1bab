"""Train an SAE on a Hugging Face model's layer on the fly, then show what a few latents read.

A forward hook on block --layer (default: GPT-2's block 6, the README's example) captures the
hidden state of every real (non-padding) token; a generator hands those activations to
`sparse_autoencoder.train` batch after batch while the model keeps running, so nothing is
written to disk but the run directory. Afterwards the SAE encodes a held-out set of texts and
the script prints, for a few latents, the tokens (in context) that activate them most.

The texts are the docstrings of Python's standard library, so the script runs offline once the
model is cached (HF_HUB_OFFLINE=1).

    pip install ./python torch transformers
    python python/examples/gpt2_layer6.py                        # gpt2, block 6
    python python/examples/gpt2_layer6.py --model DIR --layer 3  # any local model directory
"""

import argparse
import importlib
import sys
import time

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

import sparse_autoencoder


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gpt2", help="Hugging Face model name or local directory")
    p.add_argument("--layer", type=int, default=6, help="block whose output is hooked")
    p.add_argument("--tokens", type=int, default=400_000, help="training tokens")
    p.add_argument("--batch-size", type=int, default=1024, help="SAE training batch (tokens)")
    p.add_argument("--arch", default="topk", choices=["topk", "batchtopk", "relu", "jumprelu", "matryoshka"])
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--expansion", type=int, default=8, help="dict_size as a multiple of d_model")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per text window")
    p.add_argument("--texts-per-forward", type=int, default=16)
    p.add_argument("--analysis-windows", type=int, default=300, help="held-out windows to inspect")
    p.add_argument("--latents", type=int, default=8, help="latents to show")
    p.add_argument("--out", default="runs/hooked", help="run directory (replaced)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def docstrings():
    """Long docstrings of the standard library, in a fixed order."""
    skip = {"antigravity", "this", "idlelib", "tkinter", "turtledemo", "turtle"}
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in skip:
            continue
        try:
            module = importlib.import_module(name)
        except Exception:
            continue
        for _, obj in sorted(vars(module).items()):
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and len(doc) > 200:
                yield doc


def blocks_of(model):
    """The model's list of transformer blocks (GPT-2, BERT, Llama-style, …)."""
    for path in ("h", "transformer.h", "encoder.layer", "layers", "model.layers", "decoder.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise SystemExit(f"cannot find the transformer blocks of {type(model).__name__}")


class Hooked:
    """Runs the model up to block `layer` and returns that block's output per real token."""

    class _Stop(Exception):
        pass

    def __init__(self, model_name, layer, seq_len):
        self.tok = AutoTokenizer.from_pretrained(model_name)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModel.from_pretrained(model_name).eval()
        blocks = blocks_of(self.model)
        if not 0 <= layer < len(blocks):
            raise SystemExit(f"--layer {layer}: the model has blocks 0..{len(blocks) - 1}")
        self.seq_len = seq_len
        self.captured = None
        blocks[layer].register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.captured = output[0] if isinstance(output, tuple) else output
        raise Hooked._Stop  # the later blocks are not needed

    def windows(self, texts):
        """Token id windows of seq_len tokens, cut from the concatenated texts."""
        ids = []
        for text in texts:
            ids.extend(self.tok(text, add_special_tokens=False)["input_ids"])
            while len(ids) >= self.seq_len:
                yield ids[: self.seq_len]
                ids = ids[self.seq_len:]

    def activations(self, windows):
        """[windows, seq_len, d_model] float32 for a list of equal-length id windows."""
        batch = torch.tensor(windows)
        with torch.no_grad():
            try:
                self.model(input_ids=batch, attention_mask=torch.ones_like(batch))
            except Hooked._Stop:
                pass
        return self.captured.float().numpy()


def chunks(iterable, n):
    chunk = []
    for item in iterable:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []


def main():
    args = parse_args()
    hooked = Hooked(args.model, args.layer, args.seq_len)
    d_model = hooked.model.config.hidden_size
    windows = hooked.windows(docstrings())
    # The first windows are kept aside for the analysis and never trained on.
    analysis = [next(windows) for _ in range(args.analysis_windows)]
    steps = args.tokens // args.batch_size
    produced = {"tokens": 0, "forward_s": 0.0}

    def activation_batches():
        for group in chunks(windows, args.texts_per_forward):
            t0 = time.perf_counter()
            acts = hooked.activations(group)  # [texts, seq_len, d_model]
            produced["forward_s"] += time.perf_counter() - t0
            produced["tokens"] += acts.shape[0] * acts.shape[1]
            yield acts  # sparse_autoencoder flattens the leading dimensions to rows

    config = {
        "train": {"steps": steps, "batch_size": args.batch_size, "seed": args.seed},
        "sae": [{"arch": args.arch, "k": args.k, "expansion": args.expansion}],
        # Held out from the stream's front for the end-of-run evaluation.
        "data": {"eval_rows": 8192},
    }
    if args.arch == "relu":
        del config["sae"][0]["k"]
    print(f"model {args.model}, block {args.layer} output, d_model {d_model}; "
          f"{args.arch} SAE k={args.k} F={args.expansion * d_model}; {steps} steps of "
          f"{args.batch_size} tokens, streamed from the hook")
    t0 = time.perf_counter()

    def progress(p):
        s = p["stats"][0]
        print(f"step {p['step']:>5}/{p['total_steps']}  loss {s['loss']:.4f}  fve {s['fve']:.4f}  "
              f"l0 {s['l0']:.1f}  dead {s['dead_fraction']:.3f}  "
              f"{p['tokens'] / (time.perf_counter() - t0):,.0f} tokens/s", flush=True)

    result = sparse_autoencoder.train(activation_batches(), config, args.out, force=True,
                                      threads=args.threads, progress=progress,
                                      progress_every=max(1, steps // 8))
    wall = time.perf_counter() - t0
    summary = result.saes[0]
    ev = summary["eval"]
    print(f"trained {summary['steps']} steps in {wall:.1f} s wall ({produced['tokens']} tokens "
          f"produced by the model in {produced['forward_s']:.1f} s of forward passes)")
    print(f"held-out ({ev['n_rows']} tokens): fve {ev['fve']:.4f}  mse {ev['mse']:.4f}  "
          f"l0 {ev['l0']:.2f}  dead {ev['dead_fraction']:.3f}  cosine {ev['cosine']:.4f}")
    for note in result.notes:
        print("note:", note)
    print(f"run directory: {result.dir}")

    sae = result.load()
    acts = np.concatenate([hooked.activations(group) for group in chunks(iter(analysis), 32)])
    n_win, seq = acts.shape[:2]
    codes = sae.encode(acts).tocsc()  # (tokens, latents), columns = latents
    ids = np.array(analysis).reshape(-1)
    fires = np.diff(codes.indptr)
    # Latents that fire on a moderate share of the analysis tokens, strongest first.
    candidates = np.flatnonzero((fires >= 10) & (fires <= 0.05 * len(ids)))
    peak = np.array([codes.data[codes.indptr[j]:codes.indptr[j + 1]].max() for j in candidates])
    chosen = candidates[np.argsort(-peak)][: args.latents]
    print(f"\n{len(ids)} held-out tokens; {np.count_nonzero(fires)} of {sae.dict_size} latents fire "
          f"on them. Top-activating tokens of {len(chosen)} latents "
          f"(context ... [token] ...):")

    def show(pos):
        w, t = divmod(int(pos), seq)
        row = analysis[w]
        left = hooked.tok.decode(row[max(0, t - 6):t])
        right = hooked.tok.decode(row[t + 1:t + 3])
        token = hooked.tok.decode([row[t]]).strip()
        text = f"{left} [{token}] {right}".replace("\n", "\\n")
        return text[-64:]

    for j in chosen:
        rows = codes.indices[codes.indptr[j]:codes.indptr[j + 1]]
        vals = codes.data[codes.indptr[j]:codes.indptr[j + 1]]
        print(f"\nlatent {j}: fires on {fires[j]} tokens, peak {vals.max():.2f}")
        shown = set()
        for i in np.argsort(-vals):
            text = show(rows[i])
            if text in shown:  # a docstring repeated in several classes
                continue
            shown.add(text)
            print(f"  {vals[i]:7.2f}  {text}")
            if len(shown) == 6:
                break


if __name__ == "__main__":
    main()
