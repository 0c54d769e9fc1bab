//! Reading safetensors files: tensors (or a latent shard's rows of them) with their name,
//! dtype and shape checked before their bytes are read, every error naming the file.

use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};

use ndarray::{Array1, Array2};
use safetensors::tensor::{Dtype, Metadata};
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};

use crate::config::SaeConfig;
use crate::error::{io_error, Error, Result};
use crate::optim::ParamTensors;

/// The contiguous data of an array the crate keeps in standard layout.
pub(crate) fn standard<D: ndarray::Dimension>(a: &ndarray::Array<f32, D>) -> &[f32] {
    a.as_slice()
        .expect("parameters are kept in standard layout")
}

/// The largest header accepted: what `sae` writes is under a few KB (the safetensors crate
/// would take 100 MB), and a header is read whole before anything is checked.
const MAX_HEADER_BYTES: u64 = 1 << 20;

/// A safetensors file opened for reading: its header read and checked against the file's
/// length, each tensor's bytes read only when asked for, after its dtype and shape are
/// checked, so memory follows what the caller expects rather than what the file claims. Its
/// errors name the file and the fix for a damaged one.
pub(crate) struct TensorsIn {
    pub(crate) path: PathBuf,
    file: File,
    /// Where the tensors' data starts: the 8-byte length and the header before it.
    data_start: u64,
    header: Metadata,
    fix: &'static str,
}

