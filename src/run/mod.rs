//! A training run as the `sae` command runs it: the resolved configuration, several SAEs fed
//! from one pass over the data (a sweep), metrics, checkpoints, resumption and the end-of-run
//! evaluation, all in one run directory.
//!
//! A run directory holds `config.toml` (the resolved [`RunSpec`]) and, for each SAE, its
//! weights (`sae.safetensors`, `sae.json`), `metrics.jsonl`, `eval.json`,
//! `feature_density.npy`, and the plots the caller draws from them ([`crate::plot::redraw`],
//! as `sae train` does). A single SAE lives in the run directory itself (so the
//! run directory is loadable as an SAE); the SAEs of a sweep each get a subdirectory named after
//! them. `checkpoint/` holds the whole run's state, and `run.lock` keeps a second process out
//! while a run is being created, trained or resumed.

mod checkpoint;
mod lock;
mod memory;
mod spec;

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ndarray::Array2;
use serde::{Deserialize, Serialize};

pub use crate::io::MetricsRecord;
pub use spec::{
    ArchName, Context, DataSpec, Given, RunSpec, SaeSpec, Schedule, ScheduleError, ScheduleSpec,
};

use crate::calibrate::calibrated_threshold;
use crate::config::{ConfigError, ThresholdRule};
use crate::data::{
    estimate_scale, holdout, Batcher, Cursor, DataError, LoaderConfig, NpyShards, Prefetcher,
    RowStream, Source, StreamConfig, StreamHead, StreamLoader, DEFAULT_BUFFER_BATCHES,
    SCALE_SAMPLE_ROWS,
};
use crate::dist::{agree, Collective, Grid, SingleProcess};
use crate::error::{io_error, Error, Result};
use crate::eval::{evaluate_on_until_across, evaluate_shard_until, EvalStats};
use crate::synth::{score, Recovery, Synth, SynthConfig};
use crate::{StepStats, Trainer};
use lock::RunLock;

/// Held-out fraction when the spec names neither eval files nor a fraction.
pub const DEFAULT_EVAL_FRACTION: f64 = 0.01;
/// Rows of the synthetic set evaluated at the end (a batch index training never reaches).
const SYNTH_EVAL_ROWS: usize = 16384;
/// Rows held out from the front of a stream by default: as many as the synthetic set's.
pub const DEFAULT_STREAM_EVAL_ROWS: u64 = SYNTH_EVAL_ROWS as u64;
/// Rows a calibrated θ is taken from, over every process (the issue's "at least 64k"):
/// enough that θ's rank, k·N, is estimated to well under 1% for any k.
pub const CALIBRATION_ROWS: usize = 65536;
/// Default steps between lines of `metrics.jsonl`.
const DEFAULT_METRICS_EVERY: u64 = 10;
/// What a stop before training means for the run.
const STOPPED_BEFORE_TRAINING: &str = "before training started; nothing to resume";
/// What a stop while a resume opens its data means for the run.
const STOPPED_BEFORE_RESUMING: &str =
    "before training resumed; the checkpoint is as it was, resume again to continue";

/// Where a run's training batches come from.
enum Batches {
    /// The built-in synthetic rows: batch s is a pure function of (seed, s), so a resumed run
    /// needs only the step.
    Synthetic(Box<Synth>),
    /// Shuffled batches from `.npy` shards or given rows on a background thread.
    Loader(Prefetcher),
    /// Shuffled batches from a stream handed in by the caller, on a background thread.
    Stream(StreamLoader),
}

/// Where a run's activations come from: what its spec names, or rows the caller hands in
/// (in memory, from a generator), which never touch the disk.
pub enum RunData {
    /// What `spec.data.paths` names: `.npy` files, or the built-in synthetic set when it
    /// names none.
    Spec,
    /// Rows with random access (an in-memory array, a [`Source`] of your own): shuffled, held
    /// out (`data.eval_fraction`) and evaluated exactly as `.npy` files holding the same
    /// rows, so a run on them is bit-identical to `sae train --data` on those files.
    Rows(Arc<dyn Source>),
    /// Arrays from a stream read once (a generator, a forward hook on a running model). The
    /// first `data.eval_rows` rows are held out; the rest pass through a shuffle buffer of
    /// `data.buffer_rows` rows (see [`StreamLoader`]) read on a background thread, so the
    /// producer works while the SAEs train. When the stream ends before the last step, the
    /// run ends there: the SAEs are saved and evaluated as at the last step, and
    /// [`Summary::steps`] says how far they got. The learning-rate schedule is the one
    /// planned for every step, so give `train.steps` (or `train.tokens`) to match the stream.
    Stream(Box<dyn RowStream>),
}

impl RunData {
    /// How `config.toml` records this data.
    fn given(&self) -> Option<Given> {
        match self {
            RunData::Spec => None,
            RunData::Rows(_) => Some(Given::Rows),
            RunData::Stream(_) => Some(Given::Stream),
        }
    }
}

/// One SAE of the run.
struct Member {
    name: String,
    dir: PathBuf,
    trainer: Trainer,
    /// Rank 0's `metrics.jsonl` (the other processes of a distributed run write nothing).
    metrics: Option<BufWriter<File>>,
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
    /// Every step taken and every SAE saved, but the caller's stop request ended the
    /// end-of-run evaluation early. The checkpoint is kept: [`Run::resume`] (`sae train
    /// --resume`) saves the same SAEs again and evaluates them; `sae eval` evaluates one.
    Unevaluated {
        /// Steps done (all of them).
        step: u64,
        /// The saved SAEs' directories.
        dirs: Vec<PathBuf>,
    },
}

/// What a resumed run may change: options that leave the batches already trained on as they
/// were. Each one given is recorded in `config.toml`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ResumeOptions {
    /// Skip rows holding NaN or ±Inf from now on (`--skip-non-finite`): a row that stopped
    /// the run is skipped, and the batches before it were made without meeting one. The
    /// shuffle (buffer size, seed) and the split cannot change on resume: they would change
    /// which rows the remaining batches hold.
    pub skip_non_finite: bool,
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
    /// Training rows skipped for holding NaN or ±Inf (each time a batch drew one).
    pub skipped_rows: u64,
    /// Steps trained: the run's steps, or fewer when a stream ended first.
    pub steps: u64,
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
    run: Resolved,
    members: Vec<Member>,
    batches: Batches,
    eval_rows: Option<Arc<dyn Source>>,
    scale: f32,
    step: u64,
    /// The step of the checkpoint on disk, if any: what a failure leaves to resume from.
    checkpointed: Option<u64>,
    seconds_before: f64,
    notes: Vec<String>,
    data: DataSummary,
    /// Where the SAEs train, and where the end-of-run evaluation encodes.
    device: crate::backend::Device,
    /// The processes sharing each global batch (this one alone, or an MPI job's).
    collective: Arc<dyn Collective>,
    /// The same processes in groups of latent shards (groups of one without sharding).
    grid: Grid,
    /// Held as long as the run (by rank 0): no other process uses the directory meanwhile.
    _lock: Option<RunLock>,
}

/// A run's configuration with nothing left to resolve: the spec as `config.toml` holds it,
/// its schedule and its SAEs' names.
struct Resolved {
    spec: RunSpec,
    schedule: Schedule,
    names: Vec<String>,
    /// Its `config.toml`, for errors.
    config_path: PathBuf,
}

impl Resolved {
    /// The run that a `config.toml` (at `path`, in the run directory `dir`) describes; an
    /// edited file missing a key or contradicting itself is an error naming the key.
    fn from_written(spec: RunSpec, path: &Path, dir: &Path) -> Result<Resolved> {
        let bad = |problem: String| Error::RunFile {
            path: path.to_path_buf(),
            problem,
            fix: "restore the file the run wrote".into(),
        };
        let schedule = spec.train.resolved().map_err(|err| bad(err.to_string()))?;
        if spec.sae.is_empty() {
            return Err(bad("it has no [[sae]] table".into()));
        }
        let mut names = Vec::with_capacity(spec.sae.len());
        for (i, sae) in spec.sae.iter().enumerate() {
            match &sae.name {
                Some(name) => names.push(name.clone()),
                None => return Err(bad(format!("`name` of [[sae]] table {} is missing", i + 1))),
            }
        }
        if let Some(fraction) = spec.data.eval_fraction {
            if !(0.0..1.0).contains(&fraction) {
                return Err(bad(ConfigError::EvalFraction(fraction).to_string()));
            }
        }
        if spec.data.eval_fraction.is_some() && !spec.data.eval_paths.is_empty() {
            return Err(bad(
                "`data.eval_fraction` and `data.eval_paths` are both set; a run holds out \
                 rows one way"
                    .into(),
            ));
        }
        check_names(&names, dir)?;
        Ok(Resolved {
            spec,
            schedule,
            names,
            config_path: path.to_path_buf(),
        })
    }
}

