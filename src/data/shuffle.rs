//! Shuffled batches from a bounded buffer: every row once an epoch, in a seeded random order,
//! with the source read sequentially, one chunk at a time.
//!
//! The rows are cut into chunks of `chunk_rows` consecutive rows; each epoch streams the
//! chunks in a fresh random order into a buffer of at most `buffer_rows` rows. A batch takes
//! distinct buffer slots at random and each taken slot is refilled with the next row of the
//! stream. When the stream ends, the buffer drains and the next epoch begins, so a batch may
//! hold the last rows of one epoch and the first of the next.
//!
//! In part mode ([`Batcher::for_part`]) a batcher serves one rank of a distributed job: the
//! buffer holds only source-row indices, the draws are exactly the normal mode's, and each
//! batch is this rank's part of the global batch, read straight from the source.

use std::ops::Range;

use ndarray::{s, Array2, ArrayViewMut2};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{DataError, Source};
use crate::config::ConfigError;
use crate::error::{check_shape, Result};

/// How batches are drawn. Defaults are this crate's own (no reference library streams
/// activations this way); each says why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoaderConfig {
    /// Rows per batch (default 4096, the batch every benchmark of this crate uses).
    pub batch_size: usize,
    /// Rows the shuffle buffer holds; `None` (the default) takes 2²⁰ or what fits
    /// `buffer_bytes`, whichever is less, and never more than the dataset.
    pub buffer_rows: Option<usize>,
    /// Memory budget of the shuffle buffer in bytes when `buffer_rows` is `None` (default
    /// 4 GiB: 2²⁰ rows up to D = 1024).
    pub buffer_bytes: u64,
    /// Consecutive rows read as one unit (default 1024: 1.5 MiB of float16 at D = 768, long
    /// enough for sequential reads, short enough that a buffer mixes hundreds of chunks).
    pub chunk_rows: usize,
    /// Batches the background thread prepares ahead (default 2: enough to hide a refill;
    /// each costs one batch of memory).
    pub prefetch: usize,
    /// Seed of the chunk order and of the draws.
    pub seed: u64,
    /// Skip rows holding NaN or ±Inf (counted in [`Batcher::skipped_rows`]) instead of
    /// stopping at the first one (default false: bad data should be seen, not trained on).
    /// A skipped row is dropped from the batch that draws it, which is then shorter: the
    /// draws stay those of the clean stream, so the batches are the same in normal mode and,
    /// split over ranks, in part mode.
    pub skip_non_finite: bool,
    /// Factor applied to every row as it is read: normalisation's c (default 1).
    pub scale: f32,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_size: 4096,
            buffer_rows: None,
            buffer_bytes: 4 << 30,
            chunk_rows: 1024,
            prefetch: 2,
            seed: 0,
            skip_non_finite: false,
            scale: 1.0,
        }
    }
}

/// The largest buffer a slot index (u32) can address.
const MAX_BUFFER_ROWS: usize = u32::MAX as usize;

/// Most f32 bytes one read of consecutive rows fills: long runs make few `read_rows` calls
/// (a syscall each from files), short ones keep a batch's reads spread over the threads.
/// 64 KiB is what `NpyShards` reads in one task: longer runs measured no cheaper.
const RUN_BYTES: usize = 64 << 10;

/// `0..n` cut into runs of at most `max_rows` indices: j and j + 1 share a run when both
/// have fresh rows (j + 1 < `rows.len()`) and `rows[j + 1] == rows[j] + 1`, or when neither
/// has one.
fn runs(rows: &[u64], n: usize, max_rows: usize) -> Vec<Range<usize>> {
    let joins = |j: usize| match (j < rows.len(), j + 1 < rows.len()) {
        (true, true) => rows[j + 1] == rows[j] + 1,
        (fresh, next_fresh) => fresh == next_fresh,
    };
    let mut runs = Vec::new();
    let mut start = 0;
    while start < n {
        let mut end = start + 1;
        while end < n && end - start < max_rows && joins(end - 1) {
            end += 1;
        }
        runs.push(start..end);
        start = end;
    }
    runs
}

