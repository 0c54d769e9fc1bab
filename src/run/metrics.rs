//! One line of a run's `metrics.jsonl`.

use serde::{Deserialize, Deserializer, Serialize};

use crate::StepStats;

/// The file name, in each SAE's directory.
pub(crate) const FILE: &str = "metrics.jsonl";

/// What a run logs every few steps, one JSON object per line of `metrics.jsonl`. A run writes
/// only finite numbers (it stops when training diverges), but older versions wrote a
/// non-finite loss as `null`: such a figure reads back as NaN.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricsRecord {
    /// Steps taken (1 after the first step).
    pub step: u64,
    /// Training rows consumed so far.
    pub tokens: u64,
    /// Learning rate of the last step.
    #[serde(deserialize_with = "number_or_null")]
    pub lr: f32,
    /// Optimised loss, mse + penalty.
    #[serde(deserialize_with = "number_or_null")]
    pub loss: f32,
    /// mean_b ‖x − x̂‖².
    #[serde(deserialize_with = "number_or_null")]
    pub mse: f32,
    /// The architecture's unweighted extra term (AuxK loss or L1).
    #[serde(deserialize_with = "number_or_null")]
    pub aux: f32,
    /// Fraction of variance explained on the batch; `null` when undefined.
    pub fve: Option<f32>,
    /// Mean active latents per row.
    #[serde(deserialize_with = "number_or_null")]
    pub l0: f32,
    /// Fraction of latents dead.
    #[serde(deserialize_with = "number_or_null")]
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

/// A number, or `null` (what serde_json writes for NaN and ±Inf) as NaN.
fn number_or_null<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
    Ok(Option::<f32>::deserialize(d)?.unwrap_or(f32::NAN))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_legacy_null_reads_as_nan() {
        let line = r#"{"step":3,"tokens":96,"lr":0.1,"loss":null,"mse":null,"aux":0.0,"fve":null,"l0":4.0,"dead_fraction":0.0,"threshold":null,"seconds":0.5}"#;
        let record: MetricsRecord = serde_json::from_str(line).unwrap();
        assert!(record.loss.is_nan() && record.mse.is_nan());
        assert_eq!((record.step, record.l0), (3, 4.0));
    }
}
