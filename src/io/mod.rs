//! Files: what the crate writes and reads on disk. It owns the atomic write every file goes
//! through, `.npy` arrays (whole, or appended batch by batch), an SAE saved and loaded
//! (`sae.safetensors` + `sae.json`), trainer checkpoints (`checkpoint.safetensors` +
//! `checkpoint.json`), exports to SAELens and EleutherAI sparsify, and sparse codes.
//!
//! ```
//! use sparse_autoencoder::{Architecture, Sae, SaeConfig};
//!
//! let dir = std::env::temp_dir().join(format!("sae-io-doc-{}", std::process::id()));
//! let config = SaeConfig { d_model: 8, dict_size: 32, arch: Architecture::TopK { k: 4 } };
//! let sae = Sae::new(config, 0)?;
//! sae.save(&dir)?;
//! assert_eq!(Sae::load(&dir)?, sae);
//! sparse_autoencoder::io::export_saelens(&sae, &dir.join("saelens"), &Default::default())?;
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # Ok::<(), sparse_autoencoder::Error>(())
//! ```

mod checkpoint;
mod codes;
mod export;
mod npy;
mod run_files;
mod sae_dir;
mod sliced;
mod tensors;

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub use checkpoint::{Checkpoint, CHECKPOINT_CONFIG_FILE, CHECKPOINT_WEIGHTS_FILE};
pub use codes::{CodesLayout, CodesWriter};
pub use export::{export_saelens, export_shard, export_sparsify, ExportFormat, ExportMetadata};
pub use npy::{write_npy, NpyAppender};
pub use run_files::{read_feature_density, read_metrics, MetricsRecord, METRICS_FILE};
pub(crate) use sae_dir::read_config;
pub use sae_dir::{CONFIG_FILE, WEIGHTS_FILE};
pub(crate) use sliced::LatentRows;
pub use sliced::{write_sliced, Slice};

use crate::error::{io_error, Result};

/// Writes `contents` to `path` so that readers see the old file or the new one, never part:
/// a temporary file beside it, flushed to disk, renamed over it, the directory synced.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    write_atomic_with(path, |out| out.write_all(contents))
}

/// [`write_atomic`] for contents produced by `write` into a buffered writer, so large files
/// are never held whole in memory.
pub(crate) fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    let tmp = tmp_path(path);
    let file = fs::File::create(&tmp).map_err(io_error(&tmp, "creating"))?;
    let mut out = BufWriter::new(file);
    let written = write(&mut out)
        .and_then(|()| out.flush())
        .and_then(|()| out.get_ref().sync_all());
    if let Err(err) = written {
        // A half-written temporary file is of no use to anyone.
        let _ = fs::remove_file(&tmp);
        return Err(io_error(&tmp, "writing")(err));
    }
    drop(out);
    commit(&tmp, path)
}

/// Renames the finished temporary file `tmp` over `path` and makes the rename durable.
fn commit(tmp: &Path, path: &Path) -> Result<()> {
    fs::rename(tmp, path).map_err(io_error(path, "renaming into place"))?;
    sync_dir(path.parent().unwrap_or(Path::new("")));
    Ok(())
}

/// The temporary file a write to `path` goes through: beside it, so the rename stays on one
/// filesystem (and so is atomic).
fn tmp_path(path: &Path) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    PathBuf::from(tmp)
}

/// Makes renames in `dir` durable. Best effort: some filesystems refuse to sync a directory,
/// and the data itself was synced before the rename.
pub(crate) fn sync_dir(dir: &Path) {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Creates `dir` and its parents, naming it in the error.
fn create_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(io_error(dir, "creating"))
}

/// Writes each latent's firing frequency on the evaluation rows (from
/// [`crate::eval::EvalStats::firing_frequency_f`]) as a 1-D float32 `.npy`, the
/// `feature_density.npy` that [`read_feature_density`] reads.
pub fn write_feature_density(path: &Path, stats: &crate::eval::EvalStats) -> Result<()> {
    let density_f: Vec<f32> = stats
        .firing_frequency_f()
        .iter()
        .map(|&p| p as f32)
        .collect();
    write_npy(path, &[density_f.len() as u64], &density_f)
}
