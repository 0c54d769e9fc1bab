//! The step's phases on a GPU (feature `cuda`): [`CudaStep`] keeps the parameters, Adam's
//! moments, the dead-latent counters and every step buffer in GPU memory and runs each phase
//! as the CPU does (same order of floating-point sums where it matters), queued on one stream
//! and reading back only the scalars the trainer asks for.

use cudarc::driver::CudaSlice;
use ndarray::{Array1, Array2};

use super::phases::{BackwardArgs, Captured, Firing, LossSums, Phases, State, Step};
use crate::arch::{DecoderConstraint, Selection};
use crate::backend::cuda::{
    elementwise, launch, rows, single_block, warps, CudaDevice, DeviceMatrix, Uploader,
};
use crate::backend::cuda_select::{select_codes, CodeBuffers, DeviceRule, MAX_ROWS};
use crate::backend::{Device, Gpu};
use crate::dist::Collective;
use crate::error::{Error, Result};
use crate::optim::ParamTensors;

/// The step's f64 scalars on the GPU, by name: where each batch-wide sum lands in
/// `DeviceStep::sums`, read back in one transfer.
mod slot {
    /// Σ_b ‖x − x̂‖².
    pub const SQ_ERROR: usize = 0;
    /// Σ_b ‖x − x̄‖², the batch's variance times B.
    pub const VARIANCE: usize = 1;
    /// ReLU's L1 sum Σ f_bj·n_j.
    pub const L1: usize = 2;
    /// AuxK: Σ_b ‖e − ê‖².
    pub const AUX_ERROR: usize = 3;
    /// AuxK: Σ_b ‖e − mean_b(e)‖².
    pub const AUX_VARIANCE: usize = 4;
    /// Σ_j ‖∂W_dec\[j\]‖² + ‖∂W_enc\[j\]‖² after projection.
    pub const GRAD_ROWS: usize = 5;
    /// ‖∂b_enc‖².
    pub const GRAD_B_ENC: usize = 6;
    /// ‖∂b_dec‖².
    pub const GRAD_B_DEC: usize = 7;
    /// Slots in all.
    pub const COUNT: usize = 8;
}

/// What the kernels take for "no ε" (no projection, no renormalisation): their argument is a
/// plain float, and a negative one turns the step off.
const NO_EPS: f32 = -1.0;

/// Rows summed per block in the first stage of the column sums.
const ROWS_PER_CHUNK: usize = 256;

/// The four parameter-shaped arrays on the GPU (parameters, moments or gradients). Vectors
/// are 1×N matrices so the bias gradient can use the GEMM.
struct DeviceParams {
    w_enc_fd: DeviceMatrix,
    b_enc_f: DeviceMatrix,
    w_dec_fd: DeviceMatrix,
    b_dec_d: DeviceMatrix,
}

impl DeviceParams {
    fn upload(dev: &CudaDevice, t: &ParamTensors) -> Result<Self> {
        let row = |v: &Array1<f32>| dev.upload(v.view().insert_axis(ndarray::Axis(0)));
        Ok(DeviceParams {
            w_enc_fd: dev.upload(t.w_enc_fd.view())?,
            b_enc_f: row(&t.b_enc_f)?,
            w_dec_fd: dev.upload(t.w_dec_fd.view())?,
            b_dec_d: row(&t.b_dec_d)?,
        })
    }

    /// Zeros on the GPU for `f` latents of width `d` (no host copy to upload).
    fn zeros(dev: &CudaDevice, f: usize, d: usize) -> Result<Self> {
        Ok(DeviceParams {
            w_enc_fd: dev.zeros(f, d)?,
            b_enc_f: dev.zeros(1, f)?,
            w_dec_fd: dev.zeros(f, d)?,
            b_dec_d: dev.zeros(1, d)?,
        })
    }

    fn download(&self, dev: &CudaDevice) -> Result<ParamTensors> {
        let vec = |m: &DeviceMatrix| -> Result<Array1<f32>> {
            Ok(dev.download(m)?.into_shape_with_order(m.cols).expect("1×N"))
        };
        Ok(ParamTensors {
            w_enc_fd: dev.download(&self.w_enc_fd)?,
            b_enc_f: vec(&self.b_enc_f)?,
            w_dec_fd: dev.download(&self.w_dec_fd)?,
            b_dec_d: vec(&self.b_dec_d)?,
            threshold_f: Array1::zeros(0),
        })
    }
}

