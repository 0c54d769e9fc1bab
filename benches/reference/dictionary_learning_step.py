#!/usr/bin/env python3
"""Time one training step of dictionary_learning's BatchTopKTrainer on the CPU or a GPU.

Peer: PyPI `dictionary-learning==0.1.0` (saprmarks/dictionary_learning), the
`BatchTopKTrainer.update(step, x)` call its training loop makes once per batch:
encode (linear, ReLU, batch-wide top-k over B*k entries), decode, L2 loss plus AuxK when
there are dead latents, backward, removal of the decoder gradient parallel to the decoder
columns, gradient clipping at norm 1, Adam, LR scheduler, decoder renormalisation, and
(past `threshold_start_step`) the running-threshold update.

Inputs are random normal (B, D) batches. Warm-up steps run first (the first one, step 0,
also does the trainer's geometric-median initialisation of b_dec); the timed steps then
use step indices past `threshold_start_step`, i.e. the steady-state step of a long run.
The median of the timed steps is reported, plus one JSON line.

The package's `__init__` imports `ActivationBuffer`, which pulls in nnsight (and through
it transformers and more). None of that is needed to train on given activations, so this
script loads `dictionary_learning.trainers.batch_top_k` without running the package's or
the `trainers` subpackage's `__init__` (empty stand-in package modules with the right
`__path__` are registered first). The installed package itself is not modified.

On a GPU (`--device cuda`) the batches are made on the GPU before the clock starts, and the
clock is read after torch.cuda.synchronize(), so a step is timed to the end of its last
kernel (the update's own loss.item() already waits for it). TF32 stays off, torch's default
for float32 matmuls, as in `sae`.

Examples:
    python benches/reference/dictionary_learning_step.py --threads 2
    python benches/reference/dictionary_learning_step.py --device cuda --batch 16384
"""

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import statistics
import sys
import time
import types


def load_batch_top_k():
    """Import dictionary_learning.trainers.batch_top_k without the package __init__s."""
    spec = importlib.util.find_spec("dictionary_learning")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("dictionary_learning is not installed: pip install dictionary-learning==0.1.0")
    pkg_dir = list(spec.submodule_search_locations)[0]
    for name, path in (
        ("dictionary_learning", pkg_dir),
        ("dictionary_learning.trainers", os.path.join(pkg_dir, "trainers")),
    ):
        if name not in sys.modules:
            stub = types.ModuleType(name)
            stub.__path__ = [path]
            stub.__package__ = name
            sys.modules[name] = stub
    return importlib.import_module("dictionary_learning.trainers.batch_top_k")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=768, help="activation dim D")
    p.add_argument("--f", type=int, default=16384, help="dictionary size F")
    p.add_argument("--k", type=int, default=64, help="mean active latents per row")
    p.add_argument("--batch", type=int, default=4096, help="rows per step B")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument(
        "--dead-frac",
        type=float,
        default=0.0,
        help="fraction of latents made dead before each step, to exercise AuxK: their "
        "idle counters are set to the dead threshold and their encoder biases to -1e4 so "
        "they stay silent in the batch (the trainer revives any latent that fires); "
        "default 0: a fresh SAE has no dead latents, so AuxK is skipped",
    )
    p.add_argument(
        "--auxk-alpha",
        type=float,
        default=1 / 32,
        help="BatchTopKTrainer auxk_alpha (its default 1/32; AuxK runs only with dead latents)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda or cuda:N")
    p.add_argument(
        "--profile",
        action="store_true",
        help="after timing, run one more step under torch.profiler and print the top ops",
    )
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    btk = load_batch_top_k()

    trainer = btk.BatchTopKTrainer(
        steps=1_000_000,
        activation_dim=args.d,
        dict_size=args.f,
        k=args.k,
        layer=0,
        lm_name="none",
        auxk_alpha=args.auxk_alpha,
        seed=args.seed,
        device=args.device,
    )
    n_dead = int(round(args.dead_frac * args.f))
    gen = torch.Generator(device=args.device).manual_seed(args.seed + 1)
    cuda = args.device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def batch():
        return torch.randn(args.batch, args.d, generator=gen, device=args.device)

    last = {"loss": float("nan")}

    def make_dead():
        if n_dead:
            trainer.num_tokens_since_fired[:n_dead] = trainer.dead_feature_threshold
            trainer.ae.encoder.bias.data[:n_dead] = -1e4

    def one_step(step):
        x = batch()
        make_dead()
        sync()
        t0 = time.perf_counter()
        last["loss"] = trainer.update(step, x)  # ends in loss.item()
        sync()
        return time.perf_counter() - t0

    warm = [one_step(i) for i in range(args.warmup)]
    first = max(args.warmup, trainer.threshold_start_step + 1)
    times = [one_step(first + i) for i in range(args.steps)]
    med = statistics.median(times)

    print(
        f"dictionary_learning {importlib.metadata.version('dictionary-learning')} "
        f"BatchTopKTrainer.update, torch {torch.__version__}, "
        f"D={args.d} F={args.f} k={args.k} B={args.batch} threads={args.threads} "
        f"device={torch.cuda.get_device_name(args.device) if cuda else 'cpu'} "
        f"auxk_alpha={args.auxk_alpha} dead_latents={trainer.dead_features}"
    )
    print("warm-up ms: " + " ".join(f"{t * 1e3:.2f}" for t in warm))
    print("timed ms:   " + " ".join(f"{t * 1e3:.2f}" for t in times))
    print(f"last loss {last['loss']:.4f}")
    print(f"median {med * 1e3:.2f} ms/step, {args.batch / med:,.0f} tokens/s")
    print(
        json.dumps(
            {
                "peer": "dictionary_learning",
                "peer_version": importlib.metadata.version("dictionary-learning"),
                "trainer": "BatchTopKTrainer",
                "torch": torch.__version__,
                "d": args.d,
                "f": args.f,
                "k": args.k,
                "batch": args.batch,
                "threads": args.threads,
                "device": torch.cuda.get_device_name(args.device) if cuda else "cpu",
                "auxk_alpha": args.auxk_alpha,
                "dead_latents": trainer.dead_features,
                "last_loss": last["loss"],
                "warmup": args.warmup,
                "steps": args.steps,
                "step_s": times,
                "median_s_per_step": med,
                "tokens_per_s": args.batch / med,
            }
        )
    )

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        x = batch()
        make_dead()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.update(first + args.steps, x)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
