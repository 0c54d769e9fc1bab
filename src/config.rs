//! Hyperparameters: the SAE's shape and architecture ([`SaeConfig`]) and the training
//! recipe ([`TrainConfig`]), each with a `validate()` that returns a typed [`ConfigError`].

use serde::{Deserialize, Serialize};

/// How the code f is made sparse. Each variant's rules live in one place, the crate's `arch` module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "arch", rename_all = "lowercase")]
pub enum Architecture {
    /// ReLU with an L1 penalty (dictionary_learning's `StandardTrainer` family), in one of its
    /// formulations.
    Relu {
        /// Which L1 formulation (files spell it `relu_variant`; absent means the default,
        /// `decoder_norm`).
        #[serde(default, rename = "relu_variant")]
        variant: ReluVariant,
    },
    /// Keep the `k` largest codes of every row (Gao et al. 2024, `TopKTrainer`).
    #[serde(rename = "topk")]
    TopK {
        /// Active latents per row.
        k: usize,
    },
    /// Keep the `k·B` largest codes of the whole batch (Bussmann et al. 2024, `BatchTopKTrainer`);
    /// outside training, keep codes above the learned threshold θ.
    #[serde(rename = "batchtopk")]
    BatchTopK {
        /// Mean active latents per row.
        k: usize,
    },
    /// Keep the codes above a threshold learned per latent (Rajamanoharan et al. 2024,
    /// `JumpReluTrainer`): f_j = pre_j·\[pre_j > θ_j\], with pre = x·W_encᵀ + b_enc (the
    /// reference does not subtract b_dec before encoding). Trained with the straight-through
    /// estimator and an L0 penalty.
    #[serde(rename = "jumprelu")]
    JumpRelu,
    /// BatchTopK whose nested prefixes of the dictionary each reconstruct the input
    /// (Bussmann, Nabeshima, Karvonen, Nanda 2025, `MatryoshkaBatchTopKTrainer`): the loss
    /// weighs the reconstruction error of every prefix ([`TrainConfig::group_sizes`]).
    /// Selection and inference are BatchTopK's.
    #[serde(rename = "matryoshka")]
    Matryoshka {
        /// Mean active latents per row.
        k: usize,
    },
}

impl Architecture {
    /// ReLU in its default formulation, Anthropic's April-2024 update.
    pub const RELU: Architecture = Architecture::Relu {
        variant: ReluVariant::DecoderNorm,
    };

    /// The k of TopK, BatchTopK and Matryoshka; `None` for ReLU and JumpReLU.
    pub fn k(&self) -> Option<usize> {
        match *self {
            Architecture::Relu { .. } | Architecture::JumpRelu => None,
            Architecture::TopK { k }
            | Architecture::BatchTopK { k }
            | Architecture::Matryoshka { k } => Some(k),
        }
    }
}

/// How a BatchTopK (or Matryoshka) SAE's inference threshold θ is set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ThresholdRule {
    /// The reference's moving average of each training batch's smallest kept code.
    #[default]
    Ema,
    /// At the end of training, the k·N-th largest positive code of a sample of N ≥ 65,536
    /// training-distribution rows (the `calibrate` module), so that
    /// inference keeps k codes a row on average even when the average had no time to settle.
    Calibrate,
}

/// The most training steps a trainer takes (Adam's bias correction uses the count as an i32).
pub const MAX_STEPS: u64 = i32::MAX as u64;

/// Which L1 formulation a ReLU SAE trains with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReluVariant {
    /// Anthropic's April-2024 update (`StandardTrainerAprilUpdate`): penalty f_j·‖W_dec\[j\]‖,
    /// decoder unconstrained, gradient norm clipped to 1.
    #[default]
    DecoderNorm,
    /// Towards Monosemanticity (`StandardTrainer` with `ConstrainedAdam`): penalty f_j, decoder
    /// rows kept at unit norm, no clipping.
    UnitDecoder,
}

/// How the encoder GEMM rounds its inputs (`--precision`, the config key `precision`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 throughout: the default, as the reference trains.
    #[default]
    F32,
    /// The encoder GEMM multiplies x − b_dec and W_enc rounded to bfloat16 (to nearest, ties
    /// to even) and accumulates in f32; parameters, Adam, selection, the sparse decoder and
    /// the backward pass stay f32. About twice the f32 GEMM's speed on CPUs with AVX-512
    /// BF16 ([`crate::backend::bf16`]); refused elsewhere.
    Bf16,
}