/// Buffers shaped by the batch size B.
struct BatchBuffers {
    b: usize,
    x_bd: DeviceMatrix,
    xc_bd: DeviceMatrix,
    pre_bf: DeviceMatrix,
    x_hat_bd: DeviceMatrix,
    aux_hat_bd: DeviceMatrix,
    up_bd: DeviceMatrix,
    aux_up_bd: DeviceMatrix,
    ones_b: DeviceMatrix,
    row_f64_b: CudaSlice<f64>,
    gt_b: CudaSlice<u32>,
    eq_b: CudaSlice<u32>,
    col_partial: CudaSlice<f64>,
    codes: CodeBuffers,
    aux: CodeBuffers,
}

impl BatchBuffers {
    fn new(dev: &CudaDevice, b: usize, d: usize, f: usize) -> Result<Self> {
        Ok(BatchBuffers {
            b,
            x_bd: dev.zeros(b, d)?,
            xc_bd: dev.zeros(b, d)?,
            pre_bf: dev.zeros(b, f)?,
            x_hat_bd: dev.zeros(b, d)?,
            aux_hat_bd: dev.zeros(b, d)?,
            up_bd: dev.zeros(b, d)?,
            aux_up_bd: dev.zeros(b, d)?,
            ones_b: dev.upload(Array2::ones((1, b)).view())?,
            row_f64_b: dev.alloc(b)?,
            gt_b: dev.alloc(b)?,
            eq_b: dev.alloc(b)?,
            col_partial: dev.alloc(b.div_ceil(ROWS_PER_CHUNK) * d)?,
            codes: CodeBuffers::new(dev, b, f)?,
            aux: CodeBuffers::new(dev, b, f)?,
        })
    }
}

/// A trainer's state and workspaces in GPU memory.
pub(crate) struct CudaStep {
    dev: CudaDevice,
    params: DeviceParams,
    m: DeviceParams,
    v: DeviceParams,
    grads: DeviceParams,
    active_f: CudaSlice<u32>,
    row_sq_f: CudaSlice<f64>,
    n_f: CudaSlice<f32>,
    since_f: CudaSlice<u64>,
    dead_f: CudaSlice<u32>,
    /// Small results read back: [n_dead, min code bits], the batch top-k state, its histogram.
    flags: CudaSlice<u32>,
    batch_state: CudaSlice<u32>,
    hist: CudaSlice<u32>,
    /// f64 scalars: sums, and the D-wide column means.
    sums: CudaSlice<f64>,
    mean_d: CudaSlice<f64>,
    batch: Option<BatchBuffers>,
    /// How batches reach the GPU.
    upload: Uploader,
    /// Whether the host's copy of the state lags behind this one.
    stale: bool,
    /// This step: its dead latents, whether AuxK contributes, its backward's arguments, the
    /// raw gradients when captured, and the sums as last read back.
    n_dead: usize,
    aux_active: bool,
    args: Option<BackwardArgs>,
    raw_grads: Option<ParamTensors>,
    sums_read: Vec<f64>,
}

