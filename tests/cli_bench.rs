//! `sae bench` at a tiny shape: the table's fields, the JSON object's keys, the loader-fed
//! figures with --data, and its usage errors.

mod common;

use common::{ok, sae, usage_error_line};

const TINY: [&str; 15] = [
    "bench",
    "--d",
    "16",
    "--f",
    "64",
    "--k",
    "4",
    "--batch",
    "64",
    "--steps",
    "2",
    "--warmup",
    "1",
    "--threads",
    "1",
];

fn bench(extra: &[&str]) -> String {
    let args: Vec<&str> = TINY.iter().chain(extra).copied().collect();
    ok(&sae(&args))
}

#[test]
fn table_names_the_shape_the_times_and_every_phase() {
    let out = bench(&[]);
    for needle in [
        "D=16 F=64 k=4 B=64",
        "arch: batchtopk",
        "threads: 1",
        "medians of 2 rounds after 1 warm-up",
        "encoder GEMM",
        "training step",
        "encode",
        "select",
        "decode_loss",
        "backward",
        "update",
        "other",
        "ratio step/GEMM:",
        "tokens/s:",
    ] {
        assert!(out.contains(needle), "{needle:?} not in:\n{out}");
    }
    assert!(!out.contains("loader-fed"), "{out}");

    let out = bench(&["--arch", "topk", "--data"]);
    for needle in [
        "arch: topk",
        "loader-fed step",
        "wait in next_batch",
        "512 rows",
    ] {
        assert!(out.contains(needle), "{needle:?} not in:\n{out}");
    }
}

#[test]
fn json_is_one_object_with_every_figure() {
    let out = bench(&["--json", "--data"]);
    assert_eq!(out.trim().lines().count(), 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["d"], 16);
    assert_eq!(v["f"], 64);
    assert_eq!(v["k"], 4);
    assert_eq!(v["batch"], 64);
    assert_eq!(v["arch"], "batchtopk");
    assert_eq!(v["threads"], 1);
    assert_eq!(v["steps"], 2);
    assert_eq!(v["warmup"], 1);
    assert!(v["backend"].is_string());
    for key in ["gemm_ms", "gemm_gflops", "step_ms", "ratio", "tokens_per_s"] {
        let x = v[key].as_f64().unwrap_or_else(|| panic!("{key} in {v}"));
        assert!(x.is_finite() && x > 0.0, "{key} = {x}");
    }
    assert!(v["other_ms"].is_f64(), "{v}");
    // One process: no collectives, and the whole batch is this process's.
    assert_eq!(v["ranks"], 1);
    assert_eq!(v["local_rows"], 64);
    assert_eq!(v["collective_ms"], 0.0);
    assert_eq!(v["bytes_sent_per_step"], 0.0);
    assert!(v["per_rank"].is_null(), "{v}");
    let ratio = v["step_ms"].as_f64().unwrap() / v["gemm_ms"].as_f64().unwrap();
    assert!((v["ratio"].as_f64().unwrap() - ratio).abs() <= 1e-9 * ratio);
    let phases = v["phases_ms"].as_object().unwrap();
    let mut names: Vec<&str> = phases.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(
        names,
        ["backward", "decode_loss", "encode", "select", "update"]
    );
    assert!(phases.values().all(|ms| ms.as_f64().unwrap() >= 0.0));
    let data = &v["data"];
    assert_eq!(data["rows"], 512);
    assert_eq!(data["dtype"], "float16");
    for key in ["wait_ms", "wait_max_ms", "step_ms", "tokens_per_s"] {
        assert!(data[key].as_f64().unwrap() >= 0.0, "{key} in {data}");
    }

    let v: serde_json::Value = serde_json::from_str(&bench(&["--json", "--arch", "relu"])).unwrap();
    assert_eq!(v["arch"], "relu");
    assert!(v["data"].is_null(), "{v}");
    // ReLU's b_enc is set so that about k = 4 of the 64 codes per row are positive.
    let l0 = v["l0"].as_f64().unwrap();
    assert!((2.0..=8.0).contains(&l0), "relu L0 {l0} for k = 4");
    let mut args = TINY.to_vec();
    args[6] = "32"; // --k
    args.extend(["--json", "--arch", "relu"]);
    let v: serde_json::Value = serde_json::from_str(&ok(&sae(&args))).unwrap();
    let l0 = v["l0"].as_f64().unwrap();
    assert!((24.0..=40.0).contains(&l0), "relu L0 {l0} for k = 32");
}

#[test]
fn bad_options_are_one_line_naming_the_option() {
    usage_error_line(
        &sae(&["bench", "--d", "16", "--f", "64", "--k", "65"]),
        &["--k", "65", "64"],
    );
    // Clap's own errors are one line too.
    for (option, value) in [
        ("--f", "0"),
        ("--batch", "0"),
        ("--steps", "0"),
        ("--d", "-3"),
    ] {
        let out = sae(&["bench", option, value]);
        usage_error_line(&out, &[option]);
    }
}
