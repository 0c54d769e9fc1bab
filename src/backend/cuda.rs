//! The CUDA device (feature `cuda`): finding the driver, cuBLAS and NVRTC at run time, opening a
//! GPU with a stream for compute (and one per `Uploader` for batch transfers), row-major
//! matrices and sparse codes on it, the cuBLAS GEMM in full f32, and the step's own kernels
//! (`kernels.cu`, compiled by NVRTC when the device opens).

use std::sync::Arc;

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr,
    DevicePtrMut, DriverError, LaunchConfig, PinnedHostSlice,
};
use cudarc::nvrtc::{CompileOptions, Ptx};
use ndarray::{Array2, ArrayView1, ArrayView2};

use super::{Device, Gpu};
use crate::error::{Error, Result};
use crate::select::Codes;

/// The kernels' CUDA C source.
const KERNELS_CU: &str = include_str!("kernels.cu");

/// Threads per block for the element-wise and per-row kernels.
const BLOCK: u32 = 256;

/// Compiles `kernels.cu` to PTX with NVRTC. Needs only NVRTC, no GPU or driver, so it can be
/// checked on any machine that has the library. The first success is kept for the process: a
/// compile takes one to two seconds, and a sweep (or the test suite) opens a device per SAE.
pub fn compile_kernels() -> Result<Ptx> {
    // Write-once: the PTX is a pure function of the source compiled into this binary.
    static COMPILED: std::sync::OnceLock<Ptx> = std::sync::OnceLock::new();
    if let Some(ptx) = COMPILED.get() {
        return Ok(ptx.clone());
    }
    let ptx = compile_with_nvrtc()?;
    Ok(COMPILED.get_or_init(|| ptx).clone())
}

fn compile_with_nvrtc() -> Result<Ptx> {
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
        // No fused multiply-adds: the element-wise arithmetic then rounds as the CPU path's.
        fmad: Some(false),
        ..CompileOptions::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(KERNELS_CU, opts)
        .map_err(|e| fail(format!("NVRTC could not compile the kernels: {e:?}")))
}

/// Declares the kernels of `kernels.cu` as fields of [`Kernels`], loaded by name.
macro_rules! kernels {
    ($($name:ident),* $(,)?) => {
        /// The loaded kernels, one field per `extern "C"` function of `kernels.cu`.
        pub(crate) struct Kernels {
            $(pub(crate) $name: CudaFunction,)*
        }

        impl Kernels {
            fn load(load: impl Fn(&str) -> Result<CudaFunction>) -> Result<Self> {
                Ok(Kernels { $($name: load(stringify!($name))?,)* })
            }
        }
    };
}

kernels!(
    sub_row,
    threshold_plan,
    topk_plan,
    batch_hist,
    batch_pick,
    batch_row_counts,
    batch_quota,
    scan_counts,
    compact_rows,
    count_latents,
    update_dead,
    min_value,
    decode_csr,
    residual_grad,
    row_sq,
    col_partial,
    col_finish,
    sum_f64,
    sum_sq_f32,
    row_norms,
    l1_rows,
    scatter_by_latent,
    sort_segments,
    entry_grads,
    latent_grads,
    prep_rows,
    adam_rows,
    adam_vec,
);

/// Queues kernel `$kernel` of device `$dev` with launch configuration `$cfg` and the listed
/// arguments (references: device buffers, or host scalars of the kernel's C types).
macro_rules! launch {
    ($dev:expr, $kernel:ident, $cfg:expr, [$($arg:expr),* $(,)?]) => {{
        use cudarc::driver::PushKernelArg as _;
        let dev: &$crate::backend::cuda::CudaDevice = &$dev;
        let mut args = dev.stream.launch_builder(&dev.kernels.$kernel);
        $(
            let a = $arg;
            args.arg(a);
        )*
        // SAFETY: every call site passes the argument list of the kernel of that name in
        // kernels.cu, with buffers at least as long as the launch reads and writes.
        unsafe { args.launch($cfg) }
            .map(drop)
            .map_err(|e| dev.error(concat!("kernel ", stringify!($kernel)), e))
    }};
}
pub(crate) use launch;

