//! `sae eval`: an SAE's reconstruction, sparsity and feature density on activations, and its
//! recovery of known features.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::Result;
use clap::Args;
use sparse_autoencoder::backend::Device;
use sparse_autoencoder::data::{NpyShards, Source};
use sparse_autoencoder::dist::{agree, Grid, World};
use sparse_autoencoder::eval::{evaluate_on_until_across, evaluate_shard_until, EvalStats};
use sparse_autoencoder::synth::{recovery, score, Synth, SynthConfig};
use sparse_autoencoder::Sae;

use super::{at_least_one, usage, UsageError};

/// `sae eval`'s options.
#[derive(Args)]
pub struct EvalArgs {
    /// The SAE: a run directory (or a sweep's SAE subdirectory) holding sae.safetensors.
    #[arg(value_name = "SAE_DIR")]
    sae: PathBuf,
    /// Activations to evaluate on: .npy files, directories or globs, as `sae train --data`.
    #[arg(long, num_args = 1.., value_name = "PATH", required_unless_present = "true_features")]
    data: Vec<PathBuf>,
    /// A G×D .npy of known feature directions, or a directory `sae synth` wrote: report how
    /// many the decoder recovered (MCC, fraction at cosine >= 0.9). With the set's synth.json
    /// beside it (as `sae synth` writes), also how the matched latents fire against their
    /// features (F1, precision, recall) on regenerated rows.
    #[arg(long, value_name = "PATH")]
    true_features: Option<PathBuf>,
    /// Rows regenerated from synth.json to score the matched latents' firing.
    #[arg(long, default_value_t = 16384, value_parser = at_least_one, allow_negative_numbers = true)]
    firing_rows: usize,
    /// Where eval.json, feature_density.npy and density.png go [default: SAE_DIR, replacing
    /// the run's own held-out evaluation].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Rows encoded at a time.
    #[arg(long, default_value_t = 4096, value_parser = at_least_one, allow_negative_numbers = true)]
    batch_size: usize,
    /// Skip rows holding NaN or Inf instead of stopping at the first.
    #[arg(long)]
    skip_non_finite: bool,
    /// Under mpirun: each rank loads only its F/S latents of the SAE, for one too large for a
    /// process (as `sae train --latent-shards`); groups of S ranks split the rows. CPU only,
    /// without --true-features.
    #[arg(long, value_name = "S", default_value_t = 1, value_parser = at_least_one, allow_negative_numbers = true)]
    latent_shards: usize,
    #[command(flatten)]
    device: super::DeviceArgs,
}

/// Runs `sae eval`. Under an MPI launcher every process opens the SAE and the data and
/// evaluates its part of the rows; rank 0 prints and writes every file.
pub fn run(args: EvalArgs, world: &World) -> Result<Option<u8>> {
    let collective = world.collective();
    let lead = collective.rank() == 0;
    // Refused alike on every rank before any split: agreed, so one line reports it.
    let grid = Grid::new(collective.clone(), args.latent_shards).map_err(usage);
    let (grid, _) = agree(&*collective, grid, false)?;
    if grid.shards > 1 {
        return run_sharded(&args, &grid);
    }
    let ((device, sae, out, rows), _) = agree(&*collective, open(&args, lead), false)?;
    let stats = match &rows {
        Some(rows) => {
            if lead {
                for notice in rows.notices() {
                    println!("note: {notice}");
                }
            }
            let never = AtomicBool::new(false);
            let stats = evaluate_on_until_across(
                &sae,
                device,
                rows,
                args.batch_size,
                args.skip_non_finite,
                &never,
                &*collective,
            )
            .map_err(usage)?;
            Some(stats.expect("the stop flag is never set"))
        }
        None => None,
    };
    let written = if lead {
        report(&args, &sae, device, &out, stats.as_ref())
    } else {
        Ok(())
    };
    agree(&*collective, written, false)?;
    Ok(None)
}

/// `sae eval --latent-shards S` (S > 1): every rank holds its shard of the SAE; rank 0 prints
/// and writes the whole SAE's figures.
fn run_sharded(args: &EvalArgs, grid: &Grid) -> Result<Option<u8>> {
    let lead = grid.world.rank() == 0;
    let opened = open_shard(args, grid, lead);
    let (((shard, global), out, rows), _) = agree(&*grid.world, opened, false)?;
    let never = AtomicBool::new(false);
    let rows = rows.expect("--data is required without --true-features");
    if lead {
        for notice in rows.notices() {
            println!("note: {notice}");
        }
    }
    let stats = evaluate_shard_until(
        &shard,
        &global,
        &rows,
        args.batch_size,
        args.skip_non_finite,
        &never,
        grid,
    )
    .map_err(usage)?
    .expect("the stop flag is never set");
    let written = if lead {
        report(args, &shard, Device::Cpu, &out, Some(&stats))
    } else {
        Ok(())
    };
    agree(&*grid.world, written, false)?;
    Ok(None)
}

