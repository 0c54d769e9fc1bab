//! A training run as the `sae` command runs it: the resolved configuration, several SAEs fed
//! from one pass over the data (a sweep), metrics, checkpoints, resumption and the end-of-run
//! evaluation, all in one run directory.
//!
//! A run directory holds `config.toml` (the resolved [`RunSpec`]) and, for each SAE, its
//! weights (`sae.safetensors`, `sae.json`), `metrics.jsonl`, `eval.json`,
//! `feature_density.npy` and the plots. A single SAE lives in the run directory itself (so the
//! run directory is loadable as an SAE); the SAEs of a sweep each get a subdirectory named after
//! them. `checkpoint/` holds the whole run's state.

mod checkpoint;
mod metrics;
mod spec;

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ndarray::Array2;
use serde::{Deserialize, Serialize};

pub use metrics::MetricsRecord;
pub use spec::{ArchName, Context, DataSpec, RunSpec, SaeSpec, ScheduleSpec};

use crate::config::ConfigError;
use crate::data::{
    estimate_scale, holdout, Batcher, Cursor, LoaderConfig, NpyShards, Prefetcher, Source,
};
use crate::error::{io_error, Error, Result};
use crate::eval::{evaluate_on, EvalStats};
use crate::synth::{recovery, Recovery, Synth, SynthConfig};
use crate::{StepStats, Trainer};

/// Held-out fraction when the spec names neither eval files nor a fraction.
pub const DEFAULT_EVAL_FRACTION: f64 = 0.01;
/// Rows of the synthetic set evaluated at the end (a batch index training never reaches).
const SYNTH_EVAL_ROWS: usize = 16384;
/// Default steps between lines of `metrics.jsonl`.
const DEFAULT_METRICS_EVERY: u64 = 10;

/// Where a run's training batches come from.
enum Batches {
    /// The built-in synthetic rows: batch s is a pure function of (seed, s), so a resumed run
    /// needs only the step.
    Synthetic(Box<Synth>),
    /// Shuffled batches from `.npy` shards on a background thread.
    Loader(Prefetcher),
}

/// One SAE of the run.
struct Member {
    name: String,
    dir: PathBuf,
    trainer: Trainer,
    metrics: BufWriter<File>,
}

/// What an observer is shown after each step.
#[derive(Debug)]
pub struct Progress<'a> {
    /// Steps done.
    pub step: u64,
    /// Steps the run will take.
    pub total_steps: u64,
    /// Training rows consumed.
    pub tokens: u64,
    /// Seconds of training so far, earlier sessions of a resumed run included.
    pub seconds: f64,
    /// Each SAE's statistics of this step, in the order of [`Run::names`].
    pub stats: &'a [StepStats],
}

/// Receives a run's progress (the `sae` binary draws a bar or prints log lines).
pub trait Observer {
    /// Called after every step.
    fn step(&mut self, progress: &Progress<'_>);
    /// A one-line notice (normalisation scale, skipped rows, a checkpoint written).
    fn note(&mut self, line: &str);
}

/// An observer that ignores everything.
impl Observer for () {
    fn step(&mut self, _: &Progress<'_>) {}
    fn note(&mut self, _: &str) {}
}

/// How a call to [`Run::train`] ended.
#[derive(Debug)]
pub enum Outcome {
    /// Every step taken; each SAE saved and evaluated.
    Finished(Vec<Summary>),
    /// Stopped at the caller's request after `step` steps, with a checkpoint written.
    Interrupted {
        /// Steps done.
        step: u64,
    },
}

/// One trained SAE's results.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Its name in the run.
    pub name: String,
    /// Its directory.
    #[serde(skip)]
    pub dir: PathBuf,
    /// Reconstruction and sparsity on the held-out rows (none when nothing was held out).
    pub eval: Option<EvalStats>,
    /// Recovery of the true features, on the synthetic set.
    pub recovery: Option<Recovery>,
    /// Training rows skipped for holding NaN or ±Inf (each time an epoch met them).
    pub skipped_rows: u64,
    /// Seconds of training.
    pub seconds: f64,
}

/// The state of a whole run that is not in its trainers, as `checkpoint/run.json` holds it.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct RunState {
    step: u64,
    seconds: f64,
    /// The factor the rows are trained at (normalisation), folded in when saving.
    scale: f32,
    /// The loader's position (none on the synthetic set).
    cursor: Option<Cursor>,
}

