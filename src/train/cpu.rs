//! The step's phases on the CPU ([`CpuStep`]): its buffers, the dense-ReLU switch, the
//! backward pass with the update's row preparation fused in, and, across processes, the
//! gathering of batch rows and updated latents that lets each process step only its own.

use std::sync::Arc;

use ndarray::{Array1, Array2, Axis, Zip};

use super::backward::{self, Batch};
use super::loss::{aux_sq_sum, column_sums_by, residual_sum, row_sq_sum, total_variance_times_n};
use super::phases::{BackwardArgs, Captured, Firing, LossSums, Phases, State, Step};
use super::shard::{Gathered, Shard};
use crate::arch::{DecoderConstraint, Selection};
use crate::backend::bf16::Bf16Encoder;
use crate::backend::{sparse, Backend};
use crate::dist::Collective;
use crate::error::Result;
use crate::optim::{sq, Grads, ParamTensors};
use crate::sae::{resize, Sae};
use crate::select::{select_into, Codes, Selector};

/// The CPU's step: the dense GEMMs' backend, the gradients, the step-sized buffers and what
/// one phase leaves for the next.
pub(crate) struct CpuStep {
    gemm: Arc<dyn Backend>,
    /// `--precision bf16`: the encoder GEMM's working set (W_enc's bf16 copy, which the
    /// update keeps current, and the packed batch).
    bf16: Option<Bf16Encoder>,
    /// ReLU: code density above which the decoder and backward use dense GEMMs.
    dense_threshold: f32,
    grads: Grads,
    buf: Buffers,
    /// This step: whether it runs on dense codes, whether AuxK contributes, the loss sums.
    dense: bool,
    aux_active: bool,
    sums: LossSums,
    /// This step's backward: its arguments, whether the update's row preparation ran inside
    /// it, whether it gathered the batch (each process then holds its own latents' gradients),
    /// and the raw gradients when captured.
    args: Option<BackwardArgs>,
    fused: bool,
    gathered_batch: bool,
    raw_grads: Option<ParamTensors>,
    /// Across processes: each updates only its own latents' moments, so the others' rows of
    /// the state's Adam moments are stale until [`Phases::read_back`] gathers them.
    moments_partial: bool,
}

/// Step-sized buffers, reused across steps (reallocated only when the batch size changes).
#[derive(Default)]
struct Buffers {
    xc_bd: Array2<f32>,
    /// The encoder GEMM's output xc·W_encᵀ, B×F (readers add b_enc); on the dense ReLU path it
    /// is turned into the codes ReLU(pre) in place.
    pre_bf: Array2<f32>,
    codes: Codes,
    aux_codes: Codes,
    /// JumpReLU: the unselected entries within the thresholds' kernel.
    near_codes: Codes,
    selector: Selector,
    /// Rows 0..G·B: ∂L/∂x̂, a block per prefix (see `backward::Batch`); the next B rows:
    /// ∂L/∂ê (AuxK's reconstruction of the residual).
    upstream_bd: Array2<f32>,
    x_hat_bd: Array2<f32>,
    /// Matryoshka: each prefix's reconstruction, one B×D block per prefix.
    prefix_hat_bd: Array2<f32>,
    aux_hat_bd: Array2<f32>,
    scratch: backward::Scratch,
    /// Every process's rows, for the backward pass of a distributed step.
    gathered: Gathered,
    /// Dense ReLU path only: ∂L/∂pre, B×F.
    g_pre_bf: Array2<f32>,
    fired_f: Vec<u64>,
    dead_f: Vec<u32>,
}

impl CpuStep {
    /// A CPU step for `sae`, running its dense GEMMs on `gemm` (and its encoder GEMM in bf16
    /// when `sae` is set to, [`crate::Sae::set_precision`]).
    pub fn new(gemm: Arc<dyn Backend>, dense_threshold: f32, sae: &Sae) -> Self {
        let config = &sae.config;
        CpuStep {
            gemm,
            bf16: sae.bf16.map(Bf16Encoder::new),
            dense_threshold,
            grads: Grads::zeros_for(config),
            buf: Buffers::default(),
            dense: false,
            aux_active: false,
            sums: LossSums::default(),
            args: None,
            fused: false,
            gathered_batch: false,
            raw_grads: None,
            moments_partial: false,
        }
    }

    /// See [`super::Trainer::set_dense_threshold`].
    pub fn set_dense_threshold(&mut self, density: f32) {
        self.dense_threshold = density;
    }