impl LoaderConfig {
    /// Checks every field.
    pub fn validate(&self) -> std::result::Result<(), ConfigError> {
        use ConfigError as E;
        if self.batch_size == 0 {
            return Err(E::ZeroBatchSize);
        }
        if let Some(rows) = self.buffer_rows {
            if rows == 0 || rows > MAX_BUFFER_ROWS {
                return Err(E::BufferRows(rows));
            }
        }
        if self.buffer_bytes == 0 {
            return Err(E::ZeroBufferBytes);
        }
        if self.chunk_rows == 0 {
            return Err(E::ZeroChunkRows);
        }
        if self.prefetch == 0 {
            return Err(E::ZeroPrefetch);
        }
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return Err(E::InputScale(self.scale));
        }
        Ok(())
    }

    /// Rows the buffer will hold for a dataset of `n_rows` rows of width `d_model`.
    pub fn buffer_capacity(&self, n_rows: u64, d_model: usize) -> usize {
        let rows = self.buffer_rows.unwrap_or_else(|| {
            let fits = self.buffer_bytes / (4u64.saturating_mul(d_model as u64)).max(1);
            fits.clamp(1, 1 << 20) as usize
        });
        rows.min(usize::try_from(n_rows).unwrap_or(usize::MAX))
    }
}

/// Where a [`Batcher`] stands: restoring it gives the batches an uninterrupted run would have
/// seen next. Small except for `slot_rows`, 8 bytes per buffered row.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cursor {
    /// Epochs completed.
    pub epoch: u64,
    /// Rows of this epoch's chunk stream already taken into the buffer.
    pub stream_pos: u64,
    /// Position of the draw generator (ChaCha8 word position).
    pub rng_word_pos: u128,
    /// Non-finite rows skipped so far.
    pub skipped_rows: u64,
    /// The source row in each occupied buffer slot.
    pub slot_rows: Vec<u64>,
    /// Identity of the data and loader the cursor belongs to, checked on restore.
    pub n_rows: u64,
    /// See `n_rows`.
    pub seed: u64,
    /// See `n_rows`.
    pub chunk_rows: usize,
}

/// What one batch changed in a [`Cursor`]: the slots it wrote and where things stand after.
/// The prefetch thread sends these so the consumer's cursor follows the batches it received,
/// not the ones made ahead.
#[derive(Clone, Debug, Default)]
pub(crate) struct CursorDelta {
    writes: Vec<(u32, u64)>,
    len: usize,
    epoch: u64,
    stream_pos: u64,
    rng_word_pos: u128,
    skipped_rows: u64,
}

impl Cursor {
    /// Applies the changes of one batch, in the order they were made.
    pub(crate) fn apply(&mut self, delta: &CursorDelta) {
        for &(slot, row) in &delta.writes {
            let slot = slot as usize;
            if slot >= self.slot_rows.len() {
                self.slot_rows.resize(slot + 1, 0);
            }
            self.slot_rows[slot] = row;
        }
        // Slots below the final length that no write touched were never emptied: a buffer
        // only shrinks below a slot by draining, and refilling after a drain writes the slot.
        self.slot_rows.resize(delta.len, 0);
        self.epoch = delta.epoch;
        self.stream_pos = delta.stream_pos;
        self.rng_word_pos = delta.rng_word_pos;
        self.skipped_rows = delta.skipped_rows;
    }
}

/// Makes shuffled batches from a [`Source`], synchronously. [`super::Prefetcher`] runs one on
/// a background thread.
///
/// Memory: the buffer (capacity × D f32, or in part mode nothing beyond the 8-byte slot
/// table) plus, per epoch, 8 bytes per chunk. After an error the batcher is spent; build a new
/// one (or restore a [`Cursor`]).
pub struct Batcher<S> {
    source: S,
    config: LoaderConfig,
    d_model: usize,
    n_rows: u64,
    capacity: usize,
    epoch: u64,
    /// Chunk indices in this epoch's order.
    order: Vec<u64>,
    /// Stream position at which each chunk of `order` starts, plus the total.
    order_starts: Vec<u64>,
    stream_pos: u64,
    rng: ChaCha8Rng,
    /// capacity × D rows; slot i holds source row `slot_rows[i]` for i < `slot_rows.len()`.
    /// Empty in part mode.
    buf: Vec<f32>,
    slot_rows: Vec<u64>,
    skipped_rows: u64,
    /// Slot writes since the last `take_delta`, kept only for the prefetch thread.
    log: Option<Vec<(u32, u64)>>,
    /// Part mode: (rank, world).
    part: Option<(usize, usize)>,
}

/// A pointer to the buffer that tasks share; each task writes only its own distinct slots.
#[derive(Clone, Copy)]
struct SlotsPtr(*mut f32);
// SAFETY: used only in `Batcher::read_into_slots`, whose tasks touch pairwise distinct slots.
unsafe impl Send for SlotsPtr {}
unsafe impl Sync for SlotsPtr {}

