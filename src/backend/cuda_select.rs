//! Selection on the GPU (feature `cuda`): the codes' buffers with their selection plan and
//! latent-major order, the rules' kernels and the compaction, shared by the training step
//! (`train::cuda`) and by inference, whose [`DeviceEncoder`] runs an SAE's encoder on a GPU.

use cudarc::driver::CudaSlice;
use ndarray::{ArrayView1, ArrayView2};

use super::cuda::{
    elementwise, launch, rows, single_block, warps, CudaDevice, DeviceCodes, DeviceMatrix, Uploader,
};
use super::Gpu;
use crate::arch::Selection;
use crate::error::{Error, Result};
use crate::select::Codes;

/// `sort_segments` holds a bitmap of the batch's rows in 16 KiB of shared memory.
pub(crate) const MAX_ROWS: usize = 4096 * 32;

/// Sparse codes on the GPU with their selection plan and their latent-major (CSC) order.
pub(crate) struct CodeBuffers {
    /// Per row: the cut, the ties to keep at it, and the entries kept.
    pub(crate) cut_b: CudaSlice<u32>,
    pub(crate) quota_b: CudaSlice<u32>,
    pub(crate) count_b: CudaSlice<u32>,
    pub(crate) codes: DeviceCodes,
    pub(crate) nnz: usize,
    /// Entries per latent, their offsets (F + 1), and the fill cursors of the scatter.
    pub(crate) count_f: CudaSlice<u32>,
    pub(crate) offsets_f: CudaSlice<i64>,
    pub(crate) fill_f: CudaSlice<u32>,
    /// Entry positions as scattered, the row of each entry, then both ordered by row.
    pub(crate) unsorted: CudaSlice<u32>,
    pub(crate) row_of_entry: CudaSlice<u32>,
    pub(crate) entry_sorted: CudaSlice<u32>,
    pub(crate) row_sorted: CudaSlice<u32>,
    /// ∂L/∂f per entry.
    pub(crate) g_e: CudaSlice<f32>,
}

impl CodeBuffers {
    pub(crate) fn new(dev: &CudaDevice, b: usize, f: usize) -> Result<Self> {
        Ok(CodeBuffers {
            cut_b: dev.alloc(b)?,
            quota_b: dev.alloc(b)?,
            count_b: dev.alloc(b)?,
            codes: DeviceCodes {
                indptr: dev.alloc(b + 1)?,
                indices: dev.alloc(0)?,
                values: dev.alloc(0)?,
                rows: b,
                n_latents: f,
            },
            nnz: 0,
            count_f: dev.alloc(f)?,
            offsets_f: dev.alloc(f + 1)?,
            fill_f: dev.alloc(f)?,
            unsorted: dev.alloc(0)?,
            row_of_entry: dev.alloc(0)?,
            entry_sorted: dev.alloc(0)?,
            row_sorted: dev.alloc(0)?,
            g_e: dev.alloc(0)?,
        })
    }

    /// Turns the plan into CSR codes: offsets, the total (read back to size the buffers, the
    /// step's one unavoidable wait for ReLU), then the entries.
    pub(crate) fn compact(
        &mut self,
        dev: &CudaDevice,
        pre_bf: &DeviceMatrix,
        b_enc_f: &DeviceMatrix,
        mask_f: Option<&CudaSlice<u32>>,
    ) -> Result<()> {
        let (b, f) = (pre_bf.rows, pre_bf.cols as i64);
        let n = b as i64;
        launch!(
            dev,
            scan_counts,
            single_block(),
            [&self.count_b, &n, &mut self.codes.indptr]
        )?;
        let nnz = dev.read(&self.codes.indptr)?[b] as usize;
        if nnz > self.codes.indices.len() {
            let cap = nnz + nnz / 4;
            self.codes.indices = dev.alloc(cap)?;
            self.codes.values = dev.alloc(cap)?;
            for a in [
                &mut self.unsorted,
                &mut self.row_of_entry,
                &mut self.entry_sorted,
                &mut self.row_sorted,
            ] {
                *a = dev.alloc(cap)?;
            }
            self.g_e = dev.alloc(cap)?;
        }
        self.nnz = nnz;
        if nnz == 0 {
            return Ok(());
        }
        let has_mask = mask_f.is_some() as i32;
        // Without a mask the kernel reads none; any buffer stands in.
        let mask = mask_f.unwrap_or(&self.count_b);
        launch!(
            dev,
            compact_rows,
            rows(b),
            [
                &pre_bf.data,
                &b_enc_f.data,
                mask,
                &has_mask,
                &f,
                &self.cut_b,
                &self.quota_b,
                &self.codes.indptr,
                &mut self.codes.indices,
                &mut self.codes.values
            ]
        )
    }

