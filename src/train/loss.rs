//! The CPU's batch sums for the losses: f64 sums over rows in a fixed order, so a step's
//! losses are bit-identical for a given thread count, across processes as in one.

use ndarray::{Array2, ArrayView2, Axis, Zip};
use rayon::prelude::*;

use crate::dist::Collective;

/// Σ_b ‖(x_b − x̂_b) − c‖² in f64 (c = 0 when `None`), summed row by row in a fixed order.
pub(super) fn row_sq_sum(
    x_bd: ArrayView2<'_, f32>,
    x_hat_bd: ArrayView2<'_, f32>,
    c: Option<&[f64]>,
) -> f64 {
    Zip::from(x_bd.rows())
        .and(x_hat_bd.rows())
        .par_map_collect(|x, xh| {
            let (x, xh) = (x.to_slice().unwrap(), xh.to_slice().unwrap());
            lanes_sum(x.len(), |i| {
                let e = (x[i] - xh[i]) as f64 - c.map_or(0.0, |c| c[i]);
                e * e
            })
        })
        .sum()
}

/// Σ_b ‖(x_b − x̂_b) − ê_b‖² in f64 (e − ê formed in f32 as the reference does).
pub(super) fn aux_sq_sum(
    x_bd: ArrayView2<'_, f32>,
    x_hat_bd: &Array2<f32>,
    aux_hat_bd: &Array2<f32>,
) -> f64 {
    Zip::from(x_bd.rows())
        .and(x_hat_bd.rows())
        .and(aux_hat_bd.rows())
        .par_map_collect(|x, xh, ah| {
            let (x, xh, ah) = (
                x.to_slice().unwrap(),
                xh.to_slice().unwrap(),
                ah.to_slice().unwrap(),
            );
            lanes_sum(x.len(), |i| {
                let r = ((x[i] - xh[i]) - ah[i]) as f64;
                r * r
            })
        })
        .sum()
}

/// Σ_{i < n} term(i) in f64 with 8 independent partial sums: a long row reduces at the speed
/// of the adds, not of one chain of dependent additions. Deterministic for a given n.
#[inline]
fn lanes_sum(n: usize, term: impl Fn(usize) -> f64) -> f64 {
    let mut acc = [0.0f64; 8];
    let main = n - n % 8;
    for i in (0..main).step_by(8) {
        for (l, a) in acc.iter_mut().enumerate() {
            *a += term(i + l);
        }
    }
    let tail: f64 = (main..n).map(&term).sum();
    acc.iter().sum::<f64>() + tail
}

/// Σ_b (x_b − x̂_b) per column, in f64.
pub(super) fn residual_sum(x_bd: ArrayView2<'_, f32>, x_hat_bd: &Array2<f32>) -> Vec<f64> {
    sum_over_rows(x_bd.nrows(), x_bd.ncols(), |b, acc| {
        for ((a, &x), &xh) in acc.iter_mut().zip(x_bd.row(b)).zip(x_hat_bd.row(b)) {
            *a += (x - xh) as f64;
        }
    })
}

/// Σ_b ‖x_b − x̄‖² over the global batch (x̄ its mean), for the FVE.
pub(super) fn total_variance_times_n(
    x_bd: ArrayView2<'_, f32>,
    collective: &dyn Collective,
) -> f64 {
    let d = x_bd.ncols();
    let mut sum = sum_over_rows(x_bd.nrows(), d, |b, acc| {
        for (a, &x) in acc.iter_mut().zip(x_bd.row(b)) {
            *a += x as f64;
        }
    });
    sum.push(x_bd.nrows() as f64);
    collective.all_reduce_sum_f64(&mut sum);
    let n = sum[d];
    let mean: Vec<f64> = sum[..d].iter().map(|s| s / n).collect();
    let mut total = [x_bd
        .axis_iter(Axis(0))
        .into_par_iter()
        .map(|row| {
            let row = row.to_slice().unwrap();
            lanes_sum(row.len(), |i| (row[i] as f64 - mean[i]).powi(2))
        })
        .collect::<Vec<f64>>()
        .iter()
        .sum::<f64>()];
    collective.all_reduce_sum_f64(&mut total);
    total[0]
}

/// Σ over rows b < `n_rows` of what `add_row(b, acc)` adds into a `width`-vector: fixed
/// chunks of rows in parallel, their partial sums added in order (deterministic).
pub(super) fn sum_over_rows<T>(
    n_rows: usize,
    width: usize,
    add_row: impl Fn(usize, &mut [T]) + Sync,
) -> Vec<T>
where
    T: Copy + Default + std::ops::AddAssign + Send,
{
    const ROWS: usize = 64;
    let partials: Vec<Vec<T>> = (0..n_rows.div_ceil(ROWS))
        .into_par_iter()
        .map(|c| {
            let mut acc = vec![T::default(); width];
            for b in c * ROWS..((c + 1) * ROWS).min(n_rows) {
                add_row(b, &mut acc);
            }
            acc
        })
        .collect();
    let mut total = vec![T::default(); width];
    for p in partials {
        total.iter_mut().zip(p).for_each(|(t, v)| *t += v);
    }
    total
}

/// Σ_b map(a\[b, j\]) for every column j, in a fixed order (see [`sum_over_rows`]).
pub(super) fn column_sums_by(a: ArrayView2<'_, f32>, map: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    sum_over_rows(a.nrows(), a.ncols(), |b, acc: &mut [f32]| {
        for (s, &v) in acc.iter_mut().zip(a.row(b)) {
            *s += map(v);
        }
    })
}
