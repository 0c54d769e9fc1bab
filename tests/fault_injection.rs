//! Crash-safety of a run's checkpoints: a short training run is killed (strace's fault
//! injection, `signal=KILL`) at every rename, unlink and fsync of its checkpoint saves, and
//! the resumes of some of those crashes are killed again at each of their renames; every
//! crashed run resumes to the uninterrupted run's `sae.safetensors`, bit for bit.
//!
//! Linux only, and strace must be installed: the test skips with a note without it, except
//! under CI (`CI=true`), where a missing strace fails it.
#![cfg(target_os = "linux")]

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use common::{synthetic_batch, temp_dir, text, write_npy};

/// The system calls a crash is injected at.
const TRACED: &str = "rename,renameat,renameat2,unlink,unlinkat,rmdir,fsync,fdatasync";

/// The `n`-th call (from 1) of `syscall` in the process: strace counts each system call of
/// the set apart, per thread, and every file of a run is written by its main thread.
#[derive(Clone, Debug)]
struct Point {
    syscall: String,
    n: usize,
    /// The call as strace printed it in the uninterrupted run, for failure messages.
    line: String,
}

fn strace_available() -> bool {
    let found = Command::new("strace")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "strace is not installed; CI must install it (apt-get install strace)"
        );
        eprintln!("note: strace is not installed; skipping the fault-injection test");
    }
    found
}

/// `sae train` of 4 steps with checkpoints at steps 2 and 4 (the last step's), into `out`.
fn train_args(data: &Path, out: &Path) -> Vec<String> {
    let args = [
        "train",
        "--data",
        data.to_str().unwrap(),
        "--eval-fraction",
        "0",
        "--steps",
        "4",
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
        "--checkpoint-every",
        "2",
        "--threads",
        "1",
        "--out",
        out.to_str().unwrap(),
    ];
    args.map(String::from).to_vec()
}

fn resume_args(out: &Path) -> Vec<String> {
    ["train", "--resume", out.to_str().unwrap(), "--threads", "1"]
        .map(String::from)
        .to_vec()
}

/// Runs `sae args` under strace with `strace_args` before the command.
fn under_strace(strace_args: &[String], args: &[String]) -> Output {
    Command::new("strace")
        .args(["-f", "-qq", "-e", &format!("trace={TRACED}")])
        .args(strace_args)
        .arg(env!("CARGO_BIN_EXE_sae"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Runs `sae args` and kills it at `point`; whether it was killed (it may end first).
fn crash(args: &[String], point: &Point) -> bool {
    let inject = format!("inject={}:signal=KILL:when={}", point.syscall, point.n);
    let out = under_strace(
        &["-e".into(), inject, "-o".into(), "/dev/null".into()],
        args,
    );
    out.status.signal() == Some(9)
}

/// Every call of the traced set in an strace log, numbered per system call.
fn calls(log: &str) -> Vec<Point> {
    let mut counts = std::collections::HashMap::<String, usize>::new();
    let mut points = Vec::new();
    for line in log.lines() {
        // "<pid>  name(args) = result"; resumed halves of interleaved calls start with "<".
        let call = line
            .split_once(' ')
            .map_or("", |(_, rest)| rest.trim_start());
        let Some((name, _)) = call.split_once('(') else {
            continue;
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric()) {
            continue;
        }
        let n = counts.entry(name.to_string()).or_default();
        *n += 1;
        points.push(Point {
            syscall: name.to_string(),
            n: *n,
            line: line.to_string(),
        });
    }
    points
}

/// The calls of the checkpoint saves (and of the checkpoint's removal at the end): those
/// naming a checkpoint path, and the directory sync right after one.
fn checkpoint_calls(points: &[Point]) -> Vec<Point> {
    let about = |p: &Point| p.line.contains("checkpoint");
    points
        .iter()
        .enumerate()
        .filter(|(i, p)| about(p) || (*i > 0 && about(&points[i - 1])))
        .map(|(_, p)| p.clone())
        .collect()
}

/// Resumes the run in `out` to its end and checks it against the uninterrupted run. A crash
/// after the last SAE was saved and evaluated, while the checkpoint was being removed, leaves
/// a finished run with no checkpoint: resuming it is refused, and its files are whole.
///
/// A crash before the first checkpoint was whole (`before_first`) leaves nothing to resume:
/// that is refused too, and the run started again (`--force`) ends as the uninterrupted one.
/// After it, "no checkpoint" would be lost work, and fails the test.
fn resume_to_end(data: &Path, out: &Path, reference: &[u8], before_first: bool, what: &str) {
    let sae = |args: Vec<String>| {
        Command::new(env!("CARGO_BIN_EXE_sae"))
            .args(args)
            .output()
            .unwrap()
    };
    let done = sae(resume_args(out));
    if !done.status.success() {
        let stderr = text(&done.stderr);
        assert!(
            stderr.contains("no checkpoint") && stderr.lines().count() == 1,
            "{what}: the resume failed: {stderr}"
        );
        if !out.join("eval.json").is_file() {
            assert!(before_first, "{what}: the checkpoint was lost: {stderr}");
            let mut again = train_args(data, out);
            again.push("--force".into());
            let done = sae(again);
            assert!(done.status.success(), "{what}: {}", text(&done.stderr));
        }
    }
    let weights = std::fs::read(out.join("sae.safetensors")).unwrap();
    assert!(weights == reference, "{what}: sae.safetensors differs");
    assert!(
        !out.join("checkpoint.new").exists() && !out.join("checkpoint.old").exists(),
        "{what}: a checkpoint generation was left behind"
    );
}

/// A crash sequence, run on one of a few threads.
type Job<'a> = Box<dyn FnOnce() + Send + 'a>;

/// Runs `jobs` on a few threads.
fn in_parallel(jobs: Vec<Job<'_>>) {
    let next = AtomicUsize::new(0);
    let jobs: Vec<Mutex<Option<Job<'_>>>> = jobs.into_iter().map(|j| Mutex::new(Some(j))).collect();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(job) = jobs.get(i) else { return };
                let job = job.lock().unwrap().take().expect("each job runs once");
                job();
            });
        }
    });
}

