//! Activation data, from where rows live to the batches a trainer consumes: a [`Source`] of
//! D-wide rows (`.npy` shards read on demand, in-memory arrays, a held-out [`Subset`]), shuffled
//! batches from a bounded buffer ([`Batcher`]), made ahead on a background thread
//! ([`Prefetcher`]), and the input scale that normalisation trains with ([`estimate_scale`]).
//!
//! ```
//! use ndarray::Array2;
//! use sparse_autoencoder::data::{Batcher, LoaderConfig};
//!
//! let x_nd = Array2::from_shape_fn((1000, 8), |(n, d)| (n * 8 + d) as f32);
//! let config = LoaderConfig { batch_size: 100, ..LoaderConfig::default() };
//! let mut batcher = Batcher::new(x_nd.view(), config)?;
//! let x_bd = batcher.next_batch()?; // 100 rows drawn at random, each used once per epoch
//! assert_eq!(x_bd.dim(), (100, 8));
//! # Ok::<(), sparse_autoencoder::Error>(())
//! ```

mod normalize;
pub mod npy;
mod npy_header;
mod prefetch;
mod shuffle;
mod subset;

use std::path::PathBuf;
use std::sync::Arc;

use ndarray::{Array2, ArrayView2};

pub use normalize::{estimate_scale, SCALE_SAMPLE_ROWS};
pub use npy::NpyShards;
pub use prefetch::{Batch, Prefetcher};
pub use shuffle::{Batcher, Cursor, LoaderConfig};
pub use subset::{holdout, Subset};

/// Random access to N rows of D activations, converted to f32.
///
/// The `.npy` reader ([`NpyShards`]) is one implementation; in-memory arrays are
/// others. Implement it to train from your own generator: [`Batcher`] only ever asks for rows
/// by index, so a generator must return the same row for the same index.
pub trait Source: Send + Sync {
    /// D, the width of every row.
    fn d_model(&self) -> usize;

    /// N, the number of rows.
    fn n_rows(&self) -> u64;

    /// Writes rows `start..start + n` into `out_nd` (row-major, n = `out_nd.len() / D`).
    /// Callers keep `start + n ≤ N`.
    fn read_rows(&self, start: u64, out_nd: &mut [f32]) -> Result<(), DataError>;

    /// Where row `row` lives, for error messages (for example "acts/03.npy row 17 (index
    /// [0, 17])").
    fn locate(&self, row: u64) -> String {
        format!("row {row}")
    }
}

impl<S: Source + ?Sized> Source for &S {
    fn d_model(&self) -> usize {
        (**self).d_model()
    }
    fn n_rows(&self) -> u64 {
        (**self).n_rows()
    }
    fn read_rows(&self, start: u64, out_nd: &mut [f32]) -> Result<(), DataError> {
        (**self).read_rows(start, out_nd)
    }
    fn locate(&self, row: u64) -> String {
        (**self).locate(row)
    }
}

impl<S: Source + ?Sized> Source for Arc<S> {
    fn d_model(&self) -> usize {
        (**self).d_model()
    }
    fn n_rows(&self) -> u64 {
        (**self).n_rows()
    }
    fn read_rows(&self, start: u64, out_nd: &mut [f32]) -> Result<(), DataError> {
        (**self).read_rows(start, out_nd)
    }
    fn locate(&self, row: u64) -> String {
        (**self).locate(row)
    }
}

impl<S: Source + ?Sized> Source for Box<S> {
    fn d_model(&self) -> usize {
        (**self).d_model()
    }
    fn n_rows(&self) -> u64 {
        (**self).n_rows()
    }
    fn read_rows(&self, start: u64, out_nd: &mut [f32]) -> Result<(), DataError> {
        (**self).read_rows(start, out_nd)
    }
    fn locate(&self, row: u64) -> String {
        (**self).locate(row)
    }
}

impl Source for ArrayView2<'_, f32> {
    fn d_model(&self) -> usize {
        self.ncols()
    }
    fn n_rows(&self) -> u64 {
        self.nrows() as u64
    }
    fn read_rows(&self, start: u64, out_nd: &mut [f32]) -> Result<(), DataError> {
        let d = self.ncols();
        let start = start as usize;
        let rows = self.slice(ndarray::s![start..start + out_nd.len() / d, ..]);
        match rows.as_slice() {
            Some(src) => out_nd.copy_from_slice(src),
            None => {
                for (dst, v) in out_nd.iter_mut().zip(rows.iter()) {
                    *dst = *v;
                }
            }
        }
        Ok(())
    }
}

impl Source for Array2<f32> {
    fn d_model(&self) -> usize {
        self.ncols()
    }
    fn n_rows(&self) -> u64 {
        self.nrows() as u64
    }
    fn read_rows(&self, start: u64, out_nd: &mut [f32]) -> Result<(), DataError> {
        self.view().read_rows(start, out_nd)
    }
}

