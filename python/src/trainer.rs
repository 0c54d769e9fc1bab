//! `_native.Trainer`: one SAE trained step by step on batches the caller passes, with
//! checkpoints that resume bit for bit.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use numpy::PyReadonlyArray2;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use rayon::ThreadPool;
use serde_json::json;
use sparse_autoencoder::io::Checkpoint;
use sparse_autoencoder::{Sae, SaeConfig, StepStats, TrainConfig, Trainer};

use crate::errors::{caught, guarded, to_py, value_error};
use crate::sae::{rows_of, PySae};

/// The key of [`Checkpoint::extra`] under which a checkpoint keeps its training config.
const EXTRA_KEY: &str = "python_trainer";

/// A dedicated pool of `threads` workers, or none (rayon's global pool, all cores).
pub(crate) fn thread_pool(threads: Option<usize>) -> PyResult<Option<Arc<ThreadPool>>> {
    match threads {
        None => Ok(None),
        Some(0) => Err(value_error(
            "threads is 0; pass at least 1, or None for every core",
        )),
        Some(n) => rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("sae-worker-{i}"))
            .build()
            .map(|pool| Some(Arc::new(pool)))
            .map_err(|e| value_error(format!("cannot start {n} threads: {e}"))),
    }
}

/// Runs `f` on `pool`'s workers, or on the global pool when there is none.
pub(crate) fn on_pool<T: Send>(pool: Option<&ThreadPool>, f: impl FnOnce() -> T + Send) -> T {
    match pool {
        Some(pool) => pool.install(f),
        None => f(),
    }
}

/// Parses `json` as a `T`, the error naming `what` (serde's message names an unknown key).
pub(crate) fn from_json<T: serde::de::DeserializeOwned>(json: &str, what: &str) -> PyResult<T> {
    serde_json::from_str(json).map_err(|e| value_error(format!("invalid {what}: {e}")))
}

/// What the lock guards.
struct Inner {
    /// The library's trainer.
    trainer: Trainer,
    /// Its configuration, for checkpoints.
    config: TrainConfig,
    /// The trainer's own workers (`threads=`), or none for rayon's global pool.
    pool: Option<Arc<ThreadPool>>,
    /// Set when a step panicked: the trainer's state is then unknown.
    broken: bool,
}

/// An SAE's trainer; the Python class `sparse_autoencoder.Trainer` wraps it.
#[pyclass(name = "Trainer", module = "sparse_autoencoder._native", frozen)]
pub struct PyTrainer {
    /// Locked only with the GIL released, so that a second Python thread waiting for it
    /// cannot hold the GIL the first needs to return.
    inner: Mutex<Inner>,
    d_model: usize,
}

impl PyTrainer {
    /// Runs `f` on the locked trainer with the GIL released.
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        what: &str,
        f: impl FnOnce(&mut Inner) -> PyResult<T> + Send,
    ) -> PyResult<T> {
        py.detach(|| {
            let mut inner: MutexGuard<'_, Inner> = self
                .inner
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if inner.broken {
                return Err(value_error(
                    "this trainer failed with an internal error earlier; resume it from its \
                     last checkpoint",
                ));
            }
            let inner = &mut *inner;
            let out = caught(what, || f(&mut *inner));
            inner.broken = out.is_err();
            out.unwrap_or_else(Err)
        })
    }

    /// The Python object around `trainer`.
    fn build(trainer: Trainer, config: TrainConfig, pool: Option<Arc<ThreadPool>>) -> Self {
        let d_model = trainer.sae().config().d_model;
        PyTrainer {
            inner: Mutex::new(Inner {
                trainer,
                config,
                pool,
                broken: false,
            }),
            d_model,
        }
    }
}

/// `stats` as a dict of the `StepStats` fields.
pub(crate) fn stats_dict<'py>(py: Python<'py>, s: &StepStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("loss", s.loss)?;
    d.set_item("mse", s.mse)?;
    d.set_item("penalty", s.penalty)?;
    d.set_item("aux", s.aux)?;
    d.set_item("fve", s.fve)?;
    d.set_item("l0", s.l0)?;
    d.set_item("dead_fraction", s.dead_fraction)?;
    d.set_item("lr", s.lr)?;
    d.set_item("threshold", s.threshold)?;
    d.set_item("resampled", s.resampled)?;
    Ok(d)
}