impl TensorsIn {
    /// Opens `path` and checks its header; `missing` is the fix when it does not exist, `fix`
    /// the fix for a file that is there but wrong.
    pub(crate) fn read(path: &Path, missing: &str, fix: &'static str) -> Result<TensorsIn> {
        let not_found = |err: std::io::Error| match err.kind() {
            std::io::ErrorKind::NotFound => Error::RunFile {
                path: path.to_path_buf(),
                problem: "missing".into(),
                fix: missing.into(),
            },
            _ => io_error(path, "reading")(err),
        };
        let bad = |problem: String| Error::RunFile {
            path: path.to_path_buf(),
            problem: crate::error::escape_controls(&problem),
            fix: fix.into(),
        };
        // Opening a FIFO would block until someone writes to it.
        let meta = std::fs::metadata(path).map_err(not_found)?;
        if !meta.is_file() {
            return Err(bad("not a regular file".into()));
        }
        let mut file = File::open(path).map_err(not_found)?;
        let len = meta.len();
        let mut n_bytes = [0u8; 8];
        if len < 8 {
            return Err(bad(format!(
                "not a readable safetensors file: {len} bytes, too short for the 8-byte header \
                 length"
            )));
        }
        file.read_exact(&mut n_bytes)
            .map_err(io_error(path, "reading"))?;
        let n = u64::from_le_bytes(n_bytes);
        if n > MAX_HEADER_BYTES || n > len - 8 {
            return Err(bad(format!(
                "not a readable safetensors file: its header claims {n} bytes, but the file \
                 holds {} after the length{}",
                len - 8,
                if n > MAX_HEADER_BYTES {
                    format!(" and sae writes headers under {MAX_HEADER_BYTES}")
                } else {
                    String::new()
                }
            )));
        }
        let mut text = vec![0u8; n as usize];
        file.read_exact(&mut text)
            .map_err(io_error(path, "reading"))?;
        let text = std::str::from_utf8(&text).map_err(|err| {
            bad(format!(
                "not a readable safetensors file: header not UTF-8 ({err})"
            ))
        })?;
        // serde keeps the last of two entries with one name: a file that names a tensor twice is
        // ambiguous, so it is refused.
        let Keys(mut keys) = serde_json::from_str(text).map_err(|err| {
            bad(format!(
                "not a readable safetensors file: its header is invalid ({err})"
            ))
        })?;
        keys.sort_unstable();
        if let Some(pair) = keys.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(bad(format!(
                "not a readable safetensors file: its header names {:?} twice",
                pair[0]
            )));
        }
        let header: Metadata = serde_json::from_str(text).map_err(|err| {
            bad(format!(
                "not a readable safetensors file: its header is invalid ({err})"
            ))
        })?;
        let data_len = len - 8 - n;
        if header.data_len() as u64 != data_len {
            let beyond = header.offset_keys().into_iter().find(|name| {
                header
                    .info(name)
                    .is_some_and(|t| t.data_offsets.1 as u64 > data_len)
            });
            return Err(bad(match beyond {
                Some(name) => format!(
                    "not a readable safetensors file: tensor {name:?} ends at byte {} of the \
                     data, but the file holds {data_len} bytes of data: it was cut short or its \
                     header is wrong",
                    header.info(&name).expect("found above").data_offsets.1
                ),
                None => format!(
                    "not a readable safetensors file: its header accounts for {} bytes of \
                     tensors, but the file holds {data_len}: it holds bytes no tensor owns",
                    header.data_len()
                ),
            }));
        }
        Ok(TensorsIn {
            path: path.to_path_buf(),
            file,
            data_start: 8 + n,
            header,
            fix,
        })
    }

    /// An error about this file (control characters in `problem`, which may quote the file,
    /// escaped).
    pub(crate) fn bad(&self, problem: String) -> Error {
        Error::RunFile {
            path: self.path.clone(),
            problem: crate::error::escape_controls(&problem),
            fix: self.fix.into(),
        }
    }

    /// The header's metadata entry `key`.
    pub(crate) fn metadata(&self, key: &str) -> Result<String> {
        self.header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(key))
            .cloned()
            .ok_or_else(|| self.bad(format!("its header has no metadata entry {key:?}")))
    }

    /// Whether a tensor called `name` is present.
    pub(crate) fn has(&self, name: &str) -> bool {
        self.header.info(name).is_some()
    }

    /// Refuses a tensor not in `known`: the file is then not the kind the caller reads.
    pub(crate) fn only(&self, known: &[&str]) -> Result<()> {
        match self
            .header
            .offset_keys()
            .into_iter()
            .find(|name| !known.contains(&name.as_str()))
        {
            Some(name) => Err(self.bad(format!(
                "holds a tensor {name:?}, which is not one of {known:?}"
            ))),
            None => Ok(()),
        }
    }

    /// Checks that the tensor `name` is there with `dtype` and `shape`; returns where its bytes
    /// lie in the file and how many there are.
    pub(crate) fn check(&self, name: &str, dtype: Dtype, shape: &[usize]) -> Result<(u64, usize)> {
        let info = self
            .header
            .info(name)
            .ok_or_else(|| self.bad(format!("has no tensor {name:?}")))?;
        if info.dtype != dtype || info.shape != shape {
            return Err(self.bad(format!(
                "tensor {name:?} is {:?} {:?}, expected {dtype:?} {shape:?}",
                info.dtype, info.shape
            )));
        }
        let (start, end) = info.data_offsets;
        Ok((self.data_start + start as u64, end - start))
    }

    /// Rows `rows` (of its first axis) of the tensor `name`, with `dtype` and `shape` checked,
    /// its elements of `T` read from little-endian bytes.
    fn read_tensor<T: bytemuck::Pod>(
        &self,
        name: &str,
        dtype: Dtype,
        shape: &[usize],
        rows: &Range<usize>,
        from_le: impl Fn(T) -> T,
    ) -> Result<Vec<T>> {
        let (offset, _) = self.check(name, dtype, shape)?;
        let row_bytes = shape.iter().skip(1).product::<usize>() * std::mem::size_of::<T>();
        let (offset, n_bytes) = (
            offset + (rows.start * row_bytes) as u64,
            rows.len() * row_bytes,
        );
        let n = n_bytes / std::mem::size_of::<T>();
        // The shapes the caller expects bound the size, but a hostile sae.json can expect a
        // lot, and with overcommit an allocation too large succeeds until it is filled.
        if let Some(available) = crate::memory::available()
            .map(|a| a.bytes)
            .filter(|&a| n_bytes as u64 > a)
        {
            return Err(self.bad(format!(
                "tensor {name:?} of shape {shape:?} needs {n_bytes} bytes, but only {available} \
                 are available"
            )));
        }
        let mut values: Vec<T> = Vec::new();
        values.try_reserve_exact(n).map_err(|_| {
            self.bad(format!(
                "tensor {name:?} of shape {shape:?} needs {n_bytes} bytes, more than can be \
                 allocated here"
            ))
        })?;
        values.resize(n, T::zeroed());
        let mut file = &self.file;
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| file.read_exact(bytemuck::cast_slice_mut(&mut values)))
            .map_err(io_error(&self.path, "reading"))?;
        for v in &mut values {
            *v = from_le(*v);
        }
        Ok(values)
    }

    /// The f32 tensor `name` of `shape`; NaN or ±Inf anywhere in it is refused, naming the
    /// first element's index.
    pub(crate) fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.f32_rows(name, shape, &all_rows(shape))
    }

    /// Rows `rows` of [`TensorsIn::f32`]'s tensor (a latent shard's part of a per-latent one).
    pub(crate) fn f32_rows(
        &self,
        name: &str,
        shape: &[usize],
        rows: &Range<usize>,
    ) -> Result<Vec<f32>> {
        let values = self.read_tensor(name, Dtype::F32, shape, rows, |v: f32| {
            f32::from_bits(u32::from_le(v.to_bits()))
        })?;
        let first = rows.start * shape.iter().skip(1).product::<usize>();
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(self.bad(format!(
                "tensor {name:?} holds {} at index {:?}: the SAE diverged or the file was \
                 damaged",
                values[i],
                unravel(first + i, shape)
            )));
        }
        Ok(values)
    }

    /// Rows `rows` of the u64 tensor `name` of `shape`.
    pub(crate) fn u64_rows(
        &self,
        name: &str,
        shape: &[usize],
        rows: &Range<usize>,
    ) -> Result<Vec<u64>> {
        self.read_tensor(name, Dtype::U64, shape, rows, u64::from_le)
    }

    /// The parameter-shaped tensors `{prefix}w_enc_fd`, ... of latents `rows` of an SAE of
    /// `config` (with `{prefix}threshold_f` for JumpReLU), and the whole of `{prefix}b_dec_d`.
    pub(crate) fn params(
        &self,
        prefix: &str,
        config: &SaeConfig,
        rows: &Range<usize>,
    ) -> Result<ParamTensors> {
        let (f, d) = (config.dict_size, config.d_model);
        let shaped = "the shape was checked";
        let threshold_f = if config.arch.has_latent_thresholds() {
            Array1::from(self.f32_rows(&format!("{prefix}threshold_f"), &[f], rows)?)
        } else {
            Array1::zeros(0)
        };
        Ok(ParamTensors {
            w_enc_fd: Array2::from_shape_vec(
                (rows.len(), d),
                self.f32_rows(&format!("{prefix}w_enc_fd"), &[f, d], rows)?,
            )
            .expect(shaped),
            b_enc_f: Array1::from(self.f32_rows(&format!("{prefix}b_enc_f"), &[f], rows)?),
            w_dec_fd: Array2::from_shape_vec(
                (rows.len(), d),
                self.f32_rows(&format!("{prefix}w_dec_fd"), &[f, d], rows)?,
            )
            .expect(shaped),
            b_dec_d: Array1::from(self.f32(&format!("{prefix}b_dec_d"), &[d])?),
            threshold_f,
        })
    }
}

/// Every row of a tensor of `shape` (a scalar's one).
fn all_rows(shape: &[usize]) -> Range<usize> {
    0..shape.first().copied().unwrap_or(1)
}

/// The multi-index of the `flat`-th element of a C-order array of `shape`.
fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for (i, &n) in shape.iter().enumerate().rev() {
        index[i] = flat % n.max(1);
        flat /= n.max(1);
    }
    index
}

/// The top-level keys of a JSON object in order, repeats kept (serde's maps keep the last).
struct Keys(Vec<String>);

impl<'de> Deserialize<'de> for Keys {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Keys, D::Error> {
        struct KeysVisitor;
        impl<'de> Visitor<'de> for KeysVisitor {
            type Value = Keys;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Keys, A::Error> {
                let mut keys = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    map.next_value::<IgnoredAny>()?;
                    keys.push(key);
                }
                Ok(Keys(keys))
            }
        }
        deserializer.deserialize_map(KeysVisitor)
    }
}
