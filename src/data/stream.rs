//! Batches from a stream of row arrays (a generator, a forward hook on a running model) that
//! can be read only once, front to back: a bounded shuffle buffer filled as the stream
//! delivers, run on a background thread so the stream's producer works while the trainer does.
//!
//! The buffer starts full. A batch takes `batch_size` distinct slots at random (seeded) and
//! each taken slot is refilled with the stream's next row; once the stream ends the buffer
//! drains, and the last batch is the last whole one (fewer rows than a batch are left over).
//! The batches depend only on the rows, their order and the seed, never on how the stream cut
//! them into arrays or on timing.

use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver, SyncSender};

use ndarray::{s, Array2};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::DataError;
use crate::error::{Error, Result};

/// Arrays of rows, D wide, delivered once in order; `None` ends the stream.
///
/// Any `Iterator<Item = Result<Array2<f32>>> + Send` is one.
pub trait RowStream: Send {
    /// The next rows (any number of them, D columns); `None` once the stream has ended.
    fn next_rows(&mut self) -> Option<Result<Array2<f32>>>;
}

impl<I> RowStream for I
where
    I: Iterator<Item = Result<Array2<f32>>> + Send,
{
    fn next_rows(&mut self) -> Option<Result<Array2<f32>>> {
        self.next()
    }
}

/// How a stream's batches are drawn.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamConfig {
    /// Rows per batch, at least 1.
    pub batch_size: usize,
    /// Rows the shuffle buffer holds, at least `batch_size`.
    pub buffer_rows: usize,
    /// Seed of the draws.
    pub seed: u64,
    /// Skip rows holding NaN or ±Inf instead of stopping at the first one.
    pub skip_non_finite: bool,
    /// Factor applied to every row as it enters the buffer (normalisation's c).
    pub scale: f32,
    /// Batches made ahead of the trainer, at least 1.
    pub prefetch: usize,
}

/// Batches the buffer holds by default: enough to mix rows from many of the stream's arrays
/// (a forward hook delivers one sequence batch's tokens at a time), little enough that the
/// first batch comes soon. This crate's own choice; SAELens' activation store mixes 20 batches.
pub const DEFAULT_BUFFER_BATCHES: usize = 16;

/// The front of a stream, read before training: D, the held-out rows and the rows the
/// normalisation scale is estimated on, which stay at the front for training.
pub struct StreamHead {
    stream: Box<dyn RowStream>,
    d_model: usize,
    /// Arrays read from the stream and not yet consumed, the first from `offset` on.
    pending: VecDeque<Array2<f32>>,
    offset: usize,
    /// Arrays read so far (for error messages), and rows consumed.
    arrays_read: u64,
    rows_consumed: u64,
    ended: bool,
}

impl StreamHead {
    /// Reads the stream's first non-empty array, which gives D. A stream that ends first is
    /// an error.
    pub fn open(stream: Box<dyn RowStream>) -> Result<StreamHead> {
        let mut head = StreamHead {
            stream,
            d_model: 0,
            pending: VecDeque::new(),
            offset: 0,
            arrays_read: 0,
            rows_consumed: 0,
            ended: false,
        };
        if !head.pull()? {
            return Err(DataError::Stream("it ended before delivering a row".into()).into());
        }
        Ok(head)
    }

    /// D, the width of every row.
    pub fn d_model(&self) -> usize {
        self.d_model
    }

    /// Rows buffered ahead of the consumer.
    fn pending_rows(&self) -> usize {
        self.pending.iter().map(|a| a.nrows()).sum::<usize>() - self.offset
    }

