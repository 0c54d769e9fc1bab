//! One line of a run's `metrics.jsonl`.

use serde::{Deserialize, Serialize};

use crate::StepStats;

/// The file name, in each SAE's directory.
pub(crate) const FILE: &str = "metrics.jsonl";

/// What a run logs every few steps, one JSON object per line of `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricsRecord {
    /// Steps taken (1 after the first step).
    pub step: u64,
    /// Training rows consumed so far.
    pub tokens: u64,
    /// Learning rate of the last step.
    pub lr: f32,
    /// Optimised loss, mse + penalty.
    pub loss: f32,
    /// mean_b ‖x − x̂‖².
    pub mse: f32,
    /// The architecture's unweighted extra term (AuxK loss or L1).
    pub aux: f32,
    /// Fraction of variance explained on the batch; `null` when undefined.
    pub fve: Option<f32>,
    /// Mean active latents per row.
    pub l0: f32,
    /// Fraction of latents dead.
    pub dead_fraction: f32,
    /// BatchTopK's threshold θ.
    pub threshold: Option<f32>,
    /// Seconds since the run started (excluding earlier sessions of a resumed run).
    pub seconds: f64,
}

impl MetricsRecord {
    /// The record of a step's statistics.
    pub fn new(step: u64, tokens: u64, stats: &StepStats, seconds: f64) -> Self {
        MetricsRecord {
            step,
            tokens,
            lr: stats.lr,
            loss: stats.loss,
            mse: stats.mse,
            aux: stats.aux,
            fve: stats.fve.is_finite().then_some(stats.fve),
            l0: stats.l0,
            dead_fraction: stats.dead_fraction,
            threshold: stats.threshold,
            seconds,
        }
    }
}
