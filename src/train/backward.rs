//! The analytic backward pass: from the upstream gradients (∂L/∂x̂ and AuxK's ∂L/∂ê) to the
//! gradients of W_enc, b_enc, W_dec, b_dec and JumpReLU's thresholds. The sparse path touches only active latents,
//! O(active codes · D); the dense path (ReLU with dense codes) uses three GEMMs. Either may
//! compute only some latents' rows: in a distributed step each process owns a part of the
//! dictionary and takes its rows' gradients over the whole gathered batch.

use std::ops::Range;

use ndarray::{s, Array1, Array2, ArrayView2, Axis, Zip};
use rayon::prelude::*;

use super::loss::column_sums_by;
use super::phases::JumpArgs;
use crate::arch::Prefix;
use crate::backend::simd::{dispatch, prefetch};
use crate::backend::sparse::{axpy, dot, ByLatent};
use crate::backend::Backend;
use crate::dist::Collective;
use crate::optim::{Grads, RowPrep};
use crate::sae::{resize, Sae};
use crate::select::Codes;

/// Code density above which a ReLU step switches to dense GEMMs. A GEMM runs near peak while
/// the sparse kernels are bound by memory traffic on W rows, so dense wins well before codes
/// are half full; 5% is a conservative crossover for D in the hundreds to thousands.
pub fn dense_threshold_default() -> f32 {
    0.05
}

/// Latents per parallel task when reducing over latents.
const LATENTS_PER_CHUNK: usize = 256;

/// What the backward pass needs besides the workspace.
pub(super) struct Context<'a> {
    pub sae: &'a Sae,
    /// Rows in the global batch (the loss is a mean over them).
    pub n_global: usize,
    /// λ·s(t) for ReLU (0 otherwise).
    pub l1_coef: f32,
    /// Whether the L1 term weighs each code by its decoder row's norm.
    pub weight_by_decoder_norm: bool,
    /// JumpReLU's thresholds' kernel and L0 slope (`None` for the other architectures).
    pub jump: Option<JumpArgs>,
    /// The reconstructions the loss weighs (one but for Matryoshka): latent j's upstream is
    /// the block of the first prefix that holds it.
    pub prefixes: &'a [Prefix],
    /// The update's per-row preparation, done here while the rows are in cache; `None` when
    /// the trainer does it in a separate pass.
    pub fused_prep: Option<RowPrep>,
    /// The latents whose gradient rows to compute. When it is a strict part of the dictionary,
    /// the other processes of `collective` compute the rest, and b_dec's gradient term through
    /// the encoder is summed across them.
    pub latents: Range<usize>,
    /// The processes sharing the step.
    pub collective: &'a dyn Collective,
    /// Latent sharding: the processes holding the same rows' other latents, whose terms of
    /// b_dec's gradient through the encoder are summed with this one's.
    pub latent: &'a dyn Collective,
}

/// The rows the sparse backward sums over: this process's, or in a distributed step every
/// process's, gathered in rank order.
pub(super) struct Batch<'a> {
    /// x − b_dec, B×D.
    pub xc_bd: ArrayView2<'a, f32>,
    /// ∂L/∂x̂, B×D; with nested prefixes, one B×D block per prefix g holding the upstream of
    /// the latents of group g, Σ_{i ≥ g} ∂L/∂x̂_i (block 0 is then ∂L/∂x̂ summed over every
    /// reconstruction, what b_dec receives).
    pub up_main_bd: ArrayView2<'a, f32>,
    /// ∂L/∂ê (AuxK), B×D.
    pub up_aux_bd: ArrayView2<'a, f32>,
    /// The codes, B rows.
    pub codes: &'a Codes,
    /// AuxK's codes, B rows (no entries when AuxK is off).
    pub aux_codes: &'a Codes,
    /// JumpReLU: the unselected entries within the thresholds' kernel, B rows (none
    /// otherwise).
    pub near_codes: &'a Codes,
}

impl<'a> Batch<'a> {
    /// The batch of `xc_bd`'s B rows, with `upstream_bd` holding ∂L/∂x̂ in its first
    /// `blocks`·B rows (one block per prefix) and ∂L/∂ê in the next B.
    pub fn of(
        xc_bd: ArrayView2<'a, f32>,
        upstream_bd: ArrayView2<'a, f32>,
        blocks: usize,
        codes: &'a Codes,
        aux_codes: &'a Codes,
        near_codes: &'a Codes,
    ) -> Self {
        let (up_main_bd, up_aux_bd) = upstream_bd.split_at(Axis(0), blocks * xc_bd.nrows());
        Batch {
            xc_bd,
            up_main_bd,
            up_aux_bd,
            codes,
            aux_codes,
            near_codes,
        }
    }
}