    /// The latent-major order of the codes: per-latent offsets, then each latent's entries in
    /// row order.
    pub(crate) fn by_latent(&mut self, dev: &CudaDevice, b: usize, f: usize) -> Result<()> {
        dev.clear(&mut self.count_f)?;
        dev.clear(&mut self.fill_f)?;
        let nnz = self.nnz as i64;
        if nnz > 0 {
            launch!(
                dev,
                count_latents,
                elementwise(self.nnz),
                [&self.codes.indices, &nnz, &mut self.count_f]
            )?;
        }
        let fi = f as i64;
        launch!(
            dev,
            scan_counts,
            single_block(),
            [&self.count_f, &fi, &mut self.offsets_f]
        )?;
        if nnz == 0 {
            return Ok(());
        }
        launch!(
            dev,
            scatter_by_latent,
            rows(b),
            [
                &self.codes.indptr,
                &self.codes.indices,
                &self.offsets_f,
                &mut self.fill_f,
                &mut self.unsorted,
                &mut self.row_of_entry
            ]
        )?;
        let bi = b as i64;
        launch!(
            dev,
            sort_segments,
            rows(f),
            [
                &self.offsets_f,
                &self.unsorted,
                &self.row_of_entry,
                &bi,
                &mut self.entry_sorted,
                &mut self.row_sorted
            ]
        )
    }

    /// g_e = u_b·W_dec\[j\] (+ the L1 term) per entry.
    pub(crate) fn entry_grads(
        &mut self,
        dev: &CudaDevice,
        up_bd: &DeviceMatrix,
        w_dec_fd: &DeviceMatrix,
        n_f: &CudaSlice<f32>,
        l1_per_row: f32,
    ) -> Result<()> {
        if self.nnz == 0 {
            return Ok(());
        }
        let (nnz, d) = (self.nnz as i64, w_dec_fd.cols as i64);
        launch!(
            dev,
            entry_grads,
            warps(self.nnz),
            [
                &self.codes.indices,
                &self.row_of_entry,
                &nnz,
                &up_bd.data,
                &w_dec_fd.data,
                n_f,
                &l1_per_row,
                &d,
                &mut self.g_e
            ]
        )
    }

    /// The codes on the host.
    pub(crate) fn download(&self, dev: &CudaDevice) -> Result<Codes> {
        let indptr = dev.read(&self.codes.indptr)?;
        let mut indices = dev.read(&self.codes.indices)?;
        let mut values = dev.read(&self.codes.values)?;
        indices.truncate(self.nnz);
        values.truncate(self.nnz);
        Ok(Codes {
            n_latents: self.codes.n_latents,
            indptr: indptr[..=self.codes.rows]
                .iter()
                .map(|&p| p as usize)
                .collect(),
            indices,
            values,
        })
    }
}

/// Which codes a selection on the GPU keeps (ReLU is the threshold 0).
#[derive(Clone, Copy)]
pub(crate) enum DeviceRule<'a> {
    /// Entries above θ.
    Threshold(f32),
    /// The k largest positive entries of each row, among the latents whose flag in `among` is
    /// set when given (AuxK's dead latents).
    TopK {
        k: usize,
        among: Option<&'a CudaSlice<u32>>,
    },
    /// The k·B largest positive entries of the batch.
    BatchTopK(usize),
}

