//! `sae synth`, `sae eval` and `sae plot` on a trained run: the synthetic set written out and
//! trained on as files, its recovery scored from the written true features, plots redrawn.

mod common;

use common::{ok, sae, temp_dir, usage_error_line};
use sparse_autoencoder::data::{NpyShards, Source};

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
