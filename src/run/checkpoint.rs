//! A run's checkpoint: every trainer's state (parameters, θ, Adam's moments and step, the
//! dead-latent counters) and the run's own (step, data cursor, input scale), replaced
//! atomically as a whole.
//!
//! Layout: `checkpoint/run.json` and `checkpoint/<i>.safetensors` for the i-th SAE of the
//! run, its scalars in the safetensors header's metadata. A new checkpoint is written to
//! `checkpoint.new/` and then swapped in by renames, so a crash at any moment leaves either
//! the old checkpoint or the new one whole.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use ndarray::{Array1, Array2};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use super::{RunSpec, RunState};
use crate::error::{io_error, Error, Result};
use crate::io::{sync_dir, write_atomic};
use crate::optim::ParamTensors;
use crate::{Sae, Trainer};

/// The checkpoint's directory inside the run directory.
pub(crate) const DIR: &str = "checkpoint";
const NEW: &str = "checkpoint.new";
const OLD: &str = "checkpoint.old";
const RUN_FILE: &str = "run.json";
/// Bumped when the layout changes, so an old checkpoint is refused with a clear message.
const FORMAT: u32 = 1;

/// What `run.json` holds.
#[derive(Serialize, Deserialize)]
struct RunFile {
    format: u32,
    state: RunState,
    /// The SAEs' names, in file order, to catch a checkpoint from another configuration.
    names: Vec<String>,
}

/// A trainer's scalars, in its safetensors file's metadata.
#[derive(Serialize, Deserialize)]
struct TrainerScalars {
    step: u64,
    adam_t: u64,
    threshold: Option<f32>,
}

fn f32_bytes(values: &[f32]) -> &[u8] {
    bytemuck::cast_slice(values)
}

fn array_bytes<D: ndarray::Dimension>(a: &ndarray::Array<f32, D>) -> &[u8] {
    f32_bytes(
        a.as_slice()
            .expect("parameters are kept in standard layout"),
    )
}

fn le_f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect()
}

