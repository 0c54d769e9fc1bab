//! The C ABI of `sparse_autoencoder`: load an SAE directory, encode rows of activations to
//! sparse codes (CSR), and decode codes back to activations, from C, C++, Julia or anything
//! else that calls C. Built as `libsae.so` and `libsae.a`; `include/sae.h` (generated from this
//! file by cbindgen, see `cbindgen.toml`) declares everything here.
//!
//! Conventions, the same for every function:
//!
//! - A function that can fail returns an `int` status: `SAE_OK` (0), or one of the
//!   `SAE_ERR_*` codes. The message of the failure (the library's own text, which names the
//!   file, the option or the array and says what to do) is then `sae_last_error`'s.
//! - No panic unwinds into the caller: each body runs under `catch_unwind`, and a panic (a bug
//!   in this crate or the library) becomes `SAE_ERR_PANIC` with its message.
//! - Null pointers are refused with `SAE_ERR_NULL_POINTER` (or ignored by the `*_free`
//!   functions, and read as 0 by the plain getters), never dereferenced.
//! - Handles (`sae_t`, `sae_codes_t`, `sae_workspace_t`) are opaque and freed by their own
//!   `*_free`. A `const sae_t*` may be used by several threads at once (encoding reads the
//!   SAE only); a `sae_workspace_t` by one thread at a time.
//! - Arrays are row-major `float` (f32); codes are CSR as scipy's `csr_array` holds them:
//!   row `b`'s latents are `indices[indptr[b]..indptr[b + 1]]`, with their values at the same
//!   positions of `values`; `indptr` is `size_t`, `indices` `uint32_t`.
//!
//! Encoding runs on the CPU through rayon's global thread pool (every core unless the
//! environment sets `RAYON_NUM_THREADS`); the same SAE and rows give the same codes, bit for
//! bit, as `Sae::encode` in Rust and `sae encode` on the command line.

#![warn(missing_docs)]

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::ptr;

use ndarray::{ArrayView2, ArrayViewMut2};
use sparse_autoencoder::backend::Cpu;
use sparse_autoencoder::{
    Architecture, Codes, DataError, EncodeBuffers, Error, Precision, Sae, SparseCodes,
};

/// Success.
pub const SAE_OK: c_int = 0;
/// A pointer argument that must not be null was null.
pub const SAE_ERR_NULL_POINTER: c_int = 1;
/// An argument that is unusable as given: a path that is not UTF-8 (on systems whose paths
/// are not bytes), or sizes whose product overflows the address space.
pub const SAE_ERR_INVALID_ARGUMENT: c_int = 2;
/// A file or directory that is missing, unreadable or malformed (the message names it).
pub const SAE_ERR_FILE: c_int = 3;
/// An array of the wrong shape: a row width other than the SAE's d_model, no rows, codes of
/// another number of latents, CSR arrays whose lengths disagree.
pub const SAE_ERR_SHAPE: c_int = 4;
/// An input holding NaN or ±Inf (the message names the row).
pub const SAE_ERR_NON_FINITE: c_int = 5;
/// A number outside its range: a CSR offset out of order or past the end, a latent index not
/// below the SAE's dict_size (the message names the entry).
pub const SAE_ERR_OUT_OF_RANGE: c_int = 6;
/// A configuration the library refuses (in `sae.json`, for example).
pub const SAE_ERR_CONFIG: c_int = 7;
/// Something this machine or build cannot do (bf16 on a CPU without AVX-512 BF16).
pub const SAE_ERR_UNSUPPORTED: c_int = 8;
/// A panic inside the library, caught at the boundary: a bug; please report the message.
pub const SAE_ERR_PANIC: c_int = 9;
/// Any other failure of the library (the message says what).
pub const SAE_ERR_OTHER: c_int = 10;

/// A loaded SAE (`sae_t` in C). Made by `sae_load`, freed by `sae_free`.
pub struct SaeHandle {
    sae: Sae,
}

/// Sparse codes that `sae_encode` made and the caller owns (`sae_codes_t` in C), CSR arrays
/// read through `sae_codes_indptr`, `sae_codes_indices`, `sae_codes_values` or
/// `sae_codes_view`; freed by `sae_codes_free`.
pub struct SaeCodes {
    codes: Codes,
}