#[test]
fn a_crash_at_any_checkpoint_syscall_resumes_to_the_same_parameters() {
    if !strace_available() {
        return;
    }
    let start = Instant::now();
    let dir = temp_dir("fault-injection");
    let data = dir.join("acts.npy");
    let x = synthetic_batch(256, 16, 3);
    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_npy(&data, "<f4", &[256, 16], &bytes);

    // The uninterrupted run, traced: its result and the calls to crash at.
    let straight = dir.join("straight");
    let log = dir.join("straight.strace");
    let out = under_strace(
        &["-y".into(), "-o".into(), log.to_str().unwrap().into()],
        &train_args(&data, &straight),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let reference = std::fs::read(straight.join("sae.safetensors")).unwrap();
    let points = checkpoint_calls(&calls(&std::fs::read_to_string(&log).unwrap()));
    let renames = points.iter().filter(|p| p.syscall.starts_with("rename"));
    assert!(
        renames.count() >= 6,
        "two saves and their swap: {points:#?}"
    );

    // The first save is whole once its completion mark is renamed into place.
    let first_whole = points
        .iter()
        .position(|p| p.syscall.starts_with("rename") && p.line.contains("checkpoint.new/run.json"))
        .expect("a first checkpoint");
    let mut jobs: Vec<Job<'_>> = Vec::new();
    for (i, point) in points.iter().enumerate() {
        let before_first = i <= first_whole;
        let (data, reference, dir) = (&data, &reference, &dir);
        // A crash, then a resume to the end.
        jobs.push(Box::new(move || {
            let out = dir.join(format!("once-{i}"));
            assert!(
                crash(&train_args(data, &out), point),
                "{point:?} never came"
            );
            resume_to_end(
                data,
                &out,
                reference,
                before_first,
                &format!("crash at {point:?}"),
            );
        }));
        // The double crash: a crash where the run moves or deletes checkpoint files, then
        // its resume killed at its 1st rename, the next resume at its 2nd, ... until one
        // ends; each starts from what the crash before it left.
        if point.syscall.starts_with("rename") || point.syscall.starts_with("unlink") {
            jobs.push(Box::new(move || {
                let out = dir.join(format!("twice-{i}"));
                assert!(
                    crash(&train_args(data, &out), point),
                    "{point:?} never came"
                );
                for n in 1.. {
                    let again = Point {
                        syscall: "rename".into(),
                        n,
                        line: String::new(),
                    };
                    if !crash(&resume_args(&out), &again) {
                        break;
                    }
                }
                resume_to_end(
                    data,
                    &out,
                    reference,
                    before_first,
                    &format!("crash at {point:?}, then resumes"),
                );
            }));
        }
    }
    let n_jobs = jobs.len();
    in_parallel(jobs);
    eprintln!(
        "{} crash points ({n_jobs} crash sequences) in {:.1}s",
        points.len(),
        start.elapsed().as_secs_f64()
    );
    std::fs::remove_dir_all(dir).unwrap();
}