/// The data of a run, opened.
struct Opened {
    files: usize,
    train_rows: Option<Arc<dyn Source>>,
    /// A stream's front, past its held-out rows.
    stream: Option<StreamHead>,
    eval_rows: Option<Arc<dyn Source>>,
    synth: Option<Synth>,
    d_model: usize,
    notes: Vec<String>,
}

fn open_data(spec: &RunSpec, seed: u64, given: RunData) -> Result<Opened> {
    let data = &spec.data;
    check_given(data, &given)?;
    let all: Arc<dyn Source> = match given {
        RunData::Spec => return open_files(spec, seed),
        RunData::Rows(rows) => rows,
        RunData::Stream(stream) => return open_stream(data, stream),
    };
    let d_model = all.d_model();
    let (train_rows, eval_rows, notes) = held_out(data, all, d_model)?;
    Ok(Opened {
        files: 0,
        train_rows: Some(train_rows),
        stream: None,
        eval_rows,
        synth: None,
        d_model,
        notes,
    })
}

/// What `data` says of rows handed in, against what was handed in.
fn check_given(data: &DataSpec, given: &RunData) -> Result<()> {
    let problem = match (data.given, given.given()) {
        (Some(_), None) => Some(
            "`data.given` says the run's rows were handed in through the library (sparse_autoencoder::run::RunData), not read from `data.paths`; hand them in again (Run::resume_with), or remove the key to read `data.paths`".to_string(),
        ),
        (Some(written), Some(now)) if written != now => Some(format!(
            "`data.given` says the run's rows were handed in as {written:?}, but {now:?} was given now; hand in the same kind of data"
        )),
        (_, Some(_)) if !data.paths.is_empty() => Some(
            "`data.paths` names files, but rows were handed in as well; leave `data.paths` empty".to_string(),
        ),
        (_, Some(Given::Stream)) if data.eval_fraction.is_some() => Some(
            "`data.eval_fraction` needs a row count, which a stream does not have; set `data.eval_rows` (rows held out from the stream's front) instead".to_string(),
        ),
        (_, Some(Given::Rows)) if data.eval_rows.is_some() => Some(
            "`data.eval_rows` is for streams; rows with random access are held out by `data.eval_fraction`".to_string(),
        ),
        _ => None,
    };
    match problem {
        Some(reason) => Err(ConfigError::GivenData(reason).into()),
        None => Ok(()),
    }
}

/// Rows handed in as a stream: D from its first array, the held-out rows from its front.
fn open_stream(data: &DataSpec, stream: Box<dyn RowStream>) -> Result<Opened> {
    let mut head = StreamHead::open(stream)?;
    let d_model = head.d_model();
    let (eval_rows, notes): (Option<Arc<dyn Source>>, Vec<String>) = if !data.eval_paths.is_empty()
    {
        let eval = open_eval_files(data, d_model, "the stream's first array".into())?;
        let notes = eval.notices().to_vec();
        (Some(Arc::new(eval)), notes)
    } else {
        match data.eval_rows.unwrap_or(DEFAULT_STREAM_EVAL_ROWS) {
            0 => (None, Vec::new()),
            n => {
                let rows = head.take(usize::try_from(n).unwrap_or(usize::MAX))?;
                let notes = if (rows.nrows() as u64) < n {
                    vec![format!("the stream ended after {} rows, all of them held out for evaluation; nothing is left to train on", rows.nrows())]
                } else {
                    Vec::new()
                };
                (Some(Arc::new(rows)), notes)
            }
        }
    };
    Ok(Opened {
        files: 0,
        train_rows: None,
        stream: Some(head),
        eval_rows,
        synth: None,
        d_model,
        notes,
    })
}

/// `data.eval_paths`, opened and checked to be `d_model` wide like `first` (for the error).
fn open_eval_files(data: &DataSpec, d_model: usize, first: PathBuf) -> Result<NpyShards> {
    let eval = NpyShards::open(&data.eval_paths)?;
    if eval.d_model() != d_model {
        return Err(crate::data::DataError::WidthMismatch {
            path: data.eval_paths[0].clone(),
            d_model: eval.d_model(),
            first_path: first,
            first_d_model: d_model,
        }
        .into());
    }
    Ok(eval)
}

/// The training and held-out parts of `all`: `data.eval_paths` when given, else
/// `data.eval_fraction` of its rows.
#[allow(clippy::type_complexity)]
fn held_out(
    data: &DataSpec,
    all: Arc<dyn Source>,
    d_model: usize,
) -> Result<(Arc<dyn Source>, Option<Arc<dyn Source>>, Vec<String>)> {
    let mut notes = Vec::new();
    if !data.eval_paths.is_empty() {
        let first = data
            .paths
            .first()
            .cloned()
            .unwrap_or_else(|| "the rows handed in".into());
        let eval = open_eval_files(data, d_model, first)?;
        notes.extend(eval.notices().iter().cloned());
        return Ok((all, Some(Arc::new(eval)), notes));
    }
    let fraction = data.eval_fraction.unwrap_or(DEFAULT_EVAL_FRACTION);
    let rounds_to_nothing = (fraction * all.n_rows() as f64).round() < 1.0;
    if fraction == 0.0 || (data.eval_fraction.is_none() && rounds_to_nothing) {
        return Ok((all, None, notes));
    }
    // The split's own seed: the held-out rows stay the same across seeds of a sweep of runs,
    // so their evaluations compare.
    let (train, eval) = holdout(all, fraction, 0)?;
    Ok((Arc::new(train), Some(Arc::new(eval)), notes))
}

/// The data `spec.data.paths` names: `.npy` files, or the synthetic set when it names none.
fn open_files(spec: &RunSpec, seed: u64) -> Result<Opened> {
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
            stream: None,
            eval_rows: Some(eval_rows),
            d_model: synth.config().d_model,
            synth: Some(synth),
            notes: Vec::new(),
        });
    }
    let shards = NpyShards::open(&data.paths)?;
    let mut notes = shards.notices().to_vec();
    let (d_model, files) = (shards.d_model(), shards.shards().count());
    let (train_rows, eval_rows, more) = held_out(data, Arc::new(shards), d_model)?;
    notes.extend(more);
    Ok(Opened {
        files,
        train_rows: Some(train_rows),
        stream: None,
        eval_rows,
        synth: None,
        d_model,
        notes,
    })
}

/// A new run, resolved and its data opened, before anything is written.
struct NewRun {
    opened: Opened,
    /// The spec with every default filled in, as `config.toml` will hold it.
    resolved: RunSpec,
    schedule: Schedule,
    names: Vec<String>,
    configs: Vec<(crate::SaeConfig, crate::TrainConfig)>,
    notes: Vec<String>,
}

