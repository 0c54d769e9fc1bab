//! An SAE directory: `sae.safetensors` (the parameters, and θ when set) and `sae.json` (format
//! version, shape and architecture), written by [`Sae::save`] and read by [`Sae::load`].

use std::fs;
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

use safetensors::tensor::Dtype;

use super::sliced::{write_by_shards, LatentRows, SlicesOut};
use super::tensors::{standard, TensorsIn};
use super::{create_dir, write_atomic};
use crate::config::SaeConfig;
use crate::dist::{agree, part, Collective, Grid, SingleProcess};
use crate::error::escape_controls;
use crate::error::{io_error, Error, Result};
use crate::Sae;

/// The SAE's tensors, in an SAE directory.
pub const WEIGHTS_FILE: &str = "sae.safetensors";
/// The SAE's configuration, in an SAE directory.
pub const CONFIG_FILE: &str = "sae.json";
/// Bumped when the layout changes, so older files are refused with a clear message.
const FORMAT: u32 = 1;
/// What to do about a damaged SAE file.
const RESAVE: &str = "the directory was not written by `sae train` / Sae::save, or was damaged; \
                      train or save the SAE again";

/// What `sae.json` holds.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SaeFile {
    format: u32,
    config: SaeConfig,
    /// BatchTopK's θ, for people reading the file (`null` until training sets it). The
    /// `threshold` tensor is what is loaded; this is read only from files that lack it.
    threshold: Option<f32>,
}

impl Sae {
    /// Saves the SAE into `dir` (created if needed): `sae.safetensors` with f32 tensors
    /// `w_enc_fd` F×D, `b_enc_f` F, `w_dec_fd` F×D, `b_dec_d` D, JumpReLU's `threshold_f` F
    /// and, once BatchTopK has learned it, the scalar `threshold`; and `sae.json` (format, shape, architecture, θ). Each file is
    /// written atomically, the JSON last. [`Sae::load`] gives back an identical SAE, bit for
    /// bit.
    ///
    /// ```
    /// use sparse_autoencoder::io::{export_saelens, ExportMetadata};
    /// use sparse_autoencoder::{Architecture, Sae, SaeConfig};
    ///
    /// let dir = std::env::temp_dir().join(format!("sae-save-doc-{}", std::process::id()));
    /// let config = SaeConfig { d_model: 8, dict_size: 32, arch: Architecture::TopK { k: 4 } };
    /// let sae = Sae::new(config, 0)?;
    /// sae.save(&dir.join("mine"))?;
    /// let back = Sae::load(&dir.join("mine"))?;
    /// assert_eq!(back.w_dec_fd(), sae.w_dec_fd());
    /// // For SAELens: cfg.json and sae_weights.safetensors.
    /// export_saelens(&back, &dir.join("saelens"), &ExportMetadata::default())?;
    /// assert!(dir.join("saelens/cfg.json").is_file());
    /// # std::fs::remove_dir_all(&dir).unwrap();
    /// # Ok::<(), sparse_autoencoder::Error>(())
    /// ```
    pub fn save(&self, dir: &Path) -> Result<()> {
        let rows = LatentRows::whole(self.config.dict_size);
        self.save_rows(dir, rows, &SingleProcess)
    }

    /// Saves this latent shard of the dictionary configured by `global`, sharded over `grid`
    /// (see [`crate::Trainer::sharded`]): every rank calls it, and the shards of group 0 write
    /// their own rows of one `sae.safetensors`, byte for byte the file [`Sae::save`] writes for
    /// the whole dictionary, so [`Sae::load`], `sae eval` and `sae export` read it as any
    /// other. No rank holds more than its shard. An error on any rank is every rank's.
    pub fn save_shard(&self, dir: &Path, global: &SaeConfig, grid: &Grid) -> Result<()> {
        let (f, held) = (global.dict_size, self.config.dict_size);
        write_by_shards(grid, f, held, "dictionary", |rows| {
            self.save_rows(dir, rows, &*grid.latent)
        })
    }

