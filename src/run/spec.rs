//! What a run is asked to do (`config.toml`): data, schedule and one or more SAEs, each field
//! optional until resolved against the data.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use crate::arch::ArchName;
use crate::config::{
    Architecture, ConfigError, ReluVariant, SaeConfig, ThresholdRule, TrainConfig,
};
use crate::synth::{SynthConfig, SynthPreset};

/// A run's configuration, as a TOML file holds it (`sae train --config run.toml`) and as
/// `sae train` writes it back, every default filled in, to `config.toml` in the run directory:
/// that file given back with `--config` repeats the run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunSpec {
    /// Where the activations come from.
    pub data: DataSpec,
    /// The schedule shared by every SAE of the run.
    pub train: ScheduleSpec,
    /// The SAEs trained together on the same batches (a sweep when more than one); none means
    /// one with every default.
    pub sae: Vec<SaeSpec>,
    /// The built-in synthetic dataset's shape, used when `data.paths` is empty.
    pub synthetic: Option<SynthConfig>,
}

/// Training and evaluation data.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSpec {
    /// `.npy` files, directories or globs; empty trains on the built-in synthetic data.
    pub paths: Vec<PathBuf>,
    /// Held-out files to evaluate on (instead of `eval_fraction`).
    pub eval_paths: Vec<PathBuf>,
    /// Fraction of the rows held out for evaluation (default 0.01; 0 disables).
    pub eval_fraction: Option<f64>,
    /// Train on activations scaled to mean norm √D and fold the scale into the saved SAE
    /// (dictionary_learning's `normalize_activations`; default false).
    pub normalize: bool,
    /// Skip rows holding NaN or ±Inf instead of stopping (default false).
    pub skip_non_finite: bool,
    /// Rows of the shuffle buffer (default: [`crate::data::LoaderConfig`]'s; on a stream,
    /// [`crate::data::DEFAULT_BUFFER_BATCHES`] batches).
    pub buffer_rows: Option<usize>,
    /// Rows held out for evaluation from the front of a stream (default 16,384; 0 disables):
    /// a stream has no row count for `eval_fraction` to take a fraction of.
    pub eval_rows: Option<u64>,
    /// Set by the run, not by hand: the rows came through the library ([`super::RunData`])
    /// rather than from `paths`, so resuming needs them handed in again.
    pub given: Option<Given>,
}

/// How a run's rows were handed in through the library ([`super::RunData`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Given {
    /// Random-access rows ([`super::RunData::Rows`]).
    Rows,
    /// A stream of arrays ([`super::RunData::Stream`]).
    Stream,
}

/// The schedule every SAE of a run shares, since they see the same batches.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleSpec {
    /// Rows per batch (default 4096 on data, 1024 on the synthetic set).
    pub batch_size: Option<usize>,
    /// Training steps (default 3000 on the synthetic set, 10,000 on data); or give `tokens`.
    pub steps: Option<u64>,
    /// Training rows; the run takes ⌈tokens / batch_size⌉ steps.
    pub tokens: Option<u64>,
    /// Seed of the initialisation, the batch order and the synthetic data (default 0).
    pub seed: Option<u64>,
    /// Steps between lines of `metrics.jsonl` (default 10).
    pub metrics_every: Option<u64>,
    /// Steps between checkpoints (default: none until the end or an interrupt).
    pub checkpoint_every: Option<u64>,
    /// Memory the run may use (`"8GiB"`), instead of what the machine has free.
    pub max_memory: Option<crate::memory::ByteSize>,
}

/// A run's schedule with every default applied: what a [`super::Run`] runs, with nothing
/// left to resolve (the checked form of [`ScheduleSpec`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Rows per batch, at least 1.
    pub batch_size: usize,
    /// Training steps, at least 1.
    pub steps: u64,
    /// Seed of the initialisation, the batch order and the synthetic data.
    pub seed: u64,
    /// Steps between lines of `metrics.jsonl`, at least 1.
    pub metrics_every: u64,
    /// Steps between periodic checkpoints (at least 1), or none: then a checkpoint is written
    /// only on a stop request and at the last step.
    pub checkpoint_every: Option<u64>,
}