/// The data a run trains and evaluates on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataSummary {
    /// D.
    pub d_model: usize,
    /// `.npy` files of training data (0 for the synthetic set).
    pub files: usize,
    /// Training rows (`None` for the synthetic set, an endless stream).
    pub train_rows: Option<u64>,
    /// Held-out rows evaluated at the end.
    pub eval_rows: Option<u64>,
}

/// A run: its SAEs, data and directory. Build it with [`Run::create`] or [`Run::resume`], then
/// call [`Run::train`].
pub struct Run {
    dir: PathBuf,
    spec: RunSpec,
    members: Vec<Member>,
    batches: Batches,
    eval_rows: Option<Arc<dyn Source>>,
    true_features_gd: Option<Array2<f32>>,
    scale: f32,
    batch_size: usize,
    total_steps: u64,
    metrics_every: u64,
    checkpoint_every: Option<u64>,
    skip_non_finite: bool,
    step: u64,
    seconds_before: f64,
    notes: Vec<String>,
    data: DataSummary,
    /// Where the SAEs train, and where the end-of-run evaluation encodes.
    device: crate::backend::Device,
}

/// The data of a run, opened.
struct Opened {
    files: usize,
    train_rows: Option<Arc<dyn Source>>,
    eval_rows: Option<Arc<dyn Source>>,
    synth: Option<Synth>,
    d_model: usize,
    notes: Vec<String>,
}

fn open_data(spec: &RunSpec, seed: u64) -> Result<Opened> {
    let data = &spec.data;
    if data.paths.is_empty() {
        let synth = Synth::new(SynthConfig {
            seed,
            ..spec.synthetic.clone().unwrap_or_default()
        })?;
        let eval_rows: Arc<dyn Source> = Arc::new(synth.batch(SYNTH_EVAL_ROWS, u64::MAX));
        return Ok(Opened {
            files: 0,
            train_rows: None,
            eval_rows: Some(eval_rows),
            d_model: synth.config().d_model,
            synth: Some(synth),
            notes: Vec::new(),
        });
    }
    let shards = NpyShards::open(&data.paths)?;
    let mut notes = shards.notices().to_vec();
    let (d_model, files) = (shards.d_model(), shards.shards().count());
    let all: Arc<dyn Source> = Arc::new(shards);
    let (train_rows, eval_rows): (Arc<dyn Source>, Option<Arc<dyn Source>>) =
        if !data.eval_paths.is_empty() {
            let eval = NpyShards::open(&data.eval_paths)?;
            notes.extend(eval.notices().iter().cloned());
            if eval.d_model() != d_model {
                return Err(crate::data::DataError::WidthMismatch {
                    path: data.eval_paths[0].clone(),
                    d_model: eval.d_model(),
                    first_path: data.paths[0].clone(),
                    first_d_model: d_model,
                }
                .into());
            }
            (all, Some(Arc::new(eval)))
        } else {
            let fraction = data.eval_fraction.unwrap_or(DEFAULT_EVAL_FRACTION);
            let rounds_to_nothing = (fraction * all.n_rows() as f64).round() < 1.0;
            if fraction == 0.0 || (data.eval_fraction.is_none() && rounds_to_nothing) {
                (all, None)
            } else {
                // The split's own seed: the held-out rows stay the same across seeds of a sweep
                // of runs, so their evaluations compare.
                let (train, eval) = holdout(all, fraction, 0)?;
                (Arc::new(train), Some(Arc::new(eval)))
            }
        };
    Ok(Opened {
        files,
        train_rows: Some(train_rows),
        eval_rows,
        synth: None,
        d_model,
        notes,
    })
}

/// The config file of a run directory.
const CONFIG_FILE: &str = "config.toml";

