//! Files: an SAE saved and loaded (`sae.safetensors` + `sae.json`), exported for SAELens and
//! sparsify, its codes streamed to `.npy`, and the atomic write every run file goes through.

mod codes;
mod export;

pub use codes::{CodesLayout, CodesWriter};
pub use export::{export_saelens, export_sparsify, ExportMetadata};

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use ndarray::{Array1, Array2};
use npyz::WriterBuilder;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use crate::config::SaeConfig;
use crate::error::{io_error, Error, Result};
use crate::Sae;

/// The SAE's tensors, in an SAE directory.
pub const WEIGHTS_FILE: &str = "sae.safetensors";
/// The SAE's configuration and θ, in an SAE directory.
pub const CONFIG_FILE: &str = "sae.json";
/// Bumped when the layout changes, so older files are refused with a clear message.
const FORMAT: u32 = 1;

/// Writes `contents` to `path` so that readers see the old file or the new one, never part:
/// a temporary file beside it, flushed to disk, renamed over it, the directory synced.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    let mut file = fs::File::create(&tmp).map_err(io_error(&tmp, "creating"))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(io_error(&tmp, "writing"))?;
    fs::rename(&tmp, path).map_err(io_error(path, "renaming into place"))?;
    sync_dir(path.parent().unwrap_or(Path::new("")));
    Ok(())
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    PathBuf::from(tmp)
}