impl NewRun {
    /// Resolves `spec`, opens its data and checks that everything fits, the directory
    /// included (on rank 0); writes nothing.
    fn resolve(
        spec: &RunSpec,
        data: RunData,
        dir: &Path,
        force: bool,
        grid: &Grid,
    ) -> Result<NewRun> {
        let c = &*grid.world;
        check_schedule(spec)?;
        let seed = spec.train.seed.unwrap_or(0);
        let given = data.given();
        if given.is_none() {
            memory::check_synthetic(spec, SYNTH_EVAL_ROWS)?;
        }
        let mut opened = open_data(spec, seed, data)?;
        let synthetic = opened.synth.is_some();
        let stream = given == Some(Given::Stream);
        let batch_size = spec
            .train
            .batch_size
            .unwrap_or(if synthetic { 1024 } else { 4096 });
        check_split(batch_size, grid.groups())?;
        let total_steps = match (spec.train.steps, spec.train.tokens) {
            (Some(_), Some(_)) => return Err(ConfigError::StepsAndTokens.into()),
            (Some(steps), None) => steps,
            (None, Some(tokens)) => tokens.div_ceil(batch_size as u64),
            (None, None) if synthetic => 3000,
            (None, None) => 10_000,
        };
        let schedule = Schedule {
            batch_size,
            steps: total_steps,
            seed,
            metrics_every: spec.train.metrics_every.unwrap_or(DEFAULT_METRICS_EVERY),
            checkpoint_every: spec.train.checkpoint_every,
        };
        let cx = Context {
            d_model: opened.d_model,
            synthetic,
            steps: total_steps,
            batch_size,
        };
        let mut specs = if spec.sae.is_empty() {
            vec![SaeSpec::default()]
        } else {
            spec.sae.clone()
        };
        if let Some(synth) = &opened.synth {
            specs = specs
                .iter()
                .map(|s| s.with_synthetic_defaults(synth.config()))
                .collect();
        }
        let mut resolved_saes = Vec::with_capacity(specs.len());
        let mut configs = Vec::with_capacity(specs.len());
        let mut names = Vec::with_capacity(specs.len());
        for sae_spec in &specs {
            let (resolved, sae_config, train_config) = sae_spec.resolve(cx)?;
            names.push(resolved.name.clone().unwrap_or_default());
            resolved_saes.push(resolved);
            configs.push((sae_config, train_config));
        }
        check_names(&names, dir)?;
        let holds_out = spec.data.eval_paths.is_empty();
        let resolved = RunSpec {
            data: DataSpec {
                eval_fraction: (!synthetic && !stream && holds_out)
                    .then(|| spec.data.eval_fraction.unwrap_or(DEFAULT_EVAL_FRACTION)),
                eval_rows: (stream && holds_out)
                    .then(|| spec.data.eval_rows.unwrap_or(DEFAULT_STREAM_EVAL_ROWS)),
                buffer_rows: match stream {
                    true => Some(
                        spec.data
                            .buffer_rows
                            .unwrap_or(DEFAULT_BUFFER_BATCHES * batch_size),
                    ),
                    false => spec.data.buffer_rows,
                },
                given,
                ..spec.data.clone()
            },
            train: ScheduleSpec {
                batch_size: Some(batch_size),
                steps: Some(total_steps),
                tokens: None,
                seed: Some(seed),
                metrics_every: Some(schedule.metrics_every),
                checkpoint_every: schedule.checkpoint_every,
                max_memory: spec.train.max_memory,
            },
            sae: resolved_saes,
            synthetic: opened.synth.as_ref().map(|s| SynthConfig {
                seed: 0,
                ..s.config().clone()
            }),
        };

        // Every option is checked, the data read and the memory the run needs estimated
        // before the directory is touched.
        let loader = loader_config(&resolved.data, &schedule, 1.0);
        loader.validate()?;
        // A stream's buffer is all of it the run holds.
        let train_n = opened
            .train_rows
            .as_ref()
            .map(|rows| rows.n_rows())
            .or(resolved
                .data
                .buffer_rows
                .filter(|_| stream)
                .map(|r| r as u64));
        memory::check_run(
            &resolved,
            opened.d_model,
            &loader,
            train_n,
            SYNTH_EVAL_ROWS,
            c.world_size(),
            grid.shards,
        )?;
        if c.rank() == 0 {
            check_dir(dir, force)?;
        }
        let notes = std::mem::take(&mut opened.notes);
        Ok(NewRun {
            opened,
            resolved,
            schedule,
            names,
            configs,
            notes,
        })
    }

    /// Creates the run directory (clearing it with `force`), takes its lock and writes
    /// `config.toml`, each SAE's directory and its empty `metrics.jsonl`.
    #[allow(clippy::type_complexity)]
    fn write(
        &self,
        dir: &Path,
        force: bool,
    ) -> Result<(Option<RunLock>, Vec<Option<BufWriter<File>>>)> {
        fs::create_dir_all(dir).map_err(io_error(dir, "creating"))?;
        let lock = RunLock::take(dir)?;
        if force {
            clear_run(dir)?;
        }
        write_config(dir, &self.resolved)?;
        let mut metrics = Vec::with_capacity(self.names.len());
        for name in &self.names {
            let member_dir = member_dir(dir, name, self.names.len());
            fs::create_dir_all(&member_dir).map_err(io_error(&member_dir, "creating"))?;
            metrics.push(Some(open_metrics(&member_dir, None)?));
        }
        Ok((Some(lock), metrics))
    }
}

/// [`Error::Stopped`] when `stop` (agreed by every process) is set.
fn stop_error(stop: bool, dir: &Path, when: &str) -> Result<()> {
    if stop {
        return Err(Error::Stopped {
            path: dir.to_path_buf(),
            when: when.into(),
        });
    }
    Ok(())
}

/// Rank 0's `value` on every process.
fn broadcast_f32(c: &dyn Collective, value: f32) -> f32 {
    let mut bytes = value.to_le_bytes().to_vec();
    c.broadcast_bytes(0, &mut bytes);
    f32::from_le_bytes(bytes[..4].try_into().expect("4 bytes sent"))
}

/// A global batch of `batch_size` rows must split evenly over `world` processes (or groups of
/// latent shards).
fn check_split(batch_size: usize, world: usize) -> Result<()> {
    if !batch_size.is_multiple_of(world) {
        let lower = batch_size / world * world;
        return Err(Error::Distributed {
            reason: format!(
                "--batch-size {batch_size} does not split evenly over {world} ranks; pass a \
                 multiple of {world} (such as {}) or start {} ranks",
                if lower > 0 { lower } else { world },
                if batch_size.is_multiple_of(2) {
                    "2 or 1"
                } else {
                    "1"
                },
            ),
        });
    }
    Ok(())
}

/// The batcher of this process's part of every global batch: its group's rows.
fn loader_part<S: Source>(batcher: Batcher<S>, grid: &Grid) -> Result<Batcher<S>> {
    if grid.groups() == 1 {
        return Ok(batcher);
    }
    batcher.for_part(grid.group(), grid.groups())
}

/// The rows of each global batch of `batch_size` that this process trains on: its group's.
fn batch_part(batch_size: usize, grid: &Grid) -> std::ops::Range<usize> {
    crate::dist::part(batch_size, grid.group(), grid.groups())
}

/// A new trainer of `sae_config`, or of this process's latent shard of it.
fn new_trainer(
    sae_config: crate::SaeConfig,
    train_config: crate::TrainConfig,
    seed: u64,
    grid: &Grid,
) -> Result<Trainer> {
    if grid.shards == 1 {
        let mut trainer = Trainer::new(crate::Sae::new(sae_config, seed)?, train_config)?;
        trainer.set_collective(Box::new(grid.world.clone()))?;
        return Ok(trainer);
    }
    check_shardable(&train_config)?;
    let rows = crate::dist::part(sae_config.dict_size, grid.shard, grid.shards);
    let shard = crate::Sae::new_shard(sae_config, seed, rows)?;
    Trainer::sharded(shard, sae_config, train_config, grid)
}

/// What a sharded run cannot do yet: calibrate θ, which encodes rows with the whole SAE.
fn check_shardable(train_config: &crate::TrainConfig) -> Result<()> {
    if train_config.threshold_rule == ThresholdRule::Calibrate {
        return Err(Error::Distributed {
            reason: "--threshold calibrate is not available with --latent-shards above 1; use \
                     the moving average (the default)"
                .into(),
        });
    }
    Ok(())
}

/// The config file of a run directory.
const CONFIG_FILE: &str = "config.toml";