/// An open GPU: its context, the stream every operation is queued on, and a cuBLAS handle
/// bound to that stream.
pub struct CudaDevice {
    ordinal: usize,
    name: String,
    pub(crate) stream: Arc<CudaStream>,
    blas: CudaBlas,
    pub(crate) kernels: Kernels,
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

/// Rows per chunk of a batch upload (3 MB at D=768): large enough that each chunk's GEMM runs
/// at full speed, small enough that the one transfer not hidden behind a GEMM is short.
pub(crate) const UPLOAD_CHUNK_ROWS: usize = 1024;

/// How batches reach the GPU ([`CudaDevice::upload_encode`]): a page-locked host buffer kept
/// between batches (the driver stages copies from ordinary memory at a fraction of the link's
/// speed: 7 ms for a 16384×768 batch on an H100 host), a second stream for the transfers, and
/// the events that order the two streams, kept so that a step creates none.
pub(crate) struct Uploader {
    copy: Arc<CudaStream>,
    pinned: Option<PinnedHostSlice<f32>>,
    /// Recorded on the device's stream before a batch's copies, which wait for it.
    computed: CudaEvent,
    /// One per chunk, recorded after its copy; the device's stream waits for it.
    arrived: Vec<CudaEvent>,
}

impl Drop for Uploader {
    fn drop(&mut self) {
        // The page-locked buffer must outlive any transfer still reading it.
        self.copy.context().record_err(self.copy.synchronize());
    }
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
    /// Opens `gpu`. Every way this can fail (no CUDA libraries, no driver, no such GPU, a
    /// driver error) is one [`Error::Device`] that names what is missing; none panics.
    pub fn open(gpu: Gpu) -> Result<Self> {
        let ordinal = gpu.ordinal;
        let device = Device::Cuda(gpu).to_string();
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
        // SAFETY: before any allocation. cudarc would otherwise record an event for every buffer
        // of every launch once a second stream exists; the only cross-stream traffic here is the
        // batch upload, which orders itself with explicit events (`upload_encode`).
        unsafe { ctx.disable_event_tracking() };
        let name = ctx
            .name()
            .map_err(|e| driver("reading the GPU's name", e))?;
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| fail(format!("creating a cuBLAS handle failed: {e:?}")))?;
        if gpu.tf32 {
            use cudarc::cublas::sys::{cublasMath_t, cublasSetMathMode, cublasStatus_t};
            // SAFETY: the handle is live; the mode only changes how later GEMMs round.
            let status = unsafe {
                cublasSetMathMode(*blas.handle(), cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH)
            };
            if status != cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(fail(format!("enabling TF32 GEMMs failed: {status:?}")));
            }
        }
        let module = ctx
            .load_module(compile_kernels()?)
            .map_err(|e| driver("loading the kernels", e))?;
        let kernels = Kernels::load(|name| {
            module
                .load_function(name)
                .map_err(|e| driver(&format!("loading kernel {name}"), e))
        })?;
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

