//! A background thread that runs a [`Batcher`] ahead of the trainer, through a bounded queue,
//! recycling batch memory.

use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::thread::JoinHandle;

use ndarray::{s, Array2, ArrayView2};

use super::shuffle::CursorDelta;
use super::{Batcher, Cursor, DataError, Source};
use crate::error::Result;

type Made = std::result::Result<(Array2<f32>, CursorDelta), crate::Error>;

/// Batches made on a background thread while the caller trains on the previous one.
///
/// Memory is bounded by the batcher's buffer plus `prefetch + 2` batches, whatever the size of
/// the dataset. The batches and their order are exactly those of the same [`Batcher`] run
/// synchronously, in either mode (in part mode, this rank's parts of the global batches).
///
/// ```
/// use std::sync::Arc;
/// use ndarray::Array2;
/// use sparse_autoencoder::data::{Batcher, LoaderConfig, Prefetcher};
///
/// let x_nd = Arc::new(Array2::from_shape_fn((500, 4), |(n, d)| (n + d) as f32));
/// let config = LoaderConfig { batch_size: 64, ..LoaderConfig::default() };
/// let mut loader = Prefetcher::new(Batcher::new(x_nd, config)?);
/// let batch = loader.next_batch()?;
/// assert_eq!(batch.view().dim(), (64, 4));
/// # Ok::<(), sparse_autoencoder::Error>(())
/// ```
pub struct Prefetcher {
    made: Option<Receiver<Made>>,
    recycle: Sender<Array2<f32>>,
    thread: Option<JoinHandle<()>>,
    /// Cursor after the last batch handed out.
    cursor: Cursor,
    d_model: usize,
    done: bool,
}

/// One batch from a [`Prefetcher`]; its memory goes back to the loader when dropped.
pub struct Batch {
    x_bd: Option<Array2<f32>>,
    recycle: Sender<Array2<f32>>,
}

impl Batch {
    /// The rows, B×D (in part mode B/world×D, or fewer where non-finite rows were skipped).
    pub fn view(&self) -> ArrayView2<'_, f32> {
        self.x_bd.as_ref().expect("present until drop").view()
    }

    /// Keeps the rows (their memory is then not reused).
    pub fn into_array(mut self) -> Array2<f32> {
        self.x_bd.take().expect("present until drop")
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        if let Some(x_bd) = self.x_bd.take() {
            // The loader may be gone already; then the memory is simply freed.
            let _ = self.recycle.send(x_bd);
        }
    }
}

impl Prefetcher {
    /// Starts the thread; it runs up to `prefetch` batches ahead of [`Prefetcher::next_batch`].
    pub fn new<S: Source + 'static>(mut batcher: Batcher<S>) -> Self {
        let cursor = batcher.cursor();
        let (d_model, batch_rows) = (batcher.d_model(), batcher.batch_rows());
        let (made_tx, made_rx): (SyncSender<Made>, _) =
            mpsc::sync_channel(batcher.config().prefetch);
        let (recycle_tx, recycle_rx) = mpsc::channel::<Array2<f32>>();
        batcher.record_deltas();
        let thread = std::thread::Builder::new()
            .name("sae-loader".into())
            .spawn(move || loop {
                // A batch shortened by skipped rows is not reused.
                let mut x_bd = recycle_rx
                    .try_recv()
                    .ok()
                    .filter(|x_bd| x_bd.dim() == (batch_rows, d_model))
                    .unwrap_or_else(|| Array2::zeros((batch_rows, d_model)));
                let made = batcher.fill_batch(x_bd.view_mut()).map(|rows| {
                    if rows < batch_rows {
                        x_bd.slice_collapse(s![..rows, ..]);
                    }
                    (x_bd, batcher.take_delta())
                });
                let failed = made.is_err();
                // A closed queue means the consumer is gone: stop.
                if made_tx.send(made).is_err() || failed {
                    return;
                }
            })
            .expect("spawning the loader thread");
        Prefetcher {
            made: Some(made_rx),
            recycle: recycle_tx,
            thread: Some(thread),
            cursor,
            d_model,
            done: false,
        }
    }

    /// The next batch, waiting for it if the thread is behind.
    pub fn next_batch(&mut self) -> Result<Batch> {
        if self.done {
            return Err(DataError::LoaderThread("it stopped after an earlier error".into()).into());
        }
        let received = self.made.as_ref().expect("present until drop").recv();
        match received {
            Ok(Ok((x_bd, delta))) => {
                self.cursor.apply(&delta);
                Ok(Batch {
                    x_bd: Some(x_bd),
                    recycle: self.recycle.clone(),
                })
            }
            Ok(Err(err)) => {
                self.done = true;
                Err(err)
            }
            Err(_) => {
                self.done = true;
                Err(DataError::LoaderThread(self.join_reason()).into())
            }
        }
    }

    /// D.
    pub fn d_model(&self) -> usize {
        self.d_model
    }

    /// Where the stream stands after the last batch [`Prefetcher::next_batch`] returned (not the
    /// ones made ahead): restoring it with [`Batcher::with_cursor`] continues from there.
    pub fn cursor(&self) -> &Cursor {
        &self.cursor
    }

    /// Non-finite rows skipped up to the last batch returned (in part mode, by this rank).
    pub fn skipped_rows(&self) -> u64 {
        self.cursor.skipped_rows
    }

    /// Why the thread ended, once its channel closed.
    fn join_reason(&mut self) -> String {
        match self.thread.take().map(JoinHandle::join) {
            Some(Err(panic)) => panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "it panicked".into()),
            _ => "it exited".into(),
        }
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Closing the queue makes the thread's next send fail, and it returns.
        drop(self.made.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
