//! A safetensors file written in slices by the processes of a job, none holding a whole
//! tensor: what latent sharding saves a dictionary larger than one machine with. The layout
//! comes from the tensors' names, dtypes and shapes alone, byte for byte the one
//! `safetensors::serialize` gives the whole tensors, so a sliced save reads back (and
//! compares) as any other.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use safetensors::tensor::{Dtype, Metadata, TensorInfo};

use super::tensors::standard;
use crate::dist::{agree, all_gather_u64, part, Collective, Grid};
use crate::error::{io_error, Error, Result};
use crate::optim::ParamTensors;

/// The part of one tensor that this process writes: some of its rows, or of a matrix's
/// columns.
pub struct Slice<'a> {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Where the part starts: its first row, or (`columns`) its first column.
    first: usize,
    /// A block of columns, `bytes` holding its rows in order (a transposed shard).
    columns: bool,
    bytes: &'a [u8],
}

impl<'a> Slice<'a> {
    /// Rows `first_row..` of the f32 tensor `name` of `shape` (rows: its first axis; a scalar
    /// or a vector's elements count as rows of one), `data` in standard layout.
    pub fn f32(
        name: impl Into<String>,
        shape: &[usize],
        first_row: usize,
        data: &'a [f32],
    ) -> Self {
        let bytes = bytemuck::cast_slice(data);
        Slice {
            name: name.into(),
            dtype: Dtype::F32,
            shape: shape.to_vec(),
            first: first_row,
            columns: false,
            bytes,
        }
    }

    /// Columns `first_column..` of the f32 matrix `name` of `shape` (two axes), `data` their
    /// rows in standard layout: every row's part of those columns, row after row.
    pub fn f32_columns(
        name: impl Into<String>,
        shape: [usize; 2],
        first_column: usize,
        data: &'a [f32],
    ) -> Self {
        Slice {
            first: first_column,
            columns: true,
            ..Slice::f32(name, &shape, 0, data)
        }
    }

    /// As [`Slice::f32`], for a u64 tensor.
    pub fn u64(
        name: impl Into<String>,
        shape: &[usize],
        first_row: usize,
        data: &'a [u64],
    ) -> Self {
        let bytes = bytemuck::cast_slice(data);
        Slice {
            name: name.into(),
            dtype: Dtype::U64,
            shape: shape.to_vec(),
            first: first_row,
            columns: false,
            bytes,
        }
    }

    fn row_bytes(&self) -> usize {
        self.shape.iter().skip(1).product::<usize>() * self.dtype.bitsize() / 8
    }

    /// The part as runs of bytes in the tensor: (offset of the first, bytes in each, offset
    /// between them, how many); `None` when `bytes` does not fit the shape there.
    fn runs(&self) -> Option<[usize; 4]> {
        let (n, elem) = (self.bytes.len(), self.dtype.bitsize() / 8);
        let runs = match self.columns {
            false => {
                let row = self.row_bytes().max(1);
                (n % row == 0).then_some([self.first * self.row_bytes(), n, n, 1])
            }
            true => {
                let (rows, cols) = (self.shape[0], self.shape[1]);
                let run = n / rows.max(1);
                let fits = n == run * rows && run % elem == 0 && self.first + run / elem <= cols;
                fits.then_some([self.first * elem, run, cols * elem, rows])
            }
        }?;
        let [start, run, stride, count] = runs;
        let end = match count {
            0 => start,
            _ => start + (count - 1) * stride + run,
        };
        (end <= self.total_bytes()).then_some(runs)
    }

    fn total_bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// Where one process's latents sit in the whole dictionary, which its slices of a
/// dictionary-shaped file hold.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LatentRows {
    /// The whole dictionary's F.
    pub(crate) f: usize,
    /// This process's first latent.
    pub(crate) offset: usize,
    /// Whether this process writes the tensors every shard holds alike (b_dec, θ).
    pub(crate) writes_shared: bool,
}

