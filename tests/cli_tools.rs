//! `sae synth`, `sae eval` and `sae plot` on a trained run: the synthetic set written out and
//! trained on as files, its recovery scored from the written true features, plots redrawn;
//! files that must be refused (non-finite true features or weights) refused in one line.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{f32_bytes, ok, random_sae, sae, temp_dir, usage_error_line, write_npy};
use sparse_autoencoder::data::{NpyShards, Source};
use sparse_autoencoder::{Architecture, Sae};

#[test]
fn synth_files_train_evaluate_and_score_recovery() {
    let dir = temp_dir("tools");
    let data = dir.join("data");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    ok(&sae(&[
        "synth",
        "--out",
        &s(&data),
        "--rows",
        "20000",
        "--seed",
        "4",
    ]));
    let acts = NpyShards::open(&[data.join("activations.npy")]).unwrap();
    assert_eq!((acts.n_rows(), acts.d_model()), (20000, 64));
    let features = NpyShards::open(&[data.join("true_features.npy")]).unwrap();
    assert_eq!((features.n_rows(), features.d_model()), (256, 64));
    usage_error_line(&sae(&["synth", "--out", &s(&data)]), &["--force"]);

    let run = dir.join("run");
    ok(&sae(&[
        "train",
        "--data",
        &s(&data.join("activations.npy")),
        "--out",
        &s(&run),
        "--k",
        "8",
        "--dict-size",
        "512",
        "--steps",
        "300",
        "--batch-size",
        "512",
        "--lr",
        "5e-3",
        "--threads",
        "1",
    ]));
    let evaluated = dir.join("eval");
    let stdout = ok(&sae(&[
        "eval",
        &s(&run),
        "--data",
        &s(&data.join("activations.npy")),
        "--true-features",
        &s(&data.join("true_features.npy")),
        "--out",
        &s(&evaluated),
    ]));
    for row in [
        "mse",
        "fve",
        "l0",
        "dead",
        "cos(x, x̂)",
        "‖x̂‖/‖x‖",
        "never fired",
    ] {
        assert!(stdout.contains(row), "{row}: {stdout}");
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(evaluated.join("eval.json")).unwrap())
            .unwrap();
    assert_eq!(report["eval"]["n_rows"], 20000);
    let fve = report["eval"]["fve"].as_f64().unwrap();
    assert!(fve > 0.5, "{report}");
    // Even a short run finds some of the frequent features.
    let found = report["recovery"]["fraction_above_0_9"].as_f64().unwrap();
    assert!(found > 0.1, "{report}");
    assert!(evaluated.join("density.png").is_file());

    // Widths that disagree, and directories that hold no SAE.
    let wide = dir.join("wide");
    ok(&sae(&[
        "synth",
        "--out",
        &s(&wide),
        "--rows",
        "10",
        "--d-model",
        "32",
    ]));
    usage_error_line(
        &sae(&[
            "eval",
            &s(&run),
            "--data",
            &s(&wide.join("activations.npy")),
        ]),
        &["--data"],
    );
    usage_error_line(
        &sae(&[
            "eval",
            &s(&run),
            "--true-features",
            &s(&wide.join("true_features.npy")),
        ]),
        &["--true-features"],
    );
    usage_error_line(
        &sae(&[
            "eval",
            &s(&data),
            "--data",
            &s(&data.join("activations.npy")),
        ]),
        &["not an SAE directory"],
    );

    // Plots are redrawn from the run's files.
    std::fs::remove_file(run.join("curves.png")).unwrap();
    let stdout = ok(&sae(&["plot", &s(&run)]));
    assert!(stdout.contains("curves.png"), "{stdout}");
    assert!(run.join("curves.png").is_file());
    usage_error_line(&sae(&["plot", &s(&data)]), &["no metrics.jsonl"]);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Runs `sae` with `args`, killing it and failing the test if it runs more than `secs`.
fn sae_within(args: &[&str], secs: u64) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sae"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run sae");
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(secs) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("sae {args:?} ran more than {secs} s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn non_finite_true_features_are_refused_by_file_row_and_column() {
    let dir = temp_dir("tools-nan-features");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    random_sae(Architecture::TopK { k: 2 }, 16, 32, 0)
        .save(&dir)
        .unwrap();
    let features = dir.join("features.npy");
    for (bad, shown) in [(f32::NAN, "NaN"), (f32::INFINITY, "inf")] {
        let mut values = vec![1.0f32; 2 * 16];
        values[16 + 3] = bad;
        write_npy(&features, "<f4", &[2, 16], &f32_bytes(&values));
        let out = sae_within(&["eval", &s(&dir), "--true-features", &s(&features)], 20);
        usage_error_line(
            &out,
            &["--true-features", &s(&features), shown, "row 1, column 3"],
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn eval_encode_and_export_refuse_an_sae_with_non_finite_weights() {
    let dir = temp_dir("tools-nan-weights");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let good = random_sae(Architecture::TopK { k: 2 }, 16, 32, 0);
    let mut w_dec_fd = good.w_dec_fd().to_owned();
    w_dec_fd[[4, 7]] = f32::NAN;
    let run = dir.join("run");
    Sae::from_parts(
        *good.config(),
        good.w_enc_fd().to_owned(),
        good.b_enc_f().to_owned(),
        w_dec_fd,
        good.b_dec_d().to_owned(),
    )
    .unwrap()
    .save(&run)
    .unwrap();
    let data = dir.join("ok.npy");
    let values: Vec<f32> = (0..200 * 16).map(|i| (i % 7) as f32 * 0.1).collect();
    write_npy(&data, "<f4", &[200, 16], &f32_bytes(&values));
    let out = dir.join("out");
    let needles = ["sae.safetensors", "\"w_dec_fd\"", "NaN", "[4, 7]"];
    let (run, data, out) = (s(&run), s(&data), s(&out));
    usage_error_line(&sae(&["eval", &run, "--data", &data]), &needles);
    usage_error_line(
        &sae(&["encode", &run, "--data", &data, "--out", &out]),
        &needles,
    );
    usage_error_line(
        &sae(&["export", &run, "--format", "saelens", "--out", &out]),
        &needles,
    );
    assert!(!std::path::Path::new(&out).exists(), "nothing is written");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_batch_size_too_large_for_memory_is_refused_before_encoding() {
    let dir = temp_dir("tools-huge-batch");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let run = dir.join("run");
    random_sae(Architecture::TopK { k: 2 }, 16, 32, 0)
        .save(&run)
        .unwrap();
    // 2^36 rows declared (4 TiB), the data a hole: every batch size fits the file, not memory.
    let data = dir.join("huge.npy");
    write_npy(&data, "<f4", &[1 << 36, 16], &[]);
    let file = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
    file.set_len(file.metadata().unwrap().len() + (4u64 << 40))
        .unwrap();
    drop(file);
    let out = dir.join("codes");
    let (run, data) = (s(&run), s(&data));
    let huge = u64::MAX.to_string();
    usage_error_line(
        &sae_within(
            &[
                "encode",
                &run,
                "--data",
                &data,
                "--out",
                &s(&out),
                "--batch-size",
                &huge,
            ],
            20,
        ),
        &["--batch-size", "68719476736 rows", "GB"],
    );
    assert!(!out.exists(), "nothing is written");
    usage_error_line(
        &sae_within(&["eval", &run, "--data", &data, "--batch-size", &huge], 20),
        &["--batch-size", "68719476736 rows"],
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// An SAE whose encoder and decoder are `features_gd` (a ReLU firing latent g where the
/// projection on feature g exceeds `threshold`), saved in `dir`.
fn save_oracle(features_gd: ndarray::Array2<f32>, threshold: f32, dir: &std::path::Path) {
    let (g, d) = features_gd.dim();
    let config = sparse_autoencoder::SaeConfig {
        d_model: d,
        dict_size: g,
        arch: Architecture::RELU,
    };
    Sae::from_parts(
        config,
        features_gd.clone(),
        ndarray::Array1::from_elem(g, -threshold),
        features_gd,
        ndarray::Array1::zeros(d),
    )
    .unwrap()
    .save(dir)
    .unwrap();
}

fn read_true_features(dir: &std::path::Path) -> ndarray::Array2<f32> {
    let features = NpyShards::open(&[dir.join("true_features.npy")]).unwrap();
    let (g, d) = (features.n_rows() as usize, features.d_model());
    let mut features_gd = ndarray::Array2::zeros((g, d));
    features
        .read_rows(0, features_gd.as_slice_mut().unwrap())
        .unwrap();
    features_gd
}

#[test]
fn synth_writes_its_configuration_and_eval_scores_firing_from_it() {
    let dir = temp_dir("tools-firing");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let data = dir.join("data");
    ok(&sae(&[
        "synth",
        "--out",
        &s(&data),
        "--rows",
        "100",
        "--seed",
        "3",
    ]));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("synth.json")).unwrap()).unwrap();
    assert_eq!(
        (config["preset"].as_str(), config["seed"].as_u64()),
        (Some("default"), Some(3))
    );
    // The oracle's decoder is the true features (MCC 1); eval regenerates the rows the library
    // scores it on, so its figures are the library's.
    let oracle = dir.join("oracle");
    save_oracle(read_true_features(&data), 0.5, &oracle);
    let synth =
        sparse_autoencoder::synth::Synth::new(serde_json::from_value(config).unwrap()).unwrap();
    let expected = sparse_autoencoder::synth::score(
        &Sae::load(&oracle).unwrap(),
        sparse_autoencoder::backend::Device::Cpu,
        &synth,
        2048,
        u64::MAX,
    )
    .unwrap();
    let out = dir.join("eval");
    let (oracle_dir, out_dir) = (s(&oracle), s(&out));
    let eval = |true_features: &str| {
        sae(&[
            "eval",
            &oracle_dir,
            "--true-features",
            true_features,
            "--firing-rows",
            "2048",
            "--out",
            &out_dir,
        ])
    };
    // The directory and the file beside synth.json say the same.
    for given in [s(&data), s(&data.join("true_features.npy"))] {
        let stdout = ok(&eval(&given));
        assert!(
            stdout.contains("firing of the matched latents on 2048 rows: F1"),
            "{stdout}"
        );
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
        let (recovery, firing) = (&report["recovery"], &report["recovery"]["firing"]);
        let number = |v: &serde_json::Value| v.as_f64().unwrap() as f32;
        let want = expected.firing.unwrap();
        assert_eq!(number(&recovery["mcc"]), expected.mcc, "{report}");
        assert_eq!(number(&firing["mean_f1"]), want.mean_f1, "{report}");
        assert_eq!(
            number(&firing["mean_precision"]),
            want.mean_precision,
            "{report}"
        );
        assert_eq!(number(&firing["mean_recall"]), want.mean_recall, "{report}");
        let above = number(&firing["fraction_f1_above_0_5"]);
        assert_eq!(above, want.fraction_f1_above_0_5, "{report}");
        assert_eq!(firing["n_rows"], 2048, "{report}");
        assert_eq!(firing["n_scored"], 256, "{report}");
        assert!(expected.mcc > 0.999, "{expected:?}");
    }
    // Without synth.json the decoder alone is scored, and a note says why.
    let lone = dir.join("lone");
    std::fs::create_dir_all(&lone).unwrap();
    std::fs::copy(
        data.join("true_features.npy"),
        lone.join("true_features.npy"),
    )
    .unwrap();
    let stdout = ok(&eval(&s(&lone.join("true_features.npy"))));
    assert!(stdout.contains("no synth.json beside"), "{stdout}");
    assert!(!stdout.contains("firing of the matched"), "{stdout}");
    // A synth.json of another set is refused, naming the option and the fix.
    let other = dir.join("other");
    ok(&sae(&[
        "synth",
        "--out",
        &s(&other),
        "--rows",
        "10",
        "--seed",
        "4",
    ]));
    std::fs::copy(other.join("synth.json"), lone.join("synth.json")).unwrap();
    usage_error_line(
        &eval(&s(&lone)),
        &["--true-features", "other true features", "sae synth"],
    );
    std::fs::write(lone.join("synth.json"), "{\"n_features\": 0}").unwrap();
    usage_error_line(&eval(&s(&lone)), &["--true-features", "n_features"]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn synth_hard_preset_writes_the_hard_set_and_refuses_options_it_cannot_hold() {
    let dir = temp_dir("tools-hard");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let data = dir.join("data");
    let stdout = ok(&sae(&[
        "synth",
        "--preset",
        "hard",
        "--out",
        &s(&data),
        "--rows",
        "500",
    ]));
    assert!(stdout.contains("hard preset"), "{stdout}");
    let acts = NpyShards::open(&[data.join("activations.npy")]).unwrap();
    assert_eq!((acts.n_rows(), acts.d_model()), (500, 256));
    assert_eq!(read_true_features(&data).dim(), (4096, 256));
    let config: sparse_autoencoder::synth::SynthConfig =
        serde_json::from_str(&std::fs::read_to_string(data.join("synth.json")).unwrap()).unwrap();
    assert_eq!(config, sparse_autoencoder::synth::SynthConfig::hard());
    // Flags override the preset; values it cannot hold name the flag, exit 2.
    let x = s(&dir.join("x"));
    for (args, needles) in [
        (
            vec!["--n-features", "1000"],
            vec!["--n-features", "n_parents"],
        ),
        (vec!["--d-model", "8"], vec!["--d-model", "shared_rank"]),
        (vec!["--mean-active", "0"], vec!["--mean-active"]),
        (
            vec!["--mean-active", "5000"],
            vec!["--mean-active", "exceed"],
        ),
    ] {
        let mut all = vec!["synth", "--preset", "hard", "--out", &x];
        all.extend(args);
        usage_error_line(&sae(&all), &needles);
    }
    usage_error_line(
        &sae(&["synth", "--preset", "harder", "--out", &x]),
        &["--preset", "hard"],
    );
    assert!(!dir.join("x").exists());
    std::fs::remove_dir_all(dir).unwrap();
}
