# Sourced by the GPU scripts: puts the directories holding cuBLAS and NVRTC (under
# /usr/local/cuda, or in PyTorch's nvidia wheels) on LD_LIBRARY_PATH, since `sae` loads them
# at run time.
cuda_lib_dirs=$(python3 -c '
import glob, os
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
export LD_LIBRARY_PATH="${cuda_lib_dirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