impl Run {
    /// Starts a run of `spec` in `dir`: opens the data, resolves every default, writes
    /// `config.toml` and builds the SAEs. `dir` must be empty or absent unless `force`, which
    /// clears a previous run's files from it.
    pub fn create(spec: &RunSpec, dir: &Path, force: bool) -> Result<Run> {
        check_schedule(spec)?;
        let seed = spec.train.seed.unwrap_or(0);
        crate::memory::check_synthetic(spec, SYNTH_EVAL_ROWS)?;
        let mut opened = open_data(spec, seed)?;
        let synthetic = opened.synth.is_some();
        let batch_size = spec
            .train
            .batch_size
            .unwrap_or(if synthetic { 1024 } else { 4096 });
        let total_steps = match (spec.train.steps, spec.train.tokens) {
            (Some(_), Some(_)) => return Err(ConfigError::StepsAndTokens.into()),
            (Some(steps), None) => steps,
            (None, Some(tokens)) => tokens.div_ceil(batch_size as u64),
            (None, None) if synthetic => 3000,
            (None, None) => 10_000,
        };
        let cx = Context {
            d_model: opened.d_model,
            synthetic,
            steps: total_steps,
            batch_size,
        };
        let specs = if spec.sae.is_empty() {
            vec![SaeSpec::default()]
        } else {
            spec.sae.clone()
        };
        let mut resolved_saes = Vec::with_capacity(specs.len());
        let mut configs = Vec::with_capacity(specs.len());
        for sae_spec in &specs {
            let (resolved, sae_config, train_config) = sae_spec.resolve(cx)?;
            resolved_saes.push(resolved);
            configs.push((sae_config, train_config));
        }
        let names: Vec<String> = resolved_saes
            .iter()
            .map(|s| s.name.clone().expect("resolved"))
            .collect();
        check_names(&names, dir)?;
        let resolved = RunSpec {
            data: DataSpec {
                eval_fraction: (!synthetic && spec.data.eval_paths.is_empty())
                    .then(|| spec.data.eval_fraction.unwrap_or(DEFAULT_EVAL_FRACTION)),
                ..spec.data.clone()
            },
            train: ScheduleSpec {
                batch_size: Some(batch_size),
                steps: Some(total_steps),
                tokens: None,
                seed: Some(seed),
                metrics_every: Some(spec.train.metrics_every.unwrap_or(DEFAULT_METRICS_EVERY)),
                checkpoint_every: spec.train.checkpoint_every,
                max_memory: spec.train.max_memory,
            },
            sae: resolved_saes,
            synthetic: opened.synth.as_ref().map(|s| SynthConfig {
                seed: 0,
                ..s.config().clone()
            }),
        };

        // Every option is checked before the directory is touched.
        loader_config(&resolved, 1.0).validate()?;
        let train_n = opened.train_rows.as_ref().map(|rows| rows.n_rows());
        let loader = loader_config(&resolved, 1.0);
        crate::memory::check_run(&resolved, opened.d_model, &loader, train_n, SYNTH_EVAL_ROWS)?;
        prepare_dir(dir, force)?;
        let text = toml::to_string_pretty(&resolved).expect("a RunSpec always serialises");
        crate::io::write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())?;