impl Precision {
    /// The name files and options use: `f32` or `bf16`.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The shape and architecture of an SAE: all that is needed to build or load one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaeConfig {
    /// D: width of the activations (the model's residual width).
    pub d_model: usize,
    /// F: number of latents (dictionary rows).
    pub dict_size: usize,
    /// Sparsity rule.
    #[serde(flatten)]
    pub arch: Architecture,
}

impl SaeConfig {
    /// Checks every field; the error names the first invalid one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.d_model == 0 {
            return Err(ConfigError::ZeroDModel);
        }
        if self.dict_size == 0 {
            return Err(ConfigError::ZeroDictSize);
        }
        // Each F×D matrix must be addressable, so ndarray and the allocator never see a size
        // that overflows.
        let fits = self
            .dict_size
            .checked_mul(self.d_model)
            .and_then(|n| n.checked_mul(std::mem::size_of::<f32>()))
            .is_some_and(|bytes| bytes <= isize::MAX as usize);
        if !fits {
            return Err(ConfigError::TooLarge {
                field: "dict_size",
                size: format!(
                    "{} latents of width {} (d_model)",
                    self.dict_size, self.d_model
                ),
            });
        }
        match self.arch.k() {
            Some(0) => return Err(ConfigError::ZeroK),
            Some(k) if k > self.dict_size => {
                return Err(ConfigError::KAboveDictSize {
                    k,
                    dict_size: self.dict_size,
                })
            }
            _ => {}
        }
        Ok(())
    }
}

