//! Sparse codes streamed to `.npy` files as numpy and scipy read them: a dense N×k pair for
//! TopK, CSR for codes whose count varies by row.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::npy::NpyAppender;
use crate::error::{io_error, Error, Result};
use crate::select::Codes;

/// How codes are laid out on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "layout", rename_all = "lowercase")]
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
    /// `"layout": "topk", "k": 64` or `"layout": "csr"`.
    #[serde(flatten)]
    layout: CodesLayout,
    n_rows: u64,
    n_latents: usize,
    nnz: u64,
}

/// Writes codes batch by batch, never holding more than one batch. Each array goes to a
/// temporary file renamed into place by [`CodesWriter::finish`], and `codes.json` (removed at
/// the start, written last) vouches for a complete set: a crash part way leaves no
/// `codes.json`, even where an earlier set of codes is being replaced.
pub struct CodesWriter {
    dir: PathBuf,
    layout: CodesLayout,
    n_latents: usize,
    expected_rows: u64,
    indices: NpyAppender<u32>,
    values: NpyAppender<f32>,
    indptr: Option<NpyAppender<i64>>,
    n_rows: u64,
    nnz: u64,
    /// One batch's padded rows or offsets, reused across batches.
    batch_indices: Vec<u32>,
    batch_values: Vec<f32>,
    batch_indptr: Vec<i64>,
}

impl CodesWriter {
    /// Starts writing the codes of `n_rows` rows of an SAE with `n_latents` latents into
    /// `dir` (which must exist).
    pub fn new(dir: &Path, layout: CodesLayout, n_latents: usize, n_rows: u64) -> Result<Self> {
        if let CodesLayout::TopK { k } = layout {
            if k > n_latents {
                return Err(Error::Shape {
                    what: "codes per row of the topk layout".into(),
                    expected: vec![n_latents],
                    got: vec![k],
                });
            }
        }
        let manifest = dir.join("codes.json");
        match std::fs::remove_file(&manifest) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                return Err(io_error(&manifest, "removing")(err))
            }
            _ => {}
        }
        let row_shape: Vec<u64> = match layout {
            CodesLayout::TopK { k } => vec![k as u64],
            CodesLayout::Csr => Vec::new(),
        };
        let indptr = match layout {
            CodesLayout::Csr => {
                let mut indptr = NpyAppender::create(&dir.join("indptr.npy"), &[])?;
                indptr.append(&[0])?;
                Some(indptr)
            }
            CodesLayout::TopK { .. } => None,
        };
        Ok(CodesWriter {
            dir: dir.to_path_buf(),
            layout,
            n_latents,
            expected_rows: n_rows,
            indices: NpyAppender::create(&dir.join("indices.npy"), &row_shape)?,
            values: NpyAppender::create(&dir.join("values.npy"), &row_shape)?,
            indptr,
            n_rows: 0,
            nnz: 0,
            batch_indices: Vec::new(),
            batch_values: Vec::new(),
            batch_indptr: Vec::new(),
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
        match self.layout {
            CodesLayout::Csr => {
                self.batch_indptr.clear();
                self.batch_indptr.extend(
                    codes.indptr[1..]
                        .iter()
                        .map(|&p| (self.nnz + p as u64) as i64),
                );
                if let Some(indptr) = &mut self.indptr {
                    indptr.append(&self.batch_indptr)?;
                }
                self.indices.append(&codes.indices)?;
                self.values.append(&codes.values)?;
            }
            CodesLayout::TopK { k } => {
                self.batch_indices.clear();
                self.batch_values.clear();
                codes.view().pad_into(
                    k,
                    self.n_rows,
                    &mut self.batch_indices,
                    &mut self.batch_values,
                )?;
                self.indices.append(&self.batch_indices)?;
                self.values.append(&self.batch_values)?;
            }
        }
        self.nnz += codes.nnz() as u64;
        self.n_rows += codes.n_rows() as u64;
        Ok(())
    }

    /// Puts the arrays in place (CSR's get their final lengths) and writes `codes.json`.
    /// Fails if fewer or more rows were pushed than announced; the files are then not
    /// written.
    pub fn finish(self) -> Result<()> {
        if self.n_rows != self.expected_rows {
            return Err(Error::Shape {
                what: format!("rows of codes written to {}", self.dir.display()),
                expected: vec![self.expected_rows as usize],
                got: vec![self.n_rows as usize],
            });
        }
        match self.indptr {
            Some(indptr) => {
                indptr.finish()?;
            }
            None => {
                // An indptr.npy from earlier CSR codes would describe other rows.
                let stale = self.dir.join("indptr.npy");
                match std::fs::remove_file(&stale) {
                    Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                        return Err(io_error(&stale, "removing")(err))
                    }
                    _ => {}
                }
            }
        }
        self.indices.finish()?;
        self.values.finish()?;
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