impl CudaStep {
    /// A copy of a trainer's whole state on `gpu`.
    pub(crate) fn new(state: &State, gpu: Gpu) -> Result<Self> {
        let sae = &state.sae;
        if !sae.config.arch.runs_on_gpu() {
            return Err(sae.config.arch.not_on_gpu(Device::Cuda(gpu).to_string()));
        }
        let dev = CudaDevice::open(gpu)?;
        let (f, d) = (sae.config.dict_size, sae.config.d_model);
        let params = DeviceParams::upload(
            &dev,
            &ParamTensors {
                w_enc_fd: sae.w_enc_fd.clone(),
                b_enc_f: sae.b_enc_f.clone(),
                w_dec_fd: sae.w_dec_fd.clone(),
                b_dec_d: sae.b_dec_d.clone(),
                threshold_f: Array1::zeros(0),
            },
        )?;
        let mut since_f: CudaSlice<u64> = dev.alloc(f)?;
        dev.write(&state.tokens_since_fired_f, &mut since_f)?;
        let mut n_f = dev.alloc(f)?;
        dev.write(&vec![1.0f32; f], &mut n_f)?;
        Ok(CudaStep {
            m: DeviceParams::upload(&dev, &state.adam.m)?,
            v: DeviceParams::upload(&dev, &state.adam.v)?,
            grads: DeviceParams::zeros(&dev, f, d)?,
            params,
            active_f: dev.alloc(f)?,
            row_sq_f: dev.alloc(f)?,
            n_f,
            since_f,
            dead_f: dev.alloc(f)?,
            flags: dev.alloc(4)?,
            batch_state: dev.alloc(4)?,
            hist: dev.alloc(256)?,
            sums: dev.alloc(slot::COUNT)?,
            mean_d: dev.alloc(d)?,
            batch: None,
            upload: dev.uploader()?,
            dev,
            stale: false,
            n_dead: 0,
            aux_active: false,
            args: None,
            raw_grads: None,
            sums_read: vec![0.0; slot::COUNT],
        })
    }

    /// Column means of x, or of x − x̂ with `minus_x_hat`, into `mean_d`.
    fn column_means(&mut self, minus_x_hat: bool) -> Result<()> {
        let dev = &self.dev;
        let bb = self.batch.as_mut().expect("batch buffers");
        let (b, d) = (bb.b, bb.x_bd.cols);
        let chunks = b.div_ceil(ROWS_PER_CHUNK);
        let (bi, di, per, ci) = (b as i64, d as i64, ROWS_PER_CHUNK as i64, chunks as i64);
        let has_y = minus_x_hat as i32;
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (d.div_ceil(128) as u32, chunks as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            dev,
            col_partial,
            cfg,
            [
                &bb.x_bd.data,
                &bb.x_hat_bd.data,
                &has_y,
                &bi,
                &di,
                &per,
                &mut bb.col_partial
            ]
        )?;
        let n = b as f64;
        launch!(
            dev,
            col_finish,
            elementwise(d),
            [&bb.col_partial, &ci, &di, &n, &mut self.mean_d]
        )
    }

    /// sums\[slot\] = Σ_b ‖((x − y) − z) − mean‖² (each part left out when not asked for).
    fn sq_sum(&mut self, y: bool, z: bool, mean: bool, slot: usize) -> Result<()> {
        let dev = &self.dev;
        let bb = self.batch.as_mut().expect("batch buffers");
        let d = bb.x_bd.cols as i64;
        let (hy, hz, hm) = (y as i32, z as i32, mean as i32);
        launch!(
            dev,
            row_sq,
            rows(bb.b),
            [
                &bb.x_bd.data,
                &bb.x_hat_bd.data,
                &hy,
                &bb.aux_hat_bd.data,
                &hz,
                &self.mean_d,
                &hm,
                &d,
                &mut bb.row_f64_b
            ]
        )?;
        let n = bb.b as i64;
        let mut out = self.sums.slice_mut(slot..slot + 1);
        launch!(dev, sum_f64, single_block(), [&bb.row_f64_b, &n, &mut out])
    }
}

impl CudaStep {
    fn args(&self) -> BackwardArgs {
        self.args.expect("grad_norm and captured follow backward")
    }

    /// The gradients as a dense framework holds them (inactive rows zero).
    fn download_grads(&self) -> Result<ParamTensors> {
        let mut t = self.grads.download(&self.dev)?;
        let active = self.dev.read(&self.active_f)?;
        for (j, &a) in active.iter().enumerate().take(t.w_enc_fd.nrows()) {
            if a == 0 {
                t.w_enc_fd.row_mut(j).fill(0.0);
                t.w_dec_fd.row_mut(j).fill(0.0);
            }
        }
        Ok(t)
    }
}

impl Phases for CudaStep {
    fn device_name(&self) -> String {
        self.dev.name()
    }

    fn queues(&self) -> bool {
        true
    }

    fn wait(&self) -> Result<()> {
        self.dev.synchronize()
    }

