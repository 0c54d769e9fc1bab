//! CPU kernels over sparse codes: everything whose cost is O(active codes · D) rather than
//! O(B·F·D). Row-parallel with rayon, each output written by exactly one task.

use ndarray::{ArrayView1, ArrayView2, ArrayViewMut2, Axis};
use rayon::prelude::*;

use super::simd::{dispatch, prefetch};
use crate::select::{Codes, SparseCodes};

/// Lanes of the independent accumulators in [`dot`]: enough for the compiler to vectorise.
const LANES: usize = 16;

/// Σ a_i·b_i with `LANES` partial sums (fixed order, so deterministic).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; LANES];
    let (a_main, a_tail) = a.split_at(a.len() - a.len() % LANES);
    let (b_main, b_tail) = b.split_at(a_main.len());
    for (ca, cb) in a_main.chunks_exact(LANES).zip(b_main.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] += ca[l] * cb[l];
        }
    }
    let mut tail = 0.0;
    for (x, y) in a_tail.iter().zip(b_tail) {
        tail += x * y;
    }
    acc.iter().sum::<f32>() + tail
}

/// y ← y + alpha·x.
#[inline(always)]
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    debug_assert_eq!(x.len(), y.len());
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

/// `out_bd ← codes · w_fd (+ bias_d)`: each row is the bias plus the sum of its active
/// latents' rows of `w_fd`, scaled by their codes.
pub fn decode_into(
    codes: SparseCodes<'_>,
    w_fd: ArrayView2<'_, f32>,
    bias_d: Option<ArrayView1<'_, f32>>,
    mut out_bd: ArrayViewMut2<'_, f32>,
) {
    debug_assert_eq!(out_bd.nrows(), codes.n_rows());
    out_bd
        .axis_iter_mut(Axis(0))
        .into_par_iter()
        .enumerate()
        .for_each(|(b, mut out_d)| {
            let out = out_d.as_slice_mut().expect("contiguous output row");
            match bias_d {
                Some(bias) => out.copy_from_slice(bias.as_slice().expect("contiguous bias")),
                None => out.fill(0.0),
            }
            let (idx, val) = codes.row(b);
            dispatch(|| {
                for (i, (&j, &v)) in idx.iter().zip(val).enumerate() {
                    if let Some(&next) = idx.get(i + 1) {
                        prefetch(w_fd.row(next as usize).as_slice().expect("contiguous row"));
                    }
                    let w = w_fd.row(j as usize);
                    axpy(v, w.as_slice().expect("contiguous row"), out);
                }
            })
        });
}

/// Nested reconstructions: block g of `out_gbd` (rows g·B..(g+1)·B) ← the codes of latents
/// below `ends[g]` times `w_fd`, plus `bias_d`, for ascending `ends`. One pass over each row's
/// codes (ascending latents), each prefix continuing the one before, so G prefixes cost one
/// decode plus G row copies.
pub fn decode_prefixes_into(
    codes: &Codes,
    w_fd: ArrayView2<'_, f32>,
    bias_d: ArrayView1<'_, f32>,
    ends: &[usize],
    out_gbd: ArrayViewMut2<'_, f32>,
) {
    let (n, d) = (codes.n_rows(), w_fd.ncols());
    debug_assert_eq!(out_gbd.nrows(), ends.len() * n);
    let mut out_gbd = out_gbd
        .into_shape_with_order((ends.len(), n, d))
        .expect("G·B rows in standard layout");
    let bias = bias_d.as_slice().expect("contiguous bias");
    // One task per row b, writing its G×D slice (row b of every block).
    out_gbd
        .axis_iter_mut(Axis(1))
        .into_par_iter()
        .enumerate()
        .for_each(|(b, mut out_gd)| {
            let (idx, val) = codes.row(b);
            let mut e = 0;
            dispatch(|| {
                for (g, &end) in ends.iter().enumerate() {
                    // Each prefix starts from the one before it (the first from the bias).
                    let (done, mut rest) = out_gd.view_mut().split_at(Axis(0), g);
                    let mut acc_d = rest.row_mut(0);
                    let acc = acc_d.as_slice_mut().expect("contiguous output row");
                    match g {
                        0 => acc.copy_from_slice(bias),
                        _ => acc.copy_from_slice(done.row(g - 1).as_slice().expect("contiguous")),
                    }
                    while e < idx.len() && (idx[e] as usize) < end {
                        let w = w_fd.row(idx[e] as usize);
                        axpy(val[e], w.as_slice().expect("contiguous row"), acc);
                        e += 1;
                    }
                }
            })
        });
}

