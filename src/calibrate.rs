//! BatchTopK's inference threshold θ calibrated on a sample ([`calibrated_threshold`]): the
//! value that keeps k codes a row on average, found exactly, for runs too short for the
//! moving average of training to settle.

use ndarray::Array2;
use rayon::prelude::*;

use crate::backend::Backend;
use crate::dist::Collective;
use crate::error::{Error, Result};
use crate::sae::Sae;

/// Buckets of one radix level: 16 bits of an f32's bit pattern.
const BUCKETS: usize = 1 << 16;

/// The (k·N)-th largest positive pre-activation over the N rows of `batches_bd` (and, across
/// the processes of `collective`, over every process's rows): the θ at which the inference
/// rule, codes above θ, keeps k·N − 1 codes on these rows, k per row on average (ties
/// aside). With fewer than k·N positive
/// entries, the smallest positive one, so every positive code is kept; 0 when none is
/// positive. Exact: two radix passes over the pre-activations (the upper, then the lower 16
/// bits of the value's bit pattern, which orders positive floats), each a GEMM per batch and
/// one reduction of 65,536 counts. Fails with [`Error::Empty`] for no rows.
pub fn calibrated_threshold(
    sae: &Sae,
    backend: &dyn Backend,
    batches_bd: &[Array2<f32>],
    k: usize,
    collective: &dyn Collective,
) -> Result<f32> {
    let mut n = [batches_bd.iter().map(|b| b.nrows() as u64).sum::<u64>()];
    collective.all_reduce_sum_u64(&mut n);
    if n[0] == 0 {
        return Err(Error::Empty {
            what: "calibration rows".into(),
        });
    }
    let rank = (k as u64).saturating_mul(n[0]);
    // Level 1: the upper 16 bits; level 2: the lower 16 of values in the chosen upper bucket.
    let (mut prefix, mut above, mut bits) = (None, 0u64, 0u32);
    for level in 0..2 {
        let mut hist = vec![0u64; BUCKETS];
        for x_bd in batches_bd {
            let pre_bf = sae.pre_activations(backend, x_bd.view())?;
            let part = pre_bf
                .as_slice()
                .expect("standard layout")
                .par_chunks(1 << 16)
                .fold(
                    || vec![0u64; BUCKETS],
                    |mut h, chunk| {
                        for &v in chunk {
                            if v > 0.0 {
                                let b = v.to_bits();
                                match prefix {
                                    None => h[(b >> 16) as usize] += 1,
                                    Some(p) if b >> 16 == p => h[(b & 0xFFFF) as usize] += 1,
                                    Some(_) => {}
                                }
                            }
                        }
                        h
                    },
                )
                .reduce(
                    || vec![0u64; BUCKETS],
                    |mut a, b| {
                        a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                        a
                    },
                );
            hist.iter_mut().zip(part).for_each(|(h, p)| *h += p);
        }
        collective.all_reduce_sum_u64(&mut hist);
        if level == 0 && hist.iter().sum::<u64>() < rank {
            // Fewer positive entries than k·N: keep them all.
            return smallest_positive(sae, backend, batches_bd, collective);
        }
        // From the largest bucket down, to the one holding the rank-th value.
        let mut bucket = BUCKETS - 1;
        while above + hist[bucket] < rank {
            above += hist[bucket];
            bucket -= 1;
        }
        match prefix {
            None => prefix = Some(bucket as u32),
            Some(upper) => bits = (upper << 16) | bucket as u32,
        }
    }
    Ok(f32::from_bits(bits))
}

/// The smallest positive pre-activation over every process's rows; 0 when there is none.
fn smallest_positive(
    sae: &Sae,
    backend: &dyn Backend,
    batches_bd: &[Array2<f32>],
    collective: &dyn Collective,
) -> Result<f32> {
    let mut lowest = [f32::INFINITY];
    for x_bd in batches_bd {
        let pre_bf = sae.pre_activations(backend, x_bd.view())?;
        for &v in pre_bf.iter().filter(|&&v| v > 0.0) {
            lowest[0] = lowest[0].min(v);
        }
    }
    collective.all_reduce_min_f32(&mut lowest);
    Ok(if lowest[0].is_finite() {
        lowest[0]
    } else {
        0.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;
    use crate::config::{Architecture, SaeConfig};
    use crate::dist::SingleProcess;
    use rand::{Rng, SeedableRng};

    fn sae_and_rows(seed: u64) -> (Sae, Vec<Array2<f32>>) {
        let config = SaeConfig {
            d_model: 8,
            dict_size: 64,
            arch: Architecture::BatchTopK { k: 4 },
        };
        let sae = Sae::new(config, seed).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let rows = (0..3)
            .map(|b| Array2::from_shape_fn((50 + b, 8), |_| rng.gen::<f32>() * 2.0 - 1.0))
            .collect();
        (sae, rows)
    }

    /// Every positive pre-activation of the rows, largest first.
    fn sorted_positive(sae: &Sae, rows: &[Array2<f32>]) -> Vec<f32> {
        let mut all: Vec<f32> = rows
            .iter()
            .flat_map(|x| sae.pre_activations(&Cpu, x.view()).unwrap().into_iter())
            .filter(|&v| v > 0.0)
            .collect();
        all.sort_by(|a, b| b.partial_cmp(a).unwrap());
        all
    }

    #[test]
    fn the_threshold_is_the_k_n_th_largest_positive_code_exactly() {
        for seed in 0..4 {
            let (sae, rows) = sae_and_rows(seed);
            let all = sorted_positive(&sae, &rows);
            let n: usize = rows.iter().map(|r| r.nrows()).sum();
            for k in [1, 3, 7] {
                let theta = calibrated_threshold(&sae, &Cpu, &rows, k, &SingleProcess).unwrap();
                assert_eq!(theta, all[k * n - 1], "seed {seed}, k {k}");
                // Keeping codes >= θ keeps k per row (no ties among random floats).
                let kept = all.iter().filter(|&&v| v >= theta).count();
                assert_eq!(kept, k * n);
            }
        }
    }

    #[test]
    fn fewer_positive_codes_than_k_n_keep_them_all_and_no_rows_is_an_error() {
        let (sae, rows) = sae_and_rows(9);
        let all = sorted_positive(&sae, &rows);
        let theta = calibrated_threshold(&sae, &Cpu, &rows, 64, &SingleProcess).unwrap();
        assert_eq!(theta, *all.last().unwrap());
        assert!(matches!(
            calibrated_threshold(&sae, &Cpu, &[], 4, &SingleProcess),
            Err(Error::Empty { .. })
        ));
    }
}
