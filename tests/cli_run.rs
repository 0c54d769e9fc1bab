//! `sae train`'s run directory: the resolved config (which repeats the run), sweeps, metrics,
//! evaluation, plots, checkpoints, Ctrl-C and `--resume` giving the uninterrupted result.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{ok, png_size, sae, synthetic_batch, temp_dir, text, write_f32_npy, write_npy};
use sparse_autoencoder::run::MetricsRecord;
use sparse_autoencoder::Sae;

fn metrics(dir: &Path) -> Vec<MetricsRecord> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A float32 shard of `rows` activation-like rows of width `d`.
fn write_shard(path: &Path, rows: usize, d: usize) {
    write_f32_npy(path, synthetic_batch(rows, d, 7).view());
}

#[test]
fn a_run_directory_holds_config_weights_metrics_eval_and_plots() {
    let dir = temp_dir("run-files");
    let run = dir.join("run");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let out = sae(&[
        "train",
        "--out",
        &s(&run),
        "--steps",
        "40",
        "--batch-size",
        "64",
        "--metrics-every",
        "10",
        "--threads",
        "1",
    ]);
    ok(&out);
    let records = metrics(&run);
    assert_eq!(
        records.iter().map(|r| r.step).collect::<Vec<_>>(),
        [10, 20, 30, 40]
    );
    assert_eq!(records[3].tokens, 40 * 64);
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("eval.json")).unwrap()).unwrap();
    for key in ["mse", "fve", "l0", "dead_fraction", "cosine", "shrinkage"] {
        assert!(eval["eval"][key].is_number(), "{key}: {eval}");
    }
    assert!(eval["recovery"]["mcc"].is_number(), "{eval}");
    for png in ["curves.png", "density.png"] {
        let (width, height) = png_size(&run.join(png));
        assert!(width > 0 && height > 0, "{png}");
    }
    let loaded = Sae::load(&run).unwrap();
    assert_eq!(loaded.config().dict_size, 512);

    // The written config repeats the run exactly.
    let again = dir.join("again");
    ok(&sae(&[
        "train",
        "--config",
        &s(&run.join("config.toml")),
        "--out",
        &s(&again),
        "--threads",
        "1",
    ]));
    let repeated = Sae::load(&again).unwrap();
    assert_eq!(repeated.w_dec_fd(), loaded.w_dec_fd());
    assert_eq!(repeated.b_enc_f(), loaded.b_enc_f());

    // The directory is taken now.
    let out = sae(&["train", "--out", &s(&run), "--steps", "5", "--threads", "1"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("holds another run") && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    ok(&sae(&[
        "train",
        "--out",
        &s(&run),
        "--force",
        "--steps",
        "5",
        "--batch-size",
        "64",
        "--threads",
        "1",
    ]));
    assert_eq!(metrics(&run).last().unwrap().step, 5);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_sweep_trains_every_combination_on_the_same_batches() {
    let dir = temp_dir("run-sweep");
    let data = dir.join("acts.npy");
    write_shard(&data, 2048, 16);
    let run = dir.join("run");
    let stdout = ok(&sae(&[
        "train",
        "--data",
        data.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--arch",
        "topk",
        "--k",
        "2,4",
        "--expansion",
        "2,4",
        "--steps",
        "30",
        "--batch-size",
        "128",
        "--threads",
        "1",
    ]));
    let names = ["topk-k2-f32", "topk-k2-f64", "topk-k4-f32", "topk-k4-f64"];
    for name in names {
        let sae = Sae::load(&run.join(name)).unwrap();
        assert!(run.join(name).join("eval.json").is_file(), "{name}");
        assert!(stdout.contains(&format!("{name}: held-out")), "{stdout}");
        assert_eq!(metrics(&run.join(name)).len(), 3, "{name}");
        assert_eq!(
            sae.config().dict_size,
            if name.ends_with("32") { 32 } else { 64 }
        );
    }
    // One of them alone, with the same seed, trains to the same weights: the sweep fed each
    // SAE the batches it would have seen by itself.
    let alone = dir.join("alone");
    ok(&sae(&[
        "train",
        "--data",
        data.to_str().unwrap(),
        "--out",
        alone.to_str().unwrap(),
        "--arch",
        "topk",
        "--k",
        "4",
        "--dict-size",
        "32",
        "--steps",
        "30",
        "--batch-size",
        "128",
        "--threads",
        "1",
    ]));
    let swept = Sae::load(&run.join("topk-k4-f32")).unwrap();
    let single = Sae::load(&alone).unwrap();
    assert_eq!(swept.w_enc_fd(), single.w_enc_fd());
    std::fs::remove_dir_all(dir).unwrap();
}

/// Starts a long run, interrupts it with SIGINT once it has logged a few steps, and returns its
/// exit status.
fn interrupt(args: &[&str], run: &Path) -> std::process::ExitStatus {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sae"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |t| t.lines().count()) < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the run never logged"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    child.wait().unwrap()
}

#[test]
fn ctrl_c_checkpoints_and_resume_matches_the_uninterrupted_run() {
    let dir = temp_dir("run-resume");
    let data = dir.join("acts.npy");
    write_shard(&data, 4000, 16);
    for arch in ["batchtopk", "relu", "jumprelu"] {
        let straight = dir.join(format!("{arch}-straight"));
        let resumed = dir.join(format!("{arch}-resumed"));
        let args = |out: &Path| {
            [
                "train",
                "--data",
                data.to_str().unwrap(),
                "--arch",
                arch,
                "--k",
                "4",
                "--dict-size",
                "64",
                "--steps",
                "800",
                "--batch-size",
                "256",
                "--buffer-rows",
                "1000",
                "--metrics-every",
                "1",
                "--threads",
                "1",
                "--out",
                out.to_str().unwrap(),
            ]
            .map(String::from)
        };
        let status = interrupt(&args(&resumed).each_ref().map(String::as_str), &resumed);
        assert_eq!(status.code(), Some(130), "{arch}");
        assert!(resumed.join("checkpoint").is_dir(), "{arch}");
        let stopped_at = metrics(&resumed).last().unwrap().step;
        assert!(
            stopped_at < 800,
            "{arch}: the run ended before the interrupt"
        );

        let stdout = ok(&sae(&[
            "train",
            "--resume",
            resumed.to_str().unwrap(),
            "--threads",
            "1",
        ]));
        assert!(stdout.contains("resuming at step"), "{stdout}");
        ok(&sae(&args(&straight).each_ref().map(String::as_str)));

        let (a, b) = (Sae::load(&straight).unwrap(), Sae::load(&resumed).unwrap());
        assert_eq!(a.w_enc_fd(), b.w_enc_fd(), "{arch}");
        assert_eq!(a.w_dec_fd(), b.w_dec_fd(), "{arch}");
        assert_eq!(a.b_enc_f(), b.b_enc_f(), "{arch}");
        assert_eq!(a.b_dec_d(), b.b_dec_d(), "{arch}");
        assert_eq!(a.threshold(), b.threshold(), "{arch}");
        assert_eq!(a.latent_thresholds(), b.latent_thresholds(), "{arch}");
        // The metrics read as one run: every step once, in order.
        let steps: Vec<u64> = metrics(&resumed).iter().map(|r| r.step).collect();
        assert_eq!(steps, (1..=800).collect::<Vec<_>>(), "{arch}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn resuming_what_is_not_an_interrupted_run_is_a_usage_error() {
    let dir = temp_dir("run-resume-errors");
    let out = sae(&["train", "--resume", dir.join("nothing").to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not a run directory"), "{stderr}");

    let finished = dir.join("finished");
    ok(&sae(&[
        "train",
        "--out",
        finished.to_str().unwrap(),
        "--steps",
        "5",
        "--batch-size",
        "32",
        "--threads",
        "1",
    ]));
    let out = sae(&["train", "--resume", finished.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no checkpoint"), "{stderr}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_config_file_sets_the_run_and_flags_override_it() {
    let dir = temp_dir("run-config");
    let config = dir.join("run.toml");
    std::fs::write(
        &config,
        "[train]\nsteps = 20\nbatch_size = 32\nseed = 3\n\n[[sae]]\nname = \"small\"\narch = \"topk\"\nk = 2\ndict_size = 64\n\n[[sae]]\nname = \"wide\"\narch = \"relu\"\ndict_size = 128\n",
    )
    .unwrap();
    let run = dir.join("run");
    ok(&sae(&[
        "train",
        "--config",
        config.to_str().unwrap(),
        "--steps",
        "10",
        "--out",
        run.to_str().unwrap(),
        "--threads",
        "1",
    ]));
    assert_eq!(
        Sae::load(&run.join("small")).unwrap().config().dict_size,
        64
    );
    assert_eq!(
        Sae::load(&run.join("wide")).unwrap().config().dict_size,
        128
    );
    assert_eq!(metrics(&run.join("wide")).last().unwrap().step, 10);
    let written = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(written.contains("seed = 3"), "{written}");

    std::fs::write(&config, "[train]\nstep = 20\n").unwrap();
    let out = sae(&["train", "--config", config.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("run.toml") && stderr.contains("step"),
        "{stderr}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_diverging_run_stops_at_the_step_naming_the_cause_and_leaves_readable_files() {
    let dir = temp_dir("run-diverge");
    let run = dir.join("run");
    let out = sae(&[
        "train",
        "--out",
        run.to_str().unwrap(),
        "--steps",
        "20",
        "--batch-size",
        "32",
        "--dict-size",
        "32",
        "--k",
        "4",
        "--lr",
        "1e30",
        "--checkpoint-every",
        "1",
        "--metrics-every",
        "1",
        "--threads",
        "1",
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("diverged at step")
            && stderr.contains("--lr")
            && stderr.contains("--normalize"),
        "{stderr}"
    );
    // Every line of the metrics parses, with finite figures.
    let records = metrics(&run);
    assert!(records
        .iter()
        .all(|r| r.loss.is_finite() && r.mse.is_finite()));
    // No SAE of non-finite weights was saved, and a checkpoint left is finite.
    assert!(!run.join("sae.safetensors").exists());
    let weights = run.join("checkpoint/0/checkpoint.safetensors");
    if weights.exists() {
        for name in ["w_enc_fd", "w_dec_fd", "b_enc_f", "b_dec_d"] {
            let (_, values) = common::tensor(&weights, name);
            assert!(values.iter().all(|v| v.is_finite()), "{name}");
        }
    }
    // A metrics file an older version wrote, with a null loss, still plots, with a note.
    let legacy = r#"{"step":99,"tokens":3168,"lr":1e30,"loss":null,"mse":null,"aux":0.0,"fve":null,"l0":4.0,"dead_fraction":0.0,"threshold":null,"seconds":0.1}"#;
    let mut text_now = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text_now.push_str(legacy);
    text_now.push('\n');
    std::fs::write(run.join("metrics.jsonl"), text_now).unwrap();
    let stdout = ok(&sae(&["plot", run.to_str().unwrap()]));
    assert!(stdout.contains("not finite from step 99"), "{stdout}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_nan_row_mid_run_checkpoints_and_resumes_skipping_it() {
    let dir = temp_dir("run-nan-row");
    let data = dir.join("acts.npy");
    let mut x = synthetic_batch(256, 16, 7);
    x[[150, 3]] = f32::NAN;
    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_npy(&data, "<f4", &[256, 16], &bytes);
    let args = |out: &Path, skip: bool| {
        let mut args = vec![
            "train",
            "--data",
            data.to_str().unwrap(),
            "--eval-fraction",
            "0",
            "--steps",
            "20",
            "--batch-size",
            "32",
            "--buffer-rows",
            "64",
            "--arch",
            "topk",
            "--k",
            "4",
            "--dict-size",
            "32",
            "--threads",
            "1",
            "--out",
            out.to_str().unwrap(),
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        if skip {
            args.push("--skip-non-finite".into());
        }
        args
    };
    let run = dir.join("run");
    let out = sae(&args(&run, false)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("acts.npy row 150")
            && stderr.contains("checkpoint is written")
            && stderr.contains("--resume")
            && stderr.contains("--skip-non-finite"),
        "{stderr}"
    );
    assert!(run.join("checkpoint/run.json").is_file());

    // An edited config.toml is one line naming the key, never a panic.
    let config = run.join("config.toml");
    let written = std::fs::read_to_string(&config).unwrap();
    for key in ["batch_size", "metrics_every"] {
        let edited: String = written
            .lines()
            .filter(|l| !l.starts_with(key))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&config, edited).unwrap();
        let out = sae(&["train", "--resume", run.to_str().unwrap()]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{key}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(&format!("train.{key}")), "{stderr}");
    }
    std::fs::write(&config, &written).unwrap();

    // Resuming without skipping meets the row again; skipping goes to the end, recorded.
    let out = sae(&["train", "--resume", run.to_str().unwrap(), "--threads", "1"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    ok(&sae(&[
        "train",
        "--resume",
        run.to_str().unwrap(),
        "--skip-non-finite",
        "--threads",
        "1",
    ]));
    let config_now = std::fs::read_to_string(&config).unwrap();
    assert!(
        config_now.contains("skip_non_finite = true"),
        "{config_now}"
    );
    // The batches before the row were made as a skipping run makes them: the result is that
    // of a run that skipped from the start.
    let skipping = dir.join("skipping");
    ok(&sae(&args(&skipping, true)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()));
    assert_eq!(
        std::fs::read(run.join("sae.safetensors")).unwrap(),
        std::fs::read(skipping.join("sae.safetensors")).unwrap()
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_second_process_in_a_run_directory_is_refused_naming_the_first() {
    let dir = temp_dir("run-two-processes");
    let run = dir.join("run");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sae"))
        .args([
            "train",
            "--out",
            run.to_str().unwrap(),
            "--steps",
            "1000000",
            "--batch-size",
            "32",
            "--dict-size",
            "32",
            "--metrics-every",
            "1",
            "--threads",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |t| t.lines().count()) < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the run never logged"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let holder = format!("pid {}", child.id());
    for args in [
        vec!["train", "--resume", run.to_str().unwrap()],
        vec![
            "train",
            "--out",
            run.to_str().unwrap(),
            "--force",
            "--steps",
            "2",
        ],
    ] {
        let out = sae(&args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("in use by") && stderr.contains(&holder),
            "{stderr}"
        );
    }
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    assert_eq!(child.wait().unwrap().code(), Some(130));
    std::fs::remove_dir_all(dir).unwrap();
}
