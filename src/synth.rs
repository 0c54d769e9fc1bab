//! The built-in synthetic dataset: activations made of known sparse features in superposition,
//! so a run can be scored by how many of the true features its decoder recovers.
//!
//! G unit feature directions live in D < G dimensions. Each row is a sparse non-negative
//! combination of a few of them, Σ_g a_g·feature_g, plus Gaussian noise: feature g fires
//! independently with a probability that falls as a power law in g, and when it fires its
//! magnitude a_g is drawn from U(0.5, 1.5). A good SAE trained on these rows learns decoder rows
//! that point along the true features; [`recovery`] measures how many it found.
//!
//! ```
//! use sparse_autoencoder::synth::{recovery, Synth, SynthConfig};
//!
//! let synth = Synth::new(SynthConfig { d_model: 32, n_features: 96, ..SynthConfig::default() })?;
//! let x_bd = synth.batch(128, 0); // the same (seed, batch index) always gives the same rows
//! assert_eq!(x_bd.dim(), (128, 32));
//! // The true features recover themselves perfectly.
//! let score = recovery(synth.true_features(), synth.true_features())?;
//! assert_eq!(score.fraction_above_0_9, 1.0);
//! # Ok::<(), sparse_autoencoder::Error>(())
//! ```

use ndarray::{Array2, ArrayView2, ArrayViewMut1};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::config::ConfigError;
use crate::error::{check_shape, Result};

mod matching;

/// Shape of the synthetic data.
///
/// The defaults (D = 64, G = 256 true features, 4× overcomplete, 5 active per row on average
/// with power-law exponent 0.5, noise 0.01) are what `sae train` uses when given no data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SynthConfig {
    /// D: width of each row.
    pub d_model: usize,
    /// G: number of true feature directions (G > D makes them superposed).
    pub n_features: usize,
    /// Expected number of active features per row (before capping any probability at 1).
    pub mean_active: f64,
    /// Feature g (0-based) fires with probability ∝ (g + 1)^(−exponent); 0 gives every
    /// feature the same frequency.
    pub power_law_exponent: f64,
    /// Standard deviation of the Gaussian noise added to every entry.
    pub noise: f32,
    /// Seed of the feature directions and of every batch. Streams are kept apart from the
    /// SAE's own initialisation, so the same seed may be used for both.
    pub seed: u64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            d_model: 64,
            n_features: 256,
            mean_active: 5.0,
            power_law_exponent: 0.5,
            noise: 0.01,
            seed: 0,
        }
    }
}

impl SynthConfig {
    /// Checks every field; the error names the first invalid one.
    pub fn validate(&self) -> std::result::Result<(), ConfigError> {
        if self.d_model == 0 {
            return Err(ConfigError::ZeroDModel);
        }
        if self.n_features == 0 {
            return Err(ConfigError::Synth("n_features must be at least 1"));
        }
        if !(self.mean_active.is_finite() && self.mean_active > 0.0) {
            return Err(ConfigError::Synth(
                "mean_active must be a finite number > 0",
            ));
        }
        if self.mean_active > self.n_features as f64 {
            return Err(ConfigError::Synth("mean_active must not exceed n_features"));
        }
        if !(self.power_law_exponent.is_finite() && self.power_law_exponent >= 0.0) {
            return Err(ConfigError::Synth(
                "power_law_exponent must be a finite number >= 0",
            ));
        }
        if !(self.noise.is_finite() && self.noise >= 0.0) {
            return Err(ConfigError::Synth("noise must be a finite number >= 0"));
        }
        Ok(())
    }
}

/// Magnitudes of firing features are drawn uniformly from this range.
const MAGNITUDE: std::ops::Range<f32> = 0.5..1.5;