/// The workspace of `sae_encode_into` (`sae_workspace_t` in C): the encoder's buffers and
/// the last codes, kept from call to call so that encoding batch after batch of at most the
/// same size allocates nothing. One workspace serves any SAE; one thread at a time.
pub struct SaeWorkspace {
    buffers: EncodeBuffers,
}

/// A borrowed view of CSR codes (`sae_csr_t` in C): `n_rows + 1` offsets in `indptr`, and
/// `nnz` latent indices and values. Valid while the codes it views are: until
/// `sae_codes_free` for `sae_codes_view`'s, until the next `sae_encode_into` with the
/// same workspace (or `sae_workspace_free`) for that function's.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SaeCsr {
    /// Rows encoded.
    pub n_rows: usize,
    /// Latents of the SAE (its dict_size): every index is below it.
    pub n_latents: usize,
    /// Active codes in all rows: `indptr[n_rows]`.
    pub nnz: usize,
    /// Row offsets, `n_rows + 1` of them, starting at 0 and never decreasing.
    pub indptr: *const usize,
    /// Latent of each active code, `nnz` of them, ascending within a row.
    pub indices: *const u32,
    /// Value of each active code, `nnz` of them, positive.
    pub values: *const f32,
}

/// Why a call failed: its status code and message.
struct Failure {
    code: c_int,
    message: String,
}

impl Failure {
    fn new(code: c_int, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }

    fn null(name: &str) -> Self {
        Failure::new(
            SAE_ERR_NULL_POINTER,
            format!("{name} is a null pointer; pass a valid pointer"),
        )
    }
}

impl From<Error> for Failure {
    fn from(err: Error) -> Self {
        let code = match &err {
            Error::Config(_) => SAE_ERR_CONFIG,
            Error::Shape { .. } | Error::Empty { .. } => SAE_ERR_SHAPE,
            Error::NonFinite { .. } | Error::Data(DataError::NonFinite { .. }) => {
                SAE_ERR_NON_FINITE
            }
            Error::OutOfRange { .. } => SAE_ERR_OUT_OF_RANGE,
            Error::Io { .. } | Error::RunDir { .. } | Error::RunFile { .. } | Error::Data(_) => {
                SAE_ERR_FILE
            }
            Error::Precision { .. } | Error::Device { .. } => SAE_ERR_UNSUPPORTED,
            _ => SAE_ERR_OTHER,
        };
        Failure::new(code, err.to_string())
    }
}

thread_local! {
    /// This thread's last failure message, NUL-terminated.
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Records `message` as this thread's last error.
fn set_last_error(message: &str) {
    // A message never holds NUL (the library escapes control characters of file contents),
    // but a CString must not, whatever happens.
    let message = CString::new(message.replace('\0', "\\0")).expect("no NUL left");
    LAST_ERROR.with(|last| *last.borrow_mut() = message);
}

/// The text of a caught panic's payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into());
    format!("internal error in sparse-autoencoder ({what}); this is a bug, please report it")
}

/// Runs `body`, turning its failure or panic into a status code and this thread's last error.
fn guard(body: impl FnOnce() -> Result<(), Failure>) -> c_int {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => SAE_OK,
        Ok(Err(failure)) => {
            set_last_error(&failure.message);
            failure.code
        }
        Err(payload) => {
            set_last_error(&panic_message(&*payload));
            SAE_ERR_PANIC
        }
    }
}

/// Runs an infallible `body`, giving `fallback` should it panic.
fn quiet<T>(fallback: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(fallback)
}

/// `*ptr`, or the null-pointer failure naming `name`.
///
/// # Safety
/// `ptr` is null or points to a live `T`.
unsafe fn deref<'a, T>(ptr: *const T, name: &str) -> Result<&'a T, Failure> {
    ptr.as_ref().ok_or_else(|| Failure::null(name))
}

