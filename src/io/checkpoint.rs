//! A trainer checkpoint: a [`TrainerState`] and the caller's own state, in a directory of
//! their own holding `checkpoint.safetensors` (every array) and `checkpoint.json` (the SAE's
//! configuration, the scalars and the caller's JSON).
//!
//! The two files must always come from the same save, so a save writes both into a sibling
//! `<dir>.new/` and swaps that directory in with two renames (`<dir>` → `<dir>.old`,
//! `<dir>.new` → `<dir>`). Writing the files in place one after the other, JSON last, would
//! never leave a torn file, but a crash between the two would pair new tensors with old
//! scalars, or lose the old checkpoint if the pairing is checked. A save first settles what a
//! crashed save left (the newest whole one of the three directories moved to `<dir>`, the
//! others removed), so a crash at any moment, a crash of the next save included, leaves a
//! whole checkpoint in one of them; [`Checkpoint::load`] reads the newest whole one.

use std::collections::HashMap;
use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::sliced::{LatentRows, SlicesOut};
use super::tensors::{standard, TensorsIn};
use super::{create_dir, sync_dir, write_atomic};
use crate::config::{Architecture, ReluVariant, SaeConfig};
use crate::dist::{agree, Collective, SingleProcess};
use crate::error::{io_error, Error, Result};
use crate::train::TrainerState;
use crate::Sae;

/// Every array of a checkpoint.
pub const CHECKPOINT_WEIGHTS_FILE: &str = "checkpoint.safetensors";
/// A checkpoint's configuration, scalars and caller state.
pub const CHECKPOINT_CONFIG_FILE: &str = "checkpoint.json";
/// Bumped when the layout changes, so an older checkpoint is refused with a clear message.
const FORMAT: u32 = 2;
/// The format before a ReLU SAE's configuration recorded its variant (`relu_variant`, then in
/// the training recipe): read when the variant comes from elsewhere (the run's config.toml).
const FORMAT_WITHOUT_RELU_VARIANT: u32 = 1;
/// What to do about a damaged checkpoint.
const DAMAGED: &str = "the checkpoint is damaged or from another version of sae; resume from \
                       another checkpoint or start again";

/// A trainer's state and whatever else its caller needs to resume (a data cursor, an RNG
/// state, the training configuration), saved and loaded as a whole.
///
/// ```
/// use sparse_autoencoder::io::Checkpoint;
/// use sparse_autoencoder::{Architecture, Sae, SaeConfig, TrainConfig, Trainer};
///
/// let dir = std::env::temp_dir().join(format!("sae-ckpt-doc-{}", std::process::id()));
/// let sae_config = SaeConfig { d_model: 4, dict_size: 16, arch: Architecture::TopK { k: 2 } };
/// let train_config = TrainConfig { total_steps: 10, warmup_steps: 1, ..TrainConfig::default() };
/// let trainer = Trainer::new(Sae::new(sae_config, 0)?, train_config.clone())?;
/// let extra = serde_json::json!({ "batch_index": 0 });
/// Checkpoint { state: trainer.state(), extra }.save(&dir)?;
///
/// let back = Checkpoint::load(&dir)?;
/// let resumed = Trainer::from_state(back.state, train_config)?;
/// assert_eq!(resumed.steps_done(), 0);
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), sparse_autoencoder::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// The trainer's state.
    pub state: TrainerState,
    /// The caller's own state, stored as given in `checkpoint.json`.
    pub extra: serde_json::Value,
}

/// What `checkpoint.json` holds.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointFile {
    format: u32,
    sae: SaeConfig,
    /// θ as text, for people reading the file; the `threshold` tensor is what is loaded.
    threshold: Option<f32>,
    step: u64,
    adam_t: u64,
    extra: serde_json::Value,
}

