//! Evaluation of an SAE on rows it was not trained on: reconstruction error, variance
//! explained, direction and norm of the reconstructions, sparsity and how often each latent
//! fires, streamed in batches so any number of rows fits in memory.

use std::sync::atomic::{AtomicBool, Ordering};

use ndarray::{Array2, ArrayView2, Axis};
use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::data::{DataError, Source};
use crate::dist::{self, Collective, SingleProcess};
use crate::error::{Error, Result};
use crate::sae::Sae;
use crate::select::Codes;

/// What an SAE does on a set of rows, as inference-time encode and decode.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalStats {
    /// Rows evaluated.
    pub n_rows: u64,
    /// mean_n ‖x − x̂‖².
    pub mse: f64,
    /// Fraction of variance explained, 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² with x̄ the mean of these
    /// rows; NaN if they have no variance.
    pub fve: f64,
    /// Mean active latents per row.
    pub l0: f64,
    /// Fraction of latents that fired on none of the rows.
    pub dead_fraction: f64,
    /// Rows left out because they hold NaN or ±Inf (with `skip_non_finite`).
    pub skipped_rows: u64,
    /// mean_n cos(x, x̂) over the rows with x ≠ 0 (a zero x has no direction to match); a row
    /// reconstructed as x̂ = 0 counts as 0. NaN if every row is zero.
    pub cosine: f64,
    /// mean_n ‖x̂‖/‖x‖ over the rows with x ≠ 0: below 1 when the sparsity penalty shrinks the
    /// codes. NaN if every row is zero.
    pub shrinkage: f64,
    /// Rows with x = 0, left out of `cosine` and `shrinkage` (but not of the other figures).
    pub zero_rows: u64,
    /// How many of the evaluated rows each latent fired on (length F). Left out of the JSON
    /// form, where F numbers would bury the summary; save
    /// [`firing_frequency_f`](Self::firing_frequency_f) beside it instead.
    #[serde(skip)]
    pub firing_counts_f: Vec<u64>,
}

impl EvalStats {
    /// Fraction of the evaluated rows each latent fired on (length F, each in [0, 1]).
    pub fn firing_frequency_f(&self) -> Vec<f64> {
        let n = self.n_rows.max(1) as f64;
        self.firing_counts_f.iter().map(|&c| c as f64 / n).collect()
    }

    /// The log10 firing-frequency histogram of the latents, `bins_per_decade` bins to a
    /// factor of ten.
    pub fn density_histogram(&self, bins_per_decade: usize) -> Result<DensityHistogram> {
        DensityHistogram::new(&self.firing_frequency_f(), bins_per_decade)
    }
}

/// How the latents' firing frequencies spread over orders of magnitude: counts of
/// log10(frequency) in equal bins, with the latents that never fired counted apart (their
/// logarithm is −∞).
#[derive(Clone, Debug, PartialEq)]
pub struct DensityHistogram {
    /// Bin edges in log10(frequency), ascending; length `counts.len() + 1`. The first is a
    /// whole decade at or below the rarest firing latent, the last 0 (a latent firing on every
    /// row). Bin i holds `edges_log10[i] ≤ log10 f < edges_log10[i + 1]`, the last bin also
    /// its upper edge.
    pub edges_log10: Vec<f64>,
    /// Latents in each bin.
    pub counts: Vec<u64>,
    /// Latents with frequency 0.
    pub dead: u64,
}

impl DensityHistogram {
    /// Bins `firing_frequency_f` (each in [0, 1]) with `bins_per_decade` bins to a decade
    /// (at least 1). The bins span at least one decade, [−1, 0], when no latent fires or all
    /// fire at frequencies above 0.1. A frequency that is NaN or outside [0, 1] is an error
    /// naming the latent.
    pub fn new(firing_frequency_f: &[f64], bins_per_decade: usize) -> Result<Self> {
        if let Some((j, &v)) = firing_frequency_f
            .iter()
            .enumerate()
            .find(|(_, v)| !(0.0..=1.0).contains(*v))
        {
            return Err(Error::OutOfRange {
                what: format!("firing frequency of latent {j}"),
                value: v,
                range: "[0, 1]".into(),
            });
        }
        let bins_per_decade = bins_per_decade.max(1);
        let rarest = firing_frequency_f
            .iter()
            .filter(|&&v| v > 0.0)
            .fold(1.0f64, |a, &b| a.min(b));
        // Whole decades keep bin edges at round numbers; the smallest positive f64 is 1e-324,
        // so there are at most 324 of them.
        let decades = (-rarest.log10().floor()).max(1.0) as usize;
        let n_bins = decades * bins_per_decade;
        let edges_log10 = (0..=n_bins)
            .map(|i| -(decades as f64) + i as f64 / bins_per_decade as f64)
            .collect();
        let mut counts = vec![0u64; n_bins];
        let mut dead = 0u64;
        for &v in firing_frequency_f {
            if v == 0.0 {
                dead += 1;
            } else {
                let pos = (v.log10() + decades as f64) * bins_per_decade as f64;
                counts[(pos.floor().max(0.0) as usize).min(n_bins - 1)] += 1;
            }
        }
        Ok(DensityHistogram {
            edges_log10,
            counts,
            dead,
        })
    }
}

