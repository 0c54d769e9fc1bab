//! The SAE itself: its parameters, their initialisation, and the inference-time encoder
//! (GEMM, bias, ReLU, sparsification) and decoder.

use ndarray::{Array1, Array2, ArrayView1, ArrayView2, ArrayViewMut2, Axis, Zip};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

use crate::backend::bf16::{Bf16Encoder, Bf16Kernel};
use crate::backend::Backend;
use crate::config::{Precision, SaeConfig};
use crate::dist::Collective;
use crate::error::{check_shape, Error, Result};
use crate::select::PreActs;

/// A sparse autoencoder. Row `j` of `w_enc_fd` and of `w_dec_fd` belongs to latent `j`.
///
/// pre = (x − b_dec)·W_encᵀ + b_enc, f = sparsify(ReLU(pre)), x̂ = f·W_dec + b_dec.
#[derive(Clone, Debug, PartialEq)]
pub struct Sae {
    pub(crate) config: SaeConfig,
    pub(crate) w_enc_fd: Array2<f32>,
    pub(crate) b_enc_f: Array1<f32>,
    pub(crate) w_dec_fd: Array2<f32>,
    pub(crate) b_dec_d: Array1<f32>,
    /// BatchTopK's inference threshold θ; `None` until training sets it.
    pub(crate) threshold: Option<f32>,
    /// JumpReLU's thresholds θ_j, F values (a parameter trained with the others); empty for
    /// every other architecture.
    pub(crate) threshold_f: Array1<f32>,
    /// The bf16 kernel when the encoder GEMM runs in bf16 ([`Sae::set_precision`]); not a
    /// parameter, and not saved.
    pub(crate) bf16: Option<Bf16Kernel>,
}

/// JumpReLU's initial θ_j (Rajamanoharan et al. 2024, appendix I; dictionary_learning's
/// `JumpReluAutoEncoder`).
pub const JUMPRELU_INITIAL_THRESHOLD: f32 = 0.001;

/// The thresholds an SAE of `config` starts with: [`JUMPRELU_INITIAL_THRESHOLD`] per latent for
/// JumpReLU, none otherwise.
fn initial_thresholds(config: &SaeConfig) -> Array1<f32> {
    if config.arch.has_latent_thresholds() {
        Array1::from_elem(config.dict_size, JUMPRELU_INITIAL_THRESHOLD)
    } else {
        Array1::zeros(0)
    }
}

impl Sae {
    /// A freshly initialised SAE: decoder rows are random unit directions, the encoder is the
    /// decoder, both biases are zero (b_dec is set from the data when training starts, where
    /// the architecture asks for it). The same seed gives the same parameters on any machine.
    pub fn new(config: SaeConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let (f, d) = (config.dict_size, config.d_model);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut w_dec_fd: Array2<f32> =
            Array2::from_shape_simple_fn((f, d), || StandardNormal.sample(&mut rng));
        for mut row in w_dec_fd.rows_mut() {
            let norm = row.dot(&row).sqrt();
            row /= norm;
        }
        Ok(Sae {
            config,
            w_enc_fd: w_dec_fd.clone(),
            b_enc_f: Array1::zeros(f),
            w_dec_fd,
            b_dec_d: Array1::zeros(d),
            threshold: None,
            threshold_f: initial_thresholds(&config),
            bf16: None,
        })
    }

    /// Latents `rows` of [`Sae::new`]`(config, seed)`, as an SAE of `rows.len()` latents (one
    /// shard of a dictionary sharded by latent; [`crate::Trainer::sharded`]). The whole
    /// dictionary is never held: the seeded stream is drawn in order and only these rows kept,
    /// so the last shard's start-up draws all F·D numbers. Fails when `rows` is empty or
    /// reaches past F, or holds fewer latents than k.
    pub fn new_shard(config: SaeConfig, seed: u64, rows: std::ops::Range<usize>) -> Result<Self> {
        config.validate()?;
        let local = SaeConfig {
            dict_size: rows.len(),
            ..config
        };
        if rows.is_empty() || rows.end > config.dict_size || local.validate().is_err() {
            return Err(Error::Distributed {
                reason: format!(
                    "a latent shard of latents {rows:?} cannot hold part of a {}-latent \
                     dictionary{}; use fewer --latent-shards",
                    config.dict_size,
                    config
                        .arch
                        .k()
                        .map_or(String::new(), |k| format!(" with k = {k}"))
                ),
            });
        }
        let d = config.d_model;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for _ in 0..rows.start * d {
            let _: f32 = StandardNormal.sample(&mut rng);
        }
        let mut w_dec_fd: Array2<f32> =
            Array2::from_shape_simple_fn((rows.len(), d), || StandardNormal.sample(&mut rng));
        for mut row in w_dec_fd.rows_mut() {
            let norm = row.dot(&row).sqrt();
            row /= norm;
        }
        let b_enc_f = Array1::zeros(rows.len());
        Sae::from_parts(local, w_dec_fd.clone(), b_enc_f, w_dec_fd, Array1::zeros(d))
    }

