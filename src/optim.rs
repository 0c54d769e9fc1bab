//! The update: learning-rate and sparsity schedules, the decoder-gradient projection, global
//! gradient-norm clipping, and Adam (exactly `torch.optim.Adam`) fused with the decoder
//! renormalisation into one parallel pass over the parameters.

use std::ops::Range;

use ndarray::{s, Array1, Array2, ArrayView1, ArrayViewMut1, ArrayViewMut2, Zip};

use crate::arch::DecoderConstraint;
use crate::backend::bf16::round_row_into;
use crate::backend::simd::dispatch;
use crate::backend::sparse::dot;
use crate::config::SaeConfig;

/// The reference's learning-rate factor at 0-based `step` (dictionary_learning
/// `get_lr_schedule`): linear warm-up from 0, constant, then linear decay to 0 at
/// `total_steps` from `decay_start`.
pub fn lr_factor(step: u64, warmup_steps: u64, decay_start: Option<u64>, total_steps: u64) -> f64 {
    if step < warmup_steps {
        return step as f64 / warmup_steps as f64;
    }
    match decay_start {
        Some(start) if step >= start => {
            total_steps.saturating_sub(step) as f64 / (total_steps - start) as f64
        }
        _ => 1.0,
    }
}

/// The L1 coefficient's warm-up factor s(t) (dictionary_learning `get_sparsity_warmup_fn`).
pub fn sparsity_scale(step: u64, warmup_steps: u64) -> f32 {
    if warmup_steps == 0 {
        1.0
    } else {
        (step as f64 / warmup_steps as f64).min(1.0) as f32
    }
}

/// Arrays shaped like an SAE's parameters: used for gradients and Adam's moments.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamTensors {
    /// Shaped like W_enc, F×D.
    pub w_enc_fd: Array2<f32>,
    /// Shaped like b_enc, F.
    pub b_enc_f: Array1<f32>,
    /// Shaped like W_dec, F×D.
    pub w_dec_fd: Array2<f32>,
    /// Shaped like b_dec, D.
    pub b_dec_d: Array1<f32>,
    /// Shaped like JumpReLU's thresholds θ_j: F values, or none for the other architectures.
    pub threshold_f: Array1<f32>,
}

impl ParamTensors {
    /// Multiplies every array by `s`.
    pub fn scale(&mut self, s: f32) {
        for a in [&mut self.w_enc_fd, &mut self.w_dec_fd] {
            a.mapv_inplace(|v| v * s);
        }
        for a in [&mut self.b_enc_f, &mut self.b_dec_d, &mut self.threshold_f] {
            a.mapv_inplace(|v| v * s);
        }
    }

    /// All zeros, for an SAE with `f` latents of width `d` and no per-latent thresholds.
    pub fn zeros(f: usize, d: usize) -> Self {
        ParamTensors {
            w_enc_fd: crate::backend::zeros_huge(f, d),
            b_enc_f: Array1::zeros(f),
            w_dec_fd: crate::backend::zeros_huge(f, d),
            b_dec_d: Array1::zeros(d),
            threshold_f: Array1::zeros(0),
        }
    }

    /// All zeros, shaped like the parameters of an SAE of `config` (with θ_j for JumpReLU).
    pub fn zeros_for(config: &SaeConfig) -> Self {
        let (f, d) = (config.dict_size, config.d_model);
        ParamTensors {
            threshold_f: Array1::zeros(if config.arch.has_latent_thresholds() {
                f
            } else {
                0
            }),
            ..ParamTensors::zeros(f, d)
        }
    }
}

/// A step's gradients. Only latents with `active_f[j]` have rows in `w_enc_fd`/`w_dec_fd`
/// written this step: the other rows are zero by definition and never read, so a sparse step
/// does not pay to clear F×D memory.
#[derive(Clone, Debug)]
pub struct Grads {
    /// The gradient arrays (inactive rows hold stale values).
    pub tensors: ParamTensors,
    /// Which latents' rows are valid.
    pub active_f: Vec<bool>,
}

impl Grads {
    /// Zero gradients for `f` latents of width `d` (no per-latent thresholds).
    pub fn zeros(f: usize, d: usize) -> Self {
        Grads {
            tensors: ParamTensors::zeros(f, d),
            active_f: vec![false; f],
        }
    }