/// Encodes and decodes every row of `source`, `batch_rows` at a time. A row holding NaN or
/// ±Inf is an error naming where it lives, or with `skip_non_finite` is left out and counted.
pub fn evaluate(
    sae: &Sae,
    backend: &dyn Backend,
    source: &dyn Source,
    batch_rows: usize,
    skip_non_finite: bool,
) -> Result<EvalStats> {
    let never = AtomicBool::new(false);
    let stats = evaluate_by(
        sae,
        source,
        batch_rows,
        skip_non_finite,
        &never,
        Procs::of(&SingleProcess),
        &mut |x_bd| sae.encode(backend, x_bd),
    )?;
    Ok(stats.expect("the stop flag is never set"))
}

/// [`evaluate`] with the encoder (the GEMM and the selection) on `device`; decoding and the
/// statistics stay on the host.
pub fn evaluate_on(
    sae: &Sae,
    device: crate::backend::Device,
    source: &dyn Source,
    batch_rows: usize,
    skip_non_finite: bool,
) -> Result<EvalStats> {
    let never = AtomicBool::new(false);
    let stats = evaluate_on_until(sae, device, source, batch_rows, skip_non_finite, &never)?;
    Ok(stats.expect("the stop flag is never set"))
}

/// [`evaluate_on`] that checks `stop` before each batch and gives `None` once it is set, so a
/// caller's Ctrl-C ends a long evaluation within a batch.
pub fn evaluate_on_until(
    sae: &Sae,
    device: crate::backend::Device,
    source: &dyn Source,
    batch_rows: usize,
    skip_non_finite: bool,
    stop: &AtomicBool,
) -> Result<Option<EvalStats>> {
    evaluate_on_until_across(
        sae,
        device,
        source,
        batch_rows,
        skip_non_finite,
        stop,
        &SingleProcess,
    )
}

/// [`evaluate_on_until`] shared by the processes of `collective`: every process opens the
/// same `source`, evaluates its part of the rows ([`dist::part`]) and the sums are added
/// across processes, so every process returns the same statistics, those of all the rows
/// (equal to one process's up to the rounding of the sums; the counts exactly). Every process
/// must call it with the same arguments. The processes agree on `stop` before each batch, so
/// all return `None` together, and on each batch's outcome: a failure on any process (a
/// non-finite row, a read error) is an error on every process ([`dist::agree`]), the failing
/// process's own there and [`Error::Peer`] with its message elsewhere.
pub fn evaluate_on_until_across(
    sae: &Sae,
    device: crate::backend::Device,
    source: &dyn Source,
    batch_rows: usize,
    skip_non_finite: bool,
    stop: &AtomicBool,
    collective: &dyn Collective,
) -> Result<Option<EvalStats>> {
    let (mut encoder, _) = dist::agree(collective, sae.encoder(device), false)?;
    evaluate_by(
        sae,
        source,
        batch_rows,
        skip_non_finite,
        stop,
        Procs::of(collective),
        &mut |x_bd| encoder.encode(x_bd),
    )
}

/// [`evaluate_on_until_across`] by the ranks of `grid` (on the CPU), each holding one latent
/// shard of an SAE too large for one process: `shard` is latents `part(F, grid.shard,
/// grid.shards)` of it (as [`Sae::load_shard`] reads them). Each group of shards evaluates its
/// part of the rows; within a group the codes are those one process holding the whole SAE
/// would choose and x̂ is summed over the shards, so the statistics are the whole SAE's (up to
/// the rounding of the sums), the firing counts gathered to all F latents, on every rank. Only
/// B×D-sized tensors and F counts cross between processes.
pub fn evaluate_shard_until(
    shard: &Sae,
    global: &crate::SaeConfig,
    source: &dyn Source,
    batch_rows: usize,
    skip_non_finite: bool,
    stop: &AtomicBool,
    grid: &dist::Grid,
) -> Result<Option<EvalStats>> {
    let latents = grid.latents_of(global.dict_size, shard.config().dict_size, "SAE")?;
    let mut encoder = shard.encoder(crate::backend::Device::Cpu)?;
    let procs = Procs {
        world: &*grid.world,
        rows: &*grid.data,
        latent: &*grid.latent,
    };
    evaluate_by(
        shard,
        source,
        batch_rows,
        skip_non_finite,
        stop,
        procs,
        &mut |x_bd| encoder.encode_shard(x_bd, latents.start, procs.latent),
    )
}

