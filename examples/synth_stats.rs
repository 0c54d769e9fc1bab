//! Measures a synthetic preset: its mean L0 over many rows, the range of its firing
//! frequencies, the overlap of its true features, and how long one batch takes to generate —
//! the figures the README quotes for `--preset hard`.
//!
//! ```sh
//! cargo run --release --example synth_stats -- hard      # or default
//! ```

use std::time::Instant;

use sparse_autoencoder::synth::{Synth, SynthPreset};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let preset: SynthPreset = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "hard".into())
        .parse()?;
    let t = Instant::now();
    let synth = Synth::new(preset.config())?;
    let built = t.elapsed();
    let cfg = synth.config();
    println!(
        "preset {}: G = {} features in D = {}, built in {:.0} ms",
        preset.as_str(),
        cfg.n_features,
        cfg.d_model,
        built.as_secs_f64() * 1e3
    );
    let p = synth.firing_probabilities();
    let max = p.iter().copied().fold(0.0, f64::max);
    let min = p.iter().copied().fold(1.0, f64::min);
    println!("firing probabilities from {max:.3} down to {min:.2e}");

    let (batch, reps) = (1024, 50);
    // Warm up rayon's pool and the caches before timing.
    let _ = synth.batch(batch, 0);
    let mut times: Vec<f64> = (0..reps)
        .map(|i| {
            let t = Instant::now();
            std::hint::black_box(synth.batch(batch, 1 + i as u64));
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    println!(
        "Synth::batch({batch}, i): median {:.2} ms, fastest {:.2} ms over {reps} batches",
        times[reps / 2],
        times[0]
    );

    let (rows, index) = (65_536, 1_000_000);
    let (_, active) = synth.batch_with_active(rows, index);
    let mut count_g = vec![0u64; cfg.n_features];
    active
        .features
        .iter()
        .for_each(|&g| count_g[g as usize] += 1);
    let seen = count_g.iter().filter(|&&c| c > 0).count();
    println!(
        "mean L0 over {rows} rows: {:.2}; {seen} of {} features fired at least once",
        active.mean_l0(),
        cfg.n_features
    );
    let t = Instant::now();
    let overlap = synth.overlap();
    println!(
        "pairwise |cos| of the true features: mean {:.4}, max {:.3} (measured in {:.1} s)",
        overlap.mean_abs_cos,
        overlap.max_abs_cos,
        t.elapsed().as_secs_f64()
    );
    // Children sit at child_similarity to their parents by construction; the roots alone show
    // what the shared component and the dimension leave.
    let roots = cfg.n_features - cfg.n_children();
    let root_overlap =
        sparse_autoencoder::synth::overlap(synth.true_features().slice(ndarray::s![..roots, ..]));
    println!(
        "among the {roots} roots: mean {:.4}, max {:.3}",
        root_overlap.mean_abs_cos, root_overlap.max_abs_cos
    );
    Ok(())
}
