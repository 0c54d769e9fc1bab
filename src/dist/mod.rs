//! The seam for data parallelism: every place where a step needs batch-wide information
//! (BatchTopK's global selection, dead-latent counters, gradients, loss statistics, b_dec's
//! initialisation) goes through a [`Collective`], so that the processes of an MPI job (feature
//! `mpi`, [`world`]) combine their shares of one global batch without touching the training
//! code. [`agree`] keeps them stopping together: a failure on any process ends the phase on
//! every process with the same error.

mod grid;
#[cfg(feature = "mpi")]
mod mpi;
mod threads;

use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
pub use grid::Grid;
pub use threads::Threads;

/// Sums (or reduces) buffers across the processes that share one global batch. Every process
/// calls the same sequence of operations with buffers of the same length; every process ends
/// with the same bits.
pub trait Collective: Send + Sync {
    /// This process's index, 0 ≤ rank < [`Collective::world_size`]. Rank 0 writes a run's
    /// files and prints.
    fn rank(&self) -> usize;
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
    /// Element-wise maximum across processes, in place.
    fn all_reduce_max_u64(&self, buf: &mut [u64]);
    /// Replaces `buf` on every process by `root`'s.
    fn broadcast_bytes(&self, root: usize, buf: &mut Vec<u8>);
    /// Every process's `local` bytes, in rank order, on `root` (empty elsewhere).
    fn gather_bytes(&self, root: usize, local: &[u8]) -> Vec<Vec<u8>>;
    /// Fills every process's part of `buf` from the process that owns it: `buf` is the
    /// concatenation, in rank order, of parts of `counts[q]` elements, and this process's own
    /// part holds its values on entry. Every process ends with the same bits. The default sums
    /// zero-padded buffers, which is exact (each element has one nonzero term) but moves the
    /// whole buffer; implementations send each part from its owner.
    fn all_gather_f32(&self, buf: &mut [f32], counts: &[usize]) {
        let own = own_part(counts, self.rank());
        buf[..own.start].fill(0.0);
        buf[own.end..].fill(0.0);
        self.all_reduce_sum_f32(buf);
    }
    /// Every process's `local` bytes, in rank order, on every process.
    fn all_gather_bytes(&self, local: &[u8]) -> Vec<Vec<u8>> {
        (0..self.world_size())
            .map(|q| {
                let mut buf = if q == self.rank() {
                    local.to_vec()
                } else {
                    Vec::new()
                };
                self.broadcast_bytes(q, &mut buf);
                buf
            })
            .collect()
    }
    /// The processes that call this with the same `color`, as a collective of their own,
    /// ranked in this one's rank order (MPI_Comm_split with the rank as key). Every process
    /// calls it, in the same sequence as the other operations.
    fn split(&self, color: usize) -> Arc<dyn Collective>;
    /// What this process's collectives cost so far (over every collective split from the
    /// same world).
    fn traffic(&self) -> Traffic;
    /// Called by [`agree`] when it returns a failure every process knows about, for
    /// [`World::failure_agreed`].
    fn record_agreed_failure(&self) {}
}

/// The cost of a process's collectives since it started: what `sae bench` reports per step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Traffic {
    /// Collective operations called.
    pub calls: u64,
    /// Bytes this process sent (payload only, by the algorithm's count).
    pub bytes_sent: u64,
    /// Wall-clock time spent inside collectives, waiting for other processes included.
    pub time: Duration,
}

impl std::ops::Sub for Traffic {
    type Output = Traffic;
    fn sub(self, earlier: Traffic) -> Traffic {
        Traffic {
            calls: self.calls - earlier.calls,
            bytes_sent: self.bytes_sent - earlier.bytes_sent,
            time: self.time.saturating_sub(earlier.time),
        }
    }
}

