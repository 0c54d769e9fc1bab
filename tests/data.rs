//! The data pipeline as a user drives it: shuffle guarantees, determinism, prefetch, cursors,
//! bad rows, the held-out split, normalisation's fold, and training from float16 shards.

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use common::{f16_bytes, synthetic_batch, temp_dir, write_npy};
use ndarray::{Array2, Axis};
use sparse_autoencoder::backend::Cpu;
use sparse_autoencoder::data::{
    estimate_scale, holdout, Batcher, Cursor, DataError, LoaderConfig, NpyShards, Prefetcher,
    Source,
};
use sparse_autoencoder::{Architecture, Error, Sae, SaeConfig, TrainConfig, Trainer};

/// n rows of width 3 whose first entry is the row's index, so batches say which rows they hold.
fn numbered(n: usize) -> Arc<Array2<f32>> {
    Arc::new(Array2::from_shape_fn((n, 3), |(i, j)| {
        if j == 0 {
            i as f32
        } else {
            (i * j) as f32 * 0.5
        }
    }))
}

/// The row indices of the next `n_batches` batches, in order.
fn ids<S: Source>(batcher: &mut Batcher<S>, n_batches: usize) -> Vec<u64> {
    (0..n_batches)
        .flat_map(|_| {
            let x_bd = batcher.next_batch().unwrap();
            check_rows(&x_bd);
            x_bd.column(0).iter().map(|&v| v as u64).collect::<Vec<_>>()
        })
        .collect()
}

/// Every row is intact: the other columns match the index in column 0.
fn check_rows(x_bd: &Array2<f32>) {
    for row in x_bd.rows() {
        let i = row[0] as usize;
        assert_eq!(row[1], i as f32 * 0.5, "row {i} arrived corrupted");
        assert_eq!(row[2], (2 * i) as f32 * 0.5, "row {i} arrived corrupted");
    }
}

fn config(batch_size: usize, buffer_rows: Option<usize>, chunk_rows: usize) -> LoaderConfig {
    LoaderConfig {
        batch_size,
        buffer_rows,
        chunk_rows,
        seed: 7,
        ..LoaderConfig::default()
    }
}

#[test]
fn every_row_is_used_once_per_epoch_in_a_fresh_order() {
    // (rows, buffer, chunk, batch): buffer smaller than the data, holding all of it, a batch
    // larger than the dataset, single-row chunks and batches that do not divide the data.
    for (n, buffer, chunk, batch) in [
        (1000, Some(100), 7, 64),
        (1000, None, 1024, 33),
        (10, Some(3), 1, 4),
        (257, Some(256), 16, 1000),
        (5000, Some(1000), 100, 1),
    ] {
        let mut batcher = Batcher::new(numbered(n), config(batch, buffer, chunk)).unwrap();
        let epochs = 3;
        let n_batches = (epochs * n).div_ceil(batch);
        let seen = ids(&mut batcher, n_batches);
        let mut orders = Vec::new();
        for e in 0..epochs {
            let epoch = &seen[e * n..(e + 1) * n];
            let mut sorted = epoch.to_vec();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..n as u64).collect::<Vec<_>>(), "n={n} epoch {e}");
            orders.push(epoch.to_vec());
        }
        let identity: Vec<u64> = (0..n as u64).collect();
        assert_ne!(orders[0], identity, "n={n}: not shuffled");
        assert_ne!(orders[0], orders[1], "n={n}: epochs repeat their order");
        assert!(batcher.epoch() >= 2);
    }
}

#[test]
fn the_seed_fixes_the_batches() {
    let make = |seed| {
        let mut batcher = Batcher::new(
            numbered(3000),
            LoaderConfig {
                seed,
                ..config(256, Some(500), 50)
            },
        )
        .unwrap();
        ids(&mut batcher, 30)
    };
    assert_eq!(make(1), make(1));
    assert_ne!(make(1), make(2));
}

#[test]
fn prefetched_batches_are_the_synchronous_ones() {
    let config = config(100, Some(300), 16);
    let mut sync = Batcher::new(numbered(1234), config.clone()).unwrap();
    let mut prefetcher = Prefetcher::new(Batcher::new(numbered(1234), config).unwrap());
    for _ in 0..40 {
        let expected = sync.next_batch().unwrap();
        let batch = prefetcher.next_batch().unwrap();
        assert_eq!(batch.view(), expected.view());
    }
}