/// Why a written run configuration (`config.toml`) does not give a whole [`Schedule`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// A key every resolved configuration holds is missing.
    #[error("`{0}` is missing")]
    Missing(&'static str),
    /// A key is 0 where it must be at least 1.
    #[error("`{0}` is 0; it must be at least 1")]
    Zero(&'static str),
    /// Two keys that cannot both be given.
    #[error("`{0}` and `{1}` are both set; a resolved configuration has only `{0}`")]
    Contradiction(&'static str, &'static str),
}

impl ScheduleSpec {
    /// The schedule a resolved spec (as `config.toml` holds it) describes: every key set, none
    /// contradicting another.
    pub fn resolved(&self) -> Result<Schedule, ScheduleError> {
        use ScheduleError::{Contradiction, Missing, Zero};
        if self.tokens.is_some() {
            return Err(Contradiction("train.steps", "train.tokens"));
        }
        let batch_size = self.batch_size.ok_or(Missing("train.batch_size"))?;
        let steps = self.steps.ok_or(Missing("train.steps"))?;
        let seed = self.seed.ok_or(Missing("train.seed"))?;
        let metrics_every = self.metrics_every.ok_or(Missing("train.metrics_every"))?;
        for (key, value) in [
            ("train.batch_size", batch_size as u64),
            ("train.steps", steps),
            ("train.metrics_every", metrics_every),
            ("train.checkpoint_every", self.checkpoint_every.unwrap_or(1)),
        ] {
            if value == 0 {
                return Err(Zero(key));
            }
        }
        Ok(Schedule {
            batch_size,
            steps,
            seed,
            metrics_every,
            checkpoint_every: self.checkpoint_every,
        })
    }
}

/// One SAE of a run. Unset fields take the defaults [`SaeSpec::resolve`] documents.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SaeSpec {
    /// Subdirectory of a sweep's run directory (default: from arch, k, F and λ).
    pub name: Option<String>,
    /// Sparsity rule (default batchtopk).
    pub arch: Option<ArchName>,
    /// Active latents per row for topk, batchtopk and matryoshka, and the target L0 of
    /// jumprelu's penalty (default 8 on the synthetic set, 32 on its hard preset, 64 on data).
    pub k: Option<usize>,
    /// F, the number of latents (default 512 on the synthetic set, its G = 4096 on the hard
    /// preset, 8·D on data).
    pub dict_size: Option<usize>,
    /// F as a multiple of D, instead of `dict_size`.
    pub expansion: Option<usize>,
    /// Peak learning rate (default 5e-3 on the synthetic set; on data the library's
    /// [`TrainConfig::learning_rate`]).
    pub lr: Option<f32>,
    /// ReLU's L1 coefficient λ (default 0.3 on the synthetic set, 5 on data).
    pub l1: Option<f32>,
    /// ReLU's L1 formulation (default decoder_norm).
    pub relu_variant: Option<ReluVariant>,
    /// Learning-rate warm-up steps (default min(1000, steps/10); 100 at most on the
    /// synthetic set).
    pub warmup_steps: Option<u64>,
    /// Step where the learning rate starts its linear decay to 0 (default 80% of the steps).
    pub decay_start: Option<u64>,
    /// Weight of the AuxK loss (default 1/32).
    pub auxk_alpha: Option<f32>,
    /// Tokens without firing after which a latent is dead (default on data a tenth of the
    /// run's tokens, at most 10M; 20 batches on the synthetic set).
    pub dead_tokens: Option<u64>,
    /// BatchTopK: θ's moving average updates on the steps after this one (default
    /// min(1000, steps/2)).
    pub threshold_start_step: Option<u64>,
    /// BatchTopK: the weight β of the old θ in its moving average (default 0.999).
    pub threshold_beta: Option<f64>,
    /// JumpReLU: the L0 penalty's coefficient c (default 1).
    pub l0_coefficient: Option<f32>,
    /// JumpReLU: the bandwidth ε of the thresholds' straight-through estimator (default 0.001).
    pub jumprelu_bandwidth: Option<f32>,
    /// BatchTopK and Matryoshka: how the saved θ is set, `ema` (the reference's moving
    /// average, the default) or `calibrate` (the k·N-th largest code of 65,536 rows drawn at
    /// the end of training).
    pub threshold: Option<ThresholdRule>,
    /// Matryoshka: the nested groups' sizes, summing to F (default: from `group_fractions`).
    pub group_sizes: Option<Vec<usize>>,
    /// Matryoshka: the fraction of F in each group (default 1/32, 1/16, 1/8, 1/4, 17/32).
    pub group_fractions: Option<Vec<f64>>,
    /// Matryoshka: each prefix's weight in the loss (default 1/G each, the reference's).
    pub group_weights: Option<Vec<f32>>,
    /// Steps between resamplings of the dead latents (default none: never, as the
    /// reference's trainers).
    pub resample_every: Option<u64>,
    /// Resampling: a new encoder row's norm as a multiple of the live latents' mean (default
    /// 0.2, Anthropic 2023).
    pub resample_encoder_scale: Option<f32>,
    /// How the encoder GEMM rounds, `f32` (the default) or `bf16` ([`crate::Precision`]).
    pub precision: Option<crate::Precision>,
}