impl Checkpoint {
    /// Saves the checkpoint as `dir/checkpoint.safetensors` and `dir/checkpoint.json`,
    /// replacing a previous checkpoint in `dir` as a whole (see the module docs). `dir` must be
    /// the checkpoint's own directory: one holding anything else is refused rather than
    /// replaced.
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.state.validate()?;
        let [new, old] = siblings(dir)?;
        for d in [dir, &new, &old] {
            only_checkpoint_files(d)?;
        }
        settle(dir, &new, &old)?;
        create_dir(&new)?;
        self.write_files(&new)?;
        sync_dir(&new);
        if dir.exists() {
            fs::rename(dir, &old).map_err(io_error(dir, "renaming"))?;
        }
        fs::rename(&new, dir).map_err(io_error(&new, "renaming"))?;
        sync_dir(dir.parent().unwrap_or(Path::new("")));
        if old.exists() {
            fs::remove_dir_all(&old).map_err(io_error(&old, "removing"))?;
        }
        Ok(())
    }

    /// Writes the two files into `dir` (which must exist), without the swap: for callers that
    /// swap a larger directory holding several checkpoints as a whole (a sweep's run).
    pub(crate) fn write_files(&self, dir: &Path) -> Result<()> {
        let rows = LatentRows::whole(self.state.sae.config().dict_size);
        self.write_files_rows(dir, rows, &SingleProcess)
    }

    /// [`Checkpoint::write_files`] by the processes of `collective`, each holding the state of
    /// latents `rows` (a latent shard; see [`crate::Trainer::sharded`]): the files are those
    /// one process holding the whole state would write, so a checkpoint of any shard count
    /// resumes with any other ([`Checkpoint::read_files_rows`]).
    pub(crate) fn write_files_rows(
        &self,
        dir: &Path,
        rows: LatentRows,
        collective: &dyn Collective,
    ) -> Result<()> {
        let state = &self.state;
        let sae = &state.sae;
        let d = sae.config().d_model;
        let threshold = sae.threshold().map(|t| [t]);
        let mut tensors = SlicesOut::new(rows);
        tensors.latents_f32("w_enc_fd", Some(d), standard(&sae.w_enc_fd));
        tensors.latents_f32("b_enc_f", None, standard(&sae.b_enc_f));
        tensors.latents_f32("w_dec_fd", Some(d), standard(&sae.w_dec_fd));
        tensors.shared_f32("b_dec_d", &[d], standard(&sae.b_dec_d));
        if !sae.threshold_f.is_empty() {
            tensors.latents_f32("threshold_f", None, standard(&sae.threshold_f));
        }
        tensors.params("adam_m.", &state.adam_m);
        tensors.params("adam_v.", &state.adam_v);
        tensors.latents_u64("tokens_since_fired_f", &state.tokens_since_fired_f);
        if let Some(theta) = &threshold {
            tensors.shared_f32("threshold", &[], theta);
        }
        // The step in the tensor file too, so files of two checkpoints mixed by hand are caught.
        let metadata = HashMap::from([("step".to_string(), state.step.to_string())]);
        let weights = dir.join(CHECKPOINT_WEIGHTS_FILE);
        tensors.write(&weights, Some(metadata), collective)?;
        let written = if rows.writes_shared {
            let file = CheckpointFile {
                format: FORMAT,
                sae: SaeConfig {
                    dict_size: rows.f,
                    ..*sae.config()
                },
                threshold: sae.threshold(),
                step: state.step,
                adam_t: state.adam_t,
                extra: self.extra.clone(),
            };
            let json = serde_json::to_string_pretty(&file).expect("a checkpoint serialises");
            write_atomic(&dir.join(CHECKPOINT_CONFIG_FILE), json.as_bytes())
        } else {
            Ok(())
        };
        agree(collective, written, false).map(|((), _)| ())
    }

    /// Loads the checkpoint [`Checkpoint::save`] wrote into `dir` (or into `<dir>.old`, if a
    /// save crashed between its two renames). Every tensor's dtype and shape is checked
    /// against the SAE configuration the checkpoint records; resume with
    /// [`crate::Trainer::from_state`].
    pub fn load(dir: &Path) -> Result<Checkpoint> {
        let [new, old] = siblings(dir)?;
        let mut newest: Option<Result<Checkpoint>> = None;
        for d in [dir, &new, &old] {
            if !d.join(CHECKPOINT_CONFIG_FILE).is_file() {
                continue;
            }
            let read = Checkpoint::read_files(d, None);
            newest = match (newest, read) {
                (Some(Ok(best)), Ok(c)) if c.state.step <= best.state.step => Some(Ok(best)),
                (Some(Ok(best)), Err(_)) => Some(Ok(best)),
                (_, read) => Some(read),
            };
        }
        newest.unwrap_or_else(|| {
            Err(Error::RunDir {
                path: dir.to_path_buf(),
                reason: format!(
                    "no {CHECKPOINT_CONFIG_FILE} here: not a checkpoint directory; give the \
                     directory Checkpoint::save wrote"
                ),
            })
        })
    }

    /// Reads the two files [`Checkpoint::write_files`] wrote into `from`. A ReLU SAE of a
    /// format-1 checkpoint, which did not record its variant, gets `relu_variant`; without
    /// one, such a checkpoint is refused.
    pub(crate) fn read_files(from: &Path, relu_variant: Option<ReluVariant>) -> Result<Checkpoint> {
        Checkpoint::read_files_rows(from, relu_variant, |f| 0..f).map(|(c, _)| c)
    }

    /// [`Checkpoint::read_files`], keeping latents `rows(F)` of the checkpoint's F: the state
    /// of one latent shard (see [`crate::Trainer::sharded`]), as an SAE of that many latents,
    /// and the whole SAE's configuration. Only those rows are read.
    pub(crate) fn read_files_rows(
        from: &Path,
        relu_variant: Option<ReluVariant>,
        rows: impl FnOnce(usize) -> Range<usize>,
    ) -> Result<(Checkpoint, SaeConfig)> {
        let config_path = from.join(CHECKPOINT_CONFIG_FILE);
        let bad = |problem: String| Error::RunFile {
            path: config_path.clone(),
            problem,
            fix: DAMAGED.into(),
        };
        let text = fs::read_to_string(&config_path).map_err(io_error(&config_path, "reading"))?;
        let file: CheckpointFile = serde_json::from_str(&text).map_err(|err| {
            // serde quotes unknown fields and variants as the file spells them.
            bad(crate::error::escape_controls(&format!("malformed ({err})")))
        })?;
        let mut file = file;
        match (file.format, file.sae.arch, relu_variant) {
            (FORMAT, ..) => {}
            (FORMAT_WITHOUT_RELU_VARIANT, Architecture::Relu { .. }, Some(variant)) => {
                file.sae.arch = Architecture::Relu { variant };
            }
            (FORMAT_WITHOUT_RELU_VARIANT, Architecture::Relu { .. }, None) => {
                return Err(Error::RunFile {
                    path: config_path.clone(),
                    problem: "format 1 does not record which ReLU variant the SAE trains with"
                        .into(),
                    fix: "resume the run with `sae train --resume`, which reads the variant \
                          from its config.toml"
                        .into(),
                })
            }
            (FORMAT_WITHOUT_RELU_VARIANT, ..) => {}
            (format, ..) => {
                return Err(bad(format!(
                    "format {format} is not {FORMAT}, the one this version of sae reads"
                )))
            }
        }
        file.sae
            .validate()
            .map_err(|err| bad(format!("invalid SAE configuration ({err})")))?;
        let tensors = TensorsIn::read(
            &from.join(CHECKPOINT_WEIGHTS_FILE),
            "the checkpoint is incomplete; resume from another checkpoint or start again",
            DAMAGED,
        )?;
        let step = tensors.metadata("step")?;
        if step != file.step.to_string() {
            return Err(tensors.bad(format!(
                "it was saved at step {step} but {CHECKPOINT_CONFIG_FILE} is at step {}: the \
                 two files come from different checkpoints",
                file.step
            )));
        }
        let f = file.sae.dict_size;
        let rows = rows(f);
        let local = SaeConfig {
            dict_size: rows.len(),
            ..file.sae
        };
        if rows.is_empty() || rows.end > f || local.validate().is_err() {
            return Err(Error::Distributed {
                reason: format!(
                    "a latent shard of latents {rows:?} cannot hold part of the checkpoint's \
                     {f}-latent dictionary ({}); use fewer --latent-shards",
                    config_path.display()
                ),
            });
        }
        let p = tensors.params("", &file.sae, &rows)?;
        let mut sae = Sae::from_parts(local, p.w_enc_fd, p.b_enc_f, p.w_dec_fd, p.b_dec_d)?;
        sae.threshold_f = p.threshold_f;
        sae.threshold = if tensors.has("threshold") {
            Some(tensors.f32("threshold", &[])?[0])
        } else {
            None
        };
        let state = TrainerState {
            sae,
            adam_m: tensors.params("adam_m.", &file.sae, &rows)?,
            adam_v: tensors.params("adam_v.", &file.sae, &rows)?,
            adam_t: file.adam_t,
            step: file.step,
            tokens_since_fired_f: tensors.u64_rows("tokens_since_fired_f", &[f], &rows)?,
        };
        let checkpoint = Checkpoint {
            state,
            extra: file.extra,
        };
        Ok((checkpoint, file.sae))
    }
}