    pub(crate) fn error(&self, what: &str, e: impl std::fmt::Debug) -> Error {
        Error::Device {
            device: Device::cuda(self.ordinal).to_string(),
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
        self.sub_rows(
            &x.data.slice(..),
            v,
            &mut out.data.slice_mut(..),
            x.rows,
            x.cols,
        )
    }

    /// [`CudaDevice::sub_row`] on `rows × cols` views, as checked by the callers.
    fn sub_rows(
        &self,
        x: &CudaView<'_, f32>,
        v: &CudaSlice<f32>,
        out: &mut CudaViewMut<'_, f32>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let (rows_i, cols_i) = (rows as i64, cols as i64);
        launch!(
            self,
            sub_row,
            elementwise(rows * cols),
            [x, v, out, &rows_i, &cols_i]
        )
    }

    /// `x_hat ← codes·W_dec (+ b_dec)` (the sparse decoder, one block per row).
    pub fn decode(
        &self,
        codes: &DeviceCodes,
        w_dec_fd: &DeviceMatrix,
        b_dec_d: Option<&CudaSlice<f32>>,
        x_hat_bd: &mut DeviceMatrix,
    ) -> Result<()> {
        let d = w_dec_fd.cols;
        check_same_shape("W_dec", w_dec_fd, codes.n_latents, d)?;
        check_same_shape("decoder output", x_hat_bd, codes.rows, d)?;
        if let Some(b) = b_dec_d {
            check_len("b_dec", b.len(), d)?;
        }
        if codes.rows == 0 {
            return Ok(());
        }
        let (d, has_bias) = (d as i64, b_dec_d.is_some() as i32);
        // Without a bias the kernel never reads it; any buffer stands in.
        let bias = b_dec_d.unwrap_or(&w_dec_fd.data);
        launch!(
            self,
            decode_csr,
            rows(codes.rows),
            [
                &codes.indptr,
                &codes.indices,
                &codes.values,
                &w_dec_fd.data,
                bias,
                &has_bias,
                &mut x_hat_bd.data,
                &d
            ]
        )
    }

    /// A fresh [`Uploader`] for this device's batches.
    pub(crate) fn uploader(&self) -> Result<Uploader> {
        let copy = self
            .stream
            .context()
            .new_stream()
            .map_err(|e| self.error("creating the copy stream", e))?;
        let computed = self
            .stream
            .context()
            .new_event(None)
            .map_err(|e| self.error("creating an event", e))?;
        Ok(Uploader {
            copy,
            pinned: None,
            computed,
            arrived: Vec::new(),
        })
    }

    /// Copies batch `x` (row-major, `x_bd`'s shape) to `x_bd` and computes
    /// `pre_bf ← (x − b_dec)·W_encᵀ` (with `xc_bd ← x − b_dec`), in chunks of
    /// [`UPLOAD_CHUNK_ROWS`] rows: chunk i+1 is filled into page-locked memory by the host and
    /// crosses the link on the uploader's stream while the GEMM of chunk i runs on the device's,
    /// so only the first chunk's transfer is exposed.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn upload_encode(
        &self,
        up: &mut Uploader,
        x: &[f32],
        b_dec_d: &CudaSlice<f32>,
        w_enc_fd: &DeviceMatrix,
        x_bd: &mut DeviceMatrix,
        xc_bd: &mut DeviceMatrix,
        pre_bf: &mut DeviceMatrix,
    ) -> Result<()> {
        use rayon::prelude::*;
        let (b, d, f) = (x_bd.rows, x_bd.cols, w_enc_fd.rows);
        check_len("batch", x.len(), b * d)?;
        check_len("b_dec", b_dec_d.len(), d)?;
        check_same_shape("W_enc", w_enc_fd, f, d)?;
        check_same_shape("centred batch", xc_bd, b, d)?;
        check_same_shape("pre-activations", pre_bf, b, f)?;
        let fail = |what: &'static str| move |e: DriverError| self.error(what, e);
        // The host refills the page-locked buffer below: the last transfer out of it must be
        // over (it normally is: the device's stream waited for it and was read since).
        up.copy
            .synchronize()
            .map_err(fail("waiting for the last transfer"))?;
        if up.pinned.as_ref().map(cudarc::driver::HostSlice::len) != Some(x.len()) {
            up.pinned = None;
            // SAFETY: each chunk is written in full below before it is copied.
            let fresh = unsafe { self.stream.context().alloc_pinned::<f32>(x.len()) }
                .map_err(fail("allocating page-locked host memory"))?;
            up.pinned = Some(fresh);
        }
        let chunks = b.div_ceil(UPLOAD_CHUNK_ROWS);
        while up.arrived.len() < chunks {
            let event = self
                .stream
                .context()
                .new_event(None)
                .map_err(fail("creating an event"))?;
            up.arrived.push(event);
        }
        // Copies start after the device's earlier work: x_bd's last readers, its allocation.
        up.computed
            .record(&self.stream)
            .and_then(|()| up.copy.wait(&up.computed))
            .map_err(fail("ordering the copy stream"))?;
        let host = up
            .pinned
            .as_mut()
            .expect("allocated above")
            .as_mut_slice()
            .map_err(fail("waiting for the last transfer"))?;
        for (chunk, arrived) in up.arrived[..chunks].iter().enumerate() {
            let rows = chunk * UPLOAD_CHUNK_ROWS..((chunk + 1) * UPLOAD_CHUNK_ROWS).min(b);
            let (n, elems) = (rows.len(), rows.start * d..rows.end * d);
            const PAR: usize = 1 << 16;
            host[elems.clone()]
                .par_chunks_mut(PAR)
                .zip(x[elems.clone()].par_chunks(PAR))
                .for_each(|(h, x)| h.copy_from_slice(x));
            up.copy
                .memcpy_htod(
                    &host[elems.clone()],
                    &mut x_bd.data.slice_mut(elems.clone()),
                )
                .map_err(fail("copying to the GPU"))?;
            arrived.record(&up.copy).map_err(fail("recording a copy"))?;
            self.stream
                .wait(arrived)
                .map_err(fail("waiting for a copy"))?;
            self.sub_rows(
                &x_bd.data.slice(elems.clone()),
                b_dec_d,
                &mut xc_bd.data.slice_mut(elems.clone()),
                n,
                d,
            )?;
            self.sgemm(
                (n, f, d),
                1.0,
                (&xc_bd.data.slice(elems.clone()), d, false),
                (&w_enc_fd.data, d, true),
                0.0,
                &mut pre_bf.data.slice_mut(rows.start * f..rows.end * f),
            )?;
        }
        Ok(())
    }