/// [`open`] for a latent shard: this rank's latents of the SAE and the whole SAE's config.
#[allow(clippy::type_complexity)]
fn open_shard(
    args: &EvalArgs,
    grid: &Grid,
    lead: bool,
) -> Result<(
    (Sae, sparse_autoencoder::SaeConfig),
    PathBuf,
    Option<NpyShards>,
)> {
    if args.true_features.is_some() {
        return Err(UsageError(
            "--true-features needs the whole decoder on one process: drop --latent-shards, \
             or score recovery separately"
                .into(),
        )
        .into());
    }
    if args.device.device()? != Device::Cpu {
        return Err(UsageError(
            "--latent-shards above 1 evaluates on the CPU only; drop --device".into(),
        )
        .into());
    }
    let mut loaded = Sae::load_shard(&args.sae, grid.shard, grid.shards).map_err(usage)?;
    args.device.set_precision(&mut loaded.0)?;
    let (out, rows) = open_output_and_data(args, &loaded.0, lead)?;
    Ok((loaded, out, rows))
}

/// What every process needs before evaluating: the device, the SAE, the output directory
/// (made by the lead) and the data, checked against the SAE.
fn open(args: &EvalArgs, lead: bool) -> Result<(Device, Sae, PathBuf, Option<NpyShards>)> {
    let device = args.device.device()?;
    let mut sae = Sae::load(&args.sae).map_err(usage)?;
    args.device.set_precision(&mut sae)?;
    // Before anything is written: a device that cannot run leaves --out untouched.
    device.check().map_err(usage)?;
    let (out, rows) = open_output_and_data(args, &sae, lead)?;
    Ok((device, sae, out, rows))
}

/// The output directory (made by the lead) and the data, checked against `sae` (the whole
/// SAE or one shard: the batch's memory is checked at its latents).
fn open_output_and_data(
    args: &EvalArgs,
    sae: &Sae,
    lead: bool,
) -> Result<(PathBuf, Option<NpyShards>)> {
    let out = args.out.clone().unwrap_or_else(|| args.sae.clone());
    if lead {
        std::fs::create_dir_all(&out)
            .map_err(|err| UsageError(format!("invalid --out {}: {err}", out.display())))?;
    }
    if args.data.is_empty() {
        return Ok((out, None));
    }
    let rows = NpyShards::open(&args.data)?;
    if rows.d_model() != sae.config().d_model {
        return Err(UsageError(format!(
            "invalid --data: its rows are {} wide but the SAE in {} takes {}",
            rows.d_model(),
            args.sae.display(),
            sae.config().d_model
        ))
        .into());
    }
    super::encode::check_batch_memory(
        args.batch_size,
        rows.n_rows(),
        sae.config().d_model,
        sae.config().dict_size,
    )?;
    Ok((out, Some(rows)))
}