impl DeviceRule<'_> {
    /// The training rule of `selection`.
    pub(crate) fn training(selection: Selection) -> Self {
        match selection {
            Selection::Relu => DeviceRule::Threshold(0.0),
            Selection::TopK(k) => DeviceRule::TopK { k, among: None },
            Selection::BatchTopK(k) => DeviceRule::BatchTopK(k),
            Selection::JumpRelu => {
                unreachable!("JumpReLU SAEs are refused before a GPU step or encoder is made")
            }
        }
    }
}

/// Selects the codes of the pre-activations `pre` (+ `b_enc`) by `rule` into `c`: a per-row
/// plan (cut and ties) from the rule's kernels, then the compaction. `batch_state`, `hist`,
/// `gt_b` and `eq_b` are batch top-k's scratch.
#[allow(clippy::too_many_arguments)]
pub(crate) fn select_codes(
    dev: &CudaDevice,
    rule: DeviceRule,
    pre: &DeviceMatrix,
    b_enc: &DeviceMatrix,
    batch_state: &mut CudaSlice<u32>,
    hist: &mut CudaSlice<u32>,
    gt_b: &mut CudaSlice<u32>,
    eq_b: &mut CudaSlice<u32>,
    c: &mut CodeBuffers,
) -> Result<()> {
    let (b, f) = (pre.rows, pre.cols);
    let fi = f as i64;
    match rule {
        DeviceRule::Threshold(theta) => {
            // v > θ ⇔ bits(v) > bits(θ) for non-negative floats.
            let cut = theta.max(0.0).to_bits();
            launch!(
                dev,
                threshold_plan,
                rows(b),
                [
                    &pre.data,
                    &b_enc.data,
                    &fi,
                    &cut,
                    &mut c.cut_b,
                    &mut c.quota_b,
                    &mut c.count_b
                ]
            )?;
        }
        DeviceRule::TopK { k, among } => {
            let (has_mask, k) = (among.is_some() as i32, k.min(f) as u32);
            launch!(
                dev,
                topk_plan,
                rows(b),
                [
                    &pre.data,
                    &b_enc.data,
                    among.unwrap_or(&c.count_f),
                    &has_mask,
                    &fi,
                    &k,
                    &mut c.cut_b,
                    &mut c.quota_b,
                    &mut c.count_b
                ]
            )?;
        }
        DeviceRule::BatchTopK(k) => {
            let total = (k as u64 * b as u64).min((b * f) as u64);
            if total > u32::MAX as u64 {
                return Err(Error::OutOfRange {
                    what: "k × batch size on a GPU".into(),
                    value: total as f64,
                    range: format!("[1, {}]", u32::MAX),
                });
            }
            dev.write(&[0, 0, total as u32, 0], batch_state)?;
            let bi = b as i64;
            for shift in [24i32, 16, 8, 0] {
                launch!(
                    dev,
                    batch_hist,
                    rows(b.min(1024)),
                    [
                        &pre.data,
                        &b_enc.data,
                        &bi,
                        &fi,
                        &shift,
                        &*batch_state,
                        &mut *hist
                    ]
                )?;
                launch!(
                    dev,
                    batch_pick,
                    rows(1),
                    [&mut *hist, &shift, &mut *batch_state]
                )?;
            }
            launch!(
                dev,
                batch_row_counts,
                rows(b),
                [
                    &pre.data,
                    &b_enc.data,
                    &fi,
                    &*batch_state,
                    &mut *gt_b,
                    &mut *eq_b
                ]
            )?;
            launch!(
                dev,
                batch_quota,
                single_block(),
                [
                    &*gt_b,
                    &*eq_b,
                    &bi,
                    &*batch_state,
                    &mut c.cut_b,
                    &mut c.quota_b,
                    &mut c.count_b
                ]
            )?;
        }
    }
    let among = match rule {
        DeviceRule::TopK { among, .. } => among,
        _ => None,
    };
    c.compact(dev, pre, b_enc, among)
}