/// `n_rows × width` elements as a count, or the failure saying the product overflows.
fn elements<T>(n_rows: usize, width: usize, what: &str) -> Result<usize, Failure> {
    n_rows
        .checked_mul(width)
        .filter(|&n| {
            n.checked_mul(std::mem::size_of::<T>())
                .is_some_and(|b| b <= isize::MAX as usize)
        })
        .ok_or_else(|| {
            Failure::new(
                SAE_ERR_INVALID_ARGUMENT,
                format!("{what}: {n_rows} rows of {width} are more than memory can hold"),
            )
        })
}

/// The `len` elements at `ptr` (which may be null when `len` is 0).
///
/// # Safety
/// When `len > 0`, `ptr` is null or points to `len` readable `T`s.
unsafe fn slice<'a, T>(ptr: *const T, len: usize, name: &str) -> Result<&'a [T], Failure> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(Failure::null(name));
    }
    Ok(std::slice::from_raw_parts(ptr, len))
}

/// The path a C string names: its bytes as they are on Unix, UTF-8 elsewhere.
fn path_of(dir: &CStr) -> Result<PathBuf, Failure> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(PathBuf::from(std::ffi::OsStr::from_bytes(dir.to_bytes())))
    }
    #[cfg(not(unix))]
    {
        dir.to_str().map(PathBuf::from).map_err(|_| {
            Failure::new(
                SAE_ERR_INVALID_ARGUMENT,
                format!(
                    "the path {:?} is not UTF-8; pass it UTF-8 encoded",
                    dir.to_string_lossy()
                ),
            )
        })
    }
}

/// The message of this thread's last failed call, NUL-terminated UTF-8 (an empty string
/// before any call failed). The library's text names the file, option or array and the fix,
/// for example `/data/sae: no such directory; give the run directory `sae train` wrote`.
/// Successful calls leave it as it is. The pointer stays valid until the next failing call on
/// this thread; copy the text to keep it longer. Never null.
#[no_mangle]
pub extern "C" fn sae_last_error() -> *const c_char {
    quiet(c"".as_ptr(), || {
        LAST_ERROR.with(|last| last.borrow().as_ptr())
    })
}

/// The version of this library (`"0.1.0"`), a static NUL-terminated string.
#[no_mangle]
pub extern "C" fn sae_version() -> *const c_char {
    c"0.1.0".as_ptr()
}

/// Loads the SAE that `sae train` or `Sae::save` wrote into the directory `dir` (one holding
/// `sae.json` and `sae.safetensors`; for a sweep, one SAE's subdirectory) into `*out`.
/// On failure `*out` is set to null and the status is `SAE_ERR_FILE` for a missing
/// directory or file, malformed JSON or tensors, `SAE_ERR_CONFIG` for a configuration the
/// library refuses, `SAE_ERR_NULL_POINTER` for a null argument; the message names the path.
///
/// # Safety
/// `dir` is null or a NUL-terminated string; `out` is null or points to writable storage for
/// a pointer.
#[no_mangle]
pub unsafe extern "C" fn sae_load(dir: *const c_char, out: *mut *mut SaeHandle) -> c_int {
    guard(|| {
        if out.is_null() {
            return Err(Failure::null("out"));
        }
        *out = ptr::null_mut();
        if dir.is_null() {
            return Err(Failure::null("dir"));
        }
        let path = path_of(CStr::from_ptr(dir))?;
        let sae = Sae::load(&path)?;
        *out = Box::into_raw(Box::new(SaeHandle { sae }));
        Ok(())
    })
}

/// Frees an SAE from `sae_load`; null is ignored.
///
/// # Safety
/// `sae` is null or a pointer from `sae_load` not freed before, and no other thread uses it.
#[no_mangle]
pub unsafe extern "C" fn sae_free(sae: *mut SaeHandle) {
    if !sae.is_null() {
        quiet((), || drop(Box::from_raw(sae)));
    }
}

/// D, the width of the rows the SAE encodes and of its reconstructions (0 for null).
///
/// # Safety
/// `sae` is null or a live pointer from `sae_load`.
#[no_mangle]
pub unsafe extern "C" fn sae_d_model(sae: *const SaeHandle) -> usize {
    quiet(0, || sae.as_ref().map_or(0, |h| h.sae.config().d_model))
}

