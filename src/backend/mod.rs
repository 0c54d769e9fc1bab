//! The dense-GEMM seam: the few operations whose speed decides a step, behind one trait so
//! the rest of the crate never knows which library (or device) runs them.

// The one place that picks the GPU's device code or its stand-in (whose `CudaDevice::open`
// says how to build with CUDA, and which also stands in for `cuda_select`), so no other module
// needs a `cfg` for it.
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "cuda_stub.rs"]
pub mod cuda;
#[cfg(feature = "cuda")]
pub(crate) mod cuda_select;
#[cfg(not(feature = "cuda"))]
pub(crate) use cuda as cuda_select;
// The bf16 GEMM's pieces are timed one by one by `sae bench` (through
// `crate::internals`), so the module is public but not part of the API.
#[doc(hidden)]
pub mod bf16;
mod device;
pub(crate) mod simd;
pub(crate) mod sparse;

pub use device::{Device, Gpu};

use ndarray::{Array2, ArrayView2, ArrayViewMut2};

use crate::error::Result;

impl Device {
    /// Checks that this device can run here: always for the CPU; for a GPU, that this build has
    /// CUDA, that the driver, cuBLAS and NVRTC load, and that the GPU exists. Returns the
    /// device's name (`"cpu"`, or the GPU's model).
    pub fn check(&self) -> Result<String> {
        match *self {
            Device::Cpu => Ok("cpu".to_string()),
            Device::Cuda(gpu) => cuda::CudaDevice::open(gpu).map(|d| d.name()),
        }
    }
}

/// Dense linear algebra used by the SAE. Implementations must be deterministic: the same inputs
/// and thread count give bit-identical outputs.
pub trait Backend: Send + Sync {
    /// A short name for logs and benchmarks (`"matrixmultiply"`, `"openblas"`).
    fn name(&self) -> &'static str;

    /// `c ← alpha·a·b + beta·c`. `a` and `b` may be transposed views (`w.t()`); shapes must
    /// agree, `(m, k)·(k, n)` into `(m, n)`.
    fn gemm(
        &self,
        alpha: f32,
        a: ArrayView2<'_, f32>,
        b: ArrayView2<'_, f32>,
        beta: f32,
        c: ArrayViewMut2<'_, f32>,
    );
}

/// The CPU backend: `ndarray`'s GEMM, which runs on `matrixmultiply` (threaded, pure Rust) by
/// default and on the system OpenBLAS with the `openblas` feature.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

impl Backend for Cpu {
    fn name(&self) -> &'static str {
        if cfg!(feature = "openblas") {
            "openblas"
        } else {
            "matrixmultiply"
        }
    }

    fn gemm(
        &self,
        alpha: f32,
        a: ArrayView2<'_, f32>,
        b: ArrayView2<'_, f32>,
        beta: f32,
        mut c: ArrayViewMut2<'_, f32>,
    ) {
        ndarray::linalg::general_mat_mul(alpha, &a, &b, beta, &mut c);
    }
}

/// A zeroed `rows × cols` matrix whose memory the kernel is asked to back with 2 MiB pages
/// (Linux transparent huge pages in `madvise` mode): the step's row-random reads of W_dec,
/// u and xc otherwise miss the TLB on nearly every 3 KB row (measured at D=768, F=16384:
/// decode 31 → 25 ms, backward 63 → 59 ms). Elsewhere, plain zeros.
#[doc(hidden)]
pub fn zeros_huge(rows: usize, cols: usize) -> Array2<f32> {
    let n = rows * cols;
    let mut v: Vec<f32> = Vec::with_capacity(n);
    advise_huge_pages(v.as_mut_ptr() as usize, n * std::mem::size_of::<f32>());
    // Touched only now, after the advice, so the first faults can take huge pages.
    v.resize(n, 0.0);
    Array2::from_shape_vec((rows, cols), v).expect("rows × cols elements")
}

/// A copy of `a` in memory from [`zeros_huge`].
#[doc(hidden)]
pub fn huge_copy(a: ArrayView2<'_, f32>) -> Array2<f32> {
    let mut huge = zeros_huge(a.nrows(), a.ncols());
    huge.assign(&a);
    huge
}

#[cfg(target_os = "linux")]
fn advise_huge_pages(addr: usize, len: usize) {
    const HUGE: usize = 2 << 20;
    let start = addr.next_multiple_of(HUGE);
    let end = (addr + len) / HUGE * HUGE;
    if end > start {
        // SAFETY: [start, end) lies inside the allocation; the advice changes no contents.
        // Failure (THP off, old kernel) only loses the speed-up, so the result is ignored.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_addr: usize, _len: usize) {}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{array, Array2};

    #[test]
    fn gemm_handles_transposed_operands_and_accumulates() {
        let a = array![[1.0f32, 2.0], [3.0, 4.0], [5.0, 6.0]]; // 3x2
        let w = array![[1.0f32, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0]]; // 4x2
        let mut c = Array2::<f32>::ones((3, 4));
        Cpu.gemm(1.0, a.view(), w.t(), 1.0, c.view_mut());
        let expected = array![
            [2.0f32, 3.0, 4.0, 1.0],
            [4.0, 5.0, 8.0, 3.0],
            [6.0, 7.0, 12.0, 5.0]
        ];
        assert_eq!(c, expected);
    }
}