    /// An SAE from given parameters (shapes checked against `config`); a JumpReLU SAE starts
    /// with its initial thresholds (see [`Sae::set_latent_thresholds`]).
    pub fn from_parts(
        config: SaeConfig,
        w_enc_fd: Array2<f32>,
        b_enc_f: Array1<f32>,
        w_dec_fd: Array2<f32>,
        b_dec_d: Array1<f32>,
    ) -> Result<Self> {
        config.validate()?;
        let (f, d) = (config.dict_size, config.d_model);
        check_shape("w_enc_fd", w_enc_fd.shape(), &[f, d])?;
        check_shape("b_enc_f", b_enc_f.shape(), &[f])?;
        check_shape("w_dec_fd", w_dec_fd.shape(), &[f, d])?;
        check_shape("b_dec_d", b_dec_d.shape(), &[d])?;
        // Standard (row-major) layout is what the kernels slice.
        Ok(Sae {
            config,
            w_enc_fd: w_enc_fd.as_standard_layout().into_owned(),
            b_enc_f,
            w_dec_fd: w_dec_fd.as_standard_layout().into_owned(),
            b_dec_d,
            threshold: None,
            threshold_f: initial_thresholds(&config),
            bf16: None,
        })
    }

    /// Sets JumpReLU's thresholds θ_j (F finite values). Fails with [`Error::Shape`] for a
    /// length other than F, or for an SAE of another architecture (none), and with
    /// [`Error::NonFinite`] when one is NaN or ±Inf.
    pub fn set_latent_thresholds(&mut self, threshold_f: Array1<f32>) -> Result<()> {
        check_shape("threshold_f", threshold_f.shape(), self.threshold_f.shape())?;
        if let Some(j) = threshold_f.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                what: "threshold_f, latent".into(),
                row: j,
            });
        }
        self.threshold_f = threshold_f;
        Ok(())
    }

    /// Shape and architecture.
    pub fn config(&self) -> &SaeConfig {
        &self.config
    }
    /// The parameters, borrowed mutably for an optimiser's update.
    pub fn params_mut(&mut self) -> crate::optim::ParamsMut<'_> {
        crate::optim::ParamsMut {
            w_enc_fd: &mut self.w_enc_fd,
            b_enc_f: &mut self.b_enc_f,
            w_dec_fd: &mut self.w_dec_fd,
            b_dec_d: &mut self.b_dec_d,
            threshold_f: &mut self.threshold_f,
            w_enc_bf16: None,
        }
    }

    /// Encoder weights, F×D.
    pub fn w_enc_fd(&self) -> ArrayView2<'_, f32> {
        self.w_enc_fd.view()
    }
    /// Encoder bias, F.
    pub fn b_enc_f(&self) -> ArrayView1<'_, f32> {
        self.b_enc_f.view()
    }
    /// Decoder weights, F×D (row j is latent j's direction).
    pub fn w_dec_fd(&self) -> ArrayView2<'_, f32> {
        self.w_dec_fd.view()
    }
    /// Decoder bias, D.
    pub fn b_dec_d(&self) -> ArrayView1<'_, f32> {
        self.b_dec_d.view()
    }
    /// BatchTopK's learned inference threshold θ, if training has set it.
    pub fn threshold(&self) -> Option<f32> {
        self.threshold
    }
    /// JumpReLU's thresholds θ_j, F values; empty for the other architectures.
    pub fn latent_thresholds(&self) -> ArrayView1<'_, f32> {
        self.threshold_f.view()
    }

    /// Checks that `x_bd` is a non-empty, finite batch of D-wide rows.
    pub(crate) fn check_batch(&self, x_bd: ArrayView2<'_, f32>) -> Result<()> {
        if x_bd.nrows() == 0 {
            return Err(Error::Empty {
                what: "batch x_bd".into(),
            });
        }
        check_shape(
            "batch x_bd",
            x_bd.shape(),
            &[x_bd.nrows(), self.config.d_model],
        )?;
        // In parallel: at B = 16384 a serial scan costs a GPU step several milliseconds.
        if let Some(row) = x_bd
            .axis_iter(Axis(0))
            .into_par_iter()
            .position_first(|r| r.iter().any(|v| !v.is_finite()))
        {
            return Err(Error::NonFinite {
                what: "batch x_bd".into(),
                row,
            });
        }
        Ok(())
    }

    /// How the encoder GEMM rounds its inputs: f32 (the default) or bf16 with f32
    /// accumulation. Fails with [`Error::Precision`] for bf16 on a CPU without AVX-512 BF16.
    /// Every encoding on the CPU follows it (training sets it from
    /// [`crate::TrainConfig::precision`]); it is not saved with the SAE.
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        self.bf16 = match precision {
            Precision::F32 => None,
            Precision::Bf16 => Some(Bf16Kernel::detect()?),
        };
        Ok(())
    }

    /// The precision of the encoder GEMM (see [`Sae::set_precision`]).
    pub fn precision(&self) -> Precision {
        match self.bf16 {
            Some(_) => Precision::Bf16,
            None => Precision::F32,
        }
    }

    /// The encoder up to the sparsifier: `xc_bd ← x − b_dec` (x itself for an architecture that
    /// does not centre its input) and `gemm_bf ← xc·W_encᵀ`; with
    /// b_enc ([`Sae::pre_acts`]) that makes the pre-activations. Bias and ReLU are left to the
    /// selection, which reads each entry once anyway. Outputs are resized only if the batch
    /// size changed. In f32 the GEMM runs on `backend`; in bf16 on `bf16`, the working set
    /// kept from batch to batch (its W_enc copy current), or a new one when `None`.
    pub(crate) fn pre_activations_into(
        &self,
        backend: &dyn Backend,
        bf16: Option<&mut Bf16Encoder>,
        x_bd: ArrayView2<'_, f32>,
        xc_bd: &mut Array2<f32>,
        gemm_bf: &mut Array2<f32>,
    ) {
        let b = x_bd.nrows();
        resize(xc_bd, (b, self.config.d_model));
        resize(gemm_bf, (b, self.config.dict_size));
        self.pre_activations_in(backend, bf16, x_bd, xc_bd.view_mut(), gemm_bf.view_mut());
    }

    /// [`Sae::pre_activations_into`] into outputs the caller sized: `xc_bd` B×D and `gemm_bf`
    /// B×F, both in standard layout (views of reused capacity, see
    /// [`crate::encode::EncodeBuffers`]).
    pub(crate) fn pre_activations_in(
        &self,
        backend: &dyn Backend,
        bf16: Option<&mut Bf16Encoder>,
        x_bd: ArrayView2<'_, f32>,
        mut xc_bd: ArrayViewMut2<'_, f32>,
        gemm_bf: ArrayViewMut2<'_, f32>,
    ) {
        let centre = self.config.arch.centres_input();
        if let Some(kernel) = self.bf16 {
            let mut fresh = None;
            let encoder = match bf16 {
                Some(encoder) => encoder,
                None => fresh.insert(Bf16Encoder::new(kernel)),
            };
            let b_dec_d = centre.then(|| self.b_dec_d.view());
            encoder.encode(self.w_enc_fd.view(), x_bd, b_dec_d, xc_bd, gemm_bf);
            return;
        }
        Zip::from(xc_bd.rows_mut())
            .and(x_bd.rows())
            .par_for_each(|mut xc, x| {
                if centre {
                    Zip::from(&mut xc)
                        .and(&x)
                        .and(&self.b_dec_d)
                        .for_each(|c, &x, &bd| *c = x - bd)
                } else {
                    xc.assign(&x)
                }
            });
        backend.gemm(1.0, xc_bd.view(), self.w_enc_fd.t(), 0.0, gemm_bf);
    }

    /// The pre-activations whose GEMM part is `gemm_bf` (from `pre_activations_into`).
    pub(crate) fn pre_acts<'a>(&'a self, gemm_bf: &'a Array2<f32>) -> PreActs<'a> {
        PreActs::new(gemm_bf.view(), self.b_enc_f.as_slice().expect("contiguous"))
            .expect("encoder output matches the SAE")
    }

    /// Pre-activations (x − b_dec)·W_encᵀ + b_enc (JumpReLU: x·W_encᵀ + b_enc), before ReLU,
    /// as a dense B×F matrix.
    pub fn pre_activations(
        &self,
        backend: &dyn Backend,
        x_bd: ArrayView2<'_, f32>,
    ) -> Result<Array2<f32>> {
        self.check_batch(x_bd)?;
        let (mut xc_bd, mut gemm_bf) = (Array2::zeros((0, 0)), Array2::zeros((0, 0)));
        self.pre_activations_into(backend, None, x_bd, &mut xc_bd, &mut gemm_bf);
        Ok(self.pre_acts(&gemm_bf).to_dense())
    }

    /// Folds an input scale into the parameters: an SAE trained on c·x becomes one that takes
    /// raw x, as dictionary_learning's `scale_biases` after `normalize_activations`. b_enc,
    /// b_dec and θ (BatchTopK's, or JumpReLU's θ_j) are divided by c, so the codes of raw x are the trained codes of c·x divided
    /// by c, and so is the reconstruction.
    ///
    /// A ReLU SAE's decoder rows are also made unit-norm, each norm moved into its encoder row
    /// and bias (a ReLU code scales with its pre-activation, so the reconstruction is
    /// unchanged and each code reads in units of its unit direction). TopK and BatchTopK rows
    /// are unit-norm already, and rescaling codes there would change which are selected.
    pub fn fold_input_scale(&mut self, c: f32) -> Result<()> {
        if !(c.is_finite() && c > 0.0) {
            return Err(crate::ConfigError::InputScale(c).into());
        }
        self.b_enc_f /= c;
        self.b_dec_d /= c;
        self.threshold = self.threshold.map(|theta| theta / c);
        self.threshold_f /= c;
        if self.config.arch.folds_decoder_norms() {
            Zip::from(self.w_dec_fd.rows_mut())
                .and(self.w_enc_fd.rows_mut())
                .and(&mut self.b_enc_f)
                .par_for_each(|mut w_dec_d, mut w_enc_d, b_enc| {
                    let norm = w_dec_d.dot(&w_dec_d).sqrt();
                    if norm > 0.0 && norm.is_finite() {
                        w_dec_d /= norm;
                        w_enc_d *= norm;
                        *b_enc *= norm;
                    }
                });
        }
        Ok(())
    }
}