impl SlotsPtr {
    /// Slot `slot` of a buffer of D-wide rows.
    ///
    /// # Safety
    /// The slot lies inside the buffer and no other live reference touches it.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row<'a>(self, slot: usize, d: usize) -> &'a mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(slot * d), d)
    }
}

impl<S: Source> Batcher<S> {
    /// A batcher at the start of epoch 0. Nothing is read until the first batch.
    pub fn new(source: S, config: LoaderConfig) -> Result<Self> {
        config.validate()?;
        let (d_model, n_rows) = (source.d_model(), source.n_rows());
        if n_rows == 0 || d_model == 0 {
            return Err(crate::Error::Empty {
                what: "data source".into(),
            });
        }
        let capacity = config.buffer_capacity(n_rows, d_model);
        // The buffer here and the batches the prefetch thread allocates must be addressable:
        // an overflow would panic inside ndarray, on that thread.
        for (field, rows) in [("buffer_rows", capacity), ("batch_size", config.batch_size)] {
            let fits = rows
                .checked_mul(d_model)
                .and_then(|n| n.checked_mul(std::mem::size_of::<f32>()))
                .is_some_and(|bytes| bytes <= isize::MAX as usize);
            if !fits {
                return Err(ConfigError::TooLarge {
                    field,
                    size: format!("{rows} rows of width {d_model}"),
                }
                .into());
            }
        }
        let mut batcher = Batcher {
            source,
            d_model,
            n_rows,
            capacity,
            epoch: 0,
            order: Vec::new(),
            order_starts: Vec::new(),
            stream_pos: 0,
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            // Zeroed pages come from the OS untouched: a buffer bigger than the data a run
            // reaches costs no memory.
            buf: vec![0.0; capacity * d_model],
            slot_rows: Vec::with_capacity(capacity),
            skipped_rows: 0,
            log: None,
            part: None,
            config,
        };
        batcher.set_epoch(0);
        Ok(batcher)
    }

    /// A batcher that continues where `cursor` was taken: with the same source and config it
    /// yields the batches the original would have yielded next.
    pub fn with_cursor(source: S, config: LoaderConfig, cursor: &Cursor) -> Result<Self> {
        Batcher::new(source, config)?.resume(cursor)
    }

    /// This batcher, moved to where `cursor` was taken (by a batcher in either mode, with any
    /// rank count): the batches that follow are those the original would have made next. In
    /// normal mode the buffered rows are read; with `skip_non_finite`, a non-finite one (a
    /// part-mode cursor may hold some) is replaced as a refill replaces it. In part mode
    /// nothing is read.
    ///
    /// ```
    /// use ndarray::Array2;
    /// use sparse_autoencoder::data::{Batcher, LoaderConfig};
    ///
    /// let x_nd = Array2::from_shape_fn((1000, 4), |(n, d)| (n + d) as f32);
    /// let config = LoaderConfig { batch_size: 64, ..LoaderConfig::default() };
    /// let mut whole = Batcher::new(x_nd.view(), config.clone())?;
    /// whole.next_batch()?;
    /// let cursor = whole.cursor();
    /// // Rank 1 of 4 goes on with rows 16..32 of each global batch.
    /// let mut rank_1 = Batcher::new(x_nd.view(), config)?.for_part(1, 4)?.resume(&cursor)?;
    /// let part = rank_1.next_batch()?;
    /// assert_eq!(part, whole.next_batch()?.slice(ndarray::s![16..32, ..]));
    /// # Ok::<(), sparse_autoencoder::Error>(())
    /// ```
    pub fn resume(mut self, cursor: &Cursor) -> Result<Self> {
        let mismatch = |what: String| crate::Error::from(DataError::Cursor(what));
        if cursor.n_rows != self.n_rows {
            return Err(mismatch(format!(
                "it was taken on {} rows, this dataset has {}",
                cursor.n_rows, self.n_rows
            )));
        }
        if cursor.seed != self.config.seed || cursor.chunk_rows != self.config.chunk_rows {
            return Err(mismatch(format!(
                "it was taken with seed {} and chunk_rows {}, not {} and {}",
                cursor.seed, cursor.chunk_rows, self.config.seed, self.config.chunk_rows
            )));
        }
        if cursor.slot_rows.len() > self.capacity
            || cursor.stream_pos > self.n_rows
            || cursor.slot_rows.iter().any(|&r| r >= self.n_rows)
        {
            return Err(mismatch(format!(
                "it holds {} buffered rows, more than this buffer's {} or outside the dataset",
                cursor.slot_rows.len(),
                self.capacity
            )));
        }
        self.set_epoch(cursor.epoch);
        self.stream_pos = cursor.stream_pos;
        self.rng.set_word_pos(cursor.rng_word_pos);
        self.skipped_rows = cursor.skipped_rows;
        self.slot_rows = cursor.slot_rows.clone();
        if self.part.is_none() {
            let rows = self.slot_rows.clone();
            let slots: Vec<usize> = (0..rows.len()).collect();
            self.read_into_slots(&slots, &rows, None)?;
        }
        Ok(self)
    }

