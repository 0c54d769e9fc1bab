//! `sae train`: flags and config file merged into a [`RunSpec`], sweeps expanded, the run
//! driven with a progress bar (or log lines), Ctrl-C and SIGTERM turned into a checkpoint.

use sparse_autoencoder::dist::{agree, Grid, World};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use sparse_autoencoder::backend::bf16::Bf16Kernel;
use sparse_autoencoder::data::DataError;
use sparse_autoencoder::plot;
use sparse_autoencoder::run::{
    ArchName, Observer, Outcome, Progress, ResumeOptions, Run, RunSpec, SaeSpec, Summary,
};
use sparse_autoencoder::{Precision, ReluVariant, ThresholdRule};

use super::{at_least_one, at_least_one_u64, fraction, usage, UsageError};

/// Exit status of a run stopped by Ctrl-C (128 + SIGINT, as shells report it).
pub const INTERRUPTED: u8 = 130;
/// Exit status of a run stopped by SIGTERM (`kill`, Slurm at the time limit): 128 + 15.
pub const TERMINATED: u8 = 143;

/// SIGINT and SIGTERM as flags: both ask the run to stop (it then writes a checkpoint), and
/// `terminated` tells which came, for the exit status.
struct Signals {
    stop: Arc<AtomicBool>,
    terminated: Arc<AtomicBool>,
    /// While set (until training starts), a signal ends the process at once with 130 or 143:
    /// there is no trained state to save, and opening the data may take long. Files written
    /// by then are whole (config.toml goes through `write_atomic`); the run directory has no
    /// checkpoint, so it is started again, not resumed.
    exit_at_once: Arc<AtomicBool>,
}

impl Signals {
    fn install() -> Result<Signals> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let signals = Signals {
            stop: Arc::new(AtomicBool::new(false)),
            terminated: Arc::new(AtomicBool::new(false)),
            exit_at_once: Arc::new(AtomicBool::new(true)),
        };
        for (signal, status) in [(SIGINT, INTERRUPTED), (SIGTERM, TERMINATED)] {
            signal_hook::flag::register_conditional_shutdown(
                signal,
                status.into(),
                signals.exit_at_once.clone(),
            )
            .context("installing the signal handlers")?;
            // Once training runs, a second signal only sets the flag again: it cannot cut
            // short the checkpoint the first one asked for.
            signal_hook::flag::register(signal, signals.stop.clone())
                .context("installing the signal handlers")?;
        }
        signal_hook::flag::register(SIGTERM, signals.terminated.clone())
            .context("installing the signal handlers")?;
        Ok(signals)
    }

    /// From now on a signal stops the run at the next step, with a checkpoint.
    fn training_starts(&self) {
        self.exit_at_once.store(false, Ordering::SeqCst);
    }

    /// The exit status of a run the signals stopped.
    fn status(&self) -> u8 {
        if self.terminated.load(Ordering::SeqCst) {
            TERMINATED
        } else {
            INTERRUPTED
        }
    }
}

/// `sae train`'s options. Each overrides the config file's value; list options (`--k 32,64`)
/// make a sweep: one SAE per combination, all trained on the same batches.
#[derive(Args)]
pub struct TrainArgs {
    /// A TOML run configuration ([data], [train], [[sae]] tables; see the README). The
    /// `config.toml` a run writes is one: passing it back repeats the run.
    #[arg(long, value_name = "FILE", help_heading = "Run")]
    config: Option<PathBuf>,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    optim: OptimArgs,
    #[command(flatten)]
    run: RunArgs,
}