    /// Zero gradients for the parameters of an SAE of `config`.
    pub fn zeros_for(config: &SaeConfig) -> Self {
        Grads {
            tensors: ParamTensors::zeros_for(config),
            active_f: vec![false; config.dict_size],
        }
    }

    /// The gradients with inactive rows zeroed: what a dense framework would hold.
    pub fn to_dense(&self) -> ParamTensors {
        let mut t = self.tensors.clone();
        for (j, &active) in self.active_f.iter().enumerate() {
            if !active {
                t.w_enc_fd.row_mut(j).fill(0.0);
                t.w_dec_fd.row_mut(j).fill(0.0);
            }
        }
        t
    }

    /// Readies the gradients for the step in one pass over the latent rows (see
    /// [`RowPrep`]); returns the global ‖g‖₂ over all four gradients when `prep.want_norm`.
    pub fn project_and_norm(&mut self, w_dec_fd: &Array2<f32>, prep: RowPrep) -> f64 {
        let row_sq_f = self.project_rows(w_dec_fd, prep);
        self.global_norm(&row_sq_f)
    }

    /// [`RowPrep::apply`] on every active latent row; returns each row's squared norm (0 for
    /// inactive rows).
    pub fn project_rows(&mut self, w_dec_fd: &Array2<f32>, prep: RowPrep) -> Vec<f64> {
        Zip::from(self.tensors.w_dec_fd.rows_mut())
            .and(self.tensors.w_enc_fd.rows())
            .and(w_dec_fd.rows())
            .and(&self.active_f)
            .par_map_collect(|mut gd, ge, w, &active| {
                if !active {
                    return 0.0;
                }
                let (gd, ge, w) = (
                    gd.as_slice_mut().unwrap(),
                    ge.as_slice().unwrap(),
                    w.as_slice().unwrap(),
                );
                dispatch(|| prep.apply(gd, ge, w))
            })
            .into_raw_vec_and_offset()
            .0
    }

    /// ‖g‖² in two parts, for latents sharded across processes: what is per latent (the rows'
    /// squared norms `row_sq_f`, b_enc, the thresholds) and b_dec's.
    pub fn norm_sq_parts(&self, row_sq_f: &[f64]) -> [f64; 2] {
        let t = &self.tensors;
        let per_latent = sq(t.b_enc_f.as_slice().unwrap()) + sq(t.threshold_f.as_slice().unwrap());
        [
            row_sq_f.iter().sum::<f64>() + per_latent,
            sq(t.b_dec_d.as_slice().unwrap()),
        ]
    }

    /// ‖g‖₂ from the latent rows' squared norms (as [`RowPrep::apply`] returns them), the
    /// biases and the thresholds, summed in f64 in a fixed order.
    pub fn global_norm(&self, row_sq_f: &[f64]) -> f64 {
        let biases = sq(self.tensors.b_enc_f.as_slice().unwrap())
            + sq(self.tensors.b_dec_d.as_slice().unwrap())
            + sq(self.tensors.threshold_f.as_slice().unwrap());
        (row_sq_f.iter().sum::<f64>() + biases).sqrt()
    }
}

/// Σ x² in f64, with 8 independent partial sums so the loop vectorises instead of waiting on
/// one long chain of dependent additions.
#[inline(always)]
pub(crate) fn sq(v: &[f32]) -> f64 {
    let mut acc = [0.0f64; 8];
    let mut chunks = v.chunks_exact(8);
    for c in chunks.by_ref() {
        for l in 0..8 {
            acc[l] += c[l] as f64 * c[l] as f64;
        }
    }
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&x| x as f64 * x as f64)
        .sum();
    acc.iter().sum::<f64>() + tail
}

/// What one latent's gradient rows need before the step. The backward pass applies it to each
/// row while the row is still in cache; [`Grads::project_and_norm`] applies it in a pass of its
/// own where that cannot be done (gradients summed across processes, or inspected raw).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowPrep {
    /// Remove from ∂W_dec\[j\] its component along W_dec\[j\] (normalised as w/(‖w‖ + eps)),
    /// so a step keeps unit-norm rows on the sphere.
    pub project_eps: Option<f32>,
    /// Return the rows' squared norm (for clipping).
    pub want_norm: bool,
}

