#!/usr/bin/env python3
"""Time one TopK training step of EleutherAI sparsify's SparseCoder on the CPU.

Peer: PyPI `eai-sparsify` (1.3.x), `sparsify.SparseCoder` with `SparseCoderConfig`
(activation "topk"). sparsify's own `Trainer` only runs with a Hugging Face model feeding
activations through forward hooks, so this script makes, on a given batch, the calls that
`Trainer.fit` makes for one optimizer step with `loss_fn="fvu"`, `grad_acc_steps=1`,
`micro_acc_steps=1`, in the same order:

  1. `sae.set_decoder_norm_to_unit_norm()`            (start of the hook, every step)
  2. dead mask from the idle counters                 (only when auxk_alpha > 0)
  3. total variance of the batch, `sae(x=x, y=x, dead_mask=..., total_variance=...)`:
     fused encoder (linear, ReLU, per-row top-k), eager `embedding_bag` decoder, FVU,
     AuxK (second decoder pass) when there are dead latents
  4. did-fire bookkeeping, `float(fvu)` for the log, `loss.backward()`
  5. `sae.remove_gradient_parallel_to_decoder_directions()`
  6. optimizer step, `zero_grad`, LR scheduler step
  7. idle-counter update

Optimizer: `--optimizer adam` (default here) is what the trainer builds for
`optimizer="adam"` without bitsandbytes: `torch.optim.Adam` at lr 2e-4/sqrt(F/2^14) with
`transformers.get_linear_schedule_with_warmup(1000, ...)`. `--optimizer signum` is the
1.3.x default, `ScheduleFreeWrapper(SignSGD, momentum=0.95)`.

AuxK: sparsify's `TrainConfig.auxk_alpha` defaults to 0, which skips the dead mask and the
AuxK pass; `--auxk-alpha` with `--dead-frac` turns it on.

Decoder: sparsify uses a Triton kernel when Triton imports and the eager
`nn.functional.embedding_bag` otherwise; on the CPU only the eager one works, so this
script sets `SPARSIFY_DISABLE_TRITON=1` before importing sparsify and checks it took.

Inputs are random normal (B, D) batches. Warm-up steps run first (the first one, step 0,
also sets b_dec to the batch mean as the trainer does); the median of the timed steps is
reported, plus one JSON line.

Example:
    python benches/reference/sparsify_step.py --threads 2
"""

import argparse
import importlib.metadata
import json
import os
import statistics
import time


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=768, help="activation dim D")
    p.add_argument("--f", type=int, default=16384, help="number of latents F")
    p.add_argument("--k", type=int, default=64, help="active latents per row")
    p.add_argument("--batch", type=int, default=4096, help="rows (tokens) per step B")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--optimizer", choices=["adam", "signum"], default="adam")
    p.add_argument(
        "--auxk-alpha",
        type=float,
        default=0.0,
        help="TrainConfig.auxk_alpha (sparsify's default 0 skips AuxK)",
    )
    p.add_argument(
        "--dead-frac",
        type=float,
        default=0.0,
        help="fraction of latents whose idle counter is set past the dead threshold "
        "before each step (only matters with --auxk-alpha > 0)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--profile",
        action="store_true",
        help="after timing, run one more step under torch.profiler and print the top ops",
    )
    args = p.parse_args()

    os.environ["SPARSIFY_DISABLE_TRITON"] = "1"
    import torch

    torch.set_num_threads(args.threads)

    import sparsify.sparse_coder
    import sparsify.utils
    from sparsify import SparseCoder, SparseCoderConfig

    assert sparsify.sparse_coder.decoder_impl is sparsify.utils.eager_decode

    # Trainer.fit does this first; per torch's docs it only affects CUDA matmuls.
    torch.set_float32_matmul_precision("high")

    dead_feature_threshold = 10_000_000  # TrainConfig default
    torch.manual_seed(args.seed)  # the trainer seeds before building each SAE
    sae = SparseCoder(
        args.d,
        SparseCoderConfig(activation="topk", num_latents=args.f, k=args.k),
        device="cpu",
        dtype=torch.float32,
    )

    if args.optimizer == "adam":
        from transformers import get_linear_schedule_with_warmup

        lr = 2e-4 / (sae.num_latents / (2**14)) ** 0.5
        opt = torch.optim.Adam([dict(params=sae.parameters(), lr=lr)])
        schedulers = [get_linear_schedule_with_warmup(opt, 1000, 1_000_000)]
    else:
        from schedulefree import ScheduleFreeWrapper
        from sparsify.sign_sgd import SignSGD

        lr = 5e-3 / (sae.num_latents / (2**14)) ** 0.5
        opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=lr)]), momentum=0.95)
        opt.train()
        schedulers = []

    num_tokens_since_fired = torch.zeros(sae.num_latents, dtype=torch.long)
    did_fire = torch.zeros(sae.num_latents, dtype=torch.bool)
    n_dead = int(round(args.dead_frac * args.f))
    gen = torch.Generator().manual_seed(args.seed + 1)
    state = {"dead": 0, "fvu": float("nan")}

    def train_step(step, x):
        if step == 0:
            sae.b_dec.data = x.mean(0).to(sae.dtype)
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = (
            num_tokens_since_fired > dead_feature_threshold if args.auxk_alpha > 0 else None
        )
        state["dead"] = int(dead_mask.sum()) if dead_mask is not None else 0

        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        fvu = float(out.fvu.detach())
        loss = out.fvu + args.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.div(1).backward()

        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        for s in schedulers:
            s.step()

        with torch.no_grad():
            num_tokens_since_fired.add_(x.shape[0])
            num_tokens_since_fired[did_fire] = 0
            did_fire.zero_()
        return fvu

    def batch():
        return torch.randn(args.batch, args.d, generator=gen)

    def make_dead():
        if n_dead:
            num_tokens_since_fired[:n_dead] = dead_feature_threshold + 1

    def one_step(step):
        x = batch()
        make_dead()
        t0 = time.perf_counter()
        state["fvu"] = train_step(step, x)
        return time.perf_counter() - t0

    warm = [one_step(i) for i in range(args.warmup)]
    times = [one_step(args.warmup + i) for i in range(args.steps)]
    med = statistics.median(times)
    version = importlib.metadata.version("eai-sparsify")

    print(
        f"sparsify {version} SparseCoder TopK step ({args.optimizer}), "
        f"torch {torch.__version__}, D={args.d} F={args.f} k={args.k} B={args.batch} "
        f"threads={args.threads} auxk_alpha={args.auxk_alpha} dead_latents={state['dead']}"
    )
    print("warm-up s: " + " ".join(f"{t:.3f}" for t in warm))
    print("timed s:   " + " ".join(f"{t:.3f}" for t in times))
    print(f"last FVU {state['fvu']:.4f}")
    print(f"median {med:.3f} s/step, {args.batch / med:,.0f} tokens/s")
    print(
        json.dumps(
            {
                "peer": "sparsify",
                "peer_version": version,
                "trainer": "SparseCoder topk step",
                "optimizer": args.optimizer,
                "torch": torch.__version__,
                "d": args.d,
                "f": args.f,
                "k": args.k,
                "batch": args.batch,
                "threads": args.threads,
                "auxk_alpha": args.auxk_alpha,
                "dead_latents": state["dead"],
                "last_fvu": state["fvu"],
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
            train_step(args.warmup + args.steps, x)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
