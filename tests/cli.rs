//! The `sae` binary: a short default-data run succeeds; invalid options exit with status 2 and
//! a message naming the option, never a panic.

use std::process::{Command, Output};

fn sae(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sae"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run sae")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn short_synthetic_run_prints_progress_and_recovery() {
    for arch in ["batchtopk", "topk", "relu"] {
        let out = sae(&[
            "train",
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
        let last = stdout.lines().last().unwrap_or_default();
        assert!(last.starts_with("recovered "), "{arch}: {stdout}");
        assert!(last.contains("cosine >= 0.9"), "{arch}: {stdout}");
    }
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
        // Rejected while parsing.
        (vec!["--k", "-3"], "--k"),
        (vec!["--seed", "-1"], "--seed"),
        (vec!["--batch-size", "0"], "--batch-size"),
        (vec!["--threads", "0"], "--threads"),
        (vec!["--log-every", "0"], "--log-every"),
        (vec!["--arch", "gated"], "--arch"),
        (vec!["--relu-variant", "both"], "--relu-variant"),
        (vec!["--steps", "many"], "--steps"),
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

#[test]
fn unknown_subcommand_is_a_usage_error() {
    let out = sae(&["evaluate"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}
