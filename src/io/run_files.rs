//! The records a run leaves beside each SAE for plots and tools: `metrics.jsonl` (one
//! [`MetricsRecord`] per logged step) and `feature_density.npy` (the held-out firing
//! frequencies), and their readers.

use std::io::{BufRead, BufReader};
use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize};

use crate::data::{NpyShards, Source};
use crate::error::{Error, Result};
use crate::StepStats;

/// The metrics file's name, in each SAE's directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

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
fn number_or_null<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f32, D::Error> {
    Ok(Option::<f32>::deserialize(d)?.unwrap_or(f32::NAN))
}

/// Reads a `metrics.jsonl`: one [`MetricsRecord`] JSON object per line; blank lines are
/// skipped, and a `null` figure (a diverged run's, as older versions wrote it) reads as NaN. A last line without its newline that does not parse is skipped too: it is a
/// record the run was writing when it stopped. Anything else malformed is an error naming the
/// file and line.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsRecord>> {
    let file = std::fs::File::open(path).map_err(|e| unreadable(path, e))?;
    let mut reader = BufReader::new(file);
    let mut records = Vec::new();
    let mut line = String::new();
    for line_no in 1.. {
        line.clear();
        let n = reader.read_line(&mut line).map_err(|e| {
            run_file_error(
                path,
                format!("line {line_no} cannot be read ({e})"),
                "it must be UTF-8 text, one JSON metrics record per line, as `sae train` writes",
            )
        })?;
        if n == 0 {
            break;
        }
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<MetricsRecord>(&line) {
            Ok(record) => records.push(record),
            Err(_) if !line.ends_with('\n') && reader.fill_buf().is_ok_and(|b| b.is_empty()) => {
                break;
            }
            Err(e) => {
                return Err(run_file_error(
                    path,
                    format!(
                        "line {line_no}, column {}, is not a metrics record: {}",
                        e.column(),
                        // serde's own position counts lines of this one line.
                        e.to_string().split(" at line ").next().unwrap_or_default()
                    ),
                    "each line must be one JSON object as `sae train` writes it; repair or \
                     delete that line",
                ));
            }
        }
    }
    Ok(records)
}

/// The most latents a `feature_density.npy` may hold: 2^26, twice the largest SAEs published.
const MAX_DENSITY_LATENTS: usize = 1 << 26;

/// Reads a `feature_density.npy`: one firing frequency in [0, 1] per latent, as a 1-D array
/// (or one row) of float32, float16 or float64. When `sae.json` is beside it, the array must
/// hold one frequency per latent of that SAE; it is checked before it is read. Errors name the
/// file.
pub fn read_feature_density(path: &Path) -> Result<Vec<f64>> {
    let fix = "save the evaluation's firing frequencies (EvalStats::firing_frequency_f) as one \
               1-D float32 array";
    // The loader's messages end in advice about activation files; keep their diagnosis only.
    let as_density_error = |e: crate::data::DataError| {
        let message = e.to_string();
        let prefix = format!("{}: ", path.display());
        let problem = message.strip_prefix(&prefix).unwrap_or(&message);
        let problem = problem.rsplit_once("; ").map_or(problem, |(p, _)| p);
        run_file_error(path, problem, fix)
    };
    // Opening a FIFO would block until something writes to it.
    if !std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
        return Err(run_file_error(path, "missing or not a regular file", fix));
    }
    let shards = NpyShards::open(&[path]).map_err(as_density_error)?;
    if shards.n_rows() != 1 {
        let shape = shards
            .shards()
            .next()
            .map(|s| s.1.to_vec())
            .unwrap_or_default();
        return Err(run_file_error(
            path,
            format!("has shape {shape:?}, not one row of per-latent frequencies"),
            fix,
        ));
    }
    // The array is read whole, so its declared length is checked first: against the SAE
    // beside it when there is one, and against a bound on any SAE's.
    let n = shards.d_model();
    let dir = path.parent().unwrap_or(Path::new(""));
    if dir.join(super::CONFIG_FILE).is_file() {
        let f = super::read_config(dir)?.dict_size;
        if n != f {
            return Err(run_file_error(
                path,
                format!(
                    "holds {n} firing frequencies, but the SAE in {} has {f} latents",
                    dir.join(super::CONFIG_FILE).display()
                ),
                fix,
            ));
        }
    }
    if n > MAX_DENSITY_LATENTS {
        return Err(run_file_error(
            path,
            format!("holds {n} firing frequencies, more than the {MAX_DENSITY_LATENTS} latents of any SAE sae reads"),
            fix,
        ));
    }
    let mut freq_f = vec![0.0f32; n];
    shards.read_rows(0, &mut freq_f).map_err(as_density_error)?;
    if let Some((j, v)) = freq_f
        .iter()
        .enumerate()
        .find(|(_, v)| !(0.0..=1.0).contains(*v))
    {
        return Err(run_file_error(
            path,
            format!("latent {j} has firing frequency {v}, outside [0, 1]"),
            fix,
        ));
    }
    Ok(freq_f.into_iter().map(f64::from).collect())
}

fn run_file_error(path: &Path, problem: impl Into<String>, fix: impl Into<String>) -> Error {
    Error::RunFile {
        path: path.to_path_buf(),
        problem: problem.into(),
        fix: fix.into(),
    }
}

fn unreadable(path: &Path, e: std::io::Error) -> Error {
    let fix = if e.kind() == std::io::ErrorKind::NotFound {
        "pass a run directory that `sae train` wrote (it writes metrics.jsonl as it trains)"
    } else {
        "check the file's permissions"
    };
    run_file_error(path, format!("cannot be read ({e})"), fix)
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
