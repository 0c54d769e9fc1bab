//! `sae`: train sparse autoencoders from the command line.
//!
//! Exit status: 0 on success; 2 for anything the user can fix on the command line (a malformed
//! or out-of-range option, an invalid configuration, bad input); 1 for other failures.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

mod cli;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use cli::{at_least_one, at_least_one_u64, exit_status, fraction, usage, UsageError};
use sparse_autoencoder::backend::Cpu;
use sparse_autoencoder::data::{
    estimate_scale, holdout, Batcher, LoaderConfig, NpyShards, Prefetcher, Source,
};
use sparse_autoencoder::eval::evaluate;
use sparse_autoencoder::synth::{recovery, Synth, SynthConfig};
use sparse_autoencoder::{
    Architecture, ReluVariant, Sae, SaeConfig, StepStats, TrainConfig, Trainer,
};

#[derive(Parser)]
#[command(
    name = "sae",
    version,
    about = "Train sparse autoencoders on neural-network activations"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train an SAE on activations saved as .npy (--data), reporting its reconstruction of
    /// held-out rows. With no data given, trains on the built-in synthetic superposition
    /// dataset (256 known features in 64 dimensions) and reports how many of its true features
    /// the decoder recovered.
    Train(TrainArgs),
}

#[derive(Args)]
struct TrainArgs {
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
    /// seq·tok rows). Without --data, trains on built-in synthetic data.
    #[arg(long, num_args = 1.., value_name = "PATH")]
    data: Vec<PathBuf>,
    /// Held-out activations to evaluate on, in the same forms as --data.
    #[arg(long, num_args = 1.., value_name = "PATH", requires = "data", conflicts_with = "eval_fraction")]
    eval_data: Vec<PathBuf>,
    /// Fraction of the --data rows held out for evaluation, never trained on; 0 disables
    /// [default: 0.01].
    #[arg(long, requires = "data", value_parser = fraction, allow_negative_numbers = true)]
    eval_fraction: Option<f64>,
    /// Train on the activations scaled to mean norm √d_model (the scale the default learning
    /// rate and L1 coefficient assume) and fold the scale into the SAE, which then takes raw
    /// activations.
    #[arg(long, requires = "data")]
    normalize: bool,
    /// Skip rows holding NaN or Inf (and report how many) instead of stopping at the first.
    #[arg(long, requires = "data")]
    skip_non_finite: bool,
    /// Rows of the shuffle buffer [default: 2^20, or what fits 4 GiB, or the whole dataset].
    #[arg(long, requires = "data", allow_negative_numbers = true)]
    buffer_rows: Option<usize>,
}

/// The SAE's shape and sparsity rule.
#[derive(Args)]
#[command(next_help_heading = "Model")]
struct ModelArgs {
    /// Sparsity rule.
    #[arg(long, value_enum, default_value_t = Arch::Batchtopk)]
    arch: Arch,
    /// Active latents per row (topk; batchtopk: on average).
    #[arg(long, default_value_t = 8, allow_negative_numbers = true)]
    k: usize,
    /// Number of latents F (dictionary rows) [default: 512 on synthetic data, 8·d_model with
    /// --data].
    #[arg(long, allow_negative_numbers = true)]
    dict_size: Option<usize>,
    /// ReLU only: which L1 formulation.
    #[arg(long, value_enum, default_value_t = Variant::DecoderNorm)]
    relu_variant: Variant,
}