/// The lead's part: prints `stats`, scores --true-features, and writes the files into `out`.
fn report(
    args: &EvalArgs,
    sae: &Sae,
    device: Device,
    out: &Path,
    stats: Option<&EvalStats>,
) -> Result<()> {
    let mut report = serde_json::Map::new();
    if let Some(stats) = stats {
        let histogram = stats.density_histogram(1)?;
        println!("rows          {}", stats.n_rows);
        if stats.skipped_rows > 0 {
            println!("skipped       {} (non-finite)", stats.skipped_rows);
        }
        println!("mse           {:.6}", stats.mse);
        println!("fve           {:.4}", stats.fve);
        println!("l0            {:.2}", stats.l0);
        println!(
            "dead          {:.4}  (never fired on these rows)",
            stats.dead_fraction
        );
        println!("cos(x, x̂)     {:.4}", stats.cosine);
        println!("‖x̂‖/‖x‖       {:.4}", stats.shrinkage);
        println!("feature density (latents per decade of firing frequency):");
        println!("  never fired   {}", histogram.dead);
        for (i, count) in histogram.counts.iter().enumerate() {
            let (lo, hi) = (histogram.edges_log10[i], histogram.edges_log10[i + 1]);
            println!("  1e{lo:<3} – 1e{hi:<3} {count}");
        }
        sparse_autoencoder::io::write_feature_density(&out.join("feature_density.npy"), stats)?;
        sparse_autoencoder::plot::density_histogram(
            &stats.firing_frequency_f(),
            &out.join("density.png"),
        )?;
        report.insert("eval".into(), serde_json::to_value(stats)?);
    }
    if let Some(given) = &args.true_features {
        // A directory is one `sae synth` wrote; a file may have its synth.json beside it.
        let (path, config_path) = if given.is_dir() {
            (
                given.join("true_features.npy"),
                given.join(super::synth::CONFIG_FILE),
            )
        } else {
            let dir = given.parent().unwrap_or(Path::new("."));
            (given.clone(), dir.join(super::synth::CONFIG_FILE))
        };
        let path = &path;
        let features = NpyShards::open(&[path])?;
        if features.d_model() != sae.config().d_model {
            return Err(UsageError(format!(
                "invalid --true-features {}: its rows are {} wide but the SAE takes {}",
                path.display(),
                features.d_model(),
                sae.config().d_model
            ))
            .into());
        }
        let g = features.n_rows() as usize;
        let d = features.d_model();
        // The file is read whole: its declared size must fit in memory (a sparse file can
        // declare any size).
        let mut values = Vec::new();
        if g.checked_mul(d)
            .is_none_or(|n| values.try_reserve_exact(n).is_err())
        {
            return Err(UsageError(format!(
                "invalid --true-features {}: {g} rows of {d} floats do not fit in memory; \
                 give a G×D array of true features",
                path.display()
            ))
            .into());
        }
        values.resize(g * d, 0.0f32);
        let mut features_gd =
            ndarray::Array2::from_shape_vec((g, d), values).expect("g·d values were allocated");
        features.read_rows(0, features_gd.as_slice_mut().expect("standard layout"))?;
        if let Some(((row, column), v)) = features_gd.indexed_iter().find(|(_, v)| !v.is_finite()) {
            return Err(UsageError(format!(
                "invalid --true-features {}: {v} at row {row}, column {column}; true features \
                 must be finite directions",
                path.display()
            ))
            .into());
        }
        let score = match synth_of(&config_path, features_gd.view())? {
            Some(synth) => score(sae, device, &synth, args.firing_rows, u64::MAX)?,
            None => {
                println!(
                    "note: no {} beside {}: the firing scores (F1, precision, recall) need the \
                     set's configuration, which `sae synth` writes",
                    super::synth::CONFIG_FILE,
                    path.display()
                );
                recovery(features_gd.view(), sae.w_dec_fd())?
            }
        };
        println!(
            "recovered {:.1}% of the {g} true features at cosine >= 0.9 (MCC {:.3}, mean best cosine {:.3})",
            100.0 * score.fraction_above_0_9,
            score.mcc,
            score.mean_max_cosine
        );
        if let Some(firing) = &score.firing {
            println!("{}", super::firing_line(firing));
        }
        report.insert("recovery".into(), serde_json::to_value(score)?);
    }
    let path = out.join("eval.json");
    let text = serde_json::to_string_pretty(&report)?;
    sparse_autoencoder::io::write_atomic(&path, text.as_bytes())?;
    println!("wrote {}", path.display());
    Ok(())
}

/// The synthetic set `config_path` (a synth.json) describes, checked to have `features_gd` as
/// its true features; `None` when there is no such file.
fn synth_of(
    config_path: &Path,
    features_gd: ndarray::ArrayView2<'_, f32>,
) -> Result<Option<Synth>> {
    let text = match std::fs::read_to_string(config_path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => {
            return Err(UsageError(format!(
                "invalid --true-features: reading {} failed: {err}",
                config_path.display()
            ))
            .into())
        }
    };
    let bad = |why: String| -> anyhow::Error {
        UsageError(format!(
            "invalid --true-features: {} {why}; regenerate the set with `sae synth`, or remove \
             the file to score the decoder alone",
            config_path.display()
        ))
        .into()
    };
    let config: SynthConfig = serde_json::from_str(&text)
        .map_err(|err| bad(format!("is not a synthetic set's configuration ({err})")))?;
    let synth = Synth::new(config).map_err(|err| bad(format!("is invalid ({err})")))?;
    if synth.true_features() != features_gd {
        return Err(bad(
            "describes other true features than the file beside it".into()
        ));
    }
    Ok(Some(synth))
}