/// Resizes a workspace matrix only when its shape changes (contents are then garbage).
pub(crate) fn resize(a: &mut Array2<f32>, shape: (usize, usize)) {
    if a.dim() != shape {
        *a = crate::backend::zeros_huge(shape.0, shape.1);
    }
}

/// The geometric median of the rows of `x_bd` (over all processes' rows) by Weiszfeld's
/// iteration from the mean: at most `max_iter` iterations, stopping once the estimate moves
/// less than `tol`, as dictionary_learning initialises b_dec. Computed in f64.
pub fn geometric_median(
    x_bd: ArrayView2<'_, f32>,
    collective: &dyn Collective,
    max_iter: usize,
    tol: f64,
) -> Array1<f32> {
    let d = x_bd.ncols();
    // [Σ_b w_b·x_b (D values), Σ_b w_b], summed across processes.
    let weighted_sum = |weights: &dyn Fn(ArrayView1<'_, f32>) -> f64| {
        let mut acc = vec![0.0f64; d + 1];
        for row in x_bd.axis_iter(Axis(0)) {
            let w = weights(row);
            for (a, &v) in acc.iter_mut().zip(row.iter()) {
                *a += w * v as f64;
            }
            acc[d] += w;
        }
        collective.all_reduce_sum_f64(&mut acc);
        let total = acc[d];
        acc.truncate(d);
        acc.iter_mut().for_each(|a| *a /= total);
        acc
    };
    let mut guess = weighted_sum(&|_| 1.0);
    for _ in 0..max_iter {
        let next = weighted_sum(&|row| {
            let dist2: f64 = row
                .iter()
                .zip(&guess)
                .map(|(&v, &g)| (v as f64 - g).powi(2))
                .sum();
            // A row sitting on the estimate would get infinite weight; cap it so a one-row
            // batch's median is that row.
            1.0 / dist2.sqrt().max(1e-12)
        });
        let step: f64 = next
            .iter()
            .zip(&guess)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f64>()
            .sqrt();
        guess = next;
        if step < tol {
            break;
        }
    }
    guess.iter().map(|&g| g as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;
    use crate::config::Architecture;
    use crate::dist::SingleProcess;
    use ndarray::array;

    fn cfg(arch: Architecture) -> SaeConfig {
        SaeConfig {
            d_model: 6,
            dict_size: 20,
            arch,
        }
    }

    #[test]
    fn init_is_seeded_unit_norm_and_tied() {
        let a = Sae::new(cfg(Architecture::TopK { k: 3 }), 7).unwrap();
        let b = Sae::new(cfg(Architecture::TopK { k: 3 }), 7).unwrap();
        let c = Sae::new(cfg(Architecture::TopK { k: 3 }), 8).unwrap();
        assert_eq!(a, b);
        assert_ne!(a.w_dec_fd, c.w_dec_fd);
        assert_eq!(a.w_enc_fd, a.w_dec_fd);
        for row in a.w_dec_fd.rows() {
            assert!((row.dot(&row) - 1.0).abs() < 1e-6);
        }
        assert!(a.b_enc_f.iter().chain(&a.b_dec_d).all(|&v| v == 0.0));
    }

    #[test]
    fn from_parts_rejects_wrong_shapes() {
        let err = Sae::from_parts(
            cfg(Architecture::RELU),
            Array2::zeros((20, 5)),
            Array1::zeros(20),
            Array2::zeros((20, 6)),
            Array1::zeros(6),
        )
        .unwrap_err();
        assert!(err.to_string().contains("w_enc_fd"), "{err}");
    }

    #[test]
    fn encode_rejects_bad_batches() {
        let sae = Sae::new(cfg(Architecture::TopK { k: 3 }), 1).unwrap();
        assert!(matches!(
            sae.encode(&Cpu, Array2::zeros((0, 6)).view()),
            Err(Error::Empty { .. })
        ));
        assert!(matches!(
            sae.encode(&Cpu, Array2::zeros((2, 5)).view()),
            Err(Error::Shape { .. })
        ));
        let mut x = Array2::zeros((3, 6));
        x[[2, 1]] = f32::NAN;
        assert!(matches!(
            sae.encode(&Cpu, x.view()),
            Err(Error::NonFinite { row: 2, .. })
        ));
    }

    #[test]
    fn encode_decode_topk_round_trip_shapes() {
        let sae = Sae::new(cfg(Architecture::TopK { k: 3 }), 1).unwrap();
        let x = Array2::from_shape_fn((4, 6), |(b, d)| ((b * 7 + d) as f32).sin());
        let codes = sae.encode(&Cpu, x.view()).unwrap();
        assert!(codes.indptr.windows(2).all(|w| w[1] - w[0] <= 3));
        let x_hat = sae.decode(&codes).unwrap();
        let dense = codes.to_dense().dot(&sae.w_dec_fd) + &sae.b_dec_d;
        assert!((x_hat - dense).iter().all(|v| v.abs() < 1e-6));
    }

    #[test]
    fn geometric_median_of_symmetric_points_and_single_row() {
        let x = array![
            [0.0f32, 0.0],
            [2.0, 0.0],
            [0.0, 2.0],
            [2.0, 2.0],
            [1.0, 1.0]
        ];
        let m = geometric_median(x.view(), &SingleProcess, 100, 1e-5);
        assert!(
            (m[0] - 1.0).abs() < 1e-4 && (m[1] - 1.0).abs() < 1e-4,
            "{m}"
        );
        // Robust to an outlier, unlike the mean.
        let x = array![[0.0f32], [1.0], [2.0], [1000.0]];
        let m = geometric_median(x.view(), &SingleProcess, 100, 1e-5);
        assert!(m[0] < 3.0, "{m}");
        let one = array![[3.0f32, -1.0]];
        assert_eq!(
            geometric_median(one.view(), &SingleProcess, 100, 1e-5),
            array![3.0, -1.0]
        );
    }
}
