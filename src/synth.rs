//! The built-in synthetic dataset: activations made of known sparse features in superposition,
//! so a run can be scored by how many of the true features its decoder recovers.

use ndarray::{Array2, ArrayView2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// Shape of the synthetic data. Defaults: D = 64, G = 256 true features (4× overcomplete),
/// 5 active per row on average with power-law frequencies, noise 0.01.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SynthConfig {
    /// D: width of each row.
    pub d_model: usize,
    /// G: number of true feature directions (G > D makes them superposed).
    pub n_features: usize,
    /// Expected number of active features per row.
    pub mean_active: f64,
    /// Feature i fires with probability ∝ (i + 1)^(−exponent).
    pub power_law_exponent: f64,
    /// Standard deviation of the Gaussian noise added to every entry.
    pub noise: f32,
    /// Seed of the feature directions and of every batch.
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
    /// Checks every field.
    pub fn validate(&self) -> Result<(), ConfigError> {
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

/// A synthetic dataset: true features and a deterministic stream of batches.
#[derive(Clone, Debug)]
pub struct Synth {
    config: SynthConfig,
    features_gd: Array2<f32>,
    /// Firing probability of each feature.
    p_g: Vec<f64>,
}

impl Synth {
    /// Draws the true feature directions (unit vectors) from `config.seed`.
    pub fn new(config: SynthConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let (g, d) = (config.n_features, config.d_model);
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let mut features_gd: Array2<f32> =
            Array2::from_shape_simple_fn((g, d), || StandardNormal.sample(&mut rng));
        for mut row in features_gd.rows_mut() {
            let norm = row.dot(&row).sqrt();
            row /= norm;
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

    /// The true feature directions, G×D, unit rows.
    pub fn true_features(&self) -> ArrayView2<'_, f32> {
        self.features_gd.view()
    }

    /// Batch number `index`: `n_rows` rows, each Σ_i a_i·feature_i + noise with a_i ~ U(0.5, 1.5)
    /// for the features that fire. The same (seed, index) always gives the same batch.
    pub fn batch(&self, n_rows: usize, index: u64) -> Array2<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed ^ 0x5EED_0000_0000);
        rng.set_stream(index + 1);
        let mut x = Array2::zeros((n_rows, self.config.d_model));
        for mut row in x.rows_mut() {
            for (g, &p) in self.p_g.iter().enumerate() {
                if rng.gen::<f64>() < p {
                    let a: f32 = rng.gen_range(0.5..1.5);
                    row.scaled_add(a, &self.features_gd.row(g));
                }
            }
            if self.config.noise > 0.0 {
                for v in row.iter_mut() {
                    let n: f32 = StandardNormal.sample(&mut rng);
                    *v += self.config.noise * n;
                }
            }
        }
        x
    }
}

/// How well a decoder recovers known features.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Recovery {
    /// Mean over true features of the best |cosine| with any decoder row.
    pub mean_max_cosine: f32,
    /// Fraction of true features whose best |cosine| is at least 0.9.
    pub fraction_recovered: f32,
}

/// Scores decoder rows `w_dec_fd` against true features `features_gd` (both row-per-vector).
pub fn recovery(features_gd: ArrayView2<'_, f32>, w_dec_fd: ArrayView2<'_, f32>) -> Recovery {
    let unit = |a: ArrayView2<'_, f32>| {
        let mut a = a.to_owned();
        for mut row in a.rows_mut() {
            let norm = row.dot(&row).sqrt().max(1e-12);
            row /= norm;
        }
        a
    };
    let cos_gf = unit(features_gd).dot(&unit(w_dec_fd).t());
    let best: Vec<f32> = cos_gf
        .rows()
        .into_iter()
        .map(|r| r.iter().fold(0.0f32, |m, c| m.max(c.abs())))
        .collect();
    let n = best.len().max(1) as f32;
    Recovery {
        mean_max_cosine: best.iter().sum::<f32>() / n,
        fraction_recovered: best.iter().filter(|&&c| c >= 0.9).count() as f32 / n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_deterministic_and_sparse_in_features() {
        let synth = Synth::new(SynthConfig::default()).unwrap();
        assert_eq!(synth.batch(16, 3), synth.batch(16, 3));
        assert_ne!(synth.batch(16, 3), synth.batch(16, 4));
        // Norms: about √(mean_active) features of norm ~1 each, far from 0 and bounded.
        let x = synth.batch(2000, 0);
        let mean_norm: f32 = x.rows().into_iter().map(|r| r.dot(&r).sqrt()).sum::<f32>() / 2000.0;
        assert!(mean_norm > 1.0 && mean_norm < 4.0, "{mean_norm}");
    }

    #[test]
    fn recovery_scores_the_features_themselves_as_perfect() {
        let synth = Synth::new(SynthConfig::default()).unwrap();
        let f = synth.true_features();
        let perfect = recovery(f, f);
        assert!((perfect.mean_max_cosine - 1.0).abs() < 1e-5);
        assert_eq!(perfect.fraction_recovered, 1.0);
        // A decoder of unrelated random directions recovers nothing.
        let other = Synth::new(SynthConfig {
            seed: 99,
            ..SynthConfig::default()
        })
        .unwrap();
        let random = recovery(f, other.true_features());
        assert!(random.fraction_recovered < 0.05, "{random:?}");
    }

    #[test]
    fn invalid_configs_are_rejected() {
        for bad in [
            SynthConfig {
                n_features: 0,
                ..SynthConfig::default()
            },
            SynthConfig {
                mean_active: -1.0,
                ..SynthConfig::default()
            },
            SynthConfig {
                mean_active: 1000.0,
                ..SynthConfig::default()
            },
            SynthConfig {
                noise: f32::NAN,
                ..SynthConfig::default()
            },
            SynthConfig {
                power_law_exponent: -1.0,
                ..SynthConfig::default()
            },
        ] {
            assert!(
                matches!(bad.validate(), Err(ConfigError::Synth(_))),
                "{bad:?}"
            );
        }
    }
}
