//! `sae`: train sparse autoencoders from the command line.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use sparse_autoencoder::synth::{recovery, Synth, SynthConfig};
use sparse_autoencoder::{Architecture, ReluVariant, Sae, SaeConfig, TrainConfig, Trainer};

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
    /// Train an SAE. With no data given, trains on the built-in synthetic superposition dataset
    /// and reports how many of its true features the decoder recovered.
    Train(TrainArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum Arch {
    /// ReLU with an L1 penalty.
    Relu,
    /// k largest codes per row.
    Topk,
    /// k·B largest codes per batch; a learned threshold outside training.
    Batchtopk,
}

#[derive(Parser)]
struct TrainArgs {
    /// Sparsity rule.
    #[arg(long, value_enum, default_value = "batchtopk")]
    arch: Arch,
    /// Active latents per row (topk, batchtopk).
    #[arg(long, default_value_t = 8)]
    k: usize,
    /// Number of latents F.
    #[arg(long, default_value_t = 512)]
    dict_size: usize,
    /// Rows per training batch.
    #[arg(long, default_value_t = 1024)]
    batch_size: usize,
    /// Training steps.
    #[arg(long, default_value_t = 3000)]
    steps: u64,
    /// Peak learning rate (default: 2e-4/√(F/2¹⁴) for topk/batchtopk, 5e-5 for relu).
    #[arg(long)]
    lr: Option<f32>,
    /// Learning-rate warm-up steps.
    #[arg(long, default_value_t = 100)]
    warmup_steps: u64,
    /// L1 coefficient λ (relu).
    #[arg(long)]
    l1: Option<f32>,
    /// ReLU penalty variant.
    #[arg(long, value_parser = ["decoder_norm", "unit_decoder"], default_value = "decoder_norm")]
    relu_variant: String,
    /// Seed of the SAE's initialisation and of the synthetic data.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Print a progress line every this many steps.
    #[arg(long, default_value_t = 250)]
    log_every: u64,
}

/// An error the user can fix by changing the command line: printed as one line, exit status 2.
#[derive(Debug)]
struct UsageError(String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => train(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            // Bad input and invalid options are the user's to fix; both exit with status 2, as
            // clap does for malformed command lines.
            ExitCode::from(2)
        }
    }
}

fn train(args: TrainArgs) -> Result<()> {
    if let Some(threads) = args.threads {
        if threads == 0 {
            return Err(UsageError("--threads must be at least 1".into()).into());
        }
        // matrixmultiply sizes its own pool from this variable, read at its first GEMM.
        std::env::set_var("MATMUL_NUM_THREADS", threads.to_string());
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .context("starting the thread pool")?;
    }
    if args.batch_size == 0 {
        return Err(UsageError("--batch-size must be at least 1".into()).into());
    }
    let arch = match args.arch {
        Arch::Relu => Architecture::Relu,
        Arch::Topk => Architecture::TopK { k: args.k },
        Arch::Batchtopk => Architecture::BatchTopK { k: args.k },
    };
    let synth = Synth::new(SynthConfig {
        seed: args.seed,
        ..SynthConfig::default()
    })
    .map_err(|e| UsageError(e.to_string()))?;
    let sae_config = SaeConfig {
        d_model: synth.true_features().ncols(),
        dict_size: args.dict_size,
        arch,
    };
    let defaults = TrainConfig::default();
    let train_config = TrainConfig {
        total_steps: args.steps,
        lr: args.lr,
        warmup_steps: args.warmup_steps.min(args.steps.saturating_sub(1)),
        l1_coefficient: args.l1.unwrap_or(defaults.l1_coefficient),
        relu_variant: match args.relu_variant.as_str() {
            "unit_decoder" => ReluVariant::UnitDecoder,
            _ => ReluVariant::DecoderNorm,
        },
        sparsity_warmup_steps: defaults.sparsity_warmup_steps.min(args.steps / 2),
        // Synthetic runs are short: call a latent dead after 20 batches without firing.
        dead_tokens: 20 * args.batch_size as u64,
        threshold_start_step: defaults.threshold_start_step.min(args.steps / 2),
        ..defaults
    };
    let sae = Sae::new(sae_config, args.seed).map_err(|e| UsageError(e.to_string()))?;
    let mut trainer = Trainer::new(sae, train_config).map_err(|e| UsageError(e.to_string()))?;

    println!(
        "training a {} SAE (D={}, F={}) on synthetic data: {} true features, {} steps of {} rows",
        format!("{arch:?}").to_lowercase(),
        sae_config.d_model,
        sae_config.dict_size,
        synth.true_features().nrows(),
        args.steps,
        args.batch_size
    );
    let start = Instant::now();
    for step in 0..args.steps {
        let x_bd = synth.batch(args.batch_size, step);
        let stats = trainer.step(x_bd.view())?;
        if (step + 1) % args.log_every == 0 || step + 1 == args.steps {
            let tokens = (step + 1) * args.batch_size as u64;
            println!(
                "step {:>6}  loss {:.5}  mse {:.5}  fve {:.4}  l0 {:.2}  dead {:.3}  {:.0} tokens/s",
                step + 1,
                stats.loss,
                stats.mse,
                stats.fve,
                stats.l0,
                stats.dead_fraction,
                tokens as f64 / start.elapsed().as_secs_f64()
            );
        }
    }
    let score = recovery(synth.true_features(), trainer.sae().w_dec_fd());
    println!(
        "recovered {:.1}% of the true features at cosine >= 0.9 (mean best cosine {:.3}) in {:.1}s",
        100.0 * score.fraction_recovered,
        score.mean_max_cosine,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