impl LatentRows {
    /// The whole dictionary, held by one process.
    pub(crate) fn whole(f: usize) -> Self {
        LatentRows {
            f,
            offset: 0,
            writes_shared: true,
        }
    }

    /// The latents `grid`'s rank holds of a dictionary of `f` (`part(f, shard, S)`), shard 0
    /// writing the shared tensors.
    pub(crate) fn of_shard(grid: &Grid, f: usize) -> Self {
        LatentRows {
            f,
            offset: part(f, grid.shard, grid.shards).start,
            writes_shared: grid.shard == 0,
        }
    }
}

/// A dictionary-shaped directory written by the latent shards of `grid`'s group 0 (the other
/// groups hold the same latents): `write` gets each shard's rows of the dictionary of `f`
/// after checking that the shard holds its `held` latents of `what`. Every rank calls it; an
/// error on any rank is every rank's.
pub(crate) fn write_by_shards(
    grid: &Grid,
    f: usize,
    held: usize,
    what: &str,
    write: impl FnOnce(LatentRows) -> Result<()>,
) -> Result<()> {
    let written = match (grid.group(), grid.latents_of(f, held, what)) {
        (_, Err(err)) => Err(err),
        (0, Ok(_)) => write(LatentRows::of_shard(grid, f)),
        _ => Ok(()),
    };
    agree(&*grid.world, written, false).map(|((), _)| ())
}

/// The tensors of a dictionary-shaped file, as this process's slices of them.
pub(crate) struct SlicesOut<'a> {
    rows: LatentRows,
    slices: Vec<Slice<'a>>,
}

impl<'a> SlicesOut<'a> {
    pub(crate) fn new(rows: LatentRows) -> Self {
        SlicesOut {
            rows,
            slices: Vec::new(),
        }
    }

    /// A per-latent f32 tensor: F×`width`, or F when `width` is `None`; `data` holds this
    /// process's latents.
    pub(crate) fn latents_f32(
        &mut self,
        name: impl Into<String>,
        width: Option<usize>,
        data: &'a [f32],
    ) {
        let shape = self.latent_shape(width);
        self.slices
            .push(Slice::f32(name, &shape, self.rows.offset, data));
    }

    /// A per-latent f32 matrix stored transposed, `width`×F (SAELens' W_enc); `data_df`
    /// holds this process's latents' columns, `width` rows of them.
    pub(crate) fn latents_f32_transposed(
        &mut self,
        name: impl Into<String>,
        width: usize,
        data_df: &'a [f32],
    ) {
        let shape = [width, self.rows.f];
        self.slices
            .push(Slice::f32_columns(name, shape, self.rows.offset, data_df));
    }

    /// A per-latent u64 vector of F.
    pub(crate) fn latents_u64(&mut self, name: impl Into<String>, data: &'a [u64]) {
        let shape = self.latent_shape(None);
        self.slices
            .push(Slice::u64(name, &shape, self.rows.offset, data));
    }

    /// A tensor every shard holds alike, written by one of them.
    pub(crate) fn shared_f32(&mut self, name: impl Into<String>, shape: &[usize], data: &'a [f32]) {
        let data = if self.rows.writes_shared { data } else { &[] };
        self.slices.push(Slice::f32(name, shape, 0, data));
    }

    /// The parameter-shaped arrays as `{prefix}w_enc_fd`, `{prefix}b_enc_f`, ... (and
    /// `{prefix}threshold_f` where the SAE has per-latent thresholds).
    pub(crate) fn params(&mut self, prefix: &str, p: &'a ParamTensors) {
        let d = p.w_enc_fd.ncols();
        self.latents_f32(format!("{prefix}w_enc_fd"), Some(d), standard(&p.w_enc_fd));
        self.latents_f32(format!("{prefix}b_enc_f"), None, standard(&p.b_enc_f));
        self.latents_f32(format!("{prefix}w_dec_fd"), Some(d), standard(&p.w_dec_fd));
        self.shared_f32(format!("{prefix}b_dec_d"), &[d], standard(&p.b_dec_d));
        if !p.threshold_f.is_empty() {
            self.latents_f32(
                format!("{prefix}threshold_f"),
                None,
                standard(&p.threshold_f),
            );
        }
    }