/// Codes transposed to latent-major order (CSC): latent `j`'s entries are
/// `entry[indptr[j]..indptr[j + 1]]`, each the position of that entry in the row-major
/// [`Codes`] arrays, in ascending row order. Lets per-latent gradients be summed by one task each.
#[derive(Clone, Debug, Default)]
pub struct ByLatent {
    /// Offsets per latent; length F + 1.
    pub indptr: Vec<usize>,
    /// Position of each entry in the row-major arrays.
    pub entry: Vec<u32>,
    /// Row of each entry.
    pub row: Vec<u32>,
}

impl ByLatent {
    /// Rebuilds `self` as the transpose of `codes` (counting sort; reuses capacity).
    pub fn rebuild(&mut self, codes: &Codes) {
        let f = codes.n_latents;
        self.indptr.clear();
        self.indptr.resize(f + 1, 0);
        for &j in &codes.indices {
            self.indptr[j as usize + 1] += 1;
        }
        for j in 0..f {
            self.indptr[j + 1] += self.indptr[j];
        }
        self.entry.resize(codes.nnz(), 0);
        self.row.resize(codes.nnz(), 0);
        // `fill[j]` walks latent j's slots; rows are visited in order, so each latent's entries
        // come out row-sorted.
        let mut fill: Vec<usize> = self.indptr[..f].to_vec();
        for b in 0..codes.n_rows() {
            for e in codes.indptr[b]..codes.indptr[b + 1] {
                let j = codes.indices[e] as usize;
                self.entry[fill[j]] = e as u32;
                self.row[fill[j]] = b as u32;
                fill[j] += 1;
            }
        }
    }

    /// Latent `j`'s entries: (positions in the row-major arrays, rows).
    pub fn latent(&self, j: usize) -> (&[u32], &[u32]) {
        let r = self.indptr[j]..self.indptr[j + 1];
        (&self.entry[r.clone()], &self.row[r])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{array, Array2};

    #[test]
    fn dot_matches_naive_for_all_tail_lengths() {
        for n in [0, 1, 15, 16, 17, 33, 100] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let naive: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - naive).abs() < 1e-5, "n = {n}");
        }
    }

    #[test]
    fn decode_matches_dense() {
        let dense = array![[0.0f32, 2.0, 0.0], [1.0, 0.0, 3.0], [0.0, 0.0, 0.0]];
        let codes = Codes::from_dense(dense.view());
        let w = array![[1.0f32, 2.0], [3.0, 4.0], [5.0, 6.0]];
        let bias = array![0.5f32, -0.5];
        let mut out = Array2::zeros((3, 2));
        decode_into(codes.view(), w.view(), Some(bias.view()), out.view_mut());
        assert_eq!(out, dense.dot(&w) + &bias);
    }

    #[test]
    fn by_latent_is_the_transpose() {
        let dense = array![[0.0f32, 2.0, 0.0], [1.0, 5.0, 3.0], [0.0, 7.0, 0.0]];
        let codes = Codes::from_dense(dense.view());
        let mut t = ByLatent::default();
        t.rebuild(&codes);
        let (entries, rows) = t.latent(1);
        assert_eq!(rows, &[0, 1, 2]);
        let vals: Vec<f32> = entries.iter().map(|&e| codes.values[e as usize]).collect();
        assert_eq!(vals, vec![2.0, 5.0, 7.0]);
        assert_eq!(t.latent(0).1, &[1]);
        assert_eq!(t.latent(2).1, &[1]);
    }
}
