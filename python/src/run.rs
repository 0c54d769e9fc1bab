//! `_native.train`: a whole training run as `sae train` runs it (run directory, metrics,
//! checkpoints, evaluation, plots), on rows or a stream of arrays handed in from Python.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use ndarray::Array2;
use numpy::{PyArray2, PyArrayMethods, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::exceptions::{PyKeyboardInterrupt, PyStopIteration, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use sparse_autoencoder::data::{DataError, RowStream, Source};
use sparse_autoencoder::run::{Observer, Outcome, Progress, ResumeOptions, Run, RunData, RunSpec};
use sparse_autoencoder::{plot, Error};

use crate::errors::{caught, to_py, value_error};
use crate::trainer::{on_pool, stats_dict, thread_pool};

/// How often the calling thread looks for a signal (Ctrl-C) while the run trains.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// The rows of a C-contiguous float32 numpy array, read in place without the GIL.
struct ArrayRows {
    /// Keeps the array (and so its buffer) alive as long as the run holds the rows.
    _owner: Py<PyAny>,
    /// The address of its first value.
    address: usize,
    n_rows: usize,
    d_model: usize,
}

impl ArrayRows {
    /// The rows of `array`, which must be C-contiguous with at least one row and column.
    fn new(array: &PyReadonlyArray2<'_, f32>) -> PyResult<ArrayRows> {
        let (n_rows, d_model) = (array.shape()[0], array.shape()[1]);
        if !array.is_c_contiguous() {
            return Err(value_error("the rows must be a C-contiguous float32 array"));
        }
        if n_rows == 0 || d_model == 0 {
            return Err(value_error(format!(
                "the rows have shape ({n_rows}, {d_model}): pass at least one row of at least \
                 one activation"
            )));
        }
        let bound: &Bound<'_, PyArray2<f32>> = array;
        Ok(ArrayRows {
            _owner: bound.clone().into_any().unbind(),
            address: array.data() as usize,
            n_rows,
            d_model,
        })
    }

    /// All the values, row after row.
    fn values(&self) -> &[f32] {
        // SAFETY: `address` is the start of the C-contiguous buffer of n_rows × d_model f32
        // values of the array `_owner` keeps alive; numpy does not move or free the buffer of
        // an array that is referenced (`resize` refuses). The caller is told not to write to
        // the array while a run reads it.
        unsafe {
            std::slice::from_raw_parts(self.address as *const f32, self.n_rows * self.d_model)
        }
    }
}

impl Source for ArrayRows {
    fn d_model(&self) -> usize {
        self.d_model
    }

    fn n_rows(&self) -> u64 {
        self.n_rows as u64
    }

    fn read_rows(&self, start: u64, out_nd: &mut [f32]) -> Result<(), DataError> {
        let from = start as usize * self.d_model;
        match self.values().get(from..from + out_nd.len()) {
            Some(rows) => {
                out_nd.copy_from_slice(rows);
                Ok(())
            }
            None => Err(DataError::Stream(format!(
                "rows {start}.. of {} wanted beyond the array's end",
                out_nd.len() / self.d_model.max(1)
            ))),
        }
    }

    fn locate(&self, row: u64) -> String {
        format!("row {row} of the array")
    }
}

/// A Python iterator of 2-D float32 arrays, each read with the GIL taken for the call.
struct PyStream {
    iterator: Py<PyAny>,
    /// The exception the iterator raised, re-raised as it was when the run ends.
    failure: Arc<Mutex<Option<PyErr>>>,
    /// Arrays read so far, for messages.
    arrays: u64,
}

impl RowStream for PyStream {
    fn next_rows(&mut self) -> Option<sparse_autoencoder::Result<Array2<f32>>> {
        let index = self.arrays;
        self.arrays += 1;
        let next = Python::attach(|py| -> Result<Option<Array2<f32>>, PyErr> {
            let item = match self.iterator.bind(py).call_method0("__next__") {
                Ok(item) => item,
                Err(err) if err.is_instance_of::<PyStopIteration>(py) => return Ok(None),
                Err(err) => return Err(err),
            };
            let array: PyReadonlyArray2<'_, f32> = item.extract().map_err(|_| {
                PyTypeError::new_err(format!(
                    "array {index} of the stream is a {}, not a 2-D float32 numpy array",
                    item.get_type()
                        .name()
                        .map_or_else(|_| "?".to_string(), |n| n.to_string())
                ))
            })?;
            Ok(Some(array.as_array().as_standard_layout().into_owned()))
        });
        match next {
            Ok(rows) => rows.map(Ok),
            Err(err) => {
                let message = err.to_string();
                *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(err);
                Some(Err(DataError::Stream(format!(
                    "array {index}: the Python iterator raised {message}"
                ))
                .into()))
            }
        }
    }
}

