//! `sae`: train sparse autoencoders from the command line.
//!
//! Exit status: 0 on success; 2 for anything the user can fix (a malformed or out-of-range
//! option, an invalid configuration, bad input, an occupied run directory, a run too big for
//! the memory); 130 when Ctrl-C (SIGINT) and 143 when SIGTERM stopped `sae train` (after
//! writing a checkpoint once training had started); 1 for other failures.

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sparse_autoencoder::dist;

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
    /// Train one SAE, or a sweep of several on the same batches, on activations saved as .npy
    /// (--data). With no data given, trains on the built-in synthetic superposition dataset
    /// and reports how many of its true features the decoder recovered. Writes weights,
    /// metrics, evaluation and plots to a run directory.
    Train(Box<cli::train::TrainArgs>),
    /// Evaluate a trained SAE on activations (MSE, variance explained, L0, dead latents,
    /// cosine, shrinkage, feature density) and, given --true-features, its recovery of known
    /// features.
    Eval(cli::eval::EvalArgs),
    /// Write an SAE's sparse codes for activations as .npy files (numpy and scipy read them
    /// as they are).
    Encode(cli::encode::EncodeArgs),
    /// Export an SAE for SAELens or EleutherAI's sparsify.
    Export(cli::export::ExportArgs),
    /// Write the built-in synthetic dataset and its true features as .npy files.
    Synth(cli::synth::SynthArgs),
    /// Redraw a run's plots (curves.png, density.png) from its metrics and feature density.
    Plot(cli::plot::PlotArgs),
    /// Time the bare encoder GEMM and full training steps side by side, with each phase of the
    /// step (and, with --data, the loader's share).
    ///
    /// Measurements alternate in rounds: each round times one GEMM (B×D)·(D×F) on the
    /// trainer's backend, then one training step on a fixed in-memory batch of activation-like
    /// rows (a per-column offset plus uniform noise, every row different), then with --data one
    /// step fed by the loader from a temporary float16 .npy. The first --warmup rounds are
    /// discarded; each figure is the median of the remaining --steps rounds. Alternating means a
    /// drift in the machine's speed (a shared VM, thermal limits) slows the GEMM and the step
    /// alike, so their ratio stays meaningful.
    Bench(cli::bench::BenchArgs),
}

fn main() -> ExitCode {
    // Output piped into `head` and closed early ends the process quietly, as for other Unix
    // tools, instead of a panic in println!: Rust ignores SIGPIPE unless told otherwise.
    #[cfg(unix)]
    // SAFETY: restores the default disposition before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Clap's errors (malformed or out-of-range options) exit with status 2, as one line like
    // every other error; help and version print as clap writes them.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err)
            if !err.use_stderr()
                || err.kind()
                    == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand =>
        {
            err.exit()
        }
        Err(err) => {
            // Every process of an MPI job parses the same line: one copy of the message.
            if dist::launcher_rank().unwrap_or(0) == 0 {
                eprintln!("{}", cli::one_line(&err.render().to_string()));
            }
            return ExitCode::from(2);
        }
    };
    let world = match dist::world() {
        Ok(world) => world,
        Err(err) => {
            eprintln!("error: {}", cli::one_line(&err.to_string()));
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Train(args) => cli::train::run(*args, &world),
        Command::Eval(args) => cli::eval::run(args, &world),
        Command::Encode(args) => cli::encode::run(args, &world),
        Command::Bench(args) => cli::bench::run(args, &world),
        Command::Export(args) => cli::export::run(args, &world),
        command => match cli::alone(&world, command.name()) {
            Err(err) => Err(err),
            Ok(()) => match command {
                Command::Synth(args) => cli::synth::run(args),
                Command::Plot(args) => cli::plot::run(args),
                _ => unreachable!("matched above"),
            },
        },
    };
    ExitCode::from(end(world, result))
}

/// The exit status of a command that returned `result`, after printing its error (rank 0
/// alone for a failure every process agreed on). Consuming `world` finalises MPI (every
/// process gets here together) before the process exits.
fn end(world: dist::World, result: anyhow::Result<Option<u8>>) -> u8 {
    match result {
        Ok(None) => 0,
        Ok(Some(status)) => status,
        Err(err) => {
            let status = cli::exit_status(&err);
            let line = cli::error_line(&err);
            if !world.failure_agreed() {
                // The other processes may be waiting for this one in a collective: end them.
                eprintln!("error (rank {}): {line}", world.rank());
                world.abort(status.into());
            }
            if world.rank() == 0 {
                eprintln!("error: {line}");
            }
            status
        }
    }
}

impl Command {
    /// The subcommand as typed.
    fn name(&self) -> &'static str {
        match self {
            Command::Train(_) => "train",
            Command::Eval(_) => "eval",
            Command::Encode(_) => "encode",
            Command::Export(_) => "export",
            Command::Synth(_) => "synth",
            Command::Plot(_) => "plot",
            Command::Bench(_) => "bench",
        }
    }
}