/// Where the activations come from.
#[derive(Args)]
#[command(next_help_heading = "Data")]
struct DataArgs {
    /// Activations to train on: .npy files, directories of them, or glob patterns such as
    /// 'acts/*.npy'. float32, float16 or float64, shaped [..., d_model] (a [seq, tok, D] dump is
    /// seq·tok rows). Without --data, trains on built-in synthetic data and reports how many of
    /// its known features the SAE recovered.
    #[arg(long, num_args = 1.., value_name = "PATH")]
    data: Vec<PathBuf>,
    /// Held-out activations to evaluate on, in the same forms as --data.
    #[arg(long, num_args = 1.., value_name = "PATH", conflicts_with = "eval_fraction")]
    eval_data: Vec<PathBuf>,
    /// Fraction of the --data rows held out for evaluation, never trained on; 0 disables
    /// [default: 0.01].
    #[arg(long, value_parser = fraction, allow_negative_numbers = true)]
    eval_fraction: Option<f64>,
    /// Train on the activations scaled to mean norm √d_model (the scale the default learning
    /// rate and L1 coefficient assume) and fold the scale into the saved SAE, which then takes
    /// raw activations.
    #[arg(long)]
    normalize: bool,
    /// Skip rows holding NaN or Inf (and report how many) instead of stopping at the first.
    #[arg(long)]
    skip_non_finite: bool,
    /// Rows of the shuffle buffer [default: 2^20, or what fits 4 GiB, or the whole dataset].
    #[arg(long, allow_negative_numbers = true)]
    buffer_rows: Option<usize>,
    /// Without --data: which built-in synthetic set to train on (a [synthetic] table's
    /// `preset`); hard also sizes the SAE to it (F = 4096, k = 32) [default: default].
    #[arg(long, value_name = "PRESET", value_parser = super::synth_preset_parser())]
    synth_preset: Option<sparse_autoencoder::synth::SynthPreset>,
}

/// The SAE's shape and sparsity rule.
#[derive(Args)]
#[command(next_help_heading = "Model")]
struct ModelArgs {
    /// Sparsity rule [default: batchtopk].
    #[arg(long, value_parser = super::arch_parser())]
    arch: Option<ArchName>,
    /// Active latents per row (topk; batchtopk and matryoshka: on average; jumprelu: the L0
    /// its penalty aims at); a list sweeps [default: 8 on synthetic data, 32 with
    /// --synth-preset hard, 64 with --data].
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    k: Vec<usize>,
    /// Number of latents F; a list sweeps [default: 512 on synthetic data, 4096 with
    /// --synth-preset hard, 8·d_model with --data].
    #[arg(
        long,
        value_delimiter = ',',
        allow_negative_numbers = true,
        conflicts_with = "expansion"
    )]
    dict_size: Vec<usize>,
    /// F as a multiple of d_model, instead of --dict-size; a list sweeps.
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    expansion: Vec<usize>,
    /// ReLU only: which L1 formulation [default: decoder_norm].
    #[arg(long, value_enum)]
    relu_variant: Option<Variant>,
}