/// The training recipe.
#[derive(Args)]
#[command(next_help_heading = "Training")]
struct OptimArgs {
    /// Rows per training batch.
    #[arg(long, default_value_t = 1024, value_parser = at_least_one, allow_negative_numbers = true)]
    batch_size: usize,
    /// Training steps.
    #[arg(long, default_value_t = 3000, allow_negative_numbers = true)]
    steps: u64,
    /// Peak learning rate [default: 5e-3 on synthetic data; with --data 2e-4/√(F/2¹⁴) for
    /// topk and batchtopk, 5e-5 for relu].
    #[arg(long, allow_negative_numbers = true)]
    lr: Option<f32>,
    /// Linear learning-rate warm-up, in steps [default: min(100, steps/10)].
    #[arg(long, allow_negative_numbers = true)]
    warmup_steps: Option<u64>,
    /// Step from which the learning rate decays linearly to 0 [default: 80% of steps].
    #[arg(long, allow_negative_numbers = true)]
    decay_start: Option<u64>,
    /// ReLU only: L1 coefficient λ [default: 0.3 on synthetic data, 5 with --data].
    #[arg(long, allow_negative_numbers = true)]
    l1: Option<f32>,
    /// Seed of the SAE's initialisation, the batch order and the synthetic data.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    seed: u64,
}

/// How the run executes and reports.
#[derive(Args)]
#[command(next_help_heading = "Run")]
struct RunArgs {
    /// Worker threads for the GEMMs and the rest of the step [default: all cores].
    #[arg(long, value_parser = at_least_one, allow_negative_numbers = true)]
    threads: Option<usize>,
    /// Print a progress line every this many steps.
    #[arg(long, default_value_t = 250, value_parser = at_least_one_u64, allow_negative_numbers = true)]
    log_every: u64,
}

#[derive(Clone, Copy, ValueEnum)]
enum Arch {
    /// ReLU with an L1 penalty.
    Relu,
    /// The k largest codes of each row.
    Topk,
    /// The k·B largest codes of the batch; a learned threshold outside training.
    Batchtopk,
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

fn main() -> ExitCode {
    // Clap prints its own errors (malformed or out-of-range options) and exits with status 2.
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => train(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(exit_status(&err))
        }
    }
}

