//! The CUDA device (feature `cuda`): finding the driver, cuBLAS and NVRTC at run time, opening a
//! GPU with one stream, row-major matrices and sparse codes on it, the cuBLAS GEMM in full f32,
//! and the step's own kernels (`kernels.cu`, compiled by NVRTC when the device opens).

use std::sync::Arc;

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DriverError, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{CompileOptions, Ptx};
use ndarray::{Array2, ArrayView1, ArrayView2};

use super::Device;
use crate::error::{Error, Result};
use crate::select::Codes;

/// The kernels' CUDA C source.
const KERNELS_CU: &str = include_str!("kernels.cu");

/// Threads per block for the element-wise and per-row kernels.
const BLOCK: u32 = 256;

/// Compiles `kernels.cu` to PTX with NVRTC. Needs only NVRTC, no GPU or driver, so it can be
/// checked on any machine that has the library.
pub fn compile_kernels() -> Result<Ptx> {
    let fail = |reason: String| Error::Device {
        device: "cuda".to_string(),
        reason,
    };
    // SAFETY: only tries to load the library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        let (what, fix) = NVRTC_MISSING;
        return Err(fail(format!("{what}; {fix}")));
    }
    let opts = CompileOptions {
        name: Some("kernels.cu".to_string()),
        ..CompileOptions::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(KERNELS_CU, opts)
        .map_err(|e| fail(format!("NVRTC could not compile the kernels: {e:?}")))
}

/// The loaded kernels.
struct Kernels {
    sub_row: CudaFunction,
    decode_csr: CudaFunction,
}

/// An open GPU: its context, the stream every operation is queued on, and a cuBLAS handle
/// bound to that stream.
pub struct CudaDevice {
    ordinal: usize,
    name: String,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: Kernels,
}

/// Sparse codes on the GPU, in the CSR layout of [`Codes`] (row offsets as i64).
pub struct DeviceCodes {
    /// Row offsets, rows + 1.
    pub indptr: CudaSlice<i64>,
    /// Latent of each code.
    pub indices: CudaSlice<u32>,
    /// Value of each code.
    pub values: CudaSlice<f32>,
    /// Rows.
    pub rows: usize,
    /// F.
    pub n_latents: usize,
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

/// What is wrong, and the fix, when NVRTC does not load.
const NVRTC_MISSING: (&str, &str) = (
    "NVRTC (libnvrtc.so, CUDA 11 to 13) was not found",
    "install the CUDA toolkit's NVRTC and put its lib directory on LD_LIBRARY_PATH",
);

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
        Some(NVRTC_MISSING)
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
        let module = ctx
            .load_module(compile_kernels()?)
            .map_err(|e| driver("loading the kernels", e))?;
        let function = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| driver(&format!("loading kernel {name}"), e))
        };
        let kernels = Kernels {
            sub_row: function("sub_row")?,
            decode_csr: function("decode_csr")?,
        };
        Ok(CudaDevice {
            ordinal,
            name,
            stream,
            blas,
            kernels,
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

    /// Copies a host vector to the GPU.
    pub fn upload_vec(&self, v: ArrayView1<'_, f32>) -> Result<CudaSlice<f32>> {
        let v = v.as_standard_layout();
        self.stream
            .clone_htod(v.as_slice().expect("standard layout"))
            .map_err(|e| self.error("copying to the GPU", e))
    }

    /// Copies sparse codes to the GPU.
    pub fn upload_codes(&self, codes: &Codes) -> Result<DeviceCodes> {
        let indptr: Vec<i64> = codes.indptr.iter().map(|&p| p as i64).collect();
        let copy = |e| self.error("copying to the GPU", e);
        Ok(DeviceCodes {
            indptr: self.stream.clone_htod(&indptr).map_err(copy)?,
            indices: self.stream.clone_htod(&codes.indices).map_err(copy)?,
            values: self.stream.clone_htod(&codes.values).map_err(copy)?,
            rows: codes.n_rows(),
            n_latents: codes.n_latents,
        })
    }

    /// `out ← x − v` with the D-vector `v` subtracted from every row (x − b_dec).
    pub fn sub_row(
        &self,
        x: &DeviceMatrix,
        v: &CudaSlice<f32>,
        out: &mut DeviceMatrix,
    ) -> Result<()> {
        check_same_shape("sub_row output", out, x.rows, x.cols)?;
        check_len("sub_row vector", v.len(), x.cols)?;
        let n = (x.rows * x.cols) as u64;
        let blocks = n.div_ceil(BLOCK as u64).clamp(1, 65_535) as u32;
        let (rows, cols) = (x.rows as i64, x.cols as i64);
        let mut launch = self.stream.launch_builder(&self.kernels.sub_row);
        launch
            .arg(&x.data)
            .arg(v)
            .arg(&mut out.data)
            .arg(&rows)
            .arg(&cols);
        // SAFETY: the argument list matches `sub_row` in kernels.cu; lengths checked above.
        unsafe { launch.launch(grid(blocks)) }
            .map(drop)
            .map_err(|e| self.error("the sub_row kernel", e))
    }

    /// `x_hat ← codes·W_dec + b_dec` (the sparse decoder, one block per row).
    pub fn decode(
        &self,
        codes: &DeviceCodes,
        w_dec_fd: &DeviceMatrix,
        b_dec_d: &CudaSlice<f32>,
        x_hat_bd: &mut DeviceMatrix,
    ) -> Result<()> {
        let d = w_dec_fd.cols;
        check_same_shape("W_dec", w_dec_fd, codes.n_latents, d)?;
        check_same_shape("decoder output", x_hat_bd, codes.rows, d)?;
        check_len("b_dec", b_dec_d.len(), d)?;
        if codes.rows == 0 {
            return Ok(());
        }
        let d = d as i64;
        let mut launch = self.stream.launch_builder(&self.kernels.decode_csr);
        launch
            .arg(&codes.indptr)
            .arg(&codes.indices)
            .arg(&codes.values)
            .arg(&w_dec_fd.data)
            .arg(b_dec_d)
            .arg(&mut x_hat_bd.data)
            .arg(&d);
        // SAFETY: the argument list matches `decode_csr`; shapes checked above, and indices are
        // below F by construction of `Codes`.
        unsafe { launch.launch(grid(codes.rows as u32)) }
            .map(drop)
            .map_err(|e| self.error("the decode_csr kernel", e))
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

/// `blocks` blocks of [`BLOCK`] threads, no shared memory.
fn grid(blocks: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn check_same_shape(what: &str, m: &DeviceMatrix, rows: usize, cols: usize) -> Result<()> {
    crate::error::check_shape(what, &[m.rows, m.cols], &[rows, cols])
}

fn check_len(what: &str, len: usize, expected: usize) -> Result<()> {
    crate::error::check_shape(what, &[len], &[expected])
}