/// F, the number of latents: every code's index is below it (0 for null).
///
/// # Safety
/// `sae` is null or a live pointer from `sae_load`.
#[no_mangle]
pub unsafe extern "C" fn sae_dict_size(sae: *const SaeHandle) -> usize {
    quiet(0, || sae.as_ref().map_or(0, |h| h.sae.config().dict_size))
}

/// The k of a TopK, BatchTopK or Matryoshka SAE (active latents per row, exactly for TopK, on
/// average for the others); 0 for ReLU and JumpReLU, and for null.
///
/// # Safety
/// `sae` is null or a live pointer from `sae_load`.
#[no_mangle]
pub unsafe extern "C" fn sae_k(sae: *const SaeHandle) -> usize {
    quiet(0, || {
        sae.as_ref()
            .and_then(|h| h.sae.config().arch.k())
            .unwrap_or(0)
    })
}

/// The architecture as `sae.json` and `--arch` spell it: `"relu"`, `"topk"`, `"batchtopk"`,
/// `"jumprelu"` or `"matryoshka"`; a static NUL-terminated string (`""` for null).
///
/// # Safety
/// `sae` is null or a live pointer from `sae_load`.
#[no_mangle]
pub unsafe extern "C" fn sae_arch(sae: *const SaeHandle) -> *const c_char {
    quiet(c"".as_ptr(), || {
        let Some(handle) = sae.as_ref() else {
            return c"".as_ptr();
        };
        match handle.sae.config().arch {
            Architecture::Relu { .. } => c"relu",
            Architecture::TopK { .. } => c"topk",
            Architecture::BatchTopK { .. } => c"batchtopk",
            Architecture::JumpRelu => c"jumprelu",
            Architecture::Matryoshka { .. } => c"matryoshka",
        }
        .as_ptr()
    })
}

/// Sets whether the encoder GEMM rounds its inputs to bf16 (with f32 accumulation; faster on
/// CPUs with AVX-512 BF16, and codes within bf16 rounding of f32's) or runs in f32, the
/// default. `SAE_ERR_UNSUPPORTED` on a CPU without AVX-512 BF16, the SAE left in f32.
///
/// # Safety
/// `sae` is null or a live pointer from `sae_load` that no other thread uses meanwhile.
#[no_mangle]
pub unsafe extern "C" fn sae_set_bf16(sae: *mut SaeHandle, enable: bool) -> c_int {
    guard(|| {
        let handle = sae.as_mut().ok_or_else(|| Failure::null("sae"))?;
        let precision = if enable {
            Precision::Bf16
        } else {
            Precision::F32
        };
        handle.sae.set_precision(precision)?;
        Ok(())
    })
}

/// The `n_rows × d_model` row-major rows at `x` as an array checked against the SAE: the
/// shape and finiteness checks are the library's.
///
/// # Safety
/// As `sae_encode`'s `x`.
unsafe fn rows<'a>(
    x: *const f32,
    n_rows: usize,
    d_model: usize,
) -> Result<ArrayView2<'a, f32>, Failure> {
    let n = elements::<f32>(n_rows, d_model, "x")?;
    let x = slice(x, n, "x")?;
    Ok(ArrayView2::from_shape((n_rows, d_model), x).expect("n_rows × d_model elements"))
}

/// Encodes the `n_rows` rows of `d_model` floats at `x` (row-major, `n_rows × d_model`) into
/// new codes, `*out`, which the caller frees with `sae_codes_free`: ReLU keeps every
/// positive code, TopK the k largest of each row, BatchTopK and Matryoshka those above the
/// learned threshold θ (or, for an SAE saved before θ was learned, the k·n_rows largest of
/// these rows), JumpReLU those above each latent's threshold.
///
/// On failure `*out` is null and the status is `SAE_ERR_SHAPE` when `d_model` is not the
/// SAE's or `n_rows` is 0, `SAE_ERR_NON_FINITE` when a row holds NaN or ±Inf (the message
/// names the first such row), `SAE_ERR_NULL_POINTER` for a null `sae`, `x` or `out`.
///
/// # Safety
/// `sae` is null or a live pointer from `sae_load`; `x` is null or points to
/// `n_rows × d_model` readable floats; `out` is null or points to writable storage for a
/// pointer.
#[no_mangle]
pub unsafe extern "C" fn sae_encode(
    sae: *const SaeHandle,
    x: *const f32,
    n_rows: usize,
    d_model: usize,
    out: *mut *mut SaeCodes,
) -> c_int {
    guard(|| {
        if out.is_null() {
            return Err(Failure::null("out"));
        }
        *out = ptr::null_mut();
        let handle = deref(sae, "sae")?;
        let x_bd = rows(x, n_rows, d_model)?;
        let codes = handle.sae.encode(&Cpu, x_bd)?;
        *out = Box::into_raw(Box::new(SaeCodes { codes }));
        Ok(())
    })
}