/// Peak learning rate on the synthetic data.
const SYNTH_LR: f32 = 5e-3;
/// ReLU's L1 coefficient on the synthetic data.
const SYNTH_L1: f32 = 0.3;

/// What a spec's defaults depend on: the data's width and whether it is the synthetic set, and
/// the run's schedule.
#[derive(Clone, Copy, Debug)]
pub struct Context {
    /// D.
    pub d_model: usize,
    /// Whether the rows come from the built-in synthetic set.
    pub synthetic: bool,
    /// Steps of the run.
    pub steps: u64,
    /// Rows per batch.
    pub batch_size: usize,
}

impl SaeSpec {
    /// The SAE and recipe this spec asks for in `cx`, every default applied: the spec with
    /// every field filled in (what `config.toml` records) and the library's configs.
    ///
    /// The library's own defaults (lr 2e-4/√(F/2¹⁴) or 5e-5, λ = 5, warm-ups of 1000–2000
    /// steps) are for runs of ~10⁴ steps or more on activations normalised to E‖x‖ = √D. The
    /// synthetic rows have E‖x‖ ≈ 2.3 and its runs are short, so it gets its own learning rate
    /// and λ (they recover ≥ 98% of the true features with every architecture at the default
    /// size), and warm-ups shrink to fit short runs.
    pub fn resolve(&self, cx: Context) -> Result<(SaeSpec, SaeConfig, TrainConfig), ConfigError> {
        let defaults = TrainConfig::default();
        let arch_name = self.arch.unwrap_or(ArchName::Batchtopk);
        let k = self.k.unwrap_or(if cx.synthetic { 8 } else { 64 });
        let arch = match arch_name.with_k(k) {
            Architecture::Relu { .. } => Architecture::Relu {
                variant: self.relu_variant.unwrap_or_default(),
            },
            arch => arch,
        };
        let dict_size = match (self.dict_size, self.expansion) {
            (Some(_), Some(_)) => return Err(ConfigError::DictSizeAndExpansion),
            (Some(f), None) => f,
            (None, Some(e)) => e.checked_mul(cx.d_model).ok_or(ConfigError::TooLarge {
                field: "expansion",
                size: format!("{e} × {} (d_model) latents", cx.d_model),
            })?,
            (None, None) if cx.synthetic => 512,
            (None, None) => 8 * cx.d_model,
        };
        let sae = SaeConfig {
            d_model: cx.d_model,
            dict_size,
            arch,
        };
        let steps = cx.steps;
        // dictionary_learning warms up for 1000 steps; short runs use their first tenth, and
        // the synthetic set (runs of a few thousand steps) 100 steps at most.
        let warmup_cap = if cx.synthetic {
            100
        } else {
            defaults.warmup_steps
        };
        let warmup_steps = self.warmup_steps.unwrap_or((steps / 10).min(warmup_cap));
        // λ's warm-up (ReLU) and θ's start (BatchTopK) use the first half of short runs.
        let sparsity_warmup_steps = defaults.sparsity_warmup_steps.min(steps / 2);
        let decay_start = self.decay_start.or_else(|| {
            let start = steps / 5 * 4;
            (start > warmup_steps && start > sparsity_warmup_steps && start < steps)
                .then_some(start)
        });
        let lr = self.lr.or(cx.synthetic.then_some(SYNTH_LR));
        let relu = arch_name == ArchName::Relu;
        // θ's knobs mean nothing to the architectures that learn no batch threshold.
        let batchtopk = matches!(arch_name, ArchName::Batchtopk | ArchName::Matryoshka);
        let matryoshka = arch_name == ArchName::Matryoshka;
        let jumprelu = arch_name == ArchName::Jumprelu;
        // λ means nothing to topk and batchtopk: they keep the library's value, so a resolved
        // spec (which omits it) resolves to the same recipe.
        let l1_coefficient = match self.l1 {
            Some(l1) if relu => l1,
            _ if relu && cx.synthetic => SYNTH_L1,
            _ => defaults.l1_coefficient,
        };
        let dead_tokens = self.dead_tokens.unwrap_or(if cx.synthetic {
            // Synthetic runs are short: a latent is dead after 20 batches without firing.
            20u64.saturating_mul(cx.batch_size as u64)
        } else {
            dead_window(defaults.dead_tokens, steps, cx.batch_size)
        });
        let train = TrainConfig {
            total_steps: steps,
            lr,
            warmup_steps,
            decay_start,
            l1_coefficient,
            sparsity_warmup_steps,
            auxk_alpha: self.auxk_alpha.unwrap_or(defaults.auxk_alpha),
            dead_tokens,
            threshold_start_step: self
                .threshold_start_step
                .unwrap_or(defaults.threshold_start_step.min(steps / 2)),
            threshold_beta: self.threshold_beta.unwrap_or(defaults.threshold_beta),
            threshold_rule: self.threshold.unwrap_or_default(),
            // JumpReLU's penalty aims at k active latents per row, the budget the other
            // architectures select.
            target_l0: if jumprelu {
                k as f32
            } else {
                defaults.target_l0
            },
            l0_coefficient: self.l0_coefficient.unwrap_or(defaults.l0_coefficient),
            jumprelu_bandwidth: self
                .jumprelu_bandwidth
                .unwrap_or(defaults.jumprelu_bandwidth),
            group_sizes: self.group_sizes.clone().unwrap_or_default(),
            group_fractions: self
                .group_fractions
                .clone()
                .unwrap_or(defaults.group_fractions),
            group_weights: self.group_weights.clone().unwrap_or_default(),
            resample_every: self.resample_every,
            resample_encoder_scale: self
                .resample_encoder_scale
                .unwrap_or(defaults.resample_encoder_scale),
            precision: self.precision.unwrap_or_default(),
            ..defaults
        };
        train.validate(&sae)?;
        if self.threshold == Some(ThresholdRule::Calibrate) && !batchtopk {
            return Err(ConfigError::CalibrateWithoutThreshold(arch_name.as_str()));
        }
        if let Some(start) = self.threshold_start_step.filter(|_| batchtopk) {
            // The default shrinks to fit any run; a value set by hand must fit this one.
            if start.saturating_add(1) >= steps {
                return Err(ConfigError::ThresholdStartNotBeforeEnd {
                    threshold_start_step: start,
                    total_steps: steps,
                });
            }
        }
        // Recorded as a number (and Matryoshka's groups as sizes), so config.toml says what
        // the run used and resolves to the same recipe.
        let group_sizes = if matryoshka {
            train.groups(&sae)?
        } else {
            train.group_sizes.clone()
        };
        let train = TrainConfig {
            lr: Some(train.learning_rate(&sae)),
            group_sizes,
            ..train
        };
        let resolved = SaeSpec {
            name: Some(
                self.name
                    .clone()
                    .unwrap_or_else(|| default_name(&sae, &train)),
            ),
            arch: Some(arch_name),
            k: (!relu).then_some(k),
            dict_size: Some(dict_size),
            expansion: None,
            lr: train.lr,
            l1: relu.then_some(l1_coefficient),
            relu_variant: match arch {
                Architecture::Relu { variant } => Some(variant),
                _ => None,
            },
            warmup_steps: Some(warmup_steps),
            decay_start,
            auxk_alpha: (!relu).then_some(train.auxk_alpha),
            dead_tokens: Some(dead_tokens),
            threshold_start_step: batchtopk.then_some(train.threshold_start_step),
            threshold_beta: batchtopk.then_some(train.threshold_beta),
            threshold: batchtopk.then_some(train.threshold_rule),
            l0_coefficient: jumprelu.then_some(train.l0_coefficient),
            jumprelu_bandwidth: jumprelu.then_some(train.jumprelu_bandwidth),
            // The sizes the fractions gave, so config.toml says what the run used.
            group_sizes: matryoshka.then(|| train.group_sizes.clone()),
            group_fractions: None,
            group_weights: (matryoshka && !train.group_weights.is_empty())
                .then(|| train.group_weights.clone()),
            resample_every: train.resample_every,
            resample_encoder_scale: train.resample_every.map(|_| train.resample_encoder_scale),
            // Recorded when not the default, so the files of f32 runs stay as they were.
            precision: (train.precision != crate::Precision::F32).then_some(train.precision),
        };
        Ok((resolved, sae, train))
    }
}

