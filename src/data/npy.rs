//! `.npy` shards, read on demand with positioned reads: header checks, path expansion (files,
//! directories, globs) and conversion of float16/float32/float64 rows to f32.

use std::fs::File;
use std::path::{Path, PathBuf};

use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::npy_header::{self, escape, Descr, MAX_HEADER, MAX_PREFIX};
use super::{DataError, Source};

/// Element types a shard may hold; all are read as f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    /// `<f2`, converted while batching.
    F16,
    /// `<f4`, copied.
    F32,
    /// `<f8`, rounded to f32.
    F64,
}

impl Dtype {
    fn size(self) -> usize {
        match self {
            Dtype::F16 => 2,
            Dtype::F32 => 4,
            Dtype::F64 => 8,
        }
    }
}

/// What a header's descr is to sae.
enum Kind {
    Read(Dtype),
    /// A dtype, but not one sae reads (for `DataError::Dtype`).
    Unsupported(String),
    /// Not a numpy type string at all: the header is broken.
    NotAType(String),
}

fn kind(descr: &Descr) -> Kind {
    match descr {
        Descr::Plain(s) => match s.as_str() {
            "<f2" => Kind::Read(Dtype::F16),
            "<f4" => Kind::Read(Dtype::F32),
            "<f8" => Kind::Read(Dtype::F64),
            // An order mark, a kind and its size, perhaps units: `>i8`, `|O`, `<M8[ns]`.
            _ if s.starts_with(['<', '>', '|', '='])
                && s.len() > 1
                && s[1..]
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'[' || b == b']') =>
            {
                Kind::Unsupported(escape(s))
            }
            _ => Kind::NotAType(escape(s)),
        },
        Descr::Structured(text) => Kind::Unsupported(escape(text)),
    }
}

/// Most bytes converted per positioned read of a float16 or float64 shard.
const SCRATCH_BYTES: usize = 16 << 10;

/// One open file. Rows are read with positioned reads (`pread`), not through a memory map: a
/// map of a file that another process truncates faults (SIGBUS) on the first access past the
/// new end and kills the process, where a read returns an error.
struct Shard {
    path: PathBuf,
    file: File,
    /// Byte offset of the data, right after the header.
    offset: u64,
    /// Where the data the header describes ends: the file must stay at least this long.
    end: u64,
    dtype: Dtype,
    /// Shape as saved; rows are all axes but the last.
    shape: Vec<u64>,
    rows: u64,
    d_model: usize,
}

