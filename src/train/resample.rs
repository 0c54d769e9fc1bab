//! Dead-latent resampling (Anthropic, "Towards Monosemanticity", 2023, "Neuron Resampling";
//! dictionary_learning's `StandardTrainer.resample_neurons`): a latent dead for the dead window
//! is pointed at a batch row the SAE reconstructs badly, so that it starts out firing where the
//! error is instead of waiting for a gradient that never reaches it.
//!
//! For each dead latent j, in index order, one row of the step's global batch is drawn without
//! replacement with probability ∝ ‖x_b − x̂_b‖⁴ (Anthropic's square of the squared error), and
//! with v = the row as the encoder sees it (x − b_dec, or x for JumpReLU), u = v/‖v‖:
//! W_dec\[j\] = u, W_enc\[j\] = scale·(mean ‖W_enc‖ of the live latents)·u, b_enc\[j\] = 0, θ_j back
//! to its initial value (JumpReLU), its dead counter reset, its Adam first moments zeroed and
//! its second moments set to the live latents' mean (Anthropic zeroes both; see below). Dead
//! latents beyond the batch's usable rows wait for the next resampling.

use ndarray::{Array1, Array2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::phases::{State, Step};
use crate::sae::JUMPRELU_INITIAL_THRESHOLD;

/// Whether the trainer resamples after its `done`-th step (1-based): every `every` steps, as
/// long as `every` steps remain for the new latents to train before `total_steps`.
pub(super) fn resample_due(done: u64, every: Option<u64>, total_steps: u64) -> bool {
    every.is_some_and(|every| {
        done.is_multiple_of(every) && done.saturating_add(every) <= total_steps
    })
}

/// Resamples the latents whose dead counters reached `dead_tokens`, from the rows of `step`
/// and their squared errors `row_sq_err_b` (this process's rows); returns how many. Every
/// process draws the same rows (the draw is seeded by `done`, the steps taken) and ends with
/// the same parameters, moments and counters. `state`'s Adam moments must be complete (read
/// back across processes).
pub(super) fn resample_dead(
    state: &mut State,
    step: &Step<'_>,
    e_bd: &Array2<f32>,
    dead_tokens: u64,
    encoder_scale: f32,
    done: u64,
) -> usize {
    let dead: Vec<usize> = (state.tokens_since_fired_f.iter().enumerate())
        .filter(|&(_, &t)| t >= dead_tokens)
        .map(|(j, _)| j)
        .collect();
    if dead.is_empty() {
        return 0;
    }
    let sae = &mut state.sae;
    let (d, centre) = (sae.config.d_model, sae.config.arch.centres_input());
    let rows = &step.shard.rows_per_rank;
    let own = crate::dist::own_part(rows, step.shard.rank);

    // Every process's errors, then the same draw everywhere.
    let mut err_n: Vec<f32> = vec![0.0; step.shard.n_global()];
    for (err, e) in err_n[own.clone()].iter_mut().zip(e_bd.rows()) {
        *err = e.iter().map(|&v| v as f64 * v as f64).sum::<f64>() as f32;
    }
    step.collective.all_gather_f32(&mut err_n, rows);
    let chosen = weighted_sample(&err_n, dead.len(), done);
    if chosen.is_empty() {
        return 0;
    }

    // The chosen rows as the encoder sees them; each from the process holding it (a sum with
    // one nonzero term per element is exact).
    let mut v_md = Array2::<f32>::zeros((chosen.len(), d));
    for (mut v, &g) in v_md.rows_mut().into_iter().zip(&chosen) {
        if own.contains(&g) {
            v.assign(&step.x_bd.row(g - own.start));
            if centre {
                v -= &sae.b_dec_d;
            }
        }
    }
    step.collective
        .all_reduce_sum_f32(v_md.as_slice_mut().expect("standard layout"));

    let is_dead = {
        let mut is_dead = vec![false; sae.config.dict_size];
        dead.iter().for_each(|&j| is_dead[j] = true);
        is_dead
    };
    let live_norms: Vec<f64> = (sae.w_enc_fd.rows().into_iter().zip(&is_dead))
        .filter(|(_, &dead)| !dead)
        .map(|(w, _)| (w.dot(&w) as f64).sqrt())
        .collect();
    // With every latent dead, the encoder rows keep the unit norm they started with.
    let live_norm = if live_norms.is_empty() {
        1.0
    } else {
        live_norms.iter().sum::<f64>() / live_norms.len() as f64
    };
    let enc_norm = (encoder_scale as f64 * live_norm) as f32;

    // Adam's second moments of a resampled latent start at the live latents' mean: zeroed
    // (Anthropic's choice), the first updates would be sign steps of about 2·lr per entry,
    // larger than a small new encoder row, which measured worse (README, Quality).
    let live_v = (
        mean_live_row(&state.adam.v.w_enc_fd, &is_dead),
        mean_live_row(&state.adam.v.w_dec_fd, &is_dead),
        mean_live(state.adam.v.b_enc_f.iter().copied(), &is_dead),
        mean_live(state.adam.v.threshold_f.iter().copied(), &is_dead),
    );
    let mut resampled = 0;
    for (v, &j) in v_md.rows().into_iter().zip(&dead) {
        let norm = v.dot(&v).sqrt();
        // A row equal to b_dec has no direction to give.
        if !(norm > 0.0 && norm.is_finite()) {
            continue;
        }
        let u = &v / norm;
        sae.w_dec_fd.row_mut(j).assign(&u);
        sae.w_enc_fd.row_mut(j).assign(&(&u * enc_norm));
        sae.b_enc_f[j] = 0.0;
        if !sae.threshold_f.is_empty() {
            sae.threshold_f[j] = JUMPRELU_INITIAL_THRESHOLD;
        }
        let (m, v) = (&mut state.adam.m, &mut state.adam.v);
        m.w_enc_fd.row_mut(j).fill(0.0);
        m.w_dec_fd.row_mut(j).fill(0.0);
        m.b_enc_f[j] = 0.0;
        v.w_enc_fd.row_mut(j).assign(&live_v.0);
        v.w_dec_fd.row_mut(j).assign(&live_v.1);
        v.b_enc_f[j] = live_v.2;
        if !m.threshold_f.is_empty() {
            m.threshold_f[j] = 0.0;
            v.threshold_f[j] = live_v.3;
        }
        state.tokens_since_fired_f[j] = 0;
        resampled += 1;
    }
    resampled
}

/// Up to `m` distinct indices of `err_n`, drawn without replacement with probability ∝ err²
/// (Efraimidis and Spirakis 2006: the `m` largest keys ln(u)/w), in draw order. Rows without
/// error (or with a non-finite one) are never drawn.
fn weighted_sample(err_n: &[f32], m: usize, seed: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7265_7361_6d70_6c65);
    let mut keys: Vec<(f64, usize)> = err_n
        .iter()
        .enumerate()
        .map(|(i, &e)| (i, (e as f64) * (e as f64), rng.gen::<f64>()))
        .filter(|&(_, w, _)| w > 0.0 && w.is_finite())
        .map(|(i, w, u)| ((1.0 - u).ln() / w, i))
        .collect();
    keys.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    keys.truncate(m);
    keys.into_iter().map(|(_, i)| i).collect()
}

