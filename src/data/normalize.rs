//! The input scale of normalised training, c = √D / mean‖x‖, estimated from a sample of rows.

use rayon::prelude::*;

use super::{DataError, Source};

/// Rows sampled to estimate the scale (all rows when the source has fewer), as
/// dictionary_learning's `normalize_activations` uses.
pub const SCALE_SAMPLE_ROWS: u64 = 10_000;

/// c = √D / mean‖x‖ over [`SCALE_SAMPLE_ROWS`] distinct rows drawn with `seed` (or every row
/// of a smaller source): training on c·x gives E‖c·x‖ = √D, the scale the reference
/// hyperparameters assume. Rows holding NaN or ±Inf are an error unless `skip_non_finite`,
/// which leaves them out of the mean. Fold c back with [`crate::Sae::fold_input_scale`].
pub fn estimate_scale(
    source: &dyn Source,
    seed: u64,
    skip_non_finite: bool,
) -> Result<f32, DataError> {
    use rand::SeedableRng;
    let (n, d) = (source.n_rows(), source.d_model());
    let rows: Vec<u64> = if n <= SCALE_SAMPLE_ROWS {
        (0..n).collect()
    } else {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut picked: Vec<u64> =
            rand::seq::index::sample(&mut rng, n as usize, SCALE_SAMPLE_ROWS as usize)
                .into_iter()
                .map(|r| r as u64)
                .collect();
        // Ascending order reads the file front to back.
        picked.sort_unstable();
        picked
    };
    // Norm of each row, or None for a non-finite one.
    let norms: Vec<Option<f64>> = rows
        .par_chunks(256)
        .map(|part| {
            let mut row_d = vec![0.0f32; d];
            part.iter()
                .map(|&r| {
                    source.read_rows(r, &mut row_d)?;
                    if row_d.iter().all(|v| v.is_finite()) {
                        Ok(Some(
                            row_d
                                .iter()
                                .map(|&v| v as f64 * v as f64)
                                .sum::<f64>()
                                .sqrt(),
                        ))
                    } else if skip_non_finite {
                        Ok(None)
                    } else {
                        Err(DataError::NonFinite {
                            location: source.locate(r),
                        })
                    }
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
        .collect();
    let finite: Vec<f64> = norms.into_iter().flatten().collect();
    if finite.is_empty() {
        return Err(DataError::NoFiniteRows);
    }
    let mean_norm = finite.iter().sum::<f64>() / finite.len() as f64;
    let scale = (d as f64).sqrt() / mean_norm;
    if !(mean_norm > 0.0 && scale.is_finite() && (scale as f32).is_finite()) {
        return Err(DataError::ZeroNorm {
            rows: finite.len() as u64,
            mean_norm,
        });
    }
    Ok(scale as f32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    #[test]
    fn scale_makes_the_mean_norm_sqrt_d() {
        let x_nd =
            Array2::from_shape_fn((300, 16), |(n, d)| ((n * 16 + d) as f32 * 0.1).sin() * 3.0);
        let c = estimate_scale(&x_nd.view(), 0, false).unwrap() as f64;
        let mean: f64 = x_nd
            .rows()
            .into_iter()
            .map(|r| r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt())
            .sum::<f64>()
            / 300.0;
        assert!((c * mean - 4.0).abs() < 1e-5, "c·mean‖x‖ = {}", c * mean);
    }

    #[test]
    fn large_sources_are_sampled_deterministically() {
        let x_nd = Array2::from_shape_fn((25_000, 4), |(n, d)| 1.0 + ((n * 4 + d) % 97) as f32);
        let a = estimate_scale(&x_nd.view(), 1, false).unwrap();
        let b = estimate_scale(&x_nd.view(), 1, false).unwrap();
        let c = estimate_scale(&x_nd.view(), 2, false).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn non_finite_rows_stop_or_are_left_out() {
        let mut x_nd = Array2::from_elem((50, 4), 1.0f32);
        x_nd[[7, 2]] = f32::NAN;
        let err = estimate_scale(&x_nd.view(), 0, false).unwrap_err();
        assert!(err.to_string().contains("row 7"), "{err}");
        // The remaining rows all have norm 2 = √4: c = 1.
        assert_eq!(estimate_scale(&x_nd.view(), 0, true).unwrap(), 1.0);
        let zeros = Array2::<f32>::zeros((10, 4));
        assert!(matches!(
            estimate_scale(&zeros.view(), 0, false),
            Err(DataError::ZeroNorm { .. })
        ));
    }
}