/// Everything that can be wrong with activation data. Each message names the file (or row)
/// and says how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A shard does not exist or cannot be read.
    #[error("{}: cannot read: {source}; check the path and its permissions", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The file does not start with a valid `.npy` header.
    #[error("{}: not an .npy file ({reason}); save activations with numpy.save", path.display())]
    NotNpy {
        /// The file.
        path: PathBuf,
        /// What is wrong with the header.
        reason: String,
    },
    /// A path that is not a regular file (a FIFO, a socket, a device): sae reads rows by
    /// position, and opening a FIFO would wait for a writer forever.
    #[error(
        "{}: is {kind}, not a regular file; save the activations to a file (numpy.save) and \
         pass that",
        path.display()
    )]
    NotAFile {
        /// The path.
        path: PathBuf,
        /// What it is instead, for example "a FIFO (named pipe)".
        kind: &'static str,
    },
    /// A shard that became shorter than its header describes after it was opened (truncated
    /// or rewritten by another process).
    #[error(
        "{}: the file shrank to {len} bytes while sae was reading it (its header and data \
         need {needed}); something truncated or rewrote it: restore the file and run again (a \
         training run resumes from its checkpoint with --resume)",
        path.display()
    )]
    Shrunk {
        /// The file.
        path: PathBuf,
        /// Its length now.
        len: u64,
        /// The length its header and data need.
        needed: u64,
    },
    /// Reading a shard that was opened fine failed (an I/O error from the disk or network
    /// file system).
    #[error(
        "{}: reading at byte {offset} failed: {cause}; check the disk or file system holding \
         it, then run again (a training run resumes from its checkpoint with --resume)",
        path.display()
    )]
    ReadFailed {
        /// The file.
        path: PathBuf,
        /// Where the read started.
        offset: u64,
        /// What the operating system said.
        cause: std::io::Error,
    },
    /// The header promises more data than the file holds.
    #[error(
        "{}: truncated: its header describes {expected} bytes of data but the file holds \
         {actual}; the file was cut short, write it again",
        path.display()
    )]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes of data the header's shape and dtype call for.
        expected: u64,
        /// Bytes after the header.
        actual: u64,
    },
    /// A dtype other than little-endian float16, float32 or float64.
    #[error(
        "{}: unsupported dtype {dtype}; sae reads little-endian float32, float16 or float64: \
         save arr.astype('<f4') instead",
        path.display()
    )]
    Dtype {
        /// The file.
        path: PathBuf,
        /// The dtype as numpy spells it (for example `<i4`, `>f4`, `|O`).
        dtype: String,
    },
    /// Column-major data.
    #[error(
        "{}: stored in Fortran (column-major) order; save np.ascontiguousarray(arr) instead",
        path.display()
    )]
    FortranOrder {
        /// The file.
        path: PathBuf,
    },
    /// A 0-dimensional array: one number, no rows.
    #[error(
        "{}: holds a single number (a 0-dimensional array); save an array shaped [..., d_model]",
        path.display()
    )]
    Scalar {
        /// The file.
        path: PathBuf,
    },
    /// A shape with a zero in it: no rows, or rows of width 0.
    // "holds no values" rather than "no rows": [3, 0] has three rows, all empty.
    #[error("{}: shape {shape:?} holds no values; remove the file or save its activations", path.display())]
    NoRows {
        /// The file.
        path: PathBuf,
        /// Its shape.
        shape: Vec<u64>,
    },
    /// Shards whose last axes differ.
    #[error(
        "{}: rows are {d_model} wide but {} has rows {first_d_model} wide; every shard of a \
         dataset must share d_model",
        path.display(),
        first_path.display()
    )]
    WidthMismatch {
        /// The disagreeing file.
        path: PathBuf,
        /// Its D.
        d_model: usize,
        /// The first file.
        first_path: PathBuf,
        /// The first file's D.
        first_d_model: usize,
    },
    /// A directory or glob that matched no `.npy` file.
    #[error(
        "{spec}: no .npy files found; pass a file, a directory holding *.npy files, or a glob \
         such as 'acts/*.npy'"
    )]
    NoFiles {
        /// The path or pattern as given.
        spec: String,
    },
    /// A malformed glob pattern.
    #[error("{pattern}: not a valid glob pattern ({reason})")]
    Glob {
        /// The pattern as given.
        pattern: String,
        /// What is wrong with it.
        reason: String,
    },
    /// NaN or ±Inf in a row.
    #[error(
        "non-finite value (NaN or Inf) at {location}; clean the data, or skip such rows \
         (LoaderConfig::skip_non_finite, --skip-non-finite)"
    )]
    NonFinite {
        /// File and row.
        location: String,
    },
    /// Skipping non-finite rows left a batch (or a rank's part of one) with no rows.
    #[error(
        "every row of a batch holds a non-finite value (NaN or Inf): the data is mostly broken; \
         check how it was made"
    )]
    NoFiniteRows,
    /// The rows are not usable for estimating the normalisation scale.
    #[error("cannot normalise: the mean norm of the {rows} sampled rows is {mean_norm}; train without normalisation")]
    ZeroNorm {
        /// Rows sampled.
        rows: u64,
        /// Their mean Euclidean norm.
        mean_norm: f64,
    },
    /// The held-out fraction leaves no training or no evaluation rows.
    #[error(
        "eval fraction {fraction} of {n_rows} rows holds out {n_eval}; it must leave at least one \
         row for evaluation and one for training"
    )]
    EvalFraction {
        /// Fraction asked for.
        fraction: f64,
        /// Rows in the dataset.
        n_rows: u64,
        /// Rows that fraction gives.
        n_eval: u64,
    },
    /// A saved cursor that belongs to another dataset or loader configuration.
    #[error("the saved data cursor does not fit this dataset and loader: {0}; resume with the data and loader options of the original run")]
    Cursor(String),
    /// The background loader thread died.
    #[error("the data loader thread stopped unexpectedly: {0}")]
    LoaderThread(String),
}
