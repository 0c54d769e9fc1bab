//! Sparse codes streamed to `.npy` files as numpy and scipy read them: a dense N×k pair for
//! TopK, CSR for codes whose count varies by row.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use npyz::WriterBuilder;
use serde::Serialize;

use crate::error::{io_error, Error, Result};
use crate::select::Codes;

/// How codes are laid out on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CodesLayout {
    /// Exactly k codes a row: `indices.npy` (uint32, N×k) and `values.npy` (float32, N×k). A
    /// row with fewer than k positive codes is padded with value 0 at latents inactive in that
    /// row, so both scatter-assigning and scatter-adding give the dense codes.
    TopK {
        /// Codes per row.
        k: usize,
    },
    /// CSR: `indptr.npy` (int64, N+1), `indices.npy` (uint32, nnz), `values.npy` (float32,
    /// nnz): `scipy.sparse.csr_matrix((values, indices, indptr), shape=(N, F))`.
    Csr,
}

/// `codes.json`, beside the arrays: what they hold.
#[derive(Serialize)]
struct Manifest {
    layout: CodesLayout,
    n_rows: u64,
    n_latents: usize,
    nnz: u64,
}

type Npy<T> = npyz::NpyWriter<T, BufWriter<File>>;

/// Writes codes batch by batch, never holding more than one batch.
pub struct CodesWriter {
    dir: PathBuf,
    layout: CodesLayout,
    n_latents: usize,
    indices: Npy<u32>,
    values: Npy<f32>,
    indptr: Option<Npy<i64>>,
    n_rows: u64,
    nnz: u64,
}

/// A `.npy` writer of the given shape, or of a 1-D length filled in at the end.
fn open<T: npyz::AutoSerialize>(path: &Path, shape: Option<&[u64]>) -> Result<Npy<T>> {
    let file = File::create(path).map_err(io_error(path, "creating"))?;
    let options = npyz::WriteOptions::new()
        .default_dtype()
        .writer(BufWriter::new(file));
    match shape {
        Some(shape) => options.shape(shape).begin_nd(),
        None => options.begin_1d(),
    }
    .map_err(io_error(path, "writing"))
}

impl CodesWriter {
    /// Starts writing the codes of `n_rows` rows of an SAE with `n_latents` latents into
    /// `dir` (which must exist).
    pub fn new(dir: &Path, layout: CodesLayout, n_latents: usize, n_rows: u64) -> Result<Self> {
        let (indices_path, values_path) = (dir.join("indices.npy"), dir.join("values.npy"));
        let (indices, values, indptr) = match layout {
            CodesLayout::TopK { k } => {
                let shape = [n_rows, k as u64];
                (
                    open(&indices_path, Some(&shape))?,
                    open(&values_path, Some(&shape))?,
                    None,
                )
            }
            CodesLayout::Csr => {
                let path = dir.join("indptr.npy");
                let mut indptr = open::<i64>(&path, Some(&[n_rows + 1]))?;
                indptr.push(&0).map_err(io_error(&path, "writing"))?;
                (
                    open(&indices_path, None)?,
                    open(&values_path, None)?,
                    Some(indptr),
                )
            }
        };
        Ok(CodesWriter {
            dir: dir.to_path_buf(),
            layout,
            n_latents,
            indices,
            values,
            indptr,
            n_rows: 0,
            nnz: 0,
        })
    }

    /// Appends a batch of rows.
    pub fn push(&mut self, codes: &Codes) -> Result<()> {
        if codes.n_latents != self.n_latents {
            return Err(Error::Shape {
                what: "codes".into(),
                expected: vec![codes.n_rows(), self.n_latents],
                got: vec![codes.n_rows(), codes.n_latents],
            });
        }
        let (indices_path, values_path) =
            (self.dir.join("indices.npy"), self.dir.join("values.npy"));
        for b in 0..codes.n_rows() {
            let (idx, val) = codes.row(b);
            let (mut idx, mut val) = (idx.to_vec(), val.to_vec());
            if let CodesLayout::TopK { k } = self.layout {
                pad_row(&mut idx, &mut val, k, self.n_latents);
            }
            self.indices
                .extend(idx.iter().copied())
                .map_err(io_error(&indices_path, "writing"))?;
            self.values
                .extend(val.iter().copied())
                .map_err(io_error(&values_path, "writing"))?;
            self.nnz += idx.len() as u64;
            if let Some(indptr) = &mut self.indptr {
                indptr
                    .push(&(self.nnz as i64))
                    .map_err(io_error(&self.dir.join("indptr.npy"), "writing"))?;
            }
        }
        self.n_rows += codes.n_rows() as u64;
        Ok(())
    }

    /// Completes the files (CSR's arrays get their final lengths) and writes `codes.json`.
    /// Fails if fewer or more rows were pushed than announced.
    pub fn finish(self) -> Result<()> {
        let path = |name: &str| self.dir.join(name);
        self.indices
            .finish()
            .map_err(io_error(&path("indices.npy"), "writing"))?;
        self.values
            .finish()
            .map_err(io_error(&path("values.npy"), "writing"))?;
        if let Some(indptr) = self.indptr {
            indptr
                .finish()
                .map_err(io_error(&path("indptr.npy"), "writing"))?;
        }
        let manifest = Manifest {
            layout: self.layout,
            n_rows: self.n_rows,
            n_latents: self.n_latents,
            nnz: self.nnz,
        };
        let json = serde_json::to_string_pretty(&manifest).expect("manifests serialise");
        super::write_atomic(&self.dir.join("codes.json"), json.as_bytes())
    }
}

/// Pads a row to exactly `k` codes with zeros at latents the row does not use.
fn pad_row(idx: &mut Vec<u32>, val: &mut Vec<f32>, k: usize, n_latents: usize) {
    if idx.len() >= k {
        return;
    }
    let mut used = idx.clone();
    used.sort_unstable();
    let mut candidate = 0u32;
    while idx.len() < k && (candidate as usize) < n_latents {
        if used.binary_search(&candidate).is_err() {
            idx.push(candidate);
            val.push(0.0);
        }
        candidate += 1;
    }
}
