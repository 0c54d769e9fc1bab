//! [`Collective`] over MPI (the system Open MPI, through rsmpi): sums in rank order, so that
//! the same rank count gives the same bits on every run and on every rank.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use mpi::collective::SystemOperation;
use mpi::datatype::{Equivalence, Partition, PartitionMut};
use mpi::environment::Universe;
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::*;
use mpi::Count;

use super::{part, Collective, Traffic};
use crate::error::{Error, Result};

/// Environment variables that MPI launchers set in the processes they start: Open MPI's
/// mpirun (`OMPI_COMM_WORLD_SIZE`), PMIx (Open MPI 4+, `srun --mpi=pmix`), PMI-1/2 (MPICH's
/// hydra, `srun --mpi=pmi2`).
const LAUNCHER_VARS: [&str; 4] = ["OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE"];

/// Elements reduced per round: bounds the receive buffer and keeps MPI's counts in range.
const SEGMENT: usize = 4 << 20;

/// Below this many elements in all, a sum gathers every process's whole buffer in one call
/// (latency matters more than bytes there).
const SMALL: usize = 1 << 12;

/// Whether an MPI launcher started this process.
pub(crate) fn launched() -> bool {
    LAUNCHER_VARS.iter().any(|v| std::env::var_os(v).is_some())
}

/// One process of an MPI job, over the job's world or a group split from it. Dropping the
/// last handle finalises MPI.
pub struct Mpi {
    comm: SimpleCommunicator,
    rank: usize,
    size: usize,
    // Last: the communicator is freed before MPI is finalised.
    process: Arc<Process>,
}

/// What every communicator of this process shares.
struct Process {
    /// Held for the whole of every operation on any communicator: MPI is initialised
    /// `Serialized`, so calls from several threads must never overlap. The counts are this
    /// process's, over all its communicators.
    traffic: Mutex<Traffic>,
    agreed: AtomicBool,
    _universe: Universe,
}

// SAFETY: the communicator is a handle that MPI lets any thread use when calls are serialized
// (MPI_THREAD_SERIALIZED, checked at init), and every call holds `traffic`'s lock.
unsafe impl Send for Mpi {}
unsafe impl Sync for Mpi {}
unsafe impl Send for Process {}
unsafe impl Sync for Process {}

impl Mpi {
    /// Initialises MPI; fails if it is already initialised or cannot serialise calls.
    pub(crate) fn init() -> Result<Mpi> {
        let fail = |reason: String| Error::Distributed { reason };
        let (universe, threading) = mpi::initialize_with_threading(mpi::Threading::Serialized)
            .ok_or_else(|| fail("MPI is already initialised in this process".into()))?;
        if threading < mpi::Threading::Serialized {
            return Err(fail(format!(
                "this MPI library offers thread support {threading:?}; sae needs Serialized: \
                 use an MPI built with thread support"
            )));
        }
        let comm = universe.world();
        Ok(Mpi {
            rank: comm.rank() as usize,
            size: comm.size() as usize,
            comm,
            process: Arc::new(Process {
                traffic: Mutex::new(Traffic::default()),
                agreed: AtomicBool::new(false),
                _universe: universe,
            }),
        })
    }

    /// See [`super::World::failure_agreed`].
    pub(crate) fn failure_agreed(&self) -> bool {
        self.process.agreed.load(Ordering::Relaxed)
    }

    /// MPI_Abort on the whole job.
    pub(crate) fn abort(&self, status: i32) -> ! {
        self.comm.abort(status)
    }

    /// Runs one operation with the lock held, counting its time and `bytes` sent.
    fn timed<R>(&self, bytes: usize, op: impl FnOnce(&SimpleCommunicator) -> R) -> R {
        let mut traffic = self
            .process
            .traffic
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let start = Instant::now();
        let out = op(&self.comm);
        traffic.calls += 1;
        traffic.bytes_sent += bytes as u64;
        traffic.time += start.elapsed();
        out
    }

    fn all_reduce<T: Equivalence + Copy>(&self, buf: &mut [T], op: SystemOperation) {
        let bytes = std::mem::size_of_val(buf) * (self.size - 1);
        let send = buf.to_vec();
        self.timed(bytes, |w| w.all_reduce_into(&send[..], buf, op));
    }

