//! The distributed step's gradient exchange alone, at a training shape: the dense copy a
//! step makes of its sparse gradients (`Grads::to_dense`), then the sum over ranks of the two
//! F×D gradient buffers (2·F·D·4 bytes, ≈ 100 MB at D = 768, F = 16384) through
//! `Collective::all_reduce_sum_f32` (rank-order sums, what training uses), and for comparison
//! the MPI library's own MPI_Allreduce on the same buffers. Rank 0 prints medians.
//!
//! ```sh
//! cargo build --release --features mpi --example allreduce
//! mpirun -np 2 target/release/examples/allreduce [D F REPS]           # shared memory
//! mpirun --mca btl tcp,self -np 2 target/release/examples/allreduce   # forced onto TCP
//! ```

use std::time::{Duration, Instant};

use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use sparse_autoencoder::dist;
use sparse_autoencoder::optim::Grads;

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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arg = |i: usize, default: usize| -> Result<usize, Box<dyn std::error::Error>> {
        Ok(match std::env::args().nth(i) {
            Some(s) => s.parse()?,
            None => default,
        })
    };
    let (d, f, reps) = (arg(1, 768)?, arg(2, 16384)?, arg(3, 5)?.max(1));
    let world = dist::world()?;
    let collective = world.collective();
    let (rank, size) = (collective.rank(), collective.world_size());

    let mut grads = Grads::zeros(f, d);
    // Every latent fired, as in a TopK step at B = 4096, k = 64: the copy touches every row.
    grads.active_f.fill(true);
    let mut to_dense = Vec::new();
    let mut ordered = Vec::new();
    let mut native = Vec::new();
    let mut bytes = 0;
    for rep in 0..reps + 1 {
        let t = Instant::now();
        let mut dense = grads.to_dense();
        let copy = t.elapsed();

        let traffic = collective.traffic();
        let t = Instant::now();
        for a in [&mut dense.w_enc_fd, &mut dense.w_dec_fd] {
            collective.all_reduce_sum_f32(a.as_slice_mut().expect("standard layout"));
        }
        let sum = t.elapsed();
        bytes = (collective.traffic() - traffic).bytes_sent;

        let comm = SimpleCommunicator::world();
        comm.barrier();
        let t = Instant::now();
        for a in [&mut dense.w_enc_fd, &mut dense.w_dec_fd] {
            let send = a.as_slice().expect("standard layout").to_vec();
            let recv = a.as_slice_mut().expect("standard layout");
            comm.all_reduce_into(&send[..], recv, SystemOperation::sum());
        }
        let mpi_sum = t.elapsed();
        comm.barrier();
        if rep > 0 {
            to_dense.push(copy);
            ordered.push(sum);
            native.push(mpi_sum);
        }
    }
    if rank == 0 {
        let mb = (2 * f * d * 4) as f64 / 1e6;
        println!(
            "ranks {size}  D={d} F={f}  gradient buffers 2·F·D·4 = {mb:.1} MB  medians of {reps}"
        );
        println!(
            "  Grads::to_dense (F×D ×2 copy)       {:>9.2} ms",
            median_ms(to_dense)
        );
        let ms = median_ms(ordered);
        println!(
            "  all_reduce_sum_f32, rank order      {:>9.2} ms   {:.1} MB sent per rank  {:.2} GB/s bus",
            ms,
            bytes as f64 / 1e6,
            bytes as f64 / (ms / 1e3) / 1e9
        );
        println!(
            "  MPI_Allreduce (library's sum)       {:>9.2} ms   (its own copy of the send buffer included)",
            median_ms(native)
        );
    }
    Ok(())
}
