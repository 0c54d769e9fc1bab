//! `sae export`: an SAE in SAELens' or EleutherAI sparsify's layout.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};
use sparse_autoencoder::io::{export_saelens, export_sparsify, ExportMetadata};
use sparse_autoencoder::{Architecture, Sae};

use super::usage;

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
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    /// SAELens: cfg.json + sae_weights.safetensors (standard, topk or jumprelu).
    Saelens,
    /// EleutherAI sparsify: cfg.json + sae.safetensors (TopK).
    Sparsify,
}

/// Runs `sae export`.
pub fn run(args: ExportArgs) -> Result<Option<u8>> {
    let sae = Sae::load(&args.sae).map_err(usage)?;
    match args.format {
        Format::Saelens => {
            let metadata = ExportMetadata {
                model_name: args.model_name,
                hook_name: args.hook_name,
            };
            export_saelens(&sae, &args.out, &metadata).map_err(usage)?;
        }
        Format::Sparsify => {
            export_sparsify(&sae, &args.out).map_err(usage)?;
            if let Architecture::BatchTopK { k } = sae.config().arch {
                println!(
                    "note: sparsify has no threshold: the export encodes the top {k} codes of \
                     each row, where `sae encode` keeps the codes above θ"
                );
            }
        }
    }
    println!("wrote {}", args.out.display());
    Ok(None)
}