impl Shard {
    fn open(path: &Path) -> Result<Shard, DataError> {
        let io = |source| DataError::Io {
            path: path.to_path_buf(),
            source,
        };
        let not_npy = |reason: String| DataError::NotNpy {
            path: path.to_path_buf(),
            reason,
        };
        // Opening a FIFO for reading waits for a writer, forever: look before opening, and
        // open without waiting in case the path changes in between.
        refuse_non_regular(path, &std::fs::metadata(path).map_err(io)?)?;
        let file = open_nonblocking(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        refuse_non_regular(path, &meta)?;
        let len = meta.len();

        // Every size the header states is checked against the file before it is read or
        // allocated for.
        let mut head = [0u8; MAX_PREFIX];
        let head = &mut head[..len.min(MAX_PREFIX as u64) as usize];
        read_exact_at(&file, head, 0).map_err(io)?;
        let prefix = npy_header::parse_prefix(head).map_err(not_npy)?;
        let offset = prefix.data_start();
        if offset > len {
            return Err(not_npy(format!(
                "the header claims to end at byte {offset} but the file has {len} bytes"
            )));
        }
        if prefix.text_len > MAX_HEADER {
            return Err(not_npy(format!(
                "its header is {} bytes; sae reads headers of up to {MAX_HEADER} bytes (numpy \
                 writes under 200 for the dtypes sae reads)",
                prefix.text_len
            )));
        }
        let mut text = vec![0; prefix.text_len as usize];
        read_exact_at(&file, &mut text, prefix.text_start).map_err(io)?;
        let dtype_error = |dtype| DataError::Dtype {
            path: path.to_path_buf(),
            dtype,
        };
        let header = match npy_header::parse_header(&text, prefix.utf8) {
            Ok(header) => header,
            // A broken header that names a dtype sae does not read blames the dtype: the file
            // is no use either way. One naming a dtype sae reads is broken elsewhere, and
            // blaming the dtype would send the user after the wrong problem.
            Err(err) => {
                return Err(match err.descr.as_ref().map(kind) {
                    Some(Kind::Unsupported(dtype)) => dtype_error(dtype),
                    _ => not_npy(format!("bad header: {}", err.reason)),
                })
            }
        };
        let dtype = match kind(&header.descr) {
            Kind::Read(dtype) => dtype,
            Kind::Unsupported(dtype) => return Err(dtype_error(dtype)),
            Kind::NotAType(descr) => {
                return Err(not_npy(format!(
                    "bad header: its descr '{descr}' is not a numpy type string such as '<f4'"
                )))
            }
        };
        let shape = header.shape;
        if shape.is_empty() {
            return Err(DataError::Scalar {
                path: path.to_path_buf(),
            });
        }
        // A 1-dimensional array is a single row; Fortran order only matters with two axes or
        // more.
        if header.fortran_order && shape.len() > 1 {
            return Err(DataError::FortranOrder {
                path: path.to_path_buf(),
            });
        }
        if shape.contains(&0) {
            return Err(DataError::NoRows {
                path: path.to_path_buf(),
                shape,
            });
        }
        let expected = shape
            .iter()
            .try_fold(dtype.size() as u64, |acc, &n| acc.checked_mul(n))
            .ok_or_else(|| not_npy(format!("bad header: shape {shape:?} overflows")))?;
        let actual = len - offset;
        if actual < expected {
            return Err(DataError::Truncated {
                path: path.to_path_buf(),
                expected,
                actual,
            });
        }
        // Both fit: their product is at most `expected`, which fits in the file.
        let rows = shape[..shape.len() - 1].iter().product();
        let d_model = usize::try_from(shape[shape.len() - 1])
            .map_err(|_| not_npy(format!("bad header: shape {shape:?} is too wide")))?;
        Ok(Shard {
            path: path.to_path_buf(),
            file,
            offset,
            end: offset + expected,
            dtype,
            shape,
            rows,
            d_model,
        })
    }

    /// Converts rows `row..` into `out_nd`.
    fn read(&self, row: u64, out_nd: &mut [f32]) -> Result<(), DataError> {
        let size = self.dtype.size();
        // In range: callers stay within `rows`, and `end` fits in the file's length.
        let start = self.offset + row * (self.d_model * size) as u64;
        if self.dtype == Dtype::F32 {
            // Straight into the output: float32 needs no conversion.
            self.read_at(bytemuck::cast_slice_mut(out_nd), start)?;
            if cfg!(target_endian = "big") {
                for v in out_nd.iter_mut() {
                    *v = f32::from_bits(u32::from_le(v.to_bits()));
                }
            }
            return Ok(());
        }
        // As long as the read needs (the hot path reads one row), 8-byte aligned so float16
        // bits convert in place (F16C); zeroing a fixed 16 KiB per row cost more than the read.
        let len = (out_nd.len() * size).min(SCRATCH_BYTES);
        let mut scratch = vec![0u64; len.div_ceil(8)];
        let scratch: &mut [u8] = bytemuck::cast_slice_mut(&mut scratch);
        let per_read = SCRATCH_BYTES / size;
        for (i, part) in out_nd.chunks_mut(per_read).enumerate() {
            let bytes = &mut scratch[..part.len() * size];
            self.read_at(bytes, start + (i * per_read * size) as u64)?;
            convert(self.dtype, bytes, part);
        }
        Ok(())
    }

    /// Fills `buf` from byte `at`; a file that shrank since it was opened is
    /// [`DataError::Shrunk`].
    fn read_at(&self, buf: &mut [u8], at: u64) -> Result<(), DataError> {
        read_exact_at(&self.file, buf, at).map_err(|cause| match self.file.metadata() {
            Ok(meta) if meta.len() < self.end => DataError::Shrunk {
                path: self.path.clone(),
                len: meta.len(),
                needed: self.end,
            },
            _ => DataError::ReadFailed {
                path: self.path.clone(),
                offset: at,
                cause,
            },
        })
    }
}

/// Anything but a regular file (a directory, a FIFO, a socket, a device) is refused.
fn refuse_non_regular(path: &Path, meta: &std::fs::Metadata) -> Result<(), DataError> {
    let file_type = meta.file_type();
    if file_type.is_file() {
        return Ok(());
    }
    if file_type.is_dir() {
        return Err(DataError::NotNpy {
            path: path.to_path_buf(),
            reason: "it is a directory".into(),
        });
    }
    #[cfg(unix)]
    let kind = {
        use std::os::unix::fs::FileTypeExt;
        if file_type.is_fifo() {
            "a FIFO (named pipe)"
        } else if file_type.is_socket() {
            "a socket"
        } else if file_type.is_char_device() {
            "a character device"
        } else if file_type.is_block_device() {
            "a block device"
        } else {
            "not a regular file"
        }
    };
    #[cfg(not(unix))]
    let kind = "not a regular file";
    Err(DataError::NotAFile {
        path: path.to_path_buf(),
        kind,
    })
}

/// Opens `path` for reading; on Unix without waiting for a writer should it be a FIFO
/// (`O_NONBLOCK`, which regular files ignore).
fn open_nonblocking(path: &Path) -> std::io::Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NONBLOCK);
    options.open(path)
}