impl RowPrep {
    /// Applies to latent j's rows `gd` (∂W_dec, projected in place) and `ge` (∂W_enc), with
    /// `w` = W_dec\[j\]; returns ‖gd‖² + ‖ge‖² after projection, or 0 if no norm is wanted.
    #[inline(always)]
    pub fn apply(&self, gd: &mut [f32], ge: &[f32], w: &[f32]) -> f64 {
        if let Some(eps) = self.project_eps {
            let norm = dot(w, w).sqrt() + eps;
            let along = gd
                .iter()
                .zip(w)
                .map(|(gi, wi)| gi * (wi / norm))
                .sum::<f32>();
            for (gi, wi) in gd.iter_mut().zip(w) {
                *gi -= along * (wi / norm);
            }
        }
        if self.want_norm {
            sq(gd) + sq(ge)
        } else {
            0.0
        }
    }
}

/// An SAE's parameters, borrowed for an update (see [`crate::Sae::params_mut`]).
pub struct ParamsMut<'a> {
    /// W_enc, F×D.
    pub w_enc_fd: &'a mut Array2<f32>,
    /// b_enc, F.
    pub b_enc_f: &'a mut Array1<f32>,
    /// W_dec, F×D.
    pub w_dec_fd: &'a mut Array2<f32>,
    /// b_dec, D.
    pub b_dec_d: &'a mut Array1<f32>,
    /// JumpReLU's θ_j, F (empty for the other architectures).
    pub threshold_f: &'a mut Array1<f32>,
    /// `--precision bf16`: W_enc's bf16 copy (a row of pairs per latent), into which the
    /// update rounds each row of W_enc it updates; `None` otherwise.
    pub(crate) w_enc_bf16: Option<ArrayViewMut2<'a, u32>>,
}

/// Adam's hyperparameters (torch defaults: β = (0.9, 0.999), ε = 1e-8).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    /// β1.
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
}

/// Adam's state: the first and second moments and the step count.
#[derive(Clone, Debug, PartialEq)]
pub struct Adam {
    config: AdamConfig,
    /// First moments (torch's `exp_avg`).
    pub m: ParamTensors,
    /// Second moments (torch's `exp_avg_sq`).
    pub v: ParamTensors,
    /// Steps taken.
    pub t: u64,
}

/// Per-step scalars of the Adam update, computed as torch does (in f64, then used as f32);
/// the GPU's kernel takes the same ones.
#[derive(Clone, Copy)]
pub(crate) struct AdamStep {
    pub(crate) one_minus_beta1: f32,
    pub(crate) beta2: f32,
    pub(crate) one_minus_beta2: f32,
    pub(crate) step_size: f32,
    pub(crate) bias_correction2_sqrt: f32,
    pub(crate) eps: f32,
    pub(crate) grad_scale: f32,
}

impl AdamStep {
    /// One element, in torch's order of operations.
    #[inline(always)]
    fn update(&self, p: &mut f32, m: &mut f32, v: &mut f32, g: f32) {
        let g = g * self.grad_scale;
        *m += self.one_minus_beta1 * (g - *m);
        *v = *v * self.beta2 + self.one_minus_beta2 * g * g;
        let denom = v.sqrt() / self.bias_correction2_sqrt + self.eps;
        *p += -self.step_size * (*m / denom);
    }

    fn update_vec(
        &self,
        p: ArrayViewMut1<f32>,
        m: ArrayViewMut1<f32>,
        v: ArrayViewMut1<f32>,
        g: ArrayView1<f32>,
    ) {
        Zip::from(p)
            .and(m)
            .and(v)
            .and(g)
            .for_each(|p, m, v, &g| self.update(p, m, v, g));
    }

    /// One contiguous row; `g = None` means a zero gradient (the buffer is not read).
    #[inline(always)]
    fn update_row(
        &self,
        mut p: ArrayViewMut1<f32>,
        mut m: ArrayViewMut1<f32>,
        mut v: ArrayViewMut1<f32>,
        g: Option<ArrayView1<f32>>,
    ) {
        let (p, m, v) = (
            p.as_slice_mut().unwrap(),
            m.as_slice_mut().unwrap(),
            v.as_slice_mut().unwrap(),
        );
        let n = p.len();
        let (m, v) = (&mut m[..n], &mut v[..n]);
        match g {
            Some(g) => {
                let g = &g.as_slice().unwrap()[..n];
                for i in 0..n {
                    self.update(&mut p[i], &mut m[i], &mut v[i], g[i]);
                }
            }
            None => {
                for i in 0..n {
                    self.update(&mut p[i], &mut m[i], &mut v[i], 0.0);
                }
            }
        }
    }
}

