//! The crate's error type: every fallible library call returns [`Result`].

use crate::config::ConfigError;
use crate::data::DataError;

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
