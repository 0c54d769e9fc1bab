//! The `cuda` feature. Without a GPU only the error paths run; the GPU tests are ignored unless
//! asked for: `SAE_TEST_CUDA=1 cargo test --features cuda --test cuda -- --ignored`.
#![cfg(feature = "cuda")]

mod common;

use common::assert_close;
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparse_autoencoder::backend::cuda::{compile_kernels, CudaDevice};
use sparse_autoencoder::backend::{Backend, Cpu, Device, Gpu};
use sparse_autoencoder::{Architecture, ReluVariant, Sae, SaeConfig, TrainConfig, Trainer};

fn gpu_tests_wanted() -> bool {
    std::env::var("SAE_TEST_CUDA").is_ok_and(|v| v == "1")
}

#[test]
fn opening_a_gpu_never_panics_and_names_what_is_missing() {
    // No such GPU on any machine: the error must name the device and how to pick one, or
    // (without a driver or libraries) what is missing.
    let err = Device::cuda(999).check().unwrap_err().to_string();
    assert!(err.starts_with("device cuda:999: "), "{err}");
    assert!(
        err.contains("GPU(s), numbered from 0")
            || err.contains("not found")
            || err.contains("found no GPU"),
        "{err}"
    );
    if !gpu_tests_wanted() {
        // CI machines have no NVIDIA driver: the error says so and how to fix it.
        let err = Device::cuda(0).check().unwrap_err().to_string();
        assert!(
            err.contains("libcuda.so") || err.contains("found no GPU"),
            "{err}"
        );
    }
}

