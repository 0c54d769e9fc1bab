//! Firing scores: each true feature's matched latent judged as a detector of the feature's
//! firing (precision, recall, F1) on rows with known coefficients.

use serde::Serialize;

use super::{recovery_with_matching, ActiveFeatures, Recovery, Synth};
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

/// One true feature's firing against its matched latent, as counts of rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FeatureFiring {
    /// Rows where the feature fires.
    pub fires: u64,
    /// Rows where its matched latent fires (0 with no matched latent).
    pub latent_fires: u64,
    /// Rows where both do.
    pub both: u64,
}

impl FeatureFiring {
    /// P(feature fires | latent fires); 0 for a latent that never fires.
    pub fn precision(&self) -> f64 {
        ratio(self.both, self.latent_fires)
    }

    /// P(latent fires | feature fires); 0 for a feature that never fires.
    pub fn recall(&self) -> f64 {
        ratio(self.both, self.fires)
    }

    /// 2·both / (fires + latent fires), the harmonic mean of the two; 0 when neither fires.
    pub fn f1(&self) -> f64 {
        ratio(2 * self.both, self.fires + self.latent_fires)
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// Scores the latents matched to true features (`latent_of_g[g]`, from the optimal matching)
/// by their firing in `codes` against the ground truth `active` of the same rows: the means of
/// [`firing_by_feature`]. Fails as it does.
pub fn firing(
    latent_of_g: &[Option<usize>],
    active: &ActiveFeatures,
    codes: &Codes,
) -> Result<Firing> {
    let by_feature = firing_by_feature(latent_of_g, active, codes)?;
    let seen: Vec<&FeatureFiring> = by_feature.iter().filter(|c| c.fires > 0).collect();
    let n = seen.len().max(1) as f64;
    let mean =
        |score: fn(&FeatureFiring) -> f64| (seen.iter().map(|c| score(c)).sum::<f64>() / n) as f32;
    let good = seen.iter().filter(|c| c.f1() >= 0.5).count();
    Ok(Firing {
        n_rows: codes.n_rows(),
        n_scored: seen.len(),
        mean_f1: mean(FeatureFiring::f1),
        mean_precision: mean(FeatureFiring::precision),
        mean_recall: mean(FeatureFiring::recall),
        fraction_f1_above_0_5: (good as f64 / n) as f32,
    })
}

/// Each true feature's [`FeatureFiring`] against its matched latent (`latent_of_g[g]`, from
/// [`super::recovery_with_matching`]) in `codes`, on the rows whose ground truth is `active`:
/// what a per-feature study (a parent's recall against its children's, say) starts from.
/// O(rows × (active features + active latents)). Fails with [`Error::Shape`] when the two
/// hold different numbers of rows, or a matched latent or a firing feature is out of range.
pub fn firing_by_feature(
    latent_of_g: &[Option<usize>],
    active: &ActiveFeatures,
    codes: &Codes,
) -> Result<Vec<FeatureFiring>> {
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
    Ok((0..g_count)
        .map(|g| FeatureFiring {
            fires: fires_g[g],
            latent_fires: latent_fires_g[g],
            both: both_g[g],
        })
        .collect())
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
    let (mut score, latent_of_g) = recovery_with_matching(synth.true_features(), sae.w_dec_fd())?;
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