/// One process holds the whole batch: every reduction is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum_u64(&self, _buf: &mut [u64]) {}
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) {}
    fn all_reduce_sum_f32(&self, _buf: &mut [f32]) {}
    fn all_reduce_min_f32(&self, _buf: &mut [f32]) {}
    fn all_reduce_max_u64(&self, _buf: &mut [u64]) {}
    fn broadcast_bytes(&self, _root: usize, _buf: &mut Vec<u8>) {}
    fn gather_bytes(&self, _root: usize, local: &[u8]) -> Vec<Vec<u8>> {
        vec![local.to_vec()]
    }
    fn all_gather_f32(&self, _buf: &mut [f32], _counts: &[usize]) {}
    fn all_gather_bytes(&self, local: &[u8]) -> Vec<Vec<u8>> {
        vec![local.to_vec()]
    }
    fn split(&self, _color: usize) -> Arc<dyn Collective> {
        Arc::new(SingleProcess)
    }
    fn traffic(&self) -> Traffic {
        Traffic::default()
    }
}

impl<C: Collective + ?Sized> Collective for Arc<C> {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn world_size(&self) -> usize {
        (**self).world_size()
    }
    fn all_reduce_sum_u64(&self, buf: &mut [u64]) {
        (**self).all_reduce_sum_u64(buf)
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) {
        (**self).all_reduce_sum_f64(buf)
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) {
        (**self).all_reduce_sum_f32(buf)
    }
    fn all_reduce_min_f32(&self, buf: &mut [f32]) {
        (**self).all_reduce_min_f32(buf)
    }
    fn all_reduce_max_u64(&self, buf: &mut [u64]) {
        (**self).all_reduce_max_u64(buf)
    }
    fn broadcast_bytes(&self, root: usize, buf: &mut Vec<u8>) {
        (**self).broadcast_bytes(root, buf)
    }
    fn gather_bytes(&self, root: usize, local: &[u8]) -> Vec<Vec<u8>> {
        (**self).gather_bytes(root, local)
    }
    fn all_gather_f32(&self, buf: &mut [f32], counts: &[usize]) {
        (**self).all_gather_f32(buf, counts)
    }
    fn all_gather_bytes(&self, local: &[u8]) -> Vec<Vec<u8>> {
        (**self).all_gather_bytes(local)
    }
    fn split(&self, color: usize) -> Arc<dyn Collective> {
        (**self).split(color)
    }
    fn traffic(&self) -> Traffic {
        (**self).traffic()
    }
    fn record_agreed_failure(&self) {
        (**self).record_agreed_failure()
    }
}

/// The processes this one works with. Under an MPI launcher (`mpirun`, `mpiexec`, `srun`) in
/// a build with the `mpi` feature: the job's world, MPI initialised by this call (and finalised
/// when the last handle is dropped). Otherwise this process alone. Call it once per process.
pub fn world() -> Result<World> {
    #[cfg(feature = "mpi")]
    if mpi::launched() {
        return Ok(World::Mpi(Arc::new(mpi::Mpi::init()?)));
    }
    Ok(World::Single)
}

/// This process's rank as an MPI launcher set it in the environment, without initialising MPI
/// (for messages printed before [`world`]); `None` when no launcher started the process.
pub fn launcher_rank() -> Option<usize> {
    [
        "OMPI_COMM_WORLD_RANK",
        "PMIX_RANK",
        "PMI_RANK",
        "SLURM_PROCID",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.parse().ok())
}

/// The result of [`world`]: a handle to hand out collectives from, and to end the process
/// with.
#[derive(Clone)]
pub enum World {
    /// Not started by an MPI launcher (or a build without `mpi`).
    Single,
    /// One process of an MPI job.
    #[cfg(feature = "mpi")]
    Mpi(Arc<mpi::Mpi>),
}

impl World {
    /// A collective over the world's processes.
    pub fn collective(&self) -> Arc<dyn Collective> {
        match self {
            World::Single => Arc::new(SingleProcess),
            #[cfg(feature = "mpi")]
            World::Mpi(mpi) => mpi.clone(),
        }
    }

    /// This process's rank (0 alone).
    pub fn rank(&self) -> usize {
        self.collective().rank()
    }

    /// Whether more than one process shares the work.
    pub fn is_distributed(&self) -> bool {
        self.collective().world_size() > 1
    }

    /// Whether the last failure this process met was agreed by every process through
    /// [`agree`] (so every process ends with it, and rank 0 reports it). A failure that was
    /// not cannot be waited for: the process must [`World::abort`] the job instead.
    pub fn failure_agreed(&self) -> bool {
        match self {
            World::Single => true,
            #[cfg(feature = "mpi")]
            World::Mpi(mpi) => mpi.failure_agreed(),
        }
    }

