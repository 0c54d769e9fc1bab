//! `sparse_autoencoder._native`: the PyO3 half of the Python package `sparse_autoencoder`.
//!
//! The pure-Python wrapper (`python/sparse_autoencoder/__init__.py`) converts its inputs
//! (torch tensors, float16, leading dimensions) to 2-D float32 numpy arrays and builds scipy
//! matrices from what this module returns; this module takes those arrays as borrowed views
//! (a C-contiguous float32 array is never copied), checks every shape and value range before
//! calling into the library, releases the GIL for the heavy work, and turns every library
//! [`sparse_autoencoder::Error`] into `OSError` (a file or directory that cannot be used) or
//! `ValueError` (anything else), with the library's message.

mod errors;
mod run;
mod sae;
mod trainer;

use std::sync::atomic::{AtomicUsize, Ordering};

use pyo3::prelude::*;

/// The address of the data the last encode, decode or training step read its rows from, for
/// the zero-copy test: it equals the caller's array's address only when no copy was made.
static LAST_INPUT_ADDRESS: AtomicUsize = AtomicUsize::new(0);

/// Records `ptr` as the last input's address (see [`LAST_INPUT_ADDRESS`]).
pub(crate) fn record_input<T>(ptr: *const T) {
    LAST_INPUT_ADDRESS.store(ptr as usize, Ordering::Relaxed);
}

/// The address of the rows the last encode, decode or training step read (a debugging hook
/// for the zero-copy test; 0 before any).
#[pyfunction]
fn _last_input_address() -> usize {
    LAST_INPUT_ADDRESS.load(Ordering::Relaxed)
}

/// The native module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<sae::PySae>()?;
    m.add_class::<trainer::PyTrainer>()?;
    m.add_function(wrap_pyfunction!(_last_input_address, m)?)?;
    m.add_function(wrap_pyfunction!(run::train, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