/// Makes renames in `dir` durable. Best effort: some filesystems refuse to sync a directory,
/// and the data itself was synced before the rename.
pub(crate) fn sync_dir(dir: &Path) {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Writes `values` as a C-order `.npy` array of the given shape (format 1.0, the dtype numpy
/// calls `<f4`, `<u4`, `<i8`, ... for f32, u32, i64, ...), atomically.
pub fn write_npy<T: npyz::AutoSerialize + Copy>(
    path: &Path,
    shape: &[u64],
    values: &[T],
) -> Result<()> {
    let elements: u64 = shape.iter().product();
    if elements != values.len() as u64 {
        return Err(Error::Shape {
            what: format!("values for {}", path.display()),
            expected: shape.iter().map(|&n| n as usize).collect(),
            got: vec![values.len()],
        });
    }
    let tmp = tmp_path(path);
    let file = fs::File::create(&tmp).map_err(io_error(&tmp, "creating"))?;
    let mut out = BufWriter::new(file);
    let written = (|| -> std::io::Result<()> {
        let mut writer = npyz::WriteOptions::new()
            .default_dtype()
            .shape(shape)
            .writer(&mut out)
            .begin_nd()?;
        writer.extend(values.iter().copied())?;
        writer.finish()?;
        out.flush()?;
        out.get_ref().sync_all()
    })();
    written.map_err(io_error(&tmp, "writing"))?;
    fs::rename(&tmp, path).map_err(io_error(path, "renaming into place"))?;
    sync_dir(path.parent().unwrap_or(Path::new("")));
    Ok(())
}

/// What `sae.json` holds.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SaeFile {
    format: u32,
    config: SaeConfig,
    /// BatchTopK's θ (`null` until training sets it). JSON keeps an f32 exactly.
    threshold: Option<f32>,
}

fn f32_bytes<D: ndarray::Dimension>(a: &ndarray::Array<f32, D>) -> &[u8] {
    bytemuck::cast_slice(
        a.as_slice()
            .expect("parameters are kept in standard layout"),
    )
}

impl Sae {
    /// Saves the SAE into `dir` (created if needed): `sae.safetensors` (f32 `w_enc_fd` F×D,
    /// `b_enc_f`, `w_dec_fd` F×D, `b_dec_d`) and `sae.json` (shape, architecture, θ), each
    /// written atomically. [`Sae::load`] gives back an identical SAE.
    pub fn save(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).map_err(io_error(dir, "creating"))?;
        let (f, d) = (self.config.dict_size, self.config.d_model);
        let view = |shape: Vec<usize>, data| {
            TensorView::new(Dtype::F32, shape, data).expect("shapes match their data")
        };
        let tensors = [
            ("w_enc_fd", view(vec![f, d], f32_bytes(&self.w_enc_fd))),
            ("b_enc_f", view(vec![f], f32_bytes(&self.b_enc_f))),
            ("w_dec_fd", view(vec![f, d], f32_bytes(&self.w_dec_fd))),
            ("b_dec_d", view(vec![d], f32_bytes(&self.b_dec_d))),
        ];
        let weights = dir.join(WEIGHTS_FILE);
        let bytes = safetensors::serialize(tensors, None).map_err(|err| Error::RunDir {
            path: weights.clone(),
            reason: format!("cannot encode the weights: {err}"),
        })?;
        write_atomic(&weights, &bytes)?;
        let file = SaeFile {
            format: FORMAT,
            config: self.config,
            threshold: self.threshold,
        };
        let json = serde_json::to_string_pretty(&file).expect("an SAE's config serialises");
        write_atomic(&dir.join(CONFIG_FILE), json.as_bytes())
    }

    /// Loads the SAE that [`Sae::save`] wrote into `dir` (a run directory, or one SAE's
    /// subdirectory of a sweep).
    pub fn load(dir: &Path) -> Result<Sae> {
        let config_path = dir.join(CONFIG_FILE);
        let bad = |path: &Path, problem: String| Error::RunDir {
            path: path.to_path_buf(),
            reason: format!(
                "{problem}; it is not an SAE written by `sae train` (or it was damaged)"
            ),
        };
        let text = fs::read_to_string(&config_path).map_err(|err| match err.kind() {
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
        let file: SaeFile = serde_json::from_str(&text)
            .map_err(|err| bad(&config_path, format!("malformed: {err}")))?;
        if file.format != FORMAT {
            return Err(bad(
                &config_path,
                format!("format {} is not {FORMAT}", file.format),
            ));
        }
        file.config.validate()?;
        let weights = dir.join(WEIGHTS_FILE);
        let bytes = fs::read(&weights).map_err(io_error(&weights, "reading"))?;
        let tensors =
            SafeTensors::deserialize(&bytes).map_err(|err| bad(&weights, err.to_string()))?;
        let (f, d) = (file.config.dict_size, file.config.d_model);
        let read = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            let view = tensors
                .tensor(name)
                .map_err(|err| bad(&weights, format!("tensor {name}: {err}")))?;
            if view.dtype() != Dtype::F32 || view.shape() != shape {
                return Err(bad(
                    &weights,
                    format!(
                        "tensor {name} is {:?} {:?}, expected F32 {shape:?}",
                        view.dtype(),
                        view.shape()
                    ),
                ));
            }
            Ok(view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect())
        };
        let shape_ok = "shape checked above";
        let mut sae = Sae::from_parts(
            file.config,
            Array2::from_shape_vec((f, d), read("w_enc_fd", &[f, d])?).expect(shape_ok),
            Array1::from(read("b_enc_f", &[f])?),
            Array2::from_shape_vec((f, d), read("w_dec_fd", &[f, d])?).expect(shape_ok),
            Array1::from(read("b_dec_d", &[d])?),
        )?;
        sae.threshold = file.threshold;
        Ok(sae)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Architecture, SaeConfig};

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sae-io-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn save_then_load_gives_the_same_sae_bit_for_bit() {
        for arch in [
            Architecture::Relu,
            Architecture::TopK { k: 3 },
            Architecture::BatchTopK { k: 3 },
        ] {
            let config = SaeConfig {
                d_model: 5,
                dict_size: 12,
                arch,
            };
            let mut sae = Sae::new(config, 7).unwrap();
            sae.b_enc_f.mapv_inplace(|_| 0.1f32.sin());
            sae.b_dec_d[2] = -3.25e-7;
            if matches!(arch, Architecture::BatchTopK { .. }) {
                sae.threshold = Some(0.123_456_79);
            }
            let d = dir("roundtrip");
            sae.save(&d).unwrap();
            assert_eq!(Sae::load(&d).unwrap(), sae, "{arch:?}");
            fs::remove_dir_all(d).unwrap();
        }
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
            err.contains(WEIGHTS_FILE) && err.contains("w_enc_fd"),
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
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn write_npy_refuses_values_that_do_not_fill_the_shape() {
        let d = dir("npy");
        fs::create_dir_all(&d).unwrap();
        let err = write_npy(&d.join("x.npy"), &[2, 3], &[1.0f32; 5]).unwrap_err();
        assert!(matches!(err, Error::Shape { .. }), "{err}");
        write_npy(&d.join("x.npy"), &[2, 3], &[1.5f32; 6]).unwrap();
        let back = crate::data::NpyShards::open(&[d.join("x.npy")]).unwrap();
        let mut rows = [0.0f32; 6];
        crate::data::Source::read_rows(&back, 0, &mut rows).unwrap();
        assert_eq!(rows, [1.5; 6]);
        fs::remove_dir_all(d).unwrap();
    }
}