/// Buffers the sparse backward fills: the codes transposed to latent order, and each row's
/// squared norm when the update's preparation is fused.
#[derive(Default)]
pub(super) struct Scratch {
    pub by_latent: ByLatent,
    pub aux_by_latent: ByLatent,
    pub near_by_latent: ByLatent,
    /// ‖∂W_dec\[j\]‖² + ‖∂W_enc\[j\]‖² per latent (rows of `Context::latents` only).
    pub row_sq_f: Vec<f64>,
}

impl Context<'_> {
    /// n_j for the L1 penalty: ‖W_dec\[j\]‖ or 1.
    fn l1_weights(&self) -> Vec<f32> {
        let w = &self.sae.w_dec_fd;
        if self.weight_by_decoder_norm {
            w.axis_iter(Axis(0))
                .into_par_iter()
                .map(|row| {
                    let row = row.as_slice().unwrap();
                    dot(row, row).sqrt()
                })
                .collect()
        } else {
            vec![1.0; w.nrows()]
        }
    }

    /// Adds the L1 penalty's decoder-norm gradient, (λs/B)·(Σ_b f_bj)·w_j/‖w_j‖, to row j.
    fn add_l1_decoder_grad(&self, j: usize, code_sum: f32, norm: f32, grad_row: &mut [f32]) {
        if self.weight_by_decoder_norm && self.l1_coef != 0.0 && code_sum != 0.0 {
            let w = self.sae.w_dec_fd.row(j);
            let c = self.l1_coef / self.n_global as f32 * code_sum / norm;
            axpy(c, w.as_slice().unwrap(), grad_row);
        }
    }
}

/// Sparse backward over `batch`, for the rows of `ctx.latents`. Returns the batch's L1 sum
/// Σ f_bj·n_j (0 unless ReLU).
pub(super) fn sparse(
    ctx: &Context<'_>,
    batch: Batch<'_>,
    scratch: &mut Scratch,
    grads: &mut Grads,
) -> f64 {
    let sae = ctx.sae;
    let n_j = ctx.l1_weights();
    let Batch {
        xc_bd,
        up_main_bd: up_main,
        up_aux_bd: up_aux,
        codes,
        aux_codes,
        near_codes,
    } = batch;

    scratch.by_latent.rebuild(codes);
    scratch.aux_by_latent.rebuild(aux_codes);

    // One task per latent j, writing only row j. Per entry (b, j) with code v:
    // g = ∂L/∂f_bj = u_b·W_dec[j] (+ the L1 term; f > 0 so it is also ∂L/∂pre),
    // ∂W_dec[j] += v·u_b, ∂W_enc[j] += g·(x_b − b_dec), ∂b_enc[j] += g.
    // Latent-major order reads W_dec[j] once, not once per entry.
    let t = &mut grads.tensors;
    let (by_latent, aux_by_latent) = (&scratch.by_latent, &scratch.aux_by_latent);
    let l1_per_row = ctx.l1_coef / ctx.n_global as f32;
    scratch.row_sq_f.clear();
    scratch.row_sq_f.resize(sae.config.dict_size, 0.0);
    let (lo, rows) = (ctx.latents.start, s![ctx.latents.clone(), ..]);
    let own = s![ctx.latents.clone()];
    let n_rows = xc_bd.nrows();
    Zip::indexed(t.w_dec_fd.slice_mut(rows).rows_mut())
        .and(t.w_enc_fd.slice_mut(rows).rows_mut())
        .and(t.b_enc_f.slice_mut(own))
        .and(&mut grads.active_f[ctx.latents.clone()])
        .and(&mut scratch.row_sq_f[ctx.latents.clone()])
        .par_for_each(|i, mut gd, mut ge, gb, active, row_sq| {
            let j = lo + i;
            let block = ctx.prefixes.partition_point(|p| p.end <= j);
            let up_main = up_main.slice(s![block * n_rows..(block + 1) * n_rows, ..]);
            let (main_e, main_b) = by_latent.latent(j);
            let (aux_e, aux_b) = aux_by_latent.latent(j);
            *active = !(main_e.is_empty() && aux_e.is_empty());
            *gb = 0.0;
            if !*active {
                return;
            }
            let w = sae.w_dec_fd.row(j);
            let w = w.as_slice().unwrap();
            let gd = gd.as_slice_mut().unwrap();
            let ge = ge.as_slice_mut().unwrap();
            gd.fill(0.0);
            ge.fill(0.0);
            let mut code_sum = 0.0f32;
            dispatch(|| {
                let mut entry = |v: f32, u: &[f32], b: u32, extra: f32| {
                    let g = dot(u, w) + extra;
                    axpy(v, u, gd);
                    axpy(g, xc_bd.row(b as usize).as_slice().unwrap(), ge);
                    *gb += g;
                };
                for (i, (&e, &b)) in main_e.iter().zip(main_b).enumerate() {
                    if let Some(&next) = main_b.get(i + 1) {
                        prefetch(up_main.row(next as usize).as_slice().unwrap());
                        prefetch(xc_bd.row(next as usize).as_slice().unwrap());
                    }
                    let v = codes.values[e as usize];
                    let u = up_main.row(b as usize);
                    entry(v, u.as_slice().unwrap(), b, l1_per_row * n_j[j]);
                    code_sum += v;
                }
                for (&e, &b) in aux_e.iter().zip(aux_b) {
                    let u = up_aux.row(b as usize);
                    entry(aux_codes.values[e as usize], u.as_slice().unwrap(), b, 0.0);
                }
            });
            ctx.add_l1_decoder_grad(j, code_sum, n_j[j], gd);
            if let Some(prep) = ctx.fused_prep {
                *row_sq = dispatch(|| prep.apply(gd, ge, w));
            }
        });

    // Block 0: every reconstruction's upstream, summed.
    let up_all = up_main.slice(s![..n_rows, ..]);
    if let Some(jump) = ctx.jump {
        scratch.near_by_latent.rebuild(near_codes);
        threshold_grads(ctx, jump, up_all, codes, scratch, grads);
    }
    bias_grads(ctx, up_all, grads);
    codes
        .values
        .iter()
        .zip(&codes.indices)
        .map(|(&v, &j)| v as f64 * n_j[j as usize] as f64)
        .sum()
}

