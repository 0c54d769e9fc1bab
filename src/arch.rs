//! The one place that says what each architecture does: [`Rules::for_config`] turns an
//! architecture (and its training recipe) into independent behaviours, which the rest of the
//! crate follows without asking which architecture it runs.

use serde::{Deserialize, Serialize};

use crate::config::{Architecture, ConfigError, ReluVariant, SaeConfig, TrainConfig};

/// The name of a sparsity rule, as flags, config files and reports spell it: an
/// [`Architecture`] without its k.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArchName {
    /// ReLU with an L1 penalty.
    Relu,
    /// Per-row top-k.
    Topk,
    /// Batch-wide top-(k·B).
    Batchtopk,
    /// A learned threshold per latent.
    Jumprelu,
    /// Batch-wide top-(k·B) with nested prefixes.
    Matryoshka,
}

impl ArchName {
    /// Every name, in the order help texts list them.
    pub const ALL: [ArchName; 5] = [
        ArchName::Relu,
        ArchName::Topk,
        ArchName::Batchtopk,
        ArchName::Jumprelu,
        ArchName::Matryoshka,
    ];

    /// The name as flags and files spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            ArchName::Relu => "relu",
            ArchName::Topk => "topk",
            ArchName::Batchtopk => "batchtopk",
            ArchName::Jumprelu => "jumprelu",
            ArchName::Matryoshka => "matryoshka",
        }
    }

    /// One line for help texts.
    pub fn description(self) -> &'static str {
        match self {
            ArchName::Relu => "ReLU with an L1 penalty",
            ArchName::Topk => "The k largest codes of each row",
            ArchName::Batchtopk => {
                "The k·B largest codes of the batch; a learned threshold outside training"
            }
            ArchName::Jumprelu => "Codes above a threshold learned per latent, an L0 penalty",
            ArchName::Matryoshka => {
                "BatchTopK whose nested prefixes of the dictionary each reconstruct the input"
            }
        }
    }

    /// The architecture of this name with `k` active codes per row (unused by ReLU and
    /// JumpReLU, whose sparsity comes from their penalties).
    pub fn with_k(self, k: usize) -> Architecture {
        match self {
            ArchName::Relu => Architecture::RELU,
            ArchName::Topk => Architecture::TopK { k },
            ArchName::Batchtopk => Architecture::BatchTopK { k },
            ArchName::Jumprelu => Architecture::JumpRelu,
            ArchName::Matryoshka => Architecture::Matryoshka { k },
        }
    }
}

impl std::fmt::Display for ArchName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ArchName {
    type Err = String;

    /// One of [`ArchName::ALL`]'s spellings.
    fn from_str(s: &str) -> Result<Self, String> {
        ArchName::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "{s:?} is not an architecture (relu, topk, batchtopk, jumprelu or matryoshka)"
                )
            })
    }
}

impl TrainConfig {
    /// The peak learning rate: `lr` if set, else 2e-4/√(F/2¹⁴) for TopK/BatchTopK (Gao et al.
    /// 2024 scaling law, as dictionary_learning), 5e-5 for ReLU (Anthropic April-2024 update)
    /// and 7e-5 for JumpReLU (dictionary_learning's `JumpReluTrainer`).
    pub fn learning_rate(&self, sae: &SaeConfig) -> f32 {
        match (self.lr, sae.arch) {
            (Some(lr), _) => lr,
            (None, Architecture::Relu { .. }) => 5e-5,
            (None, Architecture::JumpRelu) => 7e-5,
            (None, _) => (2e-4 / (sae.dict_size as f64 / 16384.0).sqrt()) as f32,
        }
    }

    /// Adam's β1: `adam_beta1` if set, else 0.9 (torch), or 0 for JumpReLU (Gemma Scope's
    /// β = (0, 0.999), as dictionary_learning's `JumpReluTrainer`).
    pub fn adam_beta1(&self, sae: &SaeConfig) -> f64 {
        match (self.adam_beta1, sae.arch) {
            (Some(beta1), _) => beta1,
            (None, Architecture::JumpRelu) => 0.0,
            (None, _) => 0.9,
        }
    }
}

impl Architecture {
    /// Whether folding an input scale into the SAE also makes its decoder rows unit-norm
    /// (see [`crate::Sae::fold_input_scale`]): true for ReLU, whose codes scale with their
    /// pre-activations so a row's norm can move into its encoder row and bias; TopK and
    /// BatchTopK rows are unit-norm already, and rescaling their codes would change which are
    /// selected.
    pub fn folds_decoder_norms(&self) -> bool {
        matches!(self, Architecture::Relu { .. })
    }

