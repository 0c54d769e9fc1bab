//! Evaluation of an SAE on rows it was not trained on: reconstruction error, variance
//! explained and sparsity, streamed in batches so any number of rows fits in memory.

use ndarray::{Array2, Axis};
use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::data::{DataError, Source};
use crate::error::Result;
use crate::sae::Sae;

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
    let (n, d, f) = (
        source.n_rows(),
        sae.config().d_model,
        sae.config().dict_size,
    );
    crate::error::check_shape("evaluation rows", &[0, source.d_model()], &[0, d])?;
    let batch_rows = batch_rows.max(1);
    let (mut sq_err, mut active, mut skipped) = (0.0f64, 0u64, 0u64);
    let (mut sum_d, mut sum_sq_d) = (vec![0.0f64; d], vec![0.0f64; d]);
    let mut fired = vec![false; f];
    let mut x_bd = Array2::zeros((0, d));
    let mut start = 0u64;
    while start < n {
        let rows = (n - start).min(batch_rows as u64) as usize;
        if x_bd.nrows() != rows {
            x_bd = Array2::zeros((rows, d));
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
            skipped += (rows - keep.len()) as u64;
            x_bd = x_bd.select(Axis(0), &keep);
        }
        start += rows as u64;
        if x_bd.nrows() == 0 {
            continue;
        }
        let codes = sae.encode(backend, x_bd.view())?;
        let x_hat_bd = sae.decode(&codes)?;
        sq_err += x_bd
            .iter()
            .zip(&x_hat_bd)
            .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
            .sum::<f64>();
        for row in x_bd.rows() {
            for ((s, q), &v) in sum_d.iter_mut().zip(&mut sum_sq_d).zip(row) {
                *s += v as f64;
                *q += v as f64 * v as f64;
            }
        }
        active += codes.nnz() as u64;
        for &j in &codes.indices {
            fired[j as usize] = true;
        }
    }
    let n = n - skipped;
    if n == 0 {
        return Err(DataError::NoFiniteRows.into());
    }
    let total_variance: f64 = sum_d
        .iter()
        .zip(&sum_sq_d)
        .map(|(s, q)| q - s * s / n as f64)
        .sum();
    Ok(EvalStats {
        n_rows: n,
        mse: sq_err / n as f64,
        fve: if total_variance > 0.0 {
            1.0 - sq_err / total_variance
        } else {
            f64::NAN
        },
        l0: active as f64 / n as f64,
        dead_fraction: fired.iter().filter(|&&x| !x).count() as f64 / f as f64,
        skipped_rows: skipped,
    })
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
    fn non_finite_rows_and_wrong_widths_are_errors() {
        let config = SaeConfig {
            d_model: 4,
            dict_size: 8,
            arch: Architecture::Relu,
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
}
