//! `.npy` shards, memory-mapped: header checks, path expansion (files, directories, globs) and
//! conversion of float16/float32/float64 rows to f32.

use std::fs::File;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use half::slice::HalfFloatSliceExt;
use memmap2::Mmap;
use npyz::{DType, NpyHeader, Order, TypeChar};
use rayon::prelude::*;

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

/// One memory-mapped file.
struct Shard {
    path: PathBuf,
    map: Mmap,
    /// Byte offset of the data, right after the header.
    offset: usize,
    dtype: Dtype,
    /// Shape as saved; rows are all axes but the last.
    shape: Vec<u64>,
    rows: u64,
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
        let file = File::open(path).map_err(io)?;
        if file.metadata().map_err(io)?.is_dir() {
            return Err(not_npy("it is a directory".into()));
        }
        // SAFETY: the map is read-only. Another process truncating the file while it is mapped
        // would fault the reader; activation dumps are written once and then only read.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        if !map.starts_with(b"\x93NUMPY") {
            return Err(not_npy(if map.is_empty() {
                "the file is empty".into()
            } else {
                "it does not start with the \\x93NUMPY magic".into()
            }));
        }
        // npyz allocates as many bytes as the stated header length (up to 4 GiB in versions 2.0
        // and 3.0) before reading the header; a corrupt length must not allocate gigabytes.
        if let Some(end) = header_end(&map) {
            if end > map.len() as u64 {
                return Err(not_npy(format!(
                    "the header claims to end at byte {end} but the file has {} bytes",
                    map.len()
                )));
            }
        }
        let mut reader = Cursor::new(&map[..]);
        // npyz multiplies the dimensions without overflow checks (`NpyHeader::from_parts`), which
        // panics in builds with overflow checks (debug builds) when a corrupt shape's product
        // passes u64; report that as a bad header instead (the panic message still reaches
        // stderr). Nothing the closure touched is used after a panic.
        let parsed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            NpyHeader::from_reader(&mut reader)
        }));
        let header = match parsed {
            Ok(Ok(header)) => header,
            Ok(Err(err)) => {
                // npyz rejects dtypes it has no type for (object, for one) while parsing; name
                // the dtype when the header says it. A header that names a dtype sae reads (or
                // no numpy type string at all) is broken elsewhere: blaming the dtype would
                // send the user after the wrong problem.
                return Err(match descr_in_header(&map) {
                    Some(dtype)
                        if dtype.starts_with(['<', '>', '|', '='])
                            && !matches!(dtype.as_str(), "<f2" | "<f4" | "<f8") =>
                    {
                        DataError::Dtype {
                            path: path.to_path_buf(),
                            dtype,
                        }
                    }
                    _ => not_npy(clip(format!("bad header: {err}"))),
                });
            }
            Err(_) => return Err(not_npy("bad header: its shape overflows".into())),
        };
        let offset = reader.position() as usize;
        let dtype = match header.dtype() {
            DType::Plain(ty) => {
                let little = matches!(
                    ty.endianness(),
                    npyz::Endianness::Little | npyz::Endianness::Irrelevant
                );
                match (ty.type_char(), ty.size_field(), little) {
                    (TypeChar::Float, 2, true) => Some(Dtype::F16),
                    (TypeChar::Float, 4, true) => Some(Dtype::F32),
                    (TypeChar::Float, 8, true) => Some(Dtype::F64),
                    _ => None,
                }
            }
            _ => None,
        };
        let Some(dtype) = dtype else {
            return Err(DataError::Dtype {
                path: path.to_path_buf(),
                dtype: header.dtype().descr().trim_matches('\'').to_string(),
            });
        };
        let shape = header.shape().to_vec();
        if shape.is_empty() {
            return Err(DataError::Scalar {
                path: path.to_path_buf(),
            });
        }
        // A 1-dimensional array is a single row; Fortran order only matters with two axes or
        // more.
        if header.order() == Order::Fortran && shape.len() > 1 {
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
            .ok_or_else(|| not_npy(format!("shape {shape:?} overflows")))?;
        let actual = (map.len() - offset) as u64;
        if actual < expected {
            return Err(DataError::Truncated {
                path: path.to_path_buf(),
                expected,
                actual,
            });
        }
        let rows = shape[..shape.len() - 1].iter().product();
        Ok(Shard {
            path: path.to_path_buf(),
            map,
            offset,
            dtype,
            shape,
            rows,
        })
    }

    fn d_model(&self) -> usize {
        *self.shape.last().expect("shape checked non-empty") as usize
    }

    /// Converts rows `row..` into `out_nd`.
    fn read(&self, row: u64, out_nd: &mut [f32]) {
        let size = self.dtype.size();
        let start = self.offset + row as usize * self.d_model() * size;
        let bytes = &self.map[start..start + out_nd.len() * size];
        convert(self.dtype, bytes, out_nd);
    }
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

/// Where the header ends (the data begins) by the length field of a version 1.0, 2.0 or 3.0
/// header; `None` when the prefix is too short or the version unknown (npyz reports those).
fn header_end(map: &[u8]) -> Option<u64> {
    match map.get(6..8)? {
        [1, 0] => Some(10 + u16::from_le_bytes(map.get(8..10)?.try_into().ok()?) as u64),
        [2 | 3, 0] => Some(12 + u32::from_le_bytes(map.get(8..12)?.try_into().ok()?) as u64),
        _ => None,
    }
}

/// `reason` cut to a few hundred characters: npyz's parse errors quote the whole header line,
/// which a corrupt length can make as long as the file.
fn clip(reason: String) -> String {
    const MAX_CHARS: usize = 400;
    match reason.char_indices().nth(MAX_CHARS) {
        Some((cut, _)) => format!("{} [...]", &reason[..cut]),
        None => reason,
    }
}

/// The `'descr'` string of a header that npyz could not parse, if there is one.
fn descr_in_header(map: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(&map[..map.len().min(4096)]);
    let after = &text[text.find("'descr'")? + "'descr'".len()..];
    let after = after.trim_start().strip_prefix(':')?.trim_start();
    let quote = after.chars().next().filter(|c| *c == '\'' || *c == '"')?;
    let body = &after[1..];
    Some(body[..body.find(quote)?].to_string())
}

/// A dataset of `.npy` shards, memory-mapped and never read whole.
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
        let d_model = shards[0].d_model();
        if let Some(bad) = shards.iter().find(|s| s.d_model() != d_model) {
            return Err(DataError::WidthMismatch {
                path: bad.path.clone(),
                d_model: bad.d_model(),
                first_path: shards[0].path.clone(),
                first_d_model: d_model,
            });
        }
        let mut starts = vec![0u64];
        for shard in &shards {
            starts.push(starts.last().unwrap() + shard.rows);
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
                    .for_each(|(t, part)| {
                        self.shards[i].read(local + (t * rows_per_task) as u64, part)
                    });
            } else {
                self.shards[i].read(local, here);
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
