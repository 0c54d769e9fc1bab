//! The seam for data parallelism: every place where a step needs batch-wide information
//! (BatchTopK's global selection, dead-latent counters, gradients, loss statistics, b_dec's
//! initialisation) goes through a [`Collective`], so a multi-process implementation (MPI) can
//! combine shards of one global batch without touching the training code.

/// Sums (or reduces) buffers across the processes that share one global batch. Every process
/// calls the same sequence of operations with buffers of the same length.
pub trait Collective: Send + Sync {
    /// Number of processes sharing the global batch.
    fn world_size(&self) -> usize;
    /// Element-wise sum across processes, in place.
    fn all_reduce_sum_u64(&self, buf: &mut [u64]);
    /// Element-wise sum across processes, in place. Implementations must sum in a fixed order
    /// so training stays bit-reproducible.
    fn all_reduce_sum_f64(&self, buf: &mut [f64]);
    /// Element-wise sum across processes, in place (same ordering rule).
    fn all_reduce_sum_f32(&self, buf: &mut [f32]);
    /// Element-wise minimum across processes, in place.
    fn all_reduce_min_f32(&self, buf: &mut [f32]);
}

/// One process holds the whole batch: every reduction is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum_u64(&self, _buf: &mut [u64]) {}
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) {}
    fn all_reduce_sum_f32(&self, _buf: &mut [f32]) {}
    fn all_reduce_min_f32(&self, _buf: &mut [f32]) {}
}