/// The training recipe. Defaults follow dictionary_learning 0.1.0 unless noted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Steps the run will take; the learning-rate decay ends here. Default 10,000.
    pub total_steps: u64,
    /// Peak learning rate; `None` picks [`TrainConfig::learning_rate`]'s default.
    pub lr: Option<f32>,
    /// Linear learning-rate warm-up from 0 (default 1000, dictionary_learning).
    pub warmup_steps: u64,
    /// Step from which the learning rate decays linearly to 0 at `total_steps` (default none).
    pub decay_start: Option<u64>,
    /// Adam β1; `None` picks [`TrainConfig::adam_beta1`]'s default (0.9, torch; 0 for
    /// JumpReLU, as Gemma Scope and dictionary_learning). The β's are f64 because the
    /// reference computes 1 − β in double precision: from an f32 0.999, 1 − β would be off by
    /// 1.3e-5.
    pub adam_beta1: Option<f64>,
    /// Adam β2 (default 0.999, torch).
    pub adam_beta2: f64,
    /// Adam ε (default 1e-8, torch).
    pub adam_eps: f64,
    /// ReLU only: L1 coefficient λ (default 5.0, Anthropic April-2024 update, which assumes
    /// activations normalized to E‖x‖ = √D).
    pub l1_coefficient: f32,
    /// ReLU and JumpReLU: the sparsity penalty's coefficient rises linearly from 0 over this
    /// many steps (default 2000, both reference trainers; 0 disables).
    pub sparsity_warmup_steps: u64,
    /// JumpReLU: bandwidth ε of the rectangle kernel whose pseudo-derivative trains the
    /// thresholds (default 0.001, Rajamanoharan et al. 2024 and dictionary_learning).
    pub jumprelu_bandwidth: f32,
    /// JumpReLU: the L0 penalty's coefficient (default 1.0, dictionary_learning's
    /// `sparsity_penalty`).
    pub l0_coefficient: f32,
    /// JumpReLU: the L0 the penalty aims at, c·(L0/target − 1)² (default 20,
    /// dictionary_learning's `target_l0`).
    pub target_l0: f32,
    /// Matryoshka: the fraction of the dictionary in each nested group, summing to 1; group i
    /// gets ⌊fraction·F⌋ latents and the last the rest, as the reference trainer splits them
    /// (default 1/32, 1/16, 1/8, 1/4, 1/2 + 1/32: dictionary_learning_demo's
    /// `MatryoshkaBatchTopKTrainerConfig`). Ignored when `group_sizes` is given.
    pub group_fractions: Vec<f64>,
    /// Matryoshka: the groups' sizes in latents, summing to F; empty (the default) takes them
    /// from `group_fractions`.
    pub group_sizes: Vec<usize>,
    /// Matryoshka: each prefix's weight in the loss, which is the mean over prefixes of
    /// weight·MSE (the reference's); empty (the default) weighs every prefix 1/G.
    pub group_weights: Vec<f32>,
    /// TopK/BatchTopK: weight α of the AuxK loss (default 1/32, Gao et al. 2024 A.2).
    pub auxk_alpha: f32,
    /// A latent is dead after this many tokens without firing: AuxK's latents (TopK, BatchTopK,
    /// Matryoshka) and the dead fraction every architecture reports (default 10M, Gao et al.
    /// 2024; `sae train` scales it to a tenth of shorter runs).
    pub dead_tokens: u64,
    /// BatchTopK: θ updates on steps after this one (0-based, as the reference's
    /// `step > threshold_start_step`; default 1000).
    pub threshold_start_step: u64,
    /// BatchTopK: EMA factor β of θ (default 0.999).
    pub threshold_beta: f64,
    /// BatchTopK and Matryoshka: how the saved θ is set (default the reference's moving
    /// average). The trainer always keeps the average; `sae train` calibrates at the end.
    pub threshold_rule: ThresholdRule,
    /// Every this many steps, the latents dead for `dead_tokens` are re-initialised towards
    /// the batch rows the SAE reconstructs worst, as long as that many steps remain (Anthropic
    /// 2023's resampling; see `train::resample`). `None`, the default and the reference's
    /// for every trainer here, never resamples.
    pub resample_every: Option<u64>,
    /// Resampling: a new encoder row's norm as a multiple of the live latents' mean encoder
    /// norm (default 0.2, Anthropic 2023).
    pub resample_encoder_scale: f32,
    /// How the encoder GEMM rounds its inputs (default f32; see [`Precision`]).
    pub precision: Precision,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            total_steps: 10_000,
            lr: None,
            warmup_steps: 1000,
            decay_start: None,
            adam_beta1: None,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            l1_coefficient: 5.0,
            sparsity_warmup_steps: 2000,
            jumprelu_bandwidth: 0.001,
            l0_coefficient: 1.0,
            target_l0: 20.0,
            group_fractions: vec![
                1.0 / 32.0,
                1.0 / 16.0,
                1.0 / 8.0,
                1.0 / 4.0,
                0.5 + 1.0 / 32.0,
            ],
            group_sizes: Vec::new(),
            group_weights: Vec::new(),
            auxk_alpha: 1.0 / 32.0,
            dead_tokens: 10_000_000,
            threshold_start_step: 1000,
            threshold_beta: 0.999,
            threshold_rule: ThresholdRule::Ema,
            resample_every: None,
            resample_encoder_scale: 0.2,
            precision: Precision::F32,
        }
    }
}