    fn args(&self) -> BackwardArgs {
        self.args.expect("grad_norm and captured follow backward")
    }
}

impl Phases for CpuStep {
    fn device_name(&self) -> String {
        "cpu".to_string()
    }

    fn queues(&self) -> bool {
        false
    }

    fn wait(&self) -> Result<()> {
        Ok(())
    }

    fn read_back(&mut self, state: &mut State, collective: &dyn Collective) -> Result<()> {
        if self.moments_partial {
            let shard = Shard::for_latents(collective, state.sae.config.dict_size);
            for m in [&mut state.adam.m, &mut state.adam.v] {
                shard.gather_latents(
                    collective,
                    &mut m.w_enc_fd,
                    &mut m.w_dec_fd,
                    &mut m.b_enc_f,
                    &mut m.threshold_f,
                );
            }
            self.moments_partial = false;
        }
        Ok(())
    }

    fn begin(&mut self, _rows: usize) -> Result<()> {
        Ok(())
    }

    fn set_b_dec(&mut self, state: &mut State, b_dec_d: Array1<f32>) -> Result<()> {
        state.sae.b_dec_d = b_dec_d;
        Ok(())
    }

    fn encode(&mut self, state: &State, step: &Step<'_>) -> Result<()> {
        state.sae.pre_activations_into(
            &*self.gemm,
            self.bf16.as_mut(),
            step.x_bd,
            &mut self.buf.xc_bd,
            &mut self.buf.pre_bf,
        );
        Ok(())
    }

    fn select(&mut self, state: &State, step: &Step<'_>, selection: Selection) -> Result<()> {
        // Every process takes the same path, chosen on the global batch's density.
        self.dense = selection == Selection::Relu && {
            let pre = state.sae.pre_acts(&self.buf.pre_bf);
            let mut counts = [
                pre.positive_count() as u64,
                (step.x_bd.nrows() * pre.n_latents()) as u64,
            ];
            step.world.all_reduce_sum_u64(&mut counts);
            counts[0] as f32 / counts[1].max(1) as f32 > self.dense_threshold
        };
        let pre = state.sae.pre_acts(&self.buf.pre_bf);
        let (selector, codes) = (&mut self.buf.selector, &mut self.buf.codes);
        if self.dense {
            // The dense path multiplies the codes matrix itself: make it ReLU(pre).
            let b_enc = &state.sae.b_enc_f;
            Zip::from(self.buf.pre_bf.rows_mut()).par_for_each(|mut row| {
                Zip::from(&mut row)
                    .and(b_enc)
                    .for_each(|v, &b| *v = (*v + b).max(0.0))
            });
        } else if let (true, Selection::TopK(k)) = (step.sharded(), selection) {
            selector.topk_sharded(pre, k, step.offset, step.latent, codes);
        } else if let (true, Selection::BatchTopK(k)) = (step.sharded(), selection) {
            let (k_total, shards) = (k * step.shard.n_global(), step.latent.world_size());
            selector.batch_topk_sharded(pre, k_total, step.world, shards, codes);
        } else {
            // ReLU and JumpReLU select within each latent: sharded or not, alike.
            let threshold_f = state.sae.threshold_f.as_slice().expect("contiguous");
            select_into(
                selector,
                selection,
                pre,
                threshold_f,
                step.collective,
                codes,
            );
        }
        Ok(())
    }

    fn mark_fired(
        &mut self,
        state: &mut State,
        step: &Step<'_>,
        dead_tokens: u64,
        want_min_code: bool,
    ) -> Result<Firing> {
        let fired_f = &mut self.buf.fired_f;
        fired_f.clear();
        fired_f.resize(state.sae.config.dict_size, 0);
        if self.dense {
            let counts = column_sums_by(self.buf.pre_bf.view(), |v| (v > 0.0) as u8 as f32);
            for (fired, c) in fired_f.iter_mut().zip(counts) {
                *fired = c as u64;
            }
        } else {
            for &j in &self.buf.codes.indices {
                fired_f[j as usize] += 1;
            }
        }
        step.collective.all_reduce_sum_u64(fired_f);
        let n_global = step.shard.n_global() as u64;
        for (since, &fired) in state.tokens_since_fired_f.iter_mut().zip(fired_f.iter()) {
            *since = if fired > 0 {
                0
            } else {
                // Saturating: a counter only needs to say "more than dead_tokens".
                since.saturating_add(n_global)
            };
        }
        self.buf.dead_f.clear();
        self.buf.dead_f.extend(
            state
                .tokens_since_fired_f
                .iter()
                .enumerate()
                .filter(|(_, &t)| t >= dead_tokens)
                .map(|(j, _)| j as u32),
        );
        let mut min = [f32::INFINITY];
        if want_min_code {
            min[0] = self.buf.codes.values.iter().copied().fold(min[0], f32::min);
            step.world.all_reduce_min_f32(&mut min);
        }
        // The counters are per latent: a sharded step adds up its shards'.
        let mut counts = [fired_f.iter().sum(), self.buf.dead_f.len() as u64];
        step.latent.all_reduce_sum_u64(&mut counts);
        Ok(Firing {
            nnz: counts[0],
            n_dead: counts[1] as usize,
            min_code: min[0],
        })
    }