/// The encoder's buffers for batches of `b` rows.
struct EncodeBuffers {
    b: usize,
    x_bd: DeviceMatrix,
    xc_bd: DeviceMatrix,
    pre_bf: DeviceMatrix,
    gt_b: CudaSlice<u32>,
    eq_b: CudaSlice<u32>,
    codes: CodeBuffers,
}

/// Inference on the GPU: an SAE's encoder (the GEMM and the selection `Sae::encode` applies)
/// with the parameters uploaded once, for many batches.
pub(crate) struct DeviceEncoder {
    dev: CudaDevice,
    w_enc_fd: DeviceMatrix,
    b_enc_f: DeviceMatrix,
    b_dec_d: CudaSlice<f32>,
    /// BatchTopK's θ, which replaces the training rule outside training (as on the CPU).
    theta: Option<f32>,
    selection: Selection,
    batch_state: CudaSlice<u32>,
    hist: CudaSlice<u32>,
    batch: Option<EncodeBuffers>,
    upload: Uploader,
}

impl DeviceEncoder {
    /// Uploads an SAE's encoder to `gpu`: W_enc, b_enc and b_dec, its training `selection`,
    /// and BatchTopK's θ, which replaces that selection outside training (as on the CPU).
    pub(crate) fn new(
        gpu: Gpu,
        w_enc_fd: ArrayView2<'_, f32>,
        b_enc_f: ArrayView1<'_, f32>,
        b_dec_d: ArrayView1<'_, f32>,
        selection: Selection,
        theta: Option<f32>,
    ) -> Result<Self> {
        let dev = CudaDevice::open(gpu)?;
        let theta = match selection {
            Selection::BatchTopK(_) => theta,
            _ => None,
        };
        Ok(DeviceEncoder {
            w_enc_fd: dev.upload(w_enc_fd)?,
            b_enc_f: dev.upload(b_enc_f.insert_axis(ndarray::Axis(0)))?,
            b_dec_d: dev.upload_vec(b_dec_d)?,
            theta,
            selection,
            batch_state: dev.alloc(4)?,
            hist: dev.alloc(256)?,
            batch: None,
            upload: dev.uploader()?,
            dev,
        })
    }

    /// The codes of a checked batch `x_bd`.
    pub(crate) fn encode(&mut self, x_bd: ArrayView2<'_, f32>) -> Result<Codes> {
        let (b, d, f) = (x_bd.nrows(), self.w_enc_fd.cols, self.w_enc_fd.rows);
        if b > MAX_ROWS {
            return Err(Error::OutOfRange {
                what: "batch size on a GPU".into(),
                value: b as f64,
                range: format!("[1, {MAX_ROWS}]"),
            });
        }
        if self.batch.as_ref().map(|t| t.b) != Some(b) {
            self.batch = None;
            let dev = &self.dev;
            self.batch = Some(EncodeBuffers {
                b,
                x_bd: dev.zeros(b, d)?,
                xc_bd: dev.zeros(b, d)?,
                pre_bf: dev.zeros(b, f)?,
                gt_b: dev.alloc(b)?,
                eq_b: dev.alloc(b)?,
                codes: CodeBuffers::new(dev, b, f)?,
            });
        }
        let dev = &self.dev;
        let EncodeBuffers {
            x_bd: x,
            xc_bd: xc,
            pre_bf: pre,
            gt_b,
            eq_b,
            codes,
            ..
        } = self.batch.as_mut().expect("allocated above");
        let xs = x_bd.as_standard_layout();
        dev.upload_encode(
            &mut self.upload,
            xs.as_slice().expect("standard layout"),
            &self.b_dec_d,
            &self.w_enc_fd,
            x,
            xc,
            pre,
        )?;
        let rule = match self.theta {
            Some(theta) => DeviceRule::Threshold(theta),
            None => DeviceRule::training(self.selection),
        };
        select_codes(
            dev,
            rule,
            pre,
            &self.b_enc_f,
            &mut self.batch_state,
            &mut self.hist,
            gt_b,
            eq_b,
            codes,
        )?;
        codes.download(dev)
    }
}