/// Fills `buf` from byte `at` of `file` without moving its cursor, so reads may run in
/// parallel; a file that ends first is `UnexpectedEof`.
#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], at: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, at)
}

#[cfg(windows)]
fn read_exact_at(file: &File, mut buf: &mut [u8], mut at: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, at) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                buf = &mut buf[n..];
                at += n as u64;
            }
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// Little-endian `bytes` of `dtype` → f32.
fn convert(dtype: Dtype, bytes: &[u8], out: &mut [f32]) {
    let native = cfg!(target_endian = "little");
    match dtype {
        Dtype::F32 => match bytemuck::try_cast_slice::<u8, f32>(bytes) {
            Ok(src) if native => out.copy_from_slice(src),
            _ => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes(b.try_into().expect("4 bytes"));
                }
            }
        },
        Dtype::F16 => match bytemuck::try_cast_slice::<u8, u16>(bytes) {
            // half converts 8 at a time with F16C when the CPU has it (checked at run time).
            Ok(bits) if native => {
                use half::slice::HalfBitsSliceExt;
                bits.reinterpret_cast::<half::f16>()
                    .convert_to_f32_slice(out)
            }
            _ => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::f16::from_le_bytes(b.try_into().expect("2 bytes")).to_f32();
                }
            }
        },
        Dtype::F64 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                *o = f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32;
            }
        }
    }
}

/// A dataset of `.npy` shards, read row by row on demand and never whole.
///
/// An array whose last axis is D is read as rows of D: a `[sequences, tokens, D]` dump is
/// sequences·tokens rows. All shards must share D; rows are numbered across shards in order.
pub struct NpyShards {
    shards: Vec<Shard>,
    /// Row at which each shard starts, plus the total at the end.
    starts: Vec<u64>,
    d_model: usize,
    notices: Vec<String>,
}

impl NpyShards {
    /// Opens every shard that `inputs` name. Each input is a file, a directory (every `*.npy`
    /// in it, in name order, not recursing) or a glob pattern such as `acts/layer4_*.npy`
    /// (matches in name order).
    pub fn open<P: AsRef<Path>>(inputs: &[P]) -> Result<NpyShards, DataError> {
        let mut paths = Vec::new();
        for input in inputs {
            paths.extend(expand(input.as_ref())?);
        }
        if paths.is_empty() {
            return Err(DataError::NoFiles {
                spec: "(no paths given)".into(),
            });
        }
        // Collected in full, then checked in order: rayon's collect into a Result returns
        // whichever error a thread meets first, so with several bad files the one reported
        // would change from run to run.
        let shards: Vec<Shard> = paths
            .par_iter()
            .map(|p| Shard::open(p))
            .collect::<Vec<_>>()
            .into_iter()
            .collect::<Result<_, _>>()?;
        let d_model = shards[0].d_model;
        if let Some(bad) = shards.iter().find(|s| s.d_model != d_model) {
            return Err(DataError::WidthMismatch {
                path: bad.path.clone(),
                d_model: bad.d_model,
                first_path: shards[0].path.clone(),
                first_d_model: d_model,
            });
        }
        let mut starts = vec![0u64];
        for shard in &shards {
            let total = starts[starts.len() - 1]
                .checked_add(shard.rows)
                .ok_or_else(|| DataError::NotNpy {
                    path: shard.path.clone(),
                    reason: "with the shards before it, the dataset holds more than 2^64 rows"
                        .into(),
                })?;
            starts.push(total);
        }
        let notices = shards
            .iter()
            .filter(|s| s.dtype == Dtype::F64)
            .map(|s| {
                format!(
                    "{}: float64, read as float32 (saving as float32 or float16 halves the reads)",
                    s.path.display()
                )
            })
            .collect();
        Ok(NpyShards {
            shards,
            starts,
            d_model,
            notices,
        })
    }

