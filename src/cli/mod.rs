//! What every subcommand shares: option parsers, and the split of errors into the user's
//! (one line, exit status 2) and the rest (status 1).

pub mod bench;
pub mod encode;
pub mod eval;
pub mod export;
pub mod plot;
pub mod synth;
pub mod train;

use std::fmt;

use sparse_autoencoder::data::DataError;
use sparse_autoencoder::dist::{agree, World};
use sparse_autoencoder::memory::{ByteSize, Knob};
use sparse_autoencoder::run::ArchName;
use sparse_autoencoder::synth::{Firing, SynthPreset};
use sparse_autoencoder::ConfigError;

pub fn at_least_one(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

pub fn fraction(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if (0.0..1.0).contains(&f) => Ok(f),
        Ok(_) => Err("must lie in [0, 1)".into()),
        Err(e) => Err(e.to_string()),
    }
}

pub fn at_least_one_u64(s: &str) -> std::result::Result<u64, String> {
    at_least_one(s).map(|n| n as u64)
}

/// Refuses to run `command` (one that writes files and splits no work) across the processes
/// of an MPI job: every process would write the same files.
pub fn alone(world: &World, command: &str) -> anyhow::Result<()> {
    let refusal = if world.is_distributed() {
        Err(UsageError(format!(
            "`sae {command}` runs in one process; start it without mpirun or srun (train, eval, \
             encode and bench run across processes, and export with --latent-shards)"
        ))
        .into())
    } else {
        Ok(())
    };
    agree(&*world.collective(), refusal, false).map(drop)
}

/// An error the user can fix on the command line: one line, exit status 2.
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// The command-line option behind a configuration field, for error messages.
fn option_for(err: &ConfigError) -> Option<&'static str> {
    use ConfigError as E;
    Some(match err {
        E::ZeroDictSize => "--dict-size",
        E::ZeroK | E::KAboveDictSize { .. } => "--k",
        E::DictSizeAndExpansion => "--expansion",
        E::StepsAndTokens => "--tokens",
        E::ZeroInterval("metrics_every") => "--metrics-every",
        E::ZeroInterval("checkpoint_every") => "--checkpoint-every",
        E::EvalFraction(_) => "--eval-fraction",
        E::ZeroTotalSteps | E::TooManySteps(_) => "--steps",
        E::LearningRate(_) => "--lr",
        E::L1Coefficient(_) => "--l1",
        E::AuxkAlpha(_) => "--auxk-alpha",
        E::ZeroDeadTokens => "--dead-tokens",
        E::ZeroInterval("resample_every") => "--resample",
        E::ResampleEncoderScale(_) => "--resample-encoder-scale",
        E::ThresholdStartNotBeforeEnd { .. } => "--threshold-start-step",
        E::Beta {
            name: "threshold_beta",
            ..
        } => "--threshold-beta",
        E::WarmupNotBeforeEnd { .. } => "--warmup-steps",
        E::TargetL0(_) => "--k",
        E::CalibrateWithoutThreshold(_) => "--threshold",
        E::L0Coefficient(_) => "--l0-coefficient",
        E::Bandwidth(_) => "--jumprelu-bandwidth",
        E::Groups {
            field: "group_sizes",
            ..
        } => "--group-sizes",
        E::Groups {
            field: "group_fractions",
            ..
        } => "--group-fractions",
        E::Groups {
            field: "group_weights",
            ..
        } => "--group-weights",
        E::ZeroBatchSize
        | E::TooLarge {
            field: "batch_size",
            ..
        } => "--batch-size",
        E::TooLarge {
            field: "dict_size", ..
        } => "--dict-size",
        E::TooLarge {
            field: "expansion", ..
        } => "--expansion",
        E::TooLarge {
            field: "buffer_rows",
            ..
        } => "--buffer-rows",
        E::BufferRows(_) => "--buffer-rows",
        E::DecayNotAfterWarmup { .. }
        | E::DecayNotBeforeEnd { .. }
        | E::DecayNotAfterSparsityWarmup { .. } => "--decay-start",
        _ => return None,
    })
}

/// The `sae train` option behind a part of a memory estimate.
fn train_option(knob: Knob) -> String {
    match knob {
        Knob::BatchSize => "--batch-size",
        Knob::DictSize => "--dict-size (or --expansion)",
        Knob::BatchAndDictSize => "--batch-size or --dict-size (or --expansion)",
        Knob::BufferRows => "--buffer-rows",
        Knob::Synthetic => "the [synthetic] sizes of --config",
    }
    .to_string()
}

/// Parses `--max-memory` (`8GiB`, `512MB`) for clap.
pub fn byte_size(s: &str) -> Result<ByteSize, String> {
    s.parse()
}

/// `--arch`'s parser: the names [`ArchName`] spells, each with its line in `--help`.
fn arch_parser() -> impl clap::builder::TypedValueParser<Value = ArchName> {
    use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
    let names = ArchName::ALL.map(|a| PossibleValue::new(a.as_str()).help(a.description()));
    PossibleValuesParser::new(names).map(|name| name.parse().expect("one of the possible values"))
}

/// `--preset`'s and `--synth-preset`'s parser: the names [`SynthPreset`] spells, each with
/// its line in `--help`.
fn synth_preset_parser() -> impl clap::builder::TypedValueParser<Value = SynthPreset> {
    use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
    let names = SynthPreset::ALL.map(|p| PossibleValue::new(p.as_str()).help(p.description()));
    PossibleValuesParser::new(names).map(|name| name.parse().expect("one of the possible values"))
}