impl Run {
    /// Starts a run of `spec` in `dir`: opens the data, resolves every default, writes
    /// `config.toml` and builds the SAEs. `dir` must be empty or absent unless `force`, which
    /// clears a previous run's files from it. Another process using `dir` is an error naming
    /// it. `stop` (see [`Run::train`]) is checked between the phases that read the data; set,
    /// it ends the call with [`Error::Stopped`] before anything is written.
    pub fn create(spec: &RunSpec, dir: &Path, force: bool, stop: &AtomicBool) -> Result<Run> {
        Run::create_across(spec, dir, force, stop, Arc::new(SingleProcess))
    }

    /// [`Run::create`] on rows handed in (see [`RunData`]) rather than files `spec` names:
    /// `spec.data.paths` must be empty, and `config.toml` records `data.given` so that the
    /// run resumes only with the data handed in again ([`Run::resume_with`]). One process.
    ///
    /// ```
    /// use std::sync::atomic::AtomicBool;
    /// use ndarray::Array2;
    /// use sparse_autoencoder::run::{Outcome, Run, RunData, RunSpec};
    ///
    /// let dir = std::env::temp_dir().join(format!("sae-run-doc-{}", std::process::id()));
    /// let spec: RunSpec = toml::from_str(
    ///     "[data]\neval_rows = 256\n[train]\nsteps = 8\nbatch_size = 64\n\
    ///      [[sae]]\narch = 'topk'\nk = 4\ndict_size = 32",
    /// )?;
    /// // A generator of arrays: here 40 arrays of 32 rows, 8 wide.
    /// let arrays = (0..40).map(|i| {
    ///     Ok(Array2::from_shape_fn((32, 8), |(r, d)| ((i * 32 + r) as f32 * 0.1 + d as f32).sin()))
    /// });
    /// let stop = AtomicBool::new(false);
    /// let mut run = Run::create_with(&spec, RunData::Stream(Box::new(arrays)), &dir, true, &stop)?;
    /// let Outcome::Finished(summaries) = run.train(&mut (), &stop)? else { unreachable!() };
    /// assert_eq!(summaries[0].steps, 8);
    /// # std::fs::remove_dir_all(&dir).unwrap();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn create_with(
        spec: &RunSpec,
        data: RunData,
        dir: &Path,
        force: bool,
        stop: &AtomicBool,
    ) -> Result<Run> {
        let grid = Grid::new(Arc::new(SingleProcess), 1)?;
        Run::create_on(spec, data, dir, force, stop, grid)
    }

    /// [`Run::create`] for one process of a distributed job: every process of `collective`
    /// calls it with the same arguments. Each trains on its part of every global batch (the
    /// batch size must split evenly over the processes) and reads only that part; rank 0
    /// alone writes the run directory. An error on any process (or a stop on any) ends the
    /// call on every process, rank 0's error naming what failed where.
    pub fn create_across(
        spec: &RunSpec,
        dir: &Path,
        force: bool,
        stop: &AtomicBool,
        collective: Arc<dyn Collective>,
    ) -> Result<Run> {
        Run::create_sharded(spec, dir, force, stop, Grid::new(collective, 1)?)
    }

    /// [`Run::create_across`] with the SAEs' latents sharded over `grid`'s groups (see
    /// [`Trainer::sharded`]): each group of `grid.shards` processes trains on its part of every
    /// global batch, each process on its latents; the SAEs, checkpoints and metrics written are
    /// those of one process (up to float rounding), no process holding more than its shard.
    /// The end-of-run evaluation is left to `sae eval` on the saved SAE.
    pub fn create_sharded(
        spec: &RunSpec,
        dir: &Path,
        force: bool,
        stop: &AtomicBool,
        grid: Grid,
    ) -> Result<Run> {
        Run::create_on(spec, RunData::Spec, dir, force, stop, grid)
    }

    /// [`Run::create_sharded`] on `data`.
    fn create_on(
        spec: &RunSpec,
        data: RunData,
        dir: &Path,
        force: bool,
        stop: &AtomicBool,
        grid: Grid,
    ) -> Result<Run> {
        let collective = grid.world.clone();
        let c = &*collective;
        let writer = c.rank() == 0;
        let stopped = |stop: bool| stop_error(stop, dir, STOPPED_BEFORE_TRAINING);
        let (mut new, stop_now) = agree(
            c,
            NewRun::resolve(spec, data, dir, force, &grid),
            stop.load(Ordering::Relaxed),
        )?;
        stopped(stop_now)?;
        // The scale is estimated once, by rank 0, and sent to the others; on a stream, from
        // the rows after the held-out ones, which stay there to be trained on.
        let (seed, skip) = (new.schedule.seed, spec.data.skip_non_finite);
        let estimated = match (&new.opened.train_rows, &mut new.opened.stream) {
            (Some(rows), _) if spec.data.normalize && writer => estimate_scale(&**rows, seed, skip),
            (None, Some(head)) if spec.data.normalize => head
                .peek(SCALE_SAMPLE_ROWS as usize)
                .map_err(|err| match err {
                    Error::Data(err) => err,
                    other => DataError::Stream(other.to_string()),
                })
                .and_then(|sample| estimate_scale(&sample, seed, skip)),
            _ => Ok(1.0),
        };
        let (scale, stop_now) = agree(
            c,
            estimated.map_err(Error::from),
            stop.load(Ordering::Relaxed),
        )?;
        stopped(stop_now)?;
        let scale = broadcast_f32(c, scale);
        if new.opened.synth.is_none() && spec.data.normalize {
            new.notes.push(format!(
                "normalising: training on the activations times {scale:.6} (mean norm √{})",
                new.opened.d_model
            ));
        }
        let n = new.names.len();
        let written = if writer {
            new.write(dir, force)
        } else {
            Ok((None, (0..n).map(|_| None).collect()))
        };
        let ((lock, metrics), _) = agree(c, written, false)?;

        let NewRun {
            mut opened,
            resolved,
            schedule,
            names,
            configs,
            notes,
        } = new;
        let built = (|| -> Result<(Vec<Member>, Batches)> {
            let mut members = Vec::with_capacity(configs.len());
            for ((name, (sae_config, train_config)), metrics) in
                names.iter().zip(configs).zip(metrics)
            {
                let trainer = new_trainer(sae_config, train_config, schedule.seed, &grid)?;
                members.push(Member {
                    name: name.clone(),
                    metrics,
                    dir: member_dir(dir, name, names.len()),
                    trainer,
                });
            }
            let batches = match (opened.train_rows.clone(), opened.synth.take()) {
                (_, Some(synth)) => Batches::Synthetic(Box::new(synth)),
                (None, None) if opened.stream.is_some() => {
                    let head = opened.stream.take().expect("checked");
                    Batches::Stream(stream_loader(head, &resolved.data, &schedule, scale)?)
                }
                (Some(rows), None) => {
                    let config = loader_config(&resolved.data, &schedule, scale);
                    Batches::Loader(Prefetcher::new(loader_part(
                        Batcher::new(rows, config)?,
                        &grid,
                    )?))
                }
                (None, None) => unreachable!("open_data gives rows or the synthetic set"),
            };
            Ok((members, batches))
        })();
        let ((members, batches), _) = agree(c, built, false)?;
        let run = Resolved {
            spec: resolved,
            schedule,
            names,
            config_path: dir.join(CONFIG_FILE),
        };
        Ok(Run::assemble(
            run, dir, members, batches, opened, scale, notes, lock, grid,
        ))
    }

    /// Continues the run in `dir` from its checkpoint: the same batches, in the same order, as
    /// if it had never stopped. `options` may change what leaves the batches trained so far
    /// as they were; `stop` is checked as in [`Run::create`] (a stop leaves the checkpoint as
    /// it was).
    pub fn resume(dir: &Path, options: &ResumeOptions, stop: &AtomicBool) -> Result<Run> {
        Run::resume_across(dir, options, stop, Arc::new(SingleProcess))
    }

    /// [`Run::resume`] of a run created by [`Run::create_with`], its data handed in again.
    /// Given the same rows ([`RunData::Rows`]), the run continues on the same batches as if it
    /// had never stopped. A stream cannot be replayed: [`RunData::Stream`] continues on the
    /// new stream's rows (its front held out again), through a fresh shuffle buffer.
    pub fn resume_with(
        dir: &Path,
        options: &ResumeOptions,
        data: RunData,
        stop: &AtomicBool,
    ) -> Result<Run> {
        let grid = Grid::new(Arc::new(SingleProcess), 1)?;
        Run::resume_on(dir, options, data, stop, grid)
    }

    /// [`Run::resume`] for one process of a distributed job (see [`Run::create_across`]).
    /// Every process reads the run directory (a file system shared by all is assumed); rank 0
    /// alone locks and writes it. The checkpoint holds the one global state, so a run
    /// checkpointed with any number of processes resumes with any other (one included) on the
    /// same batches.
    pub fn resume_across(
        dir: &Path,
        options: &ResumeOptions,
        stop: &AtomicBool,
        collective: Arc<dyn Collective>,
    ) -> Result<Run> {
        Run::resume_sharded(dir, options, stop, Grid::new(collective, 1)?)
    }

    /// [`Run::resume_across`] with the latents sharded over `grid` (see
    /// [`Run::create_sharded`]). Each process reads only its latents' rows of the checkpoint,
    /// which holds the one global state: a run resumes with any shard count, one included.
    pub fn resume_sharded(
        dir: &Path,
        options: &ResumeOptions,
        stop: &AtomicBool,
        grid: Grid,
    ) -> Result<Run> {
        Run::resume_on(dir, options, RunData::Spec, stop, grid)
    }

    /// [`Run::resume_sharded`] on `data`.
    fn resume_on(
        dir: &Path,
        options: &ResumeOptions,
        data: RunData,
        stop: &AtomicBool,
        grid: Grid,
    ) -> Result<Run> {
        let collective = grid.world.clone();
        let c = &*collective;
        let writer = c.rank() == 0;
        let config_path = dir.join(CONFIG_FILE);
        let is_run_dir = || {
            if !config_path.is_file() {
                return Err(Error::RunDir {
                    path: dir.to_path_buf(),
                    reason: format!(
                        "no {CONFIG_FILE}: not a run directory; start the run with --out instead \
                         of --resume"
                    ),
                });
            }
            Ok(())
        };
        let locked = if writer {
            is_run_dir().and_then(|()| RunLock::take(dir).map(Some))
        } else {
            Ok(None)
        };
        let (lock, _) = agree(c, locked, false)?;
        let loaded = (|| -> Result<(Resolved, RunState, Vec<Trainer>, bool)> {
            is_run_dir()?;
            let text =
                fs::read_to_string(&config_path).map_err(io_error(&config_path, "reading"))?;
            let spec: RunSpec = toml::from_str(&text).map_err(|err| Error::RunFile {
                path: config_path.clone(),
                problem: toml_problem(&text, &err),
                fix: "restore the file the run wrote".into(),
            })?;
            let mut run = Resolved::from_written(spec, &config_path, dir)?;
            let synthetic = run.spec.data.paths.is_empty() && run.spec.data.given.is_none();
            let record_skip = options.skip_non_finite && !run.spec.data.skip_non_finite;
            if record_skip {
                if synthetic {
                    return Err(Error::RunDir {
                        path: dir.to_path_buf(),
                        reason: "--skip-non-finite applies to activations given with --data; \
                                 this run trains on the built-in synthetic data, which has none"
                            .into(),
                    });
                }
                run.spec.data.skip_non_finite = true;
            }
            let (state, trainers) = checkpoint::load(dir, &run, &grid)?;
            Ok((run, state, trainers, record_skip))
        })();
        let ((run, state, trainers, record_skip), stop_now) =
            agree(c, loaded, stop.load(Ordering::Relaxed))?;
        stop_error(stop_now, dir, STOPPED_BEFORE_RESUMING)?;
        // After the checkpoint's load, whose errors name config.toml's SAE tables.
        let opened = memory::check_synthetic(&run.spec, SYNTH_EVAL_ROWS)
            .and_then(|()| open_data(&run.spec, run.schedule.seed, data));
        let (mut opened, stop_now) = agree(c, opened, stop.load(Ordering::Relaxed))?;
        stop_error(stop_now, dir, STOPPED_BEFORE_RESUMING)?;
        let built = (|| -> Result<(Batches, Vec<Trainer>)> {
            check_split(run.schedule.batch_size, grid.groups())?;
            let train_n = opened.train_rows.as_ref().map(|rows| rows.n_rows());
            let loader = loader_config(&run.spec.data, &run.schedule, state.scale);
            memory::check_run(
                &run.spec,
                opened.d_model,
                &loader,
                train_n,
                SYNTH_EVAL_ROWS,
                c.world_size(),
                grid.shards,
            )?;
            if let Some(trainer) = trainers.first() {
                let trained = trainer.sae().config().d_model;
                if trained != opened.d_model {
                    let files: Vec<String> = run
                        .spec
                        .data
                        .paths
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect();
                    return Err(Error::RunDir {
                        path: dir.to_path_buf(),
                        reason: format!(
                            "the data ({}) is {} wide now, but the run's checkpoint was trained \
                             on D={trained}: the files changed since the run started; restore \
                             them, or start a new run on the new data",
                            files.join(", "),
                            opened.d_model
                        ),
                    });
                }
            }
            let batches = match (
                opened.train_rows.clone(),
                opened.synth.take(),
                &state.cursor,
            ) {
                (_, Some(synth), _) => Batches::Synthetic(Box::new(synth)),
                (None, None, None) if opened.stream.is_some() => {
                    let head = opened.stream.take().expect("checked");
                    let data = &run.spec.data;
                    Batches::Stream(stream_loader(head, data, &run.schedule, state.scale)?)
                }
                (Some(rows), None, Some(cursor)) => {
                    let config = loader_config(&run.spec.data, &run.schedule, state.scale);
                    // The checkpoint counts every group's skipped rows: rank 0 carries the
                    // count on, so the sum over groups stays the run's total.
                    let mut cursor = cursor.clone();
                    if c.rank() != 0 {
                        cursor.skipped_rows = 0;
                    }
                    // The part first: a rank reads only its part of the buffered rows.
                    let batcher =
                        loader_part(Batcher::new(rows, config)?, &grid)?.resume(&cursor)?;
                    Batches::Loader(Prefetcher::new(batcher))
                }
                _ => {
                    return Err(Error::RunDir {
                        path: dir.join(checkpoint::DIR),
                        reason: "the checkpoint has no data cursor for this run's data; start \
                                 again"
                            .into(),
                    })
                }
            };
            let mut trainers = trainers;
            for trainer in trainers.iter_mut().filter(|_| grid.shards == 1) {
                trainer.set_collective(Box::new(collective.clone()))?;
            }
            Ok((batches, trainers))
        })();
        let ((batches, trainers), stop_now) = agree(c, built, stop.load(Ordering::Relaxed))?;
        stop_error(stop_now, dir, STOPPED_BEFORE_RESUMING)?;
        let n = run.names.len();
        let written = if writer {
            (|| -> Result<Vec<Option<BufWriter<File>>>> {
                if record_skip {
                    write_config(dir, &run.spec)?;
                }
                run.names
                    .iter()
                    .map(|name| open_metrics(&member_dir(dir, name, n), Some(state.step)).map(Some))
                    .collect()
            })()
        } else {
            Ok((0..n).map(|_| None).collect())
        };
        let (metrics, _) = agree(c, written, false)?;
        let mut members = Vec::with_capacity(n);
        for ((name, trainer), metrics) in run.names.iter().zip(trainers).zip(metrics) {
            members.push(Member {
                name: name.clone(),
                metrics,
                dir: member_dir(dir, name, n),
                trainer,
            });
        }
        let notes = std::mem::take(&mut opened.notes);
        let mut run = Run::assemble(
            run,
            dir,
            members,
            batches,
            opened,
            state.scale,
            notes,
            lock,
            grid,
        );
        run.step = state.step;
        run.checkpointed = Some(state.step);
        run.seconds_before = state.seconds;
        Ok(run)
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        run: Resolved,
        dir: &Path,
        members: Vec<Member>,
        batches: Batches,
        opened: Opened,
        scale: f32,
        notes: Vec<String>,
        lock: Option<RunLock>,
        grid: Grid,
    ) -> Run {
        let eval_rows = opened.eval_rows;
        let data = DataSummary {
            d_model: opened.d_model,
            files: opened.files,
            train_rows: opened.train_rows.as_ref().map(|rows| rows.n_rows()),
            eval_rows: eval_rows.as_ref().map(|rows| rows.n_rows()),
        };
        Run {
            dir: dir.to_path_buf(),
            run,
            members,
            batches,
            eval_rows,
            scale,
            step: 0,
            checkpointed: None,
            seconds_before: 0.0,
            notes,
            device: crate::backend::Device::Cpu,
            data,
            collective: grid.world.clone(),
            grid,
            _lock: lock,
        }
    }

    /// The data the run trains and evaluates on.
    pub fn data(&self) -> DataSummary {
        self.data
    }

    /// The resolved configuration, as `config.toml` holds it.
    pub fn spec(&self) -> &RunSpec {
        &self.run.spec
    }

    /// The resolved schedule.
    pub fn schedule(&self) -> &Schedule {
        &self.run.schedule
    }

    /// The SAEs' names, in the order of [`Progress::stats`].
    pub fn names(&self) -> Vec<&str> {
        self.run.names.iter().map(String::as_str).collect()
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
        self.run.schedule.steps
    }

    /// Trains to the end, or until `stop` is set (checked after every step; a checkpoint is
    /// then written). Every SAE sees every batch. At the last step a checkpoint is written;
    /// then each SAE is saved with the input scale folded in and evaluated on the held-out
    /// rows, and the checkpoint removed. A stop during the evaluation ends it promptly
    /// ([`Outcome::Unevaluated`]). The run draws no plots: [`crate::plot::redraw`] draws them
    /// from each SAE's files.
    ///
    /// A non-finite loss or parameter (divergence) ends the run with an error naming the step;
    /// nothing non-finite is written, and the last checkpoint stays. A data error mid-run
    /// first checkpoints the last step taken, and a failed final save leaves the run
    /// resumable; their errors say how to continue.
    pub fn train(&mut self, observer: &mut dyn Observer, stop: &AtomicBool) -> Result<Outcome> {
        for note in std::mem::take(&mut self.notes) {
            observer.note(&note);
        }
        let collective = self.collective.clone();
        let c = &*collective;
        let start = Instant::now();
        let schedule = self.run.schedule;
        let first_step = self.step;
        let mut stats = vec![StepStats::default(); self.members.len()];
        // What rank 0's writes of the last step (metrics, a checkpoint) left to agree on: the
        // other processes learn of a failure there at the next step.
        let mut written: Result<()> = Ok(());
        while self.step < schedule.steps {
            let seconds = self.seconds_before + start.elapsed().as_secs_f64();
            let (_, stop_now) = agree(
                c,
                std::mem::replace(&mut written, Ok(())),
                stop.load(Ordering::Relaxed),
            )?;
            if stop_now {
                let saved = self.checkpoint(seconds);
                agree(c, saved, false)?;
                return Ok(Outcome::Interrupted { step: self.step });
            }
            let part = batch_part(schedule.batch_size, &self.grid);
            let fetched = match &mut self.batches {
                Batches::Synthetic(synth) => {
                    let whole = synth.batch(schedule.batch_size, self.step);
                    Ok(Batch::Owned(if self.grid.groups() == 1 {
                        whole
                    } else {
                        whole.slice(ndarray::s![part, ..]).to_owned()
                    }))
                }
                Batches::Loader(loader) => loader
                    .next_batch()
                    .map(Batch::Loaded)
                    .map_err(|err| self.data_error(err)),
                Batches::Stream(loader) => match loader.next_batch() {
                    Ok(Some(x_bd)) => Ok(Batch::Owned(x_bd)),
                    Ok(None) => {
                        observer.note(&format!(
                            "the stream ended at step {} of {}: the SAEs are saved as they are \
                             now (the learning-rate schedule was planned for {} steps)",
                            self.step, schedule.steps, schedule.steps
                        ));
                        break;
                    }
                    Err(err) => Err(self.data_error(err)),
                },
            };
            let batch = match agree(c, fetched, false) {
                Ok((batch, _)) => batch,
                Err(err) => return Err(self.data_failed(err, seconds)),
            };
            for (member, stats) in self.members.iter_mut().zip(&mut stats) {
                *stats = member.trainer.step(batch.view())?;
            }
            drop(batch);
            self.step += 1;
            if let Some(i) = stats.iter().position(|s| !finite_stats(s)) {
                // Every process sees the same (reduced) statistics, so all fail here.
                return agree(c, Err(self.diverged(i, "the loss is not finite")), false)
                    .map(|((), _)| unreachable!("the error is every process's"));
            }
            let seconds = self.seconds_before + start.elapsed().as_secs_f64();
            let tokens = self.step * schedule.batch_size as u64;
            if self.step.is_multiple_of(schedule.metrics_every) || self.step == schedule.steps {
                written = self.write_metrics(&stats, tokens, seconds);
            }
            observer.step(&Progress {
                step: self.step,
                total_steps: schedule.steps,
                tokens,
                seconds,
                stats: &stats,
            });
            if let Some(every) = schedule.checkpoint_every {
                if written.is_ok() && self.step.is_multiple_of(every) && self.step < schedule.steps
                {
                    written = self.checkpoint(seconds);
                    if written.is_ok() {
                        observer.note(&format!("checkpoint at step {}", self.step));
                    }
                }
            }
        }
        agree(c, written, false)?;
        let seconds = self.seconds_before + start.elapsed().as_secs_f64();
        if self.step > first_step {
            // The trained state, kept until every SAE is saved and evaluated: a failure from
            // here on (a full disk, a stop) leaves the run resumable.
            let saved = self.checkpoint(seconds);
            agree(c, saved, false)?;
        }
        let thresholds = self.calibrate(observer)?;
        let skipped_rows = self.skipped_rows();
        if skipped_rows > 0 {
            observer.note(&format!(
                "skipped {skipped_rows} non-finite rows (counted each time a batch drew one)"
            ));
        }
        if let (true, Batches::Synthetic(_)) = (self.grid.shards > 1, &self.batches) {
            observer.note(&format!(
                "the SAEs are sharded over {} processes: the recovery of the true features \
                 needs a whole decoder; `sae eval SAE_DIR --true-features ...` scores it",
                self.grid.shards
            ));
        }
        // Each trainer gives up its SAE here: its moments, gradients and step buffers are
        // freed before the evaluation allocates its own.
        let mut saved = Vec::with_capacity(self.members.len());
        for (member, threshold) in std::mem::take(&mut self.members)
            .into_iter()
            .zip(thresholds)
        {
            let sae = self.save(member.trainer, threshold, &member.dir);
            let ((sae, global), _) = agree(c, sae, false)?;
            saved.push((member.name, member.dir, sae, global));
        }
        let mut summaries = Vec::with_capacity(saved.len());
        for (name, dir, sae, global) in &saved {
            let summary = Summary {
                name: name.clone(),
                dir: dir.clone(),
                eval: None,
                recovery: None,
                skipped_rows,
                steps: self.step,
                seconds,
            };
            match self.finish(sae, global, summary, stop)? {
                Some(summary) => summaries.push(summary),
                None => {
                    return Ok(Outcome::Unevaluated {
                        step: self.step,
                        dirs: saved.into_iter().map(|(_, dir, _, _)| dir).collect(),
                    })
                }
            }
        }
        // The run is complete and saved: a checkpoint now would only invite resuming it.
        let removed = if c.rank() == 0 {
            checkpoint::remove(&self.dir)
        } else {
            Ok(())
        };
        agree(c, removed, false)?;
        Ok(Outcome::Finished(summaries))
    }

    /// The calibrated θ of each SAE whose recipe asks for one (`None` for the others): rows
    /// are drawn on from the training data, past the last training batch, until every process
    /// together holds [`CALIBRATION_ROWS`], and each SAE's θ is their k·N-th largest code. The
    /// draws come after the final checkpoint, so a resumed run draws the same rows.
    fn calibrate(&mut self, observer: &mut dyn Observer) -> Result<Vec<Option<f32>>> {
        let wanted: Vec<bool> = self
            .members
            .iter()
            .map(|m| m.trainer.config().threshold_rule == ThresholdRule::Calibrate)
            .collect();
        if !wanted.contains(&true) {
            return Ok(vec![None; wanted.len()]);
        }
        let collective = self.collective.clone();
        let c = &*collective;
        let batch_size = self.run.schedule.batch_size;
        let part = batch_part(batch_size, &self.grid);
        let mut rows = Vec::new();
        for i in 0..CALIBRATION_ROWS.div_ceil(batch_size) as u64 {
            let fetched = match &mut self.batches {
                Batches::Synthetic(synth) => {
                    let whole = synth.batch(batch_size, self.step + i);
                    Ok(whole.slice(ndarray::s![part.clone(), ..]).to_owned())
                }
                Batches::Loader(loader) => loader
                    .next_batch()
                    .map(|b| b.view().to_owned())
                    .map_err(|err| self.data_error(err)),
                Batches::Stream(loader) => match loader.next_batch() {
                    Ok(Some(x_bd)) => Ok(x_bd),
                    // θ is taken from the rows there are.
                    Ok(None) => break,
                    Err(err) => Err(self.data_error(err)),
                },
            };
            rows.push(agree(c, fetched, false)?.0);
        }
        let mut thresholds = Vec::with_capacity(wanted.len());
        for (member, wanted) in self.members.iter_mut().zip(wanted) {
            thresholds.push(if wanted {
                member.trainer.sync()?;
                let sae = member.trainer.sae();
                let k = sae
                    .config()
                    .arch
                    .k()
                    .expect("only batch top-k SAEs calibrate");
                let theta = calibrated_threshold(sae, &crate::backend::Cpu, &rows, k, c)?;
                observer.note(&format!(
                    "{}: θ calibrated on {} rows: {theta} (moving average {})",
                    member.name,
                    rows.iter().map(|r| r.nrows()).sum::<usize>() * c.world_size(),
                    sae.threshold().map_or("unset".into(), |t| t.to_string()),
                ));
                Some(theta)
            } else {
                None
            });
        }
        Ok(thresholds)
    }

    /// Rank 0 appends a line per SAE to its `metrics.jsonl`.
    fn write_metrics(&mut self, stats: &[StepStats], tokens: u64, seconds: f64) -> Result<()> {
        for (member, stats) in self.members.iter_mut().zip(stats) {
            let Some(metrics) = &mut member.metrics else {
                continue;
            };
            let record = MetricsRecord::new(self.step, tokens, stats, seconds);
            let line = serde_json::to_string(&record).expect("records serialise");
            let path = member.dir.join(crate::io::METRICS_FILE);
            writeln!(metrics, "{line}")
                .and_then(|()| metrics.flush())
                .map_err(io_error(&path, "writing"))?;
        }
        Ok(())
    }

    /// Training rows skipped for holding NaN or ±Inf, over every process.
    fn skipped_rows(&self) -> u64 {
        // The shards of a group read the same rows: the first counts them.
        let mut skipped = [match &self.batches {
            Batches::Loader(loader) if self.grid.shard == 0 => loader.skipped_rows(),
            Batches::Stream(loader) => loader.skipped_rows(),
            _ => 0,
        }];
        self.collective.all_reduce_sum_u64(&mut skipped);
        skipped[0]
    }

    /// Saves one trained SAE, the input scale folded in: every process calls it. Returns the
    /// SAE to evaluate (a latent shard's part of it) and the whole SAE's configuration.
    fn save(
        &self,
        mut trainer: Trainer,
        threshold: Option<f32>,
        dir: &Path,
    ) -> Result<(crate::Sae, crate::SaeConfig)> {
        trainer.sync()?;
        let global = trainer.global_config();
        let mut sae = trainer.into_sae();
        if threshold.is_some() {
            sae.threshold = threshold;
        }
        sae.fold_input_scale(self.scale)?;
        let saved = if self.grid.shards > 1 {
            sae.save_shard(dir, &global, &self.grid)
        } else if self.collective.rank() == 0 {
            sae.save(dir)
        } else {
            Ok(())
        };
        saved.map_err(|err| Error::RunDir {
            path: self.dir.clone(),
            reason: format!(
                "saving the trained SAE failed ({err}); the trained state is in the checkpoint \
                 of step {}: free space (or fix the cause), then `sae train --resume {}` saves \
                 and evaluates it",
                self.step,
                self.dir.display()
            ),
        })?;
        Ok((sae, global))
    }

    /// Evaluates one saved SAE (`sae`, or with latent shards this process's shard of the SAE
    /// `global` configures); `None` when `stop` ended the evaluation. Across processes each
    /// evaluates its part of the held-out rows; rank 0 writes the results.
    fn finish(
        &self,
        sae: &crate::Sae,
        global: &crate::SaeConfig,
        mut summary: Summary,
        stop: &AtomicBool,
    ) -> Result<Option<Summary>> {
        let c = &*self.collective;
        let schedule = &self.run.schedule;
        let skip = self.run.spec.data.skip_non_finite;
        let sharded = self.grid.shards > 1;
        if let Some(rows) = &self.eval_rows {
            let batch = schedule.batch_size;
            let evaluated = if sharded {
                evaluate_shard_until(sae, global, &**rows, batch, skip, stop, &self.grid)?
            } else {
                evaluate_on_until_across(sae, self.device, &**rows, batch, skip, stop, c)?
            };
            match evaluated {
                Some(eval) => summary.eval = Some(eval),
                None => return Ok(None),
            }
        }
        let written = if c.rank() == 0 {
            (|| -> Result<()> {
                if let (Batches::Synthetic(synth), false) = (&self.batches, sharded) {
                    // On the held-out rows: the firing scores need their ground truth.
                    let scored = score(sae, self.device, synth, SYNTH_EVAL_ROWS, u64::MAX)?;
                    summary.recovery = Some(scored);
                }
                let json = serde_json::to_string_pretty(&summary).expect("summaries serialise");
                crate::io::write_atomic(&summary.dir.join("eval.json"), json.as_bytes())?;
                if let Some(eval) = &summary.eval {
                    crate::io::write_feature_density(
                        &summary.dir.join("feature_density.npy"),
                        eval,
                    )?;
                }
                Ok(())
            })()
        } else {
            Ok(())
        };
        let ((), stop_now) = agree(c, written, stop.load(Ordering::Relaxed))?;
        Ok((!stop_now).then_some(summary))
    }

    /// Writes the whole run's state to `checkpoint/`, replacing the last one atomically; a
    /// non-finite parameter is divergence, and the last checkpoint is kept instead.
    fn checkpoint(&mut self, seconds: f64) -> Result<()> {
        for member in &mut self.members {
            member.trainer.sync()?;
        }
        // Each latent shard checks its own parameters; all learn of any one's divergence.
        let finite = match self
            .members
            .iter()
            .position(|m| !finite_sae(m.trainer.sae()))
        {
            Some(i) => Err(self.diverged(i, "a parameter is not finite")),
            None => Ok(()),
        };
        agree(&*self.collective, finite, false)?;
        let skipped_rows = self.skipped_rows();
        let state = RunState {
            step: self.step,
            seconds,
            scale: self.scale,
            cursor: match &self.batches {
                Batches::Loader(loader) => Some(Cursor {
                    skipped_rows,
                    ..loader.cursor().clone()
                }),
                Batches::Synthetic(_) | Batches::Stream(_) => None,
            },
        };
        let trainers: Vec<(&str, &Trainer)> = self
            .members
            .iter()
            .map(|m| (m.name.as_str(), &m.trainer))
            .collect();
        // A failed save leaves the previous checkpoint whole (see `checkpoint`).
        checkpoint::save(&self.dir, &state, &trainers, &self.grid).map_err(|err| {
            Error::RunDir {
                path: self.dir.clone(),
                reason: format!(
                    "writing the checkpoint of step {} failed ({err}); {}",
                    self.step,
                    self.left_behind()
                ),
            }
        })?;
        self.checkpointed = Some(self.step);
        Ok(())
    }

    /// What is left to resume from, for an error's last words.
    fn left_behind(&self) -> String {
        match self.checkpointed {
            Some(step) => format!(
                "the checkpoint of step {step} is kept; resume from it with `sae train --resume \
                 {}` after the fix",
                self.dir.display()
            ),
            None => "no checkpoint was written; start again after the fix".into(),
        }
    }

    /// The error of member `i` diverging at the current step.
    fn diverged(&self, i: usize, what: &str) -> Error {
        let lr = self.members[i].trainer.config().lr.unwrap_or(f32::NAN);
        Error::RunDir {
            path: self.dir.clone(),
            reason: format!(
                "training diverged at step {} ({what} for SAE {}): lower the learning rate \
                 (--lr, {lr:e} now) or the scale of the inputs (--normalize) and start again; \
                 nothing non-finite was written{}",
                self.step,
                self.members[i].name,
                match self.checkpointed {
                    Some(step) => format!(", and the checkpoint of step {step} is kept"),
                    None => String::new(),
                }
            ),
        }
    }

    /// The loader's error `err` before step `self.step + 1`, as the run reports it once
    /// [`Run::data_failed`] has checkpointed the steps taken: what failed and how to go on.
    fn data_error(&self, err: Error) -> Error {
        let (dir, step) = (self.dir.display(), self.step);
        let reason = match err {
            Error::Data(DataError::NonFinite { location }) => format!(
                "non-finite value (NaN or Inf) at {location}; training stopped after step \
                 {step}, whose checkpoint is written: continue skipping such rows with `sae \
                 train --resume {dir} --skip-non-finite`, or clean the data and `sae train \
                 --resume {dir}`"
            ),
            err => format!(
                "{err}; training stopped after step {step}, whose checkpoint is written: fix \
                 the data, then `sae train --resume {dir}`"
            ),
        };
        Error::RunDir {
            path: self.dir.clone(),
            reason,
        }
    }

    /// The loader failed (on some process) before step `self.step + 1`: checkpoints the steps
    /// taken, then returns `err` (from [`Run::data_error`]).
    fn data_failed(&mut self, err: Error, seconds: f64) -> Error {
        if let Err(ckpt_err) = self.checkpoint(seconds) {
            return Error::RunDir {
                path: self.dir.clone(),
                reason: format!(
                    "{err}; writing a checkpoint after it failed too ({ckpt_err}); {}",
                    self.left_behind()
                ),
            };
        }
        err
    }
}