    /// Each shard's path, shape and dtype, in row order.
    pub fn shards(&self) -> impl Iterator<Item = (&Path, &[u64], Dtype)> {
        self.shards
            .iter()
            .map(|s| (s.path.as_path(), s.shape.as_slice(), s.dtype))
    }

    /// One line for each thing the user may want to know (float64 shards), for the caller to
    /// print.
    pub fn notices(&self) -> &[String] {
        &self.notices
    }

    /// The shard holding global row `row`.
    fn shard_of(&self, row: u64) -> usize {
        self.starts.partition_point(|&s| s <= row) - 1
    }
}

impl Source for NpyShards {
    fn d_model(&self) -> usize {
        self.d_model
    }

    fn n_rows(&self) -> u64 {
        *self.starts.last().unwrap()
    }

    fn read_rows(&self, start: u64, out_nd: &mut [f32]) -> Result<(), DataError> {
        let d = self.d_model;
        let (mut row, mut out) = (start, out_nd);
        // Whole rows only: a trailing partial row (a caller's bug) is left as it is rather
        // than looping forever on it.
        while out.len() >= d.max(1) {
            let i = self.shard_of(row);
            let local = row - self.starts[i];
            let n = ((self.starts[i + 1] - row) as usize).min(out.len() / d);
            let (here, rest) = out.split_at_mut(n * d);
            // Big reads (evaluation sweeps) convert in parallel, 64 KiB of output a task.
            let rows_per_task = (16384 / d).max(1);
            if n > rows_per_task {
                here.par_chunks_mut(rows_per_task * d)
                    .enumerate()
                    .try_for_each(|(t, part)| {
                        self.shards[i].read(local + (t * rows_per_task) as u64, part)
                    })?;
            } else {
                self.shards[i].read(local, here)?;
            }
            row += n as u64;
            out = rest;
        }
        Ok(())
    }

    fn locate(&self, row: u64) -> String {
        let i = self.shard_of(row);
        let (shard, local) = (&self.shards[i], row - self.starts[i]);
        let lead = &shard.shape[..shard.shape.len() - 1];
        if lead.len() <= 1 {
            return format!("{} row {local}", shard.path.display());
        }
        let mut index = vec![0u64; lead.len()];
        let mut rest = local;
        for (slot, &n) in index.iter_mut().zip(lead).rev() {
            *slot = rest % n;
            rest /= n;
        }
        format!("{} row {local} (index {index:?})", shard.path.display())
    }
}

/// The files one input names, in name order.
fn expand(input: &Path) -> Result<Vec<PathBuf>, DataError> {
    let spec = input.display().to_string();
    if input.is_dir() {
        let entries = std::fs::read_dir(input).map_err(|source| DataError::Io {
            path: input.to_path_buf(),
            source,
        })?;
        let mut paths = Vec::new();
        for entry in entries {
            let path = entry
                .map_err(|source| DataError::Io {
                    path: input.to_path_buf(),
                    source,
                })?
                .path();
            if path.extension().is_some_and(|e| e == "npy") && !path.is_dir() {
                paths.push(path);
            }
        }
        paths.sort();
        return non_empty(paths, spec);
    }
    let is_pattern = spec.contains(['*', '?', '[']);
    if is_pattern && !input.exists() {
        let matches = glob::glob(&spec).map_err(|err| DataError::Glob {
            pattern: spec.clone(),
            reason: err.msg.to_string(),
        })?;
        let mut paths = Vec::new();
        for entry in matches {
            let path = entry.map_err(|err| DataError::Io {
                path: err.path().to_path_buf(),
                source: err.into(),
            })?;
            if !path.is_dir() {
                paths.push(path);
            }
        }
        paths.sort();
        return non_empty(paths, spec);
    }
    // A plain file: opening it reports a missing or unreadable one.
    Ok(vec![input.to_path_buf()])
}

fn non_empty(paths: Vec<PathBuf>, spec: String) -> Result<Vec<PathBuf>, DataError> {
    if paths.is_empty() {
        Err(DataError::NoFiles { spec })
    } else {
        Ok(paths)
    }
}
