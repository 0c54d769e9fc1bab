//! The built-in synthetic dataset: activations made of known sparse features in superposition,
//! so a run can be scored by how many of the true features its decoder recovers.
//!
//! G unit feature directions live in D < G dimensions. Each row is a sparse non-negative
//! combination of a few of them, Σ_g a_g·feature_g, plus Gaussian noise: feature g fires
//! independently with a probability that falls as a power law in g, and when it fires its
//! magnitude a_g is drawn from U(0.5, 1.5). A good SAE trained on these rows learns decoder rows
//! that point along the true features; [`recovery`] measures how many it found, and [`score`]
//! adds how well the matched latents fire with their features (F1, precision, recall).
//!
//! That default set is solved (every architecture recovers ~99%). [`SynthConfig::hard`]
//! (`--preset hard`) adds what makes real activations hard: thousands of features overlapping
//! through a shared subspace, Zipf frequencies down to ~1e-3, parents whose children fire only
//! with them and exclude each other, latent factors that make groups of features co-occur, and
//! folded-normal magnitudes. Its rows are streamed like the default's: each batch is generated
//! on demand in time proportional to the features that fire, never stored whole.
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

use ndarray::{Array2, ArrayView2, ArrayViewMut1, Axis};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::config::ConfigError;
use crate::error::{check_shape, Result};

mod firing;
mod matching;
mod sampler;

pub use firing::{firing, firing_by_feature, score, FeatureFiring, Firing};

/// A named starting point for [`SynthConfig`]: `sae synth --preset`, `sae train
/// --synth-preset` and `preset = "…"` in a `[synthetic]` table pick one, and every field given
/// beside it overrides the preset's value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SynthPreset {
    /// 256 independent features in 64 dimensions ([`SynthConfig::default`]): quick, and
    /// solved (every architecture recovers ~99% of its features).
    #[default]
    Default,
    /// 4096 overlapping features in 256 dimensions with a hierarchy, correlated firing and
    /// spread magnitudes ([`SynthConfig::hard`]): built to be as hard as real activations.
    Hard,
}

impl SynthPreset {
    /// Every preset, in the order `--help` lists them.
    pub const ALL: [SynthPreset; 2] = [SynthPreset::Default, SynthPreset::Hard];

    /// The preset's configuration.
    pub fn config(self) -> SynthConfig {
        match self {
            SynthPreset::Default => SynthConfig::default(),
            SynthPreset::Hard => SynthConfig::hard(),
        }
    }

    /// The name files and flags spell.
    pub fn as_str(self) -> &'static str {
        match self {
            SynthPreset::Default => "default",
            SynthPreset::Hard => "hard",
        }
    }

    /// One line for `--help`.
    pub fn description(self) -> &'static str {
        match self {
            SynthPreset::Default => "256 independent features in 64 dimensions (solved)",
            SynthPreset::Hard => {
                "4096 overlapping, hierarchical, correlated features in 256 dimensions"
            }
        }
    }
}

impl std::str::FromStr for SynthPreset {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        SynthPreset::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown preset `{s}`; use default or hard"))
    }
}

/// How large a firing feature's coefficient is.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Magnitude {
    /// U(low, high): the default set's U(0.5, 1.5), narrow and bounded away from 0.
    Uniform {
        /// Smallest magnitude (≥ 0).
        low: f32,
        /// Largest magnitude (> low).
        high: f32,
    },
    /// |N(mean, std)|: a long upper tail and some near-zero coefficients that an SAE can
    /// barely tell from noise, as real feature activations have.
    FoldedNormal {
        /// Mean of the normal before folding.
        mean: f32,
        /// Its standard deviation (> 0).
        std: f32,
    },
}

/// Shape of the synthetic data.
///
/// The defaults (D = 64, G = 256 true features, 4× overcomplete, 5 active per row on average
/// with power-law exponent 0.5, noise 0.01) are what `sae train` uses when given no data. They
/// switch every structure below off, and their rows are the same, bit for bit, as before the
/// structure existed: the overlap, hierarchy, correlation and magnitude fields all default to
/// "off" (and deserialise so when absent), so a `[synthetic]` table written before them still
/// describes the same data.
///
/// With a hierarchy or latent factors the rows come from a sampler that costs
/// O(active features × D + blocks) per row instead of O(G) (see [`SynthConfig::hard`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "SynthTable")]
pub struct SynthConfig {
    /// The preset the other fields started from (recorded so a written config says which). It
    /// changes no row; `sae train` takes its default SAE size from it.
    pub preset: SynthPreset,
    /// D: width of each row.
    pub d_model: usize,
    /// G: number of true feature directions (G > D makes them superposed).
    pub n_features: usize,
    /// Expected number of active features per row, children included (before capping any
    /// probability at 1, and before the latent factors' modulation, which keeps the mean up to
    /// that cap).
    pub mean_active: f64,
    /// Root feature r (0-based, in index order) fires with probability ∝ (r + 1)^(−exponent);
    /// 0 gives every root the same frequency. Without a hierarchy every feature is a root.
    pub power_law_exponent: f64,
    /// Standard deviation of the Gaussian noise added to every entry.
    pub noise: f32,
    /// Seed of the feature directions and of every batch. Streams are kept apart from the
    /// SAE's own initialisation, so the same seed may be used for both.
    pub seed: u64,
    /// Overlap: every direction is mixed with a component drawn from one shared subspace of
    /// this dimension, so pairs of features overlap more than random directions do (0: off,
    /// the default; at most D).
    pub shared_rank: usize,
    /// Weight ρ ∈ [0, 1) of the shared component: feature = normalise(√(1−ρ)·own + √ρ·shared),
    /// both parts unit vectors, so two features' cosine gains ≈ ρ·(cosine of their shared
    /// parts), whose spread is 1/√shared_rank (0: off, the default).
    pub shared_weight: f64,
    /// Hierarchy: how many root features are parents (0: none, the default). Parents are
    /// spread evenly over the roots' frequency ranks.
    pub n_parents: usize,
    /// Children of each parent. A child fires only in a row where its parent fires, and at
    /// most one child of a parent fires in a row (siblings exclude each other). Children take
    /// the last n_parents × children_per_parent feature indices, parent by parent.
    pub children_per_parent: usize,
    /// Probability that one of a parent's children fires when the parent does (the child
    /// chosen uniformly), in (0, 1].
    pub child_probability: f64,
    /// Cosine s ∈ [0, 1) of each child with its parent: child = s·parent + √(1−s²)·own part
    /// orthogonal to the parent, as in feature-absorption studies (siblings then overlap by
    /// about s²).
    pub child_similarity: f64,
    /// Low-rank correlation: latent Gaussian factors, one per group of roots (root r in
    /// group r mod n_factors); each row draws z ~ N(0, I) and multiplies the firing
    /// probabilities of group k by exp(σ·z_k − σ²/2), mean 1, so features of a group fire
    /// together (0: independent firing, the default).
    pub n_factors: usize,
    /// σ of the factors' log-normal modulation (0 with no factors).
    pub factor_strength: f64,
    /// Distribution of a firing feature's coefficient (default U(0.5, 1.5)).
    pub magnitude: Magnitude,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            preset: SynthPreset::Default,
            d_model: 64,
            n_features: 256,
            mean_active: 5.0,
            power_law_exponent: 0.5,
            noise: 0.01,
            seed: 0,
            shared_rank: 0,
            shared_weight: 0.0,
            n_parents: 0,
            children_per_parent: 0,
            child_probability: 1.0,
            child_similarity: 0.0,
            n_factors: 0,
            factor_strength: 0.0,
            magnitude: Magnitude::Uniform {
                low: 0.5,
                high: 1.5,
            },
        }
    }
}

