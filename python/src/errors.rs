//! The library's errors as Python exceptions, and the guard that keeps a Rust panic from
//! reaching Python.

use std::io::ErrorKind;
use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::exceptions::{
    PyFileExistsError, PyFileNotFoundError, PyOSError, PyPermissionError, PyRuntimeError,
    PyValueError,
};
use pyo3::PyErr;
use sparse_autoencoder::data::DataError;
use sparse_autoencoder::Error;

/// The exception for `err`, with the library's message: `OSError` (or its subclasses
/// `FileNotFoundError`, `PermissionError`, `FileExistsError`) when a file or directory cannot
/// be read, written or used as asked, `ValueError` for everything else (configuration,
/// shapes, values, devices).
pub(crate) fn to_py(err: Error) -> PyErr {
    let message = err.to_string();
    match os_kind(&err) {
        Some(Os::NotFound) => PyFileNotFoundError::new_err(message),
        Some(Os::Permission) => PyPermissionError::new_err(message),
        Some(Os::Exists) => PyFileExistsError::new_err(message),
        Some(Os::Other) => PyOSError::new_err(message),
        None => PyValueError::new_err(message),
    }
}

/// Which `OSError` an error is, if it is one.
enum Os {
    NotFound,
    Permission,
    Exists,
    Other,
}

/// The `OSError` subclass of an operating-system error kind.
fn of_kind(kind: ErrorKind) -> Os {
    match kind {
        ErrorKind::NotFound => Os::NotFound,
        ErrorKind::PermissionDenied => Os::Permission,
        ErrorKind::AlreadyExists => Os::Exists,
        _ => Os::Other,
    }
}

/// `Some` for the errors about files and directories on disk, `None` for the rest.
fn os_kind(err: &Error) -> Option<Os> {
    match err {
        Error::Io { source, .. } => Some(of_kind(source.kind())),
        // A directory that is missing, or that holds something else than asked (another run,
        // no SAE).
        Error::RunDir { path, .. } if !path.exists() => Some(Os::NotFound),
        Error::RunDir { .. } | Error::Plot { .. } => Some(Os::Other),
        Error::RunFile { problem, .. } if problem == "missing" => Some(Os::NotFound),
        Error::RunFile { .. } => Some(Os::Other),
        Error::Data(data) => match data {
            DataError::Io { source, .. } => Some(of_kind(source.kind())),
            DataError::ReadFailed { cause, .. } => Some(of_kind(cause.kind())),
            DataError::NoFiles { .. } => Some(Os::NotFound),
            DataError::NotAFile { .. }
            | DataError::NotNpy { .. }
            | DataError::Shrunk { .. }
            | DataError::Truncated { .. } => Some(Os::Other),
            _ => None,
        },
        _ => None,
    }
}

/// Runs `f`, turning a panic (a bug: every input is checked before the library sees it) into
/// a `RuntimeError` rather than letting it unwind into Python.
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, PyErr>) -> Result<T, PyErr> {
    caught(what, f).unwrap_or_else(Err)
}

/// [`guarded`], telling a panic (the outer `Err`) from `f`'s own error.
pub(crate) fn caught<T>(
    what: &str,
    f: impl FnOnce() -> Result<T, PyErr>,
) -> Result<Result<T, PyErr>, PyErr> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        let detail = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("no message");
        PyRuntimeError::new_err(format!(
            "internal error in sparse_autoencoder during {what}: {detail}; please report it"
        ))
    })
}

/// A `ValueError` with `message`.
pub(crate) fn value_error(message: impl Into<String>) -> PyErr {
    PyValueError::new_err(message.into())
}
