//! A run's checkpoint: each SAE's [`Checkpoint`] and the run's own state (step, data cursor,
//! input scale), replaced as a whole so that a crash at any system call leaves one complete
//! generation to resume from.
//!
//! Layout: `checkpoint/run.json` and `checkpoint/<i>/` (the i-th SAE's
//! `checkpoint.safetensors` and `checkpoint.json`). A generation is complete when its
//! `run.json` is there: it is written last, after every SAE's files are synced. A save first
//! settles what an earlier crash left (see [`settle`]), so only `checkpoint/` remains; then it
//! writes `checkpoint.new/`, renames `checkpoint` to `checkpoint.old`, `checkpoint.new` to
//! `checkpoint`, and removes `checkpoint.old`. At every point in between at least one complete
//! generation exists, and [`load`] reads the newest complete one of the three, checked by
//! reading every file of it.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Resolved, RunState};
use crate::dist::{agree, Grid};
use crate::error::{io_error, Error, Result};
use crate::io::LatentRows;
use crate::io::{sync_dir, write_atomic, Checkpoint};
use crate::Trainer;

/// The checkpoint's directory inside the run directory.
pub(crate) const DIR: &str = "checkpoint";
/// Where a save writes the next generation.
pub(crate) const NEW: &str = "checkpoint.new";
/// Where a save moves the previous generation while it swaps the new one in.
pub(crate) const OLD: &str = "checkpoint.old";
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

/// Saves the run's state and its trainers, replacing the previous checkpoint: every process
/// of `grid` calls it. Rank 0 moves the directories; the latent shards of group 0 write
/// their rows of each SAE's files (those of one process holding the whole SAE); an error on
/// any process is every process's.
pub(crate) fn save(
    run_dir: &Path,
    state: &RunState,
    trainers: &[(&str, &Trainer)],
    grid: &Grid,
) -> Result<()> {
    let world = &*grid.world;
    let new = run_dir.join(NEW);
    let dirs: Vec<PathBuf> = (0..trainers.len())
        .map(|i| new.join(i.to_string()))
        .collect();
    let prepared = match world.rank() {
        0 => settle(run_dir).and_then(|()| {
            dirs.iter()
                .try_for_each(|dir| fs::create_dir_all(dir).map_err(io_error(dir, "creating")))
        }),
        _ => Ok(()),
    };
    agree(world, prepared, false)?;
    let written = match grid.group() {
        0 => trainers
            .iter()
            .zip(&dirs)
            .try_for_each(|((name, trainer), dir)| {
                let checkpoint = Checkpoint {
                    state: trainer.state(),
                    extra: serde_json::json!({ "name": name }),
                };
                let rows = LatentRows::of_shard(grid, trainer.global_config().dict_size);
                checkpoint.write_files_rows(dir, rows, &*grid.latent)
            }),
        _ => Ok(()),
    };
    agree(world, written, false)?;
    let swapped = match world.rank() {
        0 => swap_in(run_dir, state, trainers),
        _ => Ok(()),
    };
    agree(world, swapped, false).map(|((), _)| ())
}

/// Rank 0's last part of [`save`]: the completion mark, then the renames.
fn swap_in(run_dir: &Path, state: &RunState, trainers: &[(&str, &Trainer)]) -> Result<()> {
    let new = run_dir.join(NEW);
    let run_file = RunFile {
        format: FORMAT,
        state: state.clone(),
        names: trainers.iter().map(|(name, _)| name.to_string()).collect(),
    };
    let json = serde_json::to_string_pretty(&run_file).expect("run state serialises");
    // The completion mark: written last, so a generation with it has every file.
    write_atomic(&new.join(RUN_FILE), json.as_bytes())?;

    let (current, old) = (run_dir.join(DIR), run_dir.join(OLD));
    if current.exists() {
        rename(&current, &old)?;
    }
    rename(&new, &current)?;
    sync_dir(run_dir);
    remove_dir(&old)
}

/// Brings what a crashed save (or a crashed removal) left back to one generation, the newest
/// complete one, in `checkpoint/` (or to none when none is complete). Every step keeps a
/// complete generation on disk, so a crash inside this function is settled by the next call.
fn settle(run_dir: &Path) -> Result<()> {
    let [current, new, old] = [DIR, NEW, OLD].map(|d| run_dir.join(d));
    if !new.exists() && !old.exists() {
        return Ok(());
    }
    if !complete(&current) {
        // `new` is newer than `old` whenever both are complete: it was written after `old`
        // was the current generation.
        if let Some(from) = [&new, &old].into_iter().find(|d| complete(d)) {
            remove_dir(&current)?;
            rename(from, &current)?;
            sync_dir(run_dir);
        }
    }
    // `checkpoint` is now the newest complete generation there is (or there is none, and what
    // is left is of no use).
    remove_dir(&new)?;
    remove_dir(&old)
}

/// Whether `dir` holds a whole generation: its completion mark, and each SAE's two files.
fn complete(dir: &Path) -> bool {
    let Some(run_file) = read_run_file(dir).ok() else {
        return false;
    };
    (0..run_file.names.len()).all(|i| {
        let sae = dir.join(i.to_string());
        [
            crate::io::CHECKPOINT_WEIGHTS_FILE,
            crate::io::CHECKPOINT_CONFIG_FILE,
        ]
        .iter()
        .all(|f| sae.join(f).is_file())
    })
}