    /// Reads one more non-empty array into `pending`; false at the end of the stream.
    fn pull(&mut self) -> Result<bool> {
        while !self.ended {
            let Some(next) = self.stream.next_rows() else {
                self.ended = true;
                break;
            };
            self.arrays_read += 1;
            let rows = next.map_err(|err| match err {
                Error::Data(DataError::Stream(_)) => err,
                other => {
                    DataError::Stream(format!("array {} failed: {other}", self.arrays_read - 1))
                        .into()
                }
            })?;
            if self.d_model == 0 && rows.ncols() == 0 {
                return Err(DataError::Stream(format!(
                    "array {} has no columns; each row must hold D activations",
                    self.arrays_read - 1
                ))
                .into());
            }
            if self.d_model == 0 {
                self.d_model = rows.ncols();
            }
            if rows.ncols() != self.d_model {
                return Err(DataError::Stream(format!(
                    "array {} is {} wide, but the stream's first array was {}: every row must \
                     hold the same D activations",
                    self.arrays_read - 1,
                    rows.ncols(),
                    self.d_model
                ))
                .into());
            }
            if rows.nrows() > 0 {
                self.pending.push_back(rows);
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Up to `n` rows from the front, consumed (fewer when the stream ends first).
    pub fn take(&mut self, n: usize) -> Result<Array2<f32>> {
        while self.pending_rows() < n && self.pull()? {}
        let n = n.min(self.pending_rows());
        let mut out = Array2::zeros((n, self.d_model));
        let mut filled = 0;
        while filled < n {
            let front = self.pending.front().expect("pending holds n rows");
            let m = (front.nrows() - self.offset).min(n - filled);
            out.slice_mut(s![filled..filled + m, ..])
                .assign(&front.slice(s![self.offset..self.offset + m, ..]));
            filled += m;
            self.advance(m);
        }
        Ok(out)
    }

    /// A copy of up to `n` rows from the front, left there to be consumed.
    pub fn peek(&mut self, n: usize) -> Result<Array2<f32>> {
        while self.pending_rows() < n && self.pull()? {}
        let n = n.min(self.pending_rows());
        let mut out = Array2::zeros((n, self.d_model));
        let (mut filled, mut offset) = (0, self.offset);
        for array in &self.pending {
            let m = (array.nrows() - offset).min(n - filled);
            out.slice_mut(s![filled..filled + m, ..])
                .assign(&array.slice(s![offset..offset + m, ..]));
            filled += m;
            offset = 0;
            if filled == n {
                break;
            }
        }
        Ok(out)
    }

    /// Consumes `m` rows of the front array.
    fn advance(&mut self, m: usize) {
        self.offset += m;
        self.rows_consumed += m as u64;
        if self
            .pending
            .front()
            .is_some_and(|a| self.offset == a.nrows())
        {
            self.pending.pop_front();
            self.offset = 0;
        }
    }

    /// Copies the next row into `row_d`; false at the end of the stream.
    fn next_row(&mut self, row_d: &mut [f32]) -> Result<bool> {
        if self.pending.is_empty() && !self.pull()? {
            return Ok(false);
        }
        let front = self.pending.front().expect("pulled");
        for (dst, &v) in row_d.iter_mut().zip(front.row(self.offset)) {
            *dst = v;
        }
        self.advance(1);
        Ok(true)
    }
}

/// The shuffle buffer over a stream, run synchronously (see [`StreamLoader`] for the thread).
pub struct StreamBatcher {
    head: StreamHead,
    config: StreamConfig,
    buffer_nd: Array2<f32>,
    len: usize,
    rng: ChaCha8Rng,
    filled: bool,
    skipped_rows: u64,
}

impl StreamBatcher {
    /// A batcher drawing from `head` onwards; checks `config`.
    pub fn new(head: StreamHead, config: StreamConfig) -> Result<StreamBatcher> {
        use crate::config::ConfigError;
        if config.batch_size == 0 {
            return Err(ConfigError::ZeroBatchSize.into());
        }
        if config.buffer_rows < config.batch_size {
            return Err(ConfigError::BufferRows(config.buffer_rows).into());
        }
        let buffer_nd = Array2::zeros((config.buffer_rows, head.d_model));
        Ok(StreamBatcher {
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            head,
            config,
            buffer_nd,
            len: 0,
            filled: false,
            skipped_rows: 0,
        })
    }

    /// Non-finite rows skipped so far.
    pub fn skipped_rows(&self) -> u64 {
        self.skipped_rows
    }

    /// Writes the stream's next usable row, scaled, into buffer slot `slot`; false at the end.
    fn read_into(&mut self, slot: usize) -> Result<bool> {
        loop {
            let mut row_d = self.buffer_nd.row_mut(slot);
            let row_d = row_d.as_slice_mut().expect("standard layout");
            let index = self.head.rows_consumed;
            if !self.head.next_row(row_d)? {
                return Ok(false);
            }
            if row_d.iter().all(|v| v.is_finite()) {
                if self.config.scale != 1.0 {
                    row_d.iter_mut().for_each(|v| *v *= self.config.scale);
                }
                return Ok(true);
            }
            if !self.config.skip_non_finite {
                return Err(DataError::NonFinite {
                    location: format!("row {index} of the stream"),
                }
                .into());
            }
            self.skipped_rows += 1;
        }
    }

    /// The next batch of `batch_size` rows, or `None` once fewer than that are left.
    pub fn next_batch(&mut self) -> Result<Option<Array2<f32>>> {
        if !self.filled {
            while self.len < self.config.buffer_rows && self.read_into(self.len)? {
                self.len += 1;
            }
            self.filled = true;
        }
        let b = self.config.batch_size;
        if self.len < b {
            return Ok(None);
        }
        let mut slots = rand::seq::index::sample(&mut self.rng, self.len, b).into_vec();
        // Ascending slots make the refill and the compaction below one pass each.
        slots.sort_unstable();
        let mut x_bd = Array2::zeros((b, self.head.d_model));
        for (i, &slot) in slots.iter().enumerate() {
            x_bd.row_mut(i).assign(&self.buffer_nd.row(slot));
        }
        let mut holes = Vec::new();
        for &slot in &slots {
            if !self.read_into(slot)? {
                holes.push(slot);
            }
        }
        // The stream has ended: the buffer shrinks, its last rows moving into the holes.
        for &hole in holes.iter().rev() {
            let last = self.len - 1;
            if hole != last {
                let (mut to, from) = self.buffer_nd.multi_slice_mut((s![hole, ..], s![last, ..]));
                to.assign(&from);
            }
            self.len -= 1;
        }
        Ok(Some(x_bd))
    }
}

/// What the background thread sends: a batch, or the end, with the skipped-row count so far.
type Made = Result<(Option<Array2<f32>>, u64)>;

/// A [`StreamBatcher`] run on a background thread, up to `prefetch` batches ahead.
///
/// ```
/// use ndarray::Array2;
/// use sparse_autoencoder::data::{StreamConfig, StreamHead, StreamLoader};
///
/// // Ten arrays of 50 rows each, as a generator would hand them over.
/// let arrays = (0..10).map(|i| Ok(Array2::from_elem((50, 4), i as f32)));
/// let head = StreamHead::open(Box::new(arrays))?;
/// let config = StreamConfig {
///     batch_size: 100, buffer_rows: 200, seed: 0, skip_non_finite: false, scale: 1.0,
///     prefetch: 2,
/// };
/// let mut loader = StreamLoader::new(head, config)?;
/// let mut batches = 0;
/// while let Some(x_bd) = loader.next_batch()? {
///     assert_eq!(x_bd.dim(), (100, 4));
///     batches += 1;
/// }
/// assert_eq!(batches, 5);
/// # Ok::<(), sparse_autoencoder::Error>(())
/// ```
pub struct StreamLoader {
    made: Receiver<Made>,
    skipped_rows: u64,
    done: bool,
}

impl StreamLoader {
    /// Starts the thread. It is not joined when the loader is dropped (it may be waiting on
    /// the stream's producer): it ends at its next hand-over.
    pub fn new(head: StreamHead, config: StreamConfig) -> Result<StreamLoader> {
        let (tx, rx): (SyncSender<Made>, _) = mpsc::sync_channel(config.prefetch.max(1));
        let mut batcher = StreamBatcher::new(head, config)?;
        std::thread::Builder::new()
            .name("sae-stream".into())
            .spawn(move || loop {
                let made = batcher.next_batch();
                let last = !matches!(made, Ok(Some(_)));
                let made = made.map(|batch| (batch, batcher.skipped_rows()));
                if tx.send(made).is_err() || last {
                    return;
                }
            })
            .map_err(|err| DataError::LoaderThread(format!("it could not start: {err}")))?;
        Ok(StreamLoader {
            made: rx,
            skipped_rows: 0,
            done: false,
        })
    }

    /// The next batch, waiting for the stream if it is behind; `None` once it has ended and
    /// the buffer holds less than a batch.
    pub fn next_batch(&mut self) -> Result<Option<Array2<f32>>> {
        if self.done {
            return Ok(None);
        }
        match self.made.recv() {
            Ok(Ok((batch, skipped))) => {
                self.skipped_rows = skipped;
                self.done = batch.is_none();
                Ok(batch)
            }
            Ok(Err(err)) => {
                self.done = true;
                Err(err)
            }
            Err(_) => {
                self.done = true;
                Err(DataError::LoaderThread("the stream's thread stopped".into()).into())
            }
        }
    }

    /// Non-finite rows skipped up to the last batch returned.
    pub fn skipped_rows(&self) -> u64 {
        self.skipped_rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arrays(rows: &[usize], d: usize) -> Box<dyn RowStream> {
        let mut start = 0;
        let arrays: Vec<Result<Array2<f32>>> = rows
            .iter()
            .map(|&n| {
                let a = Array2::from_shape_fn((n, d), |(r, c)| ((start + r) * d + c) as f32);
                start += n;
                Ok(a)
            })
            .collect();
        Box::new(arrays.into_iter())
    }

    fn config(batch_size: usize, buffer_rows: usize) -> StreamConfig {
        StreamConfig {
            batch_size,
            buffer_rows,
            seed: 7,
            skip_non_finite: false,
            scale: 1.0,
            prefetch: 2,
        }
    }

    fn all_batches(stream: Box<dyn RowStream>, config: StreamConfig) -> Vec<Array2<f32>> {
        let mut loader = StreamLoader::new(StreamHead::open(stream).unwrap(), config).unwrap();
        std::iter::from_fn(|| loader.next_batch().unwrap()).collect()
    }

    #[test]
    fn every_row_once_until_less_than_a_batch_is_left() {
        let batches = all_batches(arrays(&[37, 0, 100, 63], 3), config(16, 48));
        assert_eq!(batches.len(), 200 / 16);
        let mut firsts: Vec<usize> = batches
            .iter()
            .flat_map(|b| b.column(0).to_vec())
            .map(|v| v as usize / 3)
            .collect();
        firsts.sort_unstable();
        firsts.dedup();
        assert_eq!(firsts.len(), 12 * 16, "a row was drawn twice");
        // Rows are shuffled, not handed out in order.
        assert_ne!(
            batches[0].column(0).to_vec(),
            (0..16).map(|r| (r * 3) as f32).collect::<Vec<_>>()
        );
    }

    #[test]
    fn batches_do_not_depend_on_how_the_stream_is_cut() {
        let a = all_batches(arrays(&[200], 2), config(10, 40));
        let b = all_batches(arrays(&[1, 99, 7, 93], 2), config(10, 40));
        assert_eq!(a, b);
        let other_seed = all_batches(
            arrays(&[200], 2),
            StreamConfig {
                seed: 8,
                ..config(10, 40)
            },
        );
        assert_ne!(a, other_seed);
    }

    #[test]
    fn head_takes_and_peeks_rows_in_order() {
        let mut head = StreamHead::open(arrays(&[3, 4], 2)).unwrap();
        assert_eq!(head.d_model(), 2);
        assert_eq!(head.take(2).unwrap().column(0).to_vec(), [0.0, 2.0]);
        assert_eq!(head.peek(3).unwrap().column(0).to_vec(), [4.0, 6.0, 8.0]);
        assert_eq!(head.take(9).unwrap().nrows(), 5);
    }

    #[test]
    fn bad_streams_are_errors_naming_the_array() {
        let err = StreamHead::open(Box::new(std::iter::empty()))
            .err()
            .unwrap();
        assert!(err.to_string().contains("ended before"), "{err}");
        let widths = vec![Ok(Array2::zeros((4, 3))), Ok(Array2::zeros((4, 5)))];
        let mut head = StreamHead::open(Box::new(widths.into_iter())).unwrap();
        let err = head.take(8).unwrap_err().to_string();
        assert!(
            err.contains("array 1 is 5 wide") && err.contains("was 3"),
            "{err}"
        );
        let mut nan = Array2::zeros((8, 2));
        nan[[5, 1]] = f32::NAN;
        let head = StreamHead::open(Box::new(vec![Ok(nan.clone())].into_iter())).unwrap();
        let err = StreamLoader::new(head, config(2, 8))
            .unwrap()
            .next_batch()
            .unwrap_err();
        assert!(err.to_string().contains("row 5 of the stream"), "{err}");
        let head = StreamHead::open(Box::new(vec![Ok(nan)].into_iter())).unwrap();
        let skip = StreamConfig {
            skip_non_finite: true,
            ..config(7, 8)
        };
        let mut loader = StreamLoader::new(head, skip).unwrap();
        assert_eq!(loader.next_batch().unwrap().unwrap().nrows(), 7);
        assert_eq!(loader.skipped_rows(), 1);
        assert!(loader.next_batch().unwrap().is_none());
    }
}