/// A random stream for one purpose (`domain`) of one seed. The key is built directly (not by
/// `seed_from_u64`, which [`crate::Sae::new`] uses), so the synthetic data never shares a stream
/// with an SAE initialised from the same seed: a decoder must not start at the true features.
fn stream(seed: u64, domain: &[u8; 8], index: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(domain);
    key[16..24].copy_from_slice(b"sae-synt");
    let mut rng = ChaCha8Rng::from_seed(key);
    rng.set_stream(index);
    rng
}

/// A synthetic dataset: its true features and a deterministic stream of batches.
#[derive(Clone, Debug)]
pub struct Synth {
    config: SynthConfig,
    /// G×D, unit rows.
    features_gd: Array2<f32>,
    /// Firing probability of each feature.
    p_g: Vec<f64>,
}

impl Synth {
    /// Validates `config` and draws the true feature directions (Gaussian, normalised to unit
    /// length) from its seed.
    pub fn new(config: SynthConfig) -> Result<Self> {
        config.validate()?;
        let (g, d) = (config.n_features, config.d_model);
        let mut rng = stream(config.seed, b"features", 0);
        let mut features_gd = Array2::<f32>::zeros((g, d));
        for mut row in features_gd.rows_mut() {
            // Redraw the (measure-zero, but cheap to rule out) all-zero vector.
            loop {
                row.iter_mut()
                    .for_each(|v| *v = StandardNormal.sample(&mut rng));
                let norm = row.dot(&row).sqrt();
                if norm > 1e-6 {
                    row /= norm;
                    break;
                }
            }
        }
        let weights: Vec<f64> = (0..g)
            .map(|i| ((i + 1) as f64).powf(-config.power_law_exponent))
            .collect();
        let total: f64 = weights.iter().sum();
        let p_g = weights
            .iter()
            .map(|w| (w / total * config.mean_active).min(1.0))
            .collect();
        Ok(Synth {
            config,
            features_gd,
            p_g,
        })
    }

    /// The configuration this dataset was made from.
    pub fn config(&self) -> &SynthConfig {
        &self.config
    }

    /// The true feature directions, G×D, one unit vector per row.
    pub fn true_features(&self) -> ArrayView2<'_, f32> {
        self.features_gd.view()
    }

    /// The probability that each feature fires in a row (G values; they sum to `mean_active`
    /// unless some were capped at 1).
    pub fn firing_probabilities(&self) -> &[f64] {
        &self.p_g
    }

    /// Batch number `batch_index`: `n_rows`×D rows, each Σ_g a_g·feature_g over the features
    /// that fire, plus noise. The same (seed, batch index) always gives the same batch, and
    /// batches can be drawn in any order.
    pub fn batch(&self, n_rows: usize, batch_index: u64) -> Array2<f32> {
        self.generate(n_rows, batch_index, None)
    }

    /// [`Synth::batch`] together with its ground truth: the magnitudes a, `n_rows`×G, zero
    /// where a feature did not fire. The rows are exactly those of `batch(n_rows, batch_index)`.
    pub fn batch_with_coefficients(
        &self,
        n_rows: usize,
        batch_index: u64,
    ) -> (Array2<f32>, Array2<f32>) {
        let mut a_bg = Array2::zeros((n_rows, self.config.n_features));
        let x_bd = self.generate(n_rows, batch_index, Some(&mut a_bg));
        (x_bd, a_bg)
    }

    fn generate(
        &self,
        n_rows: usize,
        batch_index: u64,
        mut a_bg: Option<&mut Array2<f32>>,
    ) -> Array2<f32> {
        let mut rng = stream(self.config.seed, b"batches_", batch_index);
        let mut x_bd = Array2::zeros((n_rows, self.config.d_model));
        for (b, mut row) in x_bd.rows_mut().into_iter().enumerate() {
            for (g, &p) in self.p_g.iter().enumerate() {
                if rng.gen::<f64>() < p {
                    let a: f32 = rng.gen_range(MAGNITUDE);
                    row.scaled_add(a, &self.features_gd.row(g));
                    if let Some(a_bg) = a_bg.as_deref_mut() {
                        a_bg[(b, g)] = a;
                    }
                }
            }
            self.add_noise(&mut rng, row);
        }
        x_bd
    }

    fn add_noise(&self, rng: &mut ChaCha8Rng, row: ArrayViewMut1<'_, f32>) {
        if self.config.noise > 0.0 {
            for v in row {
                let n: f32 = StandardNormal.sample(rng);
                *v += self.config.noise * n;
            }
        }
    }
}

