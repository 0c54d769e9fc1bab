//! Helpers shared by the integration tests.
#![allow(dead_code)]

use ndarray::{Array, Array1, Array2, ArrayView2, Dimension};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparse_autoencoder::{Architecture, Sae, SaeConfig};

/// max_i |a_i − b_i| / max_i |b_i|: the error relative to the reference array's scale.
pub fn rel_err<D: Dimension>(a: &Array<f32, D>, reference: &Array<f32, D>) -> f64 {
    assert_eq!(a.shape(), reference.shape(), "shapes differ");
    let scale = reference
        .iter()
        .fold(0.0f64, |m, &v| m.max((v as f64).abs()));
    let diff = a
        .iter()
        .zip(reference)
        .fold(0.0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    if scale == 0.0 {
        diff
    } else {
        diff / scale
    }
}

/// Asserts `rel_err(a, reference) <= tol`, naming `what`.
#[track_caller]
pub fn assert_close<D: Dimension>(
    what: &str,
    a: &Array<f32, D>,
    reference: &Array<f32, D>,
    tol: f64,
) {
    let err = rel_err(a, reference);
    if std::env::var("SAE_PRINT_ERRORS").is_ok() {
        eprintln!("{what}: {err:e}");
    }
    assert!(err <= tol, "{what}: relative error {err:e} > {tol:e}");
}

/// Activation-like data: an offset plus sparse non-negative mixtures of 2D + 3 fixed random
/// directions (the same for every `seed` of a given `d`; `seed` picks the rows).
pub fn synthetic_batch(b: usize, d: usize, seed: u64) -> Array2<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(d as u64);
    let dirs = Array2::from_shape_fn((2 * d + 3, d), |_| rng.gen::<f32>() * 2.0 - 1.0);
    let offset = Array1::from_shape_fn(d, |_| rng.gen::<f32>());
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut x = Array2::zeros((b, d));
    for mut row in x.rows_mut() {
        row.assign(&offset);
        for _ in 0..3 {
            let g = rng.gen_range(0..dirs.nrows());
            row.scaled_add(rng.gen::<f32>() * 2.0, &dirs.row(g));
        }
        row.mapv_inplace(|v| v + 0.05 * (rng.gen::<f32>() - 0.5));
    }
    x
}

/// An SAE with random (not unit-norm, not tied) parameters, so gradient checks see the
/// general case.
pub fn random_sae(arch: Architecture, d: usize, f: usize, seed: u64) -> Sae {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut u = |scale: f32| rng.gen::<f32>() * 2.0 * scale - scale;
    let w_enc = Array2::from_shape_fn((f, d), |_| u(0.5));
    let b_enc = Array1::from_shape_fn(f, |_| u(0.3));
    let w_dec = Array2::from_shape_fn((f, d), |_| u(0.5));
    let b_dec = Array1::from_shape_fn(d, |_| u(0.3));
    let config = SaeConfig {
        d_model: d,
        dict_size: f,
        arch,
    };
    Sae::from_parts(config, w_enc, b_enc, w_dec, b_dec).unwrap()
}

/// Writes a format-1.0 `.npy` file by hand: `descr` as numpy spells it (`<f4`, `<f2`, ...),
/// C order, the given shape, and `data` as the raw little-endian bytes.
pub fn write_npy(path: &std::path::Path, descr: &str, shape: &[usize], data: &[u8]) {
    let dims: String = shape.iter().map(|n| format!("{n}, ")).collect();
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({dims}), }}");
    // Magic (6) + version (2) + length (2) + header + '\n' is a multiple of 64, as numpy pads.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    bytes.extend(data);
    std::fs::write(path, bytes).unwrap();
}

/// `values` as float16 `.npy` bytes.
pub fn f16_bytes(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
        .collect()
}

/// A fresh empty directory under the system's temporary directory, unique to `name` and this
/// process.
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sae-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A path as a command-line argument.
pub fn s(path: &std::path::Path) -> String {
    path.display().to_string()
}

/// Runs the `sae` binary with `args` (a backtrace is asked for, so a panic could not hide).
pub fn sae(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_sae"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run sae")
}

/// Bytes of output as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts that the run succeeded; returns its stdout.
#[track_caller]
pub fn ok(out: &std::process::Output) -> String {
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    stdout
}

/// Asserts exit status 2 and an error on stderr that names every needle, without a panic.
/// Clap's own errors add a usage block, so only the first line must be the error.
#[track_caller]
pub fn usage_error(out: &std::process::Output, needles: &[&str]) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
    }
}

/// [`usage_error`], and the error is a single line.
#[track_caller]
pub fn usage_error_line(out: &std::process::Output, needles: &[&str]) {
    usage_error(out, needles);
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

/// The f32 tensor `name` of a safetensors file, with its shape.
pub fn tensor(path: &std::path::Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = tensors.tensor(name).unwrap();
    assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
    let values = view
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (view.shape().to_vec(), values)
}

/// A `.npy` file's shape and values, read with npyz.
pub fn read_npy<T: npyz::Deserialize>(path: &std::path::Path) -> (Vec<u64>, Vec<T>) {
    let bytes = std::fs::read(path).unwrap();
    let npy = npyz::NpyFile::new(&bytes[..]).unwrap();
    let shape = npy.shape().to_vec();
    (shape, npy.into_vec().unwrap())
}

/// The device the training tests run on: `cuda:0` when `SAE_TEST_CUDA=1` (GPU machines, with
/// `--features cuda`; see scripts/gpu-tests.sh), the CPU otherwise.
pub fn test_device() -> sparse_autoencoder::backend::Device {
    if std::env::var("SAE_TEST_CUDA").is_ok_and(|v| v == "1") {
        sparse_autoencoder::backend::Device::cuda(0)
    } else {
        sparse_autoencoder::backend::Device::Cpu
    }
}

/// `trainer` moved to [`test_device`].
pub fn on_test_device(trainer: sparse_autoencoder::Trainer) -> sparse_autoencoder::Trainer {
    let device = test_device();
    trainer
        .to_device(device)
        .unwrap_or_else(|e| panic!("moving the trainer to {device}: {e}"))
}

/// The tolerance a comparison gets on [`test_device`]: `cpu` on the CPU; on a GPU at least
/// 1e-4 relative, the bound the cuda issue sets (cuBLAS sums in another order than the CPU's
/// GEMM, which a 1-step comparison at 1e-5 can see).
pub fn device_tol(cpu: f64) -> f64 {
    if test_device() == sparse_autoencoder::backend::Device::Cpu {
        cpu
    } else {
        cpu.max(1e-4)
    }
}

/// Little-endian bytes of f32 values, as an `.npy` body or a tensor holds them.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A float32 `.npy` holding the rows of `x_nd`.
pub fn write_f32_npy(path: &std::path::Path, x_nd: ArrayView2<'_, f32>) {
    let values: Vec<f32> = x_nd.iter().copied().collect();
    write_npy(
        path,
        "<f4",
        &[x_nd.nrows(), x_nd.ncols()],
        &f32_bytes(&values),
    );
}

/// Width and height from a PNG's IHDR chunk, after checking the signature.
pub fn png_size(path: &std::path::Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(
        &bytes[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is not a PNG",
        path.display()
    );
    assert_eq!(&bytes[12..16], b"IHDR");
    let be = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap());
    (be(16), be(20))
}

/// An SAE of width `d` with `f` latents.
pub fn sae_config(arch: Architecture, d: usize, f: usize) -> SaeConfig {
    SaeConfig {
        d_model: d,
        dict_size: f,
        arch,
    }
}