impl Adam {
    /// Counts a step and returns its scalars: learning rate `lr`, gradients multiplied by
    /// `grad_scale` (the clipping factor).
    pub(crate) fn next_step(&mut self, lr: f64, grad_scale: f32) -> AdamStep {
        self.t += 1;
        let c = self.config;
        let t = self.t as i32;
        let bias_correction1 = 1.0 - c.beta1.powi(t);
        let bias_correction2 = 1.0 - c.beta2.powi(t);
        AdamStep {
            one_minus_beta1: (1.0 - c.beta1) as f32,
            beta2: c.beta2 as f32,
            one_minus_beta2: (1.0 - c.beta2) as f32,
            step_size: (lr / bias_correction1) as f32,
            bias_correction2_sqrt: bias_correction2.sqrt() as f32,
            eps: c.eps as f32,
            grad_scale,
        }
    }

    /// Zero moments for the parameters of an SAE of `sae`.
    pub fn new(config: AdamConfig, sae: &SaeConfig) -> Self {
        Adam {
            config,
            m: ParamTensors::zeros_for(sae),
            v: ParamTensors::zeros_for(sae),
            t: 0,
        }
    }

    /// One Adam step on every parameter in `params` with learning rate `lr`, gradients multiplied
    /// by `grad_scale` first (the clipping factor), then decoder rows renormalised when
    /// `decoder` asks for it. Rows of inactive latents are updated with a zero gradient
    /// (their moments still decay), without reading the gradient buffer.
    pub fn step(
        &mut self,
        params: ParamsMut<'_>,
        grads: &Grads,
        lr: f64,
        grad_scale: f32,
        decoder: DecoderConstraint,
    ) {
        let all = 0..params.w_enc_fd.nrows();
        self.step_latents(params, grads, lr, grad_scale, decoder, all);
    }