#[test]
fn a_restored_cursor_continues_the_uninterrupted_stream() {
    // Epoch boundaries fall inside the run (1234 rows, 100 a batch).
    let config = config(100, Some(300), 16);
    let mut reference = Batcher::new(numbered(1234), config.clone()).unwrap();
    let all = ids(&mut reference, 60);
    for cut in [0, 1, 12, 13, 37] {
        // From the synchronous batcher.
        let mut first = Batcher::new(numbered(1234), config.clone()).unwrap();
        ids(&mut first, cut);
        let cursor = first.cursor();
        // Cursors survive a round trip through JSON, as checkpoints store them.
        let cursor: Cursor =
            serde_json::from_str(&serde_json::to_string(&cursor).unwrap()).unwrap();
        let mut resumed = Batcher::with_cursor(numbered(1234), config.clone(), &cursor).unwrap();
        assert_eq!(ids(&mut resumed, 60 - cut), all[cut * 100..], "cut {cut}");

        // From the prefetcher, whose thread has made batches beyond the cut.
        let mut prefetcher = Prefetcher::new(Batcher::new(numbered(1234), config.clone()).unwrap());
        for _ in 0..cut {
            prefetcher.next_batch().unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
        let cursor = prefetcher.cursor().clone();
        drop(prefetcher);
        let mut resumed = Batcher::with_cursor(numbered(1234), config.clone(), &cursor).unwrap();
        assert_eq!(
            ids(&mut resumed, 60 - cut),
            all[cut * 100..],
            "prefetched, cut {cut}"
        );
    }
}

#[test]
fn a_cursor_from_other_data_or_options_is_rejected() {
    let mut batcher = Batcher::new(numbered(500), config(10, Some(50), 8)).unwrap();
    ids(&mut batcher, 3);
    let cursor = batcher.cursor();
    let err = |result: sparse_autoencoder::Result<Batcher<Arc<Array2<f32>>>>| match result {
        Err(Error::Data(DataError::Cursor(_))) => {}
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("accepted a foreign cursor"),
    };
    err(Batcher::with_cursor(
        numbered(501),
        config(10, Some(50), 8),
        &cursor,
    ));
    err(Batcher::with_cursor(
        numbered(500),
        config(10, Some(50), 9),
        &cursor,
    ));
    err(Batcher::with_cursor(
        numbered(500),
        LoaderConfig {
            seed: 8,
            ..config(10, Some(50), 8)
        },
        &cursor,
    ));
    err(Batcher::with_cursor(
        numbered(500),
        config(10, Some(20), 8),
        &cursor,
    ));
}

/// `numbered(n)` with NaN or Inf in rows `bad`.
fn with_bad_rows(n: usize, bad: &[usize]) -> Arc<Array2<f32>> {
    let mut x = (*numbered(n)).clone();
    for (t, &r) in bad.iter().enumerate() {
        x[[r, 1 + t % 2]] = if t % 2 == 0 {
            f32::NAN
        } else {
            f32::NEG_INFINITY
        };
    }
    Arc::new(x)
}

#[test]
fn a_non_finite_row_stops_the_loader_with_its_location() {
    let mut batcher = Batcher::new(with_bad_rows(200, &[123]), config(50, Some(64), 8)).unwrap();
    let err = (0..10)
        .find_map(|_| batcher.next_batch().err())
        .expect("the bad row was served");
    assert!(
        matches!(err, Error::Data(DataError::NonFinite { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("row 123"), "{err}");

    // Through the prefetcher the error arrives as the batch that would hold the row.
    let mut prefetcher =
        Prefetcher::new(Batcher::new(with_bad_rows(200, &[5]), config(50, Some(64), 8)).unwrap());
    let err = (0..10).find_map(|_| prefetcher.next_batch().err()).unwrap();
    assert!(err.to_string().contains("row 5"), "{err}");
    // The loader is spent, and says so instead of hanging.
    assert!(prefetcher.next_batch().is_err());
}

#[test]
fn skipped_non_finite_rows_are_counted_and_never_served() {
    let bad = [0, 17, 18, 199];
    let config = LoaderConfig {
        skip_non_finite: true,
        ..config(30, Some(40), 8)
    };
    let mut batcher = Batcher::new(with_bad_rows(200, &bad), config.clone()).unwrap();
    let good = 200 - bad.len();
    let seen = ids(&mut batcher, (2 * good).div_ceil(30));
    for e in 0..2 {
        let mut epoch = seen[e * good..(e + 1) * good].to_vec();
        epoch.sort_unstable();
        let expected: Vec<u64> = (0..200).filter(|r| !bad.contains(&(*r as usize))).collect();
        assert_eq!(epoch, expected, "epoch {e}");
    }
    // Both epochs were streamed in full; the third may have begun.
    assert!(
        (8..=12).contains(&batcher.skipped_rows()),
        "{}",
        batcher.skipped_rows()
    );
    // Each batch is the clean data's batch without its bad rows: skipping changes no draw.
    let mut clean = Batcher::new(numbered(200), config.clone()).unwrap();
    let mut skipping = Batcher::new(with_bad_rows(200, &bad), config.clone()).unwrap();
    let mut short = 0;
    for step in 0..30 {
        let want: Vec<u64> = ids(&mut clean, 1)
            .into_iter()
            .filter(|&r| !bad.contains(&(r as usize)))
            .collect();
        let got = ids(&mut skipping, 1);
        short += usize::from(got.len() < 30);
        assert_eq!(got, want, "step {step}");
    }
    assert!(short >= 4, "{short}");
    // Restoring mid-stream in skip mode gives the same continuation.
    let mut first = Batcher::new(with_bad_rows(200, &bad), config.clone()).unwrap();
    let all = ids(&mut first, 20);
    let mut cut = Batcher::new(with_bad_rows(200, &bad), config.clone()).unwrap();
    let head = ids(&mut cut, 7).len();
    let mut resumed =
        Batcher::with_cursor(with_bad_rows(200, &bad), config, &cut.cursor()).unwrap();
    assert_eq!(ids(&mut resumed, 13), all[head..]);
}

#[test]
fn a_dataset_of_only_non_finite_rows_is_an_error() {
    let config = LoaderConfig {
        skip_non_finite: true,
        ..config(4, None, 2)
    };
    let mut batcher = Batcher::new(with_bad_rows(3, &[0, 1, 2]), config).unwrap();
    assert!(matches!(
        batcher.next_batch(),
        Err(Error::Data(DataError::NoFiniteRows))
    ));
}

#[test]
fn non_finite_locations_name_the_file_and_index() {
    let dir = temp_dir("nonfinite-location");
    let mut values = vec![0.5f32; 2 * 3 * 4];
    values[(3 + 2) * 4 + 1] = f32::NAN; // sequence 1, token 2
    write_npy(
        &dir.join("acts.npy"),
        "<f2",
        &[2, 3, 4],
        &f16_bytes(&values),
    );
    let shards = NpyShards::open(&[dir.join("acts.npy")]).unwrap();
    let mut batcher = Batcher::new(shards, config(6, None, 2)).unwrap();
    let err = batcher.next_batch().unwrap_err().to_string();
    assert!(err.contains("acts.npy row 5 (index [1, 2])"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_scale_multiplies_every_row() {
    let x = numbered(50);
    let mut plain = Batcher::new(x.clone(), config(50, None, 8)).unwrap();
    let mut scaled = Batcher::new(
        x,
        LoaderConfig {
            scale: 0.25,
            ..config(50, None, 8)
        },
    )
    .unwrap();
    assert_eq!(
        scaled.next_batch().unwrap(),
        plain.next_batch().unwrap() * 0.25
    );
}

#[test]
fn held_out_rows_never_reach_training() {
    let x = numbered(5000);
    let (train, eval) = holdout(x, 0.1, 3).unwrap();
    let held: HashSet<u64> = {
        let mut out = vec![0.0; eval.n_rows() as usize * 3];
        eval.read_rows(0, &mut out).unwrap();
        out.chunks(3).map(|r| r[0] as u64).collect()
    };
    assert_eq!(held.len(), 500);
    let mut batcher = Batcher::new(train, config(128, Some(700), 32)).unwrap();
    let seen = ids(&mut batcher, 2 * 4500 / 128);
    assert!(seen.iter().all(|r| !held.contains(r)));
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 4500);
}

#[test]
fn a_folded_sae_on_raw_x_matches_the_trained_sae_on_scaled_x() {
    let (d, f) = (12, 48);
    let x_bd = synthetic_batch(256, d, 5) * 37.0;
    let c = estimate_scale(&x_bd.view(), 0, false).unwrap();
    assert!(
        (c * 37.0 - 1.0).abs() > 0.05,
        "the test needs a scale far from 1"
    );
    let scaled_bd = &x_bd * c;
    for arch in [
        Architecture::RELU,
        Architecture::TopK { k: 4 },
        Architecture::BatchTopK { k: 4 },
    ] {
        let config = SaeConfig {
            d_model: d,
            dict_size: f,
            arch,
        };
        let train = TrainConfig {
            total_steps: 30,
            warmup_steps: 2,
            sparsity_warmup_steps: 5,
            threshold_start_step: 2,
            lr: Some(1e-2),
            ..TrainConfig::default()
        };
        let mut trainer = Trainer::new(Sae::new(config, 1).unwrap(), train).unwrap();
        for _ in 0..30 {
            trainer.step(scaled_bd.view()).unwrap();
        }
        let trained = trainer.into_sae();
        assert!(trained.b_dec_d().iter().any(|&v| v != 0.0));
        let mut folded = trained.clone();
        folded.fold_input_scale(c).unwrap();

        let codes_scaled = trained.encode(&Cpu, scaled_bd.view()).unwrap();
        let codes_raw = folded.encode(&Cpu, x_bd.view()).unwrap();
        assert_eq!(
            codes_raw.indices, codes_scaled.indices,
            "{arch:?}: other latents fire"
        );
        assert_eq!(codes_raw.indptr, codes_scaled.indptr);
        // ReLU's codes also carry the decoder norm that moved into the encoder.
        let norms: Vec<f32> = trained
            .w_dec_fd()
            .rows()
            .into_iter()
            .map(|r| {
                if matches!(arch, Architecture::Relu { .. }) {
                    r.dot(&r).sqrt()
                } else {
                    1.0
                }
            })
            .collect();
        // Compared at the scale of the codes, not value by value: a code just above zero is
        // a difference of pre-activation terms, and GEMMs that sum in another order (OpenBLAS)
        // leave it an absolute error of that scale, not of its own.
        let expected: ndarray::Array1<f32> = codes_raw
            .indices
            .iter()
            .zip(&codes_scaled.values)
            .map(|(&j, &scaled)| scaled * norms[j as usize] / c)
            .collect();
        let raw = ndarray::Array1::from(codes_raw.values.clone());
        let err = common::rel_err(&raw, &expected);
        assert!(err < 1e-5, "{arch:?}: codes off by {err:e}");
        let x_hat_raw = folded.decode(&codes_raw).unwrap();
        let x_hat_scaled = trained.decode(&codes_scaled).unwrap();
        let err = common::rel_err(&(x_hat_raw * c), &x_hat_scaled);
        assert!(
            err < 1e-5,
            "{arch:?}: reconstruction relation off by {err:e}"
        );
        if arch == (Architecture::BatchTopK { k: 4 }) {
            assert_eq!(folded.threshold(), trained.threshold().map(|t| t / c));
        }
        if matches!(arch, Architecture::Relu { .. }) {
            for row in folded.w_dec_fd().rows() {
                assert!((row.dot(&row).sqrt() - 1.0).abs() < 1e-5);
            }
        }
    }
}

#[test]
fn training_runs_from_a_directory_of_float16_sequence_shards() {
    let dir = temp_dir("f16-shards");
    let (d, seq, tok) = (16, 8, 32);
    let mut all = Vec::new();
    for shard in 0..4 {
        let x = synthetic_batch(seq * tok, d, shard) * 3.0;
        write_npy(
            &dir.join(format!("layer4_{shard:02}.npy")),
            "<f2",
            &[seq, tok, d],
            &f16_bytes(x.as_slice().unwrap()),
        );
        all.push(x);
    }
    // A stray file the directory listing must ignore.
    std::fs::write(dir.join("README.txt"), "not activations").unwrap();
    let shards = Arc::new(NpyShards::open(&[&dir]).unwrap());
    assert_eq!(shards.n_rows(), (4 * seq * tok) as u64);
    assert_eq!(shards.d_model(), d);

    let (train_rows, eval_rows) = holdout(shards, 0.1, 0).unwrap();
    let c = estimate_scale(&train_rows, 0, false).unwrap();
    let loader_config = LoaderConfig {
        batch_size: 128,
        buffer_rows: Some(300),
        chunk_rows: 32,
        scale: c,
        ..LoaderConfig::default()
    };
    let mut loader = Prefetcher::new(Batcher::new(train_rows, loader_config).unwrap());
    let sae_config = SaeConfig {
        d_model: d,
        dict_size: 64,
        arch: Architecture::TopK { k: 4 },
    };
    let steps = 150;
    let train = TrainConfig {
        total_steps: steps,
        warmup_steps: 10,
        lr: Some(5e-3),
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(Sae::new(sae_config, 0).unwrap(), train).unwrap();
    let mut first_fve = None;
    let mut last_fve = 0.0;
    for _ in 0..steps {
        let batch = loader.next_batch().unwrap();
        let stats = trainer.step(batch.view()).unwrap();
        first_fve.get_or_insert(stats.fve);
        last_fve = stats.fve;
    }
    assert!(
        last_fve > 0.8 && last_fve > first_fve.unwrap() + 0.2,
        "fve {first_fve:?} → {last_fve}"
    );

    // The folded SAE reconstructs the held-out raw rows (f16-rounded) as well as training saw.
    let mut sae = trainer.into_sae();
    sae.fold_input_scale(c).unwrap();
    let mut x_eval = Array2::zeros((eval_rows.n_rows() as usize, d));
    eval_rows
        .read_rows(0, x_eval.as_slice_mut().unwrap())
        .unwrap();
    let x_hat = sae
        .decode(&sae.encode(&Cpu, x_eval.view()).unwrap())
        .unwrap();
    let mean = x_eval.mean_axis(Axis(0)).unwrap();
    let total: f32 = (&x_eval - &mean).mapv(|v| v * v).sum();
    let fve = 1.0 - (&x_eval - &x_hat).mapv(|v| v * v).sum() / total;
    assert!(fve > 0.75, "held-out fve {fve}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn batches_from_shards_are_those_from_the_same_rows_in_memory() {
    // Chunks and reads of consecutive rows cross the shard boundaries and the stream's end.
    let dir = temp_dir("data-shards-vs-memory");
    let x = numbered(45);
    let mut paths = Vec::new();
    for (i, rows) in [0..5, 5..12, 12..45].into_iter().enumerate() {
        let part = x.slice(ndarray::s![rows, ..]);
        let bytes: Vec<u8> = part.iter().flat_map(|v| v.to_le_bytes()).collect();
        let path = dir.join(format!("{i}.npy"));
        write_npy(&path, "<f4", &[part.nrows(), 3], &bytes);
        paths.push(path);
    }
    let shards = NpyShards::open(&paths).unwrap();
    let config = config(16, Some(20), 8);
    let mut from_shards = Batcher::new(shards, config.clone()).unwrap();
    let mut in_memory = Batcher::new(x, config).unwrap();
    for _ in 0..10 {
        assert_eq!(
            from_shards.next_batch().unwrap(),
            in_memory.next_batch().unwrap()
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_shard_truncated_while_batching_stops_the_prefetcher_with_an_error() {
    // The loader thread meets the short file: the error reaches the trainer's side as a
    // `DataError` naming the file (through a memory map it was SIGBUS, killing the process).
    let dir = temp_dir("data-shrunk");
    let path = dir.join("acts.npy");
    let (n, d) = (4096, 16);
    let x = synthetic_batch(n, d, 3);
    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_npy(&path, "<f4", &[n, d], &bytes);
    let shards = NpyShards::open(&[&path]).unwrap();
    let config = LoaderConfig {
        batch_size: 64,
        buffer_rows: Some(256),
        chunk_rows: 64,
        prefetch: 1,
        ..LoaderConfig::default()
    };
    let mut loader = Prefetcher::new(Batcher::new(shards, config).unwrap());
    loader.next_batch().unwrap();
    let header = std::fs::metadata(&path).unwrap().len() - bytes.len() as u64;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(header + (8 * d * 4) as u64)
        .unwrap();
    // Rows are drawn from the whole file, so within an epoch the loader needs a row past the
    // first 8.
    let err = (0..2 * n / 64)
        .find_map(|_| loader.next_batch().err())
        .expect("every batch read despite the truncation");
    assert!(
        matches!(&err, Error::Data(DataError::Shrunk { path: p, .. }) if p == &path),
        "{err}"
    );
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    // The loader stays stopped.
    assert!(loader.next_batch().is_err());
    std::fs::remove_dir_all(dir).unwrap();
}

// Part mode: each rank of a distributed job reads only its part of every global batch.

type Rows = Arc<Array2<f32>>;

/// Rank `rank` of `world` in part mode over `x`.
fn part_of(x: &Rows, config: &LoaderConfig, rank: usize, world: usize) -> Batcher<Rows> {
    Batcher::new(x.clone(), config.clone())
        .unwrap()
        .for_part(rank, world)
        .unwrap()
}

/// The parts of every rank's next batch, concatenated in rank order.
fn joined(ranks: &mut [Batcher<Rows>]) -> Array2<f32> {
    let parts: Vec<Array2<f32>> = ranks.iter_mut().map(|b| b.next_batch().unwrap()).collect();
    let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
    ndarray::concatenate(Axis(0), &views).unwrap()
}

/// A source that counts the rows read from it.
struct CountingRows {
    x: Rows,
    rows_read: std::sync::atomic::AtomicU64,
}

impl Source for CountingRows {
    fn d_model(&self) -> usize {
        self.x.ncols()
    }
    fn n_rows(&self) -> u64 {
        self.x.nrows() as u64
    }
    fn read_rows(&self, start: u64, out_nd: &mut [f32]) -> Result<(), DataError> {
        let rows = (out_nd.len() / self.x.ncols()) as u64;
        self.rows_read
            .fetch_add(rows, std::sync::atomic::Ordering::Relaxed);
        self.x.read_rows(start, out_nd)
    }
}

#[test]
fn the_parts_of_every_batch_make_up_the_normal_batch() {
    // (rows, buffer, chunk, batch): a buffer smaller than the data, one holding all of it,
    // single-row, 7-row and 64-row chunks, batches that do not divide the data, a batch
    // larger than the buffer and than the dataset; 20 batches cross several epochs.
    for (n, buffer, chunk, batch) in [
        (700, Some(100), 7, 48),
        (300, Some(64), 1, 36),
        (400, None, 64, 24),
        (130, Some(50), 64, 60),
        (10, Some(3), 7, 12),
    ] {
        let x = numbered(n);
        let config = config(batch, buffer, chunk);
        for world in 1..=4 {
            let mut normal = Batcher::new(x.clone(), config.clone()).unwrap();
            let mut ranks: Vec<_> = (0..world).map(|r| part_of(&x, &config, r, world)).collect();
            for (r, rank) in ranks.iter().enumerate() {
                assert_eq!(rank.part(), Some((r, world)));
                assert_eq!(rank.batch_rows(), batch / world);
            }
            for step in 0..20 {
                let expected = normal.next_batch().unwrap();
                let got = joined(&mut ranks);
                assert_eq!(got, expected, "n={n} world={world} step {step}");
            }
            assert!(normal.epoch() >= 1, "n={n}: the run stayed in one epoch");
            for rank in &ranks {
                assert_eq!(rank.cursor(), normal.cursor(), "n={n} world={world}");
            }
        }
    }
}

#[test]
fn a_part_mode_batcher_reads_only_its_part() {
    let source = Arc::new(CountingRows {
        x: numbered(2000),
        rows_read: 0.into(),
    });
    let mut rank = Batcher::new(source.clone(), config(64, Some(500), 16))
        .unwrap()
        .for_part(3, 4)
        .unwrap();
    for _ in 0..10 {
        let x_bd = rank.next_batch().unwrap();
        assert_eq!(x_bd.nrows(), 16);
        check_rows(&x_bd);
    }
    // No buffer fill, no refill: 16 rows a batch, nothing more.
    let read = source.rows_read.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(read, 10 * 16);
}

#[test]
fn cursors_pass_between_normal_mode_and_any_rank_count() {
    // Epoch boundaries fall inside the run (500 rows, 48 a batch).
    let x = numbered(500);
    let config = config(48, Some(80), 7);
    let total = 25;
    let mut reference = Batcher::new(x.clone(), config.clone()).unwrap();
    let all: Vec<Array2<f32>> = (0..total)
        .map(|_| reference.next_batch().unwrap())
        .collect();
    let restore = |cursor: &Cursor, world: usize| -> Vec<Batcher<Rows>> {
        (0..world)
            .map(|r| {
                Batcher::new(x.clone(), config.clone())
                    .unwrap()
                    .for_part(r, world)
                    .unwrap()
                    .resume(cursor)
                    .unwrap()
            })
            .collect()
    };
    for cut in [0, 3, 10, 11, 17] {
        // Normal → part with N ranks.
        let mut normal = Batcher::new(x.clone(), config.clone()).unwrap();
        (0..cut).for_each(|_| drop(normal.next_batch().unwrap()));
        for world in 1..=4 {
            let mut ranks = restore(&normal.cursor(), world);
            for (step, expected) in all.iter().enumerate().skip(cut) {
                assert_eq!(
                    &joined(&mut ranks),
                    expected,
                    "normal→{world} cut {cut} step {step}"
                );
            }
        }
        for from in 1..=4 {
            let mut ranks: Vec<_> = (0..from).map(|r| part_of(&x, &config, r, from)).collect();
            (0..cut).for_each(|_| drop(joined(&mut ranks)));
            let cursor = ranks[0].cursor();
            assert!(ranks.iter().all(|r| r.cursor() == cursor), "ranks disagree");
            let cursor: Cursor =
                serde_json::from_str(&serde_json::to_string(&cursor).unwrap()).unwrap();
            // Part with N ranks → part with M ranks.
            for to in 1..=4 {
                let mut ranks = restore(&cursor, to);
                for (step, expected) in all.iter().enumerate().skip(cut) {
                    assert_eq!(
                        &joined(&mut ranks),
                        expected,
                        "{from}→{to} cut {cut} step {step}"
                    );
                }
            }
            // Part → normal.
            let mut normal = Batcher::with_cursor(x.clone(), config.clone(), &cursor).unwrap();
            for (step, expected) in all.iter().enumerate().skip(cut) {
                assert_eq!(
                    &normal.next_batch().unwrap(),
                    expected,
                    "{from}→normal cut {cut} step {step}"
                );
            }
        }
    }
}

/// Where row `row` is first drawn: (batch, position in it), from a clean dataset of `n` rows
/// (the draws never depend on the values).
fn first_draw(n: usize, config: &LoaderConfig, row: u64) -> (usize, usize) {
    let mut clean = Batcher::new(numbered(n), config.clone()).unwrap();
    let seen = ids(&mut clean, 100);
    let at = seen.iter().position(|&r| r == row).unwrap();
    (at / config.batch_size, at % config.batch_size)
}

#[test]
fn a_non_finite_row_in_a_part_stops_that_rank_naming_the_row() {
    let config = config(48, Some(64), 8);
    let (batch, pos) = first_draw(200, &config, 123);
    let x = with_bad_rows(200, &[123]);
    let world = 4;
    let mut ranks: Vec<_> = (0..world).map(|r| part_of(&x, &config, r, world)).collect();
    for _ in 0..batch {
        joined(&mut ranks);
    }
    for (r, rank) in ranks.iter_mut().enumerate() {
        let result = rank.next_batch();
        if r == pos / 12 {
            let err = result.unwrap_err();
            assert!(
                matches!(err, Error::Data(DataError::NonFinite { .. })),
                "{err}"
            );
            assert!(err.to_string().contains("row 123"), "{err}");
        } else {
            check_rows(&result.unwrap());
        }
    }
}

#[test]
fn a_skipped_row_is_dropped_from_its_part_and_counted_there() {
    let bad = [17u64, 123];
    let config = LoaderConfig {
        skip_non_finite: true,
        ..config(48, Some(64), 8)
    };
    let mut clean = Batcher::new(numbered(200), config.clone()).unwrap();
    let x = with_bad_rows(200, &[17, 123]);
    let world = 3;
    let mut ranks: Vec<_> = (0..world).map(|r| part_of(&x, &config, r, world)).collect();
    let mut served_bad = 0;
    let mut short = 0;
    for step in 0..20 {
        let expected = clean.next_batch().unwrap();
        for (r, rank) in ranks.iter_mut().enumerate() {
            let part = rank.next_batch().unwrap();
            check_rows(&part);
            let want: Vec<u64> = expected
                .slice(ndarray::s![r * 16..(r + 1) * 16, ..])
                .column(0)
                .iter()
                .map(|&v| v as u64)
                .filter(|row| !bad.contains(row))
                .collect();
            let got: Vec<u64> = part.column(0).iter().map(|&v| v as u64).collect();
            assert_eq!(got, want, "step {step} rank {r}");
            served_bad += 16 - want.len();
            short += usize::from(part.nrows() < 16);
        }
    }
    // 20 batches of 48 cover the 200 rows more than four times.
    assert!(served_bad >= 8, "{served_bad}");
    assert!(short >= 4, "{short}");
    let skipped: u64 = ranks.iter().map(|r| r.skipped_rows()).sum();
    assert_eq!(skipped, served_bad as u64);
}

#[test]
fn a_part_mode_cursor_holding_a_bad_row_restores_in_normal_mode() {
    let config = LoaderConfig {
        skip_non_finite: true,
        ..config(20, Some(64), 8)
    };
    let x = with_bad_rows(200, &[123]);
    let mut ranks: Vec<_> = (0..2).map(|r| part_of(&x, &config, r, 2)).collect();
    let mut steps = 0;
    while !ranks[0].cursor().slot_rows.contains(&123) {
        joined(&mut ranks);
        steps += 1;
        assert!(steps < 50, "row 123 never entered the buffer");
    }
    let cursor = ranks[0].cursor();
    // One process continues on the batches the two ranks would have had, the bad row dropped
    // from the one that draws it.
    let mut normal = Batcher::with_cursor(x.clone(), config.clone(), &cursor).unwrap();
    let mut met = false;
    for step in 0..30 {
        let expected = joined(&mut ranks);
        let batch = normal.next_batch().unwrap();
        assert_eq!(batch, expected, "step {step}");
        met |= batch.nrows() < 20;
    }
    assert!(met, "row 123 was never drawn");
    assert_eq!(
        normal.skipped_rows(),
        ranks.iter().map(|r| r.skipped_rows()).sum::<u64>()
    );
    // Without skipping, the bad row is an error naming it when a batch draws it.
    let strict = LoaderConfig {
        skip_non_finite: false,
        ..config
    };
    let mut normal = Batcher::with_cursor(x, strict, &cursor).unwrap();
    let err = (0..30)
        .find_map(|_| normal.next_batch().err())
        .expect("served a bad row");
    assert!(err.to_string().contains("row 123"), "{err}");
}

#[test]
fn a_batch_that_does_not_split_over_the_ranks_is_a_distributed_error() {
    let x = numbered(100);
    let refused = |batch: usize, rank: usize, world: usize| match Batcher::new(
        x.clone(),
        config(batch, None, 8),
    )
    .unwrap()
    .for_part(rank, world)
    {
        Err(err @ Error::Distributed { .. }) => err.to_string(),
        Err(err) => panic!("wrong error: {err}"),
        Ok(_) => panic!("accepted batch {batch} over {world} ranks"),
    };
    let line = refused(50, 0, 4);
    for needle in ["--batch-size 50", "4 ranks", "divisible by 4", "48 or 52"] {
        assert!(line.contains(needle), "{line}");
    }
    assert!(refused(3, 1, 4).contains("such as 4"));
    refused(8, 4, 4);
    assert!(Batcher::new(x, config(48, None, 8))
        .unwrap()
        .for_part(2, 3)
        .is_ok());
}

#[test]
fn prefetched_parts_are_the_synchronous_parts() {
    // Clean data, and data whose skipped rows make some parts shorter.
    for (x, skip) in [
        (numbered(1234), false),
        (with_bad_rows(1234, &[5, 600, 601]), true),
    ] {
        let config = LoaderConfig {
            skip_non_finite: skip,
            ..config(96, Some(300), 16)
        };
        for rank in 0..3 {
            let mut sync = part_of(&x, &config, rank, 3);
            let mut prefetcher = Prefetcher::new(part_of(&x, &config, rank, 3));
            for step in 0..40 {
                let expected = sync.next_batch().unwrap();
                let batch = prefetcher.next_batch().unwrap();
                assert_eq!(batch.view(), expected.view(), "rank {rank} step {step}");
                assert_eq!(
                    prefetcher.cursor(),
                    &sync.cursor(),
                    "rank {rank} step {step}"
                );
            }
            assert_eq!(prefetcher.skipped_rows(), sync.skipped_rows());
            if skip {
                assert!(sync.skipped_rows() > 0, "rank {rank} met no bad row");
            }
        }
    }
}
