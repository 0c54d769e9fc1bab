//! `sae synth`: the built-in synthetic dataset written out as .npy, with its true features.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use sparse_autoencoder::synth::{Synth, SynthConfig};

use super::{at_least_one, usage, UsageError};

/// `sae synth`'s options; the defaults are `sae train`'s built-in dataset.
#[derive(Args)]
pub struct SynthArgs {
    /// Directory for activations.npy (N×D float32) and true_features.npy (G×D float32).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Rows N.
    #[arg(long, default_value_t = 100_000, value_parser = at_least_one, allow_negative_numbers = true)]
    rows: usize,
    /// Width D [default: 64].
    #[arg(long, allow_negative_numbers = true)]
    d_model: Option<usize>,
    /// True features G [default: 256].
    #[arg(long, allow_negative_numbers = true)]
    n_features: Option<usize>,
    /// Mean active features per row [default: 5].
    #[arg(long, allow_negative_numbers = true)]
    mean_active: Option<f64>,
    /// Seed of the features and rows (`sae train`'s --seed gives the same data) [default: 0].
    #[arg(long, allow_negative_numbers = true)]
    seed: Option<u64>,
    /// Replace files already in --out.
    #[arg(long)]
    force: bool,
}

/// Rows generated at a time: batches of `sae train`'s default synthetic batch size.
const CHUNK: usize = 1024;

/// Runs `sae synth`.
pub fn run(args: SynthArgs) -> Result<Option<u8>> {
    let defaults = SynthConfig::default();
    let config = SynthConfig {
        d_model: args.d_model.unwrap_or(defaults.d_model),
        n_features: args.n_features.unwrap_or(defaults.n_features),
        mean_active: args.mean_active.unwrap_or(defaults.mean_active),
        seed: args.seed.unwrap_or(defaults.seed),
        ..defaults
    };
    let synth = Synth::new(config).map_err(usage)?;
    let (acts, features) = (
        args.out.join("activations.npy"),
        args.out.join("true_features.npy"),
    );
    if !args.force && (acts.exists() || features.exists()) {
        return Err(UsageError(format!(
            "invalid --out {}: it already holds a dataset; pass --force to replace it",
            args.out.display()
        ))
        .into());
    }
    std::fs::create_dir_all(&args.out)
        .map_err(|err| UsageError(format!("invalid --out {}: {err}", args.out.display())))?;
    let d = synth.config().d_model;
    let mut rows: Vec<f32> = Vec::with_capacity(args.rows * d);
    let mut index = 0u64;
    while rows.len() < args.rows * d {
        let n = CHUNK.min(args.rows - rows.len() / d);
        rows.extend(synth.batch(n, index).iter());
        index += 1;
    }
    sparse_autoencoder::io::write_npy(&acts, &[args.rows as u64, d as u64], &rows)?;
    let true_gd = synth.true_features();
    sparse_autoencoder::io::write_npy(
        &features,
        &[true_gd.nrows() as u64, d as u64],
        &true_gd.iter().copied().collect::<Vec<_>>(),
    )?;
    println!(
        "wrote {} rows of width {d} to {} and the {} true features to {}",
        args.rows,
        acts.display(),
        true_gd.nrows(),
        features.display()
    );
    Ok(None)
}