/// Dense backward for a ReLU SAE whose codes are the whole of (ReLU'd) `pre_bf`, with ∂L/∂x̂
/// in `up_main_bd` and `g_pre_bf` a buffer for ∂L/∂pre. Returns the local L1 sum Σ f_bj·n_j.
pub(super) fn dense_relu(
    ctx: &Context<'_>,
    backend: &dyn Backend,
    batch: Batch<'_>,
    pre_bf: ArrayView2<'_, f32>,
    g_pre_bf: &mut Array2<f32>,
    grads: &mut Grads,
) -> f64 {
    let sae = ctx.sae;
    let n_j = ctx.l1_weights();
    let (xc_bd, up_main) = (batch.xc_bd, batch.up_main_bd);
    let t = &mut grads.tensors;

    // ∂L/∂pre = (u·W_decᵀ + λs·n_j/B)·[post > 0].
    resize(g_pre_bf, pre_bf.dim());
    backend.gemm(1.0, up_main, sae.w_dec_fd.t(), 0.0, g_pre_bf.view_mut());
    let per_row = ctx.l1_coef / ctx.n_global as f32;
    Zip::from(g_pre_bf.rows_mut())
        .and(pre_bf.rows())
        .par_for_each(|mut g, post| {
            Zip::from(&mut g)
                .and(&post)
                .and(&n_j)
                .for_each(|g, &p, &n| *g = if p > 0.0 { *g + per_row * n } else { 0.0 })
        });

    backend.gemm(1.0, pre_bf.t(), up_main, 0.0, t.w_dec_fd.view_mut());
    let code_sums = column_sums_by(pre_bf, |v| v);
    Zip::indexed(t.w_dec_fd.rows_mut()).par_for_each(|j, mut gd| {
        ctx.add_l1_decoder_grad(j, code_sums[j], n_j[j], gd.as_slice_mut().unwrap());
    });
    backend.gemm(1.0, g_pre_bf.t(), xc_bd, 0.0, t.w_enc_fd.view_mut());
    t.b_enc_f = Array1::from(column_sums_by(g_pre_bf.view(), |g| g));
    grads.active_f.fill(true);

    bias_grads(ctx, up_main, grads);
    code_sums
        .iter()
        .zip(&n_j)
        .map(|(&s, &n)| s as f64 * n as f64)
        .sum()
}

