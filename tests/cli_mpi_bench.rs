//! `sae bench` under mpirun: each of 2 ranks steps half of the same global batch, rank 0 alone
//! prints, every rank's collectives are reported (the exchange at least F·D·4
//! bytes per rank per step), and a batch that does not split or `--data` stops every rank with
//! one line; with `--latent-shards 2` the two ranks split the latents instead and send only
//! batch-sized tensors.
#![cfg(feature = "mpi")]

mod common;

use std::process::{Command, Output};

use common::{ok, text};

const TINY: [&str; 17] = [
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
    "3",
    "--warmup",
    "1",
    "--threads",
    "1",
    "--arch",
    "topk",
];

/// `sae args` as 2 MPI processes, killed after 60 s.
fn mpirun(args: &[&str]) -> Output {
    let out = Command::new("timeout")
        .args(["60", "mpirun", "--oversubscribe", "-np", "2"])
        .arg(env!("CARGO_BIN_EXE_sae"))
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run mpirun");
    assert_ne!(out.status.code(), Some(124), "{}", text(&out.stderr));
    out
}

/// The tiny bench's arguments and `extra`.
fn with<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    TINY.iter().chain(extra).copied().collect()
}

#[test]
fn two_ranks_report_once_with_every_ranks_collectives() {
    let out = ok(&mpirun(&with(&["--json"])));
    assert_eq!(out.trim().lines().count(), 1, "rank 0 alone prints: {out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ranks"], 2);
    assert_eq!(v["batch"], 64);
    assert_eq!(v["local_rows"], 32);
    // TopK: k codes in every row of the global batch.
    assert_eq!(v["l0"], 4.0);
    let ranks = v["per_rank"].as_array().unwrap();
    assert_eq!(ranks.len(), 2, "{v}");
    let f = |r: &serde_json::Value, key: &str| r[key].as_f64().unwrap();
    for r in ranks {
        // Each rank's half of the updated W_enc and W_dec rows, F/2·D·4 bytes each, and its
        // half of the batch's rows (x − b_dec and ∂L/∂x̂, B/2·D·4 bytes each).
        assert!(
            f(r, "bytes_sent_per_step") >= (64 * 16 * 4 + 64 * 16 * 4) as f64,
            "{r}"
        );
        assert!(f(r, "collective_calls_per_step") >= 4.0, "{r}");
        assert!(f(r, "exchange_ms") > 0.0, "{r}");
        assert!(f(r, "collective_ms") > 0.0, "{r}");
        let (step, compute) = (f(r, "step_ms"), f(r, "compute_ms"));
        assert!(compute > 0.0 && compute <= step, "{r}");
    }
    // Both ranks call the same collectives on buffers of the same length.
    assert_eq!(
        ranks[0]["bytes_sent_per_step"],
        ranks[1]["bytes_sent_per_step"]
    );
    assert_eq!(
        ranks[0]["collective_calls_per_step"],
        ranks[1]["collective_calls_per_step"]
    );
    assert_eq!(v["bytes_sent_per_step"], ranks[0]["bytes_sent_per_step"]);
    let tokens = f(&v, "tokens_per_s");
    let global = 64.0 / (f(&v, "step_ms") / 1e3);
    assert!((tokens - global).abs() <= 1e-9 * global, "{v}");

    let table = ok(&mpirun(&TINY));
    assert_eq!(table.matches("D=16 F=64 k=4 B=64").count(), 1, "{table}");
    for needle in ["2 ranks, 32 rows each", "compute ms", "exch. ms", "MB sent"] {
        assert!(table.contains(needle), "{needle:?} not in:\n{table}");
    }
    assert_eq!(
        table.matches("\n  1 ").count(),
        1,
        "a row for rank 1:\n{table}"
    );
}

#[test]
fn latent_shards_split_the_gemm_and_send_only_batch_sized_tensors() {
    // F large against B: a shard's F/2·D rows outweigh everything batch-sized.
    let mut args = with(&["--latent-shards", "2", "--json"]);
    args[4] = "1024"; // --f
    let out = ok(&mpirun(&args));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["latent_shards"], 2, "{v}");
    // One group: both ranks step the whole batch, each over half the latents.
    assert_eq!(v["local_rows"], 64);
    assert_eq!(
        (v["gemm_rows"].as_u64(), v["gemm_latents"].as_u64()),
        (Some(64), Some(512))
    );
    // The selection is the whole dictionary's: k codes in every row.
    assert_eq!(v["l0"], 4.0);
    for r in v["per_rank"].as_array().unwrap() {
        let sent = r["bytes_sent_per_step"].as_f64().unwrap();
        // At least the partial x̂ (B·D·4 bytes); less than one shard's W_dec rows.
        assert!(sent >= (64 * 16 * 4) as f64, "{r}");
        assert!(sent < (512 * 16 * 4) as f64, "{r}");
    }

    let table = ok(&mpirun(&with(&["--latent-shards", "2"])));
    assert!(
        table.contains("2 ranks (one group of 2 latent shards, 32 latents a rank), 64 rows each"),
        "{table}"
    );
    assert!(table.contains("(64x16)·(16x32)"), "{table}");

    refused(
        &mpirun(&with(&["--latent-shards", "3"])),
        &["--latent-shards 3", "2 ranks"],
    );
}

/// One `error:` line from rank 0 (mpirun adds its own notice after it), exit status 2.
fn refused(out: &Output, needles: &[&str]) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    for needle in needles {
        assert!(errors[0].contains(needle), "{needle:?} not in {stderr}");
    }
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
}

#[test]
fn a_batch_that_does_not_split_and_data_are_refused_on_every_rank() {
    let mut args = TINY.to_vec();
    args[8] = "63"; // --batch
    refused(&mpirun(&args), &["--batch 63", "2 ranks"]);
    refused(&mpirun(&with(&["--data"])), &["--data", "mpirun"]);
}