/// A `[synthetic]` table as written: a preset and any fields that override it.
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct SynthTable {
    preset: SynthPreset,
    d_model: Option<usize>,
    n_features: Option<usize>,
    mean_active: Option<f64>,
    power_law_exponent: Option<f64>,
    noise: Option<f32>,
    seed: Option<u64>,
    shared_rank: Option<usize>,
    shared_weight: Option<f64>,
    n_parents: Option<usize>,
    children_per_parent: Option<usize>,
    child_probability: Option<f64>,
    child_similarity: Option<f64>,
    n_factors: Option<usize>,
    factor_strength: Option<f64>,
    magnitude: Option<Magnitude>,
}

impl From<SynthTable> for SynthConfig {
    fn from(t: SynthTable) -> Self {
        let base = t.preset.config();
        SynthConfig {
            preset: t.preset,
            d_model: t.d_model.unwrap_or(base.d_model),
            n_features: t.n_features.unwrap_or(base.n_features),
            mean_active: t.mean_active.unwrap_or(base.mean_active),
            power_law_exponent: t.power_law_exponent.unwrap_or(base.power_law_exponent),
            noise: t.noise.unwrap_or(base.noise),
            seed: t.seed.unwrap_or(base.seed),
            shared_rank: t.shared_rank.unwrap_or(base.shared_rank),
            shared_weight: t.shared_weight.unwrap_or(base.shared_weight),
            n_parents: t.n_parents.unwrap_or(base.n_parents),
            children_per_parent: t.children_per_parent.unwrap_or(base.children_per_parent),
            child_probability: t.child_probability.unwrap_or(base.child_probability),
            child_similarity: t.child_similarity.unwrap_or(base.child_similarity),
            n_factors: t.n_factors.unwrap_or(base.n_factors),
            factor_strength: t.factor_strength.unwrap_or(base.factor_strength),
            magnitude: t.magnitude.unwrap_or(base.magnitude),
        }
    }
}

impl SynthConfig {
    /// The hard preset, modelled on what makes real activations hard to decompose:
    ///
    /// - G = 4096 features in D = 256: 16× more features than dimensions, where random
    ///   directions already overlap by |cos| ≈ 0.05 on average; a shared rank-16 component of
    ///   weight 0.2 adds correlated overlap on top.
    /// - Zipf frequencies: 1024 roots with exponent 0.5, scaled so a row holds 25 active
    ///   features on average (the L0 of SAEs on language models); children divide their
    ///   parent's frequency, so marginal frequencies run from ≈ 0.34 down to ≈ 7e-4.
    /// - A hierarchy: 384 parents with 8 children each (3072 children, the rest of the 4096),
    ///   one child firing with half of its parent's firings, at cosine 0.5 with the parent.
    /// - Low-rank correlation: 16 latent factors of strength 0.5 (a factor at +1σ raises its
    ///   group's firing by 1.45×, at −1σ lowers it to 0.53×).
    /// - Folded-normal magnitudes |N(1, 0.5)| and noise of standard deviation 0.02 (a tenth of
    ///   a coefficient's spread).
    ///
    /// `sae train --synth-preset hard` sizes its SAE to match: F = G = 4096 latents and
    /// k = 32, the power of two above the mean L0.
    pub fn hard() -> Self {
        SynthConfig {
            preset: SynthPreset::Hard,
            d_model: 256,
            n_features: 4096,
            mean_active: 25.0,
            power_law_exponent: 0.5,
            noise: 0.02,
            seed: 0,
            shared_rank: 16,
            shared_weight: 0.2,
            n_parents: 384,
            children_per_parent: 8,
            child_probability: 0.5,
            child_similarity: 0.5,
            n_factors: 16,
            factor_strength: 0.5,
            magnitude: Magnitude::FoldedNormal {
                mean: 1.0,
                std: 0.5,
            },
        }
    }