        let mut notes = std::mem::take(&mut opened.notes);
        let train_rows = opened.train_rows.clone();
        let scale = match &train_rows {
            Some(rows) if spec.data.normalize => {
                let c = estimate_scale(&**rows, seed, spec.data.skip_non_finite)?;
                notes.push(format!(
                    "normalising: training on the activations times {c:.6} (mean norm √{})",
                    opened.d_model
                ));
                c
            }
            _ => 1.0,
        };
        let mut members = Vec::with_capacity(configs.len());
        for (name, (sae_config, train_config)) in names.iter().zip(configs) {
            let member_dir = member_dir(dir, name, names.len());
            fs::create_dir_all(&member_dir).map_err(io_error(&member_dir, "creating"))?;
            let sae = crate::Sae::new(sae_config, seed)?;
            members.push(Member {
                name: name.clone(),
                metrics: open_metrics(&member_dir, None)?,
                dir: member_dir,
                trainer: Trainer::new(sae, train_config)?,
            });
        }
        let batches = match (train_rows, opened.synth.take()) {
            (_, Some(synth)) => Batches::Synthetic(Box::new(synth)),
            (Some(rows), None) => {
                let config = loader_config(&resolved, scale);
                Batches::Loader(Prefetcher::new(Batcher::new(rows, config)?))
            }
            (None, None) => unreachable!("open_data gives rows or the synthetic set"),
        };
        Ok(Run::assemble(
            resolved, dir, members, batches, opened, scale, notes,
        ))
    }

    /// Continues the run in `dir` from its checkpoint: the same batches, in the same order, as
    /// if it had never stopped.
    pub fn resume(dir: &Path) -> Result<Run> {
        let config_path = dir.join(CONFIG_FILE);
        let text = fs::read_to_string(&config_path).map_err(|err| match err.kind() {
            std::io::ErrorKind::NotFound => Error::RunDir {
                path: dir.to_path_buf(),
                reason: format!(
                    "no {CONFIG_FILE}: not a run directory; start the run with --out instead \
                     of --resume"
                ),
            },
            _ => io_error(&config_path, "reading")(err),
        })?;
        let spec: RunSpec = toml::from_str(&text).map_err(|err| Error::RunDir {
            path: config_path.clone(),
            reason: format!(
                "malformed: {}; restore the file the run wrote",
                err.message()
            ),
        })?;
        let (state, trainers) = checkpoint::load(dir, &spec)?;
        let seed = spec.train.seed.unwrap_or(0);
        crate::memory::check_synthetic(&spec, SYNTH_EVAL_ROWS)?;
        let mut opened = open_data(&spec, seed)?;
        let train_n = opened.train_rows.as_ref().map(|rows| rows.n_rows());
        let loader = loader_config(&spec, state.scale);
        crate::memory::check_run(&spec, opened.d_model, &loader, train_n, SYNTH_EVAL_ROWS)?;
        let names: Vec<String> = spec.sae.iter().filter_map(|s| s.name.clone()).collect();
        let mut members = Vec::with_capacity(names.len());
        for (name, trainer) in names.iter().zip(trainers) {
            let member_dir = member_dir(dir, name, names.len());
            members.push(Member {
                name: name.clone(),
                metrics: open_metrics(&member_dir, Some(state.step))?,
                dir: member_dir,
                trainer,
            });
        }
        let batches = match (
            opened.train_rows.clone(),
            opened.synth.take(),
            &state.cursor,
        ) {
            (_, Some(synth), _) => Batches::Synthetic(Box::new(synth)),
            (Some(rows), None, Some(cursor)) => {
                let config = loader_config(&spec, state.scale);
                Batches::Loader(Prefetcher::new(Batcher::with_cursor(rows, config, cursor)?))
            }
            _ => {
                return Err(Error::RunDir {
                    path: dir.join(checkpoint::DIR),
                    reason: "the checkpoint has no data cursor for this run's data; start again"
                        .into(),
                })
            }
        };
        let notes = std::mem::take(&mut opened.notes);
        let mut run = Run::assemble(spec, dir, members, batches, opened, state.scale, notes);
        run.step = state.step;
        run.seconds_before = state.seconds;
        Ok(run)
    }

    fn assemble(
        spec: RunSpec,
        dir: &Path,
        members: Vec<Member>,
        batches: Batches,
        opened: Opened,
        scale: f32,
        notes: Vec<String>,
    ) -> Run {
        let eval_rows = opened.eval_rows;
        let data = DataSummary {
            d_model: opened.d_model,
            files: opened.files,
            train_rows: opened.train_rows.as_ref().map(|rows| rows.n_rows()),
            eval_rows: eval_rows.as_ref().map(|rows| rows.n_rows()),
        };
        let true_features_gd = match &batches {
            Batches::Synthetic(synth) => Some(synth.true_features().to_owned()),
            Batches::Loader(_) => None,
        };
        Run {
            dir: dir.to_path_buf(),
            batch_size: spec.train.batch_size.expect("resolved"),
            total_steps: spec.train.steps.expect("resolved"),
            metrics_every: spec.train.metrics_every.expect("resolved"),
            checkpoint_every: spec.train.checkpoint_every,
            skip_non_finite: spec.data.skip_non_finite,
            spec,
            members,
            batches,
            eval_rows,
            true_features_gd,
            scale,
            step: 0,
            seconds_before: 0.0,
            notes,
            device: crate::backend::Device::Cpu,
            data,
        }
    }

    /// The data the run trains and evaluates on.
    pub fn data(&self) -> DataSummary {
        self.data
    }

    /// The resolved configuration, as `config.toml` holds it.
    pub fn spec(&self) -> &RunSpec {
        &self.spec
    }

    /// The SAEs' names, in the order of [`Progress::stats`].
    pub fn names(&self) -> Vec<&str> {
        self.spec
            .sae
            .iter()
            .filter_map(|s| s.name.as_deref())
            .collect()
    }

    /// Moves every SAE's training to `device` (the CPU by default). Where a run trains is not
    /// part of its configuration: a run checkpointed on a GPU resumes on the CPU, or the
    /// other way round, with the same state.
    pub fn set_device(&mut self, device: crate::backend::Device) -> Result<()> {
        for member in &mut self.members {
            member.trainer.set_device(device)?;
        }
        self.device = device;
        Ok(())
    }

    /// Steps done so far (non-zero after [`Run::resume`]).
    pub fn steps_done(&self) -> u64 {
        self.step
    }

    /// Steps the run takes in all.
    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }

    /// Trains to the end, or until `stop` is set (checked after every step; a checkpoint is
    /// then written). Every SAE sees every batch. At the end each SAE is saved with the input
    /// scale folded in, evaluated on the held-out rows, and plotted.
    pub fn train(&mut self, observer: &mut dyn Observer, stop: &AtomicBool) -> Result<Outcome> {
        for note in std::mem::take(&mut self.notes) {
            observer.note(&note);
        }
        let start = Instant::now();
        let mut stats = vec![StepStats::default(); self.members.len()];
        while self.step < self.total_steps {
            if stop.load(Ordering::Relaxed) {
                self.checkpoint(self.seconds_before + start.elapsed().as_secs_f64())?;
                return Ok(Outcome::Interrupted { step: self.step });
            }
            let batch = match &mut self.batches {
                Batches::Synthetic(synth) => Batch::Owned(synth.batch(self.batch_size, self.step)),
                Batches::Loader(loader) => Batch::Loaded(loader.next_batch()?),
            };
            for (member, stats) in self.members.iter_mut().zip(&mut stats) {
                *stats = member.trainer.step(batch.view())?;
            }
            drop(batch);
            self.step += 1;
            let seconds = self.seconds_before + start.elapsed().as_secs_f64();
            let tokens = self.step * self.batch_size as u64;
            if self.step % self.metrics_every == 0 || self.step == self.total_steps {
                for (member, stats) in self.members.iter_mut().zip(&stats) {
                    let record = MetricsRecord::new(self.step, tokens, stats, seconds);
                    let line = serde_json::to_string(&record).expect("records serialise");
                    let path = member.dir.join(metrics::FILE);
                    writeln!(member.metrics, "{line}")
                        .and_then(|()| member.metrics.flush())
                        .map_err(io_error(&path, "writing"))?;
                }
            }
            observer.step(&Progress {
                step: self.step,
                total_steps: self.total_steps,
                tokens,
                seconds,
                stats: &stats,
            });
            if let Some(every) = self.checkpoint_every {
                if self.step % every == 0 && self.step < self.total_steps {
                    self.checkpoint(seconds)?;
                    observer.note(&format!("checkpoint at step {}", self.step));
                }
            }
        }
        let seconds = self.seconds_before + start.elapsed().as_secs_f64();
        let skipped_rows = match &self.batches {
            Batches::Loader(loader) => loader.skipped_rows(),
            Batches::Synthetic(_) => 0,
        };
        if skipped_rows > 0 {
            observer.note(&format!(
                "skipped {skipped_rows} non-finite rows (counted each time an epoch met one)"
            ));
        }
        let mut summaries = Vec::with_capacity(self.members.len());
        // Each trainer gives up its SAE here: its moments, gradients and step buffers are
        // freed before the evaluation allocates its own.
        for member in std::mem::take(&mut self.members) {
            summaries.push(self.finish(member, skipped_rows, seconds)?);
        }
        // The run is complete and saved: a checkpoint now would only invite resuming it.
        checkpoint::remove(&self.dir)?;
        Ok(Outcome::Finished(summaries))
    }

    /// Saves, evaluates and plots one SAE at the end of the run.
    fn finish(&self, member: Member, skipped_rows: u64, seconds: f64) -> Result<Summary> {
        let mut trainer = member.trainer;
        trainer.sync()?;
        let mut sae = trainer.into_sae();
        sae.fold_input_scale(self.scale)?;
        sae.save(&member.dir)?;
        let eval = match &self.eval_rows {
            Some(rows) => Some(evaluate_on(
                &sae,
                self.device,
                &**rows,
                self.batch_size,
                self.skip_non_finite,
            )?),
            None => None,
        };
        let recovery = match &self.true_features_gd {
            Some(true_gd) => Some(recovery(true_gd.view(), sae.w_dec_fd())?),
            None => None,
        };
        let summary = Summary {
            name: member.name.clone(),
            dir: member.dir.clone(),
            eval,
            recovery,
            skipped_rows,
            seconds,
        };
        let json = serde_json::to_string_pretty(&summary).expect("summaries serialise");
        crate::io::write_atomic(&member.dir.join("eval.json"), json.as_bytes())?;
        if let Some(eval) = &summary.eval {
            crate::io::write_feature_density(&member.dir.join("feature_density.npy"), eval)?;
        }
        crate::plot::redraw(&member.dir)?;
        Ok(summary)
    }

    /// Writes the whole run's state to `checkpoint/`, replacing the last one atomically.
    fn checkpoint(&mut self, seconds: f64) -> Result<()> {
        for member in &mut self.members {
            member.trainer.sync()?;
        }
        let state = RunState {
            step: self.step,
            seconds,
            scale: self.scale,
            cursor: match &self.batches {
                Batches::Loader(loader) => Some(loader.cursor().clone()),
                Batches::Synthetic(_) => None,
            },
        };
        let trainers: Vec<(&str, &Trainer)> = self
            .members
            .iter()
            .map(|m| (m.name.as_str(), &m.trainer))
            .collect();
        checkpoint::save(&self.dir, &state, &trainers)
    }
}