    /// Ends every process of the job with `status` (MPI_Abort): for a failure the others do
    /// not know about and may be waiting on. Alone, exits this process.
    pub fn abort(&self, status: i32) -> ! {
        match self {
            World::Single => std::process::exit(status),
            #[cfg(feature = "mpi")]
            World::Mpi(mpi) => mpi.abort(status),
        }
    }
}

/// Every process's outcome of one phase, made the same everywhere: `Ok` when every process
/// succeeded; otherwise every process returns an error and rank 0's says what failed first:
/// the failing process's own error there, and on the other processes [`Error::Peer`] with the
/// message of the lowest-ranked process that failed. `stop` is ORed across processes and
/// returned with success, so that all stop at the same step. Alone, returns `local` as it is.
pub fn agree<T, E>(
    collective: &dyn Collective,
    local: std::result::Result<T, E>,
    stop: bool,
) -> std::result::Result<(T, bool), E>
where
    E: std::fmt::Display + From<Error>,
{
    let world = collective.world_size();
    if world == 1 {
        return local.map(|v| (v, stop));
    }
    let rank = collective.rank();
    // [stop, world − (lowest failing rank)], max-reduced: 0 in the second slot means no failure.
    let mut flags = [
        stop as u64,
        if local.is_err() {
            (world - rank) as u64
        } else {
            0
        },
    ];
    collective.all_reduce_max_u64(&mut flags);
    let local = match local {
        Ok(value) if flags[1] == 0 => return Ok((value, flags[0] > 0)),
        local => local.err(),
    };
    let root = world - flags[1] as usize;
    let mut message = match &local {
        Some(err) if rank == root => err.to_string().into_bytes(),
        _ => Vec::new(),
    };
    collective.broadcast_bytes(root, &mut message);
    collective.record_agreed_failure();
    match local {
        Some(err) if rank == root => Err(err),
        _ => Err(E::from(Error::Peer {
            rank: root,
            message: String::from_utf8_lossy(&message).into_owned(),
        })),
    }
}

/// Every process's `local` numbers, in rank order, on every process (through
/// [`Collective::all_gather_bytes`]).
pub fn all_gather_u64(collective: &dyn Collective, local: &[u64]) -> Vec<Vec<u64>> {
    let bytes: Vec<u8> = local.iter().flat_map(|v| v.to_le_bytes()).collect();
    (collective.all_gather_bytes(&bytes).iter())
        .map(|q| {
            q.chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect()
        })
        .collect()
}

/// Rows `lo..hi` of `n` that rank `rank` of `world` takes: contiguous parts in rank order,
/// the first `n % world` one row longer.
pub fn part(n: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    let (base, extra) = (n / world, n % world);
    let lo = rank * base + rank.min(extra);
    lo..lo + base + usize::from(rank < extra)
}

/// Where rank `rank`'s part lies in a buffer of parts of `counts[q]` elements in rank order.
pub fn own_part(counts: &[usize], rank: usize) -> std::ops::Range<usize> {
    let start = counts[..rank].iter().sum();
    start..start + counts[rank]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_the_rows_in_order_without_overlap() {
        for n in [0, 1, 5, 12, 13] {
            for world in 1..5 {
                let parts: Vec<_> = (0..world).map(|r| part(n, r, world)).collect();
                assert_eq!(parts[0].start, 0);
                assert_eq!(parts[world - 1].end, n);
                for w in parts.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                    assert!(w[0].len() >= w[1].len() && w[0].len() <= w[1].len() + 1);
                }
            }
        }
    }

    #[test]
    fn alone_agree_passes_results_and_the_stop_flag_through() {
        let ok = agree::<_, Error>(&SingleProcess, Ok(3), true).unwrap();
        assert_eq!(ok, (3, true));
        let err = agree::<(), Error>(
            &SingleProcess,
            Err(Error::Empty { what: "x".into() }),
            false,
        );
        assert!(matches!(err, Err(Error::Empty { .. })));
    }
}
