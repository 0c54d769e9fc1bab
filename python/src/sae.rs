//! `_native.Sae`: a trained SAE, its codes and reconstructions, its weights and files.

use std::path::PathBuf;
use std::sync::Arc;

use ndarray::{Array2, ArrayView2, CowArray, Ix2};
use numpy::{PyArray1, PyArray2, PyReadonlyArray1, PyReadonlyArray2, ToPyArray};
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use sparse_autoencoder::backend::Cpu;
use sparse_autoencoder::io::{export_saelens, export_sparsify, ExportMetadata};
use sparse_autoencoder::{Architecture, Codes, ReluVariant, Sae};

use crate::errors::{guarded, to_py, value_error};
use crate::record_input;

/// A sparse autoencoder held by Rust; the Python class `sparse_autoencoder.SAE` wraps it.
#[pyclass(name = "Sae", module = "sparse_autoencoder._native", frozen)]
pub struct PySae {
    /// Shared, never mutated: a trainer hands out copies.
    pub(crate) sae: Arc<Sae>,
}

/// The architecture's name as files and flags spell it.
pub(crate) fn arch_name(arch: &Architecture) -> &'static str {
    match arch {
        Architecture::Relu { .. } => "relu",
        Architecture::TopK { .. } => "topk",
        Architecture::BatchTopK { .. } => "batchtopk",
        Architecture::JumpRelu => "jumprelu",
        Architecture::Matryoshka { .. } => "matryoshka",
    }
}

/// `x` in standard (row-major) layout, borrowed when it already is one, after checking that it
/// holds rows of width `d_model`; `what` names the array in errors.
pub(crate) fn rows_of<'a>(
    x: &'a PyReadonlyArray2<'_, f32>,
    d_model: usize,
    what: &str,
) -> PyResult<CowArray<'a, f32, Ix2>> {
    let view: ArrayView2<'a, f32> = x.as_array();
    if view.ncols() != d_model {
        return Err(value_error(format!(
            "{what} has shape {:?}: its last dimension must be d_model = {d_model}",
            view.shape()
        )));
    }
    // A strided or transposed view is copied once; a row-major one is borrowed.
    let rows = if view.is_standard_layout() {
        CowArray::from(view)
    } else {
        CowArray::from(view.as_standard_layout().into_owned())
    };
    record_input(rows.as_ptr());
    Ok(rows)
}

impl PySae {
    /// The codes of `x` (checked to be `n × d_model`), computed with the GIL released.
    fn codes(&self, py: Python<'_>, x: &PyReadonlyArray2<'_, f32>) -> PyResult<Codes> {
        let sae = &*self.sae;
        let rows = rows_of(x, sae.config().d_model, "x")?;
        if rows.nrows() == 0 {
            return Ok(Codes::empty(sae.config().dict_size));
        }
        py.detach(|| guarded("encode", || sae.encode(&Cpu, rows.view()).map_err(to_py)))
    }

    /// x̂ of `codes` (whose latents are checked to lie below F), with the GIL released.
    fn reconstruct<'py>(
        &self,
        py: Python<'py>,
        codes: Codes,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let sae = &*self.sae;
        let x_hat = if codes.n_rows() == 0 {
            Array2::zeros((0, sae.config().d_model))
        } else {
            py.detach(|| guarded("decode", || sae.decode(&codes).map_err(to_py)))?
        };
        Ok(PyArray2::from_owned_array(py, x_hat))
    }
}

#[pymethods]
impl PySae {
    /// Loads the SAE that `sae train` or `SAE.save` wrote into `dir`.
    #[staticmethod]
    fn load(py: Python<'_>, dir: PathBuf) -> PyResult<PySae> {
        let sae = py.detach(|| guarded("load", || Sae::load(&dir).map_err(to_py)))?;
        Ok(PySae { sae: Arc::new(sae) })
    }

    /// Saves the SAE into `dir` (created if needed) as `sae.safetensors` and `sae.json`.
    fn save(&self, py: Python<'_>, dir: PathBuf) -> PyResult<()> {
        let sae = &*self.sae;
        py.detach(|| guarded("save", || sae.save(&dir).map_err(to_py)))
    }

