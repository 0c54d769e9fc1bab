//! Sparsification: turns post-ReLU activations `post_bf` into sparse [`Codes`] (ReLU, per-row
//! top-k, batch-wide top-k, threshold, and AuxK's top-k among dead latents), in parallel and
//! without per-step allocation of anything B×F-sized.

use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

use crate::dist::Collective;

/// Rows handled by one parallel task. Fixed (not derived from the thread count) so that results
/// never depend on scheduling.
const ROWS_PER_CHUNK: usize = 8;

/// Sparse codes, one row per input row, in CSR form: row `b`'s active latents are
/// `indices[indptr[b]..indptr[b + 1]]` in ascending order, with their (positive) values.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Codes {
    /// F, the number of latents.
    pub n_latents: usize,
    /// Row offsets into `indices`/`values`; length rows + 1.
    pub indptr: Vec<usize>,
    /// Latent index of each active code.
    pub indices: Vec<u32>,
    /// Value of each active code.
    pub values: Vec<f32>,
}

impl Codes {
    /// Codes with no rows for a dictionary of `n_latents`.
    pub fn empty(n_latents: usize) -> Self {
        Codes {
            n_latents,
            indptr: vec![0],
            indices: Vec::new(),
            values: Vec::new(),
        }
    }

    /// The nonzero entries of a dense B×F matrix.
    pub fn from_dense(codes_bf: ArrayView2<'_, f32>) -> Self {
        let mut out = Codes::empty(codes_bf.ncols());
        for row in codes_bf.rows() {
            for (j, &v) in row.iter().enumerate() {
                if v != 0.0 {
                    out.indices.push(j as u32);
                    out.values.push(v);
                }
            }
            out.indptr.push(out.indices.len());
        }
        out
    }

    /// Number of rows.
    pub fn n_rows(&self) -> usize {
        self.indptr.len() - 1
    }

    /// Total active codes.
    pub fn nnz(&self) -> usize {
        self.indices.len()
    }

    /// Row `b`'s active latents and values.
    pub fn row(&self, b: usize) -> (&[u32], &[f32]) {
        let r = self.indptr[b]..self.indptr[b + 1];
        (&self.indices[r.clone()], &self.values[r])
    }

    /// Mean number of active codes per row (L0).
    pub fn mean_l0(&self) -> f32 {
        self.nnz() as f32 / self.n_rows().max(1) as f32
    }

    /// The dense B×F matrix (zeros where inactive).
    pub fn to_dense(&self) -> Array2<f32> {
        let mut dense = Array2::zeros((self.n_rows(), self.n_latents));
        for b in 0..self.n_rows() {
            let (idx, val) = self.row(b);
            for (&j, &v) in idx.iter().zip(val) {
                dense[[b, j as usize]] = v;
            }
        }
        dense
    }

    /// Fills `fired_f[j] = true` for every latent with at least one active code.
    pub fn mark_fired(&self, fired_f: &mut [bool]) {
        for &j in &self.indices {
            fired_f[j as usize] = true;
        }
    }
}

/// One chunk's output rows, kept between steps so their capacity is reused.
#[derive(Default)]
struct ChunkBuf {
    row_len: Vec<usize>,
    indices: Vec<u32>,
    values: Vec<f32>,
    /// Per-row candidates as sortable keys (see [`key`]).
    scratch: Vec<u64>,
    /// Batch top-k: entries of this chunk whose value equals the cut exactly.
    ties: usize,
}

/// The selection workspace: reusable buffers for building [`Codes`] in parallel.
#[derive(Default)]
pub struct Selector {
    chunks: Vec<ChunkBuf>,
}

/// Sort key of a non-negative value at latent `j`: larger key = larger value, then smaller
/// index, so every selection breaks ties towards the lower latent index, deterministically.
#[inline]
fn key(v: f32, j: usize) -> u64 {
    ((v.to_bits() as u64) << 32) | (u32::MAX - j as u32) as u64
}

#[inline]
fn key_latent(key: u64) -> u32 {
    u32::MAX - (key as u32)
}