    /// SAELens' name for this architecture's saved form: `standard` (ReLU), `topk`, or
    /// `jumprelu` for JumpReLU and for BatchTopK, whose inference rule (codes above θ) is a
    /// threshold per latent.
    pub fn saelens_name(&self) -> &'static str {
        match self {
            Architecture::Relu { .. } => "standard",
            Architecture::TopK { .. } => "topk",
            Architecture::BatchTopK { .. }
            | Architecture::JumpRelu
            | Architecture::Matryoshka { .. } => "jumprelu",
        }
    }

    /// This architecture's name.
    pub fn name(&self) -> ArchName {
        match self {
            Architecture::Relu { .. } => ArchName::Relu,
            Architecture::TopK { .. } => ArchName::Topk,
            Architecture::BatchTopK { .. } => ArchName::Batchtopk,
            Architecture::JumpRelu => ArchName::Jumprelu,
            Architecture::Matryoshka { .. } => ArchName::Matryoshka,
        }
    }

    /// Whether the encoder sees x − b_dec (every architecture but JumpReLU, whose reference
    /// encodes x itself: pre = x·W_encᵀ + b_enc).
    pub fn centres_input(&self) -> bool {
        !matches!(self, Architecture::JumpRelu)
    }

    /// Whether the GPU path has kernels for this architecture: all but JumpReLU and
    /// Matryoshka, whose kernels (thresholds, prefix losses) wait for a GPU to test them on.
    pub fn runs_on_gpu(&self) -> bool {
        !matches!(
            self,
            Architecture::JumpRelu | Architecture::Matryoshka { .. }
        )
    }

    /// The error for this architecture asked to run on `device`, a GPU without its kernels.
    pub fn not_on_gpu(&self, device: String) -> crate::Error {
        crate::Error::Device {
            device,
            reason: format!(
                "{} runs on the CPU only in this version; drop --device",
                self.name()
            ),
        }
    }

    /// Whether each latent has a learned threshold θ_j (JumpReLU), a fifth parameter.
    pub fn has_latent_thresholds(&self) -> bool {
        matches!(self, Architecture::JumpRelu)
    }
}

/// How training selects the active codes from `post = ReLU(pre)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Selection {
    /// Every positive entry.
    Relu,
    /// The k largest of each row.
    TopK(usize),
    /// The k·B largest of the batch.
    BatchTopK(usize),
    /// The entries above their latent's threshold θ_j (the SAE's); training also lists the
    /// entries within half a bandwidth below θ_j, where the thresholds' pseudo-gradient lives.
    JumpRelu,
}

impl Selection {
    /// How `arch` selects codes in training. Inference selects the same way, except that a
    /// BatchTopK SAE with a learned θ keeps the codes above it.
    pub fn of(arch: Architecture) -> Selection {
        match arch {
            Architecture::Relu { .. } => Selection::Relu,
            Architecture::TopK { k } => Selection::TopK(k),
            Architecture::BatchTopK { k } | Architecture::Matryoshka { k } => {
                Selection::BatchTopK(k)
            }
            Architecture::JumpRelu => Selection::JumpRelu,
        }
    }
}

/// One of the nested reconstructions a step's loss weighs: x̂ from latents `0..end`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Prefix {
    /// One past the prefix's last latent.
    pub end: usize,
    /// Its weight c in the loss Σ c·MSE(prefix).
    pub weight: f32,
}

impl TrainConfig {
    /// Matryoshka's group sizes for an SAE of `sae`: `group_sizes`, or from `group_fractions`
    /// as the reference trainer splits them. Fails naming the field when they are not
    /// positive sizes summing to F, or the weights do not match them.
    pub fn groups(&self, sae: &SaeConfig) -> Result<Vec<usize>, ConfigError> {
        let f = sae.dict_size;
        let bad = |field, problem: String| ConfigError::Groups { field, problem };
        let sizes = if self.group_sizes.is_empty() {
            let fractions = &self.group_fractions;
            if fractions.is_empty() {
                return Err(bad("group_fractions", "give at least one fraction".into()));
            }
            if let Some(v) = fractions.iter().find(|v| !(v.is_finite() && **v > 0.0)) {
                return Err(bad("group_fractions", format!("{v} is not a fraction > 0")));
            }
            let sum: f64 = fractions.iter().sum();
            // math.isclose's default tolerance, as the reference asserts.
            if (sum - 1.0).abs() > 1e-9 {
                return Err(bad("group_fractions", format!("they sum to {sum}, not 1")));
            }
            let mut sizes: Vec<usize> = fractions[..fractions.len() - 1]
                .iter()
                .map(|v| (v * f as f64) as usize)
                .collect();
            let taken: usize = sizes.iter().sum();
            sizes.push(f.saturating_sub(taken));
            if sizes.contains(&0) {
                return Err(bad(
                    "group_fractions",
                    format!(
                        "with dict_size {f} they make an empty group ({sizes:?}); give larger \
                         fractions or group_sizes"
                    ),
                ));
            }
            sizes
        } else {
            let sizes = self.group_sizes.clone();
            let sum: usize = sizes.iter().sum();
            if sizes.contains(&0) || sum != f {
                return Err(bad(
                    "group_sizes",
                    format!("{sizes:?} must be sizes of at least 1 summing to dict_size ({f})"),
                ));
            }
            sizes
        };
        let weights = &self.group_weights;
        if !weights.is_empty() && weights.len() != sizes.len() {
            return Err(bad(
                "group_weights",
                format!("{} weights for {} groups", weights.len(), sizes.len()),
            ));
        }
        if let Some(w) = weights.iter().find(|w| !(w.is_finite() && **w >= 0.0)) {
            return Err(bad("group_weights", format!("{w} is not a weight >= 0")));
        }
        Ok(sizes)
    }