/// Sets the worker count of both thread pools a step uses.
fn set_threads(threads: usize) -> Result<()> {
    // matrixmultiply sizes its pool from this variable, read at its first GEMM; nothing has
    // run one yet and no other thread exists.
    std::env::set_var("MATMUL_NUM_THREADS", threads.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .context("starting the thread pool")
}

/// Peak learning rate on the synthetic data.
const SYNTH_LR: f32 = 5e-3;
/// ReLU's L1 coefficient on the synthetic data.
const SYNTH_L1: f32 = 0.3;

/// Fills in the defaults that depend on other options (and on whether the data is the
/// built-in synthetic set) and builds the library's configs.
fn configs(
    model: &ModelArgs,
    optim: &OptimArgs,
    d_model: usize,
    synthetic: bool,
) -> (SaeConfig, TrainConfig) {
    let arch = match model.arch {
        Arch::Relu => Architecture::Relu,
        Arch::Topk => Architecture::TopK { k: model.k },
        Arch::Batchtopk => Architecture::BatchTopK { k: model.k },
    };
    let sae = SaeConfig {
        d_model,
        dict_size: model
            .dict_size
            .unwrap_or(if synthetic { 512 } else { 8 * d_model }),
        arch,
    };
    let steps = optim.steps;
    let defaults = TrainConfig::default();
    let warmup_steps = optim.warmup_steps.unwrap_or((steps / 10).min(100));
    // λ's warm-up (ReLU) and θ's start (BatchTopK): the library's defaults assume runs of
    // ~10⁴ steps or more; shorter runs use the first half.
    let sparsity_warmup_steps = defaults.sparsity_warmup_steps.min(steps / 2);
    let decay_start = optim.decay_start.or_else(|| {
        let start = steps / 5 * 4;
        (start > warmup_steps && start > sparsity_warmup_steps && start < steps).then_some(start)
    });
    // The library's defaults (lr 2e-4/√(F/2¹⁴) or 5e-5, λ = 5) are for runs of ~10⁴ steps or
    // more on activations normalised to E‖x‖ = √D; the synthetic rows have E‖x‖ ≈ 2.3 and the
    // runs are short. These recover ≥ 98% of the true features with every architecture at the
    // default size.
    let (lr, l1_coefficient) = if synthetic {
        (
            Some(optim.lr.unwrap_or(SYNTH_LR)),
            optim.l1.unwrap_or(SYNTH_L1),
        )
    } else {
        (optim.lr, optim.l1.unwrap_or(defaults.l1_coefficient))
    };
    let train = TrainConfig {
        total_steps: steps,
        lr,
        warmup_steps,
        decay_start,
        l1_coefficient,
        relu_variant: match model.relu_variant {
            Variant::DecoderNorm => ReluVariant::DecoderNorm,
            Variant::UnitDecoder => ReluVariant::UnitDecoder,
        },
        sparsity_warmup_steps,
        threshold_start_step: defaults.threshold_start_step.min(steps / 2),
        ..defaults
    };
    (sae, train)
}

fn arch_name(arch: Architecture) -> String {
    match arch {
        Architecture::Relu => "relu".into(),
        Architecture::TopK { k } => format!("topk (k={k})"),
        Architecture::BatchTopK { k } => format!("batchtopk (k={k})"),
    }
}

fn train(args: TrainArgs) -> Result<()> {
    let TrainArgs {
        data,
        model,
        optim,
        run,
    } = args;
    if let Some(threads) = run.threads {
        set_threads(threads)?;
    }
    if data.data.is_empty() {
        train_synthetic(&model, &optim, &run)
    } else {
        train_on_data(&data, &model, &optim, &run)
    }
}

/// The training loop: `step(s)` trains on the batch of step s; a progress line every
/// `log_every` steps. Returns the seconds it took.
fn run_steps(
    optim: &OptimArgs,
    run: &RunArgs,
    mut step: impl FnMut(u64) -> Result<StepStats>,
) -> Result<f64> {
    let start = Instant::now();
    for s in 0..optim.steps {
        let stats = step(s)?;
        let done = s + 1;
        if done % run.log_every == 0 || done == optim.steps {
            let tokens = done * optim.batch_size as u64;
            println!(
                "step {done:>6}  loss {:.5}  mse {:.5}  fve {:.4}  l0 {:.2}  dead {:.3}  {:.0} tokens/s",
                stats.loss,
                stats.mse,
                stats.fve,
                stats.l0,
                stats.dead_fraction,
                tokens as f64 / start.elapsed().as_secs_f64()
            );
        }
    }
    Ok(start.elapsed().as_secs_f64())
}

fn train_synthetic(model: &ModelArgs, optim: &OptimArgs, run: &RunArgs) -> Result<()> {
    let synth = Synth::new(SynthConfig {
        seed: optim.seed,
        ..SynthConfig::default()
    })
    .map_err(usage)?;
    let (sae_config, mut train_config) = configs(model, optim, synth.config().d_model, true);
    // Synthetic runs are short: a latent is dead after 20 batches without firing.
    train_config.dead_tokens = 20 * optim.batch_size as u64;
    let sae = Sae::new(sae_config, optim.seed).map_err(usage)?;
    let mut trainer = Trainer::new(sae, train_config).map_err(usage)?;

    println!(
        "training a {} SAE (D={}, F={}) on synthetic data with {} true features: {} steps of {} rows",
        arch_name(sae_config.arch),
        sae_config.d_model,
        sae_config.dict_size,
        synth.config().n_features,
        optim.steps,
        optim.batch_size
    );
    let elapsed = run_steps(optim, run, |s| {
        Ok(trainer.step(synth.batch(optim.batch_size, s).view())?)
    })?;
    let score = recovery(synth.true_features(), trainer.sae().w_dec_fd())?;
    println!(
        "recovered {:.1}% of the {} true features at cosine >= 0.9 (MCC {:.3}, mean best cosine {:.3}); trained in {elapsed:.1}s",
        100.0 * score.fraction_above_0_9,
        synth.config().n_features,
        score.mcc,
        score.mean_max_cosine,
    );
    Ok(())
}

/// Held-out fraction when neither --eval-data nor --eval-fraction is given.
const DEFAULT_EVAL_FRACTION: f64 = 0.01;

fn train_on_data(
    data: &DataArgs,
    model: &ModelArgs,
    optim: &OptimArgs,
    run: &RunArgs,
) -> Result<()> {
    let shards = NpyShards::open(&data.data)?;
    for notice in shards.notices() {
        println!("note: {notice}");
    }
    let (n_files, d_model, n_rows) = (shards.shards().count(), shards.d_model(), shards.n_rows());
    let all: Arc<dyn Source> = Arc::new(shards);

    // Training rows, and the rows to evaluate on (if any).
    let (train_rows, eval_rows): (Arc<dyn Source>, Option<Arc<dyn Source>>) =
        if !data.eval_data.is_empty() {
            let eval = NpyShards::open(&data.eval_data)?;
            if eval.d_model() != d_model {
                return Err(UsageError(format!(
                "invalid --eval-data: its rows are {} wide but the --data rows are {d_model} wide",
                eval.d_model()
            ))
                .into());
            }
            (all, Some(Arc::new(eval)))
        } else {
            let fraction = data.eval_fraction.unwrap_or(DEFAULT_EVAL_FRACTION);
            let rounds_to_nothing = (fraction * n_rows as f64).round() < 1.0;
            if fraction == 0.0 || (data.eval_fraction.is_none() && rounds_to_nothing) {
                (all, None)
            } else {
                let (train, eval) = holdout(all, fraction, 0)
                    .map_err(|err| UsageError(format!("invalid --eval-fraction: {err}")))?;
                (Arc::new(train), Some(Arc::new(eval)))
            }
        };

    let scale = if data.normalize {
        let c = estimate_scale(&*train_rows, optim.seed, data.skip_non_finite)?;
        println!("normalising: training on the activations times {c:.6} (mean norm √{d_model})");
        c
    } else {
        1.0
    };
    let loader_config = LoaderConfig {
        batch_size: optim.batch_size,
        buffer_rows: data.buffer_rows,
        seed: optim.seed,
        skip_non_finite: data.skip_non_finite,
        scale,
        ..LoaderConfig::default()
    };
    let batcher = Batcher::new(train_rows.clone(), loader_config).map_err(usage)?;
    let (sae_config, train_config) = configs(model, optim, d_model, false);
    let sae = Sae::new(sae_config, optim.seed).map_err(usage)?;
    let mut trainer = Trainer::new(sae, train_config).map_err(usage)?;
    println!(
        "training a {} SAE (D={d_model}, F={}) on {} rows from {n_files} file(s), {} held out: {} steps of {} rows",
        arch_name(sae_config.arch),
        sae_config.dict_size,
        train_rows.n_rows(),
        eval_rows.as_ref().map_or(0, |e| e.n_rows()),
        optim.steps,
        optim.batch_size
    );
    let mut loader = Prefetcher::new(batcher);
    let elapsed = run_steps(optim, run, |_| {
        let batch = loader.next_batch()?;
        Ok(trainer.step(batch.view())?)
    })?;
    if loader.skipped_rows() > 0 {
        // Each epoch meets a bad row again.
        let epochs = (optim.steps * optim.batch_size as u64) as f64 / train_rows.n_rows() as f64;
        println!(
            "skipped {} non-finite rows over {epochs:.1} epochs",
            loader.skipped_rows()
        );
    }
    drop(loader);
    let mut sae = trainer.into_sae();
    sae.fold_input_scale(scale)?;
    println!("trained in {elapsed:.1}s");
    if let Some(eval_rows) = eval_rows {
        let stats = evaluate(
            &sae,
            &Cpu,
            &*eval_rows,
            optim.batch_size,
            data.skip_non_finite,
        )?;
        println!(
            "held-out ({} rows): mse {:.6}  fve {:.4}  l0 {:.2}  dead {:.3}",
            stats.n_rows, stats.mse, stats.fve, stats.l0, stats.dead_fraction
        );
    }
    Ok(())
}