/// A batch borrowed from the loader or made for the synthetic set.
enum Batch {
    Owned(Array2<f32>),
    Loaded(crate::data::Batch),
}

impl Batch {
    fn view(&self) -> ndarray::ArrayView2<'_, f32> {
        match self {
            Batch::Owned(x_bd) => x_bd.view(),
            Batch::Loaded(batch) => batch.view(),
        }
    }
}

fn loader_config(spec: &RunSpec, scale: f32) -> LoaderConfig {
    LoaderConfig {
        batch_size: spec.train.batch_size.expect("resolved"),
        buffer_rows: spec.data.buffer_rows,
        seed: spec.train.seed.unwrap_or(0),
        skip_non_finite: spec.data.skip_non_finite,
        scale,
        ..LoaderConfig::default()
    }
}

/// The fields of a spec no SAE's resolution checks.
fn check_schedule(spec: &RunSpec) -> Result<()> {
    let t = &spec.train;
    if t.batch_size == Some(0) {
        return Err(ConfigError::ZeroBatchSize.into());
    }
    if t.metrics_every == Some(0) {
        return Err(ConfigError::ZeroInterval("metrics_every").into());
    }
    if t.checkpoint_every == Some(0) {
        return Err(ConfigError::ZeroInterval("checkpoint_every").into());
    }
    if t.tokens == Some(0) || t.steps == Some(0) {
        return Err(ConfigError::ZeroTotalSteps.into());
    }
    if let Some(fraction) = spec.data.eval_fraction {
        if !(0.0..1.0).contains(&fraction) {
            return Err(ConfigError::EvalFraction(fraction).into());
        }
    }
    Ok(())
}