    fn latent_shape(&self, width: Option<usize>) -> Vec<usize> {
        match width {
            Some(d) => vec![self.rows.f, d],
            None => vec![self.rows.f],
        }
    }

    /// Writes the file (see [`write_sliced`]): every process of `collective` calls it.
    pub(crate) fn write(
        self,
        path: &Path,
        metadata: Option<HashMap<String, String>>,
        collective: &dyn Collective,
    ) -> Result<()> {
        write_sliced(path, &self.slices, metadata, collective)
    }
}

/// The file's header (its length first) and each tensor's data offset in the file, in the
/// order of `tensors`; as `safetensors::serialize` lays them out (descending dtype, then name;
/// the header padded with spaces to 8 bytes).
fn layout(tensors: &[Slice<'_>], metadata: Option<HashMap<String, String>>) -> (Vec<u8>, Vec<u64>) {
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&tensors[a], &tensors[b]);
        b.dtype.cmp(&a.dtype).then(a.name.cmp(&b.name))
    });
    let (mut infos, mut at) = (Vec::new(), 0);
    let mut data_offset = vec![0u64; tensors.len()];
    for &i in &order {
        let n = tensors[i].total_bytes();
        infos.push((
            tensors[i].name.to_string(),
            TensorInfo {
                dtype: tensors[i].dtype,
                shape: tensors[i].shape.clone(),
                data_offsets: (at, at + n),
            },
        ));
        data_offset[i] = at as u64;
        at += n;
    }
    let metadata = Metadata::new(metadata, infos).expect("offsets built in order");
    let mut json = serde_json::to_string(&metadata)
        .expect("a header serialises")
        .into_bytes();
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut header = (json.len() as u64).to_le_bytes().to_vec();
    header.extend_from_slice(&json);
    let start = header.len() as u64;
    (header, data_offset.iter().map(|o| o + start).collect())
}