/// Frees codes from `sae_encode`; null is ignored.
///
/// # Safety
/// `codes` is null or a pointer from `sae_encode` not freed before.
#[no_mangle]
pub unsafe extern "C" fn sae_codes_free(codes: *mut SaeCodes) {
    if !codes.is_null() {
        quiet((), || drop(Box::from_raw(codes)));
    }
}

/// The rows of `codes` (0 for null).
///
/// # Safety
/// `codes` is null or a live pointer from `sae_encode`.
#[no_mangle]
pub unsafe extern "C" fn sae_codes_n_rows(codes: *const SaeCodes) -> usize {
    quiet(0, || codes.as_ref().map_or(0, |c| c.codes.n_rows()))
}

/// The active codes of all rows of `codes`: the length of its indices and values (0 for null).
///
/// # Safety
/// `codes` is null or a live pointer from `sae_encode`.
#[no_mangle]
pub unsafe extern "C" fn sae_codes_nnz(codes: *const SaeCodes) -> usize {
    quiet(0, || codes.as_ref().map_or(0, |c| c.codes.nnz()))
}

/// The row offsets of `codes`, `n_rows + 1` of them (null for null), valid until
/// `sae_codes_free`.
///
/// # Safety
/// `codes` is null or a live pointer from `sae_encode`.
#[no_mangle]
pub unsafe extern "C" fn sae_codes_indptr(codes: *const SaeCodes) -> *const usize {
    quiet(ptr::null(), || {
        codes
            .as_ref()
            .map_or(ptr::null(), |c| c.codes.indptr.as_ptr())
    })
}

/// The latent of each active code of `codes`, `nnz` of them, ascending within each row (null
/// for null), valid until `sae_codes_free`.
///
/// # Safety
/// `codes` is null or a live pointer from `sae_encode`.
#[no_mangle]
pub unsafe extern "C" fn sae_codes_indices(codes: *const SaeCodes) -> *const u32 {
    quiet(ptr::null(), || {
        codes
            .as_ref()
            .map_or(ptr::null(), |c| c.codes.indices.as_ptr())
    })
}

/// The value of each active code of `codes`, `nnz` of them (null for null), valid until
/// `sae_codes_free`.
///
/// # Safety
/// `codes` is null or a live pointer from `sae_encode`.
#[no_mangle]
pub unsafe extern "C" fn sae_codes_values(codes: *const SaeCodes) -> *const f32 {
    quiet(ptr::null(), || {
        codes
            .as_ref()
            .map_or(ptr::null(), |c| c.codes.values.as_ptr())
    })
}

/// The CSR view of `sparse`.
fn csr_of(sparse: SparseCodes<'_>) -> SaeCsr {
    SaeCsr {
        n_rows: sparse.n_rows(),
        n_latents: sparse.n_latents(),
        nnz: sparse.nnz(),
        indptr: sparse.indptr().as_ptr(),
        indices: sparse.indices().as_ptr(),
        values: sparse.values().as_ptr(),
    }
}

/// The empty view, for null arguments: no rows, null arrays.
const EMPTY_CSR: SaeCsr = SaeCsr {
    n_rows: 0,
    n_latents: 0,
    nnz: 0,
    indptr: ptr::null(),
    indices: ptr::null(),
    values: ptr::null(),
};

/// All of `codes` as one `sae_csr_t` view (no rows and null arrays for null), valid until
/// `sae_codes_free`.
///
/// # Safety
/// `codes` is null or a live pointer from `sae_encode`.
#[no_mangle]
pub unsafe extern "C" fn sae_codes_view(codes: *const SaeCodes) -> SaeCsr {
    quiet(EMPTY_CSR, || {
        codes.as_ref().map_or(EMPTY_CSR, |c| csr_of(c.codes.view()))
    })
}