#[pymethods]
impl PyTrainer {
    /// A trainer of a fresh SAE: `sae_config` is `SaeConfig` as JSON (`{"d_model": 768,
    /// "dict_size": 8192, "arch": "topk", "k": 32}`), `train_config` `TrainConfig` as JSON
    /// (unknown keys are refused), `seed` the initialisation's, `threads` the workers of a
    /// pool of the trainer's own (None: every core).
    #[new]
    #[pyo3(signature = (sae_config, train_config, seed=0, threads=None))]
    fn new(
        py: Python<'_>,
        sae_config: &str,
        train_config: &str,
        seed: u64,
        threads: Option<usize>,
    ) -> PyResult<Self> {
        let sae_config: SaeConfig = from_json(sae_config, "SAE configuration")?;
        let config: TrainConfig = from_json(train_config, "training configuration")?;
        let pool = thread_pool(threads)?;
        let trainer = py.detach(|| {
            guarded("building the trainer", || {
                on_pool(pool.as_deref(), || {
                    let sae = Sae::new(sae_config, seed).map_err(to_py)?;
                    Trainer::new(sae, config.clone()).map_err(to_py)
                })
            })
        })?;
        Ok(PyTrainer::build(trainer, config, pool))
    }

    /// One training step on `batch` (B × d_model float32, B ≥ 1); returns its statistics.
    fn step<'py>(
        &self,
        py: Python<'py>,
        batch: PyReadonlyArray2<'py, f32>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let rows = rows_of(&batch, self.d_model, "batch")?;
        let stats = self.with(py, "a training step", |inner| {
            let trainer = &mut inner.trainer;
            on_pool(inner.pool.as_deref(), || trainer.step(rows.view())).map_err(to_py)
        })?;
        stats_dict(py, &stats)
    }

    /// A copy of the SAE as trained so far.
    #[getter]
    fn sae(&self, py: Python<'_>) -> PyResult<PySae> {
        let sae = self.with(py, "copying the SAE", |inner| {
            Ok(inner.trainer.sae().clone())
        })?;
        Ok(PySae { sae: Arc::new(sae) })
    }

    /// D, the width of the batches.
    #[getter]
    fn d_model(&self) -> usize {
        self.d_model
    }

    /// Steps taken.
    #[getter]
    fn steps_done(&self, py: Python<'_>) -> PyResult<u64> {
        self.with(py, "reading the step count", |inner| {
            Ok(inner.trainer.steps_done())
        })
    }

    /// The training configuration, every default filled in (JSON text).
    #[getter]
    fn config_json(&self, py: Python<'_>) -> PyResult<String> {
        self.with(py, "reading the configuration", |inner| {
            serde_json::to_string(&inner.config).map_err(|e| value_error(e.to_string()))
        })
    }

    /// Saves the SAE as trained so far into `dir`, as `SAE.save` does.
    fn save(&self, py: Python<'_>, dir: PathBuf) -> PyResult<()> {
        self.with(py, "saving the SAE", |inner| {
            inner.trainer.sae().save(&dir).map_err(to_py)
        })
    }

    /// Writes the trainer's whole state (the SAE, Adam's moments, the step and dead-latent
    /// counters) and its training configuration into the checkpoint directory `dir`.
    fn checkpoint(&self, py: Python<'_>, dir: PathBuf) -> PyResult<()> {
        self.with(py, "writing the checkpoint", |inner| {
            let config =
                serde_json::to_value(&inner.config).map_err(|e| value_error(e.to_string()))?;
            let checkpoint = Checkpoint {
                state: inner.trainer.state(),
                extra: json!({ EXTRA_KEY: { "train_config": config } }),
            };
            checkpoint.save(&dir).map_err(to_py)
        })
    }

    /// The trainer `checkpoint` saved into `dir`, continuing exactly where it stopped.
    /// `train_config` (JSON) replaces the saved configuration, for checkpoints written
    /// elsewhere.
    #[staticmethod]
    #[pyo3(signature = (dir, threads=None, train_config=None))]
    fn resume(
        py: Python<'_>,
        dir: PathBuf,
        threads: Option<usize>,
        train_config: Option<&str>,
    ) -> PyResult<Self> {
        let given: Option<TrainConfig> = train_config
            .map(|json| from_json(json, "training configuration"))
            .transpose()?;
        let pool = thread_pool(threads)?;
        let (trainer, config) = py.detach(|| {
            guarded("resuming", || {
                let checkpoint = Checkpoint::load(&dir).map_err(to_py)?;
                let config = match given {
                    Some(config) => config,
                    None => {
                        let saved = checkpoint
                            .extra
                            .get(EXTRA_KEY)
                            .and_then(|e| e.get("train_config"))
                            .ok_or_else(|| {
                                value_error(format!(
                                    "{}: this checkpoint holds no training configuration (it \
                                     was not written by Trainer.checkpoint); pass the \
                                     configuration it was trained with",
                                    dir.display()
                                ))
                            })?;
                        serde_json::from_value(saved.clone()).map_err(|e| {
                            value_error(format!(
                                "{}: the saved training configuration is invalid: {e}",
                                dir.display()
                            ))
                        })?
                    }
                };
                let trainer = on_pool(pool.as_deref(), || {
                    Trainer::from_state(checkpoint.state, config.clone())
                })
                .map_err(to_py)?;
                Ok((trainer, config))
            })
        })?;
        Ok(PyTrainer::build(trainer, config, pool))
    }
}