/// The mean of the live latents' rows of `a` (F×D), or zeros when every latent is dead.
fn mean_live_row(a: &Array2<f32>, is_dead: &[bool]) -> Array1<f32> {
    let mut acc = Array1::<f64>::zeros(a.ncols());
    let mut n = 0usize;
    for (row, _) in a.rows().into_iter().zip(is_dead).filter(|(_, &d)| !d) {
        acc.zip_mut_with(&row, |s, &v| *s += v as f64);
        n += 1;
    }
    acc.mapv(|s| (s / n.max(1) as f64) as f32)
}

/// The mean of the live latents' `values` (none: 0), or 0 when every latent is dead.
fn mean_live(values: impl Iterator<Item = f32>, is_dead: &[bool]) -> f32 {
    let (sum, n) = (values.zip(is_dead).filter(|(_, &d)| !d))
        .fold((0.0f64, 0usize), |(s, n), (v, _)| (s + v as f64, n + 1));
    (sum / n.max(1) as f64) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resampling_comes_every_interval_while_an_interval_remains() {
        let due: Vec<u64> = (1..=1000)
            .filter(|&s| resample_due(s, Some(250), 1000))
            .collect();
        assert_eq!(due, [250, 500, 750]);
        assert!(!(1..=1000).any(|s| resample_due(s, None, 1000)));
    }

    #[test]
    fn the_draw_is_distinct_skips_rows_without_error_and_favours_large_errors() {
        let err = [0.0, 1.0, f32::NAN, 3.0, 0.5];
        for seed in 0..50 {
            let mut got = weighted_sample(&err, 10, seed);
            assert_eq!(got.len(), 3, "rows 0 and 2 have no usable error");
            got.sort();
            assert_eq!(got, [1, 3, 4]);
        }
        // One draw of one row: p ∝ err², so row 1 (err 2) wins about 4 times in 5 against
        // row 0 (err 1).
        let wins = (0..2000)
            .filter(|&s| weighted_sample(&[1.0, 2.0], 1, s) == [1])
            .count();
        assert!((1500..1700).contains(&wins), "{wins} of 2000");
    }
}
