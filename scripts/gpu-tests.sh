#!/usr/bin/env bash
# The CUDA tests on a GPU machine that has no Rust toolchain, in two steps:
#   scripts/gpu-tests.sh build   # here: builds tests/cuda.rs with --features cuda into target/gpu/
#   scripts/gpu-tests.sh run     # on the GPU machine, with target/gpu/ copied over: runs every
#                                # test, the GPU ones included (SAE_TEST_CUDA=1)
# `run` finds cuBLAS and NVRTC under /usr/local/cuda or in PyTorch's nvidia wheels.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
build)
    mkdir -p target/gpu
    exe=$(cargo test --release --features cuda --test cuda --no-run --message-format=json |
        python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda":
        print(m["executable"])')
    cp "$exe" target/gpu/cuda-tests
    echo "built target/gpu/cuda-tests; copy target/gpu/ to the GPU machine and run: $0 run"
    ;;
run)
    dirs=$(python3 -c '
import glob, os, sys
found = set()
for pattern in ["/usr/local/cuda/lib64/libcublas.so*", "/usr/local/cuda/lib64/libnvrtc.so*"]:
    found.update(os.path.dirname(p) for p in glob.glob(pattern))
try:
    import nvidia
    for base in nvidia.__path__:
        for p in glob.glob(os.path.join(base, "**", "lib", "lib*.so*"), recursive=True):
            if "cublas" in p or "nvrtc" in p:
                found.add(os.path.dirname(p))
except ImportError:
    pass
print(":".join(sorted(found)))' 2>/dev/null || true)
    export LD_LIBRARY_PATH="${dirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
    SAE_TEST_CUDA=1 SAE_REQUIRE_NVRTC=1 target/gpu/cuda-tests --include-ignored
    ;;
*)
    echo "usage: $0 build|run" >&2
    exit 2
    ;;
esac
