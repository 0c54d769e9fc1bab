//! Sparsification: turns pre-activations ([`PreActs`]) into sparse [`Codes`] (ReLU, per-row
//! top-k, batch-wide top-k, threshold, and AuxK's top-k among dead latents), in parallel and
//! without per-step allocation of anything B×F-sized.

use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

use crate::arch::Selection;
use crate::dist::Collective;
use crate::error::{check_shape, Error, Result};

/// Pre-activations as the encoder leaves them: entry (b, j) is `gemm_bf[b, j] + bias_f[j]`.
/// The bias is added by whoever reads an entry rather than in a pass of its own over B×F
/// memory; ReLU is implied, since an entry ≤ 0 is never selected.
#[derive(Clone, Copy, Debug)]
pub struct PreActs<'a> {
    gemm_bf: ArrayView2<'a, f32>,
    bias_f: &'a [f32],
}

impl<'a> PreActs<'a> {
    /// Pairs a B×F matrix (standard layout) with the F biases to add to each of its rows.
    pub fn new(gemm_bf: ArrayView2<'a, f32>, bias_f: &'a [f32]) -> Result<Self> {
        check_shape("bias_f", &[bias_f.len()], &[gemm_bf.ncols()])?;
        if gemm_bf.as_slice().is_none() {
            return Err(Error::Shape {
                what: "pre-activations (not in standard layout; use .as_standard_layout())".into(),
                expected: gemm_bf.shape().to_vec(),
                got: gemm_bf.shape().to_vec(),
            });
        }
        Ok(PreActs { gemm_bf, bias_f })
    }

    /// Rows B.
    pub fn n_rows(&self) -> usize {
        self.gemm_bf.nrows()
    }

    /// Latents F.
    pub fn n_latents(&self) -> usize {
        self.gemm_bf.ncols()
    }

    /// Row `b` before its bias.
    fn row(&self, b: usize) -> &'a [f32] {
        let f = self.n_latents();
        &self.gemm_bf.to_slice().expect("standard layout")[b * f..(b + 1) * f]
    }

    /// Entry (b, j), bias included.
    pub fn get(&self, b: usize, j: usize) -> f32 {
        self.row(b)[j] + self.bias_f[j]
    }

    /// Fraction of positive entries.
    #[cfg(test)]
    fn positive_fraction(&self) -> f32 {
        self.positive_count() as f32 / (self.n_rows() * self.n_latents()).max(1) as f32
    }

    /// Number of positive entries.
    pub fn positive_count(&self) -> usize {
        (0..self.n_rows())
            .into_par_iter()
            .map(|b| {
                let row = self.row(b);
                row.iter()
                    .zip(self.bias_f)
                    .filter(|(v, b)| **v + **b > 0.0)
                    .count()
            })
            .sum()
    }

    /// The dense B×F pre-activations, bias included.
    pub fn to_dense(self) -> Array2<f32> {
        &self.gemm_bf + &ndarray::ArrayView1::from(self.bias_f)
    }
}

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

    /// This code as a borrowed [`SparseCodes`] view (no copy).
    pub fn view(&self) -> SparseCodes<'_> {
        SparseCodes::from(self)
    }

    /// Number of rows (0 for [`Codes::default`], whose `indptr` is empty).
    pub fn n_rows(&self) -> usize {
        self.view().n_rows()
    }

    /// Total active codes.
    pub fn nnz(&self) -> usize {
        self.indices.len()
    }

    /// Row `b`'s active latents and values.
    pub fn row(&self, b: usize) -> (&[u32], &[f32]) {
        self.view().row(b)
    }

    /// Mean number of active codes per row (L0).
    pub fn mean_l0(&self) -> f32 {
        self.view().mean_l0()
    }

    /// The dense B×F matrix (zeros where inactive).
    pub fn to_dense(&self) -> Array2<f32> {
        self.view().to_dense()
    }
}

/// Sparse codes borrowed in CSR form, the layout of scipy's `csr_array` (`indptr`, `indices`,
/// `data`): row `b`'s active latents are `indices[indptr[b]..indptr[b + 1]]`, with their
/// values at the same positions of `values`. A view of a [`Codes`] ([`Codes::view`], or
/// [`crate::Sae::encode_into`]'s result) or of three slices another tool made, checked once
/// by [`SparseCodes::new`]; either way nothing is copied, and [`crate::Sae::decode`] takes it.
///
/// Codes this crate makes list each row's latents in ascending order, each once; checked
/// slices need not ([`SparseCodes::is_canonical`]): a latent listed twice in a row counts
/// twice, as in scipy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SparseCodes<'a> {
    n_latents: usize,
    indptr: &'a [usize],
    indices: &'a [u32],
    values: &'a [f32],
}

impl<'a> From<&'a Codes> for SparseCodes<'a> {
    /// The view of `codes` (not checked again: a [`Codes`] this crate made is valid).
    fn from(codes: &'a Codes) -> Self {
        SparseCodes {
            n_latents: codes.n_latents,
            indptr: &codes.indptr,
            indices: &codes.indices,
            values: &codes.values,
        }
    }
}

