//! `sae export`: an SAE in SAELens' or EleutherAI sparsify's layout.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};
use sparse_autoencoder::dist::{agree, Grid, World};
use sparse_autoencoder::io::{export_shard, ExportFormat, ExportMetadata};
use sparse_autoencoder::{Architecture, Sae};

use super::{at_least_one, usage};

/// `sae export`'s options.
#[derive(Args)]
pub struct ExportArgs {
    /// The SAE: a run directory (or a sweep's SAE subdirectory).
    #[arg(value_name = "SAE_DIR")]
    sae: PathBuf,
    /// Which library's layout.
    #[arg(long, value_enum)]
    format: Format,
    /// Directory to write cfg.json and the weights into.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// SAELens: the model the activations came from (recorded in cfg.json's metadata).
    #[arg(long)]
    model_name: Option<String>,
    /// SAELens: the hook point the activations came from (recorded in cfg.json's metadata).
    #[arg(long)]
    hook_name: Option<String>,
    /// Under mpirun: each rank reads only its F/S latents of the SAE and writes them into the
    /// one export, for an SAE too large for a process (as `sae train --latent-shards`).
    #[arg(long, value_name = "S", default_value_t = 1, value_parser = at_least_one, allow_negative_numbers = true)]
    latent_shards: usize,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    /// SAELens: cfg.json + sae_weights.safetensors (standard, topk or jumprelu).
    Saelens,
    /// EleutherAI sparsify: cfg.json + sae.safetensors (TopK).
    Sparsify,
}

/// Runs `sae export`: in one process, or under mpirun with `--latent-shards` each rank
/// exporting its shard (rank 0 prints).
pub fn run(args: ExportArgs, world: &World) -> Result<Option<u8>> {
    let collective = world.collective();
    if args.latent_shards == 1 {
        super::alone(world, "export")?;
    }
    // Refused alike on every rank before any split: agreed, so one line reports it.
    let grid = Grid::new(collective.clone(), args.latent_shards).map_err(usage);
    let (grid, _) = agree(&*collective, grid, false)?;
    let loaded = Sae::load_shard(&args.sae, grid.shard, grid.shards).map_err(usage);
    let ((shard, global), _) = agree(&*collective, loaded, false)?;
    let (format, metadata) = match args.format {
        Format::Saelens => (
            ExportFormat::SaeLens,
            ExportMetadata {
                model_name: args.model_name,
                hook_name: args.hook_name,
            },
        ),
        Format::Sparsify => (ExportFormat::Sparsify, ExportMetadata::default()),
    };
    export_shard(&shard, &global, &grid, &args.out, format, &metadata).map_err(usage)?;
    if world.rank() == 0 {
        if let (Format::Sparsify, Architecture::BatchTopK { k }) = (args.format, global.arch) {
            println!(
                "note: sparsify has no threshold: the export encodes the top {k} codes of each \
                 row, where `sae encode` keeps the codes above θ"
            );
        }
        println!("wrote {}", args.out.display());
    }
    Ok(None)
}