/// The training recipe.
#[derive(Args)]
#[command(next_help_heading = "Training")]
struct OptimArgs {
    /// Rows per training batch [default: 1024 on synthetic data, 4096 with --data].
    #[arg(long, value_parser = at_least_one, allow_negative_numbers = true)]
    batch_size: Option<usize>,
    /// Training steps [default: 3000 on synthetic data, 10000 with --data].
    #[arg(long, allow_negative_numbers = true, conflicts_with = "tokens")]
    steps: Option<u64>,
    /// Training rows, instead of --steps: the run takes ⌈tokens / batch size⌉ steps.
    #[arg(long, allow_negative_numbers = true)]
    tokens: Option<u64>,
    /// Peak learning rate; a list sweeps [default: 5e-3 on synthetic data; with --data
    /// 2e-4/√(F/2¹⁴) for topk and batchtopk, 5e-5 for relu].
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    lr: Vec<f32>,
    /// ReLU only: L1 coefficient λ; a list sweeps [default: 0.3 on synthetic data, 5 with
    /// --data].
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    l1: Vec<f32>,
    /// Linear learning-rate warm-up, in steps [default: min(1000, steps/10); 100 at most on
    /// synthetic data].
    #[arg(long, allow_negative_numbers = true)]
    warmup_steps: Option<u64>,
    /// Step from which the learning rate decays linearly to 0 [default: 80% of steps].
    #[arg(long, allow_negative_numbers = true)]
    decay_start: Option<u64>,
    /// topk and batchtopk: weight α of the AuxK loss on dead latents [default: 1/32].
    #[arg(long, allow_negative_numbers = true)]
    auxk_alpha: Option<f32>,
    /// Tokens without firing after which a latent counts as dead (AuxK's latents, and the dead
    /// fraction reported) [default: 20 batches on synthetic data; with --data a tenth of the
    /// run's tokens, at most 10M].
    #[arg(long, allow_negative_numbers = true)]
    dead_tokens: Option<u64>,
    /// batchtopk: θ's moving average updates on the steps after this one [default:
    /// min(1000, steps/2)].
    #[arg(long, allow_negative_numbers = true)]
    threshold_start_step: Option<u64>,
    /// batchtopk: weight β of the old θ in its moving average, in [0, 1) [default: 0.999].
    #[arg(long, allow_negative_numbers = true)]
    threshold_beta: Option<f64>,
    /// batchtopk and matryoshka: how the saved θ is set: ema (the moving average of training,
    /// the reference's) or calibrate (the k·N-th largest code of 65,536 rows drawn at the end)
    /// [default: ema].
    #[arg(long, value_enum)]
    threshold: Option<Threshold>,
    /// jumprelu: coefficient c of the penalty c·(L0/k − 1)² [default: 1].
    #[arg(long, allow_negative_numbers = true)]
    l0_coefficient: Option<f32>,
    /// jumprelu: bandwidth ε of the thresholds' straight-through estimator [default: 0.001].
    #[arg(long, allow_negative_numbers = true)]
    jumprelu_bandwidth: Option<f32>,
    /// matryoshka: the nested groups' sizes in latents, summing to --dict-size (one list, not
    /// a sweep) [default: from --group-fractions].
    #[arg(
        long,
        value_delimiter = ',',
        allow_negative_numbers = true,
        conflicts_with = "group_fractions"
    )]
    group_sizes: Vec<usize>,
    /// matryoshka: the fraction of the dictionary in each group, summing to 1 [default:
    /// 1/32,1/16,1/8,1/4,17/32].
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    group_fractions: Vec<f64>,
    /// matryoshka: each prefix's weight in the loss, one per group [default: 1/G each].
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    group_weights: Vec<f32>,
    /// Every this many steps, re-initialise the latents dead for --dead-tokens towards the
    /// batch rows reconstructed worst, while that many steps remain (Anthropic 2023's
    /// resampling; CPU only) [default: never].
    #[arg(long, value_name = "STEPS", allow_negative_numbers = true)]
    resample: Option<u64>,
    /// With --resample: a new encoder row's norm as a multiple of the live latents' mean
    /// [default: 0.2].
    #[arg(long, requires = "resample", allow_negative_numbers = true)]
    resample_encoder_scale: Option<f32>,
    /// Seed of the SAE's initialisation, the batch order and the synthetic data [default: 0].
    #[arg(long, allow_negative_numbers = true)]
    seed: Option<u64>,
}