/// NVRTC needs no GPU: wherever the library loads (e.g. from PyTorch's `nvidia` wheels on
/// LD_LIBRARY_PATH), the kernels must compile; elsewhere the error must say what is missing.
#[test]
fn kernels_compile_with_nvrtc_or_the_error_names_it() {
    // SAFETY: only tries to load the library.
    let present = unsafe { cudarc::nvrtc::sys::is_culib_present() };
    // CI installs NVRTC from PyPI and sets this, so a broken kernel cannot pass as "no NVRTC".
    if std::env::var("SAE_REQUIRE_NVRTC").is_ok_and(|v| v == "1") {
        assert!(present, "SAE_REQUIRE_NVRTC=1 but libnvrtc.so does not load");
    }
    match compile_kernels() {
        Ok(ptx) => {
            assert!(present);
            let src = ptx.to_src();
            for kernel in ["sub_row", "decode_csr"] {
                assert!(
                    src.contains(&format!(".entry {kernel}")),
                    "{kernel} missing"
                );
            }
        }
        Err(e) => {
            let e = e.to_string();
            assert!(!present && e.contains("libnvrtc.so"), "{e}");
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: SAE_TEST_CUDA=1 cargo test --features cuda -- --ignored"]
fn sub_row_and_sparse_decode_match_the_cpu() {
    let gpu = CudaDevice::open(Gpu {
        ordinal: 0,
        tf32: false,
    })
    .expect("a GPU");
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (b, d, f, k) = (67, 96, 512, 9);
    let config = SaeConfig {
        d_model: d,
        dict_size: f,
        arch: Architecture::TopK { k },
    };
    let sae = Sae::new(config, 3).unwrap();
    let x_bd = random(b, d, &mut rng);
    let codes = sae.encode(&Cpu, x_bd.view()).unwrap();
    assert!(codes.nnz() > 0);

    let dx = gpu.upload(x_bd.view()).unwrap();
    let b_dec = gpu.upload_vec(sae.b_dec_d()).unwrap();
    let mut xc = gpu.zeros(b, d).unwrap();
    gpu.sub_row(&dx, &b_dec, &mut xc).unwrap();
    let expected = &x_bd - &sae.b_dec_d();
    assert_eq!(gpu.download(&xc).unwrap(), expected, "x − b_dec is exact");

    let w_dec = gpu.upload(sae.w_dec_fd()).unwrap();
    let dcodes = gpu.upload_codes(&codes).unwrap();
    let mut x_hat = gpu.zeros(b, d).unwrap();
    gpu.decode(&dcodes, &w_dec, Some(&b_dec), &mut x_hat)
        .unwrap();
    let expected = sae.decode(&codes).unwrap();
    assert_close("decode", &gpu.download(&x_hat).unwrap(), &expected, 1e-4);
}

fn random(rows: usize, cols: usize, rng: &mut ChaCha8Rng) -> Array2<f32> {
    Array2::from_shape_fn((rows, cols), |_| rng.gen::<f32>() - 0.5)
}

#[test]
#[ignore = "needs an NVIDIA GPU: SAE_TEST_CUDA=1 cargo test --features cuda -- --ignored"]
fn gemm_matches_the_cpu_for_every_transpose() {
    let gpu = CudaDevice::open(Gpu {
        ordinal: 0,
        tf32: false,
    })
    .expect("a GPU");
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
        let what = format!("gemm, trans_a {trans_a} trans_b {trans_b}");
        assert_close(&what, &gpu.download(&dc).unwrap(), &expected, 1e-4);
    }
}

/// `tf32: true` changes how the GEMM rounds (else the option would do nothing), by about TF32's
/// 10-bit mantissa; `tf32: false` stays within f32 rounding of the CPU.
#[test]
#[ignore = "needs an NVIDIA GPU: SAE_TEST_CUDA=1 cargo test --features cuda -- --ignored"]
fn tf32_rounds_the_gemm_and_is_off_by_default() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (m, k, n) = (256, 768, 512);
    let (a, b) = (random(m, k, &mut rng), random(n, k, &mut rng));
    let mut expected = Array2::zeros((m, n));
    Cpu.gemm(1.0, a.view(), b.t(), 0.0, expected.view_mut());
    let product = |tf32: bool| {
        let gpu = CudaDevice::open(Gpu { ordinal: 0, tf32 }).expect("a GPU");
        let (da, db) = (gpu.upload(a.view()).unwrap(), gpu.upload(b.view()).unwrap());
        let mut dc = gpu.zeros(m, n).unwrap();
        gpu.gemm(1.0, &da, false, &db, true, 0.0, &mut dc).unwrap();
        gpu.download(&dc).unwrap()
    };
    let scale = expected.iter().fold(0f32, |s, v| s.max(v.abs()));
    let worst = |c: &Array2<f32>| {
        c.iter()
            .zip(&expected)
            .fold(0f32, |w, (x, y)| w.max((x - y).abs()))
            / scale
    };
    let (full, tf32) = (worst(&product(false)), worst(&product(true)));
    assert!(full <= 1e-5, "f32 GEMM off by {full}");
    assert!(tf32 > 1e-5 && tf32 <= 1e-2, "TF32 GEMM off by {tf32}");
}

#[test]
#[ignore = "needs an NVIDIA GPU: SAE_TEST_CUDA=1 cargo test --features cuda -- --ignored"]
fn gemm_rejects_mismatched_shapes() {
    let gpu = CudaDevice::open(Gpu {
        ordinal: 0,
        tf32: false,
    })
    .expect("a GPU");
    let a = gpu.zeros(4, 3).unwrap();
    let b = gpu.zeros(5, 2).unwrap();
    let mut c = gpu.zeros(4, 2).unwrap();
    let err = gpu
        .gemm(1.0, &a, false, &b, false, 0.0, &mut c)
        .unwrap_err();
    assert!(err.to_string().contains("GEMM operands 4×3 · 5×2"), "{err}");
}

/// A trainer for `arch` at a small shape, with AuxK's dead latents reached within a few steps.
fn trainer_for(arch: Architecture, d: usize, f: usize) -> Trainer {
    let config = SaeConfig {
        d_model: d,
        dict_size: f,
        arch,
    };
    let train = TrainConfig {
        total_steps: 8,
        warmup_steps: 2,
        sparsity_warmup_steps: 2,
        lr: Some(1e-3),
        dead_tokens: 512,
        l1_coefficient: 0.05,
        threshold_start_step: 1,
        ..TrainConfig::default()
    };
    Trainer::new(Sae::new(config, 5).unwrap(), train).unwrap()
}

/// Every architecture trains on the GPU as on the CPU: per-step statistics and the final
/// parameters, moments and counters within 1e-4 relative. The (D, F, B, k) cases include one
/// whose latents fire on hundreds of rows, which takes the long-segment path of the backward
/// pass's latent-major sort, and one with dead latents (AuxK active). Batches over 1024 rows
/// upload in chunks, the last one partial at B=2100.
#[test]
#[ignore = "needs an NVIDIA GPU: SAE_TEST_CUDA=1 cargo test --features cuda -- --ignored"]
fn device_training_matches_the_cpu() {
    let unit_decoder = Architecture::Relu {
        variant: ReluVariant::UnitDecoder,
    };
    let cases = [
        (Architecture::TopK { k: 8 }, 48, 1536, 512),
        (Architecture::BatchTopK { k: 8 }, 48, 1536, 512),
        (Architecture::TopK { k: 16 }, 32, 64, 2048),
        (Architecture::BatchTopK { k: 16 }, 32, 64, 2100),
        (Architecture::RELU, 48, 1536, 512),
        (unit_decoder, 48, 1536, 512),
    ];
    for (arch, d, f, b) in cases {
        let what = format!("{arch:?} D={d} F={f} B={b}");
        let mut cpu = trainer_for(arch, d, f);
        let mut gpu = trainer_for(arch, d, f).to_device(Device::cuda(0)).unwrap();
        let (mut cpu_loss, mut gpu_loss) = (vec![], vec![]);
        let mut saw_dead = false;
        for step in 0..6 {
            let x = common::synthetic_batch(b, d, 100 + step);
            let (c, g) = (cpu.step(x.view()).unwrap(), gpu.step(x.view()).unwrap());
            cpu_loss.extend([c.loss, c.mse, c.aux, c.fve, c.l0]);
            gpu_loss.extend([g.loss, g.mse, g.aux, g.fve, g.l0]);
            assert_eq!(c.dead_fraction, g.dead_fraction, "{what}: dead latents");
            assert_eq!(c.threshold.is_some(), g.threshold.is_some(), "{what}: θ");
            if let (Some(a), Some(b)) = (c.threshold, g.threshold) {
                assert!((a - b).abs() <= 1e-4 * a.abs(), "{what}: θ {a} vs {b}");
            }
            saw_dead |= c.dead_fraction > 0.0;
        }
        if !matches!(arch, Architecture::Relu { .. }) && f == 1536 {
            assert!(saw_dead, "{what}: AuxK must be exercised");
        }
        assert_close(
            &format!("{what}: stats"),
            &ndarray::Array1::from(gpu_loss),
            &ndarray::Array1::from(cpu_loss),
            1e-4,
        );
        gpu.sync().unwrap();
        let (c, g) = (cpu.sae(), gpu.sae());
        assert_close(
            &format!("{what}: W_enc"),
            &g.w_enc_fd().to_owned(),
            &c.w_enc_fd().to_owned(),
            1e-4,
        );
        assert_close(
            &format!("{what}: W_dec"),
            &g.w_dec_fd().to_owned(),
            &c.w_dec_fd().to_owned(),
            1e-4,
        );
        assert_close(
            &format!("{what}: b_enc"),
            &g.b_enc_f().to_owned(),
            &c.b_enc_f().to_owned(),
            1e-4,
        );
        assert_close(
            &format!("{what}: b_dec"),
            &g.b_dec_d().to_owned(),
            &c.b_dec_d().to_owned(),
            1e-4,
        );
        assert_close(
            &format!("{what}: Adam v"),
            &gpu.adam().v.w_dec_fd,
            &cpu.adam().v.w_dec_fd,
            1e-4,
        );
        assert_eq!(gpu.tokens_since_fired(), cpu.tokens_since_fired(), "{what}");
    }
}

/// Same seed and data give the same bits on the GPU, run after run.
#[test]
#[ignore = "needs an NVIDIA GPU: SAE_TEST_CUDA=1 cargo test --features cuda -- --ignored"]
fn device_training_is_deterministic() {
    for arch in [Architecture::BatchTopK { k: 16 }, Architecture::RELU] {
        let run = || {
            let mut t = trainer_for(arch, 32, 64)
                .to_device(Device::cuda(0))
                .unwrap();
            for step in 0..4 {
                t.step(common::synthetic_batch(2048, 32, step).view())
                    .unwrap();
            }
            t.sync().unwrap();
            t.state()
        };
        assert!(run() == run(), "{arch:?}: two runs differ");
    }
}

/// `Sae::encoder` on the GPU gives `Sae::encode`'s codes: every architecture, BatchTopK both
/// before θ is learned (the batch's own top k·B) and after (the threshold).
#[test]
#[ignore = "needs an NVIDIA GPU: SAE_TEST_CUDA=1 cargo test --features cuda -- --ignored"]
fn device_encoding_matches_the_cpu() {
    // 2500 rows: three upload chunks, the last one partial.
    let (d, f, b) = (48, 1536, 2500);
    for arch in [
        Architecture::RELU,
        Architecture::TopK { k: 12 },
        Architecture::BatchTopK { k: 12 },
    ] {
        let mut t = trainer_for(arch, d, f);
        for step in 0..3 {
            t.step(common::synthetic_batch(512, d, step).view())
                .unwrap();
        }
        let trained = t.into_sae();
        let fresh = Sae::new(
            SaeConfig {
                d_model: d,
                dict_size: f,
                arch,
            },
            9,
        )
        .unwrap();
        for sae in [&fresh, &trained] {
            let what = format!("{arch:?} θ {:?}", sae.threshold());
            let x = common::synthetic_batch(b, d, 77);
            let cpu = sae.encode(&Cpu, x.view()).unwrap();
            let mut encoder = sae.encoder(Device::cuda(0)).unwrap();
            let gpu = encoder.encode(x.view()).unwrap();
            assert!(cpu.nnz() > 0, "{what}");
            assert_eq!(gpu.indptr, cpu.indptr, "{what}: row lengths");
            assert_eq!(gpu.indices, cpu.indices, "{what}: active latents");
            assert_close(
                &what,
                &ndarray::Array1::from(gpu.values.clone()),
                &ndarray::Array1::from(cpu.values.clone()),
                1e-4,
            );
            // A second batch of another size through the same encoder.
            let x2 = common::synthetic_batch(33, d, 78);
            assert_eq!(
                encoder.encode(x2.view()).unwrap().indices,
                sae.encode(&Cpu, x2.view()).unwrap().indices,
                "{what}: second batch"
            );
        }
    }
}

/// `evaluate_on` a GPU gives `evaluate`'s statistics on the CPU.
#[test]
#[ignore = "needs an NVIDIA GPU: SAE_TEST_CUDA=1 cargo test --features cuda -- --ignored"]
fn device_evaluation_matches_the_cpu() {
    use sparse_autoencoder::eval::{evaluate, evaluate_on};
    let sae = Sae::new(
        SaeConfig {
            d_model: 48,
            dict_size: 1536,
            arch: Architecture::TopK { k: 12 },
        },
        4,
    )
    .unwrap();
    let x = common::synthetic_batch(1000, 48, 5);
    let cpu = evaluate(&sae, &Cpu, &x.view(), 300, false).unwrap();
    let gpu = evaluate_on(&sae, Device::cuda(0), &x.view(), 300, false).unwrap();
    assert_eq!((gpu.n_rows, gpu.l0), (cpu.n_rows, cpu.l0));
    assert!(
        (gpu.mse - cpu.mse).abs() <= 1e-5 * cpu.mse,
        "{} vs {}",
        gpu.mse,
        cpu.mse
    );
    assert!(
        (gpu.fve - cpu.fve).abs() <= 1e-5,
        "{} vs {}",
        gpu.fve,
        cpu.fve
    );
    assert_eq!(gpu.dead_fraction, cpu.dead_fraction);
}
