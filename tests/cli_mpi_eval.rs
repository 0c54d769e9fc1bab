//! `sae eval` and `sae encode` under mpirun: the rows split over 2 and 3 processes give the
//! single process's figures (to rounding) and its codes (bit for bit), printed and written
//! once; a non-finite row that one process reads fails the whole job in one line; with
//! `--latent-shards 2` ranks holding half an SAE each give the whole SAE's figures.
#![cfg(feature = "mpi")]

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{ok, random_sae, sae, synthetic_batch, temp_dir, text, write_npy};
use sparse_autoencoder::Architecture;

/// Rows of the test data; `d_model` 16.
const ROWS: usize = 1000;
const D: usize = 16;
/// A row that process 1 of 2 reads in both commands: eval's part of rank 1 is rows 500..1000,
/// and encode's batches of 64 go in turn, so batch 9 (rows 576..640) is rank 1's.
const RANK_1_ROW: usize = 600;

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// `sae args` as `np` MPI processes, killed after 60 s.
fn mpirun(np: usize, args: &[&str]) -> Output {
    let out = Command::new("timeout")
        .args(["60", "mpirun", "--oversubscribe", "-np", &np.to_string()])
        .arg(env!("CARGO_BIN_EXE_sae"))
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run mpirun");
    assert_ne!(
        out.status.code(),
        Some(124),
        "sae {args:?} on {np} processes ran past 60 s: {}",
        text(&out.stderr)
    );
    out
}

/// Writes `x` (ROWS × D) to `path`, with a NaN at `nan_row` if given.
fn write_rows(path: &Path, nan_row: Option<usize>) {
    let mut x = synthetic_batch(ROWS, D, 7);
    if let Some(row) = nan_row {
        x[[row, 3]] = f32::NAN;
    }
    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_npy(path, "<f4", &[ROWS, D], &bytes);
}

/// A tiny BatchTopK SAE trained by one process on `data`, in `dir`.
fn train(data: &Path, dir: &Path) {
    ok(&sae(&[
        "train",
        "--data",
        &s(data),
        "--out",
        &s(dir),
        "--steps",
        "20",
        "--dict-size",
        "64",
        "--k",
        "4",
        "--batch-size",
        "64",
        "--threads",
        "1",
    ]));
}

/// eval.json's `eval` figures.
fn figures(out: &Path) -> serde_json::Map<String, serde_json::Value> {
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    report["eval"].as_object().unwrap().clone()
}