fn read_run_file(dir: &Path) -> Result<RunFile> {
    let run_path = dir.join(RUN_FILE);
    let text = fs::read_to_string(&run_path).map_err(io_error(&run_path, "reading"))?;
    let run_file: RunFile = serde_json::from_str(&text).map_err(|err| {
        let reason = crate::error::escape_controls(&format!("malformed: {err}"));
        damaged(&run_path, reason)
    })?;
    if run_file.format != FORMAT {
        return Err(damaged(
            &run_path,
            format!("format {} is not {FORMAT}", run_file.format),
        ));
    }
    Ok(run_file)
}

fn damaged(path: &Path, reason: String) -> Error {
    Error::RunDir {
        path: path.to_path_buf(),
        reason: format!("{reason}; the checkpoint is damaged or from another version of sae"),
    }
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    fs::rename(from, to).map_err(io_error(from, "renaming"))
}

fn remove_dir(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(io_error(dir, "removing")(err))
        }
        _ => Ok(()),
    }
}

/// Reads the checkpoint of the run `run` in `run_dir`: the run's state and one trainer per
/// SAE, positioned to take the next step. Of the generations on disk the newest that reads
/// whole is taken; when none does, the error is the newest one's.
pub(crate) fn load(
    run_dir: &Path,
    run: &Resolved,
    grid: &Grid,
) -> Result<(RunState, Vec<Trainer>)> {
    let mut found: Vec<(u64, PathBuf)> = [DIR, NEW, OLD]
        .iter()
        .map(|d| run_dir.join(d))
        .filter_map(|d| Some((read_run_file(&d).ok()?.state.step, d)))
        .collect();
    // Newest first; at one step, in the order above.
    found.sort_by_key(|(step, _)| std::cmp::Reverse(*step));
    let mut first_err = None;
    for (_, dir) in &found {
        match load_from(dir, run, grid) {
            Ok(loaded) => return Ok(loaded),
            Err(err) => {
                first_err.get_or_insert(err);
            }
        }
    }
    Err(first_err.unwrap_or_else(|| Error::RunDir {
        path: run_dir.to_path_buf(),
        reason: "no checkpoint to resume from (the run finished, or was stopped before its \
                 first checkpoint); start a new run instead"
            .into(),
    }))
}

fn load_from(dir: &Path, run: &Resolved, grid: &Grid) -> Result<(RunState, Vec<Trainer>)> {
    let run_path = dir.join(RUN_FILE);
    let run_file = read_run_file(dir)?;
    let names = &run.names;
    if &run_file.names != names {
        return Err(damaged(
            &run_path,
            format!(
                "it holds SAEs {:?} but config.toml names {names:?}",
                run_file.names
            ),
        ));
    }
    let mut trainers = Vec::with_capacity(names.len());
    for (i, sae_spec) in run.spec.sae.iter().enumerate() {
        // A checkpoint from before the SAE's configuration held the ReLU variant gets
        // config.toml's, which the comparison below would otherwise find missing.
        let variant = sae_spec.relu_variant.unwrap_or_default();
        let from = dir.join(i.to_string());
        // The rows of this process's shard, once the file says how many latents it holds.
        let (checkpoint, saved) = Checkpoint::read_files_rows(&from, Some(variant), |f| {
            crate::dist::part(f, grid.shard, grid.shards)
        })?;
        let state = checkpoint.state;
        let cx = super::Context {
            d_model: state.sae.config().d_model,
            synthetic: run.spec.data.paths.is_empty(),
            steps: run.schedule.steps,
            batch_size: run.schedule.batch_size,
        };
        let (_, sae_config, train_config) = sae_spec.resolve(cx).map_err(|err| Error::RunFile {
            path: run.config_path.clone(),
            problem: format!("[[sae]] {}: {err}", names[i]),
            fix: "restore the file the run wrote".into(),
        })?;
        if saved != sae_config || state.step != run_file.state.step {
            return Err(damaged(
                &run_path,
                format!(
                    "SAE {} is {:?} at step {}, but config.toml asks for {sae_config:?} and the \
                     run is at step {}",
                    names[i], saved, state.step, run_file.state.step
                ),
            ));
        }
        trainers.push(match grid.shards {
            1 => Trainer::from_state(state, train_config)?,
            _ => {
                super::check_shardable(&train_config)?;
                Trainer::sharded_from_state(state, sae_config, train_config, grid)?
            }
        });
    }
    Ok((run_file.state, trainers))
}

/// Deletes a run's checkpoint (all three directories a save may leave). The completion mark
/// of `checkpoint/` goes first, so a crash part way leaves no generation that looks whole.
pub(crate) fn remove(run_dir: &Path) -> Result<()> {
    for d in [NEW, OLD, DIR] {
        let path = run_dir.join(d);
        let mark = path.join(RUN_FILE);
        match fs::remove_file(&mark) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                return Err(io_error(&mark, "removing")(err))
            }
            _ => {}
        }
        remove_dir(&path)?;
    }
    Ok(())
}