/// Whether every figure a metrics line records as a number is finite (fve, undefined on a
/// batch without variance, is recorded as absent).
fn finite_stats(s: &StepStats) -> bool {
    [s.loss, s.mse, s.aux, s.l0, s.dead_fraction, s.lr]
        .iter()
        .chain(&s.threshold)
        .all(|v| v.is_finite())
}

/// Whether every parameter of `sae` is finite.
fn finite_sae(sae: &crate::Sae) -> bool {
    let finite = |v: &f32| v.is_finite();
    sae.w_enc_fd().iter().all(finite)
        && sae.b_enc_f().iter().all(finite)
        && sae.w_dec_fd().iter().all(finite)
        && sae.b_dec_d().iter().all(finite)
        && sae.threshold().iter().all(finite)
}

/// Writes the resolved spec as the run's `config.toml`.
fn write_config(dir: &Path, spec: &RunSpec) -> Result<()> {
    let text = toml::to_string_pretty(spec).expect("a RunSpec always serialises");
    crate::io::write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())
}

/// A TOML error as one line: where, the offending line, and what the parser said.
fn toml_problem(text: &str, err: &toml::de::Error) -> String {
    let message = err.message().replace('\n', " ");
    match err.span() {
        Some(span) => {
            let start = span.start.min(text.len());
            let line_no = text[..start].matches('\n').count() + 1;
            let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
            format!("line {line_no} (`{}`): {message}", line.escape_debug())
        }
        None => message,
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

fn loader_config(data: &DataSpec, schedule: &Schedule, scale: f32) -> LoaderConfig {
    LoaderConfig {
        batch_size: schedule.batch_size,
        buffer_rows: data.buffer_rows,
        seed: schedule.seed,
        skip_non_finite: data.skip_non_finite,
        scale,
        ..LoaderConfig::default()
    }
}

/// The batches of a stream run: `data`'s buffer (resolved at creation), the schedule's batch
/// size and seed.
fn stream_loader(
    head: StreamHead,
    data: &DataSpec,
    schedule: &Schedule,
    scale: f32,
) -> Result<StreamLoader> {
    let loader = loader_config(data, schedule, scale);
    StreamLoader::new(
        head,
        StreamConfig {
            batch_size: schedule.batch_size,
            buffer_rows: data
                .buffer_rows
                .unwrap_or(DEFAULT_BUFFER_BATCHES * schedule.batch_size),
            seed: schedule.seed,
            skip_non_finite: data.skip_non_finite,
            scale,
            prefetch: loader.prefetch,
        },
    )
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

/// Each SAE of a sweep needs its own directory: names must be distinct plain file names that
/// no file or directory of the run itself uses.
fn check_names(names: &[String], dir: &Path) -> Result<()> {
    let refuse = |name: &str, why: &str| Error::RunDir {
        path: dir.to_path_buf(),
        reason: format!("SAE name {name:?} {why}; rename it (name = \"...\" in its [[sae]] table)"),
    };
    for (i, name) in names.iter().enumerate() {
        if name.is_empty() || name == "." || name == ".." {
            return Err(refuse(name, "is not a directory name"));
        }
        if name.contains(['/', '\\']) {
            return Err(refuse(name, "holds a path separator"));
        }
        if name.trim() != name {
            return Err(refuse(name, "starts or ends with white space"));
        }
        if name.chars().any(char::is_control) {
            return Err(refuse(name, "holds a control character"));
        }
        let taken = RUN_DIR_NAMES
            .iter()
            .chain(RUN_FILES)
            .any(|&used| name == used || name.strip_suffix(".tmp") == Some(used));
        if taken {
            return Err(refuse(name, "is a name the run directory itself uses"));
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

/// The directories and lock file a run keeps at the top of its directory, besides
/// [`RUN_FILES`]; no SAE of a sweep may be named after either.
const RUN_DIR_NAMES: &[&str] = &[
    checkpoint::DIR,
    checkpoint::NEW,
    checkpoint::OLD,
    lock::FILE,
];

fn member_dir(dir: &Path, name: &str, n_members: usize) -> PathBuf {
    if n_members == 1 {
        dir.to_path_buf()
    } else {
        dir.join(name)
    }
}

/// Checks that `dir` can take a new run, touching nothing: absent, empty (but for a lock file
/// an earlier run left), or with `force` holding anything.
fn check_dir(dir: &Path, force: bool) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        return Err(Error::RunDir {
            path: dir.to_path_buf(),
            reason: "is a file; give --out a directory".into(),
        });
    }
    let holds_run = dir.join(CONFIG_FILE).exists();
    let non_empty = fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .filter_map(|e| e.ok())
            .any(|e| e.file_name() != lock::FILE)
    });
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
    Ok(())
}

/// Removes a previous run's files from `dir` (whose lock the caller holds). Only what a run
/// writes goes; anything else the user put there stays.
fn clear_run(dir: &Path) -> Result<()> {
    if !dir.join(CONFIG_FILE).exists() {
        return Ok(());
    }
    let spec: Option<RunSpec> = fs::read_to_string(dir.join(CONFIG_FILE))
        .ok()
        .and_then(|text| toml::from_str(&text).ok());
    let mut dirs = vec![dir.to_path_buf()];
    for sae in spec.map(|s| s.sae).unwrap_or_default() {
        if let Some(name) = sae.name {
            if check_names(std::slice::from_ref(&name), dir).is_ok() {
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
    checkpoint::remove(dir)
}

/// Files a run writes into an SAE's directory.
const RUN_FILES: &[&str] = &[
    CONFIG_FILE,
    crate::io::METRICS_FILE,
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
    let path = dir.join(crate::io::METRICS_FILE);
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
