//! The `sae` binary: a short default-data run succeeds; invalid options exit with status 2 and
//! a message naming the option, never a panic.

mod common;

use std::path::Path;

use common::{f16_bytes, ok, sae, synthetic_batch, temp_dir, text, usage_error, write_npy};

#[test]
fn short_synthetic_run_prints_progress_and_recovery() {
    let dir = temp_dir("cli-synthetic");
    for arch in ["batchtopk", "topk", "relu", "jumprelu", "matryoshka"] {
        let out_dir = dir.join(arch);
        let out = sae(&[
            "train",
            "--out",
            out_dir.to_str().unwrap(),
            "--arch",
            arch,
            "--steps",
            "30",
            "--batch-size",
            "64",
            "--log-every",
            "10",
            "--threads",
            "1",
        ]);
        let stdout = text(&out.stdout);
        assert!(
            out.status.success(),
            "{arch}: {stdout}\n{}",
            text(&out.stderr)
        );
        let progress: Vec<&str> = stdout.lines().filter(|l| l.starts_with("step")).collect();
        assert_eq!(progress.len(), 3, "{arch}: {stdout}");
        assert!(progress[2].starts_with("step     30"), "{arch}: {stdout}");
        for field in ["loss", "mse", "fve", "l0", "dead", "tokens/s"] {
            assert!(
                progress[2].contains(field),
                "{arch}: {field} missing: {stdout}"
            );
        }
        let recovered = stdout
            .lines()
            .find(|l| l.starts_with("recovered "))
            .expect(&stdout);
        assert!(recovered.contains("cosine >= 0.9"), "{arch}: {stdout}");
        assert!(recovered.contains("MCC"), "{arch}: {stdout}");
        assert!(
            stdout.contains(&format!("run directory: {}", out_dir.display())),
            "{arch}: {stdout}"
        );
        for file in [
            "config.toml",
            "sae.safetensors",
            "metrics.jsonl",
            "eval.json",
        ] {
            assert!(out_dir.join(file).is_file(), "{arch}: {file} missing");
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn invalid_options_exit_with_status_2_and_name_the_option() {
    for (args, option) in [
        // Rejected by the library's validation, mapped to the option.
        (vec!["--k", "0"], "--k"),
        (vec!["--lr", "-1"], "--lr"),
        (vec!["--lr=0"], "--lr"),
        (vec!["--lr", "nan"], "--lr"),
        (vec!["--l1", "-2", "--arch", "relu"], "--l1"),
        (vec!["--dict-size", "0"], "--dict-size"),
        (vec!["--steps", "0"], "--steps"),
        (
            vec!["--steps", "100", "--warmup-steps", "100"],
            "--warmup-steps",
        ),
        (
            vec!["--steps", "100", "--decay-start", "100"],
            "--decay-start",
        ),
        (vec!["--auxk-alpha", "-1"], "--auxk-alpha"),
        (vec!["--auxk-alpha", "inf"], "--auxk-alpha"),
        (vec!["--dead-tokens", "0"], "--dead-tokens"),
        (vec!["--resample", "0"], "--resample"),
        (
            vec!["--resample", "5", "--resample-encoder-scale", "0"],
            "--resample-encoder-scale",
        ),
        (vec!["--resample-encoder-scale", "0.5"], "--resample"),
        (vec!["--threshold-beta", "1"], "--threshold-beta"),
        (
            vec!["--arch", "matryoshka", "--group-sizes", "1,2"],
            "--group-sizes",
        ),
        (
            vec!["--arch", "matryoshka", "--group-fractions", "0.5,0.2"],
            "--group-fractions",
        ),
        (
            vec!["--arch", "matryoshka", "--group-weights", "1"],
            "--group-weights",
        ),
        (vec!["--arch", "jumprelu", "--k", "0"], "--k"),
        (
            vec!["--arch", "relu", "--threshold", "calibrate"],
            "--threshold",
        ),
        (vec!["--threshold", "median"], "--threshold"),
        (
            vec!["--arch", "jumprelu", "--l0-coefficient", "-1"],
            "--l0-coefficient",
        ),
        (
            vec!["--arch", "jumprelu", "--jumprelu-bandwidth", "0"],
            "--jumprelu-bandwidth",
        ),
        (vec!["--threshold-beta", "nan"], "--threshold-beta"),
        (
            vec!["--steps", "100", "--threshold-start-step", "99"],
            "--threshold-start-step",
        ),
        // Rejected while parsing.
        (vec!["--k", "-3"], "--k"),
        (vec!["--seed", "-1"], "--seed"),
        (vec!["--batch-size", "0"], "--batch-size"),
        (vec!["--threads", "0"], "--threads"),
        (vec!["--log-every", "0"], "--log-every"),
        (vec!["--arch", "gated"], "--arch"),
        (vec!["--relu-variant", "both"], "--relu-variant"),
        (vec!["--steps", "many"], "--steps"),
        (vec!["--dead-tokens", "-5"], "--dead-tokens"),
        // Combinations and relations the parser or the resolution rejects.
        (vec!["--k", "600"], "--k"),
        (vec!["--dict-size", "64", "--expansion", "2"], "--expansion"),
        (vec!["--steps", "10", "--tokens", "100"], "--tokens"),
        (vec!["--normalize"], "--normalize"),
        (vec!["--checkpoint-every", "0"], "--checkpoint-every"),
        (vec!["--metrics-every", "0"], "--metrics-every"),
        (vec!["--resume", "x", "--k", "4"], "--resume"),
        (vec!["--config", "/nonexistent/run.toml"], "--config"),
        (vec!["--device", "tpu"], "--device"),
        (vec!["--device", "cuda:x"], "--device"),
        (vec!["--tf32"], "--tf32"),
        (vec!["--device", "cpu", "--tf32"], "--tf32"),
    ] {
        let args = [&["train"][..], &args].concat();
        let out = sae(&args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        let first = stderr.lines().next().unwrap_or_default();
        assert!(first.starts_with("error: "), "{args:?}: {stderr}");
        assert!(first.contains(option), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}: {}", text(&out.stdout));
    }
}

/// θ's start and β, AuxK's α, the dead threshold and resampling given as flags are the run's,
/// recorded in its config.toml.
#[test]
fn the_threshold_and_dead_latent_knobs_are_flags_saved_with_the_run() {
    let dir = temp_dir("cli-knobs");
    let out = dir.join("run");
    let args = [
        "train",
        "--steps",
        "12",
        "--batch-size",
        "64",
        "--dict-size",
        "1024",
        "--auxk-alpha",
        "0.5",
        "--dead-tokens",
        "192",
        "--threshold-start-step",
        "3",
        "--threshold-beta",
        "0.9",
        "--resample",
        "5",
        "--resample-encoder-scale",
        "0.5",
        "--out",
    ];
    let stdout = ok(&sae(&[&args[..], &[out.to_str().unwrap()]].concat()));
    // Latents dead for 3 batches by step 5 (more than a batch has rows) are resampled, and
    // the run says so.
    assert!(
        stdout.contains("step 5: batchtopk-k8-f1024: resampled 64 dead latents"),
        "{stdout}"
    );
    let config = std::fs::read_to_string(out.join("config.toml")).unwrap();
    for line in [
        "auxk_alpha = 0.5",
        "dead_tokens = 192",
        "threshold_start_step = 3",
        "threshold_beta = 0.9",
        "resample_every = 5",
        "resample_encoder_scale = 0.5",
    ] {
        assert!(
            config.lines().any(|l| l == line),
            "{line:?} not in {config}"
        );
    }
    let sae_json = std::fs::read_to_string(out.join("sae.json")).unwrap();
    // Steps 4 to 11 update θ, so the SAE is saved with one.
    let json: serde_json::Value = serde_json::from_str(&sae_json).unwrap();
    assert!(json["threshold"].as_f64().is_some(), "{sae_json}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_calibrated_threshold_keeps_k_codes_a_row_on_held_out_rows() {
    let dir = temp_dir("cli-calibrate");
    let out = dir.join("run");
    let stdout = ok(&sae(&[
        "train",
        "--threshold",
        "calibrate",
        "--steps",
        "40",
        "--batch-size",
        "512",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(stdout.contains("θ calibrated on 65536 rows"), "{stdout}");
    let config = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(
        config.lines().any(|l| l == "threshold = \"calibrate\""),
        "{config}"
    );
    // 40 steps leave the moving average far from settled; the calibrated θ keeps k = 8 codes
    // a row on the held-out rows of the same distribution, to sampling error.
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    let l0 = eval["eval"]["l0"].as_f64().expect("held-out L0");
    assert!((l0 - 8.0).abs() < 0.2, "held-out L0 {l0}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Where no GPU can run (CI: no driver; or a build without `cuda`), `--device cuda` is one
/// line naming the device and the fix, exit 2, and no run directory is left behind.
#[test]
fn a_gpu_that_cannot_run_is_one_error_before_the_run_starts() {
    if std::env::var("SAE_TEST_CUDA").is_ok_and(|v| v == "1") {
        return; // a GPU machine: the device works
    }
    let dir = std::env::temp_dir().join(format!("sae-cli-device-{}", std::process::id()));
    let out_dir = dir.join("run");
    let out = sae(&[
        "train",
        "--device",
        "cuda",
        "--steps",
        "5",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: device cuda:0: "), "{stderr}");
    assert!(
        stderr.contains("--features cuda") || stderr.contains("libcuda.so"),
        "{stderr}"
    );
    assert!(!out_dir.exists(), "a run directory was created");
    let out = sae(&["bench", "--device", "cuda:1", "--steps", "1"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).starts_with("error: device cuda:1: "));
}

/// TF32 is a GPU mode: asking for it on the CPU is a usage error in every command that has it,
/// before anything runs or is written.
#[test]
fn tf32_on_the_cpu_is_a_usage_error() {
    let dir = temp_dir("cli-tf32");
    let missing = dir.join("absent");
    let missing = missing.to_str().unwrap();
    for args in [
        vec!["bench", "--tf32", "--steps", "1"],
        vec!["eval", missing, "--data", missing, "--tf32"],
        vec![
            "encode", missing, "--data", missing, "--out", missing, "--tf32",
        ],
    ] {
        let out = sae(&args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("error: invalid --tf32: device cpu: "),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn unknown_subcommand_is_a_usage_error() {
    let out = sae(&["evaluate"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

/// `rows` rows of width `d` of activation-like data as float16 `.npy` shaped [rows/8, 8, d].
fn write_shard(path: &Path, rows: usize, d: usize, seed: u64) {
    let x = synthetic_batch(rows, d, seed);
    write_npy(
        path,
        "<f2",
        &[rows / 8, 8, d],
        &f16_bytes(x.as_slice().unwrap()),
    );
}

#[test]
fn trains_on_a_directory_of_shards_and_evaluates_held_out_rows() {
    let dir = temp_dir("cli-train-data");
    for shard in 0..3 {
        write_shard(&dir.join(format!("{shard}.npy")), 512, 16, shard);
    }
    let out_dir = dir.join("run");
    let out = sae(&[
        "train",
        "--out",
        out_dir.to_str().unwrap(),
        "--data",
        dir.join("*.npy").to_str().unwrap(),
        "--normalize",
        "--eval-fraction",
        "0.1",
        "--arch",
        "topk",
        "--k",
        "4",
        "--steps",
        "40",
        "--batch-size",
        "64",
        "--log-every",
        "20",
        "--threads",
        "1",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(
        stdout.contains("(D=16) from 3 file(s): 1382 training rows, 154 held out"),
        "{stdout}"
    );
    assert!(stdout.contains("normalising"), "{stdout}");
    let held_out = stdout
        .lines()
        .find(|l| l.starts_with("held-out (154 rows)"))
        .expect(&stdout);
    let fve: f64 = held_out
        .split("fve ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(fve > 0.3, "{stdout}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn non_finite_rows_stop_the_run_or_are_skipped_and_counted() {
    let dir = temp_dir("cli-nonfinite");
    let mut x = synthetic_batch(256, 8, 0);
    x[[100, 3]] = f32::NAN;
    let path = dir.join("acts.npy");
    write_npy(
        &path,
        "<f4",
        &[256, 8],
        &x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>(),
    );
    let out_dir = dir.join("run");
    let args = [
        "train",
        "--force",
        "--out",
        out_dir.to_str().unwrap(),
        "--data",
        path.to_str().unwrap(),
        "--eval-fraction",
        "0",
        "--steps",
        "12",
        "--batch-size",
        "64",
        "--threads",
        "1",
    ];
    let out = sae(&args);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("acts.npy row 100") && stderr.contains("--skip-non-finite"),
        "{stderr}"
    );

    let out = sae(&[&args[..], &["--skip-non-finite"]].concat());
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    // The 768 rows drawn are 3 epochs, row 100 drawn (and dropped) once in each.
    assert!(
        stdout.contains("skipped 3 non-finite rows (counted each time a batch drew one)"),
        "{stdout}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_data_exits_with_status_2_and_one_line_naming_the_file() {
    let dir = temp_dir("cli-bad-data");
    let good = dir.join("good.npy");
    write_shard(&good, 64, 8, 0);
    let wide = dir.join("wide.npy");
    write_shard(&wide, 64, 12, 0);
    let text_file = dir.join("notes.npy");
    std::fs::write(&text_file, "just some text").unwrap();
    let truncated = dir.join("truncated.npy");
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() - 10]).unwrap();
    let ints = dir.join("ints.npy");
    write_npy(&ints, "<i4", &[4, 8], &[0u8; 4 * 8 * 4]);
    let empty_dir = dir.join("empty");
    std::fs::create_dir(&empty_dir).unwrap();
    let missing = dir.join("missing.npy");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    for (data, named) in [
        (vec![s(&text_file)], "notes.npy"),
        (vec![s(&truncated)], "truncated.npy"),
        (vec![s(&ints)], "ints.npy"),
        (vec![s(&missing)], "missing.npy"),
        (vec![s(&empty_dir)], "empty"),
        (vec![s(&good), s(&wide)], "wide.npy"),
        (vec![format!("{}/nothing_*.npy", s(&dir))], "nothing_*.npy"),
    ] {
        let mut args = vec!["train".to_string(), "--data".into()];
        args.extend(data.iter().cloned());
        args.extend(["--steps", "5", "--threads", "1"].map(String::from));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = sae(&args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{data:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{data:?}: {stderr}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains(named),
            "{data:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{data:?}: {stderr}");
    }
    // Options about the data name themselves.
    let g = s(&good);
    for (args, option) in [
        (
            vec!["--data", &g, "--eval-fraction", "0.001"],
            "--eval-fraction",
        ),
        (
            vec!["--data", &g, "--eval-fraction", "1.5"],
            "--eval-fraction",
        ),
        (vec!["--data", &g, "--buffer-rows", "0"], "--buffer-rows"),
        (vec!["--eval-fraction", "0.1"], "--data"),
        (vec!["--data", &g, "--eval-data", &s(&wide)], "--eval-data"),
    ] {
        let args = [&["train", "--steps", "5"][..], &args].concat();
        let out = sae(&args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains(option),
            "{args:?}: {stderr}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// Runs `sae args` with its address space limited to 4 GB, as `ulimit -v 4000000` does.
fn sae_under_4gb(args: &[&str]) -> std::process::Output {
    std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 4000000; exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_sae"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run sae")
}

/// Sizes that overflow, or that need more memory than there is, are refused before anything
/// is allocated: one line naming the option, exit 2, fast, and no run directory.
#[test]
fn sizes_too_large_are_one_line_naming_the_option_before_allocating() {
    let dir = temp_dir("cli-sizes");
    // 4 KB on disk, but D = 67,108,864: the SAE and every batch would be enormous.
    let wide = dir.join("wide.npy");
    write_npy(&wide, "<f4", &[2, 67_108_864], &[]);
    let file = std::fs::OpenOptions::new().write(true).open(&wide).unwrap();
    file.set_len(128 + 2 * 67_108_864 * 4).unwrap();
    drop(file);
    // A billion rows (64 GB, sparse): a shuffle buffer of all of them does not fit.
    let tall = dir.join("tall.npy");
    write_npy(&tall, "<f4", &[1_000_000_000, 16], &[]);
    let file = std::fs::OpenOptions::new().write(true).open(&tall).unwrap();
    file.set_len(128 + 1_000_000_000 * 16 * 4).unwrap();
    drop(file);
    let synthetic = dir.join("synthetic.toml");
    std::fs::write(&synthetic, "[synthetic]\nn_features = 1000000000000\n").unwrap();
    let out = dir.join("run");
    let (wide, tall) = (wide.to_str().unwrap(), tall.to_str().unwrap());
    let synthetic = synthetic.to_str().unwrap();
    let under_4gb = [
        (vec!["train", "--batch-size", "100000000"], "--batch-size"),
        (
            vec!["bench", "--batch", "100000000", "--d", "64", "--f", "512"],
            "--batch",
        ),
        (vec!["train", "--dict-size", "100000000"], "--dict-size"),
    ];
    let unlimited = [
        (
            vec!["train", "--dict-size", "4611686018427387904"],
            "--dict-size",
        ),
        (
            vec!["train", "--expansion", "18446744073709551615"],
            "--expansion",
        ),
        (
            vec!["train", "--expansion", "1152921504606846976"],
            "--expansion",
        ),
        (vec!["train", "--dict-size", "1099511627776"], "--dict-size"),
        (
            vec!["train", "--batch-size", "18446744073709551615"],
            "--batch-size",
        ),
        (vec!["train", "--config", synthetic], "[synthetic]"),
        (vec!["train", "--data", wide], "--dict-size"),
        (
            vec!["train", "--data", wide, "--dict-size", "16", "--k", "4"],
            "--batch-size",
        ),
        (
            vec![
                "train",
                "--data",
                tall,
                "--buffer-rows",
                "4000000000",
                "--eval-fraction",
                "0",
            ],
            "--buffer-rows",
        ),
        (
            vec!["bench", "--d", "1099511627776", "--f", "1099511627776"],
            "--f",
        ),
        // B×F dominates here: the share named is the largest.
        (
            vec!["bench", "--d", "64", "--f", "1099511627776"],
            "grows with --batch",
        ),
        // A budget of the user's, below what even a small run needs.
        (vec!["train", "--max-memory", "1MiB"], "--max-memory"),
        (vec!["bench", "--max-memory", "1MiB"], "--max-memory"),
    ];
    for (limited, cases) in [(true, &under_4gb[..]), (false, &unlimited[..])] {
        for (args, option) in cases {
            let args = [&args[..], &["--out", out.to_str().unwrap()]].concat();
            let args = if args[0] == "bench" {
                &args[..args.len() - 2]
            } else {
                &args[..]
            };
            let start = std::time::Instant::now();
            let run = if limited {
                sae_under_4gb(args)
            } else {
                sae(args)
            };
            let stderr = text(&run.stderr);
            assert_eq!(run.status.code(), Some(2), "{args:?}: {stderr}");
            assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
            assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
            assert!(
                stderr.contains(option),
                "{args:?}: {option} not in {stderr}"
            );
            assert!(
                start.elapsed().as_secs() < 10,
                "{args:?} took {:?}",
                start.elapsed()
            );
            assert!(!out.exists(), "{args:?} left a run directory");
        }
    }
    // The figure needed and the one available are both in the line.
    let stderr = text(&sae_under_4gb(&["train", "--batch-size", "100000000"]).stderr);
    assert!(
        stderr.contains("needs about ") && stderr.contains("GiB"),
        "{stderr}"
    );
    assert!(stderr.contains("ulimit -v"), "{stderr}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// `--max-memory` lets through what it covers, and is recorded in the run's config.
#[test]
fn max_memory_admits_a_run_it_covers_and_is_saved() {
    let dir = temp_dir("cli-max-memory");
    let out = dir.join("run");
    let run = sae(&[
        "train",
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "5",
        "--batch-size",
        "16",
        "--dict-size",
        "32",
        "--k",
        "4",
        "--max-memory",
        "1GiB",
        "--threads",
        "1",
    ]);
    common::ok(&run);
    let config = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(config.contains("max_memory = \"1GiB\""), "{config}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// The printer: each OS error once, one line, no control characters, for errors from the
/// library, from anyhow's context chain and from clap alike.
#[test]
fn errors_print_each_cause_once_on_one_line_without_control_characters() {
    let dir = temp_dir("cli-printer");
    let missing = dir.join("missing.npy");
    let out = dir.join("run");
    for args in [
        vec![
            "train",
            "--data",
            missing.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        vec!["train", "--config", missing.to_str().unwrap()],
    ] {
        let run = sae(&args);
        let stderr = text(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(
            stderr.matches("os error 2").count(),
            1,
            "{args:?}: {stderr}"
        );
    }
    // A name holding ESC (which could clear the screen) and a newline.
    let hostile = dir.join("a\x1b[2Jb\nc.npy");
    std::fs::write(&hostile, b"not an npy file at all").unwrap();
    let missing_hostile = dir.join("gone\x1b]0;title\x07.npy");
    for args in [
        vec![
            "train",
            "--data",
            hostile.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        vec![
            "train",
            "--data",
            missing_hostile.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        // Clap's own errors echo the value.
        vec!["train", "--batch-size", "1\x1b[2J"],
    ] {
        let run = sae(&args);
        let stderr = text(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{args:?}: {stderr}");
        let line = stderr.strip_suffix('\n').unwrap_or(&stderr);
        assert!(line.starts_with("error: "), "{args:?}: {stderr}");
        assert!(
            line.bytes().all(|b| b >= 0x20 && b != 0x7f),
            "{args:?}: {stderr:?}"
        );
        // Clap drops the escape sequence itself; the library's messages echo it, escaped.
        if args[1] == "--data" {
            assert!(line.contains("\\u{1b}"), "{args:?}: {stderr:?}");
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn trains_on_a_hard_preset_table_and_reports_firing() {
    let dir = temp_dir("cli-hard");
    // The hard preset shrunk to debug-build size: every mechanism on, F and k from the set.
    let config = dir.join("hard.toml");
    std::fs::write(
        &config,
        "[synthetic]\npreset = \"hard\"\nd_model = 32\nn_features = 512\nmean_active = 6.0\n\
         n_parents = 32\nchildren_per_parent = 4\nshared_rank = 4\nn_factors = 4\n",
    )
    .unwrap();
    let out_dir = dir.join("run");
    let stdout = ok(&sae(&[
        "train",
        "--config",
        config.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
        "--steps",
        "20",
        "--batch-size",
        "64",
        "--threads",
        "1",
    ]));
    assert!(
        stdout.contains("hard preset: 512 true features in 32 dimensions"),
        "{stdout}"
    );
    assert!(stdout.contains("batchtopk-k8-f512"), "{stdout}");
    assert!(
        stdout.contains("firing of the matched latents on 16384 rows: F1"),
        "{stdout}"
    );
    let written = std::fs::read_to_string(out_dir.join("config.toml")).unwrap();
    let spec: sparse_autoencoder::run::RunSpec = toml::from_str(&written).unwrap();
    let synth = spec.synthetic.unwrap();
    assert_eq!(synth.preset, sparse_autoencoder::synth::SynthPreset::Hard);
    assert_eq!((synth.n_features, synth.n_parents), (512, 32));
    // Magnitudes not overridden keep the preset's.
    assert_eq!(
        synth.magnitude,
        sparse_autoencoder::synth::SynthConfig::hard().magnitude
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("eval.json")).unwrap()).unwrap();
    let firing = &report["recovery"]["firing"];
    assert_eq!(firing["n_rows"], 16384, "{report}");
    for score in ["mean_f1", "mean_precision", "mean_recall"] {
        let v = firing[score].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{score}: {report}");
    }

    // --synth-preset chooses the synthetic data: not with --data, nor over a [synthetic] table.
    let data = dir.join("x.npy");
    write_shard(&data, 64, 8, 0);
    let flag = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--synth-preset",
            "hard",
            "--out",
            "/nonexistent/run",
        ];
        args.extend_from_slice(extra);
        sae(&args)
    };
    usage_error(
        &flag(&["--data", data.to_str().unwrap()]),
        &["--synth-preset", "--data"],
    );
    usage_error(
        &flag(&["--config", config.to_str().unwrap()]),
        &["--synth-preset", "[synthetic]", "preset = \"hard\""],
    );
    usage_error(
        &sae(&["train", "--synth-preset", "medium"]),
        &["--synth-preset", "hard"],
    );
    // An invalid structure field in the table is one line naming the table.
    std::fs::write(
        &config,
        "[synthetic]\npreset = \"hard\"\nchild_similarity = 1.5\n",
    )
    .unwrap();
    usage_error(
        &sae(&["train", "--config", config.to_str().unwrap()]),
        &["child_similarity must lie in [0, 1)"],
    );
    std::fs::remove_dir_all(dir).unwrap();
}
