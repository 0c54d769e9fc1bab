//! The analytic backward pass against central finite differences of an independent f64
//! implementation of each architecture's loss, with the step's selection held fixed.

mod common;

use common::{random_sae, synthetic_batch};
use ndarray::{Array1, Array2, Zip};
use sparse_autoencoder::ParamTensors;
use sparse_autoencoder::{Architecture, ReluVariant, TrainConfig, Trainer};

const B: usize = 16;
const D: usize = 8;
const F: usize = 24;

#[derive(Clone)]
struct Params64 {
    w_enc: Array2<f64>,
    b_enc: Array1<f64>,
    w_dec: Array2<f64>,
    b_dec: Array1<f64>,
    /// JumpReLU's θ (empty otherwise).
    theta: Array1<f64>,
}

impl Params64 {
    fn from(p: &ParamTensors) -> Self {
        Params64 {
            w_enc: p.w_enc_fd.mapv(f64::from),
            b_enc: p.b_enc_f.mapv(f64::from),
            w_dec: p.w_dec_fd.mapv(f64::from),
            b_dec: p.b_dec_d.mapv(f64::from),
            theta: p.threshold_f.mapv(f64::from),
        }
    }

    fn tensor_mut(&mut self, which: usize) -> &mut [f64] {
        match which {
            0 => self.w_enc.as_slice_mut().unwrap(),
            1 => self.b_enc.as_slice_mut().unwrap(),
            2 => self.w_dec.as_slice_mut().unwrap(),
            3 => self.b_dec.as_slice_mut().unwrap(),
            _ => self.theta.as_slice_mut().unwrap(),
        }
    }
}

#[derive(Clone, Copy)]
enum Penalty {
    AuxK {
        alpha: f64,
    },
    L1 {
        coef: f64,
        weighted: bool,
    },
    /// JumpReLU: c·(L0/target − 1)², θ trained by the straight-through estimator of width ε.
    L0 {
        coef: f64,
        target: f64,
        eps: f64,
    },
    /// Matryoshka: Σ_i c_i·MSE(x̂ from latents below end_i), and AuxK on the full residual.
    Prefixes {
        alpha: f64,
        prefixes: [(usize, f64); 3],
    },
}

/// The rectangle kernel: 1 on (−½, ½).
fn rect(u: f64) -> f64 {
    if u > -0.5 && u < 0.5 {
        1.0
    } else {
        0.0
    }
}