    fn decode(&mut self, state: &State, step: &Step<'_>) -> Result<()> {
        let sae = &state.sae;
        let (x_bd, n_local, d) = (step.x_bd, step.x_bd.nrows(), sae.config.d_model);
        let blocks = step.prefixes.len();
        resize(&mut self.buf.upstream_bd, ((blocks + 1) * n_local, d));
        resize(&mut self.buf.x_hat_bd, (n_local, d));
        if blocks > 1 {
            return self.decode_prefixes(state, step);
        }
        // Sharded, each shard decodes its latents' part of x̂, and the first adds b_dec.
        let with_bias = step.latent.rank() == 0;
        if self.dense {
            match with_bias {
                true => self.buf.x_hat_bd.assign(&sae.b_dec_d),
                false => self.buf.x_hat_bd.fill(0.0),
            }
            self.gemm.gemm(
                1.0,
                self.buf.pre_bf.view(),
                sae.w_dec_fd.view(),
                1.0,
                self.buf.x_hat_bd.view_mut(),
            );
        } else {
            sparse::decode_into(
                self.buf.codes.view(),
                sae.w_dec_fd.view(),
                with_bias.then(|| sae.b_dec_d.view()),
                self.buf.x_hat_bd.view_mut(),
            );
        }
        sum_over(step.latent, &mut self.buf.x_hat_bd);
        let scale = -2.0 / step.shard.n_global() as f32;
        let up_main = self.buf.upstream_bd.slice_mut(ndarray::s![..n_local, ..]);
        Zip::from(up_main)
            .and(&x_bd)
            .and(&self.buf.x_hat_bd)
            .par_for_each(|u, &x, &xh| *u = scale * (x - xh));
        // Residuals e = x − x̂ are −u·B/2; the batch sums use e directly.
        let mut sq_error = [row_sq_sum(x_bd, self.buf.x_hat_bd.view(), None)];
        let variance = total_variance_times_n(x_bd, step.collective);
        step.collective.all_reduce_sum_f64(&mut sq_error);
        self.sums = LossSums {
            sq_error: sq_error[0],
            reconstruction: sq_error[0],
            variance,
            l1: 0.0,
        };
        Ok(())
    }

    fn aux_residual(&mut self, state: &State, step: &Step<'_>, k_aux: usize) -> Result<[f64; 2]> {
        let sae = &state.sae;
        let x_bd = step.x_bd;
        self.buf.selector.topk_among_sharded(
            sae.pre_acts(&self.buf.pre_bf),
            &self.buf.dead_f,
            k_aux,
            step.offset,
            step.latent,
            &mut self.buf.aux_codes,
        );
        resize(&mut self.buf.aux_hat_bd, (x_bd.nrows(), sae.config.d_model));
        sparse::decode_into(
            self.buf.aux_codes.view(),
            sae.w_dec_fd.view(),
            None,
            self.buf.aux_hat_bd.view_mut(),
        );
        sum_over(step.latent, &mut self.buf.aux_hat_bd);
        // e − ê, and e − mean_b(e), with e = x − x̂ held constant.
        let mut e_sum = residual_sum(x_bd, &self.buf.x_hat_bd);
        step.collective.all_reduce_sum_f64(&mut e_sum);
        let n_global = step.shard.n_global() as f64;
        let e_mean: Vec<f64> = e_sum.iter().map(|s| s / n_global).collect();
        let mut parts = [
            aux_sq_sum(x_bd, &self.buf.x_hat_bd, &self.buf.aux_hat_bd),
            row_sq_sum(x_bd, self.buf.x_hat_bd.view(), Some(&e_mean)),
        ];
        step.collective.all_reduce_sum_f64(&mut parts);
        Ok(parts)
    }