/// Saves the run's state and its trainers, replacing the previous checkpoint.
pub(crate) fn save(run_dir: &Path, state: &RunState, trainers: &[(&str, &Trainer)]) -> Result<()> {
    let new = run_dir.join(NEW);
    if new.exists() {
        fs::remove_dir_all(&new).map_err(io_error(&new, "removing"))?;
    }
    fs::create_dir_all(&new).map_err(io_error(&new, "creating"))?;
    for (i, (_, trainer)) in trainers.iter().enumerate() {
        let (sae, adam) = (trainer.sae(), trainer.adam());
        let scalars = TrainerScalars {
            step: trainer.steps_done(),
            adam_t: adam.t,
            threshold: sae.threshold(),
        };
        let (f, d) = (sae.config().dict_size, sae.config().d_model);
        let counters: &[u8] = bytemuck::cast_slice(trainer.tokens_since_fired());
        let view = |dtype, shape, data| {
            TensorView::new(dtype, shape, data).expect("shapes match their data")
        };
        let mut tensors: Vec<(String, TensorView<'_>)> = Vec::new();
        let groups = [
            (
                "",
                [&sae.w_enc_fd, &sae.w_dec_fd],
                [&sae.b_enc_f, &sae.b_dec_d],
            ),
            (
                "adam_m.",
                [&adam.m.w_enc_fd, &adam.m.w_dec_fd],
                [&adam.m.b_enc_f, &adam.m.b_dec_d],
            ),
            (
                "adam_v.",
                [&adam.v.w_enc_fd, &adam.v.w_dec_fd],
                [&adam.v.b_enc_f, &adam.v.b_dec_d],
            ),
        ];
        for (prefix, [w_enc, w_dec], [b_enc, b_dec]) in groups {
            for (name, w) in [("w_enc_fd", w_enc), ("w_dec_fd", w_dec)] {
                tensors.push((
                    format!("{prefix}{name}"),
                    view(Dtype::F32, vec![f, d], array_bytes(w)),
                ));
            }
            for (name, b) in [("b_enc_f", b_enc), ("b_dec_d", b_dec)] {
                tensors.push((
                    format!("{prefix}{name}"),
                    view(Dtype::F32, vec![b.len()], array_bytes(b)),
                ));
            }
        }
        tensors.push((
            "tokens_since_fired_f".into(),
            view(Dtype::U64, vec![f], counters),
        ));
        let metadata = HashMap::from([(
            "trainer".to_string(),
            serde_json::to_string(&scalars).expect("scalars serialise"),
        )]);
        let path = new.join(format!("{i}.safetensors"));
        let bytes =
            safetensors::serialize(tensors, Some(metadata)).map_err(|err| Error::RunDir {
                path: path.clone(),
                reason: format!("cannot encode the checkpoint: {err}"),
            })?;
        write_atomic(&path, &bytes)?;
    }
    let run_file = RunFile {
        format: FORMAT,
        state: state.clone(),
        names: trainers.iter().map(|(name, _)| name.to_string()).collect(),
    };
    let json = serde_json::to_string_pretty(&run_file).expect("run state serialises");
    write_atomic(&new.join(RUN_FILE), json.as_bytes())?;

    // Swap: the complete new checkpoint replaces the old one in two renames.
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
    let bad = |path: &Path, reason: String| Error::RunDir {
        path: path.to_path_buf(),
        reason: format!("{reason}; the checkpoint is damaged or from another version of sae"),
    };
    let run_path = dir.join(RUN_FILE);
    let text = fs::read_to_string(&run_path).map_err(io_error(&run_path, "reading"))?;
    let run_file: RunFile =
        serde_json::from_str(&text).map_err(|err| bad(&run_path, format!("malformed: {err}")))?;
    if run_file.format != FORMAT {
        return Err(bad(
            &run_path,
            format!("format {} is not {FORMAT}", run_file.format),
        ));
    }
    let names: Vec<String> = spec.sae.iter().filter_map(|s| s.name.clone()).collect();
    if run_file.names != names {
        return Err(bad(
            &run_path,
            format!(
                "it holds SAEs {:?} but config.toml names {names:?}",
                run_file.names
            ),
        ));
    }
    let cx = super::Context {
        d_model: 0,
        synthetic: spec.data.paths.is_empty(),
        steps: spec.train.steps.unwrap_or(0),
        batch_size: spec.train.batch_size.unwrap_or(0),
    };
    let mut trainers = Vec::with_capacity(names.len());
    for (i, sae_spec) in spec.sae.iter().enumerate() {
        let path = dir.join(format!("{i}.safetensors"));
        let bytes = fs::read(&path).map_err(io_error(&path, "reading"))?;
        let tensors =
            SafeTensors::deserialize(&bytes).map_err(|err| bad(&path, err.to_string()))?;
        let (_, metadata) =
            SafeTensors::read_metadata(&bytes).map_err(|err| bad(&path, err.to_string()))?;
        let scalars: TrainerScalars = metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get("trainer"))
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| bad(&path, "no trainer metadata".into()))?;
        let f32s = |name: &str| -> Result<(Vec<usize>, Vec<f32>)> {
            let view = tensors
                .tensor(name)
                .map_err(|err| bad(&path, format!("{name}: {err}")))?;
            if view.dtype() != Dtype::F32 {
                return Err(bad(&path, format!("{name} is {:?}, not F32", view.dtype())));
            }
            Ok((view.shape().to_vec(), le_f32s(view.data())))
        };
        let params = |prefix: &str| -> Result<ParamTensors> {
            let shape_err = |err: ndarray::ShapeError| bad(&path, format!("{prefix}: {err}"));
            let (s, w_enc) = f32s(&format!("{prefix}w_enc_fd"))?;
            let w_enc_fd = Array2::from_shape_vec((s[0], s[1]), w_enc).map_err(shape_err)?;
            let (_, b_enc_f) = f32s(&format!("{prefix}b_enc_f"))?;
            let (s, w_dec) = f32s(&format!("{prefix}w_dec_fd"))?;
            let w_dec_fd = Array2::from_shape_vec((s[0], s[1]), w_dec).map_err(shape_err)?;
            let (_, b_dec_d) = f32s(&format!("{prefix}b_dec_d"))?;
            Ok(ParamTensors {
                w_enc_fd,
                b_enc_f: Array1::from(b_enc_f),
                w_dec_fd,
                b_dec_d: Array1::from(b_dec_d),
            })
        };
        let p = params("")?;
        let d_model = p.w_enc_fd.ncols();
        let (_, sae_config, train_config) = sae_spec.resolve(super::Context { d_model, ..cx })?;
        let mut sae = Sae::from_parts(sae_config, p.w_enc_fd, p.b_enc_f, p.w_dec_fd, p.b_dec_d)?;
        sae.threshold = scalars.threshold;
        let counters = tensors
            .tensor("tokens_since_fired_f")
            .map_err(|err| bad(&path, err.to_string()))?;
        if counters.dtype() != Dtype::U64 {
            return Err(bad(&path, "tokens_since_fired_f is not U64".into()));
        }
        let counters: Vec<u64> = counters
            .data()
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let mut trainer = Trainer::new(Sae::new(sae_config, 0)?, train_config)?;
        trainer.restore(
            sae,
            [params("adam_m.")?, params("adam_v.")?],
            scalars.adam_t,
            scalars.step,
            counters,
        )?;
        if scalars.step != run_file.state.step {
            return Err(bad(
                &path,
                format!(
                    "the trainer is at step {} but the run at {}",
                    scalars.step, run_file.state.step
                ),
            ));
        }
        trainers.push(trainer);
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