    /// [`Adam::step`] on the rows (and θ_j) of the latents in `latents` and on b_dec only: the share of
    /// one process of a distributed run, which owns those latents' moments. Every other
    /// parameter and moment is left as it is.
    pub fn step_latents(
        &mut self,
        params: ParamsMut<'_>,
        grads: &Grads,
        lr: f64,
        grad_scale: f32,
        decoder: DecoderConstraint,
        latents: Range<usize>,
    ) {
        let s = self.next_step(lr, grad_scale);
        let g = &grads.tensors;
        let renorm_eps = match decoder {
            DecoderConstraint::UnitNorm { renorm_eps, .. } => Some(renorm_eps),
            DecoderConstraint::Free => None,
        };
        let rows = s![latents.clone(), ..];
        let active_f = &grads.active_f[latents.clone()];
        let (mut p_enc, mut m_enc) = (
            params.w_enc_fd.slice_mut(rows),
            self.m.w_enc_fd.slice_mut(rows),
        );
        let (mut v_enc, g_enc) = (self.v.w_enc_fd.slice_mut(rows), g.w_enc_fd.slice(rows));
        let w_enc = Zip::from(p_enc.rows_mut())
            .and(m_enc.rows_mut())
            .and(v_enc.rows_mut())
            .and(g_enc.rows())
            .and(active_f);
        match params.w_enc_bf16 {
            // Each row is rounded while it is in cache: the bf16 copy costs no pass of its own.
            Some(copy) => w_enc.and(copy.slice_move(rows).rows_mut()).par_for_each(
                |mut p, m, v, g, &active, mut copy| {
                    dispatch(|| {
                        s.update_row(p.view_mut(), m, v, active.then_some(g));
                        round_row_into(
                            copy.as_slice_mut().expect("standard layout"),
                            p.as_slice().expect("standard layout"),
                        );
                    })
                },
            ),
            None => w_enc.par_for_each(|p, m, v, g, &active| {
                dispatch(|| s.update_row(p, m, v, active.then_some(g)))
            }),
        }
        Zip::from(params.w_dec_fd.slice_mut(rows).rows_mut())
            .and(self.m.w_dec_fd.slice_mut(rows).rows_mut())
            .and(self.v.w_dec_fd.slice_mut(rows).rows_mut())
            .and(g.w_dec_fd.slice(rows).rows())
            .and(active_f)
            .par_for_each(|mut p, m, v, g, &active| {
                dispatch(|| {
                    s.update_row(p.view_mut(), m, v, active.then_some(g));
                    if let Some(eps) = renorm_eps {
                        let row = p.as_slice_mut().unwrap();
                        let norm = dot(row, row).sqrt() + eps;
                        row.iter_mut().for_each(|x| *x /= norm);
                    }
                })
            });
        let latents = s![latents];
        s.update_vec(
            params.b_enc_f.slice_mut(latents),
            self.m.b_enc_f.slice_mut(latents),
            self.v.b_enc_f.slice_mut(latents),
            g.b_enc_f.slice(latents),
        );
        s.update_vec(
            params.b_dec_d.view_mut(),
            self.m.b_dec_d.view_mut(),
            self.v.b_dec_d.view_mut(),
            g.b_dec_d.view(),
        );
        if !params.threshold_f.is_empty() {
            s.update_vec(
                params.threshold_f.slice_mut(latents),
                self.m.threshold_f.slice_mut(latents),
                self.v.threshold_f.slice_mut(latents),
                g.threshold_f.slice(latents),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lr_schedule_matches_reference() {
        // warm-up 10, decay from 60 to 100.
        let f = |s| lr_factor(s, 10, Some(60), 100);
        assert_eq!(f(0), 0.0);
        assert_eq!(f(5), 0.5);
        assert_eq!(f(10), 1.0);
        assert_eq!(f(59), 1.0);
        assert_eq!(f(60), 1.0);
        assert_eq!(f(80), 0.5);
        assert_eq!(f(99), 1.0 / 40.0);
        assert_eq!(lr_factor(0, 0, None, 100), 1.0);
        assert_eq!(lr_factor(1000, 0, None, 100), 1.0);
    }

    #[test]
    fn sparsity_scale_ramps() {
        assert_eq!(sparsity_scale(0, 0), 1.0);
        assert_eq!(sparsity_scale(0, 4), 0.0);
        assert_eq!(sparsity_scale(2, 4), 0.5);
        assert_eq!(sparsity_scale(9, 4), 1.0);
    }

    #[test]
    fn adam_single_element_matches_closed_form() {
        // First step of Adam moves by lr·g/(|g| + ε·…) ≈ lr·sign(g).
        let s = AdamStep {
            one_minus_beta1: 0.1,
            beta2: 0.999,
            one_minus_beta2: 0.001,
            step_size: (1e-2 / 0.1f64) as f32,
            bias_correction2_sqrt: (0.001f64).sqrt() as f32,
            eps: 1e-8,
            grad_scale: 1.0,
        };
        let (mut p, mut m, mut v) = (1.0f32, 0.0f32, 0.0f32);
        s.update(&mut p, &mut m, &mut v, -3.0);
        assert!((p - 1.01).abs() < 1e-6, "{p}");
        assert!((m + 0.3).abs() < 1e-7);
        assert!((v - 0.009).abs() < 1e-8);
    }

    #[test]
    fn projection_removes_the_parallel_component() {
        let mut grads = Grads::zeros(2, 3);
        grads.tensors.w_dec_fd = ndarray::array![[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]];
        grads.active_f = vec![true, false];
        let w = ndarray::array![[0.0f32, 2.0, 0.0], [1.0, 0.0, 0.0]];
        let prep = RowPrep {
            project_eps: Some(0.0),
            want_norm: true,
        };
        let norm = grads.project_and_norm(&w, prep);
        assert_eq!(grads.tensors.w_dec_fd.row(0).to_vec(), vec![1.0, 0.0, 3.0]);
        // Only active rows (and the zero biases) count: ‖(1, 0, 3)‖.
        assert!((norm - 10f64.sqrt()).abs() < 1e-12);
        // Inactive rows are not touched.
        assert_eq!(grads.tensors.w_dec_fd.row(1).to_vec(), vec![4.0, 5.0, 6.0]);
        assert_eq!(
            grads.to_dense().w_dec_fd.row(1).to_vec(),
            vec![0.0, 0.0, 0.0]
        );
    }
}
