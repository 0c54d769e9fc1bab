//! A process's share of a distributed step: the latents whose gradients, moments and update it
//! owns, the gathering of every process's batch rows that lets its backward pass cover the
//! whole batch for those latents, and the gathering of the rows every process updated.
//!
//! Why not sum gradients: a gradient all-reduce moves and adds 2·F·D numbers a step, and
//! leaves every process to run Adam over every row. The backward pass of a sparse SAE needs
//! only batch-sized tensors (x − b_dec, ∂L/∂x̂, the codes), so each process gathers those
//! (B·D numbers, independent of F), takes the complete gradients of its own F/N latents, steps
//! them, and the updated rows are gathered: half the traffic, no sums, 1/N of the update.

use std::ops::Range;

use ndarray::{s, Array1, Array2, ArrayView2, ArrayViewMut2, Axis};

use crate::dist::{own_part, part, Collective};
use crate::sae::resize;
use crate::select::Codes;

/// Who holds what in one distributed step.
#[derive(Clone, Debug)]
pub(super) struct Shard {
    /// This process's rank.
    pub rank: usize,
    /// Batch rows each process holds, in rank order.
    pub rows_per_rank: Vec<usize>,
    /// Latents each process owns, in rank order (contiguous parts of the dictionary).
    pub latents_per_rank: Vec<usize>,
}

impl Shard {
    /// The split of `n_latents` over `collective`'s processes, each holding the row counts
    /// they report (`n_local` here).
    pub fn new(collective: &dyn Collective, n_local: usize, n_latents: usize) -> Shard {
        let mut shard = Shard::for_latents(collective, n_latents);
        let mut rows = vec![0u64; shard.latents_per_rank.len()];
        rows[shard.rank] = n_local as u64;
        collective.all_reduce_sum_u64(&mut rows);
        shard.rows_per_rank = rows.into_iter().map(|n| n as usize).collect();
        shard
    }

    /// The split of `n_latents` alone, with no rows (no collective call): enough to gather
    /// latent rows outside a step.
    pub fn for_latents(collective: &dyn Collective, n_latents: usize) -> Shard {
        let (rank, world) = (collective.rank(), collective.world_size());
        Shard {
            rank,
            rows_per_rank: Vec::new(),
            latents_per_rank: (0..world)
                .map(|q| part(n_latents, q, world).len())
                .collect(),
        }
    }

    /// Rows in the global batch.
    pub fn n_global(&self) -> usize {
        self.rows_per_rank.iter().sum()
    }

    /// The latents this process owns.
    pub fn latents(&self) -> Range<usize> {
        own_part(&self.latents_per_rank, self.rank)
    }

    /// Fills the other processes' latent rows of W_enc and W_dec (F×D) and entries of b_enc
    /// and JumpReLU's θ (F; none for the other architectures) from their owners: parameters,
    /// or moments, shaped like them.
    pub fn gather_latents(
        &self,
        collective: &dyn Collective,
        w_enc_fd: &mut Array2<f32>,
        w_dec_fd: &mut Array2<f32>,
        b_enc_f: &mut Array1<f32>,
        threshold_f: &mut Array1<f32>,
    ) {
        if !threshold_f.is_empty() {
            collective.all_gather_f32(
                threshold_f.as_slice_mut().expect("standard layout"),
                &self.latents_per_rank,
            );
        }
        let d = w_enc_fd.ncols();
        let counts: Vec<usize> = self.latents_per_rank.iter().map(|&n| n * d).collect();
        for w_fd in [w_enc_fd, w_dec_fd] {
            collective.all_gather_f32(w_fd.as_slice_mut().expect("standard layout"), &counts);
        }
        collective.all_gather_f32(
            b_enc_f.as_slice_mut().expect("standard layout"),
            &self.latents_per_rank,
        );
    }
}

