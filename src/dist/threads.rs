//! The processes of a job played by threads of one process: a [`Collective`] for tests of
//! distributed code without an MPI launcher, and for programs that run several trainers of
//! one global batch side by side.

use std::sync::{Arc, Barrier, Mutex};

use super::{Collective, Traffic};

/// One of `size` threads standing in for the processes of a job: every operation posts
/// this thread's bytes, waits for all, and combines them in rank order.
pub struct Threads {
    rank: usize,
    size: usize,
    exchange: Arc<Exchange>,
}

/// What the threads of one job (or of one group split from it) share.
struct Exchange {
    barrier: Barrier,
    slots: Mutex<Vec<Vec<u8>>>,
    /// [`Collective::split`]: each group's first thread offers the group's new exchange here,
    /// at its own rank, for the others to take.
    offers: Mutex<Vec<Option<Arc<Exchange>>>>,
}

impl Exchange {
    fn new(size: usize) -> Arc<Exchange> {
        Arc::new(Exchange {
            barrier: Barrier::new(size),
            slots: Mutex::new(vec![Vec::new(); size]),
            offers: Mutex::new(vec![None; size]),
        })
    }
}

impl Threads {
    /// `size` handles sharing one exchange, one per thread (rank order). Every thread must
    /// make the same sequence of calls, as processes of an MPI job do.
    pub fn world(size: usize) -> Vec<Threads> {
        let exchange = Exchange::new(size);
        (0..size)
            .map(|rank| Threads {
                rank,
                size,
                exchange: exchange.clone(),
            })
            .collect()
    }

    /// Every thread's `mine`, in rank order.
    fn exchange(&self, mine: Vec<u8>) -> Vec<Vec<u8>> {
        let exchange = &self.exchange;
        // Nobody overwrites a slot before every thread has read the last exchange.
        exchange.barrier.wait();
        lock(&exchange.slots)[self.rank] = mine;
        exchange.barrier.wait();
        lock(&exchange.slots).clone()
    }

    /// `buf` replaced by `combine` of every thread's values, element by element.
    fn reduce<T: Copy, const N: usize>(
        &self,
        buf: &mut [T],
        to: fn(T) -> [u8; N],
        from: fn([u8; N]) -> T,
        combine: fn(T, T) -> T,
    ) {
        let all = self.exchange(buf.iter().flat_map(|&v| to(v)).collect());
        for (i, out) in buf.iter_mut().enumerate() {
            let value = |q: usize| from(all[q][i * N..(i + 1) * N].try_into().unwrap());
            *out = (1..self.size).fold(value(0), |acc, q| combine(acc, value(q)));
        }
    }
}

impl Collective for Threads {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum_u64(&self, buf: &mut [u64]) {
        self.reduce(buf, u64::to_le_bytes, u64::from_le_bytes, |a, b| a + b)
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) {
        self.reduce(buf, f64::to_le_bytes, f64::from_le_bytes, |a, b| a + b)
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) {
        self.reduce(buf, f32::to_le_bytes, f32::from_le_bytes, |a, b| a + b)
    }
    fn all_reduce_min_f32(&self, buf: &mut [f32]) {
        self.reduce(buf, f32::to_le_bytes, f32::from_le_bytes, f32::min)
    }
    fn all_reduce_max_u64(&self, buf: &mut [u64]) {
        self.reduce(buf, u64::to_le_bytes, u64::from_le_bytes, u64::max)
    }
    fn broadcast_bytes(&self, root: usize, buf: &mut Vec<u8>) {
        *buf = self.exchange(buf.clone()).swap_remove(root);
    }
    fn gather_bytes(&self, root: usize, local: &[u8]) -> Vec<Vec<u8>> {
        let all = self.exchange(local.to_vec());
        if self.rank == root {
            all
        } else {
            Vec::new()
        }
    }
    fn all_gather_bytes(&self, local: &[u8]) -> Vec<Vec<u8>> {
        self.exchange(local.to_vec())
    }
    fn split(&self, color: usize) -> Arc<dyn Collective> {
        let colors: Vec<usize> = (self.exchange(color.to_le_bytes().to_vec()).iter())
            .map(|b| usize::from_le_bytes(b[..].try_into().expect("a usize each")))
            .collect();
        let members: Vec<usize> = (0..self.size).filter(|&q| colors[q] == color).collect();
        let leader = members[0];
        if leader == self.rank {
            lock(&self.exchange.offers)[self.rank] = Some(Exchange::new(members.len()));
        }
        self.exchange.barrier.wait();
        let exchange = lock(&self.exchange.offers)[leader]
            .clone()
            .expect("the group's first thread offered its exchange");
        // Every thread has its group's exchange before any leader clears its offer.
        self.exchange.barrier.wait();
        if leader == self.rank {
            lock(&self.exchange.offers)[self.rank] = None;
        }
        Arc::new(Threads {
            rank: members
                .iter()
                .position(|&q| q == self.rank)
                .expect("a member"),
            size: members.len(),
            exchange,
        })
    }
    fn traffic(&self) -> Traffic {
        Traffic::default()
    }
}

/// A lock whose holder cannot leave its data half-written (every critical section here is
/// one assignment or clone), so a poisoned one is as good as any.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
