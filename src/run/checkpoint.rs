//! A run's checkpoint: each SAE's [`Checkpoint`] and the run's own state (step, data cursor,
//! input scale), replaced atomically as a whole.
//!
//! Layout: `checkpoint/run.json` and `checkpoint/<i>/` (the i-th SAE's
//! `checkpoint.safetensors` and `checkpoint.json`). A new checkpoint is written to
//! `checkpoint.new/` and swapped in by renames, so a crash at any moment leaves either the old
//! checkpoint or the new one whole, for every SAE of a sweep at once.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{RunSpec, RunState};
use crate::error::{io_error, Error, Result};
use crate::io::{sync_dir, write_atomic, Checkpoint};
use crate::Trainer;

/// The checkpoint's directory inside the run directory.
pub(crate) const DIR: &str = "checkpoint";
const NEW: &str = "checkpoint.new";
const OLD: &str = "checkpoint.old";
const RUN_FILE: &str = "run.json";
/// Bumped when the layout changes, so an old checkpoint is refused with a clear message.
const FORMAT: u32 = 2;

/// What `run.json` holds.
#[derive(Serialize, Deserialize)]
struct RunFile {
    format: u32,
    state: RunState,
    /// The SAEs' names, in directory order, to catch a checkpoint of another configuration.
    names: Vec<String>,
}

/// Saves the run's state and its trainers, replacing the previous checkpoint.
pub(crate) fn save(run_dir: &Path, state: &RunState, trainers: &[(&str, &Trainer)]) -> Result<()> {
    let new = run_dir.join(NEW);
    if new.exists() {
        // Left by a save that crashed before its swap.
        fs::remove_dir_all(&new).map_err(io_error(&new, "removing"))?;
    }
    for (i, (name, trainer)) in trainers.iter().enumerate() {
        let dir = new.join(i.to_string());
        fs::create_dir_all(&dir).map_err(io_error(&dir, "creating"))?;
        let checkpoint = Checkpoint {
            state: trainer.state(),
            extra: serde_json::json!({ "name": name }),
        };
        checkpoint.write_files(&dir)?;
    }
    let run_file = RunFile {
        format: FORMAT,
        state: state.clone(),
        names: trainers.iter().map(|(name, _)| name.to_string()).collect(),
    };
    let json = serde_json::to_string_pretty(&run_file).expect("run state serialises");
    write_atomic(&new.join(RUN_FILE), json.as_bytes())?;

    let (current, old) = (run_dir.join(DIR), run_dir.join(OLD));
    if old.exists() {
        fs::remove_dir_all(&old).map_err(io_error(&old, "removing"))?;
    }
    if current.exists() {
        fs::rename(&current, &old).map_err(io_error(&current, "renaming"))?;
    }
    fs::rename(&new, &current).map_err(io_error(&new, "renaming"))?;
    sync_dir(run_dir);
    if old.exists() {
        fs::remove_dir_all(&old).map_err(io_error(&old, "removing"))?;
    }
    Ok(())
}

/// The checkpoint directory to read: the current one, or the old one if a crash came between
/// the two renames of [`save`].
fn existing(run_dir: &Path) -> Option<PathBuf> {
    [DIR, OLD]
        .iter()
        .map(|d| run_dir.join(d))
        .find(|d| d.join(RUN_FILE).is_file())
}

/// Reads the checkpoint of the run `spec` in `run_dir`: the run's state and one trainer per
/// SAE, positioned to take the next step.
pub(crate) fn load(run_dir: &Path, spec: &RunSpec) -> Result<(RunState, Vec<Trainer>)> {
    let dir = existing(run_dir).ok_or_else(|| Error::RunDir {
        path: run_dir.to_path_buf(),
        reason: "no checkpoint to resume from (the run finished, or was stopped before its \
                 first checkpoint); start a new run instead"
            .into(),
    })?;
    let run_path = dir.join(RUN_FILE);
    let bad = |reason: String| Error::RunDir {
        path: run_path.clone(),
        reason: format!("{reason}; the checkpoint is damaged or from another version of sae"),
    };
    let text = fs::read_to_string(&run_path).map_err(io_error(&run_path, "reading"))?;
    let run_file: RunFile =
        serde_json::from_str(&text).map_err(|err| bad(format!("malformed: {err}")))?;
    if run_file.format != FORMAT {
        return Err(bad(format!("format {} is not {FORMAT}", run_file.format)));
    }
    let names: Vec<String> = spec.sae.iter().filter_map(|s| s.name.clone()).collect();
    if run_file.names != names {
        return Err(bad(format!(
            "it holds SAEs {:?} but config.toml names {names:?}",
            run_file.names
        )));
    }
    let mut trainers = Vec::with_capacity(names.len());
    for (i, sae_spec) in spec.sae.iter().enumerate() {
        let checkpoint = Checkpoint::read_files(&dir.join(i.to_string()))?;
        let state = checkpoint.state;
        let cx = super::Context {
            d_model: state.sae.config().d_model,
            synthetic: spec.data.paths.is_empty(),
            steps: spec.train.steps.unwrap_or(0),
            batch_size: spec.train.batch_size.unwrap_or(0),
        };
        let (_, sae_config, train_config) = sae_spec.resolve(cx)?;
        if *state.sae.config() != sae_config || state.step != run_file.state.step {
            return Err(bad(format!(
                "SAE {} is {:?} at step {}, but config.toml asks for {sae_config:?} and the run \
                 is at step {}",
                names[i],
                state.sae.config(),
                state.step,
                run_file.state.step
            )));
        }
        trainers.push(Trainer::from_state(state, train_config)?);
    }
    Ok((run_file.state, trainers))
}

/// Deletes a run's checkpoint (all three directories a save may leave).
pub(crate) fn remove(run_dir: &Path) -> Result<()> {
    for d in [DIR, NEW, OLD] {
        let path = run_dir.join(d);
        if path.exists() {
            fs::remove_dir_all(&path).map_err(io_error(&path, "removing"))?;
        }
    }
    Ok(())
}