/// How the run executes, where it writes, and how it reports.
#[derive(Args)]
#[command(next_help_heading = "Run")]
struct RunArgs {
    /// Run directory [default: runs/<date>-<time>].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Write into --out even if it holds another run (that run's files are replaced).
    #[arg(long)]
    force: bool,
    /// Continue the interrupted run in DIR from its checkpoint, with its own configuration.
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with_all = ["config", "data", "eval_data", "eval_fraction", "normalize",
            "buffer_rows", "synth_preset", "arch", "k", "dict_size", "expansion",
            "relu_variant", "batch_size", "steps", "tokens", "lr", "l1", "warmup_steps",
            "decay_start", "auxk_alpha", "dead_tokens", "threshold_start_step",
            "threshold_beta", "threshold", "l0_coefficient", "jumprelu_bandwidth", "group_sizes", "group_fractions", "group_weights", "resample",
            "resample_encoder_scale", "precision", "seed", "out",
            "force", "checkpoint_every", "metrics_every",
            "max_memory"]
    )]
    resume: Option<PathBuf>,
    /// Write a checkpoint every this many steps (one is always written on Ctrl-C).
    #[arg(long, value_parser = at_least_one_u64, allow_negative_numbers = true)]
    checkpoint_every: Option<u64>,
    /// Steps between lines of metrics.jsonl [default: 10].
    #[arg(long, value_parser = at_least_one_u64, allow_negative_numbers = true)]
    metrics_every: Option<u64>,
    /// Memory the run may use, such as 8GiB or 500MB; a run whose estimated need exceeds it
    /// is refused before it allocates [default: what the machine, its cgroup and ulimit -v
    /// leave free]. Saved in config.toml as [train] max_memory.
    #[arg(long, value_name = "SIZE", value_parser = super::byte_size)]
    max_memory: Option<sparse_autoencoder::memory::ByteSize>,
    /// Worker threads for the GEMMs and the rest of the step [default: all cores].
    #[arg(long, value_parser = at_least_one, allow_negative_numbers = true)]
    threads: Option<usize>,
    /// Under mpirun: shard each SAE's latents over groups of this many ranks (it must divide
    /// the rank count and the dictionary size); each group trains on its part of every batch,
    /// each rank holds F/S latents. A run resumes with any shard count [default: 1].
    #[arg(long, value_name = "S", value_parser = at_least_one, allow_negative_numbers = true)]
    latent_shards: Option<usize>,
    #[command(flatten)]
    device: super::DeviceArgs,
    /// When output is not a terminal, print a progress line every this many steps [default:
    /// about 20 lines a run].
    #[arg(long, value_parser = at_least_one_u64, allow_negative_numbers = true)]
    log_every: Option<u64>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Threshold {
    /// The moving average of each batch's smallest kept code (dictionary_learning).
    Ema,
    /// Set at the end of training from 65,536 rows of the training data.
    Calibrate,
}

#[derive(Clone, Copy, ValueEnum)]
enum Variant {
    /// Penalty f_j·‖W_dec[j]‖, free decoder, gradient clipping (StandardTrainerAprilUpdate).
    #[value(name = "decoder_norm", alias = "decoder-norm")]
    DecoderNorm,
    /// Penalty f_j, unit-norm decoder rows (StandardTrainer).
    #[value(name = "unit_decoder", alias = "unit-decoder")]
    UnitDecoder,
}

