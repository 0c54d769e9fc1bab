//! The structured synthetic set's sampler (hierarchy, latent factors, firing in time
//! proportional to what fires) and the shaping of its directions (shared overlap, children
//! bent towards their parents).

use ndarray::{Array2, ArrayViewMut1};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use super::{stream, SynthConfig};

/// `parent_slot` of a root that has no children.
const NOT_PARENT: u32 = u32::MAX;

/// Within a block, no root's probability is below the block's largest over this factor, so
/// at least 1/BAND of the candidates that geometric skipping proposes fire.
const BAND: f64 = 2.0;

/// Roots of one factor group whose base probabilities lie within a factor [`BAND`].
#[derive(Clone, Debug)]
struct Block {
    group: usize,
    /// Root indices, by decreasing probability.
    roots: Vec<u32>,
    /// The largest base probability in the block (its first root's).
    p_max: f64,
}

/// Which features fire in a row: roots by blocks with geometric skipping, each parent's one
/// child after it.
///
/// Roots are features 0..R in frequency order; children follow, parent slot i owning
/// R + i·m .. R + (i+1)·m. A row first draws the factor multipliers, then in each block
/// proposes candidates at the block's largest (modulated) probability q by skipping
/// Geometric(q) roots at a time, and keeps a candidate with probability p/q. That is
/// exactly a Bernoulli(p) draw per root, at a cost of O(1 + fired) per block rather than
/// O(roots).
#[derive(Clone, Debug)]
pub(super) struct Sampler {
    n_roots: usize,
    /// Base firing probability of each root, before the factors' modulation.
    p_root: Vec<f64>,
    blocks: Vec<Block>,
    /// Parent slot of each root, or [`NOT_PARENT`].
    parent_slot: Vec<u32>,
    /// Root index of each parent slot.
    parent_root: Vec<u32>,
    children_per_parent: usize,
    child_probability: f64,
    n_factors: usize,
    factor_strength: f64,
}

impl Sampler {
    /// The sampler of a validated `config`. Root probabilities are c·(r + 1)^(−exponent), with
    /// c chosen so that roots and children together fire `mean_active` times a row on
    /// average, then capped at 1.
    pub(super) fn new(config: &SynthConfig) -> Sampler {
        let n_children = config.n_children();
        let n_roots = config.n_features - n_children;
        let n_parents = config.n_parents;
        // Parents spread evenly over the frequency ranks: ⌊i·R/P⌋ is strictly increasing
        // because R ≥ P (validated).
        let parent_root: Vec<u32> = (0..n_parents)
            .map(|i| (i as u128 * n_roots as u128 / n_parents as u128) as u32)
            .collect();
        let mut parent_slot = vec![NOT_PARENT; n_roots];
        for (slot, &r) in parent_root.iter().enumerate() {
            parent_slot[r as usize] = slot as u32;
        }
        let w_r: Vec<f64> = (0..n_roots)
            .map(|r| ((r + 1) as f64).powf(-config.power_law_exponent))
            .collect();
        let children_weight: f64 = if n_children > 0 {
            config.child_probability * parent_root.iter().map(|&r| w_r[r as usize]).sum::<f64>()
        } else {
            0.0
        };
        let scale = config.mean_active / (w_r.iter().sum::<f64>() + children_weight);
        let p_root: Vec<f64> = w_r.iter().map(|w| (w * scale).min(1.0)).collect();
        let n_groups = config.n_factors.max(1);
        let mut blocks = Vec::new();
        for group in 0..n_groups {
            let mut block: Option<Block> = None;
            for r in (group..n_roots).step_by(n_groups) {
                let p = p_root[r];
                match &mut block {
                    Some(b) if p * BAND >= b.p_max => b.roots.push(r as u32),
                    _ => {
                        blocks.extend(block.take());
                        block = Some(Block {
                            group,
                            roots: vec![r as u32],
                            p_max: p,
                        });
                    }
                }
            }
            blocks.extend(block);
        }
        Sampler {
            n_roots,
            p_root,
            blocks,
            parent_slot,
            parent_root,
            children_per_parent: config.children_per_parent,
            child_probability: config.child_probability,
            n_factors: config.n_factors,
            factor_strength: config.factor_strength,
        }
    }

    /// The marginal firing probability of every feature (without the factors' cap).
    pub(super) fn marginals(&self) -> Vec<f64> {
        let mut p_g = self.p_root.clone();
        let m = self.children_per_parent as f64;
        for &r in &self.parent_root {
            let p_child = self.p_root[r as usize] * self.child_probability / m;
            p_g.extend(std::iter::repeat_n(p_child, self.children_per_parent));
        }
        p_g
    }

    /// The parent of feature `g`, if it is a child.
    pub(super) fn parent(&self, g: usize) -> Option<usize> {
        let slot = g.checked_sub(self.n_roots)? / self.children_per_parent.max(1);
        self.parent_root.get(slot).map(|&r| r as usize)
    }

