//! The crate's error type: every fallible library call returns [`Result`]. It also defines
//! [`DataError`] (re-exported by `data`), so that this module imports no module that
//! returns it.

use std::path::PathBuf;

use crate::config::ConfigError;

/// Everything that can go wrong in the library. The `sae` binary maps each to exit status 2.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A hyperparameter is out of range; the message names the field and the fix.
    #[error(transparent)]
    Config(#[from] ConfigError),

    /// Activation data that cannot be used; the message names the file and the fix.
    #[error(transparent)]
    Data(#[from] DataError),

    /// An array does not have the shape the SAE or trainer expects.
    #[error("{what} has shape {got:?}, expected {expected:?}")]
    Shape {
        /// Which array (for example `"batch x_bd"`).
        what: String,
        /// The shape the caller needs to pass.
        expected: Vec<usize>,
        /// The shape that was passed.
        got: Vec<usize>,
    },

    /// A batch or parameter holds NaN or ±Inf.
    #[error("{what} holds a non-finite value (NaN or Inf) at row {row}; clean or skip such rows")]
    NonFinite {
        /// Which array.
        what: String,
        /// Row of the first offending value.
        row: usize,
    },

    /// A number outside the range it must lie in.
    #[error("{what} is {value}, outside {range}; pass values in that range")]
    OutOfRange {
        /// Which number (for example `"firing frequency of latent 3"`).
        what: String,
        /// The value passed.
        value: f64,
        /// The range it must lie in, as text (for example `"[0, 1]"`).
        range: String,
    },

    /// A file or directory of a run (weights, checkpoint, metrics, plots) that cannot be read
    /// or written.
    #[error("{}: {action} failed: {source}; check the path, its permissions and free space", path.display())]
    Io {
        /// The file or directory.
        path: std::path::PathBuf,
        /// What was being done (for example `"writing"`).
        action: &'static str,
        /// What the operating system said.
        source: std::io::Error,
    },

    /// A run directory that cannot be used as asked; the message says why and what to do.
    #[error("{}: {reason}", path.display())]
    RunDir {
        /// The directory.
        path: std::path::PathBuf,
        /// What is wrong and the fix (for example "holds another run; pass --resume or --force").
        reason: String,
    },

    /// A plot that cannot be drawn or written.
    #[error(
        "{}: cannot write the plot ({reason}); check that its directory exists and is writable",
        path.display()
    )]
    Plot {
        /// The image file.
        path: std::path::PathBuf,
        /// What went wrong.
        reason: String,
    },

    /// A file of a run directory that is missing or malformed.
    #[error("{}: {problem}; {fix}", path.display())]
    RunFile {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        problem: String,
        /// What to do about it.
        fix: String,
    },

    /// A device that cannot run here: an unknown name, a build without CUDA, a missing driver,
    /// library or GPU, or a driver error.
    #[error("device {device}: {reason}")]
    Device {
        /// The device as given (`cuda:1`).
        device: String,
        /// What is wrong and what to do.
        reason: String,
    },

    /// A precision this CPU cannot run (`--precision bf16` without bf16 instructions), or one
    /// asked of a device that has no such mode.
    #[error("--precision {precision}: {reason}")]
    Precision {
        /// The precision asked for.
        precision: crate::config::Precision,
        /// What is missing and what to do.
        reason: String,
    },

    /// The caller's stop flag was set before training started or resumed; what was already
    /// on disk (a checkpoint) is left as it was.
    #[error("{}: stopped at the caller's request {when}", path.display())]
    Stopped {
        /// The run directory.
        path: std::path::PathBuf,
        /// When, and what it means for the run (for example "before training started; nothing
        /// to resume").
        when: String,
    },

    /// A run or bench that needs more memory than this process may use.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),

    /// A distributed job that cannot run as started (MPI setup, a batch that does not split
    /// over the ranks); the message says why and what to do.
    #[error("distributed run: {reason}")]
    Distributed {
        /// What is wrong and the fix.
        reason: String,
    },

    /// Another process of a distributed job failed; its message says what and the fix.
    #[error("{message} (on rank {rank})")]
    Peer {
        /// The rank that failed first.
        rank: usize,
        /// Its error, as it printed it.
        message: String,
    },

    /// A batch with no rows.
    #[error("{what} has no rows; pass at least one row")]
    Empty {
        /// Which array.
        what: String,
    },
}

/// Shorthand for `Result<T, sparse_autoencoder::Error>`.
pub type Result<T> = std::result::Result<T, Error>;

/// Checks that `got` equals `expected`, naming `what` in the error.
pub(crate) fn check_shape(what: &str, got: &[usize], expected: &[usize]) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(Error::Shape {
            what: what.to_string(),
            expected: expected.to_vec(),
            got: got.to_vec(),
        })
    }
}

/// The [`Error::Io`] of `action` on `path`, for `map_err`.
pub(crate) fn io_error<'a>(
    path: &'a std::path::Path,
    action: &'static str,
) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

/// `text` with its control characters escaped as Rust writes them (`\u{1b}`, `\n`), so that a
/// file's bytes quoted in an error cannot drive the terminal; quotes are kept as they are.
pub(crate) fn escape_controls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() || is_format(c) {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

/// Unicode's invisible format characters that reorder or hide text (bidirectional overrides,
/// zero-width marks), which a terminal would act on like control characters.
fn is_format(c: char) -> bool {
    matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
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
    /// A stream of row arrays ([`crate::data::RowStream`]) failed or delivered something
    /// unusable.
    #[error("the row stream: {0}")]
    Stream(String),
}