/// Keeps the run's notes (normalisation scale, skipped rows, checkpoints) for the result, and
/// shows the progress to a Python callback every `every` steps.
struct Watcher<'a> {
    notes: Vec<String>,
    /// `progress(info)`, called with the GIL taken for the call.
    progress: Option<Py<PyAny>>,
    every: u64,
    /// Where an exception the callback raised goes; the run then stops at once.
    failure: &'a Mutex<Option<PyErr>>,
    stop: &'a AtomicBool,
}

impl Watcher<'_> {
    /// `progress(info)` with the step's numbers; an exception stops the run.
    fn call(&self, callback: &Py<PyAny>, p: &Progress<'_>) {
        let called = Python::attach(|py| -> PyResult<()> {
            let info = PyDict::new(py);
            info.set_item("step", p.step)?;
            info.set_item("total_steps", p.total_steps)?;
            info.set_item("tokens", p.tokens)?;
            info.set_item("seconds", p.seconds)?;
            let stats = p
                .stats
                .iter()
                .map(|s| stats_dict(py, s))
                .collect::<PyResult<Vec<_>>>()?;
            info.set_item("stats", stats)?;
            callback.bind(py).call1((info,))?;
            Ok(())
        });
        if let Err(err) = called {
            let mut failure = self.failure.lock().unwrap_or_else(|p| p.into_inner());
            failure.get_or_insert(err);
            self.stop.store(true, Ordering::SeqCst);
        }
    }
}

impl Observer for Watcher<'_> {
    fn step(&mut self, p: &Progress<'_>) {
        if let Some(callback) = &self.progress {
            if p.step.is_multiple_of(self.every) || p.step == p.total_steps {
                self.call(callback, p);
            }
        }
    }

    fn note(&mut self, line: &str) {
        self.notes.push(line.to_string());
    }
}

/// How the run on the worker thread ended.
enum Ended {
    /// Every step taken, each SAE saved, evaluated and plotted: the summary for Python.
    Finished(serde_json::Value),
    /// Stopped at the caller's request (Ctrl-C); what was written and how to continue.
    Interrupted(String),
}

/// Creates (or resumes) the run, trains it and draws its plots, as `sae train` does.
fn run_all(
    spec: Option<&RunSpec>,
    data: RunData,
    dir: &Path,
    force: bool,
    resume: bool,
    stop: &AtomicBool,
    mut notes: Watcher<'_>,
) -> sparse_autoencoder::Result<Ended> {
    let created = match spec {
        Some(spec) if !resume => Run::create_with(spec, data, dir, force, stop),
        _ => Run::resume_with(dir, &ResumeOptions::default(), data, stop),
    };
    let mut run = match created {
        Err(Error::Stopped { path, when }) => {
            return Ok(Ended::Interrupted(format!(
                "{}: stopped {when}",
                path.display()
            )))
        }
        created => created?,
    };
    let outcome = run.train(&mut notes, stop)?;
    drop(run);
    match outcome {
        Outcome::Interrupted { step } => Ok(Ended::Interrupted(format!(
            "interrupted at step {step}: checkpoint written in {}; continue with \
             sparse_autoencoder.train(batches, dir={:?}, resume=True)",
            dir.display(),
            dir.display().to_string()
        ))),
        Outcome::Unevaluated { dirs, .. } => Ok(Ended::Interrupted(format!(
            "stopped during the end-of-run evaluation: the trained SAEs are saved in {}; \
             evaluate them with sparse_autoencoder.train(batches, dir={:?}, resume=True)",
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            dir.display().to_string()
        ))),
        Outcome::Finished(summaries) => {
            let mut saes = Vec::new();
            for summary in &summaries {
                let redrawn = plot::redraw(&summary.dir)?;
                notes.notes.extend(redrawn.note);
                let mut value = serde_json::to_value(summary).unwrap_or_default();
                value["dir"] = summary.dir.display().to_string().into();
                saes.push(value);
            }
            Ok(Ended::Finished(serde_json::json!({
                "dir": dir.display().to_string(),
                "saes": saes,
                "notes": notes.notes,
            })))
        }
    }
}

