//! The distributed step's exchange alone, at a training shape, against the gradient all-reduce
//! it replaces. What a sparse step exchanges (see `train::shard`): the gathers of the batch's
//! rows (x − b_dec and ∂L/∂x̂, B×D each; ∂L/∂ê too when AuxK is on) and of the updated W_enc
//! and W_dec rows each rank owns (F/N of 2·F·D). For comparison, the sum over ranks of the two
//! F×D gradient buffers (2·F·D·4 bytes, ≈ 100 MB at D = 768, F = 16384) through
//! `Collective::all_reduce_sum_f32` (rank-order sums) and the MPI library's own MPI_Allreduce.
//! Rank 0 prints medians.
//!
//! ```sh
//! cargo build --release --features mpi --example exchange
//! mpirun -np 2 target/release/examples/exchange [D F B REPS]           # shared memory
//! mpirun --mca btl tcp,self -np 2 target/release/examples/exchange     # forced onto TCP
//! ```

use std::time::{Duration, Instant};

use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use ndarray::Array2;
use sparse_autoencoder::dist::{self, Collective};

fn median_ms(mut t: Vec<Duration>) -> f64 {
    t.sort();
    let n = t.len();
    let mid = if n % 2 == 1 {
        t[n / 2]
    } else {
        (t[n / 2 - 1] + t[n / 2]) / 2
    };
    mid.as_secs_f64() * 1e3
}

/// Times `op` on every rank after a barrier; returns the time and the bytes this rank sent.
fn timed(collective: &dyn Collective, op: impl FnOnce()) -> (Duration, u64) {
    SimpleCommunicator::world().barrier();
    let traffic = collective.traffic();
    let t = Instant::now();
    op();
    (t.elapsed(), (collective.traffic() - traffic).bytes_sent)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arg = |i: usize, default: usize| -> Result<usize, Box<dyn std::error::Error>> {
        Ok(match std::env::args().nth(i) {
            Some(s) => s.parse()?,
            None => default,
        })
    };
    let (d, f, b, reps) = (
        arg(1, 768)?,
        arg(2, 16384)?,
        arg(3, 4096)?,
        arg(4, 5)?.max(1),
    );
    let world = dist::world()?;
    let collective = world.collective();
    let c = &*collective;
    let (rank, size) = (c.rank(), c.world_size());

    let latents: Vec<usize> = (0..size)
        .map(|q| dist::part(f, q, size).len() * d)
        .collect();
    let rows: Vec<usize> = (0..size)
        .map(|q| dist::part(b, q, size).len() * d)
        .collect();
    let mut w_fd = [Array2::<f32>::ones((f, d)), Array2::<f32>::ones((f, d))];
    let mut x_bd = [Array2::<f32>::ones((b, d)), Array2::<f32>::ones((b, d))];
    let (mut params, mut batch, mut ordered, mut native) = (vec![], vec![], vec![], vec![]);
    let (mut params_bytes, mut batch_bytes, mut sum_bytes) = (0, 0, 0);
    for rep in 0..reps + 1 {
        let (t_batch, bytes) = timed(c, || {
            for a in &mut x_bd {
                c.all_gather_f32(a.as_slice_mut().expect("standard layout"), &rows);
            }
        });
        batch_bytes = bytes;
        let (t_params, bytes) = timed(c, || {
            for a in &mut w_fd {
                c.all_gather_f32(a.as_slice_mut().expect("standard layout"), &latents);
            }
        });
        params_bytes = bytes;
        let (t_sum, bytes) = timed(c, || {
            for a in &mut w_fd {
                c.all_reduce_sum_f32(a.as_slice_mut().expect("standard layout"));
            }
        });
        sum_bytes = bytes;
        let (t_native, _) = timed(c, || {
            let comm = SimpleCommunicator::world();
            for a in &mut w_fd {
                let send = a.as_slice().expect("standard layout").to_vec();
                let recv = a.as_slice_mut().expect("standard layout");
                comm.all_reduce_into(&send[..], recv, SystemOperation::sum());
            }
        });
        if rep > 0 {
            batch.push(t_batch);
            params.push(t_params);
            ordered.push(t_sum);
            native.push(t_native);
        }
    }
    if rank == 0 {
        let mb = |bytes: u64| bytes as f64 / 1e6;
        let line = |what: &str, ms: f64, bytes: u64| {
            println!(
                "  {what:<44} {ms:>9.2} ms  {:>7.1} MB sent per rank  {:.2} GB/s",
                mb(bytes),
                bytes as f64 / (ms / 1e3) / 1e9
            )
        };
        println!("ranks {size}  D={d} F={f} B={b}  medians of {reps}");
        line("batch rows gathered (2 B×D)", median_ms(batch), batch_bytes);
        line(
            "updated latent rows gathered (2 F×D)",
            median_ms(params),
            params_bytes,
        );
        line(
            "gradient sum, all_reduce_sum_f32 (2 F×D)",
            median_ms(ordered),
            sum_bytes,
        );
        println!(
            "  {:<44} {:>9.2} ms  (its own copy of the send buffer included)",
            "gradient sum, MPI_Allreduce (2 F×D)",
            median_ms(native)
        );
    }
    Ok(())
}