    fn set_aux_upstream(&mut self, step: &Step<'_>, g: Option<f32>) -> Result<()> {
        let n_local = step.x_bd.nrows();
        let main_rows = step.prefixes.len() * n_local;
        let up_aux = self.buf.upstream_bd.slice_mut(ndarray::s![main_rows.., ..]);
        self.aux_active = g.is_some();
        match g {
            Some(g) => Zip::from(up_aux)
                .and(&step.x_bd)
                .and(&self.buf.x_hat_bd)
                .and(&self.buf.aux_hat_bd)
                .par_for_each(|u, &x, &xh, &ah| *u = g * ((x - xh) - ah)),
            None => {
                let mut up_aux = up_aux;
                up_aux.fill(0.0);
                self.buf.aux_codes = Codes::empty(self.grads.active_f.len());
                self.buf.aux_codes.indptr.resize(n_local + 1, 0);
            }
        }
        Ok(())
    }

    fn backward(&mut self, state: &State, step: &Step<'_>, args: BackwardArgs) -> Result<()> {
        // Unless the raw gradients are wanted, the update's per-row work is done by the
        // backward pass itself. Across processes, the sparse path gathers every process's rows
        // and takes the whole batch's gradients of this process's latents (see `shard`); the
        // others sum the gradients of each process's rows.
        let (l1_coef, weight_by_decoder_norm) = args.l1.unwrap_or((0.0, false));
        // JumpReLU's thresholds and Matryoshka's upstream blocks are not gathered: their
        // distributed steps sum each process's gradients, preparing rows after the sum.
        let blocks = step.prefixes.len();
        // Sharded steps gather across groups too: each group holds its rows' codes on this
        // shard's latents, which is all this shard's backward pass reads.
        let sums_across = step.distributed() && (args.jump.is_some() || blocks > 1);
        let fuse = !(self.dense || args.capture || sums_across);
        let gather = fuse && step.distributed();
        if let Some(jump) = args.jump {
            self.buf.selector.below_threshold(
                state.sae.pre_acts(&self.buf.pre_bf),
                state.sae.threshold_f.as_slice().expect("contiguous"),
                jump.bandwidth,
                &mut self.buf.near_codes,
            );
        }
        let ctx = backward::Context {
            fused_prep: fuse.then_some(args.prep),
            sae: &state.sae,
            n_global: step.shard.n_global(),
            l1_coef,
            weight_by_decoder_norm,
            jump: args.jump,
            prefixes: step.prefixes,
            latents: if gather {
                step.shard.latents()
            } else {
                step.all_latents()
            },
            collective: step.collective,
            latent: step.latent,
        };
        let local = Batch::of(
            self.buf.xc_bd.view(),
            self.buf.upstream_bd.view(),
            blocks,
            &self.buf.codes,
            &self.buf.aux_codes,
            &self.buf.near_codes,
        );
        let l1 = if self.dense {
            backward::dense_relu(
                &ctx,
                &*self.gemm,
                local,
                self.buf.pre_bf.view(),
                &mut self.buf.g_pre_bf,
                &mut self.grads,
            )
        } else if gather {
            let g = &mut self.buf.gathered;
            g.gather(
                step.collective,
                step.shard,
                local.xc_bd,
                self.buf.upstream_bd.view(),
                self.aux_active,
                &self.buf.codes,
                &self.buf.aux_codes,
            );
            let batch = Batch::of(
                g.xc_bd.view(),
                g.upstream_bd.view(),
                1,
                &g.codes,
                &g.aux_codes,
                &self.buf.near_codes,
            );
            backward::sparse(&ctx, batch, &mut self.buf.scratch, &mut self.grads)
        } else {
            backward::sparse(&ctx, local, &mut self.buf.scratch, &mut self.grads)
        };
        let mut l1_sum = [l1];
        if args.l1.is_some() {
            step.latent.all_reduce_sum_f64(&mut l1_sum);
        }
        if args.l1.is_some() && !gather {
            step.collective.all_reduce_sum_f64(&mut l1_sum);
        }
        self.sums.l1 = l1_sum[0];
        if step.distributed() && !gather {
            all_reduce_grads(&mut self.grads, step.collective);
        }
        if let Some(jump) = args.jump {
            // After the sum across processes: a term of the whole batch, counted once.
            backward::threshold_grad_of_inactive(
                &state.sae,
                jump,
                &self.buf.fired_f,
                step.shard.n_global(),
                &mut self.grads,
            );
        }
        self.raw_grads = args.capture.then(|| self.grads.to_dense());
        (self.args, self.fused, self.gathered_batch) = (Some(args), fuse, gather);
        Ok(())
    }