    fn read_back(&mut self, state: &mut State, _collective: &dyn Collective) -> Result<()> {
        if !self.stale {
            return Ok(());
        }
        let p = self.params.download(&self.dev)?;
        let sae = &mut state.sae;
        sae.w_enc_fd = p.w_enc_fd;
        sae.b_enc_f = p.b_enc_f;
        sae.w_dec_fd = p.w_dec_fd;
        sae.b_dec_d = p.b_dec_d;
        state.adam.m = self.m.download(&self.dev)?;
        state.adam.v = self.v.download(&self.dev)?;
        state.tokens_since_fired_f = self.dev.read(&self.since_f)?;
        self.stale = false;
        Ok(())
    }

    fn begin(&mut self, rows: usize) -> Result<()> {
        if rows > MAX_ROWS {
            return Err(Error::OutOfRange {
                what: "batch size on a GPU".into(),
                value: rows as f64,
                range: format!("[1, {MAX_ROWS}]"),
            });
        }
        if self.batch.as_ref().map(|bb| bb.b) != Some(rows) {
            let (f, d) = (self.params.w_enc_fd.rows, self.params.w_enc_fd.cols);
            self.batch = None;
            self.batch = Some(BatchBuffers::new(&self.dev, rows, d, f)?);
        }
        Ok(())
    }

    fn set_b_dec(&mut self, state: &mut State, b_dec_d: Array1<f32>) -> Result<()> {
        let data = b_dec_d.as_slice().expect("a new vector is contiguous");
        self.dev.write(data, &mut self.params.b_dec_d.data)?;
        state.sae.b_dec_d = b_dec_d;
        Ok(())
    }

    fn encode(&mut self, _state: &State, step: &Step<'_>) -> Result<()> {
        // The upload overlaps x − b_dec and the encoder GEMM (b_enc is added by every reader).
        let g = self;
        let bb = g.batch.as_mut().expect("begin allocates the batch buffers");
        g.dev.upload_encode(
            &mut g.upload,
            step.x_bd.as_slice().expect("standard layout"),
            &g.params.b_dec_d.data,
            &g.params.w_enc_fd,
            &mut bb.x_bd,
            &mut bb.xc_bd,
            &mut bb.pre_bf,
        )
    }

    fn select(&mut self, _state: &State, _step: &Step<'_>, selection: Selection) -> Result<()> {
        let g = self;
        let bb = g.batch.as_mut().expect("begin allocates the batch buffers");
        select_codes(
            &g.dev,
            DeviceRule::training(selection),
            &bb.pre_bf,
            &g.params.b_enc_f,
            &mut g.batch_state,
            &mut g.hist,
            &mut bb.gt_b,
            &mut bb.eq_b,
            &mut bb.codes,
        )
    }

    fn mark_fired(
        &mut self,
        _state: &mut State,
        _step: &Step<'_>,
        dead_tokens: u64,
        _want_min_code: bool,
    ) -> Result<Firing> {
        let g = self;
        let (f, dev) = (g.params.w_enc_fd.rows, &g.dev);
        let bb = g.batch.as_mut().expect("begin allocates the batch buffers");
        let b = bb.b;
        bb.codes.by_latent(dev, b, f)?;
        dev.write(&[0u32, 0x7f80_0000], &mut g.flags)?;
        let (rows_u, fi) = (b as u64, f as i64);
        let mut n_dead_slot = g.flags.slice_mut(0..1);
        launch!(
            dev,
            update_dead,
            elementwise(f),
            [
                &bb.codes.count_f,
                &mut g.since_f,
                &rows_u,
                &dead_tokens,
                &fi,
                &mut g.dead_f,
                &mut n_dead_slot
            ]
        )?;
        let nnz = bb.codes.nnz as i64;
        if nnz > 0 {
            let mut min_slot = g.flags.slice_mut(1..2);
            launch!(
                dev,
                min_value,
                elementwise(bb.codes.nnz),
                [&bb.codes.codes.values, &nnz, &mut min_slot]
            )?;
        }
        let flags = dev.read(&g.flags)?;
        g.n_dead = flags[0] as usize;
        Ok(Firing {
            nnz: bb.codes.nnz as u64,
            n_dead: g.n_dead,
            min_code: f32::from_bits(flags[1]), // +∞ when no code was kept
        })
    }