impl<'a> SparseCodes<'a> {
    /// Appends every row as exactly `k` codes to `indices` and `values` (row-major N×k): a
    /// row's own codes, then zeros at the lowest latents it does not use, as `sae encode`
    /// writes a TopK SAE's `indices.npy`/`values.npy`. A row holding more than `k` codes is
    /// [`Error::Shape`], named as row `first_row + b` (the rows' place in a longer stream).
    /// Rows are taken to be ascending, as [`crate::Sae::encode`] gives them.
    pub fn pad_into(
        &self,
        k: usize,
        first_row: u64,
        indices: &mut Vec<u32>,
        values: &mut Vec<f32>,
    ) -> Result<()> {
        for b in 0..self.n_rows() {
            let (idx, val) = self.row(b);
            if idx.len() > k {
                return Err(Error::Shape {
                    what: format!("row {} of the codes", first_row + b as u64),
                    expected: vec![k],
                    got: vec![idx.len()],
                });
            }
            let start = indices.len();
            indices.extend_from_slice(idx);
            values.extend_from_slice(val);
            pad_row(indices, values, start, k, self.n_latents);
        }
        Ok(())
    }

    /// The codes as N×k latent indices and values (see [`SparseCodes::pad_into`]).
    pub fn to_padded(&self, k: usize) -> Result<(Array2<u32>, Array2<f32>)> {
        let n = self.n_rows();
        let (mut indices, mut values) = (Vec::with_capacity(n * k), Vec::with_capacity(n * k));
        self.pad_into(k, 0, &mut indices, &mut values)?;
        let indices_nk = Array2::from_shape_vec((n, k), indices).expect("n·k indices");
        let values_nk = Array2::from_shape_vec((n, k), values).expect("n·k values");
        Ok((indices_nk, values_nk))
    }

    /// Codes of `n_latents` latents from CSR slices, checked without copying: `indptr` holds
    /// rows + 1 offsets, starts at 0, never decreases and ends at `indices.len()`;
    /// `values` is as long as `indices`; every index is below `n_latents` and every value
    /// finite. Fails with [`Error::Shape`] for the lengths, [`Error::OutOfRange`] naming the
    /// first offending offset or index, and [`Error::NonFinite`] naming the row of a NaN or
    /// infinite value.
    ///
    /// scipy's `int64` `indptr` and `int32` `indices` have the memory of `usize` (on 64-bit
    /// targets) and `u32`: a negative entry reads as a huge one and is refused here.
    ///
    /// ```
    /// use sparse_autoencoder::SparseCodes;
    ///
    /// // Two rows over 8 latents: row 0 has latents 1 and 5, row 1 none.
    /// let codes = SparseCodes::new(8, &[0, 2, 2], &[1, 5], &[0.5, 2.0])?;
    /// assert_eq!((codes.n_rows(), codes.nnz()), (2, 2));
    /// assert_eq!(codes.row(0), (&[1u32, 5][..], &[0.5f32, 2.0][..]));
    /// assert!(SparseCodes::new(8, &[0, 2, 2], &[1, 9], &[0.5, 2.0]).is_err());
    /// # Ok::<(), sparse_autoencoder::Error>(())
    /// ```
    pub fn new(
        n_latents: usize,
        indptr: &'a [usize],
        indices: &'a [u32],
        values: &'a [f32],
    ) -> Result<Self> {
        let nnz = indices.len();
        let Some((&last, _)) = indptr.split_last() else {
            return Err(Error::Shape {
                what: "indptr (rows + 1 offsets; [0] for no rows)".into(),
                expected: vec![1],
                got: vec![0],
            });
        };
        check_shape("values (one per entry of indices)", &[values.len()], &[nnz])?;
        if indptr[0] != 0 {
            return Err(Error::OutOfRange {
                what: "indptr[0], the start of row 0,".into(),
                value: indptr[0] as f64,
                range: "[0, 0]".into(),
            });
        }
        for (b, w) in indptr.windows(2).enumerate() {
            if w[1] < w[0] || w[1] > nnz {
                return Err(Error::OutOfRange {
                    what: format!("indptr[{}], the end of row {b},", b + 1),
                    value: w[1] as f64,
                    range: format!("[{}, {nnz}] (its start, and the length of indices)", w[0]),
                });
            }
        }
        if last != nnz {
            return Err(Error::OutOfRange {
                what: format!("indptr[{}], the end of the last row,", indptr.len() - 1),
                value: last as f64,
                range: format!("[{nnz}, {nnz}] (the length of indices and values)"),
            });
        }
        for (b, w) in indptr.windows(2).enumerate() {
            if let Some(i) = (w[0]..w[1]).find(|&i| indices[i] as usize >= n_latents) {
                return Err(Error::OutOfRange {
                    what: format!("indices[{i}], a latent of row {b},"),
                    value: indices[i] as f64,
                    range: format!("[0, {n_latents}) (the latents)"),
                });
            }
            if values[w[0]..w[1]].iter().any(|v| !v.is_finite()) {
                return Err(Error::NonFinite {
                    what: "code values".into(),
                    row: b,
                });
            }
        }
        Ok(SparseCodes {
            n_latents,
            indptr,
            indices,
            values,
        })
    }

    /// F, the number of latents.
    pub fn n_latents(&self) -> usize {
        self.n_latents
    }

