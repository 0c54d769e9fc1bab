//! Row subsets of a source, and the deterministic split of a dataset into training rows and
//! held-out evaluation rows.

use std::ops::Range;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{DataError, Source};

/// The rows of `source` that lie in a list of ranges, numbered 0.. in range order.
pub struct Subset<S> {
    source: S,
    ranges: Vec<Range<u64>>,
    /// Subset row at which each range starts, plus the total at the end.
    starts: Vec<u64>,
}

impl<S: Source> Subset<S> {
    /// The rows of `source` in `ranges` (sorted, disjoint, within the source).
    fn new(source: S, ranges: Vec<Range<u64>>) -> Self {
        let mut starts = vec![0];
        for r in &ranges {
            starts.push(starts.last().unwrap() + (r.end - r.start));
        }
        Subset {
            source,
            ranges,
            starts,
        }
    }

    /// The ranges of source rows this subset holds.
    pub fn ranges(&self) -> &[Range<u64>] {
        &self.ranges
    }

    /// Range index and source row of subset row `row`.
    fn map(&self, row: u64) -> (usize, u64) {
        let i = self.starts.partition_point(|&s| s <= row) - 1;
        (i, self.ranges[i].start + (row - self.starts[i]))
    }
}

impl<S: Source> Source for Subset<S> {
    fn d_model(&self) -> usize {
        self.source.d_model()
    }

    fn n_rows(&self) -> u64 {
        *self.starts.last().unwrap()
    }

    fn read_rows(&self, start: u64, out_nd: &mut [f32]) -> Result<(), DataError> {
        let d = self.d_model();
        let (mut row, mut out) = (start, out_nd);
        // Whole rows only: a trailing partial row (a caller's bug) is left as it is rather
        // than looping forever on it.
        while out.len() >= d.max(1) {
            let (i, source_row) = self.map(row);
            let n = ((self.ranges[i].end - source_row) as usize).min(out.len() / d);
            let (here, rest) = out.split_at_mut(n * d);
            self.source.read_rows(source_row, here)?;
            row += n as u64;
            out = rest;
        }
        Ok(())
    }

    fn locate(&self, row: u64) -> String {
        self.source.locate(self.map(row).1)
    }
}

/// Splits `source` into (training rows, evaluation rows), holding out round(`fraction`·N) rows.
///
/// The held-out rows are whole blocks of N/1000 consecutive rows (at least 1, at most 4096)
/// picked at random with `seed`, so they spread over the dataset while each stays a sequential
/// read. The split depends only on N, `fraction` and `seed`: the training seed does not move
/// it, and no held-out row is ever trained on.
pub fn holdout<S: Source + Clone>(
    source: S,
    fraction: f64,
    seed: u64,
) -> Result<(Subset<S>, Subset<S>), DataError> {
    let n = source.n_rows();
    let n_eval = (fraction * n as f64).round() as u64;
    if !(fraction.is_finite() && fraction > 0.0) || n_eval == 0 || n_eval >= n {
        return Err(DataError::EvalFraction {
            fraction,
            n_rows: n,
            n_eval,
        });
    }
    let block = (n / 1000).clamp(1, 4096);
    let n_blocks = n.div_ceil(block);
    let mut order: Vec<u64> = (0..n_blocks).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let mut eval = Vec::new();
    let mut left = n_eval;
    for b in order {
        if left == 0 {
            break;
        }
        let start = b * block;
        let len = (n - start).min(block).min(left);
        eval.push(start..start + len);
        left -= len;
    }
    eval.sort_by_key(|r| r.start);
    let eval = merge(eval);
    let mut train = Vec::new();
    let mut at = 0;
    for r in &eval {
        if r.start > at {
            train.push(at..r.start);
        }
        at = r.end;
    }
    if at < n {
        train.push(at..n);
    }
    Ok((
        Subset::new(source.clone(), train),
        Subset::new(source, eval),
    ))
}

/// Joins touching ranges of a sorted list.
fn merge(ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_that_is_not_whole_rows_fills_the_whole_rows_and_returns() {
        let x_nd = ndarray::Array2::from_shape_fn((4, 2), |(n, d)| (n * 2 + d) as f32);
        let subset = Subset::new(x_nd.view(), vec![1..2, 3..4]);
        let mut out = [-1.0f32; 5];
        subset.read_rows(0, &mut out).unwrap();
        assert_eq!(out, [2.0, 3.0, 6.0, 7.0, -1.0]);
    }
    use ndarray::Array2;
    use std::sync::Arc;

    fn rows(n: usize) -> Arc<Array2<f32>> {
        Arc::new(Array2::from_shape_fn((n, 2), |(i, j)| (i * 2 + j) as f32))
    }

    #[test]
    fn holdout_partitions_the_rows() {
        for (n, n_eval) in [(7usize, 1u64), (10, 1), (1000, 100), (12_345, 1235)] {
            let (train, eval) = holdout(rows(n), 0.1, 3).unwrap();
            assert_eq!(train.n_rows() + eval.n_rows(), n as u64);
            assert_eq!(eval.n_rows(), n_eval);
            let mut seen = vec![0u8; n];
            for sub in [&train, &eval] {
                let mut out = vec![0.0; sub.n_rows() as usize * 2];
                sub.read_rows(0, &mut out).unwrap();
                for pair in out.chunks(2) {
                    seen[pair[0] as usize / 2] += 1;
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "n = {n}");
        }
    }

    #[test]
    fn holdout_depends_only_on_its_seed() {
        let (_, a) = holdout(rows(5000), 0.05, 1).unwrap();
        let (_, b) = holdout(rows(5000), 0.05, 1).unwrap();
        let (_, c) = holdout(rows(5000), 0.05, 2).unwrap();
        assert_eq!(a.ranges(), b.ranges());
        assert_ne!(a.ranges(), c.ranges());
        assert_eq!(a.n_rows(), 250);
        // Spread over the dataset, not one tail.
        assert!(a.ranges().len() > 10);
    }

    #[test]
    fn holdout_rejects_fractions_that_leave_nothing() {
        for fraction in [0.0, -0.1, 1.0, f64::NAN, 0.001] {
            assert!(
                matches!(
                    holdout(rows(100), fraction, 0),
                    Err(DataError::EvalFraction { .. })
                ),
                "{fraction}"
            );
        }
    }
}