    /// Writes the SAE directory of which this SAE holds latents `rows`, with the other
    /// processes of `collective` holding the rest.
    fn save_rows(&self, dir: &Path, rows: LatentRows, collective: &dyn Collective) -> Result<()> {
        create_dir(dir)?;
        let d = self.config.d_model;
        let threshold = self.threshold.map(|t| [t]);
        let mut tensors = SlicesOut::new(rows);
        tensors.latents_f32("w_enc_fd", Some(d), standard(&self.w_enc_fd));
        tensors.latents_f32("b_enc_f", None, standard(&self.b_enc_f));
        tensors.latents_f32("w_dec_fd", Some(d), standard(&self.w_dec_fd));
        tensors.shared_f32("b_dec_d", &[d], standard(&self.b_dec_d));
        if let Some(theta) = &threshold {
            tensors.shared_f32("threshold", &[], theta);
        }
        if !self.threshold_f.is_empty() {
            tensors.latents_f32("threshold_f", None, standard(&self.threshold_f));
        }
        tensors.write(&dir.join(WEIGHTS_FILE), None, collective)?;
        let written = if rows.writes_shared {
            let file = SaeFile {
                format: FORMAT,
                config: SaeConfig {
                    dict_size: rows.f,
                    ..self.config
                },
                threshold: self.threshold,
            };
            let json = serde_json::to_string_pretty(&file).expect("an SAE's config serialises");
            write_atomic(&dir.join(CONFIG_FILE), json.as_bytes())
        } else {
            Ok(())
        };
        agree(collective, written, false).map(|((), _)| ())
    }

    /// Loads the SAE that [`Sae::save`] wrote into `dir` (a run directory, or one SAE's
    /// subdirectory of a sweep). Every error names the directory or file and what to do: a
    /// missing directory or file, malformed JSON, an unknown format, tensors missing, extra, of
    /// the wrong shape or dtype, or holding NaN or ±Inf, a negative θ. Each tensor's shape is
    /// checked against `sae.json` before any is read, so a file claiming more cannot make the
    /// load read or allocate more than the SAE `sae.json` describes.
    pub fn load(dir: &Path) -> Result<Sae> {
        Self::load_rows(dir, |f| 0..f).map(|(sae, _)| sae)
    }

    /// Latent shard `shard` of `shards` of the SAE [`Sae::save`] (or [`Sae::save_shard`])
    /// wrote into `dir`: latents `part(F, shard, shards)` as an SAE of that many, read without
    /// the rest of the file, with the whole dictionary's configuration. Errors as
    /// [`Sae::load`]'s, and [`Error::Distributed`] when a shard would hold fewer latents than k.
    pub fn load_shard(dir: &Path, shard: usize, shards: usize) -> Result<(Sae, SaeConfig)> {
        Self::load_rows(dir, |f| part(f, shard, shards))
    }

    /// The latents `rows(F)` of the SAE in `dir`, and its whole configuration.
    fn load_rows(
        dir: &Path,
        rows: impl FnOnce(usize) -> std::ops::Range<usize>,
    ) -> Result<(Sae, SaeConfig)> {
        let file = read_sae_file(dir)?;
        let weights = TensorsIn::read(
            &dir.join(WEIGHTS_FILE),
            "the SAE directory is incomplete; train or save the SAE again",
            RESAVE,
        )?;
        let (f, d) = (file.config.dict_size, file.config.d_model);
        let jump = file.config.arch.has_latent_thresholds();
        let names = [
            "w_enc_fd",
            "b_enc_f",
            "w_dec_fd",
            "b_dec_d",
            "threshold",
            "threshold_f",
        ];
        weights.only(&names[..if jump { 6 } else { 5 }])?;
        let shapes: [&[usize]; 6] = [&[f, d], &[f], &[f, d], &[d], &[], &[f]];
        for (name, shape) in names.iter().zip(shapes) {
            let required = match *name {
                "threshold" => weights.has(name),
                "threshold_f" => jump,
                _ => true,
            };
            if required {
                weights.check(name, Dtype::F32, shape)?;
            }
        }
        let rows = rows(f);
        let local = SaeConfig {
            dict_size: rows.len(),
            ..file.config
        };
        if local.validate().is_err() {
            return Err(Error::Distributed {
                reason: format!(
                    "latents {rows:?} of the {f}-latent SAE in {} are too few for a shard of \
                     it; use fewer --latent-shards",
                    dir.display()
                ),
            });
        }
        let params = weights.params("", &file.config, &rows)?;
        let mut sae = Sae::from_parts(
            local,
            params.w_enc_fd,
            params.b_enc_f,
            params.w_dec_fd,
            params.b_dec_d,
        )?;
        if jump {
            sae.threshold_f = params.threshold_f;
        }
        sae.threshold = if weights.has("threshold") {
            let theta = weights.f32("threshold", &[])?[0];
            if theta < 0.0 {
                return Err(weights.bad(format!(
                    "tensor \"threshold\" is {theta}, but θ is a firing threshold and at least 0"
                )));
            }
            Some(theta)
        } else {
            file.threshold
        };
        Ok((sae, file.config))
    }
}