    /// This batcher in part mode, serving rank `rank` of `world`: every rank follows the same
    /// shuffled stream (the draws are exactly the normal mode's), and each batch holds only
    /// rows [`crate::dist::part`]`(batch_size, rank, world)` of the global batch, read straight
    /// from the source; the buffer holds row indices only. The [`Cursor`] is the normal mode's:
    /// one taken in either mode, with any rank count, restores in the other.
    ///
    /// `batch_size` must be divisible by `world` ([`crate::Error::Distributed`] otherwise).
    /// With `skip_non_finite`, a non-finite row of this rank's part is dropped from it (the
    /// batch is then shorter) and counted in [`Batcher::skipped_rows`], a count of this rank's
    /// drops only: a run sums it over the ranks. Without it, such a row is
    /// [`DataError::NonFinite`] naming it, on the rank whose part holds it.
    pub fn for_part(mut self, rank: usize, world: usize) -> Result<Self> {
        if rank >= world {
            return Err(crate::Error::Distributed {
                reason: format!("rank {rank} does not exist in a job of {world} ranks"),
            });
        }
        let batch = self.config.batch_size;
        if !batch.is_multiple_of(world) {
            let below = batch / world * world;
            let such_as = match below {
                0 => format!("{}", world),
                _ => format!("{below} or {}", below + world),
            };
            return Err(crate::Error::Distributed {
                reason: format!(
                    "--batch-size {batch} does not split evenly over {world} ranks; use a \
                     batch size divisible by {world}, such as {such_as}"
                ),
            });
        }
        self.buf = Vec::new();
        self.part = Some((rank, world));
        Ok(self)
    }

    /// In part mode, (rank, world).
    pub fn part(&self) -> Option<(usize, usize)> {
        self.part
    }

    /// Rows of a full batch from [`Batcher::next_batch`]: `batch_size`, or in part mode
    /// `batch_size / world`.
    pub fn batch_rows(&self) -> usize {
        self.config.batch_size / self.part.map_or(1, |(_, world)| world)
    }

    /// D.
    pub fn d_model(&self) -> usize {
        self.d_model
    }

    /// Rows the source holds.
    pub fn n_rows(&self) -> u64 {
        self.n_rows
    }

    /// Rows the shuffle buffer holds when full.
    pub fn buffer_capacity(&self) -> usize {
        self.capacity
    }

    /// The configuration.
    pub fn config(&self) -> &LoaderConfig {
        &self.config
    }

    /// Epochs completed so far.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Non-finite rows skipped so far (with `skip_non_finite`; counted each time a batch draws
    /// one). In part mode, the rows this rank dropped from its parts: a run sums it over the
    /// ranks.
    pub fn skipped_rows(&self) -> u64 {
        self.skipped_rows
    }

    /// Where the batcher stands, to restore with [`Batcher::with_cursor`].
    pub fn cursor(&self) -> Cursor {
        Cursor {
            epoch: self.epoch,
            stream_pos: self.stream_pos,
            rng_word_pos: self.rng.get_word_pos(),
            skipped_rows: self.skipped_rows,
            slot_rows: self.slot_rows.clone(),
            n_rows: self.n_rows,
            seed: self.config.seed,
            chunk_rows: self.config.chunk_rows,
        }
    }

    /// The next batch of `batch_size` rows; in part mode, this rank's part of the next global
    /// batch ([`Batcher::batch_rows`] rows, fewer where non-finite rows were skipped).
    pub fn next_batch(&mut self) -> Result<Array2<f32>> {
        let mut x_bd = Array2::zeros((self.batch_rows(), self.d_model));
        let rows = self.fill_batch(x_bd.view_mut())?;
        if rows < x_bd.nrows() {
            x_bd.slice_collapse(s![..rows, ..]);
        }
        Ok(x_bd)
    }