/// JumpReLU's ∂L/∂θ_j over the batch's entries in the rectangle kernel |pre − θ_j| < ε/2
/// (dictionary_learning's `JumpReLUFunction` and `StepFunction` backward): the reconstruction's
/// −(θ_j/ε)·∂L/∂f_bj on entries on either side of θ_j, and the L0 penalty's −(1/ε)·∂P/∂L0/B on
/// the selected ones (the reference's step function reads the code f, which is pre there). The
/// unselected entries' L0 term, where f = 0, is [`threshold_grad_of_inactive`]'s.
fn threshold_grads(
    ctx: &Context<'_>,
    jump: JumpArgs,
    up_main: ArrayView2<'_, f32>,
    codes: &Codes,
    scratch: &Scratch,
    grads: &mut Grads,
) {
    let sae = ctx.sae;
    let eps = jump.bandwidth;
    let l0_upstream = jump.d_penalty_d_l0 / ctx.n_global as f32;
    let own = s![ctx.latents.clone()];
    let (by_latent, near_by_latent) = (&scratch.by_latent, &scratch.near_by_latent);
    Zip::indexed(grads.tensors.threshold_f.slice_mut(own)).par_for_each(|i, g_theta| {
        let j = ctx.latents.start + i;
        let theta = sae.threshold_f[j];
        let w = sae.w_dec_fd.row(j);
        let w = w.as_slice().unwrap();
        let d_f = |b: u32| dot(up_main.row(b as usize).as_slice().unwrap(), w);
        let mut g = 0.0f32;
        let (main_e, main_b) = by_latent.latent(j);
        for (&e, &b) in main_e.iter().zip(main_b) {
            let x = (codes.values[e as usize] - theta) / eps;
            if x > -0.5 && x < 0.5 {
                g += -(theta / eps) * d_f(b) + -(1.0 / eps) * l0_upstream;
            }
        }
        let (_, near_b) = near_by_latent.latent(j);
        for &b in near_b {
            g += -(theta / eps) * d_f(b);
        }
        *g_theta = g;
    });
}

/// The L0 penalty's ∂/∂θ_j from the entries JumpReLU does not select, where f = 0: each is in
/// the kernel when |θ_j| < ε/2, and there are B − (latent j's active codes) of them. Added
/// once, after the gradients of every process's rows are summed; `fired_f` counts the global
/// batch's active codes per latent.
pub(super) fn threshold_grad_of_inactive(
    sae: &Sae,
    jump: JumpArgs,
    fired_f: &[u64],
    n_global: usize,
    grads: &mut Grads,
) {
    let eps = jump.bandwidth;
    let l0_upstream = jump.d_penalty_d_l0 / n_global as f32;
    for ((g, &theta), &fired) in grads
        .tensors
        .threshold_f
        .iter_mut()
        .zip(&sae.threshold_f)
        .zip(fired_f)
    {
        let x = (0.0 - theta) / eps;
        if x > -0.5 && x < 0.5 {
            *g += (n_global as u64 - fired) as f32 * (-(1.0 / eps) * l0_upstream);
        }
    }
}

/// ∂L/∂b_dec = Σ_b ∂L/∂x̂_b − Σ_j ∂L/∂b_enc\[j\]·W_enc\[j\] (b_dec enters x̂ directly and, unless
/// the architecture encodes x itself, the encoder through x − b_dec). Uses
/// `grads.tensors.b_enc_f` and `active_f`, already filled.
fn bias_grads(ctx: &Context<'_>, up_main: ArrayView2<'_, f32>, grads: &mut Grads) {
    if !ctx.sae.config.arch.centres_input() {
        grads.tensors.b_dec_d = Array1::from(column_sums_by(up_main, |u| u));
        return;
    }
    let w_enc = &ctx.sae.w_enc_fd;
    let (b_enc, active) = (&grads.tensors.b_enc_f, &grads.active_f);
    let (lo, hi) = (ctx.latents.start, ctx.latents.end);
    let through_encoder: Vec<Vec<f32>> = (0..(hi - lo).div_ceil(LATENTS_PER_CHUNK))
        .into_par_iter()
        .map(|c| {
            let mut acc = vec![0.0f32; w_enc.ncols()];
            for j in lo + c * LATENTS_PER_CHUNK..(lo + (c + 1) * LATENTS_PER_CHUNK).min(hi) {
                if active[j] && b_enc[j] != 0.0 {
                    axpy(b_enc[j], w_enc.row(j).as_slice().unwrap(), &mut acc);
                }
            }
            acc
        })
        .collect();
    let mut g = Array1::from(column_sums_by(up_main, |u| u));
    let (partial, sharded) = (hi - lo < w_enc.nrows(), ctx.latent.world_size() > 1);
    if partial || sharded {
        // The other processes hold the other latents' terms.
        let mut through = vec![0.0f32; w_enc.ncols()];
        for part in through_encoder {
            through.iter_mut().zip(part).for_each(|(t, p)| *t += p);
        }
        if partial {
            ctx.collective.all_reduce_sum_f32(&mut through);
        }
        if sharded {
            ctx.latent.all_reduce_sum_f32(&mut through);
        }
        g.iter_mut().zip(through).for_each(|(g, p)| *g -= p);
    } else {
        for part in through_encoder {
            g.iter_mut().zip(part).for_each(|(g, p)| *g -= p);
        }
    }
    grads.tensors.b_dec_d = g;
}