/// Keeps the `k` largest keys of `cand` (any order in, ascending latent order out).
fn push_top_k(cand: &mut [u64], k: usize, indices: &mut Vec<u32>, values: &mut Vec<f32>) {
    let kept = if k == 0 {
        &mut cand[..0]
    } else if cand.len() > k {
        cand.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
        &mut cand[..k]
    } else {
        cand
    };
    kept.sort_unstable_by_key(|&c| key_latent(c));
    for &c in kept.iter() {
        indices.push(key_latent(c));
        values.push(f32::from_bits((c >> 32) as u32));
    }
}

impl Selector {
    /// Builds `out` row by row in parallel: `row_fn(b, buf)` appends row `b`'s entries (ascending
    /// latent order) to `buf.indices`/`buf.values`.
    fn build<R>(&mut self, n_rows: usize, n_latents: usize, out: &mut Codes, row_fn: R)
    where
        R: Fn(usize, &mut ChunkBuf) + Sync,
    {
        let n_chunks = n_rows.div_ceil(ROWS_PER_CHUNK);
        if self.chunks.len() < n_chunks {
            self.chunks.resize_with(n_chunks, ChunkBuf::default);
        }
        self.chunks[..n_chunks]
            .par_iter_mut()
            .enumerate()
            .for_each(|(c, buf)| {
                buf.row_len.clear();
                buf.indices.clear();
                buf.values.clear();
                let rows = c * ROWS_PER_CHUNK..((c + 1) * ROWS_PER_CHUNK).min(n_rows);
                for b in rows {
                    let start = buf.indices.len();
                    row_fn(b, buf);
                    buf.row_len.push(buf.indices.len() - start);
                }
            });
        self.gather(n_chunks, n_latents, out);
    }

    /// Concatenates the first `n_chunks` chunk buffers into `out`.
    fn gather(&self, n_chunks: usize, n_latents: usize, out: &mut Codes) {
        out.n_latents = n_latents;
        out.indptr.clear();
        out.indices.clear();
        out.values.clear();
        out.indptr.push(0);
        for buf in &self.chunks[..n_chunks] {
            for &len in &buf.row_len {
                out.indptr.push(out.indptr.last().unwrap() + len);
            }
            out.indices.extend_from_slice(&buf.indices);
            out.values.extend_from_slice(&buf.values);
        }
    }

    /// Every positive entry (a ReLU SAE's code).
    pub fn relu(&mut self, post_bf: ArrayView2<'_, f32>, out: &mut Codes) {
        self.threshold(post_bf, 0.0, out)
    }

    /// Entries with `post > theta` (BatchTopK's inference rule; `theta = 0` is plain ReLU).
    pub fn threshold(&mut self, post_bf: ArrayView2<'_, f32>, theta: f32, out: &mut Codes) {
        let theta = theta.max(0.0);
        self.build(post_bf.nrows(), post_bf.ncols(), out, |b, buf| {
            for (j, &v) in post_bf.row(b).iter().enumerate() {
                if v > theta {
                    buf.indices.push(j as u32);
                    buf.values.push(v);
                }
            }
        });
    }

    /// The `k` largest positive entries of each row (TopK). Rows with fewer than `k` positive
    /// entries keep all of them: a zero code is no code.
    pub fn topk(&mut self, post_bf: ArrayView2<'_, f32>, k: usize, out: &mut Codes) {
        self.build(post_bf.nrows(), post_bf.ncols(), out, |b, buf| {
            let ChunkBuf {
                indices,
                values,
                scratch,
                ..
            } = buf;
            scratch.clear();
            for (j, &v) in post_bf.row(b).iter().enumerate() {
                if v > 0.0 {
                    scratch.push(key(v, j));
                }
            }
            push_top_k(scratch, k, indices, values);
        });
    }

    /// The `k` largest positive entries of each row among `latents` only (AuxK's selection among
    /// dead latents). `latents` must be ascending.
    pub fn topk_among(
        &mut self,
        post_bf: ArrayView2<'_, f32>,
        latents: &[u32],
        k: usize,
        out: &mut Codes,
    ) {
        self.build(post_bf.nrows(), post_bf.ncols(), out, |b, buf| {
            let ChunkBuf {
                indices,
                values,
                scratch,
                ..
            } = buf;
            scratch.clear();
            let row = post_bf.row(b);
            for &j in latents {
                let v = row[j as usize];
                if v > 0.0 {
                    scratch.push(key(v, j as usize));
                }
            }
            push_top_k(scratch, k, indices, values);
        });
    }