/// How well a decoder recovers known features.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Recovery {
    /// G, the number of true features scored.
    pub n_true_features: usize,
    /// Mean correlation coefficient: the mean |cosine| over the optimal one-to-one matching of
    /// true features to decoder rows (Hungarian algorithm), the figure SAELens' synthetic
    /// evaluations report. With fewer decoder rows than true features, the unmatched features
    /// count as 0.
    pub mcc: f32,
    /// Mean over true features of the best |cosine| with any decoder row (rows may be shared).
    pub mean_max_cosine: f32,
    /// Fraction of true features whose best |cosine| is at least 0.9.
    pub fraction_above_0_9: f32,
}

/// Scores decoder rows `w_dec_fd` (F×D) against true features `true_features_gd` (G×D): for
/// each true feature, the largest |cosine| with any decoder row (their mean and the fraction
/// that reach 0.9), and the optimal one-to-one matching's mean |cosine| (MCC). The matching
/// costs O(min(G,F)²·max(G,F)): seconds for G in the thousands and F = 16384. Zero rows count
/// as orthogonal to everything. Fails with [`crate::Error::Shape`] when the two have different
/// widths D, and with [`crate::Error::NonFinite`] when either holds NaN or ±Inf.
pub fn recovery(
    true_features_gd: ArrayView2<'_, f32>,
    w_dec_fd: ArrayView2<'_, f32>,
) -> Result<Recovery> {
    let d = true_features_gd.ncols();
    check_shape("w_dec_fd", w_dec_fd.shape(), &[w_dec_fd.nrows(), d])?;
    // A NaN cosine would never win the matching's comparisons and stall it.
    for (what, a) in [
        ("true_features_gd", true_features_gd.view()),
        ("w_dec_fd", w_dec_fd.view()),
    ] {
        if let Some(((row, column), _)) = a.indexed_iter().find(|(_, v)| !v.is_finite()) {
            return Err(crate::Error::NonFinite {
                what: format!("{what}, column {column},"),
                row,
            });
        }
    }
    // Norms in f64: squares of large float32 values overflow f32 and would zero the row.
    let unit = |a: ArrayView2<'_, f32>| {
        let mut a = a.to_owned();
        for mut row in a.rows_mut() {
            let norm = row
                .iter()
                .map(|&v| f64::from(v).powi(2))
                .sum::<f64>()
                .sqrt();
            if norm > 0.0 {
                row.mapv_inplace(|v| (f64::from(v) / norm) as f32);
            }
        }
        a
    };
    let cos_gf = unit(true_features_gd).dot(&unit(w_dec_fd).t());
    let best_g: Vec<f32> = cos_gf
        .rows()
        .into_iter()
        .map(|r| r.iter().fold(0.0f32, |m, c| m.max(c.abs())))
        .collect();
    if best_g.is_empty() {
        return Ok(Recovery {
            n_true_features: 0,
            mcc: 0.0,
            mean_max_cosine: 0.0,
            fraction_above_0_9: 0.0,
        });
    }
    let (g, f) = cos_gf.dim();
    // The matching wants rows ≤ columns: match decoder rows to features when F < G.
    let (abs_cos, rows, cols) = if g <= f {
        (
            cos_gf.iter().map(|c| c.abs() as f64).collect::<Vec<_>>(),
            g,
            f,
        )
    } else {
        (cos_gf.t().iter().map(|c| c.abs() as f64).collect(), f, g)
    };
    let matched: f64 = matching::max_weight_matching(&abs_cos, rows, cols)
        .expect("cosines of finite unit rows are finite")
        .iter()
        .enumerate()
        .map(|(r, &c)| abs_cos[r * cols + c])
        .sum();
    let n = best_g.len() as f32;
    Ok(Recovery {
        n_true_features: g,
        mcc: (matched / g as f64) as f32,
        mean_max_cosine: best_g.iter().sum::<f32>() / n,
        fraction_above_0_9: best_g.iter().filter(|&&c| c >= 0.9).count() as f32 / n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Architecture, Error, Sae, SaeConfig};

    fn small() -> SynthConfig {
        SynthConfig {
            d_model: 16,
            n_features: 48,
            mean_active: 3.0,
            ..SynthConfig::default()
        }
    }

    #[test]
    fn true_features_are_unit_and_seeded() {
        let a = Synth::new(small()).unwrap();
        for row in a.true_features().rows() {
            assert!((row.dot(&row) - 1.0).abs() < 1e-5);
        }
        let same = Synth::new(small()).unwrap();
        assert_eq!(a.true_features(), same.true_features());
        let other = Synth::new(SynthConfig { seed: 1, ..small() }).unwrap();
        assert_ne!(a.true_features(), other.true_features());
    }

    #[test]
    fn batches_are_deterministic_in_seed_and_index() {
        let synth = Synth::new(small()).unwrap();
        assert_eq!(synth.batch(16, 3), synth.batch(16, 3));
        assert_ne!(synth.batch(16, 3), synth.batch(16, 4));
        // Order does not matter: a fresh instance draws batch 3 without drawing 0-2.
        let fresh = Synth::new(small()).unwrap();
        assert_eq!(fresh.batch(16, 3), synth.batch(16, 3));
        let reseeded = Synth::new(SynthConfig { seed: 7, ..small() }).unwrap();
        assert_ne!(reseeded.batch(16, 3), synth.batch(16, 3));
        assert_eq!(synth.batch(0, 0).dim(), (0, 16));
    }

    #[test]
    fn rows_are_the_coefficients_times_the_features_plus_noise() {
        let cfg = small();
        let synth = Synth::new(cfg.clone()).unwrap();
        let (x_bd, a_bg) = synth.batch_with_coefficients(512, 2);
        assert_eq!(x_bd, synth.batch(512, 2));
        assert!(a_bg.iter().all(|&a| a == 0.0 || MAGNITUDE.contains(&a)));
        let residual = &x_bd - &a_bg.dot(&synth.true_features());
        let std = (residual.mapv(|r| r * r).mean().unwrap()).sqrt();
        assert!((std - cfg.noise).abs() < 0.1 * cfg.noise, "{std}");
        // Without noise the rows are exactly the combinations.
        let clean = Synth::new(SynthConfig { noise: 0.0, ..cfg }).unwrap();
        let (x_bd, a_bg) = clean.batch_with_coefficients(64, 0);
        let err = (&x_bd - &a_bg.dot(&clean.true_features())).mapv(f32::abs);
        assert!(err.iter().all(|&e| e < 1e-5));
    }

    #[test]
    fn firing_follows_the_power_law_and_mean_active() {
        let cfg = SynthConfig {
            power_law_exponent: 1.0,
            ..small()
        };
        let synth = Synth::new(cfg.clone()).unwrap();
        let p = synth.firing_probabilities();
        assert!((p.iter().sum::<f64>() - cfg.mean_active).abs() < 1e-9);
        assert!((p[0] / p[9] - 10.0).abs() < 1e-9);
        let n = 20_000;
        let (_, a_bg) = synth.batch_with_coefficients(n, 0);
        let fired_g = a_bg.map_axis(ndarray::Axis(0), |c| {
            c.iter().filter(|&&a| a > 0.0).count() as f64
        });
        let mean_active = fired_g.sum() / n as f64;
        assert!(
            (mean_active - cfg.mean_active).abs() < 0.05,
            "{mean_active}"
        );
        // Feature 0 fires ~10× as often as feature 9 (expected counts ~2200 vs ~220).
        let ratio = fired_g[0] / fired_g[9];
        assert!((7.0..14.0).contains(&ratio), "{ratio}");
        // Exponent 0: every feature equally often.
        let flat = Synth::new(SynthConfig {
            power_law_exponent: 0.0,
            ..small()
        })
        .unwrap();
        assert!(flat
            .firing_probabilities()
            .iter()
            .all(|&q| (q - 3.0 / 48.0).abs() < 1e-12));
    }

    #[test]
    fn recovery_scores_perfect_partial_and_random_decoders() {
        let synth = Synth::new(small()).unwrap();
        let f_gd = synth.true_features();
        let perfect = recovery(f_gd, f_gd).unwrap();
        assert!((perfect.mean_max_cosine - 1.0).abs() < 1e-5);
        assert_eq!(perfect.fraction_above_0_9, 1.0);
        // Scaled, negated and shuffled rows still count; extra rows do not hurt.
        let mut w_fd = f_gd.to_owned();
        w_fd.row_mut(0).mapv_inplace(|v| -3.0 * v);
        let w_fd = ndarray::concatenate(
            ndarray::Axis(0),
            &[
                w_fd.slice(ndarray::s![..;-1, ..]),
                f_gd.slice(ndarray::s![..4, ..]),
            ],
        )
        .unwrap();
        assert_eq!(recovery(f_gd, w_fd.view()).unwrap().fraction_above_0_9, 1.0);
        // Half the features: exactly half recovered.
        let half = recovery(f_gd, f_gd.slice(ndarray::s![..24, ..])).unwrap();
        assert_eq!(half.fraction_above_0_9, 0.5);
        assert!(
            half.mean_max_cosine > 0.5 && half.mean_max_cosine < 0.8,
            "{half:?}"
        );
        // Unrelated random directions recover nothing.
        let other = Synth::new(SynthConfig {
            seed: 99,
            ..small()
        })
        .unwrap();
        let random = recovery(f_gd, other.true_features()).unwrap();
        assert_eq!(random.fraction_above_0_9, 0.0, "{random:?}");
        // An all-zero decoder recovers nothing and does not divide by zero.
        let zero = recovery(f_gd, Array2::zeros((8, 16)).view()).unwrap();
        assert_eq!(zero.mean_max_cosine, 0.0);
        assert_eq!(zero.mcc, 0.0);
    }

    #[test]
    fn mcc_matches_each_decoder_row_to_one_feature() {
        let synth = Synth::new(small()).unwrap();
        let f_gd = synth.true_features();
        let perfect = recovery(f_gd, f_gd.slice(ndarray::s![..;-1, ..])).unwrap();
        assert!((perfect.mcc - 1.0).abs() < 1e-5, "{perfect:?}");
        // Every row a copy of feature 0: each feature's best row is perfect for feature 0
        // only, and one-to-one matching cannot reuse it.
        let mut copies = f_gd.to_owned();
        for mut row in copies.rows_mut() {
            row.assign(&f_gd.row(0));
        }
        let score = recovery(f_gd, copies.view()).unwrap();
        let g = f_gd.nrows() as f32;
        let others: f32 = (1..f_gd.nrows())
            .map(|i| f_gd.row(i).dot(&f_gd.row(0)).abs())
            .sum();
        assert!((score.mcc - (1.0 + others) / g).abs() < 1e-5, "{score:?}");
        // One decoder row halfway between two features is the best row of both, but only one
        // can have it; the other gets an orthogonal row.
        let s = std::f32::consts::FRAC_1_SQRT_2;
        let features = ndarray::array![[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]];
        let decoder = ndarray::array![[s, s, 0.0], [0.0, 0.0, 1.0]];
        let shared = recovery(features.view(), decoder.view()).unwrap();
        assert!((shared.mean_max_cosine - s).abs() < 1e-6, "{shared:?}");
        assert!((shared.mcc - s / 2.0).abs() < 1e-6, "{shared:?}");
        // Half the features as decoder rows (F < G): the other half count as 0.
        let half = recovery(f_gd, f_gd.slice(ndarray::s![..24, ..])).unwrap();
        assert!((half.mcc - 0.5).abs() < 1e-5, "{half:?}");
    }

    #[test]
    fn recovery_refuses_non_finite_inputs_at_once() {
        let synth = Synth::new(small()).unwrap();
        let good_gd = synth.true_features().to_owned();
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut bad_gd = good_gd.clone();
            bad_gd[[3, 5]] = bad;
            // In a thread, so that a matching that never ends fails the test instead of hanging.
            let (good, (tx, rx)) = (good_gd.clone(), std::sync::mpsc::channel());
            std::thread::spawn(move || {
                let _ = tx.send((
                    recovery(bad_gd.view(), good.view()),
                    recovery(good.view(), bad_gd.view()),
                ));
            });
            let (as_features, as_decoder) = rx
                .recv_timeout(std::time::Duration::from_secs(5))
                .expect("recovery returns at once");
            let err = as_features.unwrap_err();
            assert!(
                matches!(&err, Error::NonFinite { row: 3, what } if what.contains("column 5")),
                "{err}"
            );
            let err = as_decoder.unwrap_err();
            assert!(
                matches!(&err, Error::NonFinite { row: 3, what } if what.contains("w_dec_fd")),
                "{err}"
            );
        }
    }

    #[test]
    fn recovery_scores_rows_whose_squares_overflow_f32() {
        let synth = Synth::new(small()).unwrap();
        let huge = synth.true_features().mapv(|v| v * 1e30);
        let score = recovery(synth.true_features(), huge.view()).unwrap();
        assert!((score.mcc - 1.0).abs() < 1e-5, "{score:?}");
    }

    #[test]
    fn recovery_rejects_mismatched_widths() {
        let synth = Synth::new(small()).unwrap();
        let err = recovery(synth.true_features(), Array2::zeros((8, 15)).view()).unwrap_err();
        assert!(matches!(err, Error::Shape { .. }), "{err}");
    }

    #[test]
    fn an_sae_with_the_same_seed_does_not_start_at_the_true_features() {
        let cfg = SynthConfig::default();
        for seed in [0, 1, 42] {
            let synth = Synth::new(SynthConfig {
                seed,
                ..cfg.clone()
            })
            .unwrap();
            let sae = Sae::new(
                SaeConfig {
                    d_model: cfg.d_model,
                    dict_size: 4 * cfg.n_features,
                    arch: Architecture::TopK { k: 4 },
                },
                seed,
            )
            .unwrap();
            let score = recovery(synth.true_features(), sae.w_dec_fd()).unwrap();
            assert_eq!(score.fraction_above_0_9, 0.0, "seed {seed}: {score:?}");
        }
    }

    #[test]
    fn invalid_configs_are_rejected() {
        assert_eq!(
            SynthConfig {
                d_model: 0,
                ..small()
            }
            .validate(),
            Err(ConfigError::ZeroDModel)
        );
        for bad in [
            SynthConfig {
                n_features: 0,
                ..small()
            },
            SynthConfig {
                mean_active: -1.0,
                ..small()
            },
            SynthConfig {
                mean_active: f64::NAN,
                ..small()
            },
            SynthConfig {
                mean_active: 49.0,
                ..small()
            },
            SynthConfig {
                noise: f32::NAN,
                ..small()
            },
            SynthConfig {
                noise: -0.1,
                ..small()
            },
            SynthConfig {
                power_law_exponent: -1.0,
                ..small()
            },
        ] {
            assert!(
                matches!(bad.validate(), Err(ConfigError::Synth(_))),
                "{bad:?}"
            );
            assert!(
                matches!(Synth::new(bad.clone()), Err(Error::Config(_))),
                "{bad:?}"
            );
        }
    }
}
