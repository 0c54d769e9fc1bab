//! The C ABI from C: for SAEs of each architecture made and saved with the Rust library, writes
//! rows and the library's own codes and reconstruction of them, compiles `tests/smoke.c`
//! against `include/sae.h` and the `libsae` cargo built for this test (the shared library, and
//! the static one), and runs it: it must reproduce the codes and x̂ bit for bit and get every
//! error path's status and message right. `$CC` (default `cc`) compiles it.

use std::path::{Path, PathBuf};
use std::process::Command;

use ndarray::Array2;
use sparse_autoencoder::backend::Cpu;
use sparse_autoencoder::{Architecture, Sae, SaeConfig, TrainConfig, Trainer};

const N_ROWS: usize = 24;
const D_MODEL: usize = 16;
const DICT_SIZE: usize = 64;

/// Where cargo put the `libsae.so` and `libsae.a` it built for this test: `target/<profile>/deps`,
/// beside the test itself (cargo copies them up to `target/<profile>` only for `cargo build`).
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    let deps = exe.parent().expect("target/<profile>/deps/<test>");
    assert!(
        deps.join("libsae.so").exists() && deps.join("libsae.a").exists(),
        "no libsae.so and libsae.a in {}: run the tests with cargo test --manifest-path \
         capi/Cargo.toml",
        deps.display()
    );
    deps.to_path_buf()
}

/// A scratch directory of this test's own under cargo's temporary directory.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("capi-smoke-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

fn run(command: &mut Command) -> std::process::Output {
    let output = command
        .output()
        .unwrap_or_else(|err| panic!("cannot run {command:?}: {err}"));
    println!("{command:?}");
    print!("{}", String::from_utf8_lossy(&output.stdout));
    eprint!("{}", String::from_utf8_lossy(&output.stderr));
    output
}

/// Compiles `tests/smoke.c` into `out/smoke`, linked to the shared library, and with
/// `also_static` into `out/smoke-static`, linked to the static one.
fn compile_smoke(out: &Path, also_static: bool) -> (PathBuf, Option<PathBuf>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = lib_dir();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let flags = [
        "-std=c11",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-pedantic",
        "-D_POSIX_C_SOURCE=200809L",
    ];
    let shared = out.join("smoke");
    let status = run(Command::new(&cc)
        .args(flags)
        .arg("-I")
        .arg(root.join("include"))
        .arg(root.join("tests/smoke.c"))
        .arg("-L")
        .arg(&lib)
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-lsae", "-pthread", "-lm", "-o"])
        .arg(&shared))
    .status;
    assert!(
        status.success(),
        "{cc} could not build tests/smoke.c against libsae.so"
    );
    if !also_static {
        return (shared, None);
    }
    let fixed = out.join("smoke-static");
    // The system libraries Rust's standard library needs (rustc --print native-static-libs).
    let status = run(Command::new(&cc)
        .args(flags)
        .arg("-I")
        .arg(root.join("include"))
        .arg(root.join("tests/smoke.c"))
        .arg(lib.join("libsae.a"))
        .args([
            "-pthread", "-lgcc_s", "-lutil", "-lrt", "-ldl", "-lm", "-lc", "-o",
        ])
        .arg(&fixed))
    .status;
    assert!(
        status.success(),
        "{cc} could not build tests/smoke.c against libsae.a"
    );
    (shared, Some(fixed))
}

fn write_f32(path: &Path, values: &[f32]) {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).expect("write");
}