    /// Waits until everything queued on the device's stream has run.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| self.error("waiting for the GPU", e))
    }

    /// A zeroed buffer of `n` elements on the GPU.
    pub(crate) fn alloc<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<T>> {
        // cudarc refuses zero-length allocations; one element stands in for an empty buffer.
        self.stream
            .alloc_zeros(n.max(1))
            .map_err(|e| self.error("allocating GPU memory", e))
    }

    /// Copies a (small) device buffer to the host, waiting for the stream.
    pub(crate) fn read<T: cudarc::driver::DeviceRepr + Default + Clone>(
        &self,
        src: &CudaSlice<T>,
    ) -> Result<Vec<T>> {
        self.stream
            .clone_dtoh(src)
            .map_err(|e| self.error("copying from the GPU", e))
    }

    /// Copies host data into an existing device buffer of at least its length.
    pub(crate) fn write<T: cudarc::driver::DeviceRepr>(
        &self,
        src: &[T],
        dst: &mut CudaSlice<T>,
    ) -> Result<()> {
        let mut view = dst.slice_mut(..src.len());
        self.stream
            .memcpy_htod(src, &mut view)
            .map_err(|e| self.error("copying to the GPU", e))
    }

    /// Zeroes a device buffer.
    pub(crate) fn clear<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        dst: &mut CudaSlice<T>,
    ) -> Result<()> {
        self.stream
            .memset_zeros(dst)
            .map_err(|e| self.error("clearing GPU memory", e))
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
        self.sgemm(
            (m, n, k),
            alpha,
            (&a.data, a.cols, trans_a),
            (&b.data, b.cols, trans_b),
            beta,
            &mut c.data,
        )
    }

    /// `c ← alpha·op(a)·op(b) + beta·c` for an `m × n` row-major `c` and inner size `k`, each
    /// operand given as (buffer, leading dimension, transposed), as checked by the callers.
    fn sgemm<A: DevicePtr<f32>, B: DevicePtr<f32>, C: DevicePtrMut<f32>>(
        &self,
        (m, n, k): (usize, usize, usize),
        alpha: f32,
        (a, lda, trans_a): (&A, usize, bool),
        (b, ldb, trans_b): (&B, usize, bool),
        beta: f32,
        c: &mut C,
    ) -> Result<()> {
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
            lda: ldb as i32,
            ldb: lda as i32,
            beta,
            ldc: n as i32,
        };
        // SAFETY: the callers checked shapes and leading dimensions against the buffers.
        unsafe { self.blas.gemm(cfg, b, a, c) }.map_err(|e| self.error("cuBLAS sgemm", e))
    }
}

/// `blocks` blocks of [`BLOCK`] threads, no dynamic shared memory.
pub(crate) fn grid(blocks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.clamp(1, u32::MAX as usize) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block per row (or per latent) for `n` of them.
pub(crate) fn rows(n: usize) -> LaunchConfig {
    grid(n)
}

/// Enough blocks for `n` threads (grid-stride kernels loop past the cap).
pub(crate) fn elementwise(n: usize) -> LaunchConfig {
    grid(n.div_ceil(BLOCK as usize).min(65_535))
}

/// One block of 1024 threads (the single-block scans and reductions).
pub(crate) fn single_block() -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One warp per item for `n` items.
pub(crate) fn warps(n: usize) -> LaunchConfig {
    grid((n * 32).div_ceil(BLOCK as usize))
}

fn check_same_shape(what: &str, m: &DeviceMatrix, rows: usize, cols: usize) -> Result<()> {
    crate::error::check_shape(what, &[m.rows, m.cols], &[rows, cols])
}

fn check_len(what: &str, len: usize, expected: usize) -> Result<()> {
    crate::error::check_shape(what, &[len], &[expected])
}