    /// Row offsets into [`SparseCodes::indices`] and [`SparseCodes::values`]; rows + 1 long.
    pub fn indptr(&self) -> &'a [usize] {
        self.indptr
    }

    /// Latent index of each active code.
    pub fn indices(&self) -> &'a [u32] {
        self.indices
    }

    /// Value of each active code.
    pub fn values(&self) -> &'a [f32] {
        self.values
    }

    /// Number of rows.
    pub fn n_rows(&self) -> usize {
        self.indptr.len().saturating_sub(1)
    }

    /// Total active codes.
    pub fn nnz(&self) -> usize {
        self.indices.len()
    }

    /// Row `b`'s active latents and values.
    pub fn row(&self, b: usize) -> (&'a [u32], &'a [f32]) {
        let r = self.indptr[b]..self.indptr[b + 1];
        (&self.indices[r.clone()], &self.values[r])
    }

    /// Mean number of active codes per row (L0).
    pub fn mean_l0(&self) -> f32 {
        self.nnz() as f32 / self.n_rows().max(1) as f32
    }

    /// Whether every row lists its latents in strictly ascending order (each once), as codes
    /// this crate makes do.
    pub fn is_canonical(&self) -> bool {
        (0..self.n_rows()).all(|b| self.row(b).0.windows(2).all(|w| w[0] < w[1]))
    }

    /// The dense B×F matrix (zeros where inactive; a latent listed twice in a row gets the
    /// sum).
    pub fn to_dense(&self) -> Array2<f32> {
        let mut dense = Array2::zeros((self.n_rows(), self.n_latents));
        for b in 0..self.n_rows() {
            let (idx, val) = self.row(b);
            for (&j, &v) in idx.iter().zip(val) {
                dense[[b, j as usize]] += v;
            }
        }
        dense
    }

    /// An owned copy.
    pub fn to_codes(&self) -> Codes {
        Codes {
            n_latents: self.n_latents,
            indptr: self.indptr.to_vec(),
            indices: self.indices.to_vec(),
            values: self.values.to_vec(),
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
    /// Batch top-k: entries of this chunk equal to the cut, then how many of them to keep.
    ties: usize,
}

/// The selection workspace: reusable buffers for building [`Codes`] in parallel.
#[derive(Default)]
pub struct Selector {
    chunks: Vec<ChunkBuf>,
    /// Batch top-k: the strided sample's bit patterns, and the radix histogram.
    sample: Vec<u32>,
    hist: Vec<u64>,
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

/// Fills `scratch` with keys of the entries of `row` that can be among its `k` largest
/// positive ones: those at or above a bound taken from a strided sample of the row, or every
/// positive entry when fewer than `k` pass the bound. Exact: if k entries are ≥ t, the k-th
/// largest is ≥ t.
fn row_candidates(row: &[f32], bias: &[f32], k: usize, scratch: &mut Vec<u64>) {
    const STRIDE: usize = 16;
    scratch.clear();
    let rank = 2 * k / STRIDE + 4;
    if k > 0 && row.len() >= 4 * STRIDE * rank {
        // Non-positive entries sample as 0.
        scratch.extend(
            row.iter()
                .zip(bias)
                .step_by(STRIDE)
                .map(|(v, b)| (v + b).max(0.0).to_bits() as u64),
        );
        let bound = *scratch.select_nth_unstable_by(rank, |a, b| b.cmp(a)).1 as u32;
        let bound = f32::from_bits(bound);
        scratch.clear();
        if bound > 0.0 {
            scan_at_least(row, bias, bound.to_bits(), |j, v| scratch.push(key(v, j)));
            if scratch.len() >= k {
                return;
            }
            scratch.clear();
        }
    }
    scan_at_least(row, bias, 1, |j, v| scratch.push(key(v, j)));
}

/// Calls `emit(j, v)`, in order, for each positive `v = row[j] + bias[j]` whose bit pattern
/// is at least `lower_bits` (≥ 1; negative values and zeros never qualify). Blocks of 16 are
/// tested with one vectorisable comparison first, since selections keep a small fraction.
#[inline]
fn scan_at_least(row: &[f32], bias: &[f32], lower_bits: u32, mut emit: impl FnMut(usize, f32)) {
    debug_assert!(lower_bits >= 1);
    // lower_bits <= bits < sign bit, in one unsigned comparison.
    let span = 0x8000_0000u32.wrapping_sub(lower_bits);
    let pass = |v: f32| v.to_bits().wrapping_sub(lower_bits) < span;
    const BLOCK: usize = 16;
    let bias = &bias[..row.len()];
    let mut blocks = row.chunks_exact(BLOCK).zip(bias.chunks_exact(BLOCK));
    for (c, (block, bias)) in blocks.by_ref().enumerate() {
        if block
            .iter()
            .zip(bias)
            .fold(false, |any, (v, b)| any | pass(v + b))
        {
            for (i, (v, b)) in block.iter().zip(bias).enumerate() {
                if pass(v + b) {
                    emit(c * BLOCK + i, v + b);
                }
            }
        }
    }
    let base = row.len() - row.len() % BLOCK;
    for (i, (v, b)) in row[base..].iter().zip(&bias[base..]).enumerate() {
        if pass(v + b) {
            emit(base + i, v + b);
        }
    }
}

/// JumpReLU's rule: above the latent's threshold, and positive (the ReLU of inference).
#[inline]
fn jump_keeps(v: f32, theta: f32) -> bool {
    v > theta && v > 0.0
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
    pub fn relu(&mut self, pre: PreActs<'_>, out: &mut Codes) {
        self.threshold(pre, 0.0, out)
    }

    /// Entries with `post > theta` (BatchTopK's inference rule; `theta = 0` is plain ReLU).
    pub fn threshold(&mut self, pre: PreActs<'_>, theta: f32, out: &mut Codes) {
        // v > θ ⇔ bits(v) ≥ bits(θ) + 1 for non-negative θ.
        let lower_bits = theta.max(0.0).to_bits() + 1;
        self.build(pre.n_rows(), pre.n_latents(), out, |b, buf| {
            scan_at_least(pre.row(b), pre.bias_f, lower_bits, |j, v| {
                buf.indices.push(j as u32);
                buf.values.push(v);
            })
        });
    }

    /// Entries above their latent's threshold, `post_j > threshold_f[j]` (JumpReLU; ReLU implied,
    /// so a negative θ_j keeps only positive entries).
    pub fn jump(&mut self, pre: PreActs<'_>, threshold_f: &[f32], out: &mut Codes) {
        self.per_latent_rule(pre, threshold_f, out, jump_keeps);
    }

    /// The entries within the rectangle kernel of width `bandwidth` around their latent's
    /// threshold, |pre − θ_j|/ε < ½, that [`Selector::jump`] does not select (those at or just
    /// below θ_j), with their pre-activations. The thresholds' pseudo-gradient lives here and
    /// on the selected entries within ½ε above θ_j.
    pub fn below_threshold(
        &mut self,
        pre: PreActs<'_>,
        threshold_f: &[f32],
        bandwidth: f32,
        out: &mut Codes,
    ) {
        self.per_latent_rule(pre, threshold_f, out, |v, t| {
            // The comparisons torch's RectangleFunction makes, in the same f32 arithmetic.
            let x = (v - t) / bandwidth;
            x > -0.5 && x < 0.5 && !jump_keeps(v, t)
        });
    }

    /// The entries `v` of each row for which `keep(v, θ_j)`, with θ_j from `threshold_f`.
    fn per_latent_rule(
        &mut self,
        pre: PreActs<'_>,
        threshold_f: &[f32],
        out: &mut Codes,
        keep: impl Fn(f32, f32) -> bool + Sync,
    ) {
        let threshold_f = &threshold_f[..pre.n_latents()];
        self.build(pre.n_rows(), pre.n_latents(), out, |b, buf| {
            let row = pre.row(b).iter().zip(pre.bias_f).zip(threshold_f);
            for (j, ((&g, &bias), &t)) in row.enumerate() {
                let v = g + bias;
                if keep(v, t) {
                    buf.indices.push(j as u32);
                    buf.values.push(v);
                }
            }
        });
    }

    /// The `k` largest positive entries of each row (TopK). Rows with fewer than `k` positive
    /// entries keep all of them: a zero code is no code.
    pub fn topk(&mut self, pre: PreActs<'_>, k: usize, out: &mut Codes) {
        self.build(pre.n_rows(), pre.n_latents(), out, |b, buf| {
            let ChunkBuf {
                indices,
                values,
                scratch,
                ..
            } = buf;
            row_candidates(pre.row(b), pre.bias_f, k, scratch);
            push_top_k(scratch, k, indices, values);
        });
    }

    /// [`Selector::topk`] over latents split across the ranks of `latent`, which hold the same
    /// rows: this rank's pre-activations are those of latents `offset..offset +
    /// pre.n_latents()`, and `out` gets its own entries of each whole row's `k` largest, at
    /// local indices, exactly those one process holding the row would choose (ties to the
    /// lower global index). A shard's part of a row's top k is among its own top k, so the
    /// ranks exchange B·k candidates each, not their pre-activations.
    pub fn topk_sharded(
        &mut self,
        pre: PreActs<'_>,
        k: usize,
        offset: usize,
        latent: &dyn Collective,
        out: &mut Codes,
    ) {
        self.topk(pre, k, out);
        self.merge_shards(k, offset, latent, out);
    }

    /// [`Selector::topk_among`] over latents split across the ranks of `latent`, as
    /// [`Selector::topk_sharded`]: `latents` are this rank's (local, ascending), and `out` gets
    /// its own entries of each row's `k` largest among every rank's.
    pub fn topk_among_sharded(
        &mut self,
        pre: PreActs<'_>,
        latents: &[u32],
        k: usize,
        offset: usize,
        latent: &dyn Collective,
        out: &mut Codes,
    ) {
        self.topk_among(pre, latents, k, out);
        self.merge_shards(k, offset, latent, out);
    }

    /// `out`, each shard's local top `k` of each row (latents `offset..offset +
    /// out.n_latents`), replaced by this shard's part of the row's top `k` over every shard of
    /// `latent`.
    fn merge_shards(&mut self, k: usize, offset: usize, latent: &dyn Collective, out: &mut Codes) {
        if latent.world_size() == 1 {
            return;
        }
        // k keys a row; 0, below every positive value's key, pads rows with fewer.
        let (n_rows, n_latents) = (out.n_rows(), out.n_latents);
        let mut mine = vec![0u64; n_rows * k];
        for b in 0..n_rows {
            let (idx, val) = out.row(b);
            for (i, (&j, &v)) in idx.iter().zip(val).enumerate() {
                mine[b * k + i] = key(v, offset + j as usize);
            }
        }
        let all = crate::dist::all_gather_u64(latent, &mine);
        let own = offset as u32..(offset + n_latents) as u32;
        self.build(n_rows, n_latents, out, |b, buf| {
            let ChunkBuf {
                indices,
                values,
                scratch,
                ..
            } = buf;
            scratch.clear();
            for q in &all {
                scratch.extend(q[b * k..(b + 1) * k].iter().filter(|&&c| c >> 32 != 0));
            }
            let start = indices.len();
            push_top_k(scratch, k, indices, values);
            // The row's top k over every shard, ascending; this shard's part, made local.
            let mut w = start;
            for i in start..indices.len() {
                if own.contains(&indices[i]) {
                    indices[w] = indices[i] - own.start;
                    values[w] = values[i];
                    w += 1;
                }
            }
            indices.truncate(w);
            values.truncate(w);
        });
    }

    /// The `k` largest positive entries of each row among `latents` only (AuxK's selection among
    /// dead latents). `latents` must be ascending.
    pub fn topk_among(&mut self, pre: PreActs<'_>, latents: &[u32], k: usize, out: &mut Codes) {
        self.build(pre.n_rows(), pre.n_latents(), out, |b, buf| {
            let ChunkBuf {
                indices,
                values,
                scratch,
                ..
            } = buf;
            scratch.clear();
            for &j in latents {
                let v = pre.get(b, j as usize);
                if v > 0.0 {
                    scratch.push(key(v, j as usize));
                }
            }
            push_top_k(scratch, k, indices, values);
        });
    }

    /// The `k_total` largest positive entries of the whole batch (BatchTopK), counted over every
    /// process of `collective`.
    ///
    /// Nothing sorts or histograms all B·F values: a strided sample gives a lower bound on the
    /// cut, one pass keeps the entries above it (typically ~1.3·k_total), and radix selection on
    /// those candidates' bit patterns (non-negative f32 order like their bits) finds the exact
    /// cut. The candidate histograms are what processes exchange. If the bound was too high on
    /// any process, every process redoes the pass with no bound. Entries equal to the cut are
    /// taken in the global batch's row-major order until `k_total` are kept.
    pub fn batch_topk(
        &mut self,
        pre: PreActs<'_>,
        k_total: usize,
        collective: &dyn Collective,
        out: &mut Codes,
    ) {
        self.batch_topk_in(pre, k_total, collective, 1, out)
    }

    /// [`Selector::batch_topk`] over a [`crate::dist::Grid`] of `shards` latent shards: `world`'s
    /// rank g·S + s holds group g's rows and the pre-activations of shard s's latents, and the
    /// `k_total` largest entries of the whole global batch are chosen as one process holding
    /// all of it would (ties in the global batch's row-major order, latents in shard order).
    /// `out` gets this rank's entries, at its local latent indices.
    pub fn batch_topk_sharded(
        &mut self,
        pre: PreActs<'_>,
        k_total: usize,
        world: &dyn Collective,
        shards: usize,
        out: &mut Codes,
    ) {
        self.batch_topk_in(pre, k_total, world, shards, out)
    }

    fn batch_topk_in(
        &mut self,
        pre: PreActs<'_>,
        k_total: usize,
        collective: &dyn Collective,
        shards: usize,
        out: &mut Codes,
    ) {
        let (n_rows, n_latents) = (pre.n_rows(), pre.n_latents());
        let mut n_total = [(n_rows * n_latents) as u64];
        collective.all_reduce_sum_u64(&mut n_total);
        let bound = self.sampled_lower_bound(pre, k_total, n_total[0]);
        for lower_bits in [bound, 1] {
            self.build(n_rows, n_latents, out, |b, buf| {
                scan_at_least(pre.row(b), pre.bias_f, lower_bits, |j, v| {
                    buf.indices.push(j as u32);
                    buf.values.push(v);
                })
            });
            let cut = self.exact_cut(&out.values, k_total, collective);
            // The bound failed if the cut lies below it (or fewer than k_total passed it).
            let failed = match cut {
                Some((cut_bits, _)) => cut_bits < lower_bits,
                None => lower_bits > 1,
            };
            let mut failures = [failed as u64];
            collective.all_reduce_sum_u64(&mut failures);
            if failures[0] > 0 && lower_bits > 1 {
                continue;
            }
            if let Some((cut_bits, tie_quota)) = cut {
                let tie_quota = tie_quota_here(out, cut_bits, tie_quota, collective, shards);
                self.keep_above_cut(n_rows, n_latents, cut_bits, tie_quota, out);
            }
            return;
        }
    }

    /// The bit pattern of a value likely below the `k_total`-th largest: the
    /// (1.25·expected + 32)-th largest of every 257th entry; 1 (no bound) if the sample is short.
    fn sampled_lower_bound(&mut self, pre: PreActs<'_>, k_total: usize, n_total: u64) -> u32 {
        const STRIDE: usize = 257;
        let f = pre.n_latents();
        let n = pre.n_rows() * f;
        let flat = pre.gemm_bf.to_slice().expect("standard layout");
        let sample = &mut self.sample;
        sample.clear();
        sample.extend(
            (0..n)
                .step_by(STRIDE)
                .map(|i| (flat[i] + pre.bias_f[i % f]).to_bits())
                .filter(|&bits| bits > 0 && bits < 0x8000_0000),
        );
        let expected = k_total as f64 * n.div_ceil(STRIDE) as f64 / n_total as f64;
        let rank = (1.25 * expected + 32.0) as usize;
        if rank >= sample.len() {
            return 1;
        }
        *sample.select_nth_unstable_by(rank, |a, b| b.cmp(a)).1
    }

    /// The exact cut among the candidate `values` of all processes: `(cut_bits, tie_quota)`
    /// such that the values above `cut_bits` plus `tie_quota` values equal to it make
    /// `k_total`. `None` if there are fewer than `k_total` candidates in all.
    fn exact_cut(
        &mut self,
        values: &[f32],
        k_total: usize,
        collective: &dyn Collective,
    ) -> Option<(u32, usize)> {
        let hist = &mut self.hist;
        hist.clear();
        hist.resize(1 << 16, 0);
        for v in values {
            hist[(v.to_bits() >> 16) as usize] += 1;
        }
        collective.all_reduce_sum_u64(hist);
        let (high, above) = find_rank(hist, k_total as u64)?;
        hist.fill(0);
        for v in values {
            if v.to_bits() >> 16 == high {
                hist[(v.to_bits() & 0xFFFF) as usize] += 1;
            }
        }
        collective.all_reduce_sum_u64(hist);
        let (low, above_in_bin) =
            find_rank(hist, k_total as u64 - above).expect("the boundary bin holds the rest");
        Some((
            (high << 16) | low,
            k_total - (above + above_in_bin) as usize,
        ))
    }

    /// Filters the chunk buffers of the last [`Selector::build`] down to the values above
    /// `cut_bits` and the first `tie_quota` values equal to it (row-major), then regathers `out`.
    fn keep_above_cut(
        &mut self,
        n_rows: usize,
        n_latents: usize,
        cut_bits: u32,
        mut tie_quota: usize,
        out: &mut Codes,
    ) {
        let n_chunks = n_rows.div_ceil(ROWS_PER_CHUNK);
        self.chunks[..n_chunks].par_iter_mut().for_each(|buf| {
            buf.ties = buf
                .values
                .iter()
                .filter(|v| v.to_bits() == cut_bits)
                .count()
        });
        for buf in &mut self.chunks[..n_chunks] {
            let q = buf.ties.min(tie_quota);
            tie_quota -= q;
            buf.ties = q;
        }
        self.chunks[..n_chunks].par_iter_mut().for_each(|buf| {
            let ChunkBuf {
                row_len,
                indices,
                values,
                ties: quota,
                ..
            } = buf;
            let (mut w, mut r) = (0, 0);
            for len in row_len.iter_mut() {
                let mut kept_in_row = 0;
                for i in r..r + *len {
                    let bits = values[i].to_bits();
                    let keep = bits > cut_bits || (bits == cut_bits && *quota > 0);
                    if keep {
                        if bits == cut_bits {
                            *quota -= 1;
                        }
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

/// This process's share of the `tie_quota` entries equal to the cut that the global selection
/// keeps, ties taken in the global batch's row-major order as one process holding all of it
/// would. `collective`'s ranks form groups of `shards` consecutive ranks (see
/// [`crate::dist::Grid`]): the groups' rows follow each other in rank order, and within a row
/// the shards' latents follow each other in shard order. A process's own ties are a prefix of
/// that order restricted to its entries, so a count is all it needs; the counts come from the
/// processes' per-row tie counts (per-process totals suffice without latent shards), gathered
/// only when some tie is left out.
fn tie_quota_here(
    candidates: &Codes,
    cut_bits: u32,
    tie_quota: usize,
    collective: &dyn Collective,
    shards: usize,
) -> usize {
    let world = collective.world_size();
    let is_tie = |v: &f32| v.to_bits() == cut_bits;
    let mine = candidates.values.iter().filter(|v| is_tie(v)).count();
    if world == 1 {
        return tie_quota;
    }
    let rank = collective.rank();
    let mut ties = vec![0u64; world];
    ties[rank] = mine as u64;
    collective.all_reduce_sum_u64(&mut ties);
    if ties.iter().sum::<u64>() <= tie_quota as u64 {
        return mine;
    }
    if shards == 1 {
        let before: u64 = ties[..rank].iter().sum();
        return (tie_quota as u64).saturating_sub(before).min(ties[rank]) as usize;
    }
    let per_row: Vec<u64> = (0..candidates.n_rows())
        .map(|b| candidates.row(b).1.iter().filter(|v| is_tie(v)).count() as u64)
        .collect();
    let rows_of = crate::dist::all_gather_u64(collective, &per_row);
    let mut left = tie_quota as u64;
    let mut kept_here = 0;
    for (g, group) in rows_of.chunks(shards).enumerate() {
        for b in 0..group[0].len() {
            for (s, rows) in group.iter().enumerate() {
                let take = left.min(rows[b]);
                left -= take;
                if g * shards + s == rank {
                    kept_here += take;
                }
            }
        }
    }
    kept_here as usize
}

/// Scanning `hist` from its top bin down: the non-empty bin where the running count reaches
/// `rank`, and the count strictly above it. `None` if the total is below `rank`.
fn find_rank(hist: &[u64], rank: u64) -> Option<(u32, u64)> {
    let mut above = 0u64;
    for h in (0..hist.len()).rev() {
        if hist[h] > 0 && above + hist[h] >= rank {
            return Some((h as u32, above));
        }
        above += hist[h];
    }
    None
}

/// Applies a training-time [`Selection`] rule to the pre-activations (ReLU implied), with
/// JumpReLU's thresholds `threshold_f` (empty for the other architectures).
pub(crate) fn select_into(
    selector: &mut Selector,
    selection: Selection,
    pre: PreActs<'_>,
    threshold_f: &[f32],
    collective: &dyn Collective,
    codes: &mut Codes,
) {
    match selection {
        Selection::Relu => selector.relu(pre, codes),
        Selection::JumpRelu => selector.jump(pre, threshold_f, codes),
        Selection::TopK(k) => selector.topk(pre, k, codes),
        Selection::BatchTopK(k) => {
            let mut rows = [pre.n_rows() as u64];
            collective.all_reduce_sum_u64(&mut rows);
            selector.batch_topk(pre, k * rows[0] as usize, collective, codes)
        }
    }
}

/// Pads the row at `idx[start..]` to exactly `k` codes with zeros at the lowest latents the
/// row does not use (its own latents are ascending).
fn pad_row(idx: &mut Vec<u32>, val: &mut Vec<f32>, start: usize, k: usize, n_latents: usize) {
    let mut own = start;
    let end = idx.len();
    let mut candidate = 0u32;
    while idx.len() - start < k && (candidate as usize) < n_latents {
        // Skip past the row's own latents below the candidate.
        while own < end && idx[own] < candidate {
            own += 1;
        }
        if own == end || idx[own] != candidate {
            idx.push(candidate);
            val.push(0.0);
        }
        candidate += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::dist::SingleProcess;
    use ndarray::array;
    use rand::{Rng, SeedableRng};

    #[test]
    fn padding_fills_the_lowest_latents_the_row_does_not_use() {
        let (mut idx, mut val) = (vec![7, 0, 2, 9], vec![5.0, 1.0, 2.0, 3.0]);
        // The row under test starts at 1: latents 0, 2 and 9.
        pad_row(&mut idx, &mut val, 1, 5, 12);
        assert_eq!(idx, [7, 0, 2, 9, 1, 3]);
        assert_eq!(val, [5.0, 1.0, 2.0, 3.0, 0.0, 0.0]);
        let (mut idx, mut val) = (vec![], vec![]);
        pad_row(&mut idx, &mut val, 0, 3, 3);
        assert_eq!((idx, val), (vec![0, 1, 2], vec![0.0; 3]));
        let (mut idx, mut val) = (vec![3, 7], vec![1.0, 2.0]);
        pad_row(&mut idx, &mut val, 0, 2, 8);
        assert_eq!((idx, val), (vec![3, 7], vec![1.0, 2.0]));
    }

    /// `a` as pre-activations with a zero bias.
    fn unbiased(a: &Array2<f32>) -> PreActs<'_> {
        let zeros: &'static [f32] = vec![0.0; a.ncols()].leak();
        PreActs::new(a.view(), zeros).unwrap()
    }

    /// The bias is added before selecting: selecting from (gemm, bias) equals selecting from
    /// the dense sum with no bias.
    #[test]
    fn bias_is_added_before_selection() {
        let gemm = random_post(48, 1500, 9).mapv(|v| v - 0.3);
        let bias: Vec<f32> = (0..1500)
            .map(|j| ((j * 37 % 101) as f32 / 101.0) - 0.5)
            .collect();
        let pre = PreActs::new(gemm.view(), &bias).unwrap();
        let dense = pre.to_dense();
        let (mut a, mut b) = (Codes::empty(0), Codes::empty(0));
        let mut sel = Selector::default();
        sel.batch_topk(pre, 300, &SingleProcess, &mut a);
        sel.batch_topk(unbiased(&dense), 300, &SingleProcess, &mut b);
        assert_eq!(a, b);
        assert_eq!(a.to_dense(), brute_batch_topk(&dense, 300));
        sel.topk(pre, 7, &mut a);
        assert_eq!(a.to_dense(), brute_topk(&dense, 7));
        sel.threshold(pre, 0.2, &mut a);
        assert_eq!(a.to_dense(), dense.mapv(|v| if v > 0.2 { v } else { 0.0 }));
        sel.topk_among(pre, &[3, 50, 700], 2, &mut a);
        sel.topk_among(unbiased(&dense), &[3, 50, 700], 2, &mut b);
        assert_eq!(a, b);
        let positive = dense.iter().filter(|&&v| v > 0.0).count() as f32 / dense.len() as f32;
        assert_eq!(pre.positive_fraction(), positive);
        assert!(PreActs::new(gemm.view(), &bias[1..]).is_err());
        assert!(PreActs::new(gemm.t(), &bias).is_err());
    }

    /// `post` split over a grid of `groups` × `shards` threads (rank g·S + s holds group g's
    /// rows and shard s's latents, as `dist::Grid` arranges them), each selecting with
    /// `select(selector, its block, grid, world, first latent, codes)`; the codes placed back in
    /// one B×F matrix.
    fn on_grid<F>(post: &Array2<f32>, groups: usize, shards: usize, select: F) -> Array2<f32>
    where
        F: Fn(&mut Selector, PreActs<'_>, &crate::dist::Grid, &dyn Collective, usize, &mut Codes)
            + Sync,
    {
        use crate::dist::{part, Grid, Threads};
        let (b, f) = post.dim();
        let mut out = Array2::zeros((b, f));
        let blocks: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = Threads::world(groups * shards)
                .into_iter()
                .map(|world| {
                    let select = &select;
                    scope.spawn(move || {
                        let grid = Grid::new(std::sync::Arc::new(world), shards).unwrap();
                        let rows = part(b, grid.group(), groups);
                        let cols = part(f, grid.shard, shards);
                        let block = post
                            .slice(ndarray::s![rows.clone(), cols.clone()])
                            .to_owned();
                        let pre = unbiased(&block);
                        let mut codes = Codes::empty(0);
                        select(
                            &mut Selector::default(),
                            pre,
                            &grid,
                            &*grid.world,
                            cols.start,
                            &mut codes,
                        );
                        assert_eq!(codes.n_latents, cols.len());
                        (rows, cols, codes.to_dense())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (rows, cols, dense) in blocks {
            out.slice_mut(ndarray::s![rows, cols]).assign(&dense);
        }
        out
    }

    /// Latents sharded over threads select what one process selects from the whole batch,
    /// ties included: values on a coarse grid tie within rows, across shards and across groups.
    #[test]
    fn sharded_selection_is_the_single_process_selection() {
        let post = random_post(24, 90, 4).mapv(|v| (v * 8.0).round() / 8.0);
        let mut single = Codes::empty(0);
        let mut sel = Selector::default();
        for (groups, shards) in [(1, 2), (1, 3), (2, 2), (3, 2), (2, 1)] {
            for k in [1, 5, 30] {
                sel.topk(unbiased(&post), k, &mut single);
                let sharded = on_grid(&post, groups, shards, |sel, pre, grid, _, offset, out| {
                    sel.topk_sharded(pre, k, offset, &*grid.latent, out)
                });
                assert_eq!(sharded, single.to_dense(), "topk {k}, {groups}×{shards}");
            }
            for k_total in [1, 7, 100, 24 * 20, 24 * 90] {
                sel.batch_topk(unbiased(&post), k_total, &SingleProcess, &mut single);
                let sharded = on_grid(&post, groups, shards, |sel, pre, grid, world, _, out| {
                    sel.batch_topk_sharded(pre, k_total, world, grid.shards, out)
                });
                let what = format!("batch top {k_total}, {groups}×{shards}");
                assert_eq!(sharded, single.to_dense(), "{what}");
            }
        }
        // The coarse grid does tie: the test exercises the tie rule.
        let top = post.iter().cloned().fold(0.0, f32::max);
        assert!(post.iter().filter(|&&v| v == top).count() > 2);
    }

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
            Selector::default().batch_topk(unbiased(&post), n, &SingleProcess, &mut codes);
            assert_eq!(codes.to_dense(), brute_batch_topk(&post, n), "n = {n}");
        }
    }

    /// Brute-force per-row top-k.
    fn brute_topk(post: &Array2<f32>, k: usize) -> Array2<f32> {
        let mut out = Array2::zeros(post.dim());
        for (b, row) in post.rows().into_iter().enumerate() {
            let mut r: Vec<(f32, usize)> = row
                .iter()
                .enumerate()
                .filter(|(_, &v)| v > 0.0)
                .map(|(j, &v)| (v, j))
                .collect();
            r.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            for &(v, j) in r.iter().take(k) {
                out[[b, j]] = v;
            }
        }
        out
    }

    /// Large matrices take the sampled-bound paths; the adversarial one puts the largest values
    /// exactly on the sampled positions so the bound is too high and the fallback must run.
    #[test]
    fn sampled_bounds_are_exact_even_when_they_fail() {
        let random = random_post(64, 2048, 3);
        let mut adversarial = random.mapv(|v| v * 0.01);
        adversarial
            .as_slice_mut()
            .unwrap()
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| i % 257 == 0 || i % 16 == 0)
            .for_each(|(_, v)| *v += 5.0);
        // Pre-activations: negative entries must never be selected.
        let signed = random.mapv(|v| v - 0.3);
        for post in [&random, &adversarial, &signed] {
            let mut codes = Codes::empty(0);
            let mut sel = Selector::default();
            for n in [1, 64, 1000, 64 * 32, 20_000] {
                sel.batch_topk(unbiased(post), n, &SingleProcess, &mut codes);
                assert_eq!(codes.to_dense(), brute_batch_topk(post, n), "n = {n}");
                assert!(codes.values.iter().all(|&v| v > 0.0));
            }
            for k in [1, 8, 64, 300] {
                sel.topk(unbiased(post), k, &mut codes);
                assert_eq!(codes.to_dense(), brute_topk(post, k), "k = {k}");
            }
        }
    }

    #[test]
    fn batch_topk_breaks_ties_by_position() {
        // Many equal values: the cut falls inside a run of ties.
        let post =
            Array2::from_shape_fn((20, 9), |(b, j)| if (b + j) % 3 == 0 { 0.5 } else { 0.25 });
        for n in [5, 60, 61, 100, 180] {
            let mut codes = Codes::empty(0);
            Selector::default().batch_topk(unbiased(&post), n, &SingleProcess, &mut codes);
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
        Selector::default().topk(unbiased(&post), 2, &mut codes);
        assert_eq!(
            codes.to_dense(),
            array![
                [0.0f32, 0.9, 0.0, 0.5],
                [0.0, 0.0, 0.0, 0.3],
                [0.2, 0.2, 0.0, 0.0]
            ]
        );
        // k >= F keeps every positive entry.
        Selector::default().topk(unbiased(&post), 10, &mut codes);
        assert_eq!(codes.to_dense(), post);
    }

    #[test]
    fn topk_among_only_looks_at_listed_latents() {
        let post = array![[0.1f32, 0.9, 0.4, 0.5], [0.7, 0.0, 0.0, 0.3]];
        let mut codes = Codes::empty(0);
        Selector::default().topk_among(unbiased(&post), &[0, 2, 3], 1, &mut codes);
        assert_eq!(
            codes.to_dense(),
            array![[0.0f32, 0.0, 0.0, 0.5], [0.7, 0.0, 0.0, 0.0]]
        );
    }

    #[test]
    fn jump_keeps_entries_above_each_latents_threshold_and_lists_those_just_below() {
        let pre = array![[0.5f32, 0.2, -0.1, 0.31], [0.0, 0.25, 0.3, 0.29]];
        let theta = [0.4f32, 0.2, -0.5, 0.3];
        let mut sel = Selector::default();
        let mut codes = Codes::default();
        sel.jump(unbiased(&pre), &theta, &mut codes);
        // 0.2 is not above 0.2; -0.1 is above its θ but not positive.
        assert_eq!(
            codes.to_dense(),
            array![[0.5f32, 0.0, 0.0, 0.31], [0.0, 0.25, 0.3, 0.0]]
        );
        let mut near = Codes::default();
        sel.below_threshold(unbiased(&pre), &theta, 0.1, &mut near);
        // Unselected and within ½ε = 0.05 of θ_j: (0, 1) at θ and (1, 3) 0.01 below. (0, 2) is
        // unselected but 0.4 above its θ, outside the kernel.
        assert_eq!(near.row(0), (&[1u32][..], &[0.2f32][..]));
        assert_eq!(near.row(1), (&[3u32][..], &[0.29f32][..]));
    }

    #[test]
    fn threshold_and_relu() {
        let post = random_post(19, 31, 2);
        let mut codes = Codes::empty(0);
        let mut sel = Selector::default();
        sel.relu(unbiased(&post), &mut codes);
        assert_eq!(codes.to_dense(), post);
        assert_eq!(codes, Codes::from_dense(post.view()));
        sel.threshold(unbiased(&post), 0.3, &mut codes);
        assert_eq!(
            codes.to_dense(),
            post.mapv(|v| if v > 0.3 { v } else { 0.0 })
        );
    }
}