    /// The number of children, n_parents × children_per_parent (checked by `validate`).
    pub fn n_children(&self) -> usize {
        self.n_parents.saturating_mul(self.children_per_parent)
    }

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
        // The G×D feature matrix must be addressable; whether it fits in memory is
        // crate::memory's check. Indices are u32 in the sparse ground truth.
        let fits = self
            .n_features
            .checked_mul(self.d_model)
            .and_then(|n| n.checked_mul(std::mem::size_of::<f32>()))
            .is_some_and(|bytes| bytes <= isize::MAX as usize);
        if !fits || self.n_features > u32::MAX as usize {
            return Err(ConfigError::Synth(
                "n_features × d_model is too large to address; lower them",
            ));
        }
        if !(self.shared_weight.is_finite() && (0.0..1.0).contains(&self.shared_weight)) {
            return Err(ConfigError::Synth("shared_weight must lie in [0, 1)"));
        }
        if self.shared_rank > self.d_model {
            return Err(ConfigError::Synth("shared_rank must not exceed d_model"));
        }
        if self.shared_weight > 0.0 && self.shared_rank == 0 {
            return Err(ConfigError::Synth(
                "shared_weight > 0 needs a shared_rank of at least 1",
            ));
        }
        if self.n_parents > 0 && self.children_per_parent == 0 {
            return Err(ConfigError::Synth(
                "children_per_parent must be at least 1 when n_parents > 0",
            ));
        }
        // Every parent is a root, so the roots (features that are not children) must number
        // at least n_parents.
        let roots = self
            .n_parents
            .checked_mul(self.children_per_parent)
            .and_then(|children| self.n_features.checked_sub(children));
        if roots.is_none_or(|roots| roots < self.n_parents.max(1)) {
            return Err(ConfigError::Synth(
                "n_parents × (children_per_parent + 1) must not exceed n_features",
            ));
        }
        if !(self.child_probability > 0.0 && self.child_probability <= 1.0) {
            return Err(ConfigError::Synth("child_probability must lie in (0, 1]"));
        }
        if !(self.child_similarity.is_finite() && (0.0..1.0).contains(&self.child_similarity)) {
            return Err(ConfigError::Synth("child_similarity must lie in [0, 1)"));
        }
        // exp(σ·z) for |z| up to ~6 must stay finite and meaningful.
        if !(self.factor_strength.is_finite() && (0.0..=4.0).contains(&self.factor_strength)) {
            return Err(ConfigError::Synth("factor_strength must lie in [0, 4]"));
        }
        if self.factor_strength > 0.0 && self.n_factors == 0 {
            return Err(ConfigError::Synth(
                "factor_strength > 0 needs n_factors of at least 1",
            ));
        }
        if self.n_factors > roots.unwrap_or(0) {
            return Err(ConfigError::Synth(
                "n_factors must not exceed the roots (n_features minus the children)",
            ));
        }
        match self.magnitude {
            Magnitude::Uniform { low, high } => {
                if !(low.is_finite() && high.is_finite() && low >= 0.0 && low < high) {
                    return Err(ConfigError::Synth(
                        "magnitude: uniform needs finite 0 <= low < high",
                    ));
                }
            }
            Magnitude::FoldedNormal { mean, std } => {
                if !(mean.is_finite() && std.is_finite() && std > 0.0) {
                    return Err(ConfigError::Synth(
                        "magnitude: folded_normal needs a finite mean and a finite std > 0",
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether rows come from the structured sampler (a hierarchy or latent factors) rather
    /// than the original loop over every feature.
    fn structured(&self) -> bool {
        self.n_parents > 0 || self.n_factors > 0
    }
}

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

/// Row `row` of batch `batch_index` of the structured sampler: a stream of its own, so rows
/// are drawn in parallel and each is the same whatever the batch's size. The batch index sits
/// in the key's last bytes, which [`stream`] leaves zero, so no two streams coincide.
fn row_stream(seed: u64, batch_index: u64, row: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(b"rows____");
    key[16..24].copy_from_slice(b"sae-synt");
    key[24..].copy_from_slice(&batch_index.to_le_bytes());
    let mut rng = ChaCha8Rng::from_seed(key);
    rng.set_stream(row);
    rng
}

/// The ground truth of a batch, sparse (compressed rows): which features fired in each row
/// and with what magnitude. O(rows × active features), where the dense rows×G form of
/// [`Synth::batch_with_coefficients`] would not fit at G in the thousands.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ActiveFeatures {
    /// Row offsets into `features`/`magnitudes`; length rows + 1.
    pub indptr: Vec<usize>,
    /// Index g of each firing feature, ascending within a row.
    pub features: Vec<u32>,
    /// Its coefficient a_g (> 0 but for a folded normal's rare exact zero).
    pub magnitudes: Vec<f32>,
}

impl ActiveFeatures {
    fn new() -> Self {
        ActiveFeatures {
            indptr: vec![0],
            ..ActiveFeatures::default()
        }
    }

    /// Rows held.
    pub fn n_rows(&self) -> usize {
        self.indptr.len().saturating_sub(1)
    }

    /// The features firing in row `b` and their magnitudes.
    pub fn row(&self, b: usize) -> (&[u32], &[f32]) {
        let range = self.indptr[b]..self.indptr[b + 1];
        (&self.features[range.clone()], &self.magnitudes[range])
    }

    /// Mean number of firing features per row (the set's L0); 0 with no rows.
    pub fn mean_l0(&self) -> f64 {
        self.features.len() as f64 / self.n_rows().max(1) as f64
    }

    /// The dense rows×G coefficients, zero where a feature did not fire.
    pub fn to_dense(&self, n_features: usize) -> Array2<f32> {
        let mut a_bg = Array2::zeros((self.n_rows(), n_features));
        for b in 0..self.n_rows() {
            let (features, magnitudes) = self.row(b);
            for (&g, &a) in features.iter().zip(magnitudes) {
                a_bg[(b, g as usize)] = a;
            }
        }
        a_bg
    }
}

/// A synthetic dataset: its true features and a deterministic stream of batches.
#[derive(Clone, Debug)]
pub struct Synth {
    config: SynthConfig,
    /// G×D, unit rows.
    features_gd: Array2<f32>,
    /// Marginal firing probability of each feature.
    p_g: Vec<f64>,
    /// The structured sampler, for a hierarchy or latent factors.
    sampler: Option<sampler::Sampler>,
}

impl Synth {
    /// Validates `config` and draws the true feature directions from its seed: Gaussian,
    /// normalised to unit length, then mixed with the shared component and bent towards their
    /// parents where the config asks for it.
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
        sampler::shape_directions(&config, &mut features_gd);
        let (p_g, sampler) = if config.structured() {
            let sampler = sampler::Sampler::new(&config);
            (sampler.marginals(), Some(sampler))
        } else {
            let weights: Vec<f64> = (0..g)
                .map(|i| ((i + 1) as f64).powf(-config.power_law_exponent))
                .collect();
            let total: f64 = weights.iter().sum();
            let p_g = weights
                .iter()
                .map(|w| (w / total * config.mean_active).min(1.0))
                .collect();
            (p_g, None)
        };
        Ok(Synth {
            config,
            features_gd,
            p_g,
            sampler,
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

    /// The marginal probability that each feature fires in a row (G values; they sum to
    /// `mean_active` unless some were capped at 1). A child's is its parent's times
    /// child_probability / children_per_parent; the latent factors keep these means (up to
    /// the cap at 1 of a modulated probability).
    pub fn firing_probabilities(&self) -> &[f64] {
        &self.p_g
    }

    /// The parent of feature `g` in the hierarchy, if it is a child.
    pub fn parent(&self, g: usize) -> Option<usize> {
        self.sampler.as_ref().and_then(|s| s.parent(g))
    }

    /// Batch number `batch_index`: `n_rows`×D rows, each Σ_g a_g·feature_g over the features
    /// that fire, plus noise. The same (seed, batch index) always gives the same batch, and
    /// batches can be drawn in any order.
    pub fn batch(&self, n_rows: usize, batch_index: u64) -> Array2<f32> {
        self.generate(n_rows, batch_index, None)
    }

    /// [`Synth::batch`] together with its ground truth: the magnitudes a, `n_rows`×G, zero
    /// where a feature did not fire. The rows are exactly those of `batch(n_rows, batch_index)`.
    /// Dense: for large G use [`Synth::batch_with_active`].
    pub fn batch_with_coefficients(
        &self,
        n_rows: usize,
        batch_index: u64,
    ) -> (Array2<f32>, Array2<f32>) {
        let (x_bd, active) = self.batch_with_active(n_rows, batch_index);
        (x_bd, active.to_dense(self.config.n_features))
    }

    /// [`Synth::batch`] together with its ground truth in sparse form.
    pub fn batch_with_active(
        &self,
        n_rows: usize,
        batch_index: u64,
    ) -> (Array2<f32>, ActiveFeatures) {
        let mut active = ActiveFeatures::new();
        let x_bd = self.generate(n_rows, batch_index, Some(&mut active));
        (x_bd, active)
    }

    /// Mean and largest |cosine| over all pairs of distinct true features. O(G²·D): about a
    /// second at G = 4096, D = 256 in a release build.
    pub fn overlap(&self) -> Overlap {
        overlap(self.features_gd.view())
    }

    fn generate(
        &self,
        n_rows: usize,
        batch_index: u64,
        active: Option<&mut ActiveFeatures>,
    ) -> Array2<f32> {
        match &self.sampler {
            Some(sampler) => self.generate_structured(sampler, n_rows, batch_index, active),
            None => self.generate_independent(n_rows, batch_index, active),
        }
    }

    /// The original generator, one Bernoulli draw per feature per row from one stream per
    /// batch: O(G) per row, kept as it was so the default set's rows never change.
    fn generate_independent(
        &self,
        n_rows: usize,
        batch_index: u64,
        mut active: Option<&mut ActiveFeatures>,
    ) -> Array2<f32> {
        let mut rng = stream(self.config.seed, b"batches_", batch_index);
        let mut x_bd = Array2::zeros((n_rows, self.config.d_model));
        for mut row in x_bd.rows_mut() {
            for (g, &p) in self.p_g.iter().enumerate() {
                if rng.gen::<f64>() < p {
                    let a = self.magnitude(&mut rng);
                    row.scaled_add(a, &self.features_gd.row(g));
                    if let Some(active) = active.as_deref_mut() {
                        active.features.push(g as u32);
                        active.magnitudes.push(a);
                    }
                }
            }
            self.add_noise(&mut rng, row);
            if let Some(active) = active.as_deref_mut() {
                active.indptr.push(active.features.len());
            }
        }
        x_bd
    }

    /// Rows from the structured sampler, in parallel, each from its own stream: O(active
    /// features × D + blocks) per row.
    fn generate_structured(
        &self,
        sampler: &sampler::Sampler,
        n_rows: usize,
        batch_index: u64,
        active: Option<&mut ActiveFeatures>,
    ) -> Array2<f32> {
        let mut x_bd = Array2::zeros((n_rows, self.config.d_model));
        let fired_rows: Vec<(Vec<u32>, Vec<f32>)> = x_bd
            .axis_iter_mut(Axis(0))
            .into_par_iter()
            .enumerate()
            .map(|(b, mut row)| {
                let mut rng = row_stream(self.config.seed, batch_index, b as u64);
                let mut fired = Vec::new();
                sampler.sample_row(&mut rng, &mut fired);
                fired.sort_unstable();
                let magnitudes: Vec<f32> = fired
                    .iter()
                    .map(|&g| {
                        let a = self.magnitude(&mut rng);
                        row.scaled_add(a, &self.features_gd.row(g as usize));
                        a
                    })
                    .collect();
                self.add_noise(&mut rng, row);
                (fired, magnitudes)
            })
            .collect();
        if let Some(active) = active {
            for (features, magnitudes) in fired_rows {
                active.features.extend(features);
                active.magnitudes.extend(magnitudes);
                active.indptr.push(active.features.len());
            }
        }
        x_bd
    }

    fn magnitude(&self, rng: &mut ChaCha8Rng) -> f32 {
        match self.config.magnitude {
            Magnitude::Uniform { low, high } => rng.gen_range(low..high),
            Magnitude::FoldedNormal { mean, std } => {
                let n: f32 = StandardNormal.sample(rng);
                (mean + std * n).abs()
            }
        }
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

/// How much true features overlap.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Overlap {
    /// Mean |cosine| over pairs of distinct features (≈ √(2/(πD)) for random directions).
    pub mean_abs_cos: f32,
    /// Largest |cosine| of any pair.
    pub max_abs_cos: f32,
}

/// Mean and largest |cosine| over pairs of distinct rows of `features_gd`, whose rows are
/// taken to be unit vectors; blocks of rows at a time, so memory stays O(G).
pub fn overlap(features_gd: ArrayView2<'_, f32>) -> Overlap {
    const BLOCK: usize = 256;
    let g = features_gd.nrows();
    let (mut sum, mut max, mut pairs) = (0.0f64, 0.0f32, 0u64);
    for start in (0..g).step_by(BLOCK) {
        let end = (start + BLOCK).min(g);
        // Only the columns after each row: every pair once, never a feature with itself.
        let cos_bg = features_gd
            .slice(ndarray::s![start..end, ..])
            .dot(&features_gd.slice(ndarray::s![start.., ..]).t());
        for (i, row) in cos_bg.rows().into_iter().enumerate() {
            for &c in row.iter().skip(i + 1) {
                sum += f64::from(c.abs());
                max = max.max(c.abs());
                pairs += 1;
            }
        }
    }
    Overlap {
        mean_abs_cos: (sum / pairs.max(1) as f64) as f32,
        max_abs_cos: max,
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
    /// How the matched latents fire against their features, where rows with known
    /// coefficients were scored ([`score`]); `None` from [`recovery`], which sees only the
    /// decoder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub firing: Option<Firing>,
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
    recovery_with_matching(true_features_gd, w_dec_fd).map(|(score, _)| score)
}

/// [`recovery`] and its optimal matching: the decoder row matched to each true feature
/// (`None` for the features left over when F < G), as [`firing`] takes it.
pub fn recovery_with_matching(
    true_features_gd: ArrayView2<'_, f32>,
    w_dec_fd: ArrayView2<'_, f32>,
) -> Result<(Recovery, Vec<Option<usize>>)> {
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
        let none = Recovery {
            n_true_features: 0,
            mcc: 0.0,
            mean_max_cosine: 0.0,
            fraction_above_0_9: 0.0,
            firing: None,
        };
        return Ok((none, Vec::new()));
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
    let assignment = matching::max_weight_matching(&abs_cos, rows, cols)
        .expect("cosines of finite unit rows are finite");
    let matched: f64 = assignment
        .iter()
        .enumerate()
        .map(|(r, &c)| abs_cos[r * cols + c])
        .sum();
    let mut latent_of_g = vec![None; g];
    for (r, &c) in assignment.iter().enumerate() {
        let (feature, latent) = if g <= f { (r, c) } else { (c, r) };
        latent_of_g[feature] = Some(latent);
    }
    let n = best_g.len() as f32;
    let score = Recovery {
        n_true_features: g,
        mcc: (matched / g as f64) as f32,
        mean_max_cosine: best_g.iter().sum::<f32>() / n,
        fraction_above_0_9: best_g.iter().filter(|&&c| c >= 0.9).count() as f32 / n,
        firing: None,
    };
    Ok((score, latent_of_g))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Architecture, Codes, Error, Sae, SaeConfig};

    fn small() -> SynthConfig {
        SynthConfig {
            d_model: 16,
            n_features: 48,
            mean_active: 3.0,
            ..SynthConfig::default()
        }
    }

    /// A small structured set: every new mechanism on, small enough for debug builds.
    fn structured() -> SynthConfig {
        SynthConfig {
            d_model: 32,
            n_features: 256,
            mean_active: 8.0,
            n_parents: 16,
            children_per_parent: 4,
            child_probability: 0.8,
            child_similarity: 0.5,
            shared_rank: 4,
            shared_weight: 0.3,
            n_factors: 4,
            factor_strength: 0.5,
            magnitude: Magnitude::FoldedNormal {
                mean: 1.0,
                std: 0.5,
            },
            ..SynthConfig::default()
        }
    }

    fn fingerprint<'a>(values: impl IntoIterator<Item = &'a f32>) -> u64 {
        values
            .into_iter()
            .fold(0u64, |h, v| h.rotate_left(5) ^ u64::from(v.to_bits()))
    }

    #[test]
    // The pins are the default build's: with OpenBLAS, ndarray's dot (the features' norms) is
    // BLAS's, whose rounding differs in the last bit.
    #[cfg_attr(
        feature = "openblas",
        ignore = "pinned with the default build's dot; OpenBLAS rounds the norms differently"
    )]
    fn the_default_set_is_bit_identical_to_before_the_structured_sampler() {
        // Pinned from the generator before the hierarchy, factors, overlap and magnitude
        // fields existed: the default set's features, rows and coefficients must not move.
        let synth = Synth::new(SynthConfig::default()).unwrap();
        let (x_bd, a_bg) = synth.batch_with_coefficients(64, 5);
        assert_eq!(fingerprint(synth.true_features()), 0x2fb353b13d03faa0);
        assert_eq!(fingerprint(&x_bd), 0x92c47bd5c28b4572);
        assert_eq!(fingerprint(&a_bg), 0xd8fca5528dfd327a);
        assert_eq!(SynthPreset::Default.config(), SynthConfig::default());
    }

    #[test]
    fn the_hard_preset_has_the_advertised_statistics() {
        let synth = Synth::new(SynthConfig::hard()).unwrap();
        let cfg = synth.config();
        assert_eq!((cfg.n_features, cfg.d_model), (4096, 256));
        let p = synth.firing_probabilities();
        assert!((p.iter().sum::<f64>() - 25.0).abs() < 1e-9);
        let (max, min) = (
            p.iter().cloned().fold(0.0, f64::max),
            p.iter().cloned().fold(1.0, f64::min),
        );
        assert!((0.3..0.45).contains(&max), "{max}");
        assert!((3e-4..1e-3).contains(&min), "{min}");
        // Measured L0 over 4096 rows: the factors' cap at 1 may cost a little of the mean.
        let (_, active) = synth.batch_with_active(4096, 0);
        let l0 = active.mean_l0();
        assert!((24.0..25.5).contains(&l0), "{l0}");
        // The most frequent root fires at its probability (≈ 1400 of 4096 rows).
        let fired_0 = active.features.iter().filter(|&&g| g == 0).count() as f64 / 4096.0;
        assert!((fired_0 - p[0]).abs() < 0.05, "{fired_0} vs {}", p[0]);
        // Children sit at cosine child_similarity with their parent.
        let f_gd = synth.true_features();
        for g in [1024, 2000, 4095] {
            let parent = synth.parent(g).unwrap();
            let cos = f_gd.row(g).dot(&f_gd.row(parent));
            assert!((cos - 0.5).abs() < 1e-4, "{g}: {cos}");
        }
        assert_eq!(synth.parent(1023), None);
    }

    #[test]
    fn children_fire_only_with_their_parent_and_never_with_a_sibling() {
        for cfg in [structured(), SynthConfig::hard()] {
            let synth = Synth::new(cfg.clone()).unwrap();
            let (_, active) = synth.batch_with_active(2048, 3);
            let mut children_seen = 0;
            for b in 0..active.n_rows() {
                let (features, _) = active.row(b);
                assert!(features.windows(2).all(|w| w[0] < w[1]), "row {b}");
                let mut parents_used = std::collections::HashSet::new();
                for &g in features {
                    if let Some(parent) = synth.parent(g as usize) {
                        children_seen += 1;
                        assert!(features.contains(&(parent as u32)), "row {b}: {g}");
                        assert!(parents_used.insert(parent), "row {b}: siblings of {parent}");
                    }
                }
            }
            assert!(children_seen > 100, "{children_seen}");
        }
    }

    #[test]
    fn structured_batches_are_deterministic_and_independent_of_batch_size() {
        let synth = Synth::new(structured()).unwrap();
        assert_eq!(synth.batch(32, 7), synth.batch(32, 7));
        assert_ne!(synth.batch(32, 7), synth.batch(32, 8));
        // Each row has its own stream: a shorter batch is a prefix of a longer one.
        let long = synth.batch(64, 7);
        assert_eq!(synth.batch(16, 7), long.slice(ndarray::s![..16, ..]));
        let fresh = Synth::new(structured()).unwrap();
        assert_eq!(fresh.true_features(), synth.true_features());
        assert_eq!(fresh.batch(64, 7), long);
        let reseeded = Synth::new(SynthConfig {
            seed: 3,
            ..structured()
        })
        .unwrap();
        assert_ne!(reseeded.batch(64, 7), long);
        assert_ne!(reseeded.true_features(), synth.true_features());
    }

    #[test]
    fn structured_rows_are_the_coefficients_times_the_features_plus_noise() {
        let cfg = SynthConfig {
            noise: 0.05,
            ..structured()
        };
        let synth = Synth::new(cfg).unwrap();
        for row in synth.true_features().rows() {
            assert!((row.dot(&row) - 1.0).abs() < 1e-5);
        }
        let (x_bd, a_bg) = synth.batch_with_coefficients(1024, 1);
        assert_eq!(x_bd, synth.batch(1024, 1));
        let residual = &x_bd - &a_bg.dot(&synth.true_features());
        let std = residual.mapv(|r| r * r).mean().unwrap().sqrt();
        assert!((std - 0.05).abs() < 0.005, "{std}");
        // |N(1, 0.5)|: mean ≈ 1.0, and values below 0.5 (a quarter of draws) occur.
        let a: Vec<f32> = a_bg.iter().copied().filter(|&a| a > 0.0).collect();
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        assert!((mean - 1.0).abs() < 0.05, "{mean}");
        let small = a.iter().filter(|&&a| a < 0.5).count() as f32 / a.len() as f32;
        assert!((0.12..0.2).contains(&small), "{small}");
    }

    #[test]
    fn factors_make_features_of_a_group_fire_together() {
        let cfg = SynthConfig {
            n_parents: 0,
            children_per_parent: 0,
            factor_strength: 1.0,
            ..structured()
        };
        let synth = Synth::new(cfg.clone()).unwrap();
        let (_, active) = synth.batch_with_active(20_000, 0);
        let a_bg = active.to_dense(cfg.n_features);
        let fires = |g: usize| a_bg.column(g).mapv(|a| f64::from(u8::from(a > 0.0)));
        // Lift P(both)/(P(g)·P(h)): roots 0 and 4 share group 0; 0 and 1 do not.
        let lift = |g: usize, h: usize| {
            let (x, y) = (fires(g), fires(h));
            (&x * &y).mean().unwrap() / (x.mean().unwrap() * y.mean().unwrap())
        };
        let (same, other) = (lift(0, 4), lift(0, 1));
        assert!(same > 1.3, "{same}");
        assert!((other - 1.0).abs() < 0.1, "{other}");
        // The factors keep the marginals (up to the cap at 1).
        assert!(
            (active.mean_l0() - cfg.mean_active).abs() < 0.3,
            "{}",
            active.mean_l0()
        );
    }

    #[test]
    fn the_shared_component_raises_overlap() {
        let plain = Synth::new(SynthConfig {
            shared_weight: 0.0,
            shared_rank: 0,
            n_parents: 0,
            children_per_parent: 0,
            ..structured()
        })
        .unwrap();
        let shared = Synth::new(SynthConfig {
            n_parents: 0,
            children_per_parent: 0,
            ..structured()
        })
        .unwrap();
        let (a, b) = (plain.overlap(), shared.overlap());
        // Random directions in 32 dimensions: mean |cos| ≈ √(2/(32π)) ≈ 0.141.
        assert!((a.mean_abs_cos - 0.141).abs() < 0.01, "{a:?}");
        assert!(b.mean_abs_cos > a.mean_abs_cos + 0.02, "{a:?} {b:?}");
        assert!(b.max_abs_cos > a.max_abs_cos, "{a:?} {b:?}");
        // Two orthogonal rows and one at 60° to the first.
        let toy = ndarray::array![[1.0f32, 0.0], [0.0, 1.0], [0.5, 0.75f32.sqrt()]];
        let o = overlap(toy.view());
        assert!((o.max_abs_cos - 0.866).abs() < 1e-3, "{o:?}");
        assert!((o.mean_abs_cos - (0.5 + 0.866) / 3.0).abs() < 1e-3, "{o:?}");
    }

    #[test]
    fn sampling_costs_what_fires_not_every_feature() {
        // The structured sampler's firing counts match its probabilities: a root's empirical
        // frequency (skipping is exact Bernoulli sampling) within 4 standard errors.
        let cfg = SynthConfig {
            factor_strength: 0.0,
            n_factors: 4,
            ..structured()
        };
        let synth = Synth::new(cfg.clone()).unwrap();
        let n = 20_000;
        let (_, active) = synth.batch_with_active(n, 2);
        let mut count_g = vec![0usize; cfg.n_features];
        active
            .features
            .iter()
            .for_each(|&g| count_g[g as usize] += 1);
        for (g, &p) in synth.firing_probabilities().iter().enumerate() {
            let se = (p * (1.0 - p) / n as f64).sqrt();
            let freq = count_g[g] as f64 / n as f64;
            assert!((freq - p).abs() < 4.0 * se + 1e-3, "{g}: {freq} vs {p}");
        }
    }

    #[test]
    fn a_synthetic_table_starts_from_its_preset() {
        let hard: SynthConfig = toml::from_str("preset = \"hard\"\nn_features = 2048\n").unwrap();
        assert_eq!(
            hard,
            SynthConfig {
                n_features: 2048,
                ..SynthConfig::hard()
            }
        );
        // A table without the new keys is the set it always described.
        let old: SynthConfig = toml::from_str("d_model = 16\nn_features = 48\n").unwrap();
        assert_eq!(
            old,
            SynthConfig {
                d_model: 16,
                n_features: 48,
                ..SynthConfig::default()
            }
        );
        // What is written reads back as the same configuration.
        for cfg in [SynthConfig::hard(), structured(), SynthConfig::default()] {
            let text = toml::to_string(&cfg).unwrap();
            assert_eq!(toml::from_str::<SynthConfig>(&text).unwrap(), cfg, "{text}");
            let json = serde_json::to_string(&cfg).unwrap();
            assert_eq!(
                serde_json::from_str::<SynthConfig>(&json).unwrap(),
                cfg,
                "{json}"
            );
        }
        let err = toml::from_str::<SynthConfig>("preset = \"harder\"\n").unwrap_err();
        assert!(err.to_string().contains("harder"), "{err}");
        let err = toml::from_str::<SynthConfig>("n_parent = 3\n").unwrap_err();
        assert!(err.to_string().contains("n_parent"), "{err}");
        assert_eq!("hard".parse(), Ok(SynthPreset::Hard));
        assert!("x"
            .parse::<SynthPreset>()
            .unwrap_err()
            .contains("default or hard"));
    }

    #[test]
    fn invalid_structure_fields_are_rejected_each_with_its_own_message() {
        let cases: Vec<(SynthConfig, &str)> = vec![
            (
                SynthConfig {
                    shared_weight: 1.0,
                    ..structured()
                },
                "shared_weight must lie",
            ),
            (
                SynthConfig {
                    shared_weight: f64::NAN,
                    ..structured()
                },
                "shared_weight must lie",
            ),
            (
                SynthConfig {
                    shared_weight: -0.1,
                    ..structured()
                },
                "shared_weight must lie",
            ),
            (
                SynthConfig {
                    shared_rank: 33,
                    ..structured()
                },
                "shared_rank must not exceed",
            ),
            (
                SynthConfig {
                    shared_rank: 0,
                    ..structured()
                },
                "needs a shared_rank",
            ),
            (
                SynthConfig {
                    children_per_parent: 0,
                    ..structured()
                },
                "children_per_parent must be",
            ),
            (
                SynthConfig {
                    n_parents: 52,
                    ..structured()
                },
                "must not exceed n_features",
            ),
            (
                SynthConfig {
                    n_parents: usize::MAX,
                    ..structured()
                },
                "must not exceed n_features",
            ),
            (
                SynthConfig {
                    child_probability: 0.0,
                    ..structured()
                },
                "child_probability",
            ),
            (
                SynthConfig {
                    child_probability: f64::NAN,
                    ..structured()
                },
                "child_probability",
            ),
            (
                SynthConfig {
                    child_similarity: 1.0,
                    ..structured()
                },
                "child_similarity",
            ),
            (
                SynthConfig {
                    factor_strength: 5.0,
                    ..structured()
                },
                "factor_strength must lie",
            ),
            (
                SynthConfig {
                    factor_strength: f64::INFINITY,
                    ..structured()
                },
                "factor_strength must lie",
            ),
            (
                SynthConfig {
                    n_factors: 0,
                    ..structured()
                },
                "needs n_factors",
            ),
            (
                SynthConfig {
                    n_factors: 193,
                    ..structured()
                },
                "n_factors must not exceed",
            ),
            (
                SynthConfig {
                    magnitude: Magnitude::Uniform {
                        low: 1.0,
                        high: 1.0,
                    },
                    ..structured()
                },
                "uniform needs",
            ),
            (
                SynthConfig {
                    magnitude: Magnitude::Uniform {
                        low: -1.0,
                        high: 1.0,
                    },
                    ..structured()
                },
                "uniform needs",
            ),
            (
                SynthConfig {
                    magnitude: Magnitude::FoldedNormal {
                        mean: 1.0,
                        std: 0.0,
                    },
                    ..structured()
                },
                "folded_normal needs",
            ),
            (
                SynthConfig {
                    magnitude: Magnitude::FoldedNormal {
                        mean: f32::NAN,
                        std: 1.0,
                    },
                    ..structured()
                },
                "folded_normal needs",
            ),
        ];
        for (bad, message) in cases {
            match bad.validate() {
                Err(ConfigError::Synth(m)) => assert!(m.contains(message), "{m} for {bad:?}"),
                other => panic!("{other:?} for {bad:?}"),
            }
            assert!(
                matches!(Synth::new(bad.clone()), Err(Error::Config(_))),
                "{bad:?}"
            );
        }
        // The edges are valid: 48 parents of 4 leave 64 roots, at least the 48 parents.
        assert!(SynthConfig {
            n_parents: 51,
            ..structured()
        }
        .validate()
        .is_ok());
        assert!(SynthConfig {
            n_factors: 192,
            ..structured()
        }
        .validate()
        .is_ok());
        assert!(SynthConfig::hard().validate().is_ok());
    }

    /// An SAE whose encoder and decoder are the true features, firing a latent where its
    /// feature's projection exceeds `threshold`.
    fn oracle(features_gd: ArrayView2<'_, f32>, threshold: f32) -> Sae {
        let (g, d) = features_gd.dim();
        Sae::from_parts(
            SaeConfig {
                d_model: d,
                dict_size: g,
                arch: Architecture::RELU,
            },
            features_gd.to_owned(),
            ndarray::Array1::from_elem(g, -threshold),
            features_gd.to_owned(),
            ndarray::Array1::zeros(d),
        )
        .unwrap()
    }

    #[test]
    fn firing_scores_an_oracle_near_one_and_a_random_sae_near_zero() {
        // Nearly orthogonal features (G = D/16: |cos| ≈ 0.06, so the other active feature
        // moves a projection by ≈ ±0.09), so a threshold of 0.25 separates the coefficients
        // (≥ 0.5) from the leak between features.
        let cfg = SynthConfig {
            d_model: 256,
            n_features: 16,
            mean_active: 2.0,
            ..SynthConfig::default()
        };
        let synth = Synth::new(cfg).unwrap();
        let cpu = crate::backend::Device::Cpu;
        let perfect = score(&oracle(synth.true_features(), 0.25), cpu, &synth, 4096, 9).unwrap();
        let firing = perfect.firing.unwrap();
        assert_eq!((firing.n_rows, firing.n_scored), (4096, 16));
        assert!(firing.mean_f1 > 0.95, "{firing:?}");
        assert!(
            firing.mean_precision > 0.95 && firing.mean_recall > 0.95,
            "{firing:?}"
        );
        assert_eq!(firing.fraction_f1_above_0_5, 1.0);
        assert!((perfect.mcc - 1.0).abs() < 1e-5);
        // Random directions: matched latents fire at random.
        let other = Synth::new(SynthConfig {
            seed: 5,
            ..synth.config().clone()
        })
        .unwrap();
        let random = score(&oracle(other.true_features(), 0.25), cpu, &synth, 4096, 9).unwrap();
        let firing = random.firing.unwrap();
        assert!(firing.mean_f1 < 0.35, "{firing:?}");
        // Decoder rows shuffled against the encoder's: the decoder still matches every feature
        // (MCC 1), but each matched latent fires for another feature.
        let f_gd = synth.true_features();
        let mut shuffled = oracle(f_gd, 0.25);
        shuffled.w_dec_fd = ndarray::concatenate(
            ndarray::Axis(0),
            &[
                f_gd.slice(ndarray::s![1.., ..]),
                f_gd.slice(ndarray::s![..1, ..]),
            ],
        )
        .unwrap();
        let crossed = score(&shuffled, cpu, &synth, 4096, 9).unwrap();
        assert!((crossed.mcc - 1.0).abs() < 1e-5, "{crossed:?}");
        assert!(crossed.firing.unwrap().mean_f1 < 0.35, "{crossed:?}");
        // recovery() sees only the decoder: it has no firing to report.
        assert!(recovery(f_gd, f_gd).unwrap().firing.is_none());
    }

    #[test]
    fn firing_counts_precision_and_recall_exactly() {
        // Three rows; feature 0 ↔ latent 1, feature 1 ↔ latent 0, feature 2 unmatched.
        let active = ActiveFeatures {
            indptr: vec![0, 1, 3, 4],
            features: vec![0, 0, 1, 2],
            magnitudes: vec![1.0; 4],
        };
        let codes = Codes {
            n_latents: 3,
            indptr: vec![0, 1, 2, 4],
            indices: vec![1, 2, 1, 0],
            values: vec![1.0; 4],
        };
        let latent_of_g = [Some(1), Some(0), None];
        let f = firing(&latent_of_g, &active, &codes).unwrap();
        // Feature 0: fires in rows 0, 1; latent 1 in rows 0, 2 → precision 1/2, recall 1/2.
        // Feature 1: fires in row 1; latent 0 in row 2 → 0. Feature 2: unmatched → 0.
        assert_eq!((f.n_rows, f.n_scored), (3, 3));
        assert!((f.mean_precision - 0.5 / 3.0).abs() < 1e-6, "{f:?}");
        assert!((f.mean_recall - 0.5 / 3.0).abs() < 1e-6, "{f:?}");
        assert!((f.mean_f1 - 0.5 / 3.0).abs() < 1e-6, "{f:?}");
        assert!((f.fraction_f1_above_0_5 - 1.0 / 3.0).abs() < 1e-6, "{f:?}");
        let by_feature = firing_by_feature(&latent_of_g, &active, &codes).unwrap();
        let counts: Vec<(u64, u64, u64)> = by_feature
            .iter()
            .map(|c| (c.fires, c.latent_fires, c.both))
            .collect();
        assert_eq!(counts, vec![(2, 2, 1), (1, 1, 0), (1, 0, 0)]);
        assert_eq!(
            (by_feature[0].precision(), by_feature[0].recall()),
            (0.5, 0.5)
        );
        assert_eq!(by_feature[2].f1(), 0.0);
        // The matching behind it: feature g ↔ the decoder row that is g.
        let synth = Synth::new(small()).unwrap();
        let flipped = synth
            .true_features()
            .slice(ndarray::s![..;-1, ..])
            .to_owned();
        let (_, matched) = recovery_with_matching(synth.true_features(), flipped.view()).unwrap();
        assert!(
            matched.iter().enumerate().all(|(g, &j)| j == Some(47 - g)),
            "{matched:?}"
        );
        let (_, partial) =
            recovery_with_matching(synth.true_features(), flipped.slice(ndarray::s![..8, ..]))
                .unwrap();
        assert_eq!(partial.iter().filter(|j| j.is_some()).count(), 8);
        assert!((40..48).all(|g| partial[g] == Some(47 - g)), "{partial:?}");
        // Mismatched rows and out-of-range latents are refused.
        let short = ActiveFeatures {
            indptr: vec![0, 1],
            features: vec![0],
            magnitudes: vec![1.0],
        };
        assert!(matches!(
            firing(&latent_of_g, &short, &codes),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            firing(&[Some(3), None, None], &active, &codes),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            firing(&[Some(1), None], &active, &codes),
            Err(Error::Shape { .. })
        ));
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
        assert!(a_bg.iter().all(|&a| a == 0.0 || (0.5..1.5).contains(&a)));
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
            // G·D past the address space: refused before Synth::new allocates.
            SynthConfig {
                n_features: usize::MAX / 2,
                d_model: 4,
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