    /// Element-wise `Σ_q buf_q` with the terms added in rank order q = 0, 1, … by `sum`
    /// (which gets one element's values of every rank): each rank sums one part of the buffer
    /// and the parts are gathered, so every rank ends with the same bits.
    fn sum_in_rank_order<T>(&self, buf: &mut [T], sum: impl Fn(&mut dyn Iterator<Item = T>) -> T)
    where
        T: Equivalence + Copy + Default,
    {
        let size = self.size;
        if buf.len() * size <= SMALL {
            let mut all = vec![T::default(); buf.len() * size];
            let bytes = std::mem::size_of_val(buf) * (size - 1);
            self.timed(bytes, |w| w.all_gather_into(&*buf, &mut all[..]));
            let n = buf.len();
            for (i, out) in buf.iter_mut().enumerate() {
                *out = sum(&mut (0..size).map(|q| all[q * n + i]));
            }
            return;
        }
        let mut recv = Vec::new();
        for seg in buf.chunks_mut(SEGMENT) {
            let n = seg.len();
            let parts: Vec<_> = (0..size).map(|q| part(n, q, size)).collect();
            let counts: Vec<Count> = parts.iter().map(|p| p.len() as Count).collect();
            let displs: Vec<Count> = parts.iter().map(|p| p.start as Count).collect();
            let mine = parts[self.rank].clone();
            let m = mine.len();
            recv.clear();
            recv.resize(m * size, T::default());
            let recv_counts = vec![m as Count; size];
            let recv_displs: Vec<Count> = (0..size).map(|q| (q * m) as Count).collect();
            let elem = std::mem::size_of::<T>();
            self.timed((n - m) * elem, |w| {
                w.all_to_all_varcount_into(
                    &Partition::new(&*seg, &counts[..], &displs[..]),
                    &mut PartitionMut::new(&mut recv[..], &recv_counts[..], &recv_displs[..]),
                )
            });
            let reduced: Vec<T> = (0..m)
                .map(|i| sum(&mut (0..size).map(|q| recv[q * m + i])))
                .collect();
            self.timed(m * elem * (size - 1), |w| {
                w.all_gather_varcount_into(
                    &reduced[..],
                    &mut PartitionMut::new(seg, &counts[..], &displs[..]),
                )
            });
        }
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum_u64(&self, buf: &mut [u64]) {
        // Integer sums are exact in any order.
        self.all_reduce(buf, SystemOperation::sum());
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) {
        self.sum_in_rank_order(buf, |terms| terms.fold(0.0, |a, v| a + v));
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) {
        // In f64, rounded once: as close to one process's sum as the parts allow.
        self.sum_in_rank_order(buf, |terms| terms.fold(0.0f64, |a, v| a + v as f64) as f32);
    }
    fn all_reduce_min_f32(&self, buf: &mut [f32]) {
        self.all_reduce(buf, SystemOperation::min());
    }
    fn all_reduce_max_u64(&self, buf: &mut [u64]) {
        self.all_reduce(buf, SystemOperation::max());
    }
    fn broadcast_bytes(&self, root: usize, buf: &mut Vec<u8>) {
        let sent = |n: usize| {
            if self.rank == root {
                n * (self.size - 1)
            } else {
                0
            }
        };
        let mut len = buf.len() as u64;
        self.timed(sent(8), |w| {
            w.process_at_rank(root as i32).broadcast_into(&mut len)
        });
        buf.resize(len as usize, 0);
        for chunk in buf.chunks_mut(SEGMENT) {
            self.timed(sent(chunk.len()), |w| {
                w.process_at_rank(root as i32).broadcast_into(chunk)
            });
        }
    }
    fn gather_bytes(&self, root: usize, local: &[u8]) -> Vec<Vec<u8>> {
        let at_root = self.rank == root;
        let len = local.len() as u64;
        let mut lens = vec![0u64; if at_root { self.size } else { 0 }];
        self.timed(if at_root { 0 } else { 8 }, |w| {
            let root = w.process_at_rank(root as i32);
            if at_root {
                root.gather_into_root(&len, &mut lens[..]);
            } else {
                root.gather_into(&len);
            }
        });
        // Each process's bytes go whole, in rounds of at most SEGMENT bytes per process.
        let mut out: Vec<Vec<u8>> = lens
            .iter()
            .map(|&n| Vec::with_capacity(n as usize))
            .collect();
        let rounds = |n: u64| (n as usize).div_ceil(SEGMENT);
        let mut n_rounds = [rounds(len) as u64];
        self.all_reduce(&mut n_rounds, SystemOperation::max());
        for round in 0..n_rounds[0] as usize {
            let piece = |n: usize| {
                let lo = (round * SEGMENT).min(n);
                lo..(lo + SEGMENT).min(n)
            };
            let mine = &local[piece(local.len())];
            self.timed(if at_root { 0 } else { mine.len() }, |w| {
                let root_process = w.process_at_rank(root as i32);
                if at_root {
                    let counts: Vec<Count> = lens
                        .iter()
                        .map(|&n| piece(n as usize).len() as Count)
                        .collect();
                    let displs: Vec<Count> = counts
                        .iter()
                        .scan(0, |at, &c| {
                            let d = *at;
                            *at += c;
                            Some(d)
                        })
                        .collect();
                    let mut recv = vec![0u8; counts.iter().map(|&c| c as usize).sum()];
                    root_process.gather_varcount_into_root(
                        mine,
                        &mut PartitionMut::new(&mut recv[..], &counts[..], &displs[..]),
                    );
                    for (q, o) in out.iter_mut().enumerate() {
                        let (d, c) = (displs[q] as usize, counts[q] as usize);
                        o.extend_from_slice(&recv[d..d + c]);
                    }
                } else {
                    root_process.gather_varcount_into(mine);
                }
            });
        }
        out
    }
    fn all_gather_f32(&self, buf: &mut [f32], counts: &[usize]) {
        // Each part broadcast from its owner, in place: no copy of the buffer, no limit on its
        // size from MPI's int counts, and for two processes exactly one send each way.
        let mut at = 0;
        for (q, &n) in counts.iter().enumerate() {
            for chunk in buf[at..at + n].chunks_mut(SEGMENT) {
                let sent = if q == self.rank {
                    std::mem::size_of_val(chunk) * (self.size - 1)
                } else {
                    0
                };
                self.timed(sent, |w| w.process_at_rank(q as i32).broadcast_into(chunk));
            }
            at += n;
        }
    }
    fn split(&self, color: usize) -> Arc<dyn Collective> {
        let color = Color::with_value(Count::try_from(color).expect("colors are small"));
        let comm = self
            .timed(0, |c| c.split_by_color(color))
            .expect("a defined color gives a communicator");
        Arc::new(Mpi {
            rank: comm.rank() as usize,
            size: comm.size() as usize,
            comm,
            process: self.process.clone(),
        })
    }
    fn record_agreed_failure(&self) {
        self.process.agreed.store(true, Ordering::Relaxed);
    }
    fn traffic(&self) -> Traffic {
        *self
            .process
            .traffic
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}
