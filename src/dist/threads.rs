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
    barrier: Arc<Barrier>,
    slots: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Threads {
    /// `size` handles sharing one exchange, one per thread (rank order). Every thread must
    /// make the same sequence of calls, as processes of an MPI job do.
    pub fn world(size: usize) -> Vec<Threads> {
        let barrier = Arc::new(Barrier::new(size));
        let slots = Arc::new(Mutex::new(vec![Vec::new(); size]));
        (0..size)
            .map(|rank| Threads {
                rank,
                size,
                barrier: barrier.clone(),
                slots: slots.clone(),
            })
            .collect()
    }

    /// Every thread's `mine`, in rank order.
    fn exchange(&self, mine: Vec<u8>) -> Vec<Vec<u8>> {
        // Nobody overwrites a slot before every thread has read the last exchange.
        self.barrier.wait();
        self.slots.lock().unwrap_or_else(|e| e.into_inner())[self.rank] = mine;
        self.barrier.wait();
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).clone()
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
    fn traffic(&self) -> Traffic {
        Traffic::default()
    }
}
