//! Loader throughput and its cost to training. Run: `cargo bench --bench loader`.
//!
//! `loader_4096x768`: batches of 4096×768 f32 delivered by shuffle buffer + prefetch thread
//! from a page-cached [seq, tok, D] float32 file and a float16 one of 2¹⁹ rows, with the
//! default buffer (the whole file here) and a 2¹⁷-row one. Throughput is in delivered f32
//! bytes; the target is ≥ 2 GB/s on a 2-core machine.
//!
//! `step_d768_f16384_k64_b4096`: one BatchTopK training step fed by a batch already in memory
//! and by the loader (each shard type); the target is the loader-fed step within 3 % of the
//! in-memory one.
//!
//! The shards (1.5 GiB and 0.75 GiB) are written once under the system temporary directory
//! (or `SAE_BENCH_DIR`) and reused; delete `sae-bench-loader/` there to reclaim the space.

use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use half::f16;
use npyz::WriterBuilder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparse_autoencoder::data::{Batcher, LoaderConfig, NpyShards, Prefetcher};
use sparse_autoencoder::{Architecture, Sae, SaeConfig, TrainConfig, Trainer};

const B: usize = 4096;
const D: usize = 768;
const F: usize = 16384;
const K: usize = 64;
const SEQ: usize = 1024;
const TOK: usize = 512;

/// A deterministic activation-like value: a per-column offset plus uniform noise.
fn values(seed: u64) -> impl Iterator<Item = f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..SEQ * TOK * D).map(move |i| ((i % D) as f32 * 1e-3) + rng.gen::<f32>() - 0.5)
}

/// The shard `name`, written (to a temporary name, then renamed, so an interrupted run never
/// leaves a short file behind) if it is not there yet.
fn shard<T: npyz::Serialize + npyz::AutoSerialize>(
    dir: &Path,
    name: &str,
    convert: impl Fn(f32) -> T,
) -> PathBuf {
    let path = dir.join(name);
    if path.exists() {
        return path;
    }
    eprintln!("writing {} ...", path.display());
    let partial = dir.join(format!("{name}.partial"));
    let file = std::fs::File::create(&partial).expect("creating the bench shard");
    let mut writer = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&[SEQ as u64, TOK as u64, D as u64])
        .writer(BufWriter::with_capacity(1 << 22, file))
        .begin_nd()
        .expect("writing the bench shard's header");
    writer
        .extend(values(0).map(convert))
        .expect("writing the bench shard");
    writer.finish().expect("finishing the bench shard");
    std::fs::rename(&partial, &path).expect("renaming the bench shard");
    path
}

fn shards() -> [(&'static str, PathBuf); 2] {
    let dir = std::env::var_os("SAE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join("sae-bench-loader");
    std::fs::create_dir_all(&dir).expect("creating the bench directory");
    [
        ("f32", shard(&dir, "acts_f32.npy", |v| v)),
        ("f16", shard(&dir, "acts_f16.npy", f16::from_f32)),
    ]
}

fn prefetcher(path: &Path, buffer_rows: Option<usize>) -> Prefetcher {
    let source = NpyShards::open(&[path]).expect("opening the bench shard");
    let config = LoaderConfig {
        batch_size: B,
        buffer_rows,
        ..LoaderConfig::default()
    };
    Prefetcher::new(Batcher::new(source, config).expect("building the loader"))
}

fn bench(c: &mut Criterion) {
    let shards = shards();

    let mut group = c.benchmark_group("loader_4096x768");
    group.throughput(Throughput::Bytes((B * D * 4) as u64));
    group.measurement_time(Duration::from_secs(10));
    for (dtype, path) in &shards {
        for (buffer, buffer_rows) in [("default_buffer", None), ("buffer_2^17", Some(1 << 17))] {
            let mut loader = prefetcher(path, buffer_rows);
            // Past the first fill, which reads the whole buffer before the first batch.
            loader.next_batch().unwrap();
            group.bench_function(format!("{dtype}_{buffer}"), |b| {
                b.iter(|| loader.next_batch().unwrap())
            });
        }
    }
    group.finish();

    let mut group = c.benchmark_group("step_d768_f16384_k64_b4096");
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    let sae_config = SaeConfig {
        d_model: D,
        dict_size: F,
        arch: Architecture::BatchTopK { k: K },
    };
    let train_config = TrainConfig {
        total_steps: 1_000_000,
        warmup_steps: 0,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(Sae::new(sae_config, 0).unwrap(), train_config).unwrap();

    let (_, f32_path) = &shards[0];
    let x_bd = prefetcher(f32_path, None)
        .next_batch()
        .unwrap()
        .into_array();
    trainer.step(x_bd.view()).unwrap();
    group.bench_function("batch_in_memory", |b| {
        b.iter(|| trainer.step(x_bd.view()).unwrap())
    });
    for (dtype, path) in &shards {
        let mut loader = prefetcher(path, None);
        trainer.step(loader.next_batch().unwrap().view()).unwrap();
        group.bench_function(format!("loader_{dtype}"), |b| {
            b.iter(|| trainer.step(loader.next_batch().unwrap().view()).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