    /// The `k_total` largest positive entries of the whole batch (BatchTopK), summed over every
    /// process of `collective`.
    ///
    /// Radix selection on the values' bit patterns (non-negative f32 order like their bits):
    /// a histogram of the top 16 bits finds the bin holding the cut, one gather pass keeps the
    /// entries at or above that bin, and a histogram of the low 16 bits of the boundary bin's
    /// entries finds the exact cut. The histograms are what processes exchange; nothing sorts B·F
    /// values. Entries equal to the cut are taken in row-major order until `k_total` are kept;
    /// across several processes each would apply that rule to its own rows.
    pub fn batch_topk(
        &mut self,
        post_bf: ArrayView2<'_, f32>,
        k_total: usize,
        collective: &dyn Collective,
        out: &mut Codes,
    ) {
        let (n_rows, n_latents) = post_bf.dim();
        let mut high = histogram_high(post_bf);
        collective.all_reduce_sum_u64(&mut high);

        // Bin holding the k_total-th largest value, and how many lie strictly above it.
        let mut above = 0u64;
        let mut bin = None;
        for h in (0..=0xFFFF).rev() {
            if above + high[h] >= k_total as u64 {
                bin = Some(h as u32);
                break;
            }
            above += high[h];
        }
        // Fewer positives than k_total: keep them all.
        let Some(bin) = bin else {
            return self.relu(post_bf, out);
        };
        let lower_bits = bin << 16;
        self.build(n_rows, n_latents, out, |b, buf| {
            for (j, &v) in post_bf.row(b).iter().enumerate() {
                if v > 0.0 && v.to_bits() >= lower_bits {
                    buf.indices.push(j as u32);
                    buf.values.push(v);
                }
            }
        });

        let mut low = vec![0u64; 1 << 16];
        for (&v, _) in out.values.iter().zip(&out.indices) {
            if v.to_bits() >> 16 == bin {
                low[(v.to_bits() & 0xFFFF) as usize] += 1;
            }
        }
        collective.all_reduce_sum_u64(&mut low);
        let mut kept = above;
        let mut cut_bits = lower_bits;
        for l in (0..=0xFFFF).rev() {
            if kept + low[l] >= k_total as u64 {
                cut_bits = lower_bits | l as u32;
                break;
            }
            kept += low[l];
        }
        // `kept` counts entries strictly above the cut; the rest of the quota are ties.
        let mut tie_quota = k_total - kept as usize;

        let n_chunks = n_rows.div_ceil(ROWS_PER_CHUNK);
        self.chunks[..n_chunks].par_iter_mut().for_each(|buf| {
            buf.ties = buf
                .values
                .iter()
                .filter(|v| v.to_bits() == cut_bits)
                .count()
        });
        let quotas: Vec<usize> = self.chunks[..n_chunks]
            .iter()
            .map(|buf| {
                let q = buf.ties.min(tie_quota);
                tie_quota -= q;
                q
            })
            .collect();
        self.chunks[..n_chunks]
            .par_iter_mut()
            .zip(quotas)
            .for_each(|(buf, mut quota)| {
                let ChunkBuf {
                    row_len,
                    indices,
                    values,
                    ..
                } = buf;
                let mut w = 0;
                let mut r = 0;
                for len in row_len.iter_mut() {
                    let mut kept_in_row = 0;
                    for i in r..r + *len {
                        let bits = values[i].to_bits();
                        let keep = bits > cut_bits || (bits == cut_bits && quota > 0);
                        if bits == cut_bits && keep {
                            quota -= 1;
                        }
                        if keep {
                            indices[w] = indices[i];
                            values[w] = values[i];
                            w += 1;
                            kept_in_row += 1;
                        }
                    }
                    r += *len;
                    *len = kept_in_row;
                }
                indices.truncate(w);
                values.truncate(w);
            });
        self.gather(n_chunks, n_latents, out);
    }
}