/// Every process's batch rows, gathered in rank order: what the backward pass over this
/// process's latents reads.
#[derive(Default)]
pub(super) struct Gathered {
    /// x − b_dec, B×D.
    pub xc_bd: Array2<f32>,
    /// Rows 0..B: ∂L/∂x̂; rows B..2B: ∂L/∂ê (zero when AuxK is off this step).
    pub upstream_bd: Array2<f32>,
    /// The codes, B rows.
    pub codes: Codes,
    /// AuxK's codes, B rows.
    pub aux_codes: Codes,
}

impl Gathered {
    /// Gathers this process's `xc_bd`, `upstream_bd` (its main rows, then its AuxK rows when
    /// `aux` is on), `codes` and `aux_codes` from every process.
    #[allow(clippy::too_many_arguments)]
    pub fn gather(
        &mut self,
        collective: &dyn Collective,
        shard: &Shard,
        xc_bd: ArrayView2<'_, f32>,
        upstream_bd: ArrayView2<'_, f32>,
        aux: bool,
        codes: &Codes,
        aux_codes: &Codes,
    ) {
        let (n_local, n, d) = (xc_bd.nrows(), shard.n_global(), xc_bd.ncols());
        resize(&mut self.xc_bd, (n, d));
        resize(&mut self.upstream_bd, (2 * n, d));
        gather_rows_into(collective, shard, xc_bd, self.xc_bd.view_mut());
        let (main, aux_rows) = upstream_bd.split_at(Axis(0), n_local);
        let (mut up_main, mut up_aux) = self.upstream_bd.view_mut().split_at(Axis(0), n);
        gather_rows_into(collective, shard, main, up_main.view_mut());
        if aux {
            gather_rows_into(collective, shard, aux_rows, up_aux.view_mut());
        } else {
            up_aux.fill(0.0);
        }
        gather_codes(collective, codes, &mut self.codes);
        if aux {
            gather_codes(collective, aux_codes, &mut self.aux_codes);
        } else {
            self.aux_codes = Codes::empty(codes.n_latents);
            self.aux_codes.indptr.resize(n + 1, 0);
        }
    }
}

/// `out` (B×D, standard layout) filled with every process's rows in rank order.
fn gather_rows_into(
    collective: &dyn Collective,
    shard: &Shard,
    local: ArrayView2<'_, f32>,
    mut out: ArrayViewMut2<'_, f32>,
) {
    let d = local.ncols();
    let own = own_part(&shard.rows_per_rank, shard.rank);
    out.slice_mut(s![own, ..]).assign(&local);
    let counts: Vec<usize> = shard.rows_per_rank.iter().map(|&n| n * d).collect();
    collective.all_gather_f32(out.as_slice_mut().expect("standard layout"), &counts);
}

/// Every process's codes as one [`Codes`] of all their rows, in rank order.
fn gather_codes(collective: &dyn Collective, local: &Codes, out: &mut Codes) {
    let mut bytes = Vec::with_capacity(16 + 4 * local.n_rows() + 8 * local.nnz());
    bytes.extend_from_slice(&(local.n_rows() as u64).to_le_bytes());
    bytes.extend_from_slice(&(local.nnz() as u64).to_le_bytes());
    for w in local.indptr.windows(2) {
        bytes.extend_from_slice(&((w[1] - w[0]) as u32).to_le_bytes());
    }
    for &j in &local.indices {
        bytes.extend_from_slice(&j.to_le_bytes());
    }
    for &v in &local.values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    let all = collective.all_gather_bytes(&bytes);
    out.n_latents = local.n_latents;
    out.indptr.clear();
    out.indptr.push(0);
    out.indices.clear();
    out.values.clear();
    for part in &all {
        let word = |at: usize| u64::from_le_bytes(part[at..at + 8].try_into().expect("8 bytes"));
        let (rows, nnz) = (word(0) as usize, word(8) as usize);
        let u32s = |from: usize, n: usize| {
            part[from..from + 4 * n]
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        };
        let mut at = *out.indptr.last().expect("starts at 0");
        for len in u32s(16, rows) {
            at += len as usize;
            out.indptr.push(at);
        }
        out.indices.extend(u32s(16 + 4 * rows, nnz));
        out.values
            .extend(u32s(16 + 4 * rows + 4 * nnz, nnz).map(f32::from_bits));
    }
}