/// Sets the worker count of both thread pools a step uses.
pub fn set_threads(threads: usize) -> Result<()> {
    // matrixmultiply sizes its pool from this variable, read at its first GEMM; nothing has
    // run one yet and no other thread exists.
    std::env::set_var("MATMUL_NUM_THREADS", threads.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .context("starting the thread pool")
}

/// Runs `sae train`; `Ok(Some(status))` for a run that ended early (Ctrl-C).
pub fn run(args: TrainArgs, world: &World) -> Result<Option<u8>> {
    if let Some(threads) = args.run.threads {
        set_threads(threads)?;
    }
    let signals = Signals::install()?;
    // Checked before a run directory is created, so a bad device leaves nothing behind.
    let device = args.run.device.device()?;
    device.check().map_err(usage)?;
    let shards = args.run.latent_shards.unwrap_or(1);
    // Refused alike on every rank before any split: agreed, so one line reports it.
    let grid = Grid::new(world.collective(), shards).map_err(usage);
    let (grid, _) = agree(&*world.collective(), grid, false)?;
    let opened = match &args.run.resume {
        Some(dir) => {
            let options = ResumeOptions {
                skip_non_finite: args.data.skip_non_finite,
            };
            Run::resume_sharded(dir, &options, &signals.stop, grid).map(|run| (run, dir.clone()))
        }
        None => {
            let spec = spec_from(&args)?;
            if spec
                .sae
                .iter()
                .any(|s| s.precision == Some(Precision::Bf16))
            {
                // Before the run directory is made.
                Bf16Kernel::detect().map_err(usage)?;
            }
            let dir = args.run.out.clone().unwrap_or_else(default_run_dir);
            let created = Run::create_sharded(&spec, &dir, args.run.force, &signals.stop, grid);
            match created {
                Err(err @ sparse_autoencoder::Error::Stopped { .. }) => Err(err),
                Err(err) => return Err(width_mismatch_is_eval_data(err, &spec.data.eval_paths)),
                Ok(run) => Ok((run, dir)),
            }
        }
    };
    let (mut run, dir) = match opened {
        Err(sparse_autoencoder::Error::Stopped { .. }) => return Ok(Some(signals.status())),
        opened => opened.map_err(usage)?,
    };
    let moved = run.set_device(device);
    agree(&*world.collective(), moved, false).map_err(usage)?;
    // Rank 0 alone reports; the other processes of a distributed run print nothing.
    let printing = world.rank() == 0;
    if printing {
        describe(&run, &dir);
    }
    let mut reporter = printing.then(|| Reporter::new(&run, args.run.log_every));
    signals.training_starts();
    let outcome = match &mut reporter {
        Some(reporter) => run.train(reporter, &signals.stop),
        None => run.train(&mut (), &signals.stop),
    };
    if let Some(mut reporter) = reporter {
        reporter.finish();
    }
    let outcome = outcome.map_err(usage)?;
    if let Outcome::Finished(summaries) = &outcome {
        // Rank 0 draws each SAE's plots from its files; every rank learns whether that failed.
        let drawn = if printing {
            summaries
                .iter()
                .try_for_each(|summary| plot::redraw(&summary.dir).map(drop))
        } else {
            Ok(())
        };
        agree(&*world.collective(), drawn, false).map_err(usage)?;
    }
    if !printing {
        return Ok(match outcome {
            Outcome::Finished(_) => None,
            _ => Some(signals.status()),
        });
    }
    match outcome {
        Outcome::Interrupted { step } => {
            println!(
                "interrupted at step {step}: checkpoint written; continue with `sae train --resume {}`",
                dir.display()
            );
            Ok(Some(signals.status()))
        }
        Outcome::Unevaluated { dirs, .. } => {
            let dirs: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
            println!(
                "stopped during the end-of-run evaluation: the trained SAEs are saved in {}; \
                 evaluate them with `sae train --resume {}` (or `sae eval`)",
                dirs.join(", "),
                dir.display()
            );
            Ok(Some(signals.status()))
        }
        Outcome::Finished(summaries) => {
            for summary in &summaries {
                report(summary, summaries.len() > 1);
            }
            println!("run directory: {}", dir.display());
            Ok(None)
        }
    }
}

/// The run's configuration: the config file, then each flag given over it.
fn spec_from(args: &TrainArgs) -> Result<RunSpec> {
    let mut spec = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|err| UsageError(format!("invalid --config {}: {err}", path.display())))?;
            toml::from_str::<RunSpec>(&text).map_err(|err| {
                UsageError(format!(
                    "invalid --config {}: {}",
                    path.display(),
                    err.to_string().replace('\n', " ")
                ))
            })?
        }
        None => RunSpec::default(),
    };
    let (d, o, r) = (&args.data, &args.optim, &args.run);
    if !d.data.is_empty() {
        spec.data.paths = d.data.clone();
    }
    if !d.eval_data.is_empty() {
        spec.data.eval_paths = d.eval_data.clone();
        spec.data.eval_fraction = None;
    }
    if d.eval_fraction.is_some() {
        spec.data.eval_fraction = d.eval_fraction;
        spec.data.eval_paths.clear();
    }
    spec.data.normalize |= d.normalize;
    spec.data.skip_non_finite |= d.skip_non_finite;
    spec.data.buffer_rows = d.buffer_rows.or(spec.data.buffer_rows);
    let on_data = [
        (!spec.data.eval_paths.is_empty(), "--eval-data"),
        (spec.data.eval_fraction.is_some(), "--eval-fraction"),
        (spec.data.normalize, "--normalize"),
        (spec.data.skip_non_finite, "--skip-non-finite"),
        (spec.data.buffer_rows.is_some(), "--buffer-rows"),
    ];
    if spec.data.paths.is_empty() {
        if let Some((_, option)) = on_data.iter().find(|(given, _)| *given) {
            return Err(UsageError(format!(
                "{option} applies to activations given with --data; the built-in synthetic \
                 data has none"
            ))
            .into());
        }
    }
    if let Some(preset) = d.synth_preset {
        if !spec.data.paths.is_empty() {
            return Err(UsageError(
                "--synth-preset chooses the built-in synthetic data; drop it to train on the \
                 activations of --data (or the config's data.paths)"
                    .into(),
            )
            .into());
        }
        if spec.synthetic.is_some() {
            return Err(UsageError(format!(
                "--synth-preset and the [synthetic] table of --config both choose the synthetic \
                 data; drop the flag, or write preset = \"{}\" in the table",
                preset.as_str()
            ))
            .into());
        }
        spec.synthetic = Some(preset.config());
    }
    if o.steps.is_some() || o.tokens.is_some() {
        spec.train.steps = o.steps;
        spec.train.tokens = o.tokens;
    }
    spec.train.batch_size = o.batch_size.or(spec.train.batch_size);
    spec.train.seed = o.seed.or(spec.train.seed);
    spec.train.checkpoint_every = r.checkpoint_every.or(spec.train.checkpoint_every);
    spec.train.metrics_every = r.metrics_every.or(spec.train.metrics_every);
    spec.train.max_memory = r.max_memory.or(spec.train.max_memory);
    spec.sae = sweep(&spec.sae, args);
    Ok(spec)
}