    /// Appends the features that fire in one row to `fired` (roots, then children).
    pub(super) fn sample_row(&self, rng: &mut ChaCha8Rng, fired: &mut Vec<u32>) {
        let sigma = self.factor_strength;
        // E[exp(σz − σ²/2)] = 1: the factors move probabilities together, not their means.
        let multiplier_k: Vec<f64> = if self.n_factors > 0 {
            (0..self.n_factors)
                .map(|_| {
                    let z: f64 = StandardNormal.sample(rng);
                    (sigma * z - sigma * sigma / 2.0).exp()
                })
                .collect()
        } else {
            vec![1.0]
        };
        for block in &self.blocks {
            let m = multiplier_k[block.group];
            let q = (block.p_max * m).min(1.0);
            if q <= 0.0 {
                continue;
            }
            let mut i = skip(rng, q);
            while i < block.roots.len() {
                let r = block.roots[i];
                let p = (self.p_root[r as usize] * m).min(1.0);
                if rng.gen::<f64>() * q < p {
                    fired.push(r);
                }
                i = i.saturating_add(1).saturating_add(skip(rng, q));
            }
        }
        if self.children_per_parent == 0 {
            return;
        }
        let roots_fired = fired.len();
        for i in 0..roots_fired {
            let slot = self.parent_slot[fired[i] as usize];
            if slot != NOT_PARENT && rng.gen::<f64>() < self.child_probability {
                let child = rng.gen_range(0..self.children_per_parent);
                let g = self.n_roots + slot as usize * self.children_per_parent + child;
                fired.push(g as u32);
            }
        }
    }
}

/// The number of failures before the first success of Bernoulli(q) trials, by inversion.
fn skip(rng: &mut ChaCha8Rng, q: f64) -> usize {
    if q >= 1.0 {
        return 0;
    }
    // 1 − u lies in (0, 1], so the logarithm is finite; the cast saturates.
    let u: f64 = rng.gen();
    ((1.0 - u).ln() / (-q).ln_1p()).floor() as usize
}

/// Mixes every direction with the shared component and bends each child towards its parent,
/// as `config` asks; leaves `features_gd` untouched when both are off.
pub(super) fn shape_directions(config: &SynthConfig, features_gd: &mut Array2<f32>) {
    let d = config.d_model;
    if config.shared_weight > 0.0 {
        let r = config.shared_rank;
        let mut rng = stream(config.seed, b"shared__", 0);
        let basis_rd = orthonormal_rows(&mut rng, r, d);
        let (own, shared) = (
            (1.0 - config.shared_weight).sqrt() as f32,
            config.shared_weight.sqrt() as f32,
        );
        for mut row in features_gd.rows_mut() {
            let mut c_r = ndarray::Array1::<f32>::zeros(r);
            random_unit(&mut rng, c_r.view_mut());
            // A unit vector of the subspace: the basis rows are orthonormal.
            let v_d = c_r.dot(&basis_rd);
            row.mapv_inplace(|x| own * x);
            row.scaled_add(shared, &v_d);
            normalise(row);
        }
    }
    if config.n_parents > 0 {
        let sampler = Sampler::new(config);
        let s = config.child_similarity as f32;
        let rest = (1.0 - s * s).sqrt();
        let m = config.children_per_parent;
        for (slot, &p) in sampler.parent_root.iter().enumerate() {
            let parent_d = features_gd.row(p as usize).to_owned();
            for c in 0..m {
                let mut child = features_gd.row_mut(sampler.n_roots + slot * m + c);
                let along = child.dot(&parent_d);
                child.scaled_add(-along, &parent_d);
                let norm = child.dot(&child).sqrt();
                // A child drawn (with probability 0) along its parent becomes the parent.
                if norm > 1e-6 {
                    child.mapv_inplace(|x| rest * x / norm);
                } else {
                    child.fill(0.0);
                }
                child.scaled_add(s, &parent_d);
                normalise(child);
            }
        }
    }
}

/// `r` orthonormal rows of width `d` (r ≤ d): Gaussian rows, Gram–Schmidt, redrawing a row
/// that falls (with probability 0) in the span of the others.
fn orthonormal_rows(rng: &mut ChaCha8Rng, r: usize, d: usize) -> Array2<f32> {
    let mut basis_rd = Array2::<f32>::zeros((r, d));
    let mut i = 0;
    while i < r {
        let mut v = ndarray::Array1::<f32>::zeros(d);
        v.iter_mut().for_each(|x| *x = StandardNormal.sample(rng));
        for j in 0..i {
            let along = v.dot(&basis_rd.row(j));
            v.scaled_add(-along, &basis_rd.row(j));
        }
        let norm = v.dot(&v).sqrt();
        if norm > 1e-3 {
            basis_rd.row_mut(i).assign(&(v / norm));
            i += 1;
        }
    }
    basis_rd
}

/// Fills `v` with a uniformly random unit vector.
fn random_unit(rng: &mut ChaCha8Rng, mut v: ArrayViewMut1<'_, f32>) {
    loop {
        v.iter_mut().for_each(|x| *x = StandardNormal.sample(rng));
        let norm = v.dot(&v).sqrt();
        if norm > 1e-6 {
            v /= norm;
            return;
        }
    }
}

fn normalise(mut v: ArrayViewMut1<'_, f32>) {
    let norm = v.dot(&v).sqrt();
    if norm > 0.0 {
        v /= norm;
    }
}
