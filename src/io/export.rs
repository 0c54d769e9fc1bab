//! An SAE written in the layouts the Python ecosystem loads: SAELens and EleutherAI's sparsify.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use ndarray::{Array1, Array2};
use serde_json::json;

use super::sliced::{write_by_shards, LatentRows, SlicesOut};
use super::tensors::standard;
use crate::config::{Architecture, SaeConfig};
use crate::dist::{agree, Collective, Grid, SingleProcess};
use crate::error::{io_error, Error, Result};
use crate::Sae;

/// Names SAELens records about where the activations came from.
#[derive(Clone, Debug, Default)]
pub struct ExportMetadata {
    /// The model (for example `gpt2`).
    pub model_name: Option<String>,
    /// The hook point (for example `blocks.6.hook_resid_post`).
    pub hook_name: Option<String>,
}

fn refuse(dir: &Path, reason: String) -> Error {
    Error::RunDir {
        path: dir.to_path_buf(),
        reason,
    }
}

/// The layouts an SAE exports to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// SAELens' (see [`export_saelens`]).
    SaeLens,
    /// EleutherAI sparsify's (see [`export_sparsify`]).
    Sparsify,
}

/// `cfg.json`, by the process that writes the shared tensors; its outcome is every process's.
fn write_json(
    dir: &Path,
    value: &serde_json::Value,
    rows: LatentRows,
    collective: &dyn Collective,
) -> Result<()> {
    let written = if rows.writes_shared {
        let text = serde_json::to_string_pretty(value).expect("JSON values serialise");
        super::write_atomic(&dir.join("cfg.json"), text.as_bytes())
    } else {
        Ok(())
    };
    agree(collective, written, false).map(|((), _)| ())
}

/// [`export_saelens`] or [`export_sparsify`] of a latent shard of the SAE `global`
/// configures, sharded over `grid` (as [`Sae::load_shard`] reads it): every rank calls it and
/// the shards of group 0 write their rows (SAELens' W_enc: their columns) of the one weights
/// file, byte for byte the whole SAE's export; no rank holds more than its shard. An error
/// on any rank is every rank's.
pub fn export_shard(
    shard: &Sae,
    global: &SaeConfig,
    grid: &Grid,
    dir: &Path,
    format: ExportFormat,
    metadata: &ExportMetadata,
) -> Result<()> {
    let (f, held) = (global.dict_size, shard.config().dict_size);
    write_by_shards(grid, f, held, "SAE", |rows| {
        export_rows(shard, rows, dir, format, metadata, &*grid.latent)
    })
}

/// The export in `format` of the SAE of which `sae` holds latents `rows`, the other
/// processes of `collective` the rest.
fn export_rows(
    sae: &Sae,
    rows: LatentRows,
    dir: &Path,
    format: ExportFormat,
    metadata: &ExportMetadata,
    collective: &dyn Collective,
) -> Result<()> {
    match format {
        ExportFormat::SaeLens => saelens_rows(sae, rows, dir, metadata, collective),
        ExportFormat::Sparsify => sparsify_rows(sae, rows, dir, collective),
    }
}

/// Writes `sae` as SAELens loads it (`SAE.load_from_disk(dir)`): `cfg.json` and
/// `sae_weights.safetensors` with `W_enc` [d_in, d_sae], `b_enc`, `W_dec` [d_sae, d_in],
/// `b_dec`. ReLU SAEs are `standard`, TopK `topk` with its k, JumpReLU `jumprelu` with its
/// learned `threshold` (and `apply_b_dec_to_input` false: it encodes x itself), and BatchTopK
/// `jumprelu` with θ as every latent's `threshold` (its inference rule: codes above θ). Any normalisation is
/// already folded into the weights, so `normalize_activations` is `none`.
pub fn export_saelens(sae: &Sae, dir: &Path, metadata: &ExportMetadata) -> Result<()> {
    let rows = LatentRows::whole(sae.config().dict_size);
    export_rows(
        sae,
        rows,
        dir,
        ExportFormat::SaeLens,
        metadata,
        &SingleProcess,
    )
}

