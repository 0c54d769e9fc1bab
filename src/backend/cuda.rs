//! The CUDA device (feature `cuda`): finding the driver, cuBLAS and NVRTC at run time, opening a
//! GPU with one stream, and row-major matrices on it with the cuBLAS GEMM in full f32.

use std::sync::Arc;

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DriverError};
use ndarray::{Array2, ArrayView2};

use super::Device;
use crate::error::{Error, Result};

/// An open GPU: its context, the stream every operation is queued on, and a cuBLAS handle
/// bound to that stream.
pub struct CudaDevice {
    ordinal: usize,
    name: String,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
}

/// A row-major `rows × cols` f32 matrix in GPU memory.
pub struct DeviceMatrix {
    /// The elements, row after row.
    pub data: CudaSlice<f32>,
    /// Rows.
    pub rows: usize,
    /// Columns (the leading dimension).
    pub cols: usize,
}

/// The libraries a GPU run loads, with what to do when one is missing.
fn missing_library() -> Option<(&'static str, &'static str)> {
    // SAFETY: these only try to load the libraries; nothing is called through them.
    let (driver, cublas, nvrtc) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::cublas::sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
        )
    };
    if !driver {
        Some((
            "the NVIDIA driver library (libcuda.so) was not found",
            "install the NVIDIA driver, or run on a machine with an NVIDIA GPU",
        ))
    } else if !cublas {
        Some((
            "cuBLAS (libcublas.so, CUDA 11 to 13) was not found",
            "install the CUDA toolkit's cuBLAS and put its lib directory on LD_LIBRARY_PATH",
        ))
    } else if !nvrtc {
        Some((
            "NVRTC (libnvrtc.so, CUDA 11 to 13) was not found",
            "install the CUDA toolkit's NVRTC and put its lib directory on LD_LIBRARY_PATH",
        ))
    } else {
        None
    }
}

impl CudaDevice {
    /// Opens GPU `ordinal`. Every way this can fail (no CUDA libraries, no driver, no such GPU,
    /// a driver error) is one [`Error::Device`] that names what is missing; none panics.
    pub fn open(ordinal: usize) -> Result<Self> {
        let device = Device::Cuda(ordinal).to_string();
        let fail = |reason: String| Error::Device {
            device: device.clone(),
            reason,
        };
        if let Some((what, fix)) = missing_library() {
            return Err(fail(format!("{what}; {fix}")));
        }
        let driver = |action: &str, e: DriverError| fail(format!("{action} failed: {e}"));
        let count = CudaContext::device_count().map_err(|e| match e.0 {
            cudarc::driver::sys::CUresult::CUDA_ERROR_NO_DEVICE => {
                fail("the NVIDIA driver found no GPU on this machine".to_string())
            }
            _ => driver("initialising the CUDA driver", e),
        })?;
        if ordinal >= count as usize {
            return Err(fail(format!(
                "this machine has {count} GPU(s), numbered from 0; pick one below {count}"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| driver("opening the GPU", e))?;
        let name = ctx
            .name()
            .map_err(|e| driver("reading the GPU's name", e))?;
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| fail(format!("creating a cuBLAS handle failed: {e:?}")))?;
        Ok(CudaDevice {
            ordinal,
            name,
            stream,
            blas,
        })
    }

    /// The GPU's model name, e.g. `"NVIDIA H100 80GB HBM3"`.
    pub fn name(&self) -> String {
        self.name.clone()
    }

    fn error(&self, what: &str, e: impl std::fmt::Debug) -> Error {
        Error::Device {
            device: Device::Cuda(self.ordinal).to_string(),
            reason: format!("{what} failed: {e:?}"),
        }
    }

    /// Copies a host matrix to the GPU.
    pub fn upload(&self, a: ArrayView2<'_, f32>) -> Result<DeviceMatrix> {
        let a = a.as_standard_layout();
        let data = self
            .stream
            .clone_htod(a.as_slice().expect("standard layout"))
            .map_err(|e| self.error("copying to the GPU", e))?;
        Ok(DeviceMatrix {
            data,
            rows: a.nrows(),
            cols: a.ncols(),
        })
    }

    /// A zeroed matrix on the GPU.
    pub fn zeros(&self, rows: usize, cols: usize) -> Result<DeviceMatrix> {
        let data = self
            .stream
            .alloc_zeros(rows * cols)
            .map_err(|e| self.error("allocating GPU memory", e))?;
        Ok(DeviceMatrix { data, rows, cols })
    }

    /// Copies a GPU matrix back (waits for the stream).
    pub fn download(&self, a: &DeviceMatrix) -> Result<Array2<f32>> {
        let v = self
            .stream
            .clone_dtoh(&a.data)
            .map_err(|e| self.error("copying from the GPU", e))?;
        Ok(Array2::from_shape_vec((a.rows, a.cols), v).expect("rows × cols elements"))
    }

    /// `c ← alpha·op(a)·op(b) + beta·c` on row-major matrices, with op the transpose where
    /// `trans_*` is set, as [`super::Backend::gemm`] does on the host. Queued on the stream.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        alpha: f32,
        a: &DeviceMatrix,
        trans_a: bool,
        b: &DeviceMatrix,
        trans_b: bool,
        beta: f32,
        c: &mut DeviceMatrix,
    ) -> Result<()> {
        let (m, k) = if trans_a {
            (a.cols, a.rows)
        } else {
            (a.rows, a.cols)
        };
        let (kb, n) = if trans_b {
            (b.cols, b.rows)
        } else {
            (b.rows, b.cols)
        };
        if k != kb || (c.rows, c.cols) != (m, n) {
            return Err(Error::Shape {
                what: format!(
                    "GEMM operands {}×{}{} · {}×{}{} into",
                    a.rows,
                    a.cols,
                    if trans_a { "ᵀ" } else { "" },
                    b.rows,
                    b.cols,
                    if trans_b { "ᵀ" } else { "" }
                ),
                expected: vec![m, n],
                got: vec![c.rows, c.cols],
            });
        }
        // cuBLAS is column-major, where a row-major X is Xᵀ: so compute Cᵀ = op(B)ᵀ·op(A)ᵀ,
        // which swaps the operands and keeps each one's transpose flag.
        let op = |t: bool| {
            if t {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            }
        };
        let cfg = GemmConfig {
            transa: op(trans_b),
            transb: op(trans_a),
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha,
            lda: b.cols as i32,
            ldb: a.cols as i32,
            beta,
            ldc: c.cols as i32,
        };
        // SAFETY: shapes and leading dimensions were checked against the buffers above.
        unsafe { self.blas.gemm(cfg, &b.data, &a.data, &mut c.data) }
            .map_err(|e| self.error("cuBLAS sgemm", e))
    }
}
