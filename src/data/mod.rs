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
mod stream;
mod subset;

use std::sync::Arc;

use ndarray::{Array2, ArrayView2};

pub use crate::error::DataError;
pub use normalize::{estimate_scale, SCALE_SAMPLE_ROWS};
pub use npy::NpyShards;
pub use prefetch::{Batch, Prefetcher};
pub use shuffle::{Batcher, Cursor, LoaderConfig};
pub use stream::{
    RowStream, StreamBatcher, StreamConfig, StreamHead, StreamLoader, DEFAULT_BUFFER_BATCHES,
};
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
