//! Safetensors files: building one from named f32/u64 arrays, and reading tensors back with
//! their name, dtype and shape checked, every error naming the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ndarray::{Array1, Array2};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::error::{io_error, Error, Result};
use crate::optim::ParamTensors;

/// Tensors to be written, borrowed from the arrays that hold them.
#[derive(Default)]
pub(crate) struct TensorsOut<'a> {
    tensors: Vec<(String, TensorView<'a>)>,
}

impl<'a> TensorsOut<'a> {
    /// Adds an f32 tensor of `shape` (its data in standard layout).
    pub(crate) fn f32(&mut self, name: impl Into<String>, shape: &[usize], data: &'a [f32]) {
        self.push(name.into(), Dtype::F32, shape, bytemuck::cast_slice(data));
    }

    /// Adds a u64 tensor of `shape`.
    pub(crate) fn u64(&mut self, name: impl Into<String>, shape: &[usize], data: &'a [u64]) {
        self.push(name.into(), Dtype::U64, shape, bytemuck::cast_slice(data));
    }

    /// Adds the four parameter-shaped arrays as `{prefix}w_enc_fd`, `{prefix}b_enc_f`, ...
    pub(crate) fn params(&mut self, prefix: &str, p: &'a ParamTensors) {
        let (f, d) = p.w_enc_fd.dim();
        self.f32(format!("{prefix}w_enc_fd"), &[f, d], standard(&p.w_enc_fd));
        self.f32(format!("{prefix}b_enc_f"), &[f], standard(&p.b_enc_f));
        self.f32(format!("{prefix}w_dec_fd"), &[f, d], standard(&p.w_dec_fd));
        self.f32(format!("{prefix}b_dec_d"), &[d], standard(&p.b_dec_d));
    }

    fn push(&mut self, name: String, dtype: Dtype, shape: &[usize], data: &'a [u8]) {
        let view = TensorView::new(dtype, shape.to_vec(), data)
            .expect("callers pass data of exactly the shape's size");
        self.tensors.push((name, view));
    }

    /// The file's bytes, with `metadata` in its header; the error names `path`.
    pub(crate) fn serialize(
        self,
        path: &Path,
        metadata: Option<HashMap<String, String>>,
    ) -> Result<Vec<u8>> {
        safetensors::serialize(self.tensors, metadata).map_err(|err| Error::RunFile {
            path: path.to_path_buf(),
            problem: format!("cannot encode the tensors: {err}"),
            fix: "report this as a bug".into(),
        })
    }
}

/// The contiguous data of an array the crate keeps in standard layout.
pub(crate) fn standard<D: ndarray::Dimension>(a: &ndarray::Array<f32, D>) -> &[f32] {
    a.as_slice()
        .expect("parameters are kept in standard layout")
}

/// A safetensors file read into memory, its errors naming the file and the fix for a
/// damaged one.
pub(crate) struct TensorsIn {
    pub(crate) path: PathBuf,
    bytes: Vec<u8>,
    fix: &'static str,
}

impl TensorsIn {
    /// Reads `path`; `missing` is the fix when it does not exist, `fix` the fix for a file
    /// that is there but wrong.
    pub(crate) fn read(path: &Path, missing: &str, fix: &'static str) -> Result<TensorsIn> {
        let bytes = std::fs::read(path).map_err(|err| match err.kind() {
            std::io::ErrorKind::NotFound => Error::RunFile {
                path: path.to_path_buf(),
                problem: "missing".into(),
                fix: missing.into(),
            },
            _ => io_error(path, "reading")(err),
        })?;
        let file = TensorsIn {
            path: path.to_path_buf(),
            bytes,
            fix,
        };
        file.tensors()?;
        Ok(file)
    }

    /// An error about this file.
    pub(crate) fn bad(&self, problem: String) -> Error {
        Error::RunFile {
            path: self.path.clone(),
            problem,
            fix: self.fix.into(),
        }
    }

    fn tensors(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.bytes)
            .map_err(|err| self.bad(format!("not a readable safetensors file ({err})")))
    }

    /// The header's metadata entry `key`.
    pub(crate) fn metadata(&self, key: &str) -> Result<String> {
        let (_, meta) = SafeTensors::read_metadata(&self.bytes)
            .map_err(|err| self.bad(format!("not a readable safetensors file ({err})")))?;
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get(key))
            .cloned()
            .ok_or_else(|| self.bad(format!("its header has no metadata entry {key:?}")))
    }

    /// Whether a tensor called `name` is present.
    pub(crate) fn has(&self, name: &str) -> bool {
        self.tensors()
            .map(|t| t.names().contains(&name))
            .unwrap_or(false)
    }

    /// The tensor `name` with `dtype` and `shape` checked, as raw little-endian bytes.
    fn raw(&self, name: &str, dtype: Dtype, shape: &[usize]) -> Result<Vec<u8>> {
        let tensors = self.tensors()?;
        let view = tensors
            .tensor(name)
            .map_err(|_| self.bad(format!("has no tensor {name:?}")))?;
        if view.dtype() != dtype || view.shape() != shape {
            return Err(self.bad(format!(
                "tensor {name:?} is {:?} {:?}, expected {dtype:?} {shape:?}",
                view.dtype(),
                view.shape()
            )));
        }
        Ok(view.data().to_vec())
    }

    /// The f32 tensor `name` of `shape`.
    pub(crate) fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let raw = self.raw(name, Dtype::F32, shape)?;
        Ok(raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect())
    }

    /// The u64 tensor `name` of `shape`.
    pub(crate) fn u64(&self, name: &str, shape: &[usize]) -> Result<Vec<u64>> {
        let raw = self.raw(name, Dtype::U64, shape)?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }

    /// The four parameter-shaped tensors `{prefix}w_enc_fd`, ... of an SAE with `f` latents
    /// of width `d`.
    pub(crate) fn params(&self, prefix: &str, f: usize, d: usize) -> Result<ParamTensors> {
        let shaped = "the shape was checked";
        Ok(ParamTensors {
            w_enc_fd: Array2::from_shape_vec(
                (f, d),
                self.f32(&format!("{prefix}w_enc_fd"), &[f, d])?,
            )
            .expect(shaped),
            b_enc_f: Array1::from(self.f32(&format!("{prefix}b_enc_f"), &[f])?),
            w_dec_fd: Array2::from_shape_vec(
                (f, d),
                self.f32(&format!("{prefix}w_dec_fd"), &[f, d])?,
            )
            .expect(shaped),
            b_dec_d: Array1::from(self.f32(&format!("{prefix}b_dec_d"), &[d])?),
        })
    }
}