/// Writes a case for `smoke.c` into `dir`: the SAE, rows, and the library's codes and x̂.
fn write_case(dir: &Path, sae: &Sae, arch: &str) {
    let sae_dir = dir.join("sae");
    sae.save(&sae_dir).expect("save");
    // What C loads is what Rust loads.
    let sae = Sae::load(&sae_dir).expect("load");
    let x_bd = Array2::from_shape_fn((N_ROWS, D_MODEL), |(b, d)| {
        ((b * D_MODEL + d) as f32 * 0.37).sin() + 0.1 * (b as f32 * 0.5).cos()
    });
    let codes = sae.encode(&Cpu, x_bd.view()).expect("encode");
    assert!(codes.nnz() > 0, "{arch}: the case needs codes");
    let x_hat_bd = sae.decode(&codes).expect("decode");
    let config = sae.config();
    let k = config.arch.k().unwrap_or(0);
    std::fs::write(
        dir.join("meta.txt"),
        format!("{N_ROWS} {D_MODEL} {} {k} {arch}\n", config.dict_size),
    )
    .expect("write");
    write_f32(&dir.join("x.f32"), x_bd.as_slice().unwrap());
    let indptr: Vec<u8> = codes
        .indptr
        .iter()
        .flat_map(|&o| (o as u64).to_le_bytes())
        .collect();
    std::fs::write(dir.join("indptr.u64"), indptr).expect("write");
    let indices: Vec<u8> = codes.indices.iter().flat_map(|i| i.to_le_bytes()).collect();
    std::fs::write(dir.join("indices.u32"), indices).expect("write");
    write_f32(&dir.join("values.f32"), &codes.values);
    write_f32(&dir.join("xhat.f32"), x_hat_bd.as_slice().unwrap());
}

fn config(arch: Architecture) -> SaeConfig {
    SaeConfig {
        d_model: D_MODEL,
        dict_size: DICT_SIZE,
        arch,
    }
}

/// A BatchTopK SAE trained long enough to have learned θ (inference then thresholds).
fn trained_batchtopk() -> Sae {
    let sae = Sae::new(config(Architecture::BatchTopK { k: 4 }), 3).unwrap();
    let train = TrainConfig {
        total_steps: 12,
        warmup_steps: 2,
        threshold_start_step: 2,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(sae, train).unwrap();
    let x_bd = Array2::from_shape_fn((64, D_MODEL), |(b, d)| {
        ((b * 7 + d * 3) as f32 * 0.11).sin()
    });
    for _ in 0..12 {
        trainer.step(x_bd.view()).unwrap();
    }
    let sae = trainer.into_sae();
    assert!(sae.threshold().is_some(), "θ learned");
    sae
}

fn cases() -> Vec<(&'static str, Sae)> {
    vec![
        (
            "topk",
            Sae::new(config(Architecture::TopK { k: 4 }), 1).unwrap(),
        ),
        ("relu", Sae::new(config(Architecture::RELU), 2).unwrap()),
        (
            "jumprelu",
            Sae::new(config(Architecture::JumpRelu), 4).unwrap(),
        ),
        ("batchtopk", trained_batchtopk()),
        (
            "matryoshka",
            Sae::new(config(Architecture::Matryoshka { k: 8 }), 5).unwrap(),
        ),
    ]
}

#[test]
fn c_program_reproduces_the_library_bit_for_bit() {
    let out = scratch("ok");
    let (shared, fixed) = compile_smoke(&out, true);
    let fixed = fixed.expect("the static build");
    for (arch, sae) in cases() {
        let case = out.join(arch);
        write_case(&case, &sae, arch);
        for program in [&shared, &fixed] {
            let output = run(Command::new(program).arg(&case));
            assert!(
                output.status.success(),
                "{} failed on the {arch} case ({:?})",
                program.display(),
                output.status
            );
            let stdout = String::from_utf8_lossy(&output.stdout);
            assert!(stdout.contains(" 0 failed"), "{stdout}");
        }
    }
}

#[test]
fn c_program_fails_when_the_codes_differ() {
    let out = scratch("tampered");
    let (shared, _) = compile_smoke(&out, false);
    let case = out.join("topk");
    write_case(&case, &cases().remove(0).1, "topk");
    // One bit of one value: a check that compares bits must see it.
    let path = case.join("values.f32");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let output = run(Command::new(&shared).arg(&case));
    assert_eq!(
        output.status.code(),
        Some(1),
        "smoke.c passed codes one bit off"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("differ from the Rust library's"),
        "{stderr}"
    );
}

#[test]
fn header_compiles_as_cpp() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let status = run(Command::new(&cxx)
        .args([
            "-std=c++11",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-pedantic",
            "-fsyntax-only",
        ])
        .args(["-x", "c++"])
        .arg(root.join("include/sae.h")))
    .status;
    assert!(status.success(), "{cxx} rejects include/sae.h");
}