    fn decode(&mut self, _state: &State, _step: &Step<'_>) -> Result<()> {
        // The reconstruction, the MSE's upstream gradient, its sum and the variance's.
        {
            let g = &mut *self;
            let dev = &g.dev;
            let bb = g.batch.as_mut().expect("begin allocates the batch buffers");
            let (b, d) = (bb.b, bb.x_bd.cols);
            let scale = -2.0 / b as f32;
            dev.decode(
                &bb.codes.codes,
                &g.params.w_dec_fd,
                Some(&g.params.b_dec_d.data),
                &mut bb.x_hat_bd,
            )?;
            let (n, has_aux) = ((b * d) as i64, 0i32);
            launch!(
                dev,
                residual_grad,
                elementwise(b * d),
                [
                    &bb.x_bd.data,
                    &bb.x_hat_bd.data,
                    &bb.x_hat_bd.data,
                    &has_aux,
                    &scale,
                    &mut bb.up_bd.data,
                    &n
                ]
            )?;
        }
        self.sq_sum(true, false, false, slot::SQ_ERROR)?;
        self.column_means(false)?;
        self.sq_sum(false, false, true, slot::VARIANCE)
    }

    fn aux_residual(&mut self, _state: &State, _step: &Step<'_>, k_aux: usize) -> Result<[f64; 2]> {
        {
            let g = &mut *self;
            let bb = g.batch.as_mut().expect("begin allocates the batch buffers");
            select_codes(
                &g.dev,
                DeviceRule::TopK {
                    k: k_aux,
                    among: Some(&g.dead_f),
                },
                &bb.pre_bf,
                &g.params.b_enc_f,
                &mut g.batch_state,
                &mut g.hist,
                &mut bb.gt_b,
                &mut bb.eq_b,
                &mut bb.aux,
            )?;
            g.dev
                .decode(&bb.aux.codes, &g.params.w_dec_fd, None, &mut bb.aux_hat_bd)?;
        }
        // e − ê, and e − mean_b(e), with e = x − x̂ held constant.
        self.column_means(true)?;
        self.sq_sum(true, true, false, slot::AUX_ERROR)?;
        self.sq_sum(true, false, true, slot::AUX_VARIANCE)?;
        self.sums_read = self.dev.read(&self.sums)?;
        Ok([
            self.sums_read[slot::AUX_ERROR],
            self.sums_read[slot::AUX_VARIANCE],
        ])
    }

    fn set_aux_upstream(&mut self, _step: &Step<'_>, g_aux: Option<f32>) -> Result<()> {
        self.aux_active = g_aux.is_some();
        let Some(gscale) = g_aux else {
            return Ok(());
        };
        let g = self;
        let dev = &g.dev;
        let bb = g.batch.as_mut().expect("begin allocates the batch buffers");
        let (n, has_aux) = ((bb.b * bb.x_bd.cols) as i64, 1i32);
        launch!(
            dev,
            residual_grad,
            elementwise(bb.b * bb.x_bd.cols),
            [
                &bb.x_bd.data,
                &bb.x_hat_bd.data,
                &bb.aux_hat_bd.data,
                &has_aux,
                &gscale,
                &mut bb.aux_up_bd.data,
                &n
            ]
        )
    }