/// Runs a whole training run into `dir` and returns its summary as JSON text: `{"dir", "saes":
/// [{"name", "dir", "eval", "recovery", "skipped_rows", "steps", "seconds"}], "notes"}`.
///
/// `progress`, if given, is called every `progress_every` steps (and after the last) with a
/// dict of the step, total_steps, tokens, seconds and each SAE's step statistics; an
/// exception it raises stops the run and is re-raised.
///
/// `rows` (a C-contiguous float32 array, read in place) or `stream` (an iterator of 2-D
/// float32 arrays) is the data; `spec_json` (a `RunSpec` as JSON) or `spec_toml` (a TOML
/// file's path) the configuration, neither when `resume`. Training runs with the GIL released
/// on a thread of its own; this thread polls for signals, and Ctrl-C stops the run at the
/// next step with a checkpoint, raising `KeyboardInterrupt`. An exception the stream raised is
/// re-raised as it was.
#[pyfunction]
#[pyo3(signature = (dir, rows=None, stream=None, spec_json=None, spec_toml=None, force=false, threads=None, resume=false, progress=None, progress_every=1))]
#[allow(clippy::too_many_arguments)]
pub fn train(
    py: Python<'_>,
    dir: PathBuf,
    rows: Option<PyReadonlyArray2<'_, f32>>,
    stream: Option<Py<PyAny>>,
    spec_json: Option<&str>,
    spec_toml: Option<PathBuf>,
    force: bool,
    threads: Option<usize>,
    resume: bool,
    progress: Option<Py<PyAny>>,
    progress_every: u64,
) -> PyResult<String> {
    if progress_every == 0 {
        return Err(value_error("progress_every is 0; pass at least 1"));
    }
    let spec: Option<RunSpec> = match (spec_json, &spec_toml) {
        (Some(_), Some(_)) => {
            return Err(value_error(
                "pass the configuration as a dict or as a TOML file, not both",
            ))
        }
        (Some(json), None) => Some(
            serde_json::from_str(json)
                .map_err(|e| value_error(format!("invalid run configuration: {e}")))?,
        ),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|err| {
                to_py(Error::Io {
                    path: path.clone(),
                    action: "reading",
                    source: err,
                })
            })?;
            Some(toml::from_str(&text).map_err(|e| {
                value_error(format!(
                    "invalid run configuration {}: {}",
                    path.display(),
                    e.to_string().replace('\n', " ")
                ))
            })?)
        }
        (None, None) => None,
    };
    if resume && spec.is_some() {
        return Err(value_error(
            "resume=True continues the run in dir with its own config.toml; drop the \
             configuration",
        ));
    }
    let spec = match (spec, resume) {
        (None, false) => Some(RunSpec::default()),
        (spec, _) => spec,
    };
    let failure = Arc::new(Mutex::new(None));
    let data = match (&rows, stream) {
        (Some(rows), None) => RunData::Rows(Arc::new(ArrayRows::new(rows)?)),
        (None, Some(iterator)) => RunData::Stream(Box::new(PyStream {
            iterator,
            failure: failure.clone(),
            arrays: 0,
        })),
        _ => return Err(value_error("pass either rows or a stream")),
    };
    let pool = thread_pool(threads)?;
    let stop = AtomicBool::new(false);
    let mut interrupt: Option<PyErr> = None;
    let ended = py.detach(|| {
        std::thread::scope(|scope| {
            let (done_tx, done_rx) = mpsc::channel();
            let (stop, spec, dir, pool) = (&stop, spec.as_ref(), &dir, pool.as_deref());
            let watcher = Watcher {
                notes: Vec::new(),
                progress,
                every: progress_every,
                failure: &failure,
                stop,
            };
            scope.spawn(move || {
                let result = caught("training", || {
                    on_pool(pool, || {
                        run_all(spec, data, dir, force, resume, stop, watcher)
                    })
                    .map_err(to_py)
                });
                let _ = done_tx.send(result);
            });
            loop {
                match done_rx.recv_timeout(SIGNAL_POLL) {
                    Ok(result) => return result.unwrap_or_else(Err),
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        return Err(value_error("the training thread ended without a result"))
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                }
                if interrupt.is_none() {
                    if let Err(err) = Python::attach(|py| py.check_signals()) {
                        interrupt = Some(err);
                        stop.store(true, Ordering::SeqCst);
                    }
                }
            }
        })
    });
    if let Some(err) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(err);
    }
    match ended {
        Ok(Ended::Finished(value)) => Ok(value.to_string()),
        Ok(Ended::Interrupted(message)) => match interrupt {
            Some(err) if !err.is_instance_of::<PyKeyboardInterrupt>(py) => Err(err),
            _ => Err(PyKeyboardInterrupt::new_err(message)),
        },
        Err(err) => Err(interrupt.unwrap_or(err)),
    }
}