fn saelens_rows(
    sae: &Sae,
    rows: LatentRows,
    dir: &Path,
    metadata: &ExportMetadata,
    collective: &dyn Collective,
) -> Result<()> {
    let (f, d) = (rows.f, sae.config().d_model);
    let architecture = sae.config().arch.saelens_name();
    let extra = match sae.config().arch {
        Architecture::TopK { k } => Some(("k", json!(k))),
        Architecture::Relu { .. }
        | Architecture::BatchTopK { .. }
        | Architecture::JumpRelu
        | Architecture::Matryoshka { .. } => None,
    };
    let threshold_f = match (sae.config().arch, sae.threshold()) {
        (Architecture::JumpRelu, _) => Some(sae.latent_thresholds().to_owned()),
        (Architecture::BatchTopK { .. } | Architecture::Matryoshka { .. }, Some(theta)) => {
            Some(Array1::from_elem(sae.config().dict_size, theta))
        }
        (Architecture::BatchTopK { .. } | Architecture::Matryoshka { .. }, None) => {
            return Err(refuse(
                dir,
                "this SAE has no threshold θ yet (training stopped before \
                 threshold_start_step), so it has no fixed encoding to export; train longer"
                    .into(),
            ))
        }
        _ => None,
    };
    fs::create_dir_all(dir).map_err(io_error(dir, "creating"))?;
    // This process's columns of W_enc [d_in, d_sae]: the one copy an export makes.
    let w_enc_df: Array2<f32> = sae.w_enc_fd().t().as_standard_layout().into_owned();
    let mut tensors = SlicesOut::new(rows);
    tensors.latents_f32_transposed("W_enc", d, standard(&w_enc_df));
    tensors.latents_f32("b_enc", None, standard(&sae.b_enc_f));
    tensors.latents_f32("W_dec", Some(d), standard(&sae.w_dec_fd));
    tensors.shared_f32("b_dec", &[d], standard(&sae.b_dec_d));
    if let Some(threshold_f) = &threshold_f {
        tensors.latents_f32("threshold", None, standard(threshold_f));
    }
    tensors.write(&dir.join("sae_weights.safetensors"), None, collective)?;
    let mut cfg = json!({
        "architecture": architecture,
        "d_in": d,
        "d_sae": f,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": sae.config().arch.centres_input(),
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            // SAELens reads cfg.json in its 6.x layout (this one) only when the metadata
            // names a version >= 6; otherwise it converts from the older flat layout and
            // drops this metadata, model and hook names included.
            "sae_lens_version": "6.0.0",
            "model_name": metadata.model_name,
            "hook_name": metadata.hook_name,
            "sae_lens_training_version": null,
            "trained_with": format!("sparse-autoencoder {}", env!("CARGO_PKG_VERSION")),
        },
    });
    if let Some((key, value)) = extra {
        cfg[key] = value;
    }
    write_json(dir, &cfg, rows, collective)
}

/// Writes `sae` as EleutherAI's sparsify loads it (`Sae.load_from_disk(dir)`): `cfg.json` and
/// `sae.safetensors` with `encoder.weight` [F, D], `encoder.bias`, `W_dec` [F, D], `b_dec`.
/// sparsify's SAEs are TopK only: a TopK SAE exports exactly; a BatchTopK SAE exports as
/// per-row top-k with its k (sparsify has no threshold: its codes then differ from `sae
/// encode`'s, which keeps codes above θ); a ReLU SAE has no sparsify equivalent and is refused.
pub fn export_sparsify(sae: &Sae, dir: &Path) -> Result<()> {
    let rows = LatentRows::whole(sae.config().dict_size);
    let none = ExportMetadata::default();
    export_rows(
        sae,
        rows,
        dir,
        ExportFormat::Sparsify,
        &none,
        &SingleProcess,
    )
}

fn sparsify_rows(
    sae: &Sae,
    rows: LatentRows,
    dir: &Path,
    collective: &dyn Collective,
) -> Result<()> {
    let (f, d) = (rows.f, sae.config().d_model);
    let k = match sae.config().arch {
        Architecture::TopK { k }
        | Architecture::BatchTopK { k }
        | Architecture::Matryoshka { k } => k,
        arch @ (Architecture::Relu { .. } | Architecture::JumpRelu) => {
            return Err(refuse(
                dir,
                format!(
                    "sparsify only has TopK SAEs and this one is {}; export it with --format \
                     saelens instead",
                    arch.name()
                ),
            ))
        }
    };
    fs::create_dir_all(dir).map_err(io_error(dir, "creating"))?;
    let mut tensors = SlicesOut::new(rows);
    tensors.latents_f32("encoder.weight", Some(d), standard(&sae.w_enc_fd));
    tensors.latents_f32("encoder.bias", None, standard(&sae.b_enc_f));
    tensors.latents_f32("W_dec", Some(d), standard(&sae.w_dec_fd));
    tensors.shared_f32("b_dec", &[d], standard(&sae.b_dec_d));
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    tensors.write(&dir.join("sae.safetensors"), Some(metadata), collective)?;
    let cfg = json!({
        "d_in": d,
        "num_latents": f,
        "expansion_factor": f / d.max(1),
        "k": k,
        "normalize_decoder": true,
        "multi_topk": false,
        "skip_connection": false,
    });
    write_json(dir, &cfg, rows, collective)
}
