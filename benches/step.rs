//! One BatchTopK training step at D=768, F=16384, k=64, B=4096, beside the bare encoder GEMM
//! (4096×768)·(768×16384) that bounds it from below. Run: `cargo bench --bench step`.

use criterion::{criterion_group, criterion_main, Criterion};
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparse_autoencoder::backend::{Backend, Cpu};
use sparse_autoencoder::{Architecture, Sae, SaeConfig, TrainConfig, Trainer};

const B: usize = 4096;
const D: usize = 768;
const F: usize = 16384;
const K: usize = 64;

fn batch() -> Array2<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    Array2::from_shape_simple_fn((B, D), || rng.gen::<f32>() - 0.5)
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("step_d768_f16384_k64_b4096");
    group.sample_size(10);
    let x_bd = batch();

    let w_fd = Array2::from_shape_fn((F, D), |(f, d)| ((f * 31 + d * 17) % 97) as f32 * 1e-3);
    let mut out_bf = Array2::<f32>::zeros((B, F));
    group.bench_function("encoder_gemm", |b| {
        b.iter(|| Cpu.gemm(1.0, x_bd.view(), w_fd.t(), 0.0, out_bf.view_mut()))
    });
    drop(out_bf);

    for (name, arch) in [
        ("batchtopk_step", Architecture::BatchTopK { k: K }),
        ("topk_step", Architecture::TopK { k: K }),
    ] {
        let sae = Sae::new(
            SaeConfig {
                d_model: D,
                dict_size: F,
                arch,
            },
            0,
        )
        .unwrap();
        let config = TrainConfig {
            total_steps: 1_000_000,
            warmup_steps: 0,
            ..TrainConfig::default()
        };
        let mut trainer = Trainer::new(sae, config).unwrap();
        trainer.step(x_bd.view()).unwrap();
        group.bench_function(name, |b| b.iter(|| trainer.step(x_bd.view()).unwrap()));
        eprintln!("{name}: last step's phases {:?}", trainer.phase_times());
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