impl SaeSpec {
    /// This spec with the synthetic set's own SAE size filled in where it leaves k and F
    /// unset. The hard preset gets k = the power of two at or above its mean L0 and F = its
    /// number of true features (k = 32, F = 4096 as shipped): enough latents for every feature
    /// and a budget above the active count. The default preset keeps [`SaeSpec::resolve`]'s
    /// 8 and 512, which its figures were measured with.
    pub fn with_synthetic_defaults(&self, synth: &SynthConfig) -> SaeSpec {
        let mut spec = self.clone();
        if synth.preset == SynthPreset::Hard {
            let k = (synth.mean_active.ceil() as usize)
                .max(1)
                .next_power_of_two();
            spec.k = spec.k.or(Some(k));
            if spec.dict_size.is_none() && spec.expansion.is_none() {
                spec.dict_size = Some(synth.n_features);
            }
        }
        spec
    }
}

/// The dead-latent window of a run on data whose user set none: the reference's 10M tokens
/// (Gao et al. 2024, dictionary_learning) for runs of 100M tokens and more, else a tenth of the
/// run, and at least one batch. A fixed 10M would outlast any shorter run, so AuxK would never
/// see a latent that died early; a tenth leaves AuxK the other nine to revive it, much as
/// SAELens' `dead_feature_window` of 1000 steps does for its runs of tens of thousands.
fn dead_window(reference: u64, steps: u64, batch_size: usize) -> u64 {
    let tokens = steps.saturating_mul(batch_size as u64);
    reference.min(tokens / 10).max(batch_size as u64)
}