impl TrainConfig {
    /// Checks every field against itself and against the SAE it will train.
    pub fn validate(&self, sae: &SaeConfig) -> Result<(), ConfigError> {
        use ConfigError as E;
        sae.validate()?;
        if self.total_steps == 0 {
            return Err(E::ZeroTotalSteps);
        }
        if self.total_steps > MAX_STEPS {
            return Err(E::TooManySteps(self.total_steps));
        }
        if let Some(lr) = self.lr {
            if !(lr.is_finite() && lr > 0.0) {
                return Err(E::LearningRate(lr));
            }
        }
        for (name, value) in [
            ("adam_beta1", self.adam_beta1(sae)),
            ("adam_beta2", self.adam_beta2),
            ("threshold_beta", self.threshold_beta),
        ] {
            if !(0.0..1.0).contains(&value) {
                return Err(E::Beta { name, value });
            }
        }
        if !(self.adam_eps.is_finite() && self.adam_eps > 0.0) {
            return Err(E::AdamEps(self.adam_eps));
        }
        if !(self.l1_coefficient.is_finite() && self.l1_coefficient >= 0.0) {
            return Err(E::L1Coefficient(self.l1_coefficient));
        }
        if !(self.auxk_alpha.is_finite() && self.auxk_alpha >= 0.0) {
            return Err(E::AuxkAlpha(self.auxk_alpha));
        }
        if self.dead_tokens == 0 {
            return Err(E::ZeroDeadTokens);
        }
        if self.resample_every == Some(0) {
            return Err(E::ZeroInterval("resample_every"));
        }
        let scale = self.resample_encoder_scale;
        if !(scale.is_finite() && scale > 0.0) {
            return Err(E::ResampleEncoderScale(scale));
        }
        if self.warmup_steps >= self.total_steps {
            return Err(E::WarmupNotBeforeEnd {
                warmup_steps: self.warmup_steps,
                total_steps: self.total_steps,
            });
        }
        if !(self.jumprelu_bandwidth.is_finite() && self.jumprelu_bandwidth > 0.0) {
            return Err(E::Bandwidth(self.jumprelu_bandwidth));
        }
        if !(self.l0_coefficient.is_finite() && self.l0_coefficient >= 0.0) {
            return Err(E::L0Coefficient(self.l0_coefficient));
        }
        if !(self.target_l0.is_finite() && self.target_l0 > 0.0) {
            return Err(E::TargetL0(self.target_l0));
        }
        if matches!(sae.arch, Architecture::Matryoshka { .. }) {
            self.groups(sae)?;
        }
        // The architectures whose penalty warms up.
        let relu = matches!(sae.arch, Architecture::Relu { .. } | Architecture::JumpRelu);
        if relu && self.sparsity_warmup_steps >= self.total_steps {
            return Err(E::SparsityWarmupNotBeforeEnd {
                sparsity_warmup_steps: self.sparsity_warmup_steps,
                total_steps: self.total_steps,
            });
        }
        if let Some(decay_start) = self.decay_start {
            if decay_start <= self.warmup_steps {
                return Err(E::DecayNotAfterWarmup {
                    decay_start,
                    warmup_steps: self.warmup_steps,
                });
            }
            if decay_start >= self.total_steps {
                return Err(E::DecayNotBeforeEnd {
                    decay_start,
                    total_steps: self.total_steps,
                });
            }
            if relu && self.sparsity_warmup_steps > 0 && decay_start <= self.sparsity_warmup_steps {
                return Err(E::DecayNotAfterSparsityWarmup {
                    decay_start,
                    sparsity_warmup_steps: self.sparsity_warmup_steps,
                });
            }
        }
        Ok(())
    }
}