/// The largest `sae.json` read: the file `sae` writes is a few hundred bytes.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The SAE configuration in `dir/sae.json`, checked (see [`Sae::load`]): for readers of other
/// files of an SAE directory that must agree with it.
pub(crate) fn read_config(dir: &Path) -> Result<SaeConfig> {
    read_sae_file(dir).map(|file| file.config)
}

/// Reads and checks `dir/sae.json`: its size, JSON, format, configuration and θ.
fn read_sae_file(dir: &Path) -> Result<SaeFile> {
    let config_path = dir.join(CONFIG_FILE);
    let bad_config = |problem: String| Error::RunFile {
        path: config_path.clone(),
        problem: escape_controls(&problem),
        fix: RESAVE.into(),
    };
    let meta = fs::metadata(&config_path).map_err(|err| match err.kind() {
        std::io::ErrorKind::NotFound if !dir.is_dir() => Error::RunDir {
            path: dir.to_path_buf(),
            reason: "no such directory; give the run directory `sae train` wrote".into(),
        },
        std::io::ErrorKind::NotFound => Error::RunDir {
            path: dir.to_path_buf(),
            reason: format!(
                "no {CONFIG_FILE} here: not an SAE directory (for a sweep, give one SAE's \
                 subdirectory)"
            ),
        },
        _ => io_error(&config_path, "reading")(err),
    })?;
    // Reading a FIFO would block, and a huge file would be read whole.
    if !meta.is_file() {
        return Err(bad_config("not a regular file".into()));
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(bad_config(format!(
            "{} bytes, far more than the few hundred sae writes",
            meta.len()
        )));
    }
    let mut text = String::new();
    fs::File::open(&config_path)
        .and_then(|f| f.take(MAX_CONFIG_BYTES).read_to_string(&mut text))
        .map_err(io_error(&config_path, "reading"))?;
    let file: SaeFile =
        serde_json::from_str(&text).map_err(|err| bad_config(format!("malformed ({err})")))?;
    if file.format != FORMAT {
        return Err(bad_config(format!(
            "format {} is not {FORMAT}, the one this version of sae reads",
            file.format
        )));
    }
    file.config
        .validate()
        .map_err(|err| bad_config(format!("invalid configuration ({err})")))?;
    if let Some(theta) = file.threshold {
        if !(theta.is_finite() && theta >= 0.0) {
            return Err(bad_config(format!(
                "threshold is {theta}, but θ is a firing threshold: finite and at least 0"
            )));
        }
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Architecture, SaeConfig};
    use std::path::PathBuf;

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sae-io-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn load_errors_name_the_file() {
        let d = dir("errors");
        let err = Sae::load(&d).unwrap_err().to_string();
        assert!(err.contains("no such directory"), "{err}");
        fs::create_dir_all(&d).unwrap();
        let err = Sae::load(&d).unwrap_err().to_string();
        assert!(err.contains("not an SAE directory"), "{err}");

        let sae = Sae::new(
            SaeConfig {
                d_model: 4,
                dict_size: 8,
                arch: Architecture::TopK { k: 2 },
            },
            0,
        )
        .unwrap();
        sae.save(&d).unwrap();
        let json = d.join(CONFIG_FILE);
        let text = fs::read_to_string(&json).unwrap();
        fs::write(&json, text.replace("\"dict_size\": 8", "\"dict_size\": 9")).unwrap();
        let err = Sae::load(&d).unwrap_err().to_string();
        assert!(
            err.contains(WEIGHTS_FILE) && err.contains("w_enc_fd") && err.contains("[9, 4]"),
            "{err}"
        );
        fs::write(&json, "{").unwrap();
        let err = Sae::load(&d).unwrap_err().to_string();
        assert!(
            err.contains(CONFIG_FILE) && err.contains("malformed"),
            "{err}"
        );
        fs::write(&json, text).unwrap();
        let weights = d.join(WEIGHTS_FILE);
        let bytes = fs::read(&weights).unwrap();
        fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
        let err = Sae::load(&d).unwrap_err().to_string();
        assert!(err.contains(WEIGHTS_FILE), "{err}");
        fs::remove_file(&weights).unwrap();
        let err = Sae::load(&d).unwrap_err().to_string();
        assert!(
            err.contains(WEIGHTS_FILE) && err.contains("missing"),
            "{err}"
        );
        fs::remove_dir_all(d).unwrap();
    }
}
