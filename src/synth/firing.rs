//! Firing scores: each true feature's matched latent judged as a detector of the feature's
//! firing (precision, recall, F1) on rows with known coefficients.

use serde::Serialize;

use super::{matched_recovery, ActiveFeatures, Recovery, Synth};
use crate::backend::Device;
use crate::error::{Error, Result};
use crate::select::Codes;
use crate::Sae;

/// How well matched latents fire when, and only when, their true features do.
///
/// For a true feature g matched (by the MCC's optimal matching) to latent j, over the rows
/// scored: precision = P(g fires | j fires), recall = P(j fires | g fires), F1 their harmonic
/// mean, 2·both/(fires of j + fires of g). A feature with no matched latent (F < G) scores 0
/// on all three, as does a latent that never fires. The means are over the true features that
/// fired at least once in the rows (`n_scored`): a feature never seen has no recall.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Firing {
    /// Rows scored.
    pub n_rows: usize,
    /// True features that fired in those rows, over which the means are taken.
    pub n_scored: usize,
    /// Mean F1 of the matched pairs.
    pub mean_f1: f32,
    /// Mean precision.
    pub mean_precision: f32,
    /// Mean recall.
    pub mean_recall: f32,
    /// Fraction of the scored features whose matched latent reaches F1 ≥ 0.5.
    pub fraction_f1_above_0_5: f32,
}

/// Scores the latents matched to true features (`latent_of_g[g]`, from the optimal matching)
/// by their firing in `codes` against the ground truth `active` of the same rows. O(rows ×
/// (active features + active latents)). Fails with [`Error::Shape`] when the two hold
/// different numbers of rows, or a matched latent or a firing feature is out of range.
pub fn firing(
    latent_of_g: &[Option<usize>],
    active: &ActiveFeatures,
    codes: &Codes,
) -> Result<Firing> {
    let (g_count, f_count) = (latent_of_g.len(), codes.n_latents);
    if active.n_rows() != codes.n_rows() {
        return Err(Error::Shape {
            what: "codes for the ground-truth rows".into(),
            expected: vec![active.n_rows(), f_count],
            got: vec![codes.n_rows(), f_count],
        });
    }
    const NONE: u32 = u32::MAX;
    let mut g_of_latent = vec![NONE; f_count];
    for (g, latent) in latent_of_g.iter().enumerate() {
        if let Some(j) = *latent {
            if j >= f_count {
                return Err(Error::Shape {
                    what: format!("latent matched to true feature {g}"),
                    expected: vec![f_count],
                    got: vec![j],
                });
            }
            g_of_latent[j] = g as u32;
        }
    }
    if let Some(&g) = active.features.iter().find(|&&g| g as usize >= g_count) {
        return Err(Error::Shape {
            what: "firing feature of the ground truth".into(),
            expected: vec![g_count],
            got: vec![g as usize],
        });
    }
    // Counts per true feature: its firings, its latent's, and both together.
    let (mut fires_g, mut latent_fires_g, mut both_g) = (
        vec![0u64; g_count],
        vec![0u64; g_count],
        vec![0u64; g_count],
    );
    let mut firing_g = vec![false; g_count];
    for b in 0..codes.n_rows() {
        let (features, _) = active.row(b);
        for &g in features {
            firing_g[g as usize] = true;
            fires_g[g as usize] += 1;
        }
        let (latents, values) = codes.row(b);
        for (&j, &v) in latents.iter().zip(values) {
            let g = g_of_latent[j as usize];
            if v > 0.0 && g != NONE {
                latent_fires_g[g as usize] += 1;
                both_g[g as usize] += u64::from(firing_g[g as usize]);
            }
        }
        for &g in features {
            firing_g[g as usize] = false;
        }
    }
    let (mut f1, mut precision, mut recall, mut good, mut scored) = (0.0, 0.0, 0.0, 0usize, 0);
    for g in 0..g_count {
        if fires_g[g] == 0 {
            continue;
        }
        scored += 1;
        let both = both_g[g] as f64;
        let f1_g = 2.0 * both / (fires_g[g] + latent_fires_g[g]) as f64;
        f1 += f1_g;
        recall += both / fires_g[g] as f64;
        if latent_fires_g[g] > 0 {
            precision += both / latent_fires_g[g] as f64;
        }
        good += usize::from(f1_g >= 0.5);
    }
    let n = scored.max(1) as f64;
    Ok(Firing {
        n_rows: codes.n_rows(),
        n_scored: scored,
        mean_f1: (f1 / n) as f32,
        mean_precision: (precision / n) as f32,
        mean_recall: (recall / n) as f32,
        fraction_f1_above_0_5: (good as f64 / n) as f32,
    })
}

/// Rows encoded at a time by [`score`]: bounds the dense B×F pre-activations.
const ENCODE_ROWS: usize = 4096;

/// The full score of `sae` on `synth`: [`super::recovery`] of its decoder, and the
/// [`Firing`] of its matched latents on batch `batch_index` of `n_rows` rows (encoded on
/// `device`; use a batch index training never reaches). Costs the matching plus one encode
/// of the rows. Fails as [`super::recovery`] does, and when the SAE's width is not the set's.
pub fn score(
    sae: &Sae,
    device: Device,
    synth: &Synth,
    n_rows: usize,
    batch_index: u64,
) -> Result<Recovery> {
    let (mut score, latent_of_g) = matched_recovery(synth.true_features(), sae.w_dec_fd())?;
    if n_rows == 0 {
        return Ok(score);
    }
    let (x_bd, active) = synth.batch_with_active(n_rows, batch_index);
    let mut encoder = sae.encoder(device)?;
    let mut codes = Codes::empty(sae.config().dict_size);
    for start in (0..n_rows).step_by(ENCODE_ROWS) {
        let end = (start + ENCODE_ROWS).min(n_rows);
        let part = encoder.encode(x_bd.slice(ndarray::s![start..end, ..]))?;
        let base = codes.indices.len();
        codes
            .indptr
            .extend(part.indptr[1..].iter().map(|&i| base + i));
        codes.indices.extend_from_slice(&part.indices);
        codes.values.extend_from_slice(&part.values);
    }
    score.firing = Some(firing(&latent_of_g, &active, &codes)?);
    Ok(score)
}