/// One line on how matched latents fire against their true features.
fn firing_line(firing: &Firing) -> String {
    format!(
        "firing of the matched latents on {} rows: F1 {:.3} (precision {:.3}, recall {:.3}); \
         F1 >= 0.5 for {:.1}% of the {} features that fired",
        firing.n_rows,
        firing.mean_f1,
        firing.mean_precision,
        firing.mean_recall,
        100.0 * firing.fraction_f1_above_0_5,
        firing.n_scored
    )
}

/// Parses `--device` (cpu, cuda, cuda:N) for clap, whose error then names the option.
fn parse_device(s: &str) -> Result<sparse_autoencoder::backend::Device, String> {
    s.parse()
        .map_err(|e: sparse_autoencoder::Error| e.to_string())
}

/// `--precision`'s values.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum PrecisionArg {
    /// f32 throughout.
    F32,
    /// The encoder GEMM in bfloat16 with f32 accumulation (CPUs with AVX-512 BF16).
    Bf16,
}

impl From<PrecisionArg> for sparse_autoencoder::Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::F32 => sparse_autoencoder::Precision::F32,
            PrecisionArg::Bf16 => sparse_autoencoder::Precision::Bf16,
        }
    }
}

/// `--device`, `--tf32` and `--precision`, for every command that encodes.
#[derive(clap::Args, Debug, Clone)]
pub struct DeviceArgs {
    /// Where the numbers run: cpu, cuda or cuda:N (a build with --features cuda). Not saved
    /// with a training run, which may resume on another device.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: sparse_autoencoder::backend::Device,
    /// On a GPU, let cuBLAS round the GEMMs' inputs to TF32 on tensor cores: several times
    /// faster, at about 1e-3 relative error per product [default: full f32].
    #[arg(long)]
    tf32: bool,
    /// How the encoder GEMM rounds: f32, or bf16 (x − b_dec and W_enc rounded to bfloat16,
    /// f32 accumulation, everything else f32; about twice the GEMM's speed on CPUs with
    /// AVX-512 BF16). In `sae train` it sets every SAE's `precision` and is saved with the
    /// run; `sae bench` times bf16 beside f32 [default: f32; a resumed run keeps its own].
    #[arg(long, value_enum)]
    precision: Option<PrecisionArg>,
}

impl DeviceArgs {
    /// The device asked for; `--tf32` without a GPU, or `--precision bf16` with one, is a
    /// usage error.
    pub fn device(&self) -> anyhow::Result<sparse_autoencoder::backend::Device> {
        let precision = self.precision().unwrap_or_default();
        self.device.check_precision(precision)?;
        self.device
            .with_tf32(self.tf32)
            .map_err(|e| UsageError(format!("invalid --tf32: {e}")).into())
    }

    /// The precision asked for, if any.
    pub fn precision(&self) -> Option<sparse_autoencoder::Precision> {
        self.precision.map(Into::into)
    }

    /// Sets `sae` to the precision asked for (f32 when none was); bf16 on a CPU without it
    /// is an error naming `--precision`.
    pub fn set_precision(&self, sae: &mut sparse_autoencoder::Sae) -> anyhow::Result<()> {
        Ok(sae.set_precision(self.precision().unwrap_or_default())?)
    }
}

/// Turns a library validation error into a [`UsageError`] that names the option.
pub fn usage(err: sparse_autoencoder::Error) -> anyhow::Error {
    match &err {
        sparse_autoencoder::Error::Config(config) => match option_for(config) {
            Some(option) => UsageError(format!("invalid {option}: {config}")).into(),
            None => UsageError(format!("invalid configuration: {config}")).into(),
        },
        sparse_autoencoder::Error::Data(data @ DataError::EvalFraction { .. }) => {
            UsageError(format!("invalid --eval-fraction: {data}")).into()
        }
        sparse_autoencoder::Error::Memory(memory) => UsageError(format!(
            "the run {}",
            memory.describe(train_option, "--max-memory")
        ))
        .into(),
        _ => err.into(),
    }
}

pub fn exit_status(err: &anyhow::Error) -> u8 {
    if err.downcast_ref::<UsageError>().is_some()
        || err.downcast_ref::<sparse_autoencoder::Error>().is_some()
        || err.downcast_ref::<DataError>().is_some()
        || err.downcast_ref::<ConfigError>().is_some()
    {
        2
    } else {
        1
    }
}

/// The line `main` prints for `err`: its message and each cause the message does not already
/// hold (library errors such as `Error::Io` print their OS error themselves, and anyhow's
/// chain would repeat it), on one line.
pub fn error_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    one_line(&line)
}

/// `text` as one line that is safe on a terminal: lines joined with "; " and every other
/// control character written as `\u{1b}` (an ESC from a file's header or name could otherwise
/// clear the screen or retitle the terminal).
pub fn one_line(text: &str) -> String {
    let joined = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    joined
        .chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_os_error_is_printed_once() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let err = sparse_autoencoder::Error::Io {
            path: "x.npy".into(),
            action: "reading",
            source: io,
        };
        let line = error_line(&anyhow::Error::from(err).context("opening the data"));
        assert_eq!(line.matches("not found").count(), 1, "{line}");
        assert!(
            line.starts_with("opening the data: x.npy: reading failed"),
            "{line}"
        );
    }

    #[test]
    fn lines_are_joined_and_control_characters_escaped() {
        let line = one_line("bad header\n  ^ here\n\nfile \u{1b}[2J.npy\tend\r\n");
        assert_eq!(line, "bad header; ^ here; file \\u{1b}[2J.npy\\u{9}end");
        assert!(line.bytes().all(|b| b >= 0x20), "{line}");
    }
}