/// Each SAE of a sweep needs its own directory: names must be distinct plain file names.
fn check_names(names: &[String], dir: &Path) -> Result<()> {
    for (i, name) in names.iter().enumerate() {
        let plain = !name.is_empty()
            && name != "."
            && name != ".."
            && name != checkpoint::DIR
            && !name.contains(['/', '\\']);
        if !plain {
            return Err(Error::RunDir {
                path: dir.to_path_buf(),
                reason: format!("SAE name {name:?} is not a plain directory name; rename it"),
            });
        }
        if names[..i].contains(name) {
            return Err(Error::RunDir {
                path: dir.to_path_buf(),
                reason: format!(
                    "two SAEs of the sweep are both named {name:?}; give them distinct names"
                ),
            });
        }
    }
    Ok(())
}

fn member_dir(dir: &Path, name: &str, n_members: usize) -> PathBuf {
    if n_members == 1 {
        dir.to_path_buf()
    } else {
        dir.join(name)
    }
}

/// Makes `dir` ready for a new run: created if absent; an existing run in it is an error, or
/// with `force` its files are removed.
fn prepare_dir(dir: &Path, force: bool) -> Result<()> {
    if dir.is_file() {
        return Err(Error::RunDir {
            path: dir.to_path_buf(),
            reason: "is a file; give --out a directory".into(),
        });
    }
    let holds_run = dir.join(CONFIG_FILE).exists();
    let non_empty = fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some());
    if non_empty && !force {
        let reason = if holds_run {
            "holds another run; pass --resume to continue it or --force to replace it"
        } else {
            "is not empty; choose a new --out directory or pass --force to write into it"
        };
        return Err(Error::RunDir {
            path: dir.to_path_buf(),
            reason: reason.into(),
        });
    }
    if holds_run && force {
        // Only what a run writes goes; anything else the user put there stays.
        let spec: Option<RunSpec> = fs::read_to_string(dir.join(CONFIG_FILE))
            .ok()
            .and_then(|text| toml::from_str(&text).ok());
        let mut dirs = vec![dir.to_path_buf()];
        for sae in spec.map(|s| s.sae).unwrap_or_default() {
            if let Some(name) = sae.name {
                if !name.contains(['/', '\\']) && name != ".." {
                    dirs.push(dir.join(name));
                }
            }
        }
        for d in dirs {
            for file in RUN_FILES {
                let path = d.join(file);
                if path.is_file() {
                    fs::remove_file(&path).map_err(io_error(&path, "removing"))?;
                }
            }
        }
        checkpoint::remove(dir)?;
    }
    fs::create_dir_all(dir).map_err(io_error(dir, "creating"))
}

