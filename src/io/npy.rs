//! `.npy` files written: a whole array at once ([`write_npy`]), or one whose leading axis
//! grows batch by batch ([`NpyAppender`]), both committed atomically.

use std::fs;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use npyz::{AutoSerialize, Serialize, TypeWrite, WriterBuilder};

use super::{commit, tmp_path, write_atomic_with};
use crate::error::{io_error, Error, Result};

/// Writes `values` as a C-order `.npy` array of the given shape (format 1.0, the dtype numpy
/// calls `<f4`, `<u4`, `<i8`, `<u8`, ... for f32, u32, i64, u64, ...), atomically.
pub fn write_npy<T: AutoSerialize + Copy>(path: &Path, shape: &[u64], values: &[T]) -> Result<()> {
    let elements: u64 = shape.iter().product();
    if elements != values.len() as u64 {
        return Err(Error::Shape {
            what: format!("values for {}", path.display()),
            expected: shape.iter().map(|&n| n as usize).collect(),
            got: vec![values.len()],
        });
    }
    write_atomic_with(path, |out| {
        let mut writer = npyz::WriteOptions::new()
            .default_dtype()
            .shape(shape)
            .writer(out)
            .begin_nd()?;
        writer.extend(values.iter().copied())?;
        writer.finish()
    })
}

/// A `.npy` array written row by row: its leading axis grows with each [`append`], the
/// trailing axes are fixed. Nothing but the current buffer is held in memory, so arrays far
/// larger than memory can be written. The file appears at its path only on [`finish`];
/// until then (or if the appender is dropped) readers see the previous file, if any.
///
/// npyz's own writer needs the full shape up front except for 1-D arrays, so the header is
/// written here: a fixed-size placeholder first, the real shape over it at the end. Elements
/// are encoded by npyz.
///
/// [`append`]: NpyAppender::append
/// [`finish`]: NpyAppender::finish
pub struct NpyAppender<T: AutoSerialize> {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<fs::File>>,
    writer: <T as Serialize>::TypeWriter,
    descr: String,
    row_shape: Vec<u64>,
    row_len: u64,
    header_len: usize,
    rows: u64,
}

impl<T: AutoSerialize> NpyAppender<T> {
    /// Starts `path` as an array of shape `[rows, row_shape...]` (`row_shape` empty for a 1-D
    /// array). Fails if a trailing axis is 0.
    pub fn create(path: &Path, row_shape: &[u64]) -> Result<Self> {
        if row_shape.contains(&0) {
            return Err(Error::Shape {
                what: format!("rows of {}", path.display()),
                expected: vec![1],
                got: row_shape.iter().map(|&n| n as usize).collect(),
            });
        }
        let dtype = T::default_dtype();
        let writer = T::writer(&dtype).map_err(|err| Error::RunFile {
            path: path.to_path_buf(),
            problem: format!("npyz cannot encode dtype {}: {err}", dtype.descr()),
            fix: "write f32, u32, i64 or u64 arrays".into(),
        })?;
        let descr = dtype.descr();
        // Room for the largest leading axis there can be, rounded up as numpy aligns data.
        let longest = header_dict(&descr, u64::MAX, row_shape).len();
        let header_len = (10 + longest + 1).div_ceil(64) * 64;
        let tmp = tmp_path(path);
        let file = fs::File::create(&tmp).map_err(io_error(&tmp, "creating"))?;
        let mut out = BufWriter::new(file);
        out.write_all(&vec![b' '; header_len])
            .map_err(io_error(&tmp, "writing"))?;
        Ok(NpyAppender {
            path: path.to_path_buf(),
            tmp,
            out: Some(out),
            writer,
            descr,
            row_len: row_shape.iter().product(),
            row_shape: row_shape.to_vec(),
            header_len,
            rows: 0,
        })
    }

    /// Appends whole rows: `values.len()` must be a multiple of the row length.
    pub fn append(&mut self, values: &[T]) -> Result<()> {
        if !(values.len() as u64).is_multiple_of(self.row_len) {
            return Err(Error::Shape {
                what: format!("values appended to {}", self.path.display()),
                expected: self.row_shape.iter().map(|&n| n as usize).collect(),
                got: vec![values.len()],
            });
        }
        let out = self.out.as_mut().expect("an appender is open until finish");
        let written = values
            .iter()
            .try_for_each(|v| self.writer.write_one(&mut *out, v));
        written.map_err(io_error(&self.tmp, "writing"))?;
        self.rows += values.len() as u64 / self.row_len;
        Ok(())
    }

    /// Rows appended so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Writes the header with the final shape, syncs the file and renames it into place.
    /// Returns the number of rows.
    pub fn finish(mut self) -> Result<u64> {
        let mut out = self.out.take().expect("an appender is open until finish");
        let mut header = b"\x93NUMPY\x01\x00".to_vec();
        let mut dict = header_dict(&self.descr, self.rows, &self.row_shape);
        while 10 + dict.len() + 1 < self.header_len {
            dict.push(' ');
        }
        dict.push('\n');
        header.extend((dict.len() as u16).to_le_bytes());
        header.extend(dict.as_bytes());
        debug_assert_eq!(header.len(), self.header_len);
        let written = out
            .flush()
            .and_then(|()| out.seek(SeekFrom::Start(0)))
            .and_then(|_| out.write_all(&header))
            .and_then(|()| out.flush())
            .and_then(|()| out.get_ref().sync_all());
        written.map_err(io_error(&self.tmp, "writing"))?;
        drop(out);
        commit(&self.tmp, &self.path)?;
        Ok(self.rows)
    }
}

impl<T: AutoSerialize> Drop for NpyAppender<T> {
    fn drop(&mut self) {
        // Unfinished: the temporary file holds no valid array.
        if self.out.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// The header's dictionary as numpy writes it, without padding.
fn header_dict(descr: &str, rows: u64, row_shape: &[u64]) -> String {
    let shape = if row_shape.is_empty() {
        format!("({rows},)")
    } else {
        let dims: Vec<String> = std::iter::once(rows)
            .chain(row_shape.iter().copied())
            .map(|n| n.to_string())
            .collect();
        format!("({})", dims.join(", "))
    };
    format!("{{'descr': {descr}, 'fortran_order': False, 'shape': {shape}, }}")
}