    /// The reconstructions a step's loss weighs: for Matryoshka each prefix of its groups with
    /// weight w_i/G (the reference takes the mean over prefixes of w_i·MSE_i), for every other
    /// architecture the whole dictionary with weight 1. Fails as [`TrainConfig::groups`].
    pub fn prefixes(&self, sae: &SaeConfig) -> Result<Vec<Prefix>, ConfigError> {
        if !matches!(sae.arch, Architecture::Matryoshka { .. }) {
            return Ok(vec![Prefix {
                end: sae.dict_size,
                weight: 1.0,
            }]);
        }
        let sizes = self.groups(sae)?;
        let g = sizes.len();
        let mut end = 0;
        Ok(sizes
            .iter()
            .enumerate()
            .map(|(i, size)| {
                end += size;
                // The reference's default weight is 1/G, so each prefix counts 1/G².
                let w = self
                    .group_weights
                    .get(i)
                    .map_or(1.0 / g as f64, |&w| w as f64);
                Prefix {
                    end,
                    weight: (w / g as f64) as f32,
                }
            })
            .collect())
    }
}

/// The loss term added to the reconstruction MSE.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Penalty {
    /// λ·s(t)·mean_b Σ_j f_bj·n_j, with n_j = ‖W_dec\[j\]‖ when `weight_by_decoder_norm`, else 1.
    L1 {
        /// λ.
        coefficient: f32,
        /// Whether n_j is the decoder row norm.
        weight_by_decoder_norm: bool,
        /// s(t) rises linearly from 0 to 1 over this many steps (0: always 1).
        warmup_steps: u64,
    },
    /// α·AuxK over the dead latents (Gao et al. 2024).
    AuxK {
        /// α.
        alpha: f32,
    },
    /// JumpReLU's c·s(t)·(L0/target − 1)², L0 = mean_b Σ_j H(f_bj − θ_j), differentiated with
    /// respect to θ through the rectangle kernel of width ε (dictionary_learning's
    /// `JumpReluTrainer`; the reference takes the step function of the code f, not of pre).
    L0 {
        /// c.
        coefficient: f32,
        /// The target L0.
        target_l0: f32,
        /// ε, the kernel's bandwidth (also the straight-through estimator's for the
        /// reconstruction's gradient of θ).
        bandwidth: f32,
        /// s(t) rises linearly from 0 to 1 over this many steps (0: always 1).
        warmup_steps: u64,
    },
}

/// The constraint on decoder rows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DecoderConstraint {
    /// Rows move freely.
    Free,
    /// Rows stay unit-norm: the gradient's component along each row is removed before the step
    /// (row normalised as w/(‖w‖ + `project_eps`)) and rows are rescaled by 1/(‖w‖ + `renorm_eps`)
    /// after it. The epsilons are the reference's.
    UnitNorm {
        /// ε added to the norm when projecting the gradient.
        project_eps: f32,
        /// ε added to the norm when renormalising.
        renorm_eps: f32,
    },
}

/// What training does, decided once per run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rules {
    /// Training-time selection.
    pub selection: Selection,
    /// Extra loss term.
    pub penalty: Penalty,
    /// Decoder-row constraint.
    pub decoder: DecoderConstraint,
    /// Clip the global gradient norm to this value before Adam.
    pub max_grad_norm: Option<f32>,
    /// Set b_dec to the geometric median of the first batch before the first step.
    pub init_b_dec_from_median: bool,
    /// Track the inference threshold θ as an EMA of the smallest kept code.
    pub learn_threshold: bool,
    /// Tokens without firing after which a latent is dead: AuxK's latents, and the dead
    /// fraction every architecture reports.
    pub dead_tokens: u64,
}