/// Files a run writes into an SAE's directory.
const RUN_FILES: &[&str] = &[
    CONFIG_FILE,
    metrics::FILE,
    "eval.json",
    "feature_density.npy",
    "curves.png",
    "density.png",
    "sae.safetensors",
    "sae.json",
];

/// Opens `metrics.jsonl` for appending. Resuming at `resume_step` first drops the lines after
/// it (written after the checkpoint by the interrupted session), so the file reads as one
/// uninterrupted run.
fn open_metrics(dir: &Path, resume_step: Option<u64>) -> Result<BufWriter<File>> {
    let path = dir.join(metrics::FILE);
    match resume_step {
        None => {
            let file = File::create(&path).map_err(io_error(&path, "creating"))?;
            Ok(BufWriter::new(file))
        }
        Some(step) => {
            let text = match fs::read_to_string(&path) {
                Ok(text) => text,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(err) => return Err(io_error(&path, "reading")(err)),
            };
            let kept: String = text
                .lines()
                .filter(|line| {
                    serde_json::from_str::<MetricsRecord>(line).is_ok_and(|r| r.step <= step)
                })
                .map(|line| format!("{line}\n"))
                .collect();
            crate::io::write_atomic(&path, kept.as_bytes())?;
            let file = OpenOptions::new()
                .append(true)
                .open(&path)
                .map_err(io_error(&path, "opening"))?;
            Ok(BufWriter::new(file))
        }
    }
}