/// Brings what a crashed save left back to one whole checkpoint in `dir` (or none): the newest
/// whole one moves there, then the others go. A whole one stays on disk at every step.
fn settle(dir: &Path, new: &Path, old: &Path) -> Result<()> {
    let whole = |d: &Path| {
        [CHECKPOINT_CONFIG_FILE, CHECKPOINT_WEIGHTS_FILE]
            .iter()
            .all(|f| d.join(f).is_file())
    };
    if !whole(dir) {
        // `new` was written after `old` was current: it is the newer when both are whole.
        if let Some(from) = [new, old].into_iter().find(|d| whole(d)) {
            if dir.exists() {
                fs::remove_dir_all(dir).map_err(io_error(dir, "removing"))?;
            }
            fs::rename(from, dir).map_err(io_error(from, "renaming"))?;
            sync_dir(dir.parent().unwrap_or(Path::new("")));
        }
    }
    for d in [new, old] {
        if d.exists() {
            fs::remove_dir_all(d).map_err(io_error(d, "removing"))?;
        }
    }
    Ok(())
}

/// `<dir>.new` and `<dir>.old`, beside `dir`.
fn siblings(dir: &Path) -> Result<[PathBuf; 2]> {
    let name = dir.file_name().ok_or_else(|| Error::RunDir {
        path: dir.to_path_buf(),
        reason: "a checkpoint needs a directory of its own; give a path that ends in a name, \
                 such as run/checkpoint"
            .into(),
    })?;
    Ok(["new", "old"].map(|ext| {
        let mut sibling = name.to_owned();
        sibling.push(format!(".{ext}"));
        dir.with_file_name(sibling)
    }))
}

