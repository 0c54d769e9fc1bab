//! An SAE written in the layouts the Python ecosystem loads: SAELens and EleutherAI's sparsify.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use ndarray::Array2;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;

use crate::config::Architecture;
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

fn bytes<D: ndarray::Dimension>(a: &ndarray::Array<f32, D>) -> &[u8] {
    bytemuck::cast_slice(a.as_slice().expect("standard layout"))
}

fn write_tensors(
    dir: &Path,
    file: &str,
    tensors: Vec<(&str, Vec<usize>, &[u8])>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let path = dir.join(file);
    let views = tensors.into_iter().map(|(name, shape, data)| {
        (
            name,
            TensorView::new(Dtype::F32, shape, data).expect("shapes match their data"),
        )
    });
    let encoded = safetensors::serialize(views, metadata).map_err(|err| Error::RunDir {
        path: path.clone(),
        reason: format!("cannot encode the weights: {err}"),
    })?;
    super::write_atomic(&path, &encoded)
}

fn write_json(dir: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialise");
    super::write_atomic(&dir.join("cfg.json"), text.as_bytes())
}

/// Writes `sae` as SAELens loads it (`SAE.load_from_disk(dir)`): `cfg.json` and
/// `sae_weights.safetensors` with `W_enc` [d_in, d_sae], `b_enc`, `W_dec` [d_sae, d_in],
/// `b_dec`. ReLU SAEs are `standard`, TopK `topk` with its k, JumpReLU `jumprelu` with its
/// learned `threshold` (and `apply_b_dec_to_input` false: it encodes x itself), and BatchTopK
/// `jumprelu` with θ as every latent's `threshold` (its inference rule: codes above θ). Any normalisation is
/// already folded into the weights, so `normalize_activations` is `none`.
pub fn export_saelens(sae: &Sae, dir: &Path, metadata: &ExportMetadata) -> Result<()> {
    let (f, d) = (sae.config().dict_size, sae.config().d_model);
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
            Some(ndarray::Array1::from_elem(f, theta))
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
    let w_enc_df: Array2<f32> = sae.w_enc_fd().t().as_standard_layout().into_owned();
    let (b_enc_f, w_dec_fd, b_dec_d) = (
        sae.b_enc_f().to_owned(),
        sae.w_dec_fd().to_owned(),
        sae.b_dec_d().to_owned(),
    );
    let mut tensors = vec![
        ("W_enc", vec![d, f], bytes(&w_enc_df)),
        ("b_enc", vec![f], bytes(&b_enc_f)),
        ("W_dec", vec![f, d], bytes(&w_dec_fd)),
        ("b_dec", vec![d], bytes(&b_dec_d)),
    ];
    if let Some(threshold_f) = &threshold_f {
        tensors.push(("threshold", vec![f], bytes(threshold_f)));
    }
    write_tensors(dir, "sae_weights.safetensors", tensors, None)?;
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
    write_json(dir, &cfg)
}

/// Writes `sae` as EleutherAI's sparsify loads it (`Sae.load_from_disk(dir)`): `cfg.json` and
/// `sae.safetensors` with `encoder.weight` [F, D], `encoder.bias`, `W_dec` [F, D], `b_dec`.
/// sparsify's SAEs are TopK only: a TopK SAE exports exactly; a BatchTopK SAE exports as
/// per-row top-k with its k (sparsify has no threshold: its codes then differ from `sae
/// encode`'s, which keeps codes above θ); a ReLU SAE has no sparsify equivalent and is refused.
pub fn export_sparsify(sae: &Sae, dir: &Path) -> Result<()> {
    let (f, d) = (sae.config().dict_size, sae.config().d_model);
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
    let (w_enc_fd, b_enc_f, w_dec_fd, b_dec_d) = (
        sae.w_enc_fd().to_owned(),
        sae.b_enc_f().to_owned(),
        sae.w_dec_fd().to_owned(),
        sae.b_dec_d().to_owned(),
    );
    let tensors = vec![
        ("encoder.weight", vec![f, d], bytes(&w_enc_fd)),
        ("encoder.bias", vec![f], bytes(&b_enc_f)),
        ("W_dec", vec![f, d], bytes(&w_dec_fd)),
        ("b_dec", vec![d], bytes(&b_dec_d)),
    ];
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_tensors(dir, "sae.safetensors", tensors, Some(metadata))?;
    let cfg = json!({
        "d_in": d,
        "num_latents": f,
        "expansion_factor": f / d.max(1),
        "k": k,
        "normalize_decoder": true,
        "multi_topk": false,
        "skip_connection": false,
    });
    write_json(dir, &cfg)
}
