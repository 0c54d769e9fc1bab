//! The `cuda` feature. Without a GPU only the error paths run; the GPU tests are ignored unless
//! asked for: `SAE_TEST_CUDA=1 cargo test --features cuda --test cuda -- --ignored`.
#![cfg(feature = "cuda")]

use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparse_autoencoder::backend::cuda::CudaDevice;
use sparse_autoencoder::backend::{Backend, Cpu, Device};

fn gpu_tests_wanted() -> bool {
    std::env::var("SAE_TEST_CUDA").is_ok_and(|v| v == "1")
}

#[test]
fn opening_a_gpu_never_panics_and_names_what_is_missing() {
    // No such GPU on any machine: the error must name the device and how to pick one, or
    // (without a driver or libraries) what is missing.
    let err = Device::Cuda(999).check().unwrap_err().to_string();
    assert!(err.starts_with("device cuda:999: "), "{err}");
    assert!(
        err.contains("GPU(s), numbered from 0")
            || err.contains("not found")
            || err.contains("found no GPU"),
        "{err}"
    );
    if !gpu_tests_wanted() {
        // CI machines have no NVIDIA driver: the error says so and how to fix it.
        let err = Device::Cuda(0).check().unwrap_err().to_string();
        assert!(
            err.contains("libcuda.so") || err.contains("found no GPU"),
            "{err}"
        );
    }
}

fn random(rows: usize, cols: usize, rng: &mut ChaCha8Rng) -> Array2<f32> {
    Array2::from_shape_fn((rows, cols), |_| rng.gen::<f32>() - 0.5)
}

#[test]
#[ignore = "needs an NVIDIA GPU: SAE_TEST_CUDA=1 cargo test --features cuda -- --ignored"]
fn gemm_matches_the_cpu_for_every_transpose() {
    let gpu = CudaDevice::open(0).expect("a GPU");
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let (m, k, n) = (37, 300, 53);
    for (trans_a, trans_b) in [(false, false), (false, true), (true, false), (true, true)] {
        let a = if trans_a {
            random(k, m, &mut rng)
        } else {
            random(m, k, &mut rng)
        };
        let b = if trans_b {
            random(n, k, &mut rng)
        } else {
            random(k, n, &mut rng)
        };
        let c0 = random(m, n, &mut rng);
        let (av, bv) = (
            if trans_a { a.t() } else { a.view() },
            if trans_b { b.t() } else { b.view() },
        );
        let mut expected = c0.clone();
        Cpu.gemm(0.5, av, bv, 2.0, expected.view_mut());

        let (da, db) = (gpu.upload(a.view()).unwrap(), gpu.upload(b.view()).unwrap());
        let mut dc = gpu.upload(c0.view()).unwrap();
        gpu.gemm(0.5, &da, trans_a, &db, trans_b, 2.0, &mut dc)
            .unwrap();
        let got = gpu.download(&dc).unwrap();
        let scale = expected.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let worst = (&got - &expected)
            .iter()
            .fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(
            worst <= 1e-4 * scale,
            "trans_a {trans_a} trans_b {trans_b}: max error {worst} at scale {scale}"
        );
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: SAE_TEST_CUDA=1 cargo test --features cuda -- --ignored"]
fn gemm_rejects_mismatched_shapes() {
    let gpu = CudaDevice::open(0).expect("a GPU");
    let a = gpu.zeros(4, 3).unwrap();
    let b = gpu.zeros(5, 2).unwrap();
    let mut c = gpu.zeros(4, 2).unwrap();
    let err = gpu
        .gemm(1.0, &a, false, &b, false, 0.0, &mut c)
        .unwrap_err();
    assert!(err.to_string().contains("GEMM operands 4×3 · 5×2"), "{err}");
}