/// The SAEs of the run: every [[sae]] table of the config file (or one default SAE), with the
/// scalar flags set on each, times every combination of the list flags.
fn sweep(tables: &[SaeSpec], args: &TrainArgs) -> Vec<SaeSpec> {
    let (m, o) = (&args.model, &args.optim);
    let one_default = [SaeSpec::default()];
    let tables = if tables.is_empty() {
        &one_default[..]
    } else {
        tables
    };
    // An empty list keeps the table's own value.
    fn each<T: Copy>(values: &[T]) -> Vec<Option<T>> {
        if values.is_empty() {
            vec![None]
        } else {
            values.iter().copied().map(Some).collect()
        }
    }
    let mut saes = Vec::new();
    for table in tables {
        let mut base = table.clone();
        if let Some(arch) = m.arch {
            base.arch = Some(arch);
        }
        if let Some(variant) = m.relu_variant {
            base.relu_variant = Some(match variant {
                Variant::DecoderNorm => ReluVariant::DecoderNorm,
                Variant::UnitDecoder => ReluVariant::UnitDecoder,
            });
        }
        base.warmup_steps = o.warmup_steps.or(base.warmup_steps);
        base.decay_start = o.decay_start.or(base.decay_start);
        base.auxk_alpha = o.auxk_alpha.or(base.auxk_alpha);
        base.dead_tokens = o.dead_tokens.or(base.dead_tokens);
        base.threshold_start_step = o.threshold_start_step.or(base.threshold_start_step);
        base.threshold_beta = o.threshold_beta.or(base.threshold_beta);
        if let Some(rule) = o.threshold {
            base.threshold = Some(match rule {
                Threshold::Ema => ThresholdRule::Ema,
                Threshold::Calibrate => ThresholdRule::Calibrate,
            });
        }
        base.l0_coefficient = o.l0_coefficient.or(base.l0_coefficient);
        base.jumprelu_bandwidth = o.jumprelu_bandwidth.or(base.jumprelu_bandwidth);
        base.resample_every = o.resample.or(base.resample_every);
        base.resample_encoder_scale = o.resample_encoder_scale.or(base.resample_encoder_scale);
        base.precision = args.run.device.precision().or(base.precision);
        if !o.group_sizes.is_empty() || !o.group_fractions.is_empty() {
            // One way of giving the groups replaces the other.
            base.group_sizes = (!o.group_sizes.is_empty()).then(|| o.group_sizes.clone());
            base.group_fractions =
                (!o.group_fractions.is_empty()).then(|| o.group_fractions.clone());
        }
        if !o.group_weights.is_empty() {
            base.group_weights = Some(o.group_weights.clone());
        }
        let sizes: Vec<(Option<usize>, Option<usize>)> = if !m.dict_size.is_empty() {
            m.dict_size.iter().map(|&f| (Some(f), None)).collect()
        } else if !m.expansion.is_empty() {
            m.expansion.iter().map(|&e| (None, Some(e))).collect()
        } else {
            vec![(base.dict_size, base.expansion)]
        };
        let several = tables.len() > 1
            || m.k.len() > 1
            || sizes.len() > 1
            || o.lr.len() > 1
            || o.l1.len() > 1;
        for k in each(&m.k) {
            for &(dict_size, expansion) in &sizes {
                for lr in each(&o.lr) {
                    for l1 in each(&o.l1) {
                        let mut sae = base.clone();
                        sae.k = k.or(sae.k);
                        sae.dict_size = dict_size;
                        sae.expansion = expansion;
                        sae.lr = lr.or(sae.lr);
                        sae.l1 = l1.or(sae.l1);
                        // A swept learning rate is part of the name, so names stay distinct.
                        if several && o.lr.len() > 1 && sae.name.is_none() {
                            sae.name = lr.map(|lr| format!("{}-lr{lr:e}", arch_label(&sae)));
                        }
                        saes.push(sae);
                    }
                }
            }
        }
    }
    saes
}

