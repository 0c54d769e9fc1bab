#!/usr/bin/env bash
# The CUDA tests on a GPU machine that has no Rust toolchain, in two steps:
#   scripts/gpu-tests.sh build   # here: builds the test binaries that can run on a GPU
#                                # (tests/cuda.rs, the fixture comparisons, the gradient
#                                # checks) with --features cuda into target/gpu/
#   scripts/gpu-tests.sh run     # on the GPU machine, from the repository root with target/gpu/
#                                # copied over: runs them with SAE_TEST_CUDA=1, so the
#                                # fixture and gradient tests train on cuda:0 and the GPU
#                                # tests of tests/cuda.rs run instead of being ignored
# `run` finds cuBLAS and NVRTC under /usr/local/cuda or in PyTorch's nvidia wheels.
set -euo pipefail
cd "$(dirname "$0")/.."

TESTS="cuda fixtures gradients"

case "${1:-}" in
build)
    mkdir -p target/gpu
    args=()
    for t in $TESTS; do args+=(--test "$t"); done
    cargo test --release --features cuda "${args[@]}" --no-run --message-format=json |
        python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        shutil.copy(m["executable"], "target/gpu/" + m["target"]["name"] + "-tests")
        print("built target/gpu/" + m["target"]["name"] + "-tests")'
    # Debug info is most of their size; the device tool carries 64 MiB at most.
    strip target/gpu/*-tests target/gpu/sae 2>/dev/null || true
    echo "copy target/gpu/ to the GPU machine and run: $0 run"
    ;;
run)
    . scripts/cuda-libs.sh
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
    export SAE_TEST_CUDA=1 SAE_REQUIRE_NVRTC=1 CARGO_MANIFEST_DIR="$PWD"
    status=0
    for t in $TESTS; do
        echo "== $t (on cuda:0)"
        target/gpu/$t-tests --include-ignored --test-threads 1 || status=1
    done
    exit $status
    ;;
*)
    echo "usage: $0 build|run" >&2
    exit 2
    ;;
esac