    fn backward(&mut self, _state: &State, _step: &Step<'_>, args: BackwardArgs) -> Result<()> {
        let g = &mut *self;
        let (f, d) = (g.params.w_enc_fd.rows, g.params.w_enc_fd.cols);
        let dev = &g.dev;
        let bb = g.batch.as_mut().expect("begin allocates the batch buffers");
        let b = bb.b;
        let (l1_coef, weight_by_norm) = args.l1.unwrap_or((0.0, false));
        if args.l1.is_some() {
            // ReLU's L1 sum Σ f_bj·n_j, with n_j the decoder rows' norms when they weigh it.
            if weight_by_norm {
                let (fi, di) = (f as i64, d as i64);
                launch!(
                    dev,
                    row_norms,
                    warps(f),
                    [&g.params.w_dec_fd.data, &fi, &di, &mut g.n_f]
                )?;
            }
            let bi = b as i64;
            launch!(
                dev,
                l1_rows,
                elementwise(b),
                [
                    &bb.codes.codes.indptr,
                    &bb.codes.codes.indices,
                    &bb.codes.codes.values,
                    &g.n_f,
                    &bi,
                    &mut bb.row_f64_b
                ]
            )?;
            let mut out = g.sums.slice_mut(slot::L1..slot::L1 + 1);
            launch!(dev, sum_f64, single_block(), [&bb.row_f64_b, &bi, &mut out])?;
        }
        let l1_per_row = l1_coef / b as f32;
        bb.codes
            .entry_grads(dev, &bb.up_bd, &g.params.w_dec_fd, &g.n_f, l1_per_row)?;
        if g.aux_active {
            bb.aux.by_latent(dev, b, f)?;
            bb.aux
                .entry_grads(dev, &bb.aux_up_bd, &g.params.w_dec_fd, &g.n_f, 0.0)?;
        } else {
            bb.aux.nnz = 0;
        }
        let (has_aux, weight, di) = (g.aux_active as i32, weight_by_norm as i32, d as i64);
        let (c, a) = (&bb.codes, &bb.aux);
        launch!(
            dev,
            latent_grads,
            rows(f),
            [
                &c.offsets_f,
                &c.entry_sorted,
                &c.row_sorted,
                &c.codes.values,
                &c.g_e,
                &a.offsets_f,
                &a.entry_sorted,
                &a.row_sorted,
                &a.codes.values,
                &a.g_e,
                &has_aux,
                &bb.up_bd.data,
                &bb.aux_up_bd.data,
                &bb.xc_bd.data,
                &g.params.w_dec_fd.data,
                &g.n_f,
                &l1_per_row,
                &weight,
                &di,
                &mut g.grads.w_dec_fd.data,
                &mut g.grads.w_enc_fd.data,
                &mut g.grads.b_enc_f.data,
                &mut g.active_f
            ]
        )?;
        // ∂b_dec = Σ_b ∂L/∂x̂_b − Σ_j ∂b_enc[j]·W_enc[j].
        dev.gemm(
            1.0,
            &bb.ones_b,
            false,
            &bb.up_bd,
            false,
            0.0,
            &mut g.grads.b_dec_d,
        )?;
        dev.gemm(
            -1.0,
            &g.grads.b_enc_f,
            false,
            &g.params.w_enc_fd,
            false,
            1.0,
            &mut g.grads.b_dec_d,
        )?;
        self.args = Some(args);
        self.raw_grads = if args.capture {
            Some(self.download_grads()?)
        } else {
            None
        };
        Ok(())
    }

    fn grad_norm(&mut self, _state: &State, _step: &Step<'_>) -> Result<f64> {
        let project_eps = self.args().prep.project_eps.unwrap_or(NO_EPS);
        let g = &mut *self;
        let (f, d) = (g.params.w_enc_fd.rows, g.params.w_enc_fd.cols);
        let dev = &g.dev;
        let (fi, di) = (f as i64, d as i64);
        launch!(
            dev,
            prep_rows,
            rows(f),
            [
                &mut g.grads.w_dec_fd.data,
                &g.grads.w_enc_fd.data,
                &g.params.w_dec_fd.data,
                &g.active_f,
                &di,
                &project_eps,
                &mut g.row_sq_f
            ]
        )?;
        let mut out = g.sums.slice_mut(slot::GRAD_ROWS..slot::GRAD_ROWS + 1);
        launch!(dev, sum_f64, single_block(), [&g.row_sq_f, &fi, &mut out])?;
        let mut out = g.sums.slice_mut(slot::GRAD_B_ENC..slot::GRAD_B_ENC + 1);
        launch!(
            dev,
            sum_sq_f32,
            single_block(),
            [&g.grads.b_enc_f.data, &fi, &mut out]
        )?;
        let mut out = g.sums.slice_mut(slot::GRAD_B_DEC..slot::GRAD_B_DEC + 1);
        launch!(
            dev,
            sum_sq_f32,
            single_block(),
            [&g.grads.b_dec_d.data, &di, &mut out]
        )?;
        g.sums_read = dev.read(&g.sums)?;
        let s = &g.sums_read;
        Ok((s[slot::GRAD_ROWS] + s[slot::GRAD_B_ENC] + s[slot::GRAD_B_DEC]).sqrt())
    }