/// The processes of an evaluation: all of them agree on each batch's outcome, `rows` split the
/// rows, `latent` hold the other latents of the same rows.
#[derive(Clone, Copy)]
struct Procs<'a> {
    world: &'a dyn Collective,
    rows: &'a dyn Collective,
    latent: &'a dyn Collective,
}

impl<'a> Procs<'a> {
    /// Processes that split the rows, each holding the whole SAE.
    fn of(collective: &'a dyn Collective) -> Self {
        Procs {
            world: collective,
            rows: collective,
            latent: &SingleProcess,
        }
    }
}

/// One process's running sums over the rows it evaluated, kept in the forms that add across
/// processes (f64 sums, integer counts).
struct Sums {
    /// Σ‖x − x̂‖².
    sq_err: f64,
    /// Σ cos(x, x̂) over the rows with x ≠ 0.
    sum_cosine: f64,
    /// Σ ‖x̂‖/‖x‖ over the rows with x ≠ 0.
    sum_ratio: f64,
    /// Σ x and Σ x², per dimension.
    sum_d: Vec<f64>,
    sum_sq_d: Vec<f64>,
    /// Active codes, rows skipped as non-finite, rows with x = 0.
    active: u64,
    skipped: u64,
    zero_rows: u64,
    firing_counts_f: Vec<u64>,
}

impl Sums {
    fn new(d: usize, f: usize) -> Self {
        Sums {
            sq_err: 0.0,
            sum_cosine: 0.0,
            sum_ratio: 0.0,
            sum_d: vec![0.0; d],
            sum_sq_d: vec![0.0; d],
            active: 0,
            skipped: 0,
            zero_rows: 0,
            firing_counts_f: vec![0; f],
        }
    }

    /// Adds a batch of rows, their reconstructions and their codes.
    fn add(&mut self, x_bd: ArrayView2<'_, f32>, x_hat_bd: ArrayView2<'_, f32>, codes: &Codes) {
        self.sq_err += x_bd
            .iter()
            .zip(x_hat_bd)
            .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
            .sum::<f64>();
        for (row, row_hat) in x_bd.rows().into_iter().zip(x_hat_bd.rows()) {
            let (mut xx, mut yy, mut xy) = (0.0f64, 0.0f64, 0.0f64);
            for (((s, q), &x), &y) in self
                .sum_d
                .iter_mut()
                .zip(&mut self.sum_sq_d)
                .zip(row)
                .zip(row_hat)
            {
                let (x, y) = (x as f64, y as f64);
                *s += x;
                *q += x * x;
                xx += x * x;
                yy += y * y;
                xy += x * y;
            }
            if xx == 0.0 {
                self.zero_rows += 1;
            } else {
                self.sum_ratio += (yy / xx).sqrt();
                // x̂ = 0 has no direction either; it matches none of x's.
                if yy > 0.0 {
                    self.sum_cosine += xy / (xx * yy).sqrt();
                }
            }
        }
        self.active += codes.nnz() as u64;
        // Codes list each latent at most once per row, so this counts rows.
        for &j in &codes.indices {
            self.firing_counts_f[j as usize] += 1;
        }
    }

    /// Replaces every process's sums by their sum over the processes (two collectives).
    fn all_reduce(&mut self, collective: &dyn Collective) {
        if collective.world_size() == 1 {
            return;
        }
        let d = self.sum_d.len();
        let mut floats = Vec::with_capacity(3 + 2 * d);
        floats.extend([self.sq_err, self.sum_cosine, self.sum_ratio]);
        floats.extend(&self.sum_d);
        floats.extend(&self.sum_sq_d);
        collective.all_reduce_sum_f64(&mut floats);
        [self.sq_err, self.sum_cosine, self.sum_ratio] = [floats[0], floats[1], floats[2]];
        self.sum_d.copy_from_slice(&floats[3..3 + d]);
        self.sum_sq_d.copy_from_slice(&floats[3 + d..]);
        let mut counts = Vec::with_capacity(3 + self.firing_counts_f.len());
        counts.extend([self.active, self.skipped, self.zero_rows]);
        counts.extend(&self.firing_counts_f);
        collective.all_reduce_sum_u64(&mut counts);
        [self.active, self.skipped, self.zero_rows] = [counts[0], counts[1], counts[2]];
        self.firing_counts_f.copy_from_slice(&counts[3..]);
    }

