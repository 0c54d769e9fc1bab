#!/usr/bin/env bash
# The cuda issue's benchmark on a GPU machine without a Rust toolchain, in two steps:
#   scripts/gpu-bench.sh build   # here: `sae` with --features cuda into target/gpu/, and
#                                # dictionary_learning 0.1.0 (+ einops) into target/gpu/pylib
#                                # (from the local Python environment, or PyPI)
#   scripts/gpu-bench.sh run     # on the GPU machine: `sae bench --device cuda` and
#                                # dictionary_learning's BatchTopKTrainer.update in PyTorch on
#                                # the same GPU, at D=768, k=64, F ∈ {16384, 65536},
#                                # B ∈ {4096, 16384}; one JSON line per measurement
#                                # (TF32=1: also `sae bench --tf32` at each shape)
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
build)
    mkdir -p target/gpu
    cargo build --release --features cuda
    cp target/release/sae target/gpu/sae
    rm -rf target/gpu/pylib
    python3 -m pip install --quiet --no-deps --target target/gpu/pylib \
        "dictionary-learning==0.1.0" "einops==0.8.*"
    # Debug info is most of their size; the device tool carries 64 MiB at most.
    strip target/gpu/*-tests target/gpu/sae 2>/dev/null || true
    echo "copy target/gpu/ to the GPU machine and run: $0 run"
    ;;
run)
    . scripts/cuda-libs.sh
    export PYTHONPATH="$PWD/target/gpu/pylib${PYTHONPATH:+:$PYTHONPATH}"
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
    for f in 16384 65536; do
        for b in 4096 16384; do
            target/gpu/sae bench --device cuda --arch batchtopk --d 768 --f "$f" --k 64 \
                --batch "$b" --steps "${STEPS:-20}" --warmup 3 --json
            if [ "${TF32:-0}" = 1 ]; then
                target/gpu/sae bench --device cuda --tf32 --arch batchtopk --d 768 --f "$f" \
                    --k 64 --batch "$b" --steps "${STEPS:-20}" --warmup 3 --json
            fi
            python3 benches/reference/dictionary_learning_step.py --device cuda --d 768 \
                --f "$f" --k 64 --batch "$b" --steps "${STEPS:-20}" --warmup 3 | tail -1
        done
    done
    ;;
*)
    echo "usage: $0 build|run" >&2
    exit 2
    ;;
esac
