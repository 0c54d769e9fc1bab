//! `sae train` across processes under mpirun: the same parameters as one process on the same
//! global batches, bit for bit from run to run, resumable with any rank count, and failures
//! (bad data on one rank, a shard truncated mid-run, a killed rank) ending every rank promptly.
#![cfg(feature = "mpi")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{assert_close, ok, sae, synthetic_batch, temp_dir, text, write_f32_npy};
use ndarray::{Array1, Array2};
use sparse_autoencoder::Sae;

/// One mpirun job at a time: the CI machine has two cores, and the fault tests time the jobs.
static JOBS: Mutex<()> = Mutex::new(());

/// Architectures (and ReLU's two variants) of the sweep every equivalence run trains.
const SAES: [&str; 4] = ["relu", "relu-unit", "topk", "batchtopk"];

/// `mpirun -np <np> sae <args>`, not yet waited for.
fn mpirun(np: usize, args: &[&str]) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.args([
        "-s",
        "KILL",
        "120",
        "mpirun",
        "--allow-run-as-root",
        "--oversubscribe",
    ])
    .args(["-np", &np.to_string(), env!("CARGO_BIN_EXE_sae")])
    .args(args)
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    .env("RUST_BACKTRACE", "1");
    cmd
}

fn run_np(np: usize, args: &[&str]) -> Output {
    mpirun(np, args).output().expect("run mpirun")
}

/// `sae args` in one process (no launcher) or as `np` MPI processes.
fn on_ranks(np: usize, args: &[&str]) -> Output {
    match np {
        1 => sae(args),
        _ => run_np(np, args),
    }
}