/// The loss with the codes restricted to `mask` (and AuxK's codes to `aux_mask`), and AuxK's
/// residual `e0` held constant, as the reference detaches it. For JumpReLU, `base` is the
/// step's (pre, θ): the kernel terms are frozen there, so that the derivative in θ at the base
/// point is the straight-through estimator's −(θ/ε)·rect((pre − θ)/ε) per code and
/// −(1/ε)·rect((f − θ)/ε) per step function.
fn loss64(
    p: &Params64,
    x: &Array2<f64>,
    mask: &Array2<bool>,
    aux_mask: &Array2<bool>,
    e0: &Array2<f64>,
    penalty: Penalty,
    base: Option<(&Array2<f64>, &Array1<f64>)>,
) -> f64 {
    let centred = if let Penalty::L0 { .. } = penalty {
        x.clone()
    } else {
        x - &p.b_dec
    };
    let pre = centred.dot(&p.w_enc.t()) + &p.b_enc;
    let keep = |m: &Array2<bool>| {
        let mut f = pre.clone();
        Zip::from(&mut f).and(m).for_each(|v, &k| {
            if !k {
                *v = 0.0
            }
        });
        f
    };
    let mut f = keep(mask);
    let mut l0 = mask.iter().filter(|&&m| m).count() as f64;
    if let (Penalty::L0 { eps, .. }, Some((pre0, theta0))) = (penalty, base) {
        for ((b, j), v) in f.indexed_iter_mut() {
            let (t, t0) = (p.theta[j], theta0[j]);
            *v += -(t * t - t0 * t0) / (2.0 * eps) * rect((pre0[[b, j]] - t0) / eps);
            let f0 = if mask[[b, j]] { pre0[[b, j]] } else { 0.0 };
            l0 += -(t - t0) / eps * rect((f0 - t0) / eps);
        }
    }
    let x_hat = f.dot(&p.w_dec) + &p.b_dec;
    let n = x.nrows() as f64;
    let mse = (x - &x_hat).mapv(|v| v * v).sum() / n;
    match penalty {
        Penalty::Prefixes { alpha, prefixes } => {
            let e_hat = keep(aux_mask).dot(&p.w_dec);
            let num = (e0 - &e_hat).mapv(|v| v * v).sum() / n;
            let mean = e0.mean_axis(ndarray::Axis(0)).unwrap();
            let den = (e0 - &mean).mapv(|v| v * v).sum() / n;
            let mut total = alpha * num / den;
            for (end, c) in prefixes {
                let mut f_i = f.clone();
                f_i.slice_mut(ndarray::s![.., end..]).fill(0.0);
                let x_hat_i = f_i.dot(&p.w_dec) + &p.b_dec;
                total += c * (x - &x_hat_i).mapv(|v| v * v).sum() / n;
            }
            total
        }
        Penalty::AuxK { alpha } => {
            let e_hat = keep(aux_mask).dot(&p.w_dec);
            let num = (e0 - &e_hat).mapv(|v| v * v).sum() / n;
            let mean = e0.mean_axis(ndarray::Axis(0)).unwrap();
            let den = (e0 - &mean).mapv(|v| v * v).sum() / n;
            mse + alpha * num / den
        }
        Penalty::L1 { coef, weighted } => {
            let norms: Array1<f64> = p
                .w_dec
                .rows()
                .into_iter()
                .map(|r| if weighted { r.dot(&r).sqrt() } else { 1.0 })
                .collect();
            mse + coef * (f.dot(&norms)).sum() / n
        }
        Penalty::L0 { coef, target, .. } => mse + coef * (l0 / n / target - 1.0).powi(2),
    }
}

/// Runs one step with capture on, then compares each raw gradient with central differences.
fn check(arch: Architecture, config: TrainConfig, penalty: Penalty, dense_threshold: Option<f32>) {
    let mut sae = random_sae(arch, D, F, 3);
    if arch == Architecture::JumpRelu {
        // Thresholds on both sides of ε/2, so the unselected entries' L0 term shows too.
        let theta = Array1::from_shape_fn(F, |j| 0.05 + 0.3 * (j as f32 * 0.37).fract());
        sae.set_latent_thresholds(theta).unwrap();
    }
    let x = synthetic_batch(B, D, 4);
    let mut trainer = common::on_test_device(Trainer::new(sae, config).unwrap());
    if let Some(t) = dense_threshold {
        trainer.set_dense_threshold(t);
    }
    trainer.set_capture(true);
    trainer.step(x.view()).unwrap();
    let cap = trainer.captured().unwrap();

    let base = Params64::from(&cap.params);
    let x64 = x.mapv(f64::from);
    let mask = cap.codes_bf.mapv(|v| v != 0.0);
    let aux_mask = cap.aux_codes_bf.mapv(|v| v != 0.0);
    if let Penalty::AuxK { .. } | Penalty::Prefixes { .. } = penalty {
        assert!(
            aux_mask.iter().any(|&m| m),
            "AuxK must be active for this check"
        );
    }
    let e0 = &x64 - &(cap.codes_bf.mapv(f64::from).dot(&base.w_dec) + &base.b_dec);
    let pre0 = x64.dot(&base.w_enc.t()) + &base.b_enc;
    let jump_base = matches!(penalty, Penalty::L0 { .. }).then_some((&pre0, &base.theta));

    let mut analytic = vec![
        cap.raw_grads.w_enc_fd.as_slice().unwrap().to_vec(),
        cap.raw_grads.b_enc_f.to_vec(),
        cap.raw_grads.w_dec_fd.as_slice().unwrap().to_vec(),
        cap.raw_grads.b_dec_d.to_vec(),
    ];
    if jump_base.is_some() {
        analytic.push(cap.raw_grads.threshold_f.to_vec());
    }
    let names = ["W_enc", "b_enc", "W_dec", "b_dec", "θ"];
    let h = 1e-6;
    for (which, grad) in analytic.iter().enumerate() {
        let mut fd = vec![0.0f64; grad.len()];
        for (i, fd_i) in fd.iter_mut().enumerate() {
            let mut plus = base.clone();
            plus.tensor_mut(which)[i] += h;
            let mut minus = base.clone();
            minus.tensor_mut(which)[i] -= h;
            *fd_i = (loss64(&plus, &x64, &mask, &aux_mask, &e0, penalty, jump_base)
                - loss64(&minus, &x64, &mask, &aux_mask, &e0, penalty, jump_base))
                / (2.0 * h);
        }
        let scale = fd.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(
            scale > 0.0,
            "{}: gradient is identically zero",
            names[which]
        );
        let err = grad
            .iter()
            .zip(&fd)
            .fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()))
            / scale;
        assert!(err < 1e-4, "{}: relative error {err:e}", names[which]);
    }
}