    fn grad_norm(&mut self, state: &State, step: &Step<'_>) -> Result<f64> {
        let prep = self.args().prep;
        Ok(if self.gathered_batch {
            // Rows and b_enc entries are each held by one process of the world (its part of
            // its shard's latents); b_dec by all.
            let own = step.shard.latents();
            let rows = &self.buf.scratch.row_sq_f[own.clone()];
            let b_enc = &self.grads.tensors.b_enc_f.as_slice().expect("contiguous")[own];
            let mut parts = [rows.iter().sum::<f64>() + sq(b_enc)];
            if prep.want_norm {
                step.world.all_reduce_sum_f64(&mut parts);
            }
            (parts[0] + sq(self.grads.tensors.b_dec_d.as_slice().expect("contiguous"))).sqrt()
        } else if step.sharded() {
            // Each shard holds its latents' rows and b_enc entries; b_dec is the group's.
            let row_sq_f = match self.fused {
                true => std::mem::take(&mut self.buf.scratch.row_sq_f),
                false => self.grads.project_rows(&state.sae.w_dec_fd, prep),
            };
            let [mut latents, b_dec] = self.grads.norm_sq_parts(&row_sq_f);
            self.buf.scratch.row_sq_f = row_sq_f;
            if prep.want_norm {
                let mut parts = [latents];
                step.latent.all_reduce_sum_f64(&mut parts);
                latents = parts[0];
            }
            (latents + b_dec).sqrt()
        } else if self.fused {
            self.grads.global_norm(&self.buf.scratch.row_sq_f)
        } else {
            self.grads.project_and_norm(&state.sae.w_dec_fd, prep)
        })
    }