impl Rules {
    /// The reference behaviour (dictionary_learning 0.1.0) of each architecture.
    pub fn for_config(sae: &SaeConfig, train: &TrainConfig) -> Rules {
        let auxk = Penalty::AuxK {
            alpha: train.auxk_alpha,
        };
        // `set_decoder_norm_to_unit_norm` and `remove_gradient_parallel_to_decoder_directions`.
        let topk_decoder = DecoderConstraint::UnitNorm {
            project_eps: 1e-6,
            renorm_eps: f32::EPSILON,
        };
        match sae.arch {
            Architecture::Relu { variant } => {
                let l1 = |weight_by_decoder_norm| Penalty::L1 {
                    coefficient: train.l1_coefficient,
                    weight_by_decoder_norm,
                    warmup_steps: train.sparsity_warmup_steps,
                };
                match variant {
                    // StandardTrainerAprilUpdate: clips, decoder free.
                    ReluVariant::DecoderNorm => Rules {
                        selection: Selection::of(sae.arch),
                        penalty: l1(true),
                        decoder: DecoderConstraint::Free,
                        max_grad_norm: Some(1.0),
                        init_b_dec_from_median: false,
                        learn_threshold: false,
                        dead_tokens: train.dead_tokens,
                    },
                    // StandardTrainer with ConstrainedAdam: exact unit norm, no clipping.
                    ReluVariant::UnitDecoder => Rules {
                        selection: Selection::of(sae.arch),
                        penalty: l1(false),
                        decoder: DecoderConstraint::UnitNorm {
                            project_eps: 0.0,
                            renorm_eps: 0.0,
                        },
                        max_grad_norm: None,
                        init_b_dec_from_median: false,
                        learn_threshold: false,
                        dead_tokens: train.dead_tokens,
                    },
                }
            }
            Architecture::TopK { .. } => Rules {
                selection: Selection::of(sae.arch),
                penalty: auxk,
                decoder: topk_decoder,
                max_grad_norm: Some(1.0),
                init_b_dec_from_median: true,
                learn_threshold: false,
                dead_tokens: train.dead_tokens,
            },
            // MatryoshkaBatchTopKTrainer is BatchTopKTrainer but for the loss.
            Architecture::BatchTopK { .. } | Architecture::Matryoshka { .. } => Rules {
                selection: Selection::of(sae.arch),
                penalty: auxk,
                decoder: topk_decoder,
                max_grad_norm: Some(1.0),
                init_b_dec_from_median: true,
                learn_threshold: true,
                dead_tokens: train.dead_tokens,
            },
            // JumpReluTrainer: unit-norm decoder as TopK, clipped, no AuxK, b_dec from zero.
            Architecture::JumpRelu => Rules {
                selection: Selection::of(sae.arch),
                penalty: Penalty::L0 {
                    coefficient: train.l0_coefficient,
                    target_l0: train.target_l0,
                    bandwidth: train.jumprelu_bandwidth,
                    warmup_steps: train.sparsity_warmup_steps,
                },
                decoder: topk_decoder,
                max_grad_norm: Some(1.0),
                init_b_dec_from_median: false,
                learn_threshold: false,
                dead_tokens: train.dead_tokens,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_is_spelled_alike_in_flags_files_and_architectures() {
        for name in ArchName::ALL {
            assert_eq!(name.as_str().parse::<ArchName>(), Ok(name));
            assert_eq!(name.to_string(), name.as_str());
            let json = serde_json::to_string(&name).unwrap();
            assert_eq!(json, format!("\"{}\"", name.as_str()));
            assert_eq!(name.with_k(7).name(), name);
            // Only JumpReLU encodes x itself and learns a threshold per latent.
            let jump = name == ArchName::Jumprelu;
            assert_eq!(name.with_k(7).centres_input(), !jump);
            assert_eq!(name.with_k(7).has_latent_thresholds(), jump);
        }
        assert_eq!(ArchName::Topk.with_k(7), Architecture::TopK { k: 7 });
        assert_eq!(ArchName::Batchtopk.with_k(7).k(), Some(7));
        assert_eq!(ArchName::Relu.with_k(7), Architecture::RELU);
        let err = "TopK".parse::<ArchName>().unwrap_err();
        assert!(
            err.contains("relu, topk, batchtopk, jumprelu or matryoshka"),
            "{err}"
        );
        assert_eq!(ArchName::Matryoshka.with_k(7).k(), Some(7));
        assert_eq!(ArchName::Jumprelu.with_k(7), Architecture::JumpRelu);
    }

    #[test]
    fn the_fold_rule_and_the_saelens_names_follow_the_architecture() {
        let names: Vec<_> = ArchName::ALL
            .map(|a| {
                (
                    a.with_k(4).folds_decoder_norms(),
                    a.with_k(4).saelens_name(),
                )
            })
            .into();
        assert_eq!(
            names,
            [
                (true, "standard"),
                (false, "topk"),
                (false, "jumprelu"),
                (false, "jumprelu"),
                (false, "jumprelu")
            ]
        );
    }
}