/// The default name's architecture part, for names that need more than the default.
fn arch_label(sae: &SaeSpec) -> String {
    let arch = sae.arch.unwrap_or(ArchName::Batchtopk);
    format!(
        "{arch}{}{}{}",
        sae.k.map(|k| format!("-k{k}")).unwrap_or_default(),
        sae.dict_size.map(|f| format!("-f{f}")).unwrap_or_default(),
        sae.expansion.map(|e| format!("-x{e}")).unwrap_or_default()
    )
}

/// An --eval-data file whose width differs from --data is the option's fault.
fn width_mismatch_is_eval_data(
    err: sparse_autoencoder::Error,
    eval_paths: &[PathBuf],
) -> anyhow::Error {
    if let sparse_autoencoder::Error::Data(DataError::WidthMismatch { path, .. }) = &err {
        if eval_paths.contains(path) {
            return UsageError(format!("invalid --eval-data: {err}")).into();
        }
    }
    usage(err)
}

/// `runs/20261125-081502`: a fresh directory per run, in UTC.
fn default_run_dir() -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    PathBuf::from("runs").join(format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    ))
}

/// The run's opening line(s).
fn describe(run: &Run, dir: &Path) {
    let spec = run.spec();
    let info = run.data();
    let data = match info.train_rows {
        None => {
            let synth = spec.synthetic.clone().unwrap_or_default();
            format!(
                "synthetic data ({} preset: {} true features in {} dimensions)",
                synth.preset.as_str(),
                synth.n_features,
                synth.d_model
            )
        }
        Some(rows) => format!(
            "activations (D={}) from {} file(s): {rows} training rows, {} held out",
            info.d_model,
            info.files,
            info.eval_rows.unwrap_or(0)
        ),
    };
    let saes: Vec<String> = spec
        .sae
        .iter()
        .map(|s| s.name.clone().unwrap_or_default())
        .collect();
    let resumed = if run.steps_done() > 0 {
        format!(", resuming at step {}", run.steps_done())
    } else {
        String::new()
    };
    println!(
        "training {} on {data}: {} steps of {} rows into {}{resumed}",
        saes.join(", "),
        run.total_steps(),
        spec.train.batch_size.unwrap_or_default(),
        dir.display()
    );
}

/// Prints one SAE's results.
fn report(summary: &Summary, named: bool) {
    let who = if named {
        format!("{}: ", summary.name)
    } else {
        String::new()
    };
    if let Some(eval) = &summary.eval {
        println!(
            "{who}held-out ({} rows): mse {:.6}  fve {:.4}  l0 {:.2}  dead {:.3}  cos {:.4}  shrinkage {:.4}",
            eval.n_rows, eval.mse, eval.fve, eval.l0, eval.dead_fraction, eval.cosine, eval.shrinkage
        );
    }
    if let Some(r) = &summary.recovery {
        let n = r.n_true_features;
        println!(
            "{who}recovered {:.1}% of the {n} true features at cosine >= 0.9 (MCC {:.3}, mean best cosine {:.3}); trained in {:.1}s",
            100.0 * r.fraction_above_0_9,
            r.mcc,
            r.mean_max_cosine,
            summary.seconds
        );
        if let Some(firing) = &r.firing {
            println!("{who}{}", super::firing_line(firing));
        }
    } else {
        println!("{who}trained in {:.1}s", summary.seconds);
    }
}

