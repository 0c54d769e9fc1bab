//! Trains a small SAE on the synthetic dataset, writes its `metrics.jsonl` and
//! `feature_density.npy` as a run directory holds them, and draws `curves.png` and
//! `density.png` from them with `plot::redraw`: a quick look at the plots on a realistic run.
//!
//! ```sh
//! cargo run --release --example plot_synth -- /tmp/plot-demo batchtopk   # or relu, topk
//! ```
//!
//! With no arguments it writes to `sae-plot-demo` under the system's temporary directory.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use sparse_autoencoder::backend::Cpu;
use sparse_autoencoder::eval::evaluate;
use sparse_autoencoder::run::MetricsRecord;
use sparse_autoencoder::synth::{Synth, SynthConfig};
use sparse_autoencoder::{plot, Architecture, Sae, SaeConfig, TrainConfig, Trainer};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    // Out of the source tree unless asked: the images are not for committing.
    let dir = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("sae-plot-demo"));
    let arch = match args.next().as_deref().unwrap_or("batchtopk") {
        "relu" => Architecture::RELU,
        "topk" => Architecture::TopK { k: 8 },
        "batchtopk" => Architecture::BatchTopK { k: 8 },
        other => anyhow::bail!("unknown architecture {other:?}; pass relu, topk or batchtopk"),
    };
    let (steps, batch_rows, log_every) = (600u64, 1024usize, 10u64);
    std::fs::create_dir_all(&dir)?;

    let synth = Synth::new(SynthConfig::default())?;
    let sae_config = SaeConfig {
        d_model: synth.config().d_model,
        dict_size: 512,
        arch,
    };
    // The synthetic defaults of `sae train`, with latents called dead after 50 batches
    // without firing so that a short run shows the curve move.
    let train_config = TrainConfig {
        total_steps: steps,
        lr: Some(5e-3),
        warmup_steps: steps / 10,
        decay_start: Some(steps * 4 / 5),
        l1_coefficient: 0.3,
        sparsity_warmup_steps: steps / 10,
        dead_tokens: 50 * batch_rows as u64,
        threshold_start_step: steps / 10,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(Sae::new(sae_config, 0)?, train_config)?;
    let start = Instant::now();
    let mut metrics = std::fs::File::create(dir.join("metrics.jsonl"))?;
    for step in 0..steps {
        let stats = trainer.step(synth.batch(batch_rows, step).view())?;
        if (step + 1) % log_every == 0 || step == 0 {
            let tokens = (step + 1) * batch_rows as u64;
            let record =
                MetricsRecord::new(step + 1, tokens, &stats, start.elapsed().as_secs_f64());
            writeln!(metrics, "{}", serde_json::to_string(&record)?)?;
        }
    }
    let sae = trainer.into_sae();
    // Rows of batches the run never saw.
    let eval_nd = synth.batch(16384, u64::MAX);
    let stats = evaluate(&sae, &Cpu, &eval_nd.view(), 4096, false)?;
    println!(
        "eval: fve {:.4}, cosine {:.4}, shrinkage {:.4}, L0 {:.2}, dead {:.1}%",
        stats.fve,
        stats.cosine,
        stats.shrinkage,
        stats.l0,
        100.0 * stats.dead_fraction
    );
    sparse_autoencoder::io::write_feature_density(&dir.join("feature_density.npy"), &stats)?;
    let drawn = plot::redraw(&dir)?;
    println!("wrote {} and {:?}", drawn.curves.display(), drawn.density);
    Ok(())
}