    /// The statistics of `n_rows` rows (skipped ones included) these sums cover.
    fn stats(self, n_rows: u64) -> Result<EvalStats> {
        let n = n_rows - self.skipped;
        if n == 0 {
            return Err(DataError::NoFiniteRows.into());
        }
        let f = self.firing_counts_f.len();
        let total_variance: f64 = self
            .sum_d
            .iter()
            .zip(&self.sum_sq_d)
            .map(|(s, q)| q - s * s / n as f64)
            .sum();
        Ok(EvalStats {
            n_rows: n,
            mse: self.sq_err / n as f64,
            fve: if total_variance > 0.0 {
                1.0 - self.sq_err / total_variance
            } else {
                f64::NAN
            },
            l0: self.active as f64 / n as f64,
            dead_fraction: self.firing_counts_f.iter().filter(|&&c| c == 0).count() as f64
                / f as f64,
            skipped_rows: self.skipped,
            // 0/0 = NaN when every row is zero, as documented.
            cosine: self.sum_cosine / (n - self.zero_rows) as f64,
            shrinkage: self.sum_ratio / (n - self.zero_rows) as f64,
            zero_rows: self.zero_rows,
            firing_counts_f: self.firing_counts_f,
        })
    }
}

/// Reads rows `start..start + rows` of `source` into `x_bd`, leaves out (and counts) the
/// non-finite ones with `skip_non_finite` or fails naming the first, and adds the rest to
/// `sums`.
#[allow(clippy::too_many_arguments)]
fn add_batch(
    sums: &mut Sums,
    sae: &Sae,
    source: &dyn Source,
    x_bd: &mut Array2<f32>,
    start: u64,
    rows: usize,
    skip_non_finite: bool,
    latent: &dyn Collective,
    encode: &mut dyn FnMut(ArrayView2<'_, f32>) -> Result<Codes>,
) -> Result<()> {
    let d = sae.config().d_model;
    if x_bd.nrows() != rows {
        *x_bd = Array2::zeros((rows, d));
    }
    source.read_rows(start, x_bd.as_slice_mut().expect("standard layout"))?;
    let finite: Vec<bool> = x_bd
        .axis_iter(Axis(0))
        .map(|r| r.iter().all(|v| v.is_finite()))
        .collect();
    if let Some(b) = finite.iter().position(|&ok| !ok) {
        if !skip_non_finite {
            return Err(DataError::NonFinite {
                location: source.locate(start + b as u64),
            }
            .into());
        }
        let keep: Vec<usize> = (0..rows).filter(|&b| finite[b]).collect();
        sums.skipped += (rows - keep.len()) as u64;
        *x_bd = x_bd.select(Axis(0), &keep);
    }
    if x_bd.nrows() == 0 {
        return Ok(());
    }
    let codes = encode(x_bd.view())?;
    let x_hat_bd = sae.decode_shard(&codes, latent)?;
    sums.add(x_bd.view(), x_hat_bd.view(), &codes);
    Ok(())
}

fn evaluate_by(
    sae: &Sae,
    source: &dyn Source,
    batch_rows: usize,
    skip_non_finite: bool,
    stop: &AtomicBool,
    procs: Procs<'_>,
    encode: &mut dyn FnMut(ArrayView2<'_, f32>) -> Result<Codes>,
) -> Result<Option<EvalStats>> {
    let (n, d, f) = (
        source.n_rows(),
        sae.config().d_model,
        sae.config().dict_size,
    );
    dist::agree(
        procs.world,
        crate::error::check_shape("evaluation rows", &[0, source.d_model()], &[0, d]),
        false,
    )?;
    let batch_rows = batch_rows.max(1);
    let (rank, world) = (procs.rows.rank(), procs.rows.world_size());
    // A source's rows are counted in u64 but live in memory-mapped files, so they fit a usize.
    let mine = dist::part(n as usize, rank, world);
    // Rank 0's part is the longest: every process takes part in that many rounds.
    let rounds = dist::part(n as usize, 0, world).len().div_ceil(batch_rows);
    let mut sums = Sums::new(d, f);
    let mut x_bd = Array2::zeros((0, d));
    let (mut start, end) = (mine.start as u64, mine.end as u64);
    let mut outcome = Ok(());
    for round in 0..=rounds {
        // Each round agrees on the last batch's outcome and on stopping before the next.
        let (_, stopped) = dist::agree(procs.world, outcome, stop.load(Ordering::Relaxed))?;
        if round == rounds {
            break;
        }
        if stopped {
            return Ok(None);
        }
        let rows = (end - start).min(batch_rows as u64) as usize;
        outcome = if rows == 0 {
            Ok(())
        } else {
            add_batch(
                &mut sums,
                sae,
                source,
                &mut x_bd,
                start,
                rows,
                skip_non_finite,
                procs.latent,
                encode,
            )
        };
        start += rows as u64;
    }
    if procs.latent.world_size() > 1 {
        // A group's shards hold the same rows' sums and their own latents' counts.
        let mut active = [sums.active];
        procs.latent.all_reduce_sum_u64(&mut active);
        sums.active = active[0];
        sums.firing_counts_f = dist::all_gather_u64(procs.latent, &sums.firing_counts_f).concat();
    }
    sums.all_reduce(procs.rows);
    sums.stats(n).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;
    use crate::{Architecture, SaeConfig};

    #[test]
    fn batching_does_not_change_the_figures_and_they_match_a_direct_computation() {
        let config = SaeConfig {
            d_model: 6,
            dict_size: 20,
            arch: Architecture::TopK { k: 3 },
        };
        let sae = Sae::new(config, 3).unwrap();
        let x_nd = Array2::from_shape_fn((37, 6), |(i, j)| ((i * 7 + j * 3) as f32 * 0.31).sin());
        let whole = evaluate(&sae, &Cpu, &x_nd.view(), 1000, false).unwrap();
        let batched = evaluate(&sae, &Cpu, &x_nd.view(), 5, false).unwrap();
        assert_eq!(whole.n_rows, 37);
        assert!((whole.mse - batched.mse).abs() < 1e-9 * whole.mse.max(1.0));
        assert!((whole.fve - batched.fve).abs() < 1e-9);
        assert_eq!(whole.l0, 3.0);

        let x_hat = sae.decode(&sae.encode(&Cpu, x_nd.view()).unwrap()).unwrap();
        let mse = (&x_nd - &x_hat).mapv(|v| (v as f64).powi(2)).sum() / 37.0;
        let mean = x_nd.mean_axis(Axis(0)).unwrap();
        let var = (&x_nd - &mean).mapv(|v| (v as f64).powi(2)).sum() / 37.0;
        assert!((whole.mse - mse).abs() < 1e-6 * mse);
        assert!((whole.fve - (1.0 - mse / var)).abs() < 1e-6);
        let fired: std::collections::HashSet<u32> = sae
            .encode(&Cpu, x_nd.view())
            .unwrap()
            .indices
            .into_iter()
            .collect();
        assert_eq!(whole.dead_fraction, 1.0 - fired.len() as f64 / 20.0);
    }

    #[test]
    fn a_set_stop_flag_ends_the_evaluation() {
        let sae = hand_sae();
        let x_nd = Array2::<f32>::ones((10, 2));
        let stop = AtomicBool::new(true);
        let stopped = evaluate_on_until(
            &sae,
            crate::backend::Device::Cpu,
            &x_nd.view(),
            3,
            false,
            &stop,
        );
        assert_eq!(stopped.unwrap(), None);
        stop.store(false, Ordering::Relaxed);
        let done = evaluate_on_until(
            &sae,
            crate::backend::Device::Cpu,
            &x_nd.view(),
            3,
            false,
            &stop,
        );
        assert_eq!(done.unwrap().unwrap().n_rows, 10);
    }

    #[test]
    fn non_finite_rows_and_wrong_widths_are_errors() {
        let config = SaeConfig {
            d_model: 4,
            dict_size: 8,
            arch: Architecture::RELU,
        };
        let sae = Sae::new(config, 0).unwrap();
        let mut x_nd = Array2::<f32>::ones((10, 4));
        x_nd[[8, 1]] = f32::INFINITY;
        let err = evaluate(&sae, &Cpu, &x_nd.view(), 3, false).unwrap_err();
        assert!(err.to_string().contains("row 8"), "{err}");
        let skipping = evaluate(&sae, &Cpu, &x_nd.view(), 3, true).unwrap();
        let clean = x_nd.select(Axis(0), &[0, 1, 2, 3, 4, 5, 6, 7, 9]);
        let expected = evaluate(&sae, &Cpu, &clean.view(), 3, false).unwrap();
        assert_eq!((skipping.n_rows, skipping.skipped_rows), (9, 1));
        assert!((skipping.mse - expected.mse).abs() < 1e-9);
        let wide = Array2::<f32>::ones((10, 5));
        assert!(evaluate(&sae, &Cpu, &wide.view(), 3, false).is_err());
    }

    /// The four-latent ReLU SAE of the hand-computed tests: latent 0 reads x₀ and writes
    /// (0.5, 0), latent 1 reads x₁ and writes (1, 1), latent 2 reads −x₀ and writes nothing,
    /// latent 3 reads −x₁ and never fires on the rows below.
    fn hand_sae() -> Sae {
        let config = SaeConfig {
            d_model: 2,
            dict_size: 4,
            arch: Architecture::RELU,
        };
        let w_enc_fd = ndarray::array![[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]];
        let w_dec_fd = ndarray::array![[0.5, 0.0], [1.0, 1.0], [0.0, 0.0], [3.0, 0.0]];
        Sae::from_parts(
            config,
            w_enc_fd,
            ndarray::Array1::zeros(4),
            w_dec_fd,
            ndarray::Array1::zeros(2),
        )
        .unwrap()
    }

    #[test]
    fn cosine_shrinkage_and_firing_counts_match_a_hand_computation() {
        // x̂ per row: (1, 0), (3, 3), (0, 0), (0, 0), (1.5, 1).
        let x_nd = ndarray::array![
            [2.0f32, 0.0],
            [0.0, 3.0],
            [-1.0, 0.0],
            [0.0, 0.0],
            [1.0, 1.0]
        ];
        let sae = hand_sae();
        for batch_rows in [1, 2, 5] {
            let stats = evaluate(&sae, &Cpu, &x_nd.view(), batch_rows, false).unwrap();
            assert_eq!((stats.n_rows, stats.zero_rows), (5, 1));
            // The zero row is left out: four rows, cosines 1, 1/√2, 0 (x̂ = 0), 2.5/√6.5.
            let cosine = (1.0 + 0.5f64.sqrt() + 0.0 + 2.5 / 6.5f64.sqrt()) / 4.0;
            assert!((stats.cosine - cosine).abs() < 1e-7, "{}", stats.cosine);
            // Norm ratios 0.5, √18/3, 0, √3.25/√2.
            let shrinkage = (0.5 + 2.0f64.sqrt() + 0.0 + (3.25f64 / 2.0).sqrt()) / 4.0;
            assert!(
                (stats.shrinkage - shrinkage).abs() < 1e-7,
                "{}",
                stats.shrinkage
            );
            assert_eq!(stats.firing_counts_f, vec![2, 2, 1, 0]);
            assert_eq!(stats.firing_frequency_f(), vec![0.4, 0.4, 0.2, 0.0]);
            assert_eq!(stats.dead_fraction, 0.25);
            assert_eq!(stats.l0, 1.0);
        }
    }

    #[test]
    fn cosine_and_shrinkage_of_only_zero_rows_are_nan() {
        let x_nd = Array2::<f32>::zeros((3, 2));
        let stats = evaluate(&hand_sae(), &Cpu, &x_nd.view(), 2, false).unwrap();
        assert_eq!(stats.zero_rows, 3);
        assert!(stats.cosine.is_nan() && stats.shrinkage.is_nan());
        assert_eq!(stats.firing_counts_f, vec![0; 4]);
        assert_eq!(stats.dead_fraction, 1.0);
    }

    #[test]
    fn firing_counts_stay_out_of_the_json() {
        let x_nd = ndarray::array![[2.0f32, 0.0], [0.0, 3.0]];
        let stats = evaluate(&hand_sae(), &Cpu, &x_nd.view(), 2, false).unwrap();
        let json = serde_json::to_string(&stats).unwrap();
        assert!(
            json.contains("\"cosine\"") && json.contains("\"shrinkage\""),
            "{json}"
        );
        assert!(!json.contains("firing_counts_f"), "{json}");
    }

    #[test]
    fn density_histogram_bins_log10_frequency_and_counts_dead_latents_apart() {
        // log10 0.4 = −0.40 and log10 0.2 = −0.70: one decade, halves [−1, −0.5) and [−0.5, 0].
        let h = DensityHistogram::new(&[0.4, 0.4, 0.2, 0.0], 2).unwrap();
        assert_eq!(h.edges_log10, vec![-1.0, -0.5, 0.0]);
        assert_eq!((h.counts.clone(), h.dead), (vec![1, 2], 1));

        // Exact powers of ten open their bin; frequency 1 lands in the last bin.
        let h = DensityHistogram::new(&[0.001, 0.01, 0.1, 1.0], 1).unwrap();
        assert_eq!(h.edges_log10, vec![-3.0, -2.0, -1.0, 0.0]);
        assert_eq!((h.counts.clone(), h.dead), (vec![1, 1, 2], 0));

        // A frequency just above a decade's start still needs that whole decade.
        let h = DensityHistogram::new(&[0.0015], 1).unwrap();
        assert_eq!(
            (h.edges_log10.clone(), h.counts.clone()),
            (vec![-3.0, -2.0, -1.0, 0.0], vec![1, 0, 0])
        );

        let stats = evaluate(
            &hand_sae(),
            &Cpu,
            &ndarray::array![
                [2.0f32, 0.0],
                [0.0, 3.0],
                [-1.0, 0.0],
                [0.0, 0.0],
                [1.0, 1.0]
            ]
            .view(),
            5,
            false,
        )
        .unwrap();
        assert_eq!(
            stats.density_histogram(2).unwrap(),
            DensityHistogram::new(&[0.4, 0.4, 0.2, 0.0], 2).unwrap()
        );
    }

    #[test]
    fn density_histogram_of_no_firing_latents_and_bad_frequencies() {
        for (freqs, dead) in [(vec![0.0, 0.0], 2), (vec![], 0)] {
            let h = DensityHistogram::new(&freqs, 4).unwrap();
            assert_eq!(h.edges_log10.len(), 5);
            assert_eq!((h.counts.iter().sum::<u64>(), h.dead), (0, dead));
        }
        // Zero bins per decade is read as one.
        assert_eq!(DensityHistogram::new(&[0.5], 0).unwrap().counts, vec![1]);
        // The smallest positive f64 needs 324 decades, and still bins.
        let tiny = DensityHistogram::new(&[f64::from_bits(1)], 1).unwrap();
        assert_eq!((tiny.counts.len(), tiny.counts[0]), (324, 1));
        for bad in [f64::NAN, -0.1, 1.5, f64::INFINITY] {
            let err = DensityHistogram::new(&[0.5, bad], 2).unwrap_err();
            assert!(err.to_string().contains("latent 1"), "{err}");
        }
    }
}

#[cfg(test)]
mod across {
    //! Evaluation split over processes, played by threads that exchange their buffers.

    use super::*;
    use crate::backend::{Cpu, Device};
    use crate::dist::Threads;
    use crate::{Architecture, SaeConfig};
    use std::sync::Arc;

    /// Every thread's result of evaluating `x_nd` as one of `size` processes.
    fn on_threads(
        sae: &Sae,
        x_nd: &Array2<f32>,
        size: usize,
        batch_rows: usize,
        skip_non_finite: bool,
        stop_on: Option<usize>,
    ) -> Vec<Result<Option<EvalStats>>> {
        std::thread::scope(|scope| {
            let handles: Vec<_> = Threads::world(size)
                .into_iter()
                .map(|threads| {
                    scope.spawn(move || {
                        let stop = AtomicBool::new(stop_on == Some(threads.rank()));
                        evaluate_on_until_across(
                            sae,
                            Device::Cpu,
                            &x_nd.view(),
                            batch_rows,
                            skip_non_finite,
                            &stop,
                            &threads,
                        )
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn topk_sae() -> Sae {
        let config = SaeConfig {
            d_model: 6,
            dict_size: 40,
            arch: Architecture::TopK { k: 3 },
        };
        Sae::new(config, 5).unwrap()
    }

    fn rows(n: usize) -> Array2<f32> {
        Array2::from_shape_fn((n, 6), |(i, j)| ((i * 5 + j * 11) as f32 * 0.37).cos())
    }

    /// The figures of two runs agree: the counts exactly, the sums to rounding.
    fn assert_same(a: &EvalStats, b: &EvalStats) {
        assert_eq!(
            (a.n_rows, a.skipped_rows, a.zero_rows),
            (b.n_rows, b.skipped_rows, b.zero_rows)
        );
        assert_eq!(a.firing_counts_f, b.firing_counts_f);
        assert_eq!((a.l0, a.dead_fraction), (b.l0, b.dead_fraction));
        for (what, x, y) in [
            ("mse", a.mse, b.mse),
            ("fve", a.fve, b.fve),
            ("cosine", a.cosine, b.cosine),
            ("shrinkage", a.shrinkage, b.shrinkage),
        ] {
            assert!((x - y).abs() <= 1e-12 * y.abs(), "{what}: {x} vs {y}");
        }
    }

    #[test]
    fn latent_shards_give_the_whole_saes_figures() {
        // TopK exchanges candidates; BatchTopK without θ cuts each batch across the shards.
        for arch in [
            Architecture::TopK { k: 3 },
            Architecture::BatchTopK { k: 3 },
        ] {
            let config = SaeConfig {
                d_model: 6,
                dict_size: 40,
                arch,
            };
            let x_nd = rows(53);
            for (size, shards) in [(2, 2), (4, 2), (6, 3)] {
                // One process per group, holding the whole SAE: the same rows in each batch.
                let whole = Sae::new(config, 5).unwrap();
                let whole = on_threads(&whole, &x_nd, size / shards, 8, false, None);
                let whole = whole[0].as_ref().unwrap().as_ref().unwrap();
                let sharded: Vec<EvalStats> = std::thread::scope(|scope| {
                    let handles: Vec<_> = Threads::world(size)
                        .into_iter()
                        .map(|threads| {
                            let x_nd = &x_nd;
                            scope.spawn(move || {
                                let grid = dist::Grid::new(Arc::new(threads), shards).unwrap();
                                let latents = dist::part(40, grid.shard, shards);
                                let shard = Sae::new_shard(config, 5, latents).unwrap();
                                let never = AtomicBool::new(false);
                                let view = x_nd.view();
                                evaluate_shard_until(
                                    &shard, &config, &view, 8, false, &never, &grid,
                                )
                                .unwrap()
                                .unwrap()
                            })
                        })
                        .collect();
                    handles.into_iter().map(|h| h.join().unwrap()).collect()
                });
                for stats in &sharded {
                    assert_eq!(stats.firing_counts_f, whole.firing_counts_f, "{arch:?}");
                    assert_eq!((stats.n_rows, stats.l0), (whole.n_rows, whole.l0));
                    for (x, y) in [
                        (stats.mse, whole.mse),
                        (stats.fve, whole.fve),
                        (stats.cosine, whole.cosine),
                        (stats.shrinkage, whole.shrinkage),
                    ] {
                        // x̂ summed over the shards rounds otherwise.
                        assert!(
                            (x - y).abs() <= 1e-6 * y.abs(),
                            "{arch:?} {size}: {x} vs {y}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn alone_the_variant_across_processes_equals_the_single_process_functions() {
        let sae = topk_sae();
        let mut x_nd = rows(53);
        x_nd.row_mut(7).fill(0.0);
        for batch_rows in [1, 8, 100] {
            let never = AtomicBool::new(false);
            let across = evaluate_on_until_across(
                &sae,
                Device::Cpu,
                &x_nd.view(),
                batch_rows,
                false,
                &never,
                &SingleProcess,
            )
            .unwrap()
            .unwrap();
            // Bit for bit: the same batches summed in the same order.
            let on = evaluate_on(&sae, Device::Cpu, &x_nd.view(), batch_rows, false).unwrap();
            assert_eq!(across, on);
            assert_eq!(
                across,
                evaluate(&sae, &Cpu, &x_nd.view(), batch_rows, false).unwrap()
            );
            assert_eq!((across.n_rows, across.zero_rows), (53, 1));
        }
    }

    #[test]
    fn processes_sharing_the_rows_all_get_the_statistics_of_all_of_them() {
        let sae = topk_sae();
        let x_nd = rows(53);
        let single = evaluate(&sae, &Cpu, &x_nd.view(), 4, false).unwrap();
        for size in [2, 3, 5] {
            for batch_rows in [4, 1000] {
                let results = on_threads(&sae, &x_nd, size, batch_rows, false, None);
                let first = results[0].as_ref().unwrap().clone().unwrap();
                assert_same(&first, &single);
                for other in &results[1..] {
                    // Every process holds the same bits.
                    assert_eq!(other.as_ref().unwrap().as_ref().unwrap(), &first);
                }
            }
        }
        // More processes than rows: some evaluate nothing.
        let few = rows(2);
        let results = on_threads(&sae, &few, 3, 4, false, None);
        let single = evaluate(&sae, &Cpu, &few.view(), 4, false).unwrap();
        for result in results {
            assert_same(&result.unwrap().unwrap(), &single);
        }
    }

    #[test]
    fn a_non_finite_row_one_process_reads_fails_every_process_naming_the_row() {
        let sae = topk_sae();
        let mut x_nd = rows(30);
        // Rows 10..20 are rank 1's of three.
        x_nd[[13, 2]] = f32::NAN;
        let results = on_threads(&sae, &x_nd, 3, 4, false, None);
        for (rank, result) in results.into_iter().enumerate() {
            let err = result.unwrap_err();
            assert!(err.to_string().contains("row 13"), "rank {rank}: {err}");
            assert_eq!(
                matches!(err, Error::Peer { rank: 1, .. }),
                rank != 1,
                "rank {rank}: {err:?}"
            );
        }
        // Skipped, the row is counted once, by everyone.
        let single = evaluate(&sae, &Cpu, &x_nd.view(), 4, true).unwrap();
        assert_eq!(single.skipped_rows, 1);
        for result in on_threads(&sae, &x_nd, 3, 4, true, None) {
            assert_same(&result.unwrap().unwrap(), &single);
        }
    }

    #[test]
    fn a_stop_on_one_process_stops_them_all() {
        let results = on_threads(&topk_sae(), &rows(30), 3, 4, false, Some(2));
        for result in results {
            assert_eq!(result.unwrap(), None);
        }
    }
}