    fn captured(&mut self, state: &State, grad_scale: f32) -> Result<Captured> {
        let sae = &state.sae;
        let mut update_grads = self.grads.to_dense();
        update_grads.scale(grad_scale);
        Ok(Captured {
            params: ParamTensors {
                w_enc_fd: sae.w_enc_fd.clone(),
                b_enc_f: sae.b_enc_f.clone(),
                w_dec_fd: sae.w_dec_fd.clone(),
                b_dec_d: sae.b_dec_d.clone(),
                threshold_f: sae.threshold_f.clone(),
            },
            codes_bf: if self.dense {
                self.buf.pre_bf.clone()
            } else {
                self.buf.codes.to_dense()
            },
            aux_codes_bf: self.buf.aux_codes.to_dense(),
            x_hat_bd: self.buf.x_hat_bd.clone(),
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
        step: &Step<'_>,
        lr: f64,
        grad_scale: f32,
        decoder: DecoderConstraint,
    ) -> Result<()> {
        // Across processes each steps its own latents, then gathers the others'.
        let sae = &mut state.sae;
        let own = step.shard.latents();
        let mut params = sae.params_mut();
        params.w_enc_bf16 = self.bf16.as_mut().and_then(Bf16Encoder::w_enc_mut);
        state
            .adam
            .step_latents(params, &self.grads, lr, grad_scale, decoder, own.clone());
        if step.distributed() {
            step.shard.gather_latents(
                step.collective,
                &mut sae.w_enc_fd,
                &mut sae.w_dec_fd,
                &mut sae.b_enc_f,
                &mut sae.threshold_f,
            );
            self.moments_partial = true;
            if let Some(bf16) = &mut self.bf16 {
                // The other processes' latents arrived in f32: rounded here.
                let w = sae.w_enc_fd.view();
                bf16.refresh(w, 0..own.start);
                bf16.refresh(w, own.end..w.nrows());
            }
        }
        Ok(())
    }

    fn loss_sums(&mut self) -> Result<LossSums> {
        Ok(self.sums)
    }

    fn params_changed(&mut self) {
        if let Some(bf16) = &mut self.bf16 {
            bf16.invalidate();
        }
    }

    fn residual(&mut self, step: &Step<'_>) -> Result<Array2<f32>> {
        Ok(&step.x_bd - &self.buf.x_hat_bd)
    }
}

impl CpuStep {
    /// [`Phases::decode`] for Matryoshka's nested prefixes: every prefix's reconstruction (x̂
    /// is the last), the upstream blocks Σ_{i ≥ g} c_i·∂MSE_i/∂x̂_i, and the weighted sum.
    fn decode_prefixes(&mut self, state: &State, step: &Step<'_>) -> Result<()> {
        let sae = &state.sae;
        let (x_bd, n_local, d) = (step.x_bd, step.x_bd.nrows(), sae.config.d_model);
        let blocks = step.prefixes.len();
        let ends: Vec<usize> = step.prefixes.iter().map(|p| p.end).collect();
        resize(&mut self.buf.prefix_hat_bd, (blocks * n_local, d));
        // Sharded, as in `decode`: each shard's part of every prefix, b_dec from the first.
        let no_bias = Array1::zeros(if step.latent.rank() == 0 { 0 } else { d });
        let bias_d = match step.latent.rank() {
            0 => sae.b_dec_d.view(),
            _ => no_bias.view(),
        };
        sparse::decode_prefixes_into(
            &self.buf.codes,
            sae.w_dec_fd.view(),
            bias_d,
            &ends,
            self.buf.prefix_hat_bd.view_mut(),
        );
        sum_over(step.latent, &mut self.buf.prefix_hat_bd);
        let block = |g: usize| ndarray::s![g * n_local..(g + 1) * n_local, ..];
        self.buf
            .x_hat_bd
            .assign(&self.buf.prefix_hat_bd.slice(block(blocks - 1)));
        // From the last prefix down, each block adding its own term to the one above it.
        let scale = -2.0 / step.shard.n_global() as f32;
        let mut sums = vec![0.0f64; blocks];
        for (g, prefix) in step.prefixes.iter().enumerate().rev() {
            let (above, this) = self
                .buf
                .upstream_bd
                .view_mut()
                .split_at(Axis(0), (g + 1) * n_local);
            let mut up_g = above.slice_move(ndarray::s![g * n_local.., ..]);
            let hat_g = self.buf.prefix_hat_bd.slice(block(g));
            let c = scale * prefix.weight;
            if g + 1 < blocks {
                let next = this.slice_move(ndarray::s![..n_local, ..]);
                Zip::from(&mut up_g)
                    .and(&x_bd)
                    .and(&hat_g)
                    .and(&next)
                    .par_for_each(|u, &x, &xh, &n| *u = c * (x - xh) + n);
            } else {
                Zip::from(&mut up_g)
                    .and(&x_bd)
                    .and(&hat_g)
                    .par_for_each(|u, &x, &xh| *u = c * (x - xh));
            }
            sums[g] = row_sq_sum(x_bd, hat_g, None);
        }
        let variance = total_variance_times_n(x_bd, step.collective);
        step.collective.all_reduce_sum_f64(&mut sums);
        self.sums = LossSums {
            // The last prefix is the whole dictionary: x̂.
            sq_error: sums[blocks - 1],
            reconstruction: step
                .prefixes
                .iter()
                .zip(&sums)
                .map(|(p, s)| p.weight as f64 * s)
                .sum(),
            variance,
            l1: 0.0,
        };
        Ok(())
    }
}

/// `a_bd` summed over `latent`'s processes (a no-op in one process).
fn sum_over(latent: &dyn Collective, a_bd: &mut Array2<f32>) {
    if latent.world_size() > 1 {
        latent.all_reduce_sum_f32(a_bd.as_slice_mut().expect("standard layout"));
    }
}

/// Sums every process's gradients (inactive rows zeroed first, then all rows active).
fn all_reduce_grads(grads: &mut Grads, collective: &dyn Collective) {
    let dense = grads.to_dense();
    grads.tensors = dense;
    let t = &mut grads.tensors;
    for a in [&mut t.w_enc_fd, &mut t.w_dec_fd] {
        collective.all_reduce_sum_f32(a.as_slice_mut().expect("standard layout"));
    }
    for a in [&mut t.b_enc_f, &mut t.b_dec_d, &mut t.threshold_f] {
        if !a.is_empty() {
            collective.all_reduce_sum_f32(a.as_slice_mut().expect("standard layout"));
        }
    }
    grads.active_f.fill(true);
}