/// Makes an empty workspace for `sae_encode_into` in `*out`; the first encoding sizes it.
/// Freed by `sae_workspace_free`.
///
/// # Safety
/// `out` is null or points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn sae_workspace_new(out: *mut *mut SaeWorkspace) -> c_int {
    guard(|| {
        if out.is_null() {
            return Err(Failure::null("out"));
        }
        *out = Box::into_raw(Box::new(SaeWorkspace {
            buffers: EncodeBuffers::new(),
        }));
        Ok(())
    })
}

/// Frees a workspace from `sae_workspace_new` (and the codes it holds); null is ignored.
///
/// # Safety
/// `workspace` is null or a pointer from `sae_workspace_new` not freed before, and no other
/// thread uses it.
#[no_mangle]
pub unsafe extern "C" fn sae_workspace_free(workspace: *mut SaeWorkspace) {
    if !workspace.is_null() {
        quiet((), || drop(Box::from_raw(workspace)));
    }
}

/// `sae_encode` into `workspace`, the caller's buffers kept from call to call: the same
/// codes, bit for bit, written to `*out` as a view into the workspace, valid until the next
/// call with this workspace or `sae_workspace_free`. Once the workspace has held a batch at
/// least as large, encoding allocates nothing in this library (unless a batch has more codes
/// than any before it). The errors are `sae_encode`'s; on failure `*out` is the empty view.
///
/// # Safety
/// As `sae_encode`'s `sae` and `x`; `workspace` is null or a live pointer from
/// `sae_workspace_new` that no other thread uses meanwhile; `out` is null or points to a
/// writable `sae_csr_t`.
#[no_mangle]
pub unsafe extern "C" fn sae_encode_into(
    sae: *const SaeHandle,
    x: *const f32,
    n_rows: usize,
    d_model: usize,
    workspace: *mut SaeWorkspace,
    out: *mut SaeCsr,
) -> c_int {
    guard(|| {
        let out = out.as_mut().ok_or_else(|| Failure::null("out"))?;
        *out = EMPTY_CSR;
        let handle = deref(sae, "sae")?;
        let workspace = workspace
            .as_mut()
            .ok_or_else(|| Failure::null("workspace"))?;
        let x_bd = rows(x, n_rows, d_model)?;
        let codes = handle.sae.encode_into(&Cpu, x_bd, &mut workspace.buffers)?;
        *out = csr_of(codes);
        Ok(())
    })
}

/// Decodes CSR codes of `n_rows` rows into `out_x_hat`, `n_rows × d_model` row-major floats,
/// every one overwritten: x̂ = codes·W_dec + b_dec, the same bits as `Sae::decode`. The codes
/// are `indptr` (`n_rows + 1` offsets) and `indptr[n_rows]` entries of `indices` and
/// `values`, as `sae_encode` gives them or as another tool made them (a latent listed twice
/// in a row counts twice).
///
/// Everything is checked before any code is read: `SAE_ERR_OUT_OF_RANGE` when `indptr`
/// does not start at 0 or decreases, or an index is not below dict_size (the message names
/// the entry), `SAE_ERR_NON_FINITE` for a NaN or infinite value, `SAE_ERR_NULL_POINTER`
/// for a null array that must hold something; `out_x_hat` is then left as it was.
///
/// # Safety
/// `sae` is null or a live pointer from `sae_load`; `indptr` is null or points to
/// `n_rows + 1` readable offsets; `indices` and `values` are null or point to `indptr[n_rows]`
/// readable entries each; `out_x_hat` is null or points to `n_rows × d_model` writable floats
/// that none of the inputs overlap.
#[no_mangle]
pub unsafe extern "C" fn sae_decode(
    sae: *const SaeHandle,
    indptr: *const usize,
    indices: *const u32,
    values: *const f32,
    n_rows: usize,
    out_x_hat: *mut f32,
) -> c_int {
    guard(|| {
        let handle = deref(sae, "sae")?;
        let config = handle.sae.config();
        let offsets = n_rows.checked_add(1).ok_or_else(|| {
            Failure::new(
                SAE_ERR_INVALID_ARGUMENT,
                "n_rows is SIZE_MAX; pass the rows' count",
            )
        })?;
        let indptr = slice(indptr, offsets, "indptr")?;
        let nnz = indptr[n_rows];
        elements::<f32>(nnz, 1, "indices and values")?;
        let indices = slice(indices, nnz, "indices")?;
        let values = slice(values, nnz, "values")?;
        let codes = SparseCodes::new(config.dict_size, indptr, indices, values)?;
        let n = elements::<f32>(n_rows, config.d_model, "out_x_hat")?;
        if n > 0 && out_x_hat.is_null() {
            return Err(Failure::null("out_x_hat"));
        }
        let out: &mut [f32] = if n == 0 {
            &mut []
        } else {
            std::slice::from_raw_parts_mut(out_x_hat, n)
        };
        let out = ArrayViewMut2::from_shape((n_rows, config.d_model), out)
            .expect("n_rows × d_model elements");
        handle.sae.decode_into(codes, out)?;
        Ok(())
    })
}