fn config() -> TrainConfig {
    TrainConfig {
        total_steps: 10,
        warmup_steps: 0,
        sparsity_warmup_steps: 0,
        l1_coefficient: 0.5,
        // Every latent that does not fire in the first batch is dead at once: AuxK is active.
        dead_tokens: B as u64,
        ..TrainConfig::default()
    }
}

#[test]
fn topk_gradients_match_finite_differences() {
    check(
        Architecture::TopK { k: 3 },
        config(),
        Penalty::AuxK { alpha: 1.0 / 32.0 },
        None,
    );
}

#[test]
fn batchtopk_gradients_match_finite_differences() {
    check(
        Architecture::BatchTopK { k: 3 },
        config(),
        Penalty::AuxK { alpha: 1.0 / 32.0 },
        None,
    );
}

#[test]
fn auxk_weight_enters_the_gradient() {
    let cfg = TrainConfig {
        auxk_alpha: 0.75,
        ..config()
    };
    check(
        Architecture::TopK { k: 2 },
        cfg,
        Penalty::AuxK { alpha: 0.75 },
        None,
    );
}

#[test]
fn relu_decoder_norm_gradients_match_finite_differences_sparse_and_dense() {
    let penalty = Penalty::L1 {
        coef: 0.5,
        weighted: true,
    };
    check(Architecture::RELU, config(), penalty, Some(2.0));
    check(Architecture::RELU, config(), penalty, Some(0.0));
}

#[test]
fn relu_unit_decoder_gradients_match_finite_differences_sparse_and_dense() {
    let arch = Architecture::Relu {
        variant: ReluVariant::UnitDecoder,
    };
    let penalty = Penalty::L1 {
        coef: 0.5,
        weighted: false,
    };
    check(arch, config(), penalty, Some(2.0));
    check(arch, config(), penalty, Some(0.0));
}

#[test]
fn jumprelu_gradients_match_the_straight_through_estimator() {
    let cfg = TrainConfig {
        jumprelu_bandwidth: 0.2,
        target_l0: 4.0,
        l0_coefficient: 0.5,
        ..config()
    };
    let penalty = Penalty::L0 {
        coef: 0.5,
        target: 4.0,
        eps: 0.2,
    };
    check(Architecture::JumpRelu, cfg, penalty, None);
}

#[test]
fn matryoshka_gradients_match_finite_differences() {
    let cfg = TrainConfig {
        group_sizes: vec![4, 8, 12],
        group_weights: vec![0.5, 1.0, 2.0],
        ..config()
    };
    // The loss is the mean over the 3 prefixes of w_i·MSE_i.
    let penalty = Penalty::Prefixes {
        alpha: 1.0 / 32.0,
        prefixes: [(4, 0.5 / 3.0), (12, 1.0 / 3.0), (24, 2.0 / 3.0)],
    };
    check(Architecture::Matryoshka { k: 3 }, cfg, penalty, None);
}
