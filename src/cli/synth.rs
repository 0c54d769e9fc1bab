//! `sae synth`: a built-in synthetic dataset written out as .npy, with its true features and
//! the configuration that regenerates it.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use sparse_autoencoder::synth::{Synth, SynthConfig, SynthPreset};
use sparse_autoencoder::ConfigError;

use super::{at_least_one, usage, UsageError};

/// `sae synth`'s options; the defaults are `sae train`'s built-in dataset.
#[derive(Args)]
pub struct SynthArgs {
    /// Directory for activations.npy (N×D float32), true_features.npy (G×D float32) and
    /// synth.json (the configuration, from which `sae eval` regenerates the ground truth).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Which set: the options below override its values.
    #[arg(long, default_value = "default", value_parser = super::synth_preset_parser())]
    preset: SynthPreset,
    /// Rows N.
    #[arg(long, default_value_t = 100_000, value_parser = at_least_one, allow_negative_numbers = true)]
    rows: usize,
    /// Width D [default: 64; hard: 256].
    #[arg(long, allow_negative_numbers = true)]
    d_model: Option<usize>,
    /// True features G [default: 256; hard: 4096].
    #[arg(long, allow_negative_numbers = true)]
    n_features: Option<usize>,
    /// Mean active features per row [default: 5; hard: 25].
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

/// The file beside the true features that holds the set's configuration.
pub const CONFIG_FILE: &str = "synth.json";

/// Runs `sae synth`.
pub fn run(args: SynthArgs) -> Result<Option<u8>> {
    let defaults = args.preset.config();
    let config = SynthConfig {
        d_model: args.d_model.unwrap_or(defaults.d_model),
        n_features: args.n_features.unwrap_or(defaults.n_features),
        mean_active: args.mean_active.unwrap_or(defaults.mean_active),
        seed: args.seed.unwrap_or(defaults.seed),
        ..defaults
    };
    if let Err(err) = config.validate() {
        return Err(invalid(err, args.preset));
    }
    let synth = Synth::new(config).map_err(usage)?;
    let (acts, features, json) = (
        args.out.join("activations.npy"),
        args.out.join("true_features.npy"),
        args.out.join(CONFIG_FILE),
    );
    if !args.force && (acts.exists() || features.exists() || json.exists()) {
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
    let (mut index, mut fired) = (0u64, 0usize);
    while rows.len() < args.rows * d {
        let n = CHUNK.min(args.rows - rows.len() / d);
        let (x_bd, active) = synth.batch_with_active(n, index);
        rows.extend(x_bd.iter());
        fired += active.features.len();
        index += 1;
    }
    sparse_autoencoder::io::write_npy(&acts, &[args.rows as u64, d as u64], &rows)?;
    let true_gd = synth.true_features();
    sparse_autoencoder::io::write_npy(
        &features,
        &[true_gd.nrows() as u64, d as u64],
        &true_gd.iter().copied().collect::<Vec<_>>(),
    )?;
    let text = serde_json::to_string_pretty(synth.config())?;
    sparse_autoencoder::io::write_atomic(&json, text.as_bytes())?;
    println!(
        "wrote {} rows of width {d} ({} preset, {:.2} active features a row) to {}, the {} true \
         features to {} and the configuration to {}",
        args.rows,
        args.preset.as_str(),
        fired as f64 / args.rows as f64,
        acts.display(),
        true_gd.nrows(),
        features.display(),
        json.display()
    );
    Ok(None)
}

/// A configuration error as the option that set the field: the field leading the message
/// (`n_features must be …`), else one it names (`shared_rank must not exceed d_model`: the
/// preset's own fields are valid, so a conflict is the option's). Every message says the fix.
fn invalid(err: ConfigError, preset: SynthPreset) -> anyhow::Error {
    const FLAGS: [(&str, &str); 3] = [
        ("n_features", "--n-features"),
        ("mean_active", "--mean-active"),
        ("d_model", "--d-model"),
    ];
    let option = match &err {
        ConfigError::ZeroDModel => Some("--d-model"),
        ConfigError::Synth(message) => FLAGS
            .iter()
            .find(|(field, _)| message.starts_with(field))
            .or_else(|| FLAGS.iter().find(|(field, _)| message.contains(field)))
            .map(|&(_, flag)| flag),
        _ => None,
    };
    match option {
        Some(option) => UsageError(format!("invalid {option}: {err}")).into(),
        None => UsageError(format!(
            "invalid options for the {} preset: {err}",
            preset.as_str()
        ))
        .into(),
    }
}
