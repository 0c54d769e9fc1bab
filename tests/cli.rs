//! The `sae` binary: a short default-data run succeeds; invalid options exit with status 2 and
//! one line naming the option.

use std::process::Command;

fn sae(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sae"))
        .args(args)
        .output()
        .expect("run sae")
}

#[test]
fn short_synthetic_run_reports_recovery() {
    let out = sae(&[
        "train",
        "--steps",
        "30",
        "--batch-size",
        "64",
        "--log-every",
        "10",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("step     30"), "{stdout}");
    assert!(stdout.contains("recovered"), "{stdout}");
}

#[test]
fn invalid_options_exit_with_status_2_and_name_the_option() {
    for (args, needle) in [
        (vec!["train", "--k", "0"], "k must be at least 1"),
        (vec!["train", "--lr=-1"], "lr must be"),
        (vec!["train", "--dict-size", "0"], "dict_size"),
        (vec!["train", "--batch-size", "0"], "--batch-size"),
        (vec!["train", "--threads", "0"], "--threads"),
        (vec!["train", "--arch", "gated"], "--arch"),
    ] {
        let out = sae(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