    /// Fills `x_bd` (any number of rows R, D columns, standard layout) with the next rows of the
    /// shuffled stream, reusing its memory, and returns the rows written. In normal mode the
    /// call draws R rows; in part mode it draws a global batch of R × world rows and writes
    /// this rank's part of it. With `skip_non_finite` the non-finite rows drawn are dropped,
    /// the rows kept come first and their count is returned (rows past it are left as they
    /// were); a batch left with none is [`DataError::NoFiniteRows`].
    pub fn fill_batch(&mut self, mut x_bd: ArrayViewMut2<'_, f32>) -> Result<usize> {
        let d = self.d_model;
        let n_out = x_bd.nrows();
        check_shape("batch x_bd", x_bd.shape(), &[n_out, d])?;
        let out = x_bd.as_slice_mut().ok_or_else(|| crate::Error::Shape {
            what: "batch x_bd (must be in standard layout)".into(),
            expected: vec![0, d],
            got: vec![0, d],
        })?;
        if let Some((rank, world)) = self.part {
            return self.fill_part(rank, world, out);
        }
        let (mut drawn, mut kept) = (0, 0);
        while drawn < n_out {
            if self.slot_rows.is_empty() {
                if self.stream_pos == self.n_rows {
                    self.set_epoch(self.epoch + 1);
                }
                self.fill_buffer()?;
            }
            let m = (n_out - drawn).min(self.slot_rows.len());
            kept += self.draw(m, &mut out[kept * d..(kept + m) * d])?;
            drawn += m;
        }
        if kept == 0 && n_out > 0 {
            return Err(DataError::NoFiniteRows.into());
        }
        Ok(kept)
    }

    /// Part mode's `fill_batch`: draws a global batch of `out`'s rows × `world` exactly as
    /// normal mode does, then reads this rank's part of it into `out`.
    fn fill_part(&mut self, rank: usize, world: usize, out: &mut [f32]) -> Result<usize> {
        let d = self.d_model;
        let global = out.len() / d * world;
        let mine = crate::dist::part(global, rank, world);
        let mut rows = Vec::with_capacity(mine.len());
        let mut filled = 0;
        while filled < global {
            if self.slot_rows.is_empty() {
                if self.stream_pos == self.n_rows {
                    self.set_epoch(self.epoch + 1);
                }
                self.fill_buffer()?;
            }
            let m = (global - filled).min(self.slot_rows.len());
            let slots = rand::seq::index::sample(&mut self.rng, self.slot_rows.len(), m);
            let slots = slots.into_vec();
            let taken = filled..filled + m;
            let here = taken.start.max(mine.start)..taken.end.min(mine.end);
            if !here.is_empty() {
                let js = here.start - filled..here.end - filled;
                rows.extend(slots[js].iter().map(|&slot| self.slot_rows[slot]));
            }
            let holes = self.refill(&slots, None)?;
            self.compact(holes);
            filled += m;
        }
        let out = &mut out[..rows.len() * d];
        self.read_rows(&rows, out)?;
        let kept = self.drop_non_finite(&rows, out)?;
        if kept == 0 && !rows.is_empty() {
            return Err(DataError::NoFiniteRows.into());
        }
        Ok(kept)
    }

    /// Drops the non-finite rows of `out` (which holds source rows `rows`), keeping the order
    /// of the rest, and counts them; returns the rows kept. Without `skip_non_finite` the first
    /// one is [`DataError::NonFinite`] naming it.
    fn drop_non_finite(&mut self, rows: &[u64], out: &mut [f32]) -> Result<usize> {
        let d = self.d_model;
        let mut kept = 0;
        for (j, &row) in rows.iter().enumerate() {
            if out[j * d..(j + 1) * d].iter().all(|v| v.is_finite()) {
                if kept != j {
                    out.copy_within(j * d..(j + 1) * d, kept * d);
                }
                kept += 1;
            } else if !self.config.skip_non_finite {
                return Err(DataError::NonFinite {
                    location: self.source.locate(row),
                }
                .into());
            }
        }
        self.skipped_rows += (rows.len() - kept) as u64;
        Ok(kept)
    }

    /// Starts recording slot writes, for [`Batcher::take_delta`].
    pub(crate) fn record_deltas(&mut self) {
        self.log = Some(Vec::new());
    }

    /// The changes since the last call, with where things stand now.
    pub(crate) fn take_delta(&mut self) -> CursorDelta {
        CursorDelta {
            writes: self.log.as_mut().map(std::mem::take).unwrap_or_default(),
            len: self.slot_rows.len(),
            epoch: self.epoch,
            stream_pos: self.stream_pos,
            rng_word_pos: self.rng.get_word_pos(),
            skipped_rows: self.skipped_rows,
        }
    }