/// Refuses a directory that holds anything but a checkpoint's files, since a save replaces
/// it whole.
fn only_checkpoint_files(dir: &Path) -> Result<()> {
    let Ok(entries) = fs::read_dir(dir) else {
        if dir.exists() && !dir.is_dir() {
            return Err(Error::RunDir {
                path: dir.to_path_buf(),
                reason: "is a file; give the checkpoint a directory of its own".into(),
            });
        }
        return Ok(());
    };
    for entry in entries {
        let entry = entry.map_err(io_error(dir, "listing"))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let ours = [CHECKPOINT_WEIGHTS_FILE, CHECKPOINT_CONFIG_FILE]
            .iter()
            .any(|f| name == *f || name == format!("{f}.tmp"));
        if !ours {
            return Err(Error::RunDir {
                path: dir.to_path_buf(),
                reason: format!(
                    "holds {name}, which is not part of a checkpoint; a checkpoint replaces its \
                     directory whole, so give it a directory of its own"
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Architecture, SaeConfig, TrainConfig, Trainer};

    fn at_step(step: u64) -> Checkpoint {
        of(Architecture::TopK { k: 2 }, step)
    }

    fn of(arch: Architecture, step: u64) -> Checkpoint {
        let config = SaeConfig {
            d_model: 4,
            dict_size: 8,
            arch,
        };
        let train = TrainConfig {
            total_steps: 10,
            warmup_steps: 1,
            sparsity_warmup_steps: 1,
            ..TrainConfig::default()
        };
        let mut state = Trainer::new(Sae::new(config, 0).unwrap(), train)
            .unwrap()
            .state();
        state.step = step;
        state.adam_t = step;
        Checkpoint {
            state,
            extra: serde_json::json!(null),
        }
    }

    #[test]
    fn a_crash_between_the_renames_and_then_in_the_next_save_keeps_the_newest_whole_one() {
        let root = std::env::temp_dir().join(format!("sae-io-ckpt-settle-{}", std::process::id()));
        let (dir, [new, old]) = (root.join("ckpt"), siblings(&root.join("ckpt")).unwrap());
        // What a save of step 3 leaves when killed between its two renames.
        at_step(2).save(&dir).unwrap();
        create_dir(&new).unwrap();
        at_step(3).write_files(&new).unwrap();
        fs::rename(&dir, &old).unwrap();
        assert_eq!(Checkpoint::load(&dir).unwrap().state.step, 3);
        // The next save's first act, and all a crash right after it leaves.
        settle(&dir, &new, &old).unwrap();
        assert!(!new.exists() && !old.exists());
        assert_eq!(Checkpoint::load(&dir).unwrap().state.step, 3);
        at_step(4).save(&dir).unwrap();
        assert_eq!(Checkpoint::load(&dir).unwrap().state.step, 4);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn the_relu_variant_is_recorded_and_a_format_1_checkpoint_needs_it_from_elsewhere() {
        let root = std::env::temp_dir().join(format!("sae-io-ckpt-variant-{}", std::process::id()));
        let unit = Architecture::Relu {
            variant: ReluVariant::UnitDecoder,
        };
        for (i, arch) in [unit, Architecture::TopK { k: 2 }].into_iter().enumerate() {
            let dir = root.join(i.to_string());
            of(arch, 0).save(&dir).unwrap();
            assert_eq!(
                Checkpoint::load(&dir).unwrap().state.sae.config().arch,
                arch
            );
            // What this version's predecessor wrote: format 1, no variant.
            let path = dir.join(CHECKPOINT_CONFIG_FILE);
            let mut json: serde_json::Value =
                serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
            json["format"] = 1.into();
            json["sae"].as_object_mut().unwrap().remove("relu_variant");
            fs::write(&path, json.to_string()).unwrap();
            let given = Checkpoint::read_files(&dir, Some(ReluVariant::UnitDecoder)).unwrap();
            assert_eq!(given.state.sae.config().arch, arch);
            match arch {
                Architecture::Relu { .. } => {
                    let err = Checkpoint::load(&dir).unwrap_err().to_string();
                    assert!(
                        err.contains("format 1") && err.contains("sae train --resume"),
                        "{err}"
                    );
                }
                _ => assert_eq!(
                    Checkpoint::load(&dir).unwrap().state.sae.config().arch,
                    arch
                ),
            }
        }
        fs::remove_dir_all(root).unwrap();
    }
}