/// One invalid hyperparameter: the message names the field (as spelled in config files and
/// CLI flags) and what to change.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// D = 0.
    #[error("d_model must be at least 1")]
    ZeroDModel,
    /// F = 0.
    #[error("dict_size must be at least 1")]
    ZeroDictSize,
    /// k = 0.
    #[error("k must be at least 1 for topk and batchtopk")]
    ZeroK,
    /// More active latents asked for than there are.
    #[error("k ({k}) must not exceed dict_size ({dict_size})")]
    KAboveDictSize {
        /// Given k.
        k: usize,
        /// Given F.
        dict_size: usize,
    },
    /// Both ways of giving F.
    #[error("give dict_size or expansion, not both")]
    DictSizeAndExpansion,
    /// Both ways of giving the run's length.
    #[error("give steps or tokens, not both")]
    StepsAndTokens,
    /// A run interval of 0 steps.
    #[error("{0} must be at least 1 step")]
    ZeroInterval(&'static str),
    /// A held-out fraction outside [0, 1).
    #[error("eval_fraction must lie in [0, 1), got {0}")]
    EvalFraction(f64),
    /// A `[data]` key that does not fit the rows handed in through the library
    /// ([`crate::run::RunData`]); the text names the key and the fix.
    #[error("{0}")]
    GivenData(String),
    /// `total_steps` = 0.
    #[error("total_steps must be at least 1")]
    ZeroTotalSteps,
    /// More steps than Adam's step count can hold ([`MAX_STEPS`]).
    #[error("total_steps is {0}, more than the {max} a trainer can take; train fewer steps", max = MAX_STEPS)]
    TooManySteps(u64),
    /// Learning rate not a finite positive number.
    #[error("lr must be a finite number > 0, got {0}")]
    LearningRate(f32),
    /// A β outside [0, 1).
    #[error("{name} must lie in [0, 1), got {value}")]
    Beta {
        /// Field name.
        name: &'static str,
        /// Offending value.
        value: f64,
    },
    /// Adam ε not a finite positive number.
    #[error("adam_eps must be a finite number > 0, got {0}")]
    AdamEps(f64),
    /// λ negative or not finite.
    #[error("l1_coefficient must be a finite number >= 0, got {0}")]
    L1Coefficient(f32),
    /// A calibrated θ asked of an architecture without one.
    #[error("threshold = \"calibrate\" applies to batchtopk and matryoshka, which learn a threshold θ; {0} has none")]
    CalibrateWithoutThreshold(&'static str),
    /// Matryoshka's groups given wrongly.
    #[error("{field}: {problem}")]
    Groups {
        /// `group_sizes`, `group_fractions` or `group_weights`.
        field: &'static str,
        /// What is wrong, and what to give instead.
        problem: String,
    },
    /// JumpReLU's bandwidth ε not a finite positive number.
    #[error("jumprelu_bandwidth must be a finite number > 0, got {0}")]
    Bandwidth(f32),
    /// JumpReLU's L0 coefficient negative or not finite.
    #[error("l0_coefficient must be a finite number >= 0, got {0}")]
    L0Coefficient(f32),
    /// JumpReLU's target L0 not a finite positive number.
    #[error("target_l0 must be a finite number > 0, got {0}")]
    TargetL0(f32),
    /// α negative or not finite.
    #[error("auxk_alpha must be a finite number >= 0, got {0}")]
    AuxkAlpha(f32),
    /// Resampled encoder rows of no (or of an undefined) norm.
    #[error("resample_encoder_scale must be a finite number > 0, got {0}")]
    ResampleEncoderScale(f32),
    /// `dead_tokens` = 0 would call every latent dead at once.
    #[error("dead_tokens must be at least 1")]
    ZeroDeadTokens,
    /// Warm-up as long as the run.
    #[error("warmup_steps ({warmup_steps}) must be less than total_steps ({total_steps})")]
    WarmupNotBeforeEnd {
        /// Given warm-up.
        warmup_steps: u64,
        /// Given run length.
        total_steps: u64,
    },
    /// Sparsity warm-up as long as the run.
    #[error("sparsity_warmup_steps ({sparsity_warmup_steps}) must be less than total_steps ({total_steps})")]
    SparsityWarmupNotBeforeEnd {
        /// Given sparsity warm-up.
        sparsity_warmup_steps: u64,
        /// Given run length.
        total_steps: u64,
    },
    /// A threshold start set so late that θ never updates: its updates come on the steps
    /// after it, and the last step is `total_steps − 1`.
    #[error(
        "threshold_start_step ({threshold_start_step}) must be less than total_steps − 1 \
         ({total_steps} − 1), or θ is never learned"
    )]
    ThresholdStartNotBeforeEnd {
        /// Given start.
        threshold_start_step: u64,
        /// Given run length.
        total_steps: u64,
    },
    /// Decay would start during warm-up.
    #[error("decay_start ({decay_start}) must be greater than warmup_steps ({warmup_steps})")]
    DecayNotAfterWarmup {
        /// Given decay start.
        decay_start: u64,
        /// Given warm-up.
        warmup_steps: u64,
    },
    /// Decay would start at or after the end.
    #[error("decay_start ({decay_start}) must be less than total_steps ({total_steps})")]
    DecayNotBeforeEnd {
        /// Given decay start.
        decay_start: u64,
        /// Given run length.
        total_steps: u64,
    },
    /// An invalid field of the synthetic dataset's configuration.
    #[error("synthetic data: {0}")]
    Synth(&'static str),
    /// Loader: a batch of no rows.
    #[error("batch_size must be at least 1")]
    ZeroBatchSize,
    /// Loader: a buffer of no rows, or more than a slot index addresses.
    #[error("buffer_rows must lie in 1..=4294967295, got {0}")]
    BufferRows(usize),
    /// Loader: a zero memory budget for the shuffle buffer.
    #[error("buffer_bytes must be at least 1 (the buffer always holds at least one row)")]
    ZeroBufferBytes,
    /// Loader: chunks of no rows.
    #[error("chunk_rows must be at least 1")]
    ZeroChunkRows,
    /// Loader: no batches prepared ahead.
    #[error("prefetch must be at least 1 batch")]
    ZeroPrefetch,
    /// Loader: an input scale that is not a finite positive number.
    #[error("scale must be a finite number > 0, got {0}")]
    InputScale(f32),
    /// A size whose arrays could not be addressed: its product with another overflows.
    #[error("{field} is too large: {size} do not fit in any address space; lower {field}")]
    TooLarge {
        /// The field to lower (`dict_size`, `expansion`, `batch_size`, `buffer_rows`).
        field: &'static str,
        /// The sizes that multiply, as text.
        size: String,
    },
    /// Decay would start while λ is still warming up.
    #[error("decay_start ({decay_start}) must be greater than sparsity_warmup_steps ({sparsity_warmup_steps})")]
    DecayNotAfterSparsityWarmup {
        /// Given decay start.
        decay_start: u64,
        /// Given sparsity warm-up.
        sparsity_warmup_steps: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sae(arch: Architecture) -> SaeConfig {
        SaeConfig {
            d_model: 8,
            dict_size: 32,
            arch,
        }
    }

    fn check(sae_cfg: SaeConfig, edit: impl FnOnce(&mut TrainConfig)) -> Result<(), ConfigError> {
        let mut cfg = TrainConfig::default();
        edit(&mut cfg);
        cfg.validate(&sae_cfg)
    }

    const TOPK: Architecture = Architecture::TopK { k: 4 };

    #[test]
    fn defaults_are_valid_for_every_architecture() {
        for arch in [
            Architecture::RELU,
            TOPK,
            Architecture::BatchTopK { k: 4 },
            Architecture::JumpRelu,
        ] {
            assert_eq!(check(sae(arch), |_| {}), Ok(()));
        }
    }

    #[test]
    fn sae_shape_errors() {
        let mut s = sae(TOPK);
        s.d_model = 0;
        assert_eq!(s.validate(), Err(ConfigError::ZeroDModel));
        let mut s = sae(TOPK);
        s.dict_size = 0;
        assert_eq!(s.validate(), Err(ConfigError::ZeroDictSize));
        assert_eq!(
            sae(Architecture::BatchTopK { k: 0 }).validate(),
            Err(ConfigError::ZeroK)
        );
        assert_eq!(
            sae(Architecture::TopK { k: 0 }).validate(),
            Err(ConfigError::ZeroK)
        );
        for arch in [
            Architecture::TopK { k: 33 },
            Architecture::BatchTopK { k: 33 },
        ] {
            assert_eq!(
                sae(arch).validate(),
                Err(ConfigError::KAboveDictSize {
                    k: 33,
                    dict_size: 32
                })
            );
        }
        assert_eq!(sae(Architecture::TopK { k: 32 }).validate(), Ok(()));
        // F·D past the address space is an error, not an overflow inside ndarray.
        for dict_size in [usize::MAX / 8 + 1, 1 << 62, usize::MAX] {
            let mut s = sae(TOPK);
            s.dict_size = dict_size;
            assert!(
                matches!(
                    s.validate(),
                    Err(ConfigError::TooLarge {
                        field: "dict_size",
                        ..
                    })
                ),
                "{dict_size}"
            );
        }
        let mut s = sae(TOPK);
        s.dict_size = isize::MAX as usize / 4 / 8;
        assert_eq!(s.validate(), Ok(()));
        // TrainConfig::validate checks the SAE too.
        assert_eq!(
            check(sae(Architecture::TopK { k: 0 }), |_| {}),
            Err(ConfigError::ZeroK)
        );
    }

    #[test]
    fn learning_rate_must_be_finite_and_positive() {
        for bad in [0.0, -1e-3, f32::NAN, f32::INFINITY] {
            let err = check(sae(TOPK), |c| c.lr = Some(bad)).unwrap_err();
            assert!(matches!(err, ConfigError::LearningRate(_)), "{bad}: {err}");
        }
    }

    #[test]
    fn betas_must_lie_in_unit_interval() {
        for bad in [-0.1, 1.0, 1.5, f64::NAN] {
            assert!(matches!(
                check(sae(TOPK), |c| c.adam_beta1 = Some(bad)),
                Err(ConfigError::Beta {
                    name: "adam_beta1",
                    ..
                })
            ));
            assert!(matches!(
                check(sae(TOPK), |c| c.adam_beta2 = bad),
                Err(ConfigError::Beta {
                    name: "adam_beta2",
                    ..
                })
            ));
            assert!(matches!(
                check(sae(TOPK), |c| c.threshold_beta = bad),
                Err(ConfigError::Beta {
                    name: "threshold_beta",
                    ..
                })
            ));
        }
    }

    #[test]
    fn scalar_field_errors() {
        assert!(matches!(
            check(sae(TOPK), |c| c.adam_eps = 0.0),
            Err(ConfigError::AdamEps(_))
        ));
        assert!(matches!(
            check(sae(Architecture::RELU), |c| c.l1_coefficient = -1.0),
            Err(ConfigError::L1Coefficient(_))
        ));
        assert!(matches!(
            check(sae(Architecture::RELU), |c| c.l1_coefficient = f32::NAN),
            Err(ConfigError::L1Coefficient(_))
        ));
        assert!(matches!(
            check(sae(TOPK), |c| c.auxk_alpha = -0.5),
            Err(ConfigError::AuxkAlpha(_))
        ));
        let jump = sae(Architecture::JumpRelu);
        for bad in [0.0, -1e-3, f32::NAN, f32::INFINITY] {
            assert_eq!(
                check(jump, |c| c.jumprelu_bandwidth = bad).map_err(|e| e.to_string()),
                Err(ConfigError::Bandwidth(bad).to_string())
            );
            assert_eq!(
                check(jump, |c| c.target_l0 = bad).map_err(|e| e.to_string()),
                Err(ConfigError::TargetL0(bad).to_string())
            );
        }
        for bad in [-1.0, f32::NAN] {
            assert!(matches!(
                check(jump, |c| c.l0_coefficient = bad),
                Err(ConfigError::L0Coefficient(_))
            ));
        }
        assert_eq!(check(jump, |c| c.l0_coefficient = 0.0), Ok(()));
        assert_eq!(
            check(sae(TOPK), |c| c.dead_tokens = 0),
            Err(ConfigError::ZeroDeadTokens)
        );
        assert_eq!(
            check(sae(TOPK), |c| c.resample_every = Some(0)),
            Err(ConfigError::ZeroInterval("resample_every"))
        );
        assert_eq!(check(sae(TOPK), |c| c.resample_every = Some(1)), Ok(()));
        for bad in [0.0, -0.2, f32::NAN, f32::INFINITY] {
            assert_eq!(
                check(sae(TOPK), |c| c.resample_encoder_scale = bad).map_err(|e| e.to_string()),
                Err(ConfigError::ResampleEncoderScale(bad).to_string())
            );
        }
        assert_eq!(
            check(sae(TOPK), |c| c.total_steps = 0),
            Err(ConfigError::ZeroTotalSteps)
        );
        assert_eq!(
            check(sae(TOPK), |c| c.total_steps = 1 << 40),
            Err(ConfigError::TooManySteps(1 << 40))
        );
    }

    #[test]
    fn schedule_errors() {
        assert!(matches!(
            check(sae(TOPK), |c| {
                c.total_steps = 100;
                c.warmup_steps = 100
            }),
            Err(ConfigError::WarmupNotBeforeEnd { .. })
        ));
        assert!(matches!(
            check(sae(TOPK), |c| c.decay_start = Some(1000)),
            Err(ConfigError::DecayNotAfterWarmup { .. })
        ));
        assert!(matches!(
            check(sae(TOPK), |c| c.decay_start = Some(10_000)),
            Err(ConfigError::DecayNotBeforeEnd { .. })
        ));
        assert!(matches!(
            check(sae(Architecture::RELU), |c| c.decay_start = Some(1500)),
            Err(ConfigError::DecayNotAfterSparsityWarmup { .. })
        ));
        // The sparsity warm-up only constrains ReLU runs.
        assert_eq!(check(sae(TOPK), |c| c.decay_start = Some(1500)), Ok(()));
        assert!(matches!(
            check(sae(Architecture::RELU), |c| {
                c.total_steps = 1500;
                c.decay_start = None
            }),
            Err(ConfigError::SparsityWarmupNotBeforeEnd { .. })
        ));
        // JumpReLU's L0 penalty warms up too.
        assert!(matches!(
            check(sae(Architecture::JumpRelu), |c| c.total_steps = 1500),
            Err(ConfigError::SparsityWarmupNotBeforeEnd { .. })
        ));
    }

    #[test]
    fn matryoshka_groups_are_the_reference_split_and_each_mistake_names_its_field() {
        let m = sae(Architecture::Matryoshka { k: 4 });
        let big = SaeConfig {
            dict_size: 128,
            ..m
        };
        let t = TrainConfig::default();
        // ⌊f·128⌋ for all but the last, which takes the rest; each prefix weighs (1/5)/5.
        assert_eq!(t.groups(&big), Ok(vec![4, 8, 16, 32, 68]));
        let prefixes = t.prefixes(&big).unwrap();
        assert_eq!(
            prefixes.iter().map(|p| p.end).collect::<Vec<_>>(),
            [4, 12, 28, 60, 128]
        );
        assert!(prefixes.iter().all(|p| p.weight == (0.2f64 / 5.0) as f32));
        // Other architectures weigh the one reconstruction by 1.
        let one = t.prefixes(&sae(TOPK)).unwrap();
        assert_eq!((one.len(), one[0].end, one[0].weight), (1, 32, 1.0));
        let field = |edit: fn(&mut TrainConfig)| match check(m, edit) {
            Err(ConfigError::Groups { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        // 32 latents: 1/32 of them is one, 1/16 two... fine; but no fraction may be 0.
        assert_eq!(check(m, |_| {}), Ok(()));
        assert_eq!(
            field(|c| c.group_fractions = vec![0.5, 0.25]),
            "group_fractions"
        );
        assert_eq!(field(|c| c.group_fractions = vec![]), "group_fractions");
        assert_eq!(
            field(|c| c.group_fractions = vec![1.5, -0.5]),
            "group_fractions"
        );
        assert_eq!(
            field(|c| c.group_fractions = vec![0.01, 0.99]),
            "group_fractions"
        );
        assert_eq!(field(|c| c.group_sizes = vec![16, 8]), "group_sizes");
        assert_eq!(field(|c| c.group_sizes = vec![32, 0]), "group_sizes");
        assert_eq!(field(|c| c.group_weights = vec![1.0, 2.0]), "group_weights");
        assert_eq!(
            field(|c| {
                c.group_sizes = vec![16, 16];
                c.group_weights = vec![1.0, f32::NAN]
            }),
            "group_weights"
        );
        assert_eq!(check(m, |c| c.group_sizes = vec![8, 24]), Ok(()));
        // The groups mean nothing to the other architectures.
        assert_eq!(check(sae(TOPK), |c| c.group_sizes = vec![1]), Ok(()));
    }

    #[test]
    fn jumprelu_defaults_are_the_reference_trainers() {
        let (t, jump) = (TrainConfig::default(), sae(Architecture::JumpRelu));
        assert_eq!(t.adam_beta1(&jump), 0.0);
        assert_eq!(t.adam_beta1(&sae(TOPK)), 0.9);
        assert_eq!(t.learning_rate(&jump), 7e-5);
        let set = TrainConfig {
            adam_beta1: Some(0.5),
            ..t
        };
        assert_eq!(set.adam_beta1(&jump), 0.5);
        let json = serde_json::to_string(&jump).unwrap();
        assert!(json.contains("\"arch\":\"jumprelu\""), "{json}");
        assert_eq!(serde_json::from_str::<SaeConfig>(&json).unwrap(), jump);
    }

    #[test]
    fn default_learning_rate_scales_with_dictionary_size() {
        let mut s = sae(TOPK);
        s.dict_size = 16384;
        assert_eq!(TrainConfig::default().learning_rate(&s), 2e-4);
        s.dict_size = 65536;
        assert!((TrainConfig::default().learning_rate(&s) - 1e-4).abs() < 1e-10);
    }

    #[test]
    fn serde_round_trip_uses_lowercase_arch_names() {
        let s = sae(Architecture::BatchTopK { k: 16 });
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"arch\":\"batchtopk\""), "{json}");
        assert_eq!(serde_json::from_str::<SaeConfig>(&json).unwrap(), s);
    }

    #[test]
    fn a_relu_sae_records_its_variant_and_files_without_it_mean_the_default() {
        let unit = sae(Architecture::Relu {
            variant: ReluVariant::UnitDecoder,
        });
        let json = serde_json::to_string(&unit).unwrap();
        assert!(
            json.contains("\"arch\":\"relu\"")
                && json.contains("\"relu_variant\":\"unit_decoder\""),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<SaeConfig>(&json).unwrap(), unit);
        let old = json.replace(",\"relu_variant\":\"unit_decoder\"", "");
        assert_eq!(
            serde_json::from_str::<SaeConfig>(&old).unwrap(),
            sae(Architecture::RELU)
        );
    }
}