/// `sae train --config config --out out_dir --threads 1 extra` on `np` ranks.
fn train_on(np: usize, config: &Path, out_dir: &Path, extra: &[&str]) -> Output {
    let (config, out_dir) = (s(config), s(out_dir));
    let args = [
        "train",
        "--config",
        &config,
        "--out",
        &out_dir,
        "--threads",
        "1",
    ];
    on_ranks(np, &[&args[..], extra].concat())
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// A config that trains every architecture on `data` (normalised, 5% held out, AuxK's dead
/// latents reachable within the run), skipping non-finite rows when `skip`.
fn sweep_config(dir: &Path, data: &[PathBuf], steps: u64, skip: bool) -> PathBuf {
    let paths: Vec<String> = data.iter().map(|p| format!("{:?}", s(p))).collect();
    let mut toml = format!(
        "[data]\npaths = [{}]\nnormalize = true\neval_fraction = 0.05\nskip_non_finite = \
         {skip}\n\n[train]\nbatch_size = 48\nsteps = {steps}\nseed = 5\nmetrics_every = 5\n",
        paths.join(", ")
    );
    for name in SAES {
        let (arch, extra) = match name {
            "relu" => ("relu", "relu_variant = \"decoder_norm\"\n"),
            "relu-unit" => ("relu", "relu_variant = \"unit_decoder\"\n"),
            "topk" => ("topk", "k = 4\n"),
            _ => ("batchtopk", "k = 4\n"),
        };
        toml += &format!(
            "\n[[sae]]\nname = \"{name}\"\narch = \"{arch}\"\n{extra}dict_size = 64\ndead_tokens = \
             240\n"
        );
    }
    let path = dir.join("sweep.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

/// The shards the equivalence and resume tests train on: two files, 1,800 rows of width 16,
/// every `nan_every`-th row holding a NaN when given.
fn shards(dir: &Path, nan_every: Option<usize>) -> Vec<PathBuf> {
    let mut x_nd = synthetic_batch(1800, 16, 3);
    if let Some(every) = nan_every {
        for i in (0..1800).step_by(every) {
            x_nd[[i, i % 16]] = f32::NAN;
        }
    }
    let paths = vec![dir.join("a.npy"), dir.join("b.npy")];
    write_f32_npy(&paths[0], x_nd.slice(ndarray::s![..1000, ..]));
    write_f32_npy(&paths[1], x_nd.slice(ndarray::s![1000.., ..]));
    paths
}

fn params(sae: &Sae) -> [(&'static str, Array2<f32>); 3] {
    let row = |v: Array1<f32>| v.insert_axis(ndarray::Axis(0));
    [
        ("W_enc", sae.w_enc_fd().to_owned()),
        ("W_dec", sae.w_dec_fd().to_owned()),
        (
            "biases",
            ndarray::concatenate![
                ndarray::Axis(1),
                row(sae.b_enc_f().to_owned()),
                row(sae.b_dec_d().to_owned())
            ],
        ),
    ]
}

/// Every SAE of the sweep in `a` against the one in `reference`, within `tol` relative.
fn assert_runs_close(a: &Path, reference: &Path, tol: f64) {
    for name in SAES {
        let (x, y) = (
            Sae::load(&a.join(name)).unwrap(),
            Sae::load(&reference.join(name)).unwrap(),
        );
        for ((what, p), (_, q)) in params(&x).into_iter().zip(params(&y)) {
            assert_close(&format!("{name} {what} of {}", a.display()), &p, &q, tol);
        }
        assert_eq!(x.threshold().is_some(), y.threshold().is_some(), "{name}");
        if let (Some(p), Some(q)) = (x.threshold(), y.threshold()) {
            assert!(((p - q) / q).abs() <= tol as f32, "{name} θ {p} vs {q}");
        }
    }
}

/// Every SAE file of `a` and `b` byte for byte.
fn assert_runs_identical(a: &Path, b: &Path) {
    for name in SAES {
        let file = |d: &Path| std::fs::read(d.join(name).join("sae.safetensors")).unwrap();
        assert!(
            file(a) == file(b),
            "{name}: {} and {} differ",
            a.display(),
            b.display()
        );
    }
}

/// Under mpirun, this test binary's ranks split the world into two groups of two latent shards
/// and check that sums stay within a group and across groups as `dist::Grid` says, then write
/// one file in slices; outside it, the test launches them.
#[test]
fn the_world_splits_into_groups_of_latent_shards_under_mpirun() {
    use sparse_autoencoder::dist::{self, Collective, Grid};
    if std::env::var_os("OMPI_COMM_WORLD_SIZE").is_some() {
        let world = dist::world().unwrap();
        let world = world.collective();
        let grid = Grid::new(world.clone(), 2).unwrap();
        let rank = world.rank();
        assert_eq!((grid.group(), grid.shard), (rank / 2, rank % 2));
        let mine = 10u64.pow(rank as u32);
        let (mut within, mut across) = ([mine], [mine]);
        grid.latent.all_reduce_sum_u64(&mut within);
        grid.data.all_reduce_sum_u64(&mut across);
        assert_eq!(within[0], [11, 1100][rank / 2]);
        assert_eq!(across[0], [101, 1010][rank % 2]);
        // Rank-order f32 sums (the segmented path too) within a group, then the world again.
        let mut sum = vec![rank as f32; 10_000];
        grid.latent.all_reduce_sum_f32(&mut sum);
        assert!(sum.iter().all(|&v| v == [1.0, 5.0][rank / 2]));
        let mut all = [1u64];
        world.all_reduce_sum_u64(&mut all);
        assert_eq!(all[0], 4);
        // Each rank writes its rows of one file, which is then the file of the whole tensor.
        let path = PathBuf::from(std::env::var("SAE_GRID_DIR").unwrap()).join("w.safetensors");
        let w: Vec<f32> = (0..24).map(|i| i as f32 * 0.25).collect();
        let rows = dist::part(8, rank, 4);
        let mine = &w[rows.start * 3..rows.end * 3];
        let slice = sparse_autoencoder::io::Slice::f32("w_dec_fd", &[8, 3], rows.start, mine);
        sparse_autoencoder::io::write_sliced(&path, &[slice], None, &*world).unwrap();
        let view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::F32,
            vec![8, 3],
            bytemuck::cast_slice(&w),
        )
        .unwrap();
        let whole = safetensors::serialize([("w_dec_fd", view)], None).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), whole);
        println!("grid ok on rank {rank}");
        return;
    }
    let dir = temp_dir("mpi-grid");
    let _job = JOBS.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new("timeout")
        .args([
            "-s",
            "KILL",
            "60",
            "mpirun",
            "--allow-run-as-root",
            "--oversubscribe",
        ])
        .args(["-np", "4"])
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "the_world_splits_into_groups_of_latent_shards_under_mpirun",
        ])
        .args(["--nocapture", "--test-threads", "1"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("SAE_GRID_DIR", &dir)
        .output()
        .expect("run mpirun");
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    for rank in 0..4 {
        assert!(
            stdout.contains(&format!("grid ok on rank {rank}")),
            "{stdout}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn two_and_three_ranks_train_what_one_process_trains_and_repeat_bit_for_bit() {
    let _job = JOBS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = temp_dir("mpi-equivalence");
    let config = sweep_config(&dir, &shards(&dir, None), 30, false);
    let train = |np: usize, name: &str| {
        let out_dir = dir.join(name);
        let out = train_on(np, &config, &out_dir, &[]);
        let stdout = ok(&out);
        // Rank 0 alone reports: one summary per SAE, once.
        assert_eq!(stdout.matches("run directory:").count(), 1, "{stdout}");
        assert!(
            !text(&out.stderr).contains("rank 1"),
            "{}",
            text(&out.stderr)
        );
        out_dir
    };
    let one = train(1, "one");
    let two = train(2, "two");
    let three = train(3, "three");
    let two_again = train(2, "two-again");
    assert_runs_close(&two, &one, 1e-5);
    assert_runs_close(&three, &one, 1e-5);
    assert_runs_identical(&two, &two_again);
    // The held-out evaluation split over the ranks and reduced: the same figures.
    assert_evals_close(&three, &one);
}

/// Every SAE's end-of-run evaluation in run `a` gives run `reference`'s figures (of SAEs
/// equal to 1e-5, so to 1e-4).
fn assert_evals_close(a: &Path, reference: &Path) {
    for name in SAES {
        let eval = |d: &Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(d.join(name).join("eval.json")).unwrap())
                .unwrap()
        };
        let (a, b) = (eval(reference)["eval"].clone(), eval(a)["eval"].clone());
        assert_eq!(a["n_rows"], b["n_rows"], "{name}");
        for key in ["mse", "fve", "l0", "dead_fraction", "cosine", "shrinkage"] {
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-4 * x.abs().max(1e-3),
                "{name} {key}: {x} vs {y}"
            );
        }
    }
}