/// Counts of positive entries by the top 16 bits of their f32 pattern.
fn histogram_high(post_bf: ArrayView2<'_, f32>) -> Vec<u64> {
    let n_rows = post_bf.nrows();
    let n_chunks = n_rows.div_ceil(ROWS_PER_CHUNK);
    (0..n_chunks)
        .into_par_iter()
        .fold(
            || vec![0u64; 1 << 16],
            |mut hist, c| {
                for b in c * ROWS_PER_CHUNK..((c + 1) * ROWS_PER_CHUNK).min(n_rows) {
                    for &v in post_bf.row(b) {
                        if v > 0.0 {
                            hist[(v.to_bits() >> 16) as usize] += 1;
                        }
                    }
                }
                hist
            },
        )
        .reduce(
            || vec![0u64; 1 << 16],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            },
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::SingleProcess;
    use ndarray::array;
    use rand::{Rng, SeedableRng};

    fn random_post(b: usize, f: usize, seed: u64) -> Array2<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        Array2::from_shape_fn((b, f), |_| (rng.gen::<f32>() - 0.4).max(0.0))
    }

    /// Brute force: sort all (value, flat index) and keep the n largest positives.
    fn brute_batch_topk(post: &Array2<f32>, n: usize) -> Array2<f32> {
        let mut all: Vec<(f32, usize)> = post
            .iter()
            .enumerate()
            .filter(|(_, &v)| v > 0.0)
            .map(|(i, &v)| (v, i))
            .collect();
        all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut out = Array2::zeros(post.dim());
        for &(v, i) in all.iter().take(n) {
            out.as_slice_mut().unwrap()[i] = v;
        }
        out
    }

    #[test]
    fn batch_topk_matches_brute_force() {
        let post = random_post(37, 53, 1);
        for n in [1, 10, 37 * 4, 500, 37 * 53, 37 * 53 + 10] {
            let mut codes = Codes::empty(0);
            Selector::default().batch_topk(post.view(), n, &SingleProcess, &mut codes);
            assert_eq!(codes.to_dense(), brute_batch_topk(&post, n), "n = {n}");
        }
    }

    #[test]
    fn batch_topk_breaks_ties_by_position() {
        // Many equal values: the cut falls inside a run of ties.
        let post =
            Array2::from_shape_fn((20, 9), |(b, j)| if (b + j) % 3 == 0 { 0.5 } else { 0.25 });
        for n in [5, 60, 61, 100, 180] {
            let mut codes = Codes::empty(0);
            Selector::default().batch_topk(post.view(), n, &SingleProcess, &mut codes);
            assert_eq!(codes.nnz(), n.min(180));
            assert_eq!(codes.to_dense(), brute_batch_topk(&post, n), "n = {n}");
        }
    }

    #[test]
    fn topk_keeps_largest_per_row_and_drops_zeros() {
        let post = array![
            [0.1f32, 0.9, 0.0, 0.5],
            [0.0, 0.0, 0.0, 0.3],
            [0.2, 0.2, 0.2, 0.1]
        ];
        let mut codes = Codes::empty(0);
        Selector::default().topk(post.view(), 2, &mut codes);
        assert_eq!(
            codes.to_dense(),
            array![
                [0.0f32, 0.9, 0.0, 0.5],
                [0.0, 0.0, 0.0, 0.3],
                [0.2, 0.2, 0.0, 0.0]
            ]
        );
        // k >= F keeps every positive entry.
        Selector::default().topk(post.view(), 10, &mut codes);
        assert_eq!(codes.to_dense(), post);
    }

    #[test]
    fn topk_among_only_looks_at_listed_latents() {
        let post = array![[0.1f32, 0.9, 0.4, 0.5], [0.7, 0.0, 0.0, 0.3]];
        let mut codes = Codes::empty(0);
        Selector::default().topk_among(post.view(), &[0, 2, 3], 1, &mut codes);
        assert_eq!(
            codes.to_dense(),
            array![[0.0f32, 0.0, 0.0, 0.5], [0.7, 0.0, 0.0, 0.0]]
        );
    }

    #[test]
    fn threshold_and_relu() {
        let post = random_post(19, 31, 2);
        let mut codes = Codes::empty(0);
        let mut sel = Selector::default();
        sel.relu(post.view(), &mut codes);
        assert_eq!(codes.to_dense(), post);
        assert_eq!(codes, Codes::from_dense(post.view()));
        sel.threshold(post.view(), 0.3, &mut codes);
        assert_eq!(
            codes.to_dense(),
            post.mapv(|v| if v > 0.3 { v } else { 0.0 })
        );
    }
}
