//! `sae encode`: an SAE's sparse codes for every row of some activations, as `.npy` files.

use sparse_autoencoder::dist::World;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use sparse_autoencoder::data::{NpyShards, Source};
use sparse_autoencoder::io::{CodesLayout, CodesWriter};
use sparse_autoencoder::{Architecture, Sae};

use super::{at_least_one, usage, UsageError};

/// `sae encode`'s options.
#[derive(Args)]
pub struct EncodeArgs {
    /// The SAE: a run directory (or a sweep's SAE subdirectory).
    #[arg(value_name = "SAE_DIR")]
    sae: PathBuf,
    /// Activations to encode, in order: .npy files, directories or globs.
    #[arg(long, num_args = 1.., value_name = "PATH", required = true)]
    data: Vec<PathBuf>,
    /// Directory for the codes: topk writes indices.npy (uint32, N×k) and values.npy
    /// (float32, N×k); relu and batchtopk write CSR indptr.npy (int64, N+1), indices.npy
    /// (uint32) and values.npy (float32). codes.json says which.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Rows encoded at a time.
    #[arg(long, default_value_t = 4096, value_parser = at_least_one, allow_negative_numbers = true)]
    batch_size: usize,
    /// Replace codes already in --out.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    device: super::DeviceArgs,
}

/// Refuses a `--batch-size` whose batches cannot fit in memory: each holds its rows (B×D) and
/// their pre-activations (B×F) as float32, and the data may hold any number of rows.
pub(super) fn check_batch_memory(batch_size: usize, n_rows: u64, d: usize, f: usize) -> Result<()> {
    let b = n_rows.min(batch_size as u64);
    let need = (d as u64)
        .checked_add(f as u64)
        .and_then(|w| w.checked_mul(b))
        .and_then(|e| e.checked_mul(4));
    let available = sparse_autoencoder::memory::available().map(|a| a.bytes);
    match (need, available) {
        (Some(need), Some(available)) if need <= available => Ok(()),
        (Some(_), None) => Ok(()),
        (need, available) => Err(UsageError(format!(
            "invalid --batch-size {batch_size}: a batch of {b} rows needs {} (rows × (D + F) \
             float32), more than the {} available; pass a smaller --batch-size",
            need.map_or("over 2^64 bytes".into(), |n| format!(
                "{:.1} GB",
                n as f64 / 1e9
            )),
            available.map_or("memory".into(), |a| format!("{:.1} GB", a as f64 / 1e9)),
        ))
        .into()),
    }
}

/// Runs `sae encode`.
pub fn run(args: EncodeArgs, world: &World) -> Result<Option<u8>> {
    super::alone(world, "encode")?;
    let device = args.device.device()?;
    let sae = Sae::load(&args.sae).map_err(usage)?;
    // Before anything is written: a device that cannot run leaves --out untouched.
    let mut encoder = sae.encoder(device).map_err(usage)?;
    let rows = NpyShards::open(&args.data)?;
    for notice in rows.notices() {
        println!("note: {notice}");
    }
    let (d, f) = (sae.config().d_model, sae.config().dict_size);
    if rows.d_model() != d {
        return Err(UsageError(format!(
            "invalid --data: its rows are {} wide but the SAE in {} takes {d}",
            rows.d_model(),
            args.sae.display()
        ))
        .into());
    }
    check_batch_memory(args.batch_size, rows.n_rows(), d, f)?;
    if args.out.join("codes.json").exists() && !args.force {
        return Err(UsageError(format!(
            "invalid --out {}: it already holds codes; pass --force to replace them",
            args.out.display()
        ))
        .into());
    }
    std::fs::create_dir_all(&args.out)
        .map_err(|err| UsageError(format!("invalid --out {}: {err}", args.out.display())))?;
    let layout = match sae.config().arch {
        Architecture::TopK { k } => CodesLayout::TopK { k },
        Architecture::Relu | Architecture::BatchTopK { .. } => CodesLayout::Csr,
    };
    if matches!(sae.config().arch, Architecture::BatchTopK { .. }) && sae.threshold().is_none() {
        println!(
            "note: this BatchTopK SAE has no threshold θ yet; each batch keeps its own top k·B \
             codes, so codes depend on --batch-size"
        );
    }
    let n = rows.n_rows();
    let mut writer = CodesWriter::new(&args.out, layout, f, n)?;
    let mut x_bd = ndarray::Array2::zeros((0, d));
    let (mut start, mut nnz) = (0u64, 0u64);
    while start < n {
        let b = (n - start).min(args.batch_size as u64) as usize;
        if x_bd.nrows() != b {
            x_bd = ndarray::Array2::zeros((b, d));
        }
        rows.read_rows(start, x_bd.as_slice_mut().expect("standard layout"))?;
        if let Some(bad) = x_bd
            .rows()
            .into_iter()
            .position(|r| r.iter().any(|v| !v.is_finite()))
        {
            // Not DataError::NonFinite: its fix, skipping such rows, would misalign the codes
            // with the rows they belong to.
            return Err(UsageError(format!(
                "invalid --data: non-finite value (NaN or Inf) at {}; the codes keep one row \
                 per input row, so clean the data first",
                rows.locate(start + bad as u64)
            ))
            .into());
        }
        let codes = encoder.encode(x_bd.view())?;
        nnz += codes.nnz() as u64;
        writer.push(&codes)?;
        start += b as u64;
    }
    writer.finish()?;
    println!(
        "encoded {n} rows ({:.2} active latents a row) into {}",
        nnz as f64 / n as f64,
        args.out.display()
    );
    Ok(None)
}