    /// Begins epoch `epoch`: its chunk order comes from its own generator stream, so any
    /// epoch's order can be rebuilt from the seed alone.
    fn set_epoch(&mut self, epoch: u64) {
        let chunk = self.config.chunk_rows as u64;
        let n_chunks = self.n_rows.div_ceil(chunk);
        self.order = (0..n_chunks).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed);
        rng.set_stream(epoch + 1);
        self.order.shuffle(&mut rng);
        self.order_starts.clear();
        self.order_starts.push(0);
        for &c in &self.order {
            let len = (self.n_rows - c * chunk).min(chunk);
            self.order_starts
                .push(self.order_starts.last().unwrap() + len);
        }
        self.epoch = epoch;
        self.stream_pos = 0;
    }

    /// The source rows at stream positions `pos..pos + n`.
    fn stream_rows(&self, pos: u64, n: usize) -> Vec<u64> {
        let chunk = self.config.chunk_rows as u64;
        let mut rows = Vec::with_capacity(n);
        let mut i = self.order_starts.partition_point(|&s| s <= pos) - 1;
        let mut at = pos;
        while rows.len() < n {
            let (start, end) = (self.order_starts[i], self.order_starts[i + 1]);
            let base = self.order[i] * chunk;
            let take = ((end - at) as usize).min(n - rows.len());
            rows.extend((0..take as u64).map(|t| base + (at - start) + t));
            at += take as u64;
            i += 1;
        }
        rows
    }

    /// Fills the empty buffer from the stream (at least one row: an epoch is never empty).
    fn fill_buffer(&mut self) -> Result<()> {
        let n = (self.n_rows - self.stream_pos).min(self.capacity as u64) as usize;
        self.slot_rows.resize(n, 0);
        let slots: Vec<usize> = (0..n).collect();
        let holes = self.refill(&slots, None)?;
        self.compact(holes);
        Ok(())
    }

    /// Moves `m` rows from distinct random slots into `out`, refills the slots, and drops the
    /// non-finite rows from `out`; returns the rows kept.
    fn draw(&mut self, m: usize, out: &mut [f32]) -> Result<usize> {
        // Distinct slots: the copies and refills of one batch never touch the same row.
        let slots = rand::seq::index::sample(&mut self.rng, self.slot_rows.len(), m).into_vec();
        let rows: Vec<u64> = slots.iter().map(|&slot| self.slot_rows[slot]).collect();
        let holes = self.refill(&slots, Some(out))?;
        self.compact(holes);
        self.drop_non_finite(&rows, out)
    }

    /// Copies each slot of `slots` to its row of `out` (if given), then refills the slots with
    /// the next stream rows. Returns the slots left empty because the stream ran out.
    fn refill(&mut self, slots: &[usize], out: Option<&mut [f32]>) -> Result<Vec<usize>> {
        let fresh = (slots.len() as u64).min(self.n_rows - self.stream_pos) as usize;
        let rows = self.stream_rows(self.stream_pos, fresh);
        self.stream_pos += fresh as u64;
        // Part mode keeps no rows: the buffer learns nothing about them.
        if self.part.is_none() {
            self.read_into_slots(slots, &rows, out)?;
        }
        for (&slot, &row) in slots.iter().zip(&rows) {
            self.slot_rows[slot] = row;
        }
        let holes = slots[fresh..].to_vec();
        if let Some(log) = &mut self.log {
            log.extend(
                slots
                    .iter()
                    .filter(|s| !holes.contains(s))
                    .map(|&s| (s as u32, self.slot_rows[s])),
            );
        }
        Ok(holes)
    }

    /// In parallel: reads source row `rows[j]` into row j of `out`, scaled, grouping
    /// consecutive rows into runs.
    fn read_rows(&self, rows: &[u64], out: &mut [f32]) -> Result<()> {
        let d = self.d_model;
        let (source, scale) = (&self.source, self.config.scale);
        let runs = runs(rows, rows.len(), (RUN_BYTES / (4 * d)).max(1));
        let mut outs: Vec<&mut [f32]> = Vec::with_capacity(runs.len());
        let mut rest = out;
        for run in &runs {
            let (here, tail) = std::mem::take(&mut rest).split_at_mut(run.len() * d);
            outs.push(here);
            rest = tail;
        }
        let task =
            |(run, out_run): (&Range<usize>, &mut [f32])| -> std::result::Result<_, DataError> {
                source.read_rows(rows[run.start], out_run)?;
                if scale != 1.0 {
                    out_run.iter_mut().for_each(|v| *v *= scale);
                }
                Ok(())
            };
        runs.par_iter()
            .zip(outs)
            .map(task)
            .collect::<std::result::Result<(), DataError>>()?;
        Ok(())
    }

    /// In parallel: copies slot `slots[j]` to row j of `out` (if given), then, for j <
    /// `rows.len()`, reads source row `rows[j]` into that slot, scaled.
    fn read_into_slots(
        &mut self,
        slots: &[usize],
        rows: &[u64],
        out: Option<&mut [f32]>,
    ) -> Result<()> {
        let d = self.d_model;
        let buf = SlotsPtr(self.buf.as_mut_ptr());
        let (source, scale) = (&self.source, self.config.scale);
        let runs = runs(rows, slots.len(), (RUN_BYTES / (4 * d)).max(1));
        // Each run's rows of `out`, so that the tasks own disjoint parts of it.
        let mut outs: Vec<Option<&mut [f32]>> = Vec::with_capacity(runs.len());
        match out {
            Some(mut rest) => {
                for run in &runs {
                    let (here, tail) = std::mem::take(&mut rest).split_at_mut(run.len() * d);
                    outs.push(Some(here));
                    rest = tail;
                }
            }
            None => outs.resize_with(runs.len(), || None),
        }
        let task = |scratch: &mut Vec<f32>,
                    (run, out_run): (&Range<usize>, Option<&mut [f32]>)|
         -> std::result::Result<(), DataError> {
            // SAFETY: `slots` are distinct and below capacity, and the runs are disjoint, so
            // each task owns the rows of its slots.
            let slot = |j: usize| unsafe { buf.row(slots[j], d) };
            if let Some(out_run) = out_run {
                for (j, out_row) in run.clone().zip(out_run.chunks_exact_mut(d)) {
                    out_row.copy_from_slice(slot(j));
                }
            }
            let fresh = run.start..run.end.min(rows.len());
            if fresh.is_empty() {
                return Ok(());
            }
            let n = fresh.len() * d;
            if scratch.len() < n {
                scratch.resize(n, 0.0);
            }
            source.read_rows(rows[fresh.start], &mut scratch[..n])?;
            for (j, new_row) in fresh.zip(scratch.chunks_exact(d)) {
                let slot = slot(j);
                slot.copy_from_slice(new_row);
                if scale != 1.0 {
                    slot.iter_mut().for_each(|v| *v *= scale);
                }
            }
            Ok(())
        };
        runs.par_iter()
            .zip(outs)
            .map_init(Vec::new, task)
            .collect::<std::result::Result<(), _>>()?;
        Ok(())
    }

    /// Closes the holes a drained stream left by moving the buffer's last rows into them.
    fn compact(&mut self, mut holes: Vec<usize>) {
        if holes.is_empty() {
            return;
        }
        holes.sort_unstable();
        let d = self.d_model;
        let new_len = self.slot_rows.len() - holes.len();
        let rows_kept = self.part.is_none();
        let tail: Range<usize> = new_len..self.slot_rows.len();
        let sources = tail.filter(|s| holes.binary_search(s).is_err());
        let targets = holes.iter().copied().filter(|&h| h < new_len);
        for (to, from) in targets.zip(sources) {
            if rows_kept {
                self.buf.copy_within(from * d..(from + 1) * d, to * d);
            }
            self.slot_rows[to] = self.slot_rows[from];
            if let Some(log) = &mut self.log {
                log.push((to as u32, self.slot_rows[to]));
            }
        }
        self.slot_rows.truncate(new_len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source of any declared size that holds no data.
    struct Declared {
        rows: u64,
        d: usize,
    }

    impl Source for Declared {
        fn d_model(&self) -> usize {
            self.d
        }
        fn n_rows(&self) -> u64 {
            self.rows
        }
        fn read_rows(&self, _: u64, _: &mut [f32]) -> std::result::Result<(), DataError> {
            unreachable!("no batch is made")
        }
    }

    /// An in-memory source that counts its `read_rows` calls.
    struct Counting {
        x_nd: ndarray::Array2<f32>,
        calls: std::sync::atomic::AtomicUsize,
    }

    impl Source for Counting {
        fn d_model(&self) -> usize {
            self.x_nd.ncols()
        }
        fn n_rows(&self) -> u64 {
            self.x_nd.nrows() as u64
        }
        fn read_rows(&self, start: u64, out_nd: &mut [f32]) -> std::result::Result<(), DataError> {
            self.calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.x_nd.view().read_rows(start, out_nd)
        }
    }

    #[test]
    fn runs_join_consecutive_fresh_rows_up_to_the_cap() {
        let rows = [4, 5, 6, 9, 10, 2];
        assert_eq!(runs(&rows, 6, 8), vec![0..3, 3..5, 5..6]);
        assert_eq!(runs(&rows, 6, 2), vec![0..2, 2..3, 3..5, 5..6]);
        // Slots past the fresh rows (the stream ran out) form runs of their own.
        assert_eq!(runs(&rows[..2], 5, 8), vec![0..2, 2..5]);
        assert_eq!(runs(&[], 3, 2), vec![0..2, 2..3]);
    }

    #[test]
    fn consecutive_stream_rows_are_read_in_one_call_each_run() {
        let x_nd = ndarray::Array2::from_shape_fn((1024, 4), |(i, j)| (i * 4 + j) as f32);
        let source = Counting {
            x_nd: x_nd.clone(),
            calls: 0.into(),
        };
        let config = LoaderConfig {
            batch_size: 64,
            buffer_rows: Some(256),
            chunk_rows: 64,
            ..LoaderConfig::default()
        };
        let mut batcher = Batcher::new(&source, config).unwrap();
        let x_bd = batcher.next_batch().unwrap();
        // The fill reads 4 chunks and the draw's refill 1: a call per chunk, not per row.
        let calls = source.calls.load(std::sync::atomic::Ordering::Relaxed);
        assert!(calls <= 5, "{calls} calls");
        for row in x_bd.rows() {
            let i = row[0] as usize / 4;
            assert_eq!(row, x_nd.row(i), "row {i} arrived corrupted");
        }
    }

    #[test]
    fn buffers_and_batches_past_the_address_space_are_config_errors() {
        let too_large = |source: Declared, config: LoaderConfig| match Batcher::new(source, config)
        {
            Err(crate::Error::Config(ConfigError::TooLarge { field, .. })) => field,
            Err(err) => panic!("{err}"),
            Ok(_) => panic!("accepted"),
        };
        let wide = Declared {
            rows: 2,
            d: usize::MAX / 2,
        };
        assert_eq!(too_large(wide, LoaderConfig::default()), "buffer_rows");
        let batch = LoaderConfig {
            batch_size: usize::MAX,
            ..LoaderConfig::default()
        };
        assert_eq!(too_large(Declared { rows: 2, d: 16 }, batch), "batch_size");
    }

    #[test]
    fn config_validation_names_each_field() {
        let ok = LoaderConfig::default();
        assert_eq!(ok.validate(), Ok(()));
        let cases: Vec<(LoaderConfig, ConfigError)> = vec![
            (
                LoaderConfig {
                    batch_size: 0,
                    ..ok.clone()
                },
                ConfigError::ZeroBatchSize,
            ),
            (
                LoaderConfig {
                    buffer_rows: Some(0),
                    ..ok.clone()
                },
                ConfigError::BufferRows(0),
            ),
            (
                LoaderConfig {
                    buffer_bytes: 0,
                    ..ok.clone()
                },
                ConfigError::ZeroBufferBytes,
            ),
            (
                LoaderConfig {
                    chunk_rows: 0,
                    ..ok.clone()
                },
                ConfigError::ZeroChunkRows,
            ),
            (
                LoaderConfig {
                    prefetch: 0,
                    ..ok.clone()
                },
                ConfigError::ZeroPrefetch,
            ),
            (
                LoaderConfig {
                    scale: f32::NAN,
                    ..ok.clone()
                },
                ConfigError::InputScale(f32::NAN),
            ),
            (
                LoaderConfig {
                    scale: -1.0,
                    ..ok.clone()
                },
                ConfigError::InputScale(-1.0),
            ),
        ];
        for (config, expected) in cases {
            let got = config.validate().unwrap_err();
            // NaN ≠ NaN: compare the messages, which name the field.
            assert_eq!(got.to_string(), expected.to_string());
        }
    }

    #[test]
    fn buffer_capacity_follows_budget_and_dataset() {
        let config = LoaderConfig::default();
        assert_eq!(config.buffer_capacity(1 << 30, 768), 1 << 20);
        assert_eq!(
            config.buffer_capacity(1 << 30, 4096),
            (4usize << 30) / (4 * 4096)
        );
        assert_eq!(config.buffer_capacity(1000, 768), 1000);
        let fixed = LoaderConfig {
            buffer_rows: Some(77),
            ..config
        };
        assert_eq!(fixed.buffer_capacity(1 << 30, 768), 77);
    }
}