/// Shows progress: a bar on a terminal, log lines otherwise.
struct Reporter {
    bar: Option<ProgressBar>,
    log_every: u64,
    names: Vec<String>,
    /// Tokens and time at the session's first step, for a rate that excludes earlier sessions.
    origin: Option<(u64, Instant)>,
}

impl Reporter {
    fn new(run: &Run, log_every: Option<u64>) -> Self {
        let total = run.total_steps();
        // The bar draws on stderr and the notes print above it, so both must be a terminal:
        // otherwise (output redirected, or mpirun forwarding rank 0's stdout through a pty
        // and its stderr through a pipe) the bar would hide and take the notes with it.
        let on_terminal = std::io::stdout().is_terminal() && std::io::stderr().is_terminal();
        let bar = on_terminal.then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                // The message is cut to the terminal's width rather than wrapping.
                ProgressStyle::with_template("{bar:20} {pos}/{len}  eta {eta}  {wide_msg}")
                    .expect("a valid template"),
            );
            bar.set_position(run.steps_done());
            bar.enable_steady_tick(Duration::from_millis(500));
            bar
        });
        Reporter {
            bar,
            log_every: log_every.unwrap_or((total / 20).max(1)),
            names: run.names().iter().map(|s| s.to_string()).collect(),
            origin: None,
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl Observer for Reporter {
    fn step(&mut self, p: &Progress<'_>) {
        let (tokens0, t0) = *self.origin.get_or_insert((p.tokens, Instant::now()));
        let rate = (p.tokens - tokens0) as f64 / t0.elapsed().as_secs_f64().max(1e-9);
        let resampled: Vec<String> = (self.names.iter().zip(p.stats))
            .filter(|(_, stats)| stats.resampled > 0)
            .map(|(name, stats)| {
                format!(
                    "step {}: {name}: resampled {} dead latents",
                    p.step, stats.resampled
                )
            })
            .collect();
        for line in &resampled {
            self.note(line);
        }
        let s = &p.stats[0];
        let line = format!(
            "loss {:.5}  mse {:.5}  fve {:.4}  l0 {:.2}  dead {:.3}  {:.0} tokens/s",
            s.loss, s.mse, s.fve, s.l0, s.dead_fraction, rate
        );
        let more = if self.names.len() > 1 {
            format!("  ({} and {} more)", self.names[0], self.names.len() - 1)
        } else {
            String::new()
        };
        match &self.bar {
            Some(bar) => {
                bar.set_position(p.step);
                bar.set_message(format!(
                    "{} tokens/s  loss {:.4}  fve {:.3}  l0 {:.1}  dead {:.3}{more}",
                    si(rate),
                    s.loss,
                    s.fve,
                    s.l0,
                    s.dead_fraction
                ));
            }
            None if p.step.is_multiple_of(self.log_every) || p.step == p.total_steps => {
                println!("step {:>6}  {line}{more}", p.step);
            }
            None => {}
        }
    }

    fn note(&mut self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => println!("{line}"),
        }
    }
}

/// 12.3k, 4.56M, 308k: a rate to three significant figures.
fn si(value: f64) -> String {
    let (scaled, unit) = match value {
        v if v >= 1e9 => (v / 1e9, "G"),
        v if v >= 1e6 => (v / 1e6, "M"),
        v if v >= 1e3 => (v / 1e3, "k"),
        v => (v, ""),
    };
    let decimals = match scaled {
        s if s >= 100.0 => 0,
        s if s >= 10.0 => 1,
        _ => 2,
    };
    format!("{scaled:.decimals$}{unit}")
}

#[cfg(test)]
mod tests {
    use super::si;

    #[test]
    fn rates_have_three_significant_figures() {
        assert_eq!(si(308_515.0), "309k");
        assert_eq!(si(12_345.0), "12.3k");
        assert_eq!(si(4_560_000.0), "4.56M");
        assert_eq!(si(950.0), "950");
        assert_eq!(si(1.5), "1.50");
    }
}