#[test]
fn eval_across_processes_gives_the_single_process_figures_once() {
    let dir = temp_dir("mpi-eval");
    let (data, run) = (dir.join("x.npy"), dir.join("run"));
    write_rows(&data, None);
    train(&data, &run);
    let nan = dir.join("nan.npy");
    write_rows(&nan, Some(RANK_1_ROW));
    for (rows, skip) in [(&data, false), (&nan, true)] {
        let eval = |out: &Path| {
            let mut args = vec![
                "eval".to_string(),
                s(&run),
                "--data".into(),
                s(rows),
                "--out".into(),
                s(out),
                "--batch-size".into(),
                "64".into(),
            ];
            if skip {
                args.push("--skip-non-finite".into());
            }
            args
        };
        let single_out = dir.join("single");
        let args = eval(&single_out);
        let single_stdout = ok(&sae(&args.iter().map(String::as_str).collect::<Vec<_>>()));
        let single = figures(&single_out);
        assert_eq!(single["n_rows"], ROWS - usize::from(skip));
        assert_eq!(single["skipped_rows"], usize::from(skip));
        for np in [2, 3] {
            let out = dir.join(format!("np{np}"));
            let args = eval(&out);
            let stdout = ok(&mpirun(
                np,
                &args.iter().map(String::as_str).collect::<Vec<_>>(),
            ));
            // Rank 0 alone prints: the same report, once.
            assert_eq!(stdout.matches("wrote ").count(), 1, "{stdout}");
            assert_eq!(stdout.lines().count(), single_stdout.lines().count());
            let across = figures(&out);
            assert_eq!(
                across.keys().collect::<Vec<_>>(),
                single.keys().collect::<Vec<_>>()
            );
            for (key, value) in &single {
                let (a, b) = (across[key].as_f64().unwrap(), value.as_f64().unwrap());
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs(),
                    "np {np} {key}: {a} vs {b} alone"
                );
                if value.is_u64() {
                    assert_eq!(&across[key], value, "np {np} {key}");
                }
            }
            // Firing counts are integers summed exactly: the same frequencies.
            assert_eq!(
                std::fs::read(out.join("feature_density.npy")).unwrap(),
                std::fs::read(single_out.join("feature_density.npy")).unwrap(),
                "np {np}"
            );
            assert!(out.join("density.png").is_file());
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn eval_by_latent_shards_gives_the_whole_saes_figures() {
    let dir = temp_dir("mpi-eval-shards");
    let data = dir.join("x.npy");
    write_rows(&data, None);
    // Trained BatchTopK (θ learned), TopK (codes chosen across shards), BatchTopK without θ
    // (each batch cut across shards), ReLU (each shard alone).
    let trained = dir.join("trained");
    train(&data, &trained);
    let saes = [
        (trained, None),
        (dir.join("topk"), Some(Architecture::TopK { k: 3 })),
        (
            dir.join("batchtopk"),
            Some(Architecture::BatchTopK { k: 3 }),
        ),
        (dir.join("relu"), Some(Architecture::RELU)),
    ];
    for (seed, (sae_dir, arch)) in saes.iter().enumerate() {
        if let Some(arch) = arch {
            random_sae(*arch, D, 48, seed as u64).save(sae_dir).unwrap();
        }
        let eval = |np: usize, shards: &str, out: &Path| {
            let args = [
                "eval",
                &s(sae_dir),
                "--data",
                &s(&data),
                "--out",
                &s(out),
                "--batch-size",
                "64",
                "--latent-shards",
                shards,
            ];
            match np {
                1 => ok(&sae(&args)),
                _ => ok(&mpirun(np, &args)),
            }
        };
        // One group of two shards against one process; two groups of two against two
        // processes (the same rows in each batch).
        for (np, whole_np) in [(2, 1), (4, 2)] {
            let (whole, sharded) = (dir.join("whole"), dir.join("sharded"));
            eval(whole_np, "1", &whole);
            let stdout = eval(np, "2", &sharded);
            assert_eq!(stdout.matches("wrote ").count(), 1, "{stdout}");
            let (a, b) = (figures(&sharded), figures(&whole));
            assert_eq!(a["n_rows"], ROWS);
            for (key, value) in &b {
                let (x, y) = (a[key].as_f64().unwrap(), value.as_f64().unwrap());
                assert!(
                    (x - y).abs() <= 1e-5 * y.abs(),
                    "{} on {np} ranks, {key}: {x} vs {y}",
                    sae_dir.display()
                );
            }
            assert_eq!(
                std::fs::read(sharded.join("feature_density.npy")).unwrap(),
                std::fs::read(whole.join("feature_density.npy")).unwrap(),
                "{} on {np} ranks",
                sae_dir.display()
            );
        }
    }
    let (topk, out, data) = (s(&saes[1].0), s(&dir.join("refused")), s(&data));
    for (extra, needle) in [
        (&["--latent-shards", "3"][..], "--latent-shards 3"),
        (
            &["--latent-shards", "2", "--true-features", &topk],
            "--true-features",
        ),
    ] {
        let args = [&["eval", &topk, "--data", &data, "--out", &out][..], extra].concat();
        let failed = mpirun(2, &args);
        let stderr = text(&failed.stderr);
        assert_eq!(failed.status.code(), Some(2), "{stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
        assert_eq!(errors.len(), 1, "{stderr}");
        assert!(errors[0].contains(needle), "{needle:?} not in {stderr}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn encode_across_processes_writes_the_single_process_codes() {
    let dir = temp_dir("mpi-encode");
    let data = dir.join("x.npy");
    write_rows(&data, None);
    let trained = dir.join("trained");
    train(&data, &trained);
    // TopK writes the dense layout; a BatchTopK SAE without a threshold keeps each batch's
    // own top k·B, so its codes are the same only if every batch is.
    let (topk, batchtopk) = (dir.join("topk"), dir.join("batchtopk"));
    random_sae(Architecture::TopK { k: 3 }, D, 48, 1)
        .save(&topk)
        .unwrap();
    random_sae(Architecture::BatchTopK { k: 3 }, D, 48, 2)
        .save(&batchtopk)
        .unwrap();
    for sae_dir in [&trained, &topk, &batchtopk] {
        let encode = |out: &Path| {
            vec![
                "encode".to_string(),
                s(sae_dir),
                "--data".into(),
                s(&data),
                "--out".into(),
                s(out),
                "--batch-size".into(),
                "64".into(),
            ]
        };
        let single = dir.join("single");
        let args = encode(&single);
        ok(&sae(&args.iter().map(String::as_str).collect::<Vec<_>>()));
        let mut files: Vec<_> = std::fs::read_dir(&single)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        files.sort();
        assert!(files.len() >= 3, "{files:?}");
        for np in [2, 3] {
            let out = dir.join(format!("np{np}"));
            let args = encode(&out);
            let stdout = ok(&mpirun(
                np,
                &args.iter().map(String::as_str).collect::<Vec<_>>(),
            ));
            assert_eq!(stdout.matches("encoded ").count(), 1, "{stdout}");
            let mut written: Vec<_> = std::fs::read_dir(&out)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            written.sort();
            assert_eq!(written, files, "{}", sae_dir.display());
            for file in &files {
                assert!(
                    std::fs::read(out.join(file)).unwrap()
                        == std::fs::read(single.join(file)).unwrap(),
                    "{} np {np}: {file:?} differs",
                    sae_dir.display()
                );
            }
            std::fs::remove_dir_all(&out).unwrap();
        }
        std::fs::remove_dir_all(&single).unwrap();
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_non_finite_row_only_rank_1_reads_fails_the_job_in_one_line() {
    let dir = temp_dir("mpi-nan");
    let (data, run) = (dir.join("x.npy"), dir.join("run"));
    write_rows(&data, None);
    train(&data, &run);
    let nan = dir.join("nan.npy");
    write_rows(&nan, Some(RANK_1_ROW));
    for command in ["eval", "encode"] {
        let out = dir.join(command);
        let failed = mpirun(
            2,
            &[
                command,
                &s(&run),
                "--data",
                &s(&nan),
                "--out",
                &s(&out),
                "--batch-size",
                "64",
            ],
        );
        let stderr = text(&failed.stderr);
        assert_eq!(failed.status.code(), Some(2), "{command}: {stderr}");
        assert!(!stderr.contains("panicked"), "{command}: {stderr}");
        // mpirun adds its own banner; sae's part is one line, from rank 0, naming the file
        // and the row and the rank that read it.
        let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(lines.len(), 1, "{command}: {stderr}");
        let line = lines[0];
        assert!(line.starts_with("error: "), "{command}: {line}");
        assert!(
            line.contains("nan.npy") && line.contains(&format!("row {RANK_1_ROW}")),
            "{command}: {line}"
        );
        assert!(line.contains("rank 1"), "{command}: {line}");
        assert!(!out.join("eval.json").exists() && !out.join("codes.json").exists());
    }
    std::fs::remove_dir_all(dir).unwrap();
}