/// Writes `path`, atomically, as one safetensors file made of every process's `tensors`
/// slices: each process of `collective` passes the same names, dtypes and shapes in the same
/// order, and its own rows (none is fine). The file is byte for byte what
/// `safetensors::serialize` writes for the whole tensors (with `metadata`, which every process
/// passes alike, as its header's `__metadata__`). All processes must see `path` on one
/// filesystem. Slices that do not cover a tensor exactly once, or that reach past its rows,
/// and any process's I/O failure, are errors on every process, naming the file; the old file,
/// if any, stays.
pub fn write_sliced(
    path: &Path,
    tensors: &[Slice<'_>],
    metadata: Option<HashMap<String, String>>,
    collective: &dyn Collective,
) -> Result<()> {
    let bad = |problem: String| Error::RunFile {
        path: path.to_path_buf(),
        problem,
        fix: "report this as a bug: the processes' slices must cover each tensor once".into(),
    };
    // Slices in range here, then every tensor's bytes counted over all processes.
    let local = tensors.iter().try_for_each(|t| match t.runs() {
        Some(_) => Ok(()),
        None => Err(bad(format!(
            "{} {}.. of {} ({} bytes) reach past its shape {:?}",
            if t.columns { "columns" } else { "rows" },
            t.first,
            t.name,
            t.bytes.len(),
            t.shape
        ))),
    });
    agree(collective, local, false)?;
    let runs: Vec<[usize; 4]> = tensors.iter().map(|t| t.runs().expect("checked")).collect();
    // Every process's runs of each tensor: together their bytes must tile it.
    let mine: Vec<u64> = runs.iter().flatten().map(|&v| v as u64).collect();
    let all = all_gather_u64(collective, &mine);
    for (i, t) in tensors.iter().enumerate() {
        let mut spans: Vec<(u64, u64)> = (all.iter())
            .flat_map(|q| {
                let [start, run, stride, count] = [0, 1, 2, 3].map(|j| q[4 * i + j]);
                (0..count).map(move |r| (start + r * stride, start + r * stride + run))
            })
            .filter(|(start, end)| end > start)
            .collect();
        spans.sort_unstable();
        let mut at = 0;
        for (start, end) in spans {
            if start != at {
                break;
            }
            at = end;
        }
        if at != t.total_bytes() as u64 {
            return Err(bad(format!(
                "the processes' slices of {} do not cover its shape {:?} once (a gap or an \
                 overlap at byte {at})",
                t.name, t.shape
            )));
        }
    }

    let (header, data_offset) = layout(tensors, metadata);
    let tmp = super::tmp_path(path);
    let total = data_offset
        .iter()
        .zip(tensors)
        .map(|(o, t)| o + t.total_bytes() as u64)
        .max()
        .unwrap_or(header.len() as u64);
    let created = match collective.rank() {
        0 => OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .and_then(|mut file| {
                file.set_len(total)?;
                // Synced with the data below: fsync covers the file, whichever handle wrote.
                file.write_all(&header)
            })
            .map_err(io_error(&tmp, "creating")),
        _ => Ok(()),
    };
    agree(collective, created, false)?;
    let wrote = OpenOptions::new()
        .write(true)
        .open(&tmp)
        .and_then(|file| {
            for ((t, offset), &[start, run, stride, _]) in
                tensors.iter().zip(&data_offset).zip(&runs)
            {
                for (r, bytes) in t.bytes.chunks(run.max(1)).enumerate() {
                    file.write_all_at(bytes, offset + (start + r * stride) as u64)?;
                }
            }
            file.sync_all()
        })
        .map_err(io_error(&tmp, "writing"));
    if let Err(err) = agree(collective, wrote, false) {
        if collective.rank() == 0 {
            let _ = std::fs::remove_file(&tmp);
        }
        return Err(err);
    }
    let committed = match collective.rank() {
        0 => super::commit(&tmp, path),
        _ => Ok(()),
    };
    agree(collective, committed, false).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::{part, Threads};
    use safetensors::tensor::TensorView;

    /// A temporary directory for one test.
    fn dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("sae-sliced-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// What three threads write when each holds a third of the rows of `w` (10×3, f32) and
    /// `n` (10, u64), and rank 0 the whole of `b` (3): `cover` decides each rank's rows.
    fn write_on_threads(
        path: &Path,
        w: &[f32],
        n: &[u64],
        b: &[f32],
        cover: fn(usize) -> std::ops::Range<usize>,
    ) -> Vec<Result<()>> {
        std::thread::scope(|scope| {
            let handles: Vec<_> = Threads::world(3)
                .into_iter()
                .map(|world| {
                    scope.spawn(move || {
                        let rows = cover(world.rank());
                        let b_rows = if world.rank() == 0 { 0..3 } else { 0..0 };
                        let tensors = [
                            Slice::f32(
                                "w_enc_fd",
                                &[10, 3],
                                rows.start,
                                &w[rows.start * 3..rows.end * 3],
                            ),
                            Slice::u64("fired_f", &[10], rows.start, &n[rows.clone()]),
                            Slice::f32("b_dec_d", &[3], 0, &b[b_rows]),
                        ];
                        write_sliced(path, &tensors, None, &world)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn slices_from_three_processes_make_the_file_safetensors_writes() {
        let dir = dir("same");
        let path = dir.join("t.safetensors");
        let w: Vec<f32> = (0..30).map(|i| i as f32 * 0.5 - 3.0).collect();
        let n: Vec<u64> = (0..10).map(|i| i * 1000 + 7).collect();
        let b = [1.5f32, -2.0, 0.25];
        let results = write_on_threads(&path, &w, &n, &b, |r| part(10, r, 3));
        assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
        let view =
            |dtype, shape: &[usize], data| TensorView::new(dtype, shape.to_vec(), data).unwrap();
        let whole = [
            (
                "w_enc_fd",
                view(Dtype::F32, &[10, 3], bytemuck::cast_slice(&w)),
            ),
            ("fired_f", view(Dtype::U64, &[10], bytemuck::cast_slice(&n))),
            ("b_dec_d", view(Dtype::F32, &[3], bytemuck::cast_slice(&b))),
        ];
        let expected = safetensors::serialize(whole, None).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), expected);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn column_blocks_from_three_processes_make_the_transposed_matrix_and_must_tile_it() {
        let dir = dir("columns");
        let path = dir.join("t.safetensors");
        // The 3×10 matrix w_df[d][f] = f·3 + d, written by latent shards as column blocks.
        let w_df: Vec<f32> = (0..30).map(|i| ((i % 10) * 3 + i / 10) as f32).collect();
        let write = |cover: fn(usize) -> std::ops::Range<usize>| -> Vec<Result<()>> {
            std::thread::scope(|scope| {
                let handles: Vec<_> = Threads::world(3)
                    .into_iter()
                    .map(|world| {
                        let (path, w_df) = (&path, &w_df);
                        scope.spawn(move || {
                            let cols = cover(world.rank());
                            let block: Vec<f32> = (0..3)
                                .flat_map(|d| w_df[d * 10 + cols.start..d * 10 + cols.end].to_vec())
                                .collect();
                            let tensors =
                                [Slice::f32_columns("W_enc", [3, 10], cols.start, &block)];
                            write_sliced(path, &tensors, None, &world)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            })
        };
        let results = write(|r| part(10, r, 3));
        assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
        let view = TensorView::new(Dtype::F32, vec![3, 10], bytemuck::cast_slice(&w_df)).unwrap();
        let expected = safetensors::serialize([("W_enc", view)], None).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), expected);
        // A gap (column 9 written by nobody) and an overlap fail on every process.
        for cover in [
            (|r| if r == 2 { 7..9 } else { part(10, r, 3) }) as fn(usize) -> _,
            |r| if r == 2 { 6..10 } else { part(10, r, 3) },
        ] {
            for r in write(cover) {
                let err = r.unwrap_err().to_string();
                assert!(err.contains("do not cover"), "{err}");
            }
            assert_eq!(std::fs::read(&path).unwrap(), expected);
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn slices_that_miss_or_overrun_rows_fail_on_every_process_and_leave_the_old_file() {
        let dir = dir("bad");
        let path = dir.join("t.safetensors");
        std::fs::write(&path, b"old").unwrap();
        let w = [0.0f32; 30];
        let n = [0u64; 10];
        let b = [0.0f32; 3];
        // Rank 2 skips row 9; rank 2 overlaps rank 1 by the row it misses at the end; rank 2
        // reaches past the last row.
        for cover in [
            (|r| if r == 2 { 7..9 } else { part(10, r, 3) }) as fn(usize) -> _,
            |r| if r == 2 { 6..9 } else { part(10, r, 3) },
            |r| if r == 2 { 8..11 } else { part(10, r, 3) },
        ] {
            let w_long = [0.0f32; 33];
            let n_long = [0u64; 11];
            let (w, n) = if cover(2).end > 10 {
                (&w_long[..], &n_long[..])
            } else {
                (&w[..], &n[..])
            };
            let results = write_on_threads(&path, w, n, &b, cover);
            for r in &results {
                let err = r.as_ref().unwrap_err().to_string();
                assert!(err.contains("t.safetensors"), "{err}");
            }
            assert_eq!(std::fs::read(&path).unwrap(), b"old");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
