//! `sae train` under SIGTERM (what `kill` and Slurm send) and SIGINT (Ctrl-C): once training
//! runs, a checkpoint and exit status 143 or 130, and `--resume` finishes the run; before
//! training starts, an exit as prompt with the same statuses and nothing to resume.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{ok, sae, synthetic_batch, temp_dir, write_npy};

fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sae"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn send(child: &Child, signal: libc::c_int) {
    // SAFETY: kill(2) on the pid of a child this test spawned and has not yet waited for.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, signal) }, 0);
}

/// Waits for `child` at most `limit`, killing it after that.
fn wait(child: &mut Child, limit: Duration) -> Option<i32> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("sae did not exit within {limit:?} of the signal");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn logged_steps(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |t| t.lines().count())
}

#[test]
fn a_signal_during_training_writes_a_checkpoint_and_resume_finishes() {
    let dir = temp_dir("signals-training");
    // A small file and no held-out rows keep the resumed run short in a debug build.
    let data = dir.join("acts.npy");
    let x = synthetic_batch(2000, 16, 3);
    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_npy(&data, "<f4", &[2000, 16], &bytes);
    for (signal, status) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
        let run = dir.join(format!("run-{signal}"));
        let mut child = spawn(&[
            "train",
            "--data",
            data.to_str().unwrap(),
            "--eval-fraction",
            "0",
            "--out",
            run.to_str().unwrap(),
            "--steps",
            "400",
            "--batch-size",
            "32",
            "--dict-size",
            "64",
            "--k",
            "4",
            "--metrics-every",
            "1",
            "--threads",
            "1",
        ]);
        let start = Instant::now();
        while logged_steps(&run) < 3 {
            assert!(start.elapsed() < Duration::from_secs(60), "never trained");
            std::thread::sleep(Duration::from_millis(10));
        }
        send(&child, signal);
        assert_eq!(wait(&mut child, Duration::from_secs(20)), Some(status));
        assert!(
            run.join("checkpoint").is_dir(),
            "signal {signal}: no checkpoint"
        );
        let stopped_at = logged_steps(&run);
        assert!(stopped_at < 400, "signal {signal}: the run ended first");
        let stdout = ok(&sae(&[
            "train",
            "--resume",
            run.to_str().unwrap(),
            "--threads",
            "1",
        ]));
        assert!(stdout.contains("resuming at step"), "{stdout}");
        assert!(run.join("sae.safetensors").is_file());
        assert_eq!(logged_steps(&run), 400, "signal {signal}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_signal_before_training_ends_the_process_at_once() {
    let dir = temp_dir("signals-opening");
    // Building this synthetic set's 16384 feature directions of width 1024 takes seconds in a
    // debug build: the signal comes while the data is being made.
    let config = dir.join("slow.toml");
    std::fs::write(&config, "[synthetic]\nd_model = 1024\nn_features = 16384\n").unwrap();
    for (signal, status) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
        let run = dir.join(format!("run-{signal}"));
        let mut child = spawn(&[
            "train",
            "--config",
            config.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
            "--dict-size",
            "64",
            "--k",
            "4",
            "--batch-size",
            "8",
            "--steps",
            "10",
        ]);
        std::thread::sleep(Duration::from_millis(300));
        send(&child, signal);
        assert_eq!(wait(&mut child, Duration::from_secs(2)), Some(status));
        // Nothing was trained, so there is nothing to resume.
        assert!(!run.join("checkpoint").exists(), "signal {signal}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}