    /// Writes the SAE in `format` ("saelens" or "sparsify") into `dir`.
    #[pyo3(signature = (dir, format, model_name=None, hook_name=None))]
    fn export(
        &self,
        py: Python<'_>,
        dir: PathBuf,
        format: &str,
        model_name: Option<String>,
        hook_name: Option<String>,
    ) -> PyResult<()> {
        let sae = &*self.sae;
        match format {
            "saelens" => {
                let metadata = ExportMetadata {
                    model_name,
                    hook_name,
                };
                py.detach(|| {
                    guarded("export", || {
                        export_saelens(sae, &dir, &metadata).map_err(to_py)
                    })
                })
            }
            "sparsify" => {
                if model_name.is_some() || hook_name.is_some() {
                    return Err(value_error(
                        "model_name and hook_name are SAELens metadata; sparsify's format has \
                         no place for them: drop them or pass format=\"saelens\"",
                    ));
                }
                py.detach(|| guarded("export", || export_sparsify(sae, &dir).map_err(to_py)))
            }
            other => Err(value_error(format!(
                "format {other:?} is not one of \"saelens\", \"sparsify\""
            ))),
        }
    }

    /// CSR codes of the rows of `x` (n × d_model float32): `(indptr int64 (n + 1,), indices
    /// int32 (nnz,), values float32 (nnz,))`, each row's latents in ascending order.
    fn encode_csr<'py>(
        &self,
        py: Python<'py>,
        x: PyReadonlyArray2<'py, f32>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let f = self.sae.config().dict_size;
        if i32::try_from(f).is_err() {
            return Err(value_error(format!(
                "dict_size {f} does not fit int32 indices; use encode_topk or the `sae encode` \
                 command"
            )));
        }
        let codes = self.codes(py, &x)?;
        let indptr: Vec<i64> = codes.indptr.iter().map(|&p| p as i64).collect();
        let indices: Vec<i32> = codes.indices.iter().map(|&j| j as i32).collect();
        (
            PyArray1::from_vec(py, indptr),
            PyArray1::from_vec(py, indices),
            PyArray1::from_vec(py, codes.values),
        )
            .into_pyobject(py)
    }

    /// A TopK SAE's codes of the rows of `x` as `sae encode` writes them: `(indices int64
    /// (n, k), values float32 (n, k))`; a row with fewer than k positive codes is padded with
    /// value 0 at the lowest latents it does not use.
    fn encode_topk<'py>(
        &self,
        py: Python<'py>,
        x: PyReadonlyArray2<'py, f32>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let config = *self.sae.config();
        let Architecture::TopK { k } = config.arch else {
            return Err(value_error(format!(
                "format=\"topk\" needs a topk SAE, whose rows hold k codes each; this one is {}: \
                 use format=\"csr\" or \"dense\"",
                arch_name(&config.arch)
            )));
        };
        let codes = self.codes(py, &x)?;
        let (indices, values) = codes.view().to_padded(k).map_err(to_py)?;
        // numpy's default index type, as `sae encode` writes `indices.npy`.
        let indices = indices.mapv(i64::from);
        (
            PyArray2::from_owned_array(py, indices),
            PyArray2::from_owned_array(py, values),
        )
            .into_pyobject(py)
    }

    /// x̂ (n × d_model float32) of CSR codes `(indptr, indices, values)` of n rows.
    fn decode_csr<'py>(
        &self,
        py: Python<'py>,
        indptr: PyReadonlyArray1<'py, i64>,
        indices: PyReadonlyArray1<'py, i64>,
        values: PyReadonlyArray1<'py, f32>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let f = self.sae.config().dict_size;
        let (indptr, indices, values) = (indptr.as_array(), indices.as_array(), values.as_array());
        let nnz = indices.len();
        if values.len() != nnz {
            return Err(value_error(format!(
                "codes: {nnz} indices but {} values; they must be as many",
                values.len()
            )));
        }
        if indptr.is_empty() || indptr[0] != 0 || indptr[indptr.len() - 1] != nnz as i64 {
            return Err(value_error(format!(
                "codes: indptr must start at 0 and end at nnz = {nnz} (got {} entries{})",
                indptr.len(),
                if indptr.is_empty() {
                    String::new()
                } else {
                    format!(", from {} to {}", indptr[0], indptr[indptr.len() - 1])
                }
            )));
        }
        if let Some(b) = indptr.windows(2).into_iter().position(|w| w[1] < w[0]) {
            return Err(value_error(format!(
                "codes: indptr decreases at row {b}; it must be non-decreasing"
            )));
        }
        if let Some(i) = indices.iter().position(|&j| j < 0 || j >= f as i64) {
            return Err(value_error(format!(
                "codes: latent index {} (entry {i}) is outside 0..{f} (dict_size)",
                indices[i]
            )));
        }
        record_input(values.as_ptr());
        let codes = Codes {
            n_latents: f,
            indptr: indptr.iter().map(|&p| p as usize).collect(),
            indices: indices.iter().map(|&j| j as u32).collect(),
            values: values.iter().copied().collect(),
        };
        self.reconstruct(py, codes)
    }

    /// x̂ (n × d_model float32) of dense codes (n × dict_size float32).
    fn decode_dense<'py>(
        &self,
        py: Python<'py>,
        codes: PyReadonlyArray2<'py, f32>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let f = self.sae.config().dict_size;
        let view = codes.as_array();
        if view.ncols() != f {
            return Err(value_error(format!(
                "codes have shape {:?}: their last dimension must be dict_size = {f}",
                view.shape()
            )));
        }
        record_input(view.as_ptr());
        let codes = py.detach(|| Codes::from_dense(view));
        self.reconstruct(py, codes)
    }

    /// D, the width of the activations.
    #[getter]
    fn d_model(&self) -> usize {
        self.sae.config().d_model
    }

    /// F, the number of latents.
    #[getter]
    fn dict_size(&self) -> usize {
        self.sae.config().dict_size
    }

    /// The architecture: "relu", "topk", "batchtopk", "jumprelu" or "matryoshka".
    #[getter]
    fn arch(&self) -> &'static str {
        arch_name(&self.sae.config().arch)
    }

    /// k (topk, batchtopk, matryoshka), or None.
    #[getter]
    fn k(&self) -> Option<usize> {
        self.sae.config().arch.k()
    }

    /// A ReLU SAE's L1 formulation ("decoder_norm" or "unit_decoder"), or None.
    #[getter]
    fn relu_variant(&self) -> Option<&'static str> {
        match self.sae.config().arch {
            Architecture::Relu {
                variant: ReluVariant::DecoderNorm,
            } => Some("decoder_norm"),
            Architecture::Relu {
                variant: ReluVariant::UnitDecoder,
            } => Some("unit_decoder"),
            _ => None,
        }
    }

    /// Encoder weights, a copy (dict_size × d_model).
    #[getter]
    fn w_enc<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray2<f32>> {
        self.sae.w_enc_fd().to_pyarray(py)
    }

    /// Encoder bias, a copy (dict_size,).
    #[getter]
    fn b_enc<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f32>> {
        self.sae.b_enc_f().to_pyarray(py)
    }

    /// Decoder weights, a copy (dict_size × d_model; row j is latent j's direction).
    #[getter]
    fn w_dec<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray2<f32>> {
        self.sae.w_dec_fd().to_pyarray(py)
    }

    /// Decoder bias, a copy (d_model,).
    #[getter]
    fn b_dec<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f32>> {
        self.sae.b_dec_d().to_pyarray(py)
    }

    /// BatchTopK's and Matryoshka's θ (a float, or None before training sets it), JumpReLU's
    /// thresholds (a float32 array of dict_size), None for the other architectures.
    #[getter]
    fn threshold<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        match self.sae.config().arch {
            Architecture::JumpRelu => Ok(self.sae.latent_thresholds().to_pyarray(py).into_any()),
            _ => Ok(self.sae.threshold().into_pyobject(py)?.into_any()),
        }
    }

    /// The SAE's configuration as `sae.json` holds it (JSON text).
    #[getter]
    fn config_json(&self) -> PyResult<String> {
        serde_json::to_string(self.sae.config()).map_err(|e| value_error(e.to_string()))
    }

    /// Whether both hold the same parameters and θ, bit for bit.
    fn same_as(&self, other: &PySae) -> bool {
        self.sae == other.sae
    }
}