/// A `const sae_t*` is shared between threads: the SAE must be `Sync`.
const _: () = {
    const fn sync<T: Sync>() {}
    sync::<Sae>();
};

#[cfg(test)]
mod tests {
    use super::*;

    fn last_error() -> String {
        unsafe { CStr::from_ptr(sae_last_error()) }
            .to_str()
            .unwrap()
            .to_string()
    }

    #[test]
    fn panics_become_an_error_code_and_message() {
        let code = guard(|| panic!("boom {}", 7));
        assert_eq!(code, SAE_ERR_PANIC);
        assert!(last_error().contains("boom 7"), "{}", last_error());
        assert_eq!(quiet(5, || panic!("quiet")), 5);
    }

    #[test]
    fn null_pointers_are_refused() {
        unsafe {
            let mut sae = ptr::null_mut();
            assert_eq!(sae_load(ptr::null(), &mut sae), SAE_ERR_NULL_POINTER);
            assert!(last_error().contains("dir"), "{}", last_error());
            assert_eq!(
                sae_load(c"x".as_ptr(), ptr::null_mut()),
                SAE_ERR_NULL_POINTER
            );
            let mut codes = ptr::null_mut();
            let x = [0.0f32; 4];
            assert_eq!(
                sae_encode(ptr::null(), x.as_ptr(), 1, 4, &mut codes),
                SAE_ERR_NULL_POINTER
            );
            assert!(codes.is_null());
            assert_eq!(sae_d_model(ptr::null()), 0);
            assert_eq!(sae_codes_nnz(ptr::null()), 0);
            assert!(sae_codes_indptr(ptr::null()).is_null());
            assert_eq!(sae_codes_view(ptr::null()).n_rows, 0);
            assert_eq!(CStr::from_ptr(sae_arch(ptr::null())).to_bytes(), b"");
            sae_free(ptr::null_mut());
            sae_codes_free(ptr::null_mut());
            sae_workspace_free(ptr::null_mut());
        }
    }

    #[test]
    fn sizes_that_overflow_are_refused_before_any_read() {
        let failure = elements::<f32>(usize::MAX / 2, 3, "x").err().unwrap();
        assert_eq!(failure.code, SAE_ERR_INVALID_ARGUMENT);
        assert_eq!(elements::<f32>(3, 4, "x").ok(), Some(12));
    }

    #[test]
    fn library_errors_map_to_their_codes() {
        let shape = Error::Shape {
            what: "batch x_bd".into(),
            expected: vec![1, 4],
            got: vec![1, 3],
        };
        assert_eq!(Failure::from(shape).code, SAE_ERR_SHAPE);
        let non_finite = Error::NonFinite {
            what: "batch x_bd".into(),
            row: 2,
        };
        let failure = Failure::from(non_finite);
        assert_eq!(failure.code, SAE_ERR_NON_FINITE);
        assert!(failure.message.contains("row 2"));
    }

    #[test]
    fn messages_with_nul_survive() {
        set_last_error("a\0b");
        assert_eq!(last_error(), "a\\0b");
    }
}
