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
                for b in 0..codes.n_rows() {
                    let (idx, val) = codes.row(b);
                    if idx.len() > k {
                        return Err(Error::Shape {
                            what: format!("row {} of the codes", self.n_rows + b as u64),
                            expected: vec![k],
                            got: vec![idx.len()],
                        });
                    }
                    let start = self.batch_indices.len();
                    self.batch_indices.extend_from_slice(idx);
                    self.batch_values.extend_from_slice(val);
                    pad_row(
                        &mut self.batch_indices,
                        &mut self.batch_values,
                        start,
                        k,
                        self.n_latents,
                    );
                }
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

/// Pads the row at `idx[start..]` to exactly `k` codes with zeros at the lowest latents the
/// row does not use (its own latents are ascending).
fn pad_row(idx: &mut Vec<u32>, val: &mut Vec<f32>, start: usize, k: usize, n_latents: usize) {
    let mut own = start;
    let end = idx.len();
    let mut candidate = 0u32;
    while idx.len() - start < k && (candidate as usize) < n_latents {
        // Skip past the row's own latents below the candidate.
        while own < end && idx[own] < candidate {
            own += 1;
        }
        if own == end || idx[own] != candidate {
            idx.push(candidate);
            val.push(0.0);
        }
        candidate += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::pad_row;

    #[test]
    fn padding_fills_the_lowest_latents_the_row_does_not_use() {
        let (mut idx, mut val) = (vec![7, 0, 2, 9], vec![5.0, 1.0, 2.0, 3.0]);
        // The row under test starts at 1: latents 0, 2 and 9.
        pad_row(&mut idx, &mut val, 1, 5, 12);
        assert_eq!(idx, [7, 0, 2, 9, 1, 3]);
        assert_eq!(val, [5.0, 1.0, 2.0, 3.0, 0.0, 0.0]);
        let (mut idx, mut val) = (vec![], vec![]);
        pad_row(&mut idx, &mut val, 0, 3, 3);
        assert_eq!((idx, val), (vec![0, 1, 2], vec![0.0; 3]));
        let (mut idx, mut val) = (vec![3, 7], vec![1.0, 2.0]);
        pad_row(&mut idx, &mut val, 0, 2, 8);
        assert_eq!((idx, val), (vec![3, 7], vec![1.0, 2.0]));
    }
}