/// `batchtopk-k64-f16384`, `relu-l1_5-f4096`: what tells the SAEs of a sweep apart.
fn default_name(sae: &SaeConfig, train: &TrainConfig) -> String {
    let precision = match train.precision {
        crate::Precision::F32 => "",
        crate::Precision::Bf16 => "-bf16",
    };
    let name = match sae.arch {
        Architecture::Relu { .. } => format!("relu-l1_{}-f{}", train.l1_coefficient, sae.dict_size),
        Architecture::TopK { k } => format!("topk-k{k}-f{}", sae.dict_size),
        Architecture::BatchTopK { k } => format!("batchtopk-k{k}-f{}", sae.dict_size),
        Architecture::JumpRelu => format!("jumprelu-l0_{}-f{}", train.target_l0, sae.dict_size),
        Architecture::Matryoshka { k } => format!("matryoshka-k{k}-f{}", sae.dict_size),
    };
    name + precision
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cx(synthetic: bool) -> Context {
        Context {
            d_model: 64,
            synthetic,
            steps: 3000,
            batch_size: 1024,
        }
    }

    #[test]
    fn defaults_depend_on_the_data() {
        let (spec, sae, train) = SaeSpec::default().resolve(cx(true)).unwrap();
        assert_eq!(sae.arch, Architecture::BatchTopK { k: 8 });
        assert_eq!(sae.dict_size, 512);
        assert_eq!(train.lr, Some(SYNTH_LR));
        assert_eq!(spec.name.as_deref(), Some("batchtopk-k8-f512"));
        let (_, sae, train) = SaeSpec::default().resolve(cx(false)).unwrap();
        assert_eq!(sae.dict_size, 8 * 64);
        assert_eq!(sae.arch.k(), Some(64));
        let library_default = TrainConfig::default().learning_rate(&sae);
        assert_eq!(train.lr, Some(library_default));
        // 3000 steps of 1024 rows: a tenth of the run's 3.07M tokens.
        assert_eq!(train.dead_tokens, 307_200);
    }

    #[test]
    fn the_dead_window_is_a_tenth_of_a_short_run_and_the_references_for_long_ones() {
        assert_eq!(dead_window(10_000_000, 3000, 1024), 307_200);
        // 100M tokens and more: the reference's 10M.
        assert_eq!(dead_window(10_000_000, 25_000, 4096), 10_000_000);
        // Never less than a batch.
        assert_eq!(dead_window(10_000_000, 5, 64), 64);
        let set = SaeSpec {
            dead_tokens: Some(123),
            ..SaeSpec::default()
        };
        assert_eq!(set.resolve(cx(false)).unwrap().2.dead_tokens, 123);
    }

    #[test]
    fn the_hard_preset_sizes_the_sae_to_its_features() {
        let hard = SynthConfig::hard();
        let cx = Context {
            d_model: hard.d_model,
            ..cx(true)
        };
        let spec = SaeSpec::default().with_synthetic_defaults(&hard);
        let (resolved, sae, _) = spec.resolve(cx).unwrap();
        assert_eq!((sae.dict_size, sae.arch.k()), (4096, Some(32)));
        assert_eq!(resolved.name.as_deref(), Some("batchtopk-k32-f4096"));
        // Given values win, and so does an expansion instead of F.
        let given = SaeSpec {
            k: Some(16),
            expansion: Some(4),
            ..SaeSpec::default()
        };
        let (_, sae, _) = given.with_synthetic_defaults(&hard).resolve(cx).unwrap();
        assert_eq!((sae.dict_size, sae.arch.k()), (1024, Some(16)));
        // k follows the mean L0 up to a power of two; the default preset is left as it was.
        let sparse = SynthConfig {
            mean_active: 40.5,
            ..hard
        };
        assert_eq!(
            SaeSpec::default().with_synthetic_defaults(&sparse).k,
            Some(64)
        );
        let default = SaeSpec::default().with_synthetic_defaults(&SynthConfig::default());
        assert_eq!(default, SaeSpec::default());
    }

    #[test]
    fn precision_is_read_from_toml_recorded_when_bf16_and_named() {
        let spec: SaeSpec = toml::from_str("precision = \"bf16\"").unwrap();
        let (resolved, _, train) = spec.resolve(cx(true)).unwrap();
        assert_eq!(train.precision, crate::Precision::Bf16);
        assert_eq!(resolved.precision, Some(crate::Precision::Bf16));
        assert_eq!(resolved.name.as_deref(), Some("batchtopk-k8-f512-bf16"));
        assert_eq!(resolved.resolve(cx(true)).unwrap().2, train);
        // f32, the default, leaves the files of f32 runs as they were.
        let (resolved, _, train) = SaeSpec::default().resolve(cx(true)).unwrap();
        assert_eq!(
            (resolved.precision, train.precision),
            (None, crate::Precision::F32)
        );
        let written = toml::to_string(&resolved).unwrap();
        assert!(!written.contains("precision"), "{written}");
        let bad = toml::from_str::<SaeSpec>("precision = \"fp8\"").unwrap_err();
        assert!(
            bad.to_string().contains("f32") && bad.to_string().contains("bf16"),
            "{bad}"
        );
    }

    #[test]
    fn the_resolved_spec_resolves_to_the_same_configs() {
        for arch in ArchName::ALL {
            let spec = SaeSpec {
                arch: Some(arch),
                expansion: Some(4),
                l1: Some(2.0),
                ..SaeSpec::default()
            };
            let (resolved, sae, train) = spec.resolve(cx(false)).unwrap();
            let (again, sae2, train2) = resolved.resolve(cx(false)).unwrap();
            assert_eq!((again, sae2, train2), (resolved, sae, train));
        }
    }

    #[test]
    fn matryoshka_records_its_groups_and_jumprelu_its_penalty() {
        let spec = SaeSpec {
            arch: Some(ArchName::Matryoshka),
            group_fractions: Some(vec![0.25, 0.75]),
            group_weights: Some(vec![1.0, 3.0]),
            ..SaeSpec::default()
        };
        let (resolved, _, train) = spec.resolve(cx(false)).unwrap();
        // F = 8·64: the fractions become sizes, which is what config.toml records.
        assert_eq!(resolved.group_sizes, Some(vec![128, 384]));
        assert_eq!(resolved.group_fractions, None);
        assert_eq!(resolved.group_weights, Some(vec![1.0, 3.0]));
        assert_eq!(train.group_weights, vec![1.0, 3.0]);
        assert!(resolved.threshold_beta.is_some());
        let spec = SaeSpec {
            arch: Some(ArchName::Jumprelu),
            k: Some(24),
            l0_coefficient: Some(0.5),
            ..SaeSpec::default()
        };
        let (resolved, _, train) = spec.resolve(cx(false)).unwrap();
        assert_eq!((train.target_l0, train.l0_coefficient), (24.0, 0.5));
        assert_eq!(resolved.l0_coefficient, Some(0.5));
        assert_eq!(resolved.jumprelu_bandwidth, Some(0.001));
        assert_eq!(
            (resolved.group_sizes, resolved.threshold_beta),
            (None, None)
        );
    }

    #[test]
    fn dict_size_and_expansion_together_are_rejected() {
        let spec = SaeSpec {
            dict_size: Some(128),
            expansion: Some(2),
            ..SaeSpec::default()
        };
        assert_eq!(
            spec.resolve(cx(false)).unwrap_err(),
            ConfigError::DictSizeAndExpansion
        );
    }

    #[test]
    fn invalid_fields_are_the_library_errors() {
        let zero_k = SaeSpec {
            k: Some(0),
            ..SaeSpec::default()
        };
        assert_eq!(zero_k.resolve(cx(true)).unwrap_err(), ConfigError::ZeroK);
        let late_warmup = SaeSpec {
            warmup_steps: Some(5000),
            ..SaeSpec::default()
        };
        assert!(matches!(
            late_warmup.resolve(cx(true)).unwrap_err(),
            ConfigError::WarmupNotBeforeEnd { .. }
        ));
    }

    #[test]
    fn the_threshold_knobs_reach_the_recipe_and_are_recorded_for_batchtopk_only() {
        let knobs = |arch| SaeSpec {
            arch: Some(arch),
            auxk_alpha: Some(0.25),
            dead_tokens: Some(777),
            threshold_start_step: Some(10),
            threshold_beta: Some(0.9),
            ..SaeSpec::default()
        };
        let (resolved, _, train) = knobs(ArchName::Batchtopk).resolve(cx(false)).unwrap();
        assert_eq!(
            (train.auxk_alpha, train.dead_tokens),
            (0.25, 777),
            "{train:?}"
        );
        assert_eq!(
            (train.threshold_start_step, train.threshold_beta),
            (10, 0.9)
        );
        assert_eq!(resolved.threshold_start_step, Some(10));
        assert_eq!(resolved.threshold_beta, Some(0.9));
        // The resolved spec resolves to the same recipe, as config.toml repeats a run.
        assert_eq!(resolved.resolve(cx(false)).unwrap().2, train);
        let (resolved, _, _) = knobs(ArchName::Topk).resolve(cx(false)).unwrap();
        assert_eq!(
            (resolved.threshold_start_step, resolved.threshold_beta),
            (None, None)
        );
    }

    #[test]
    fn resampling_reaches_the_recipe_and_is_recorded_only_when_on() {
        let on = SaeSpec {
            resample_every: Some(50),
            resample_encoder_scale: Some(0.5),
            ..SaeSpec::default()
        };
        let (resolved, _, train) = on.resolve(cx(false)).unwrap();
        assert_eq!(
            (train.resample_every, train.resample_encoder_scale),
            (Some(50), 0.5)
        );
        assert_eq!(
            (resolved.resample_every, resolved.resample_encoder_scale),
            (Some(50), Some(0.5))
        );
        assert_eq!(resolved.resolve(cx(false)).unwrap().2, train);
        let (resolved, _, train) = SaeSpec::default().resolve(cx(false)).unwrap();
        assert_eq!(train.resample_every, None);
        assert_eq!(
            (resolved.resample_every, resolved.resample_encoder_scale),
            (None, None)
        );
    }

    #[test]
    fn invalid_threshold_knobs_are_errors_naming_the_field() {
        let spec = |start, beta| SaeSpec {
            threshold_start_step: start,
            threshold_beta: beta,
            ..SaeSpec::default()
        };
        // cx's run has 3000 steps: θ's last update is at step 2999, after a start of 2998.
        assert!(spec(Some(2998), None).resolve(cx(false)).is_ok());
        assert_eq!(
            spec(Some(2999), None).resolve(cx(false)).unwrap_err(),
            ConfigError::ThresholdStartNotBeforeEnd {
                threshold_start_step: 2999,
                total_steps: 3000
            }
        );
        assert!(matches!(
            spec(None, Some(1.0)).resolve(cx(false)).unwrap_err(),
            ConfigError::Beta {
                name: "threshold_beta",
                ..
            }
        ));
        // TopK learns no θ: its start is not checked against the run.
        let topk = SaeSpec {
            arch: Some(ArchName::Topk),
            ..spec(Some(2999), None)
        };
        assert!(topk.resolve(cx(false)).is_ok());
    }

    #[test]
    fn a_resolved_schedule_needs_every_key_and_no_contradiction() {
        let full = ScheduleSpec {
            batch_size: Some(32),
            steps: Some(10),
            seed: Some(1),
            metrics_every: Some(5),
            ..ScheduleSpec::default()
        };
        let schedule = full.resolved().unwrap();
        assert_eq!((schedule.batch_size, schedule.steps), (32, 10));
        assert_eq!(schedule.checkpoint_every, None);
        let without = |edit: fn(&mut ScheduleSpec)| {
            let mut spec = full.clone();
            edit(&mut spec);
            spec.resolved().unwrap_err()
        };
        use ScheduleError::*;
        assert_eq!(
            without(|s| s.batch_size = None),
            Missing("train.batch_size")
        );
        assert_eq!(without(|s| s.steps = None), Missing("train.steps"));
        assert_eq!(without(|s| s.seed = None), Missing("train.seed"));
        assert_eq!(
            without(|s| s.metrics_every = None),
            Missing("train.metrics_every")
        );
        assert_eq!(
            without(|s| s.batch_size = Some(0)),
            Zero("train.batch_size")
        );
        assert_eq!(
            without(|s| s.checkpoint_every = Some(0)),
            Zero("train.checkpoint_every")
        );
        assert_eq!(
            without(|s| s.tokens = Some(100)),
            Contradiction("train.steps", "train.tokens")
        );
    }

    #[test]
    fn a_config_file_parses_and_unknown_keys_are_rejected() {
        let text = r#"
            [data]
            paths = ["acts/"]
            normalize = true
            [train]
            batch_size = 2048
            tokens = 1000000
            [[sae]]
            arch = "topk"
            k = 32
            [[sae]]
            arch = "relu"
            l1 = 3.0
            relu_variant = "unit_decoder"
        "#;
        let spec: RunSpec = toml::from_str(text).unwrap();
        assert_eq!(spec.sae.len(), 2);
        assert_eq!(spec.sae[1].relu_variant, Some(ReluVariant::UnitDecoder));
        assert_eq!(spec.train.tokens, Some(1_000_000));
        let err = toml::from_str::<RunSpec>("[train]\nbatch = 3\n").unwrap_err();
        assert!(err.to_string().contains("batch"), "{err}");
    }
}