    fn captured(&mut self, _state: &State, grad_scale: f32) -> Result<Captured> {
        let mut update_grads = self.download_grads()?;
        update_grads.scale(grad_scale);
        let f = self.params.w_enc_fd.rows;
        let bb = self
            .batch
            .as_ref()
            .expect("begin allocates the batch buffers");
        Ok(Captured {
            params: self.params.download(&self.dev)?,
            codes_bf: bb.codes.download(&self.dev)?.to_dense(),
            aux_codes_bf: if self.aux_active {
                bb.aux.download(&self.dev)?.to_dense()
            } else {
                Array2::zeros((bb.b, f))
            },
            x_hat_bd: self.dev.download(&bb.x_hat_bd)?,
            raw_grads: self
                .raw_grads
                .take()
                .expect("captured follows a capturing backward"),
            update_grads,
        })
    }

    fn update(
        &mut self,
        state: &mut State,
        _step: &Step<'_>,
        lr: f64,
        grad_scale: f32,
        decoder: DecoderConstraint,
    ) -> Result<()> {
        let s = state.adam.next_step(lr, grad_scale);
        let renorm = match decoder {
            DecoderConstraint::UnitNorm { renorm_eps, .. } => renorm_eps,
            DecoderConstraint::Free => NO_EPS,
        };
        let g = &mut *self;
        let (f, d) = (g.params.w_enc_fd.rows, g.params.w_enc_fd.cols);
        let dev = &g.dev;
        let di = d as i64;
        let (p, m, v, gr) = (&mut g.params, &mut g.m, &mut g.v, &g.grads);
        let matrices = [
            (
                &mut p.w_enc_fd,
                &mut m.w_enc_fd,
                &mut v.w_enc_fd,
                &gr.w_enc_fd,
                NO_EPS,
            ),
            (
                &mut p.w_dec_fd,
                &mut m.w_dec_fd,
                &mut v.w_dec_fd,
                &gr.w_dec_fd,
                renorm,
            ),
        ];
        for (pw, mw, vw, gw, renorm_eps) in matrices {
            launch!(
                dev,
                adam_rows,
                rows(f),
                [
                    &mut pw.data,
                    &mut mw.data,
                    &mut vw.data,
                    &gw.data,
                    &g.active_f,
                    &di,
                    &s.grad_scale,
                    &s.one_minus_beta1,
                    &s.beta2,
                    &s.one_minus_beta2,
                    &s.step_size,
                    &s.bias_correction2_sqrt,
                    &s.eps,
                    &renorm_eps
                ]
            )?;
        }
        let biases = [
            (&mut p.b_enc_f, &mut m.b_enc_f, &mut v.b_enc_f, &gr.b_enc_f),
            (&mut p.b_dec_d, &mut m.b_dec_d, &mut v.b_dec_d, &gr.b_dec_d),
        ];
        for (pb, mb, vb, gb) in biases {
            let n = pb.cols as i64;
            launch!(
                dev,
                adam_vec,
                elementwise(pb.cols),
                [
                    &mut pb.data,
                    &mut mb.data,
                    &mut vb.data,
                    &gb.data,
                    &n,
                    &s.grad_scale,
                    &s.one_minus_beta1,
                    &s.beta2,
                    &s.one_minus_beta2,
                    &s.step_size,
                    &s.bias_correction2_sqrt,
                    &s.eps
                ]
            )?;
        }
        g.stale = true;
        Ok(())
    }

    fn loss_sums(&mut self) -> Result<LossSums> {
        let s = &self.sums_read;
        Ok(LossSums {
            sq_error: s[slot::SQ_ERROR],
            reconstruction: s[slot::SQ_ERROR],
            variance: s[slot::VARIANCE],
            l1: if self.args().l1.is_some() {
                s[slot::L1]
            } else {
                0.0
            },
        })
    }

    fn params_changed(&mut self) {
        // Resampling runs on the CPU only (`Trainer::set_device` refuses it here).
    }

    fn residual(&mut self, step: &Step<'_>) -> Result<Array2<f32>> {
        let bb = self
            .batch
            .as_ref()
            .expect("begin allocates the batch buffers");
        Ok(&step.x_bd - &self.dev.download(&bb.x_hat_bd)?)
    }
}