/// Starts a 2-rank run of `steps` steps checkpointing every step and stops it with SIGINT to
/// mpirun once its first checkpoint is on disk; returns the run directory.
fn interrupted_run(dir: &Path, config: &Path, steps: &str) -> PathBuf {
    interrupted_on(2, &[], dir, config, steps)
}

/// [`interrupted_run`] on `np` ranks, with `extra` arguments.
fn interrupted_on(np: usize, extra: &[&str], dir: &Path, config: &Path, steps: &str) -> PathBuf {
    let run = dir.join("interrupted");
    let mut args = vec![
        "train",
        "--config",
        config.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--threads",
        "1",
        "--steps",
        steps,
        "--checkpoint-every",
        "1",
    ];
    args.extend_from_slice(extra);
    let mut child = mpirun(np, &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !run.join("checkpoint").join("run.json").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mpirun_pid = mpirun_pid(&child);
    // SAFETY: signalling a process this test started.
    unsafe { libc::kill(mpirun_pid, libc::SIGINT) };
    let out = child_output(&mut child);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("interrupted at step"),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    run
}

/// The pid of the mpirun that `timeout` (the child) started.
fn mpirun_pid(child: &Child) -> i32 {
    let start = Instant::now();
    loop {
        let children =
            std::fs::read_to_string(format!("/proc/{}/task/{}/children", child.id(), child.id()))
                .unwrap_or_default();
        if let Some(pid) = children.split_whitespace().next() {
            return pid.parse().unwrap();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "mpirun did not start"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn child_output(child: &mut Child) -> Output {
    let mut stdout = String::new();
    let mut stderr = String::new();
    use std::io::Read;
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    Output {
        status,
        stdout: stdout.into_bytes(),
        stderr: stderr.into_bytes(),
    }
}

/// Copies the run directory `from` to `to` (files and the checkpoint's subdirectories).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn a_run_interrupted_on_two_ranks_resumes_on_two_three_or_one_to_the_uninterrupted_result() {
    let _job = JOBS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = temp_dir("mpi-resume");
    // Rows skipped on both ranks before the interruption: the checkpoint must count them all.
    let config = sweep_config(&dir, &shards(&dir, Some(20)), 300, true);
    let steps = "300";
    let whole = dir.join("whole");
    let whole_out = ok(&train_on(2, &config, &whole, &["--steps", steps]));
    let interrupted = interrupted_run(&dir, &config, steps);
    for np in [2, 3, 1] {
        let resumed = dir.join(format!("resumed-{np}"));
        copy_dir(&interrupted, &resumed);
        let args = ["train", "--resume", &s(&resumed), "--threads", "1"];
        let out = on_ranks(np, &args);
        assert_eq!(
            skipped_note(&ok(&out)),
            skipped_note(&whole_out),
            "{np} ranks"
        );
        if np == 2 {
            assert_runs_identical(&resumed, &whole);
        } else {
            assert_runs_close(&resumed, &whole, 1e-5);
        }
    }
}

/// The run's note of how many non-finite rows it skipped.
fn skipped_note(stdout: &str) -> String {
    let note = stdout.lines().find(|l| l.contains("non-finite rows"));
    note.unwrap_or_else(|| panic!("no skipped-rows note in:\n{stdout}"))
        .to_string()
}

/// Asserts that a job failed with exit status 2 within 30 s, its first line of stderr our
/// one-line error naming every needle, and no panic.
#[track_caller]
fn assert_failed_promptly(out: &Output, started: Instant, needles: &[&str]) {
    let stderr = text(&out.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}: {stderr}",
        started.elapsed()
    );
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let first = stderr.lines().next().unwrap_or_default();
    assert!(first.starts_with("error: "), "{stderr}");
    for needle in needles {
        assert!(first.contains(needle), "{needle:?} not in {first:?}");
    }
}

/// The source rows that rank `rank` of `world` trains on in the first batch of a run of
/// `rows` rows (no held-out rows), found by running the same loader on a source whose row i
/// holds i.
fn first_rows_of_rank(
    rows: usize,
    batch_size: usize,
    seed: u64,
    rank: usize,
    world: usize,
) -> Vec<usize> {
    use sparse_autoencoder::data::{Batcher, LoaderConfig};
    let index_nd = Array2::from_shape_fn((rows, 1), |(i, _)| i as f32);
    let config = LoaderConfig {
        batch_size,
        seed,
        ..LoaderConfig::default()
    };
    let mut batcher = Batcher::new(std::sync::Arc::new(index_nd), config)
        .unwrap()
        .for_part(rank, world)
        .unwrap();
    batcher
        .next_batch()
        .unwrap()
        .iter()
        .map(|&v| v as usize)
        .collect()
}

#[test]
fn a_nan_row_that_only_rank_one_reads_stops_every_rank_with_one_line() {
    let _job = JOBS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = temp_dir("mpi-nan");
    let mut x_nd = synthetic_batch(600, 8, 4);
    let (on_one, on_zero) = (
        first_rows_of_rank(600, 48, 5, 1, 2),
        first_rows_of_rank(600, 48, 5, 0, 2),
    );
    let row = on_one[3];
    assert!(!on_zero.contains(&row));
    x_nd[[row, 2]] = f32::NAN;
    let data = dir.join("acts.npy");
    write_f32_npy(&data, x_nd.view());
    let started = Instant::now();
    let out = run_np(
        2,
        &[
            "train",
            "--data",
            &s(&data),
            "--out",
            &s(&dir.join("run")),
            "--eval-fraction",
            "0",
            "--batch-size",
            "48",
            "--seed",
            "5",
            "--steps",
            "20",
            "--dict-size",
            "32",
            "--k",
            "4",
            "--threads",
            "1",
        ],
    );
    assert_failed_promptly(
        &out,
        started,
        &[
            "acts.npy",
            &format!("row {row}"),
            "rank 1",
            "--skip-non-finite",
        ],
    );
}

#[test]
fn a_shard_truncated_mid_run_stops_every_rank_with_one_line() {
    let _job = JOBS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = temp_dir("mpi-truncated");
    let paths = [dir.join("a.npy"), dir.join("b.npy")];
    write_f32_npy(&paths[0], synthetic_batch(3000, 8, 1).view());
    write_f32_npy(&paths[1], synthetic_batch(3000, 8, 2).view());
    let run = dir.join("run");
    let started = Instant::now();
    let mut child = mpirun(
        2,
        &[
            "train",
            "--data",
            &s(&paths[0]),
            &s(&paths[1]),
            "--out",
            &s(&run),
            "--eval-fraction",
            "0",
            "--batch-size",
            "32",
            "--buffer-rows",
            "64",
            "--steps",
            "100000",
            "--dict-size",
            "32",
            "--k",
            "4",
            "--threads",
            "1",
            "--metrics-every",
            "1",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    while !run.join("metrics.jsonl").exists()
        || std::fs::metadata(run.join("metrics.jsonl")).unwrap().len() == 0
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "training did not start"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&paths[1])
        .unwrap();
    file.set_len(1000).unwrap();
    let started = Instant::now();
    let out = child_output(&mut child);
    assert_failed_promptly(&out, started, &["b.npy", "--resume"]);
}

#[test]
fn a_killed_rank_ends_the_job_within_seconds() {
    let _job = JOBS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = temp_dir("mpi-killed");
    let data = dir.join("acts.npy");
    write_f32_npy(&data, synthetic_batch(4000, 8, 1).view());
    let run = dir.join("run");
    let mut child = mpirun(
        3,
        &[
            "train",
            "--data",
            &s(&data),
            "--out",
            &s(&run),
            "--batch-size",
            "48",
            "--steps",
            "100000",
            "--dict-size",
            "32",
            "--k",
            "4",
            "--threads",
            "1",
            "--metrics-every",
            "1",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let start = Instant::now();
    while !run.join("metrics.jsonl").exists()
        || std::fs::metadata(run.join("metrics.jsonl")).unwrap().len() == 0
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "training did not start"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let rank_one = rank_pid(&s(&run), 1).expect("rank 1 is running");
    // SAFETY: killing a process this test started.
    unsafe { libc::kill(rank_one, libc::SIGKILL) };
    let killed = Instant::now();
    let out = child_output(&mut child);
    let stderr = text(&out.stderr);
    assert!(
        killed.elapsed() < Duration::from_secs(30),
        "took {:?}",
        killed.elapsed()
    );
    assert!(!out.status.success(), "{stderr}");
    // mpirun names the killed rank (timeout's own kill would have taken 120 s).
    assert!(
        stderr.contains("rank 1") && stderr.contains("signal 9"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(rank_pid(&s(&run), 0).is_none() && rank_pid(&s(&run), 2).is_none());
}

/// The pid of the `sae` process of rank `rank` training into `run`, if it is alive.
fn rank_pid(run: &str, rank: usize) -> Option<i32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let is_rank =
            args.first().is_some_and(|a| a.ends_with(b"/sae")) && args.contains(&run.as_bytes());
        if !is_rank {
            continue;
        }
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let want = format!("OMPI_COMM_WORLD_RANK={rank}");
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = state.split_whitespace().nth(2) == Some("Z");
        if !zombie && environ.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

#[test]
fn latent_shards_on_two_and_four_ranks_train_what_one_process_trains_and_save_one_sae() {
    let _job = JOBS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = temp_dir("mpi-latent-shards");
    let data = shards(&dir, None);
    let config = sweep_config(&dir, &data, 30, false);
    let train = |np: usize, name: &str| {
        let out_dir = dir.join(name);
        let shards = if np == 1 { "1" } else { "2" };
        let stdout = ok(&train_on(
            np,
            &config,
            &out_dir,
            &["--latent-shards", shards],
        ));
        assert_eq!(stdout.matches("run directory:").count(), 1, "{stdout}");
        out_dir
    };
    let one = train(1, "one");
    // One group of two shards; two groups of two.
    let two = train(2, "two");
    let four = train(4, "four");
    let four_again = train(4, "four-again");
    assert_runs_close(&two, &one, 1e-5);
    assert_runs_close(&four, &one, 1e-5);
    assert_runs_identical(&four, &four_again);
    // Evaluated at the end by the shards themselves (no rank holds the whole SAE).
    assert_evals_close(&two, &one);
    assert_evals_close(&four, &one);
    // The sliced save is an SAE directory like any other: evaluated whole.
    let topk = s(&two.join("topk"));
    let stdout = ok(&sae(&["eval", &topk, "--data", &s(&data[0])]));
    assert!(stdout.contains("fve"), "{stdout}");
    // Exported whole, and by shards that each read and write only their latents (SAELens'
    // W_enc in column blocks): the same bytes. Without --latent-shards export runs alone.
    for (name, format, weights) in [
        ("topk", "saelens", "sae_weights.safetensors"),
        ("relu", "saelens", "sae_weights.safetensors"),
        ("batchtopk", "sparsify", "sae.safetensors"),
    ] {
        let sae_dir = s(&two.join(name));
        let export = |np: usize, shards: &str, out: &Path| {
            let args = ["export", &sae_dir, "--format", format, "--out", &s(out)];
            on_ranks(np, &[&args[..], &["--latent-shards", shards]].concat())
        };
        let (whole, sharded) = (dir.join("export-whole"), dir.join("export-sharded"));
        ok(&export(1, "1", &whole));
        ok(&export(4, "2", &sharded));
        for file in [weights, "cfg.json"] {
            assert!(
                std::fs::read(whole.join(file)).unwrap()
                    == std::fs::read(sharded.join(file)).unwrap(),
                "{name} {format}: {file} differs"
            );
        }
        let refused = export(2, "1", &dir.join("export-refused"));
        assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
        assert!(text(&refused.stderr).contains("--latent-shards"));
    }
    // A shard count that does not divide the ranks is one clear error, exit status 2.
    let out = run_np(
        2,
        &[
            "train",
            "--config",
            &s(&config),
            "--out",
            &s(&dir.join("bad")),
            "--latent-shards",
            "3",
        ],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "one line, from rank 0: {stderr}");
    assert!(errors[0].contains("--latent-shards 3"), "{stderr}");
}

#[test]
fn a_sharded_run_interrupted_on_four_ranks_resumes_sharded_or_alone_to_the_one_process_result() {
    let _job = JOBS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = temp_dir("mpi-latent-resume");
    let config = sweep_config(&dir, &shards(&dir, None), 200, false);
    let whole = dir.join("whole");
    ok(&train_on(1, &config, &whole, &[]));
    let interrupted = interrupted_on(4, &["--latent-shards", "2"], &dir, &config, "200");
    for (np, shards) in [(2, "2"), (1, "1")] {
        let resumed = dir.join(format!("resumed-{np}"));
        copy_dir(&interrupted, &resumed);
        let args = [
            "train",
            "--resume",
            &s(&resumed),
            "--threads",
            "1",
            "--latent-shards",
            shards,
        ];
        ok(&on_ranks(np, &args));
        assert_runs_close(&resumed, &whole, 1e-5);
    }
}
