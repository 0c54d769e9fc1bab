//! `sae plot`: redraws a run's plots from its metrics and feature density.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::UsageError;

/// `sae plot`'s options.
#[derive(Args)]
pub struct PlotArgs {
    /// A run directory; for a sweep, every SAE subdirectory is redrawn.
    #[arg(value_name = "RUN_DIR")]
    run: PathBuf,
}

/// Runs `sae plot`.
pub fn run(args: PlotArgs) -> Result<Option<u8>> {
    let mut dirs = Vec::new();
    if args.run.join("metrics.jsonl").is_file() {
        dirs.push(args.run.clone());
    } else if let Ok(entries) = std::fs::read_dir(&args.run) {
        let mut subdirs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("metrics.jsonl").is_file())
            .collect();
        subdirs.sort();
        dirs.extend(subdirs);
    }
    if dirs.is_empty() {
        return Err(UsageError(format!(
            "{}: no metrics.jsonl here or in its subdirectories; give a run directory",
            args.run.display()
        ))
        .into());
    }
    for dir in dirs {
        let drawn = sparse_autoencoder::plot::redraw(&dir)?;
        if let Some(note) = &drawn.note {
            println!("{note}");
        }
        println!("wrote {}", drawn.curves.display());
        if let Some(density) = drawn.density {
            println!("wrote {}", density.display());
        }
    }
    Ok(None)
}
