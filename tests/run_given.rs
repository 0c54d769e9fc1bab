//! Runs on rows handed in through the library (`RunData`): random-access rows train exactly as
//! the same rows in an `.npy` file do, a stream trains through its shuffle buffer and ends the
//! run when it runs dry, and both resume only with their data handed in again.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::temp_dir;
use ndarray::{s, Array2};
use sparse_autoencoder::run::{
    ArchName, Given, Observer, Outcome, Progress, ResumeOptions, Run, RunData, RunSpec, SaeSpec,
    ScheduleSpec, Summary,
};

fn spec(steps: u64) -> RunSpec {
    RunSpec {
        train: ScheduleSpec {
            steps: Some(steps),
            batch_size: Some(32),
            ..ScheduleSpec::default()
        },
        sae: vec![SaeSpec {
            arch: Some(ArchName::Topk),
            k: Some(4),
            dict_size: Some(48),
            ..SaeSpec::default()
        }],
        ..RunSpec::default()
    }
}

fn rows() -> Array2<f32> {
    common::synthetic_batch(1200, 12, 3)
}

fn finished(outcome: Outcome) -> Vec<Summary> {
    match outcome {
        Outcome::Finished(summaries) => summaries,
        other => panic!("the run did not finish: {other:?}"),
    }
}

fn train(spec: &RunSpec, data: RunData, dir: &Path) -> Vec<Summary> {
    let stop = AtomicBool::new(false);
    let mut run = Run::create_with(spec, data, dir, true, &stop).unwrap();
    finished(run.train(&mut (), &stop).unwrap())
}

fn weights(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("sae.safetensors")).unwrap()
}

/// The stream of `x_nd`'s rows in arrays of `rows_per_array`.
fn stream(x_nd: &Array2<f32>, rows_per_array: usize) -> RunData {
    let arrays: Vec<_> = x_nd
        .axis_chunks_iter(ndarray::Axis(0), rows_per_array)
        .map(|a| Ok(a.to_owned()))
        .collect();
    RunData::Stream(Box::new(arrays.into_iter()))
}

#[test]
fn rows_handed_in_train_bit_identically_to_the_same_rows_in_a_file() {
    let dir = temp_dir("given-rows");
    let x_nd = rows();
    let npy = dir.join("x.npy");
    common::write_f32_npy(&npy, x_nd.view());
    let mut from_file = spec(12);
    from_file.data.paths = vec![npy];
    from_file.data.normalize = true;
    let stop = AtomicBool::new(false);
    let mut run = Run::create(&from_file, &dir.join("file"), true, &stop).unwrap();
    let file_summary = finished(run.train(&mut (), &stop).unwrap());

    let mut given = spec(12);
    given.data.normalize = true;
    let given_summary = train(&given, RunData::Rows(Arc::new(x_nd)), &dir.join("rows"));
    assert_eq!(weights(&dir.join("file")), weights(&dir.join("rows")));
    let (a, b) = (
        file_summary[0].eval.as_ref(),
        given_summary[0].eval.as_ref(),
    );
    assert_eq!(a.unwrap().mse, b.unwrap().mse, "the same rows are held out");
    let written = std::fs::read_to_string(dir.join("rows/config.toml")).unwrap();
    let spec: RunSpec = toml::from_str(&written).unwrap();
    assert_eq!(spec.data.given, Some(Given::Rows));
    assert!(spec.data.paths.is_empty());
}

#[test]
fn a_stream_trains_deterministically_whatever_its_arrays_and_holds_out_its_front() {
    let dir = temp_dir("given-stream");
    let x_nd = rows();
    let mut spec = spec(10);
    spec.data.eval_rows = Some(200);
    let a = train(&spec, stream(&x_nd, 100), &dir.join("a"));
    train(&spec, stream(&x_nd, 7), &dir.join("b"));
    assert_eq!(a[0].steps, 10);
    assert_eq!(weights(&dir.join("a")), weights(&dir.join("b")));
    // The held-out rows are the stream's first 200: evaluating on them again agrees.
    let sae = sparse_autoencoder::Sae::load(&dir.join("a")).unwrap();
    let front = x_nd.slice(s![..200, ..]).to_owned();
    let again = sparse_autoencoder::eval::evaluate(
        &sae,
        &sparse_autoencoder::backend::Cpu,
        &front,
        32,
        false,
    )
    .unwrap();
    assert_eq!(a[0].eval.as_ref().unwrap().mse, again.mse);
    let written = std::fs::read_to_string(dir.join("a/config.toml")).unwrap();
    assert!(written.contains("given = \"stream\""), "{written}");
    assert!(written.contains("eval_rows = 200"), "{written}");
    assert!(dir.join("a/metrics.jsonl").is_file());

    spec.train.seed = Some(1);
    train(&spec, stream(&x_nd, 100), &dir.join("seed1"));
    assert_ne!(weights(&dir.join("a")), weights(&dir.join("seed1")));
}

#[test]
fn a_stream_that_runs_dry_ends_the_run_there_and_saves_the_saes() {
    let dir = temp_dir("given-dry");
    let x_nd = rows();
    let mut spec = spec(1000);
    spec.data.eval_rows = Some(0);
    spec.data.buffer_rows = Some(256);
    let summaries = train(&spec, stream(&x_nd, 64), &dir);
    // 1200 rows make 37 whole batches of 32.
    assert_eq!(summaries[0].steps, 1200 / 32);
    assert!(summaries[0].eval.is_none());
    assert!(dir.join("sae.safetensors").is_file());
    assert!(
        !dir.join("checkpoint").exists(),
        "a finished run keeps no checkpoint"
    );
}

struct StopAt<'a>(u64, &'a AtomicBool);

impl Observer for StopAt<'_> {
    fn step(&mut self, p: &Progress<'_>) {
        if p.step == self.0 {
            self.1.store(true, Ordering::Relaxed);
        }
    }
    fn note(&mut self, _: &str) {}
}

#[test]
fn given_runs_resume_only_with_their_data_handed_in_again() {
    let dir = temp_dir("given-resume");
    let x_nd = Arc::new(rows());
    let spec = spec(12);
    train(&spec, RunData::Rows(x_nd.clone()), &dir.join("whole"));

    let stopped = dir.join("stopped");
    let stop = AtomicBool::new(false);
    let mut run =
        Run::create_with(&spec, RunData::Rows(x_nd.clone()), &stopped, true, &stop).unwrap();
    let outcome = run.train(&mut StopAt(5, &stop), &stop).unwrap();
    assert!(
        matches!(outcome, Outcome::Interrupted { step: 5 }),
        "{outcome:?}"
    );
    drop(run);

    let options = ResumeOptions::default();
    let calm = AtomicBool::new(false);
    let err = Run::resume(&stopped, &options, &calm)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("data.given") && err.contains("hand them in again"),
        "{err}"
    );
    let streamed = Run::resume_with(&stopped, &options, stream(&x_nd, 100), &calm);
    let err = streamed.err().unwrap().to_string();
    assert!(err.contains("Rows") && err.contains("Stream"), "{err}");

    let mut run = Run::resume_with(&stopped, &options, RunData::Rows(x_nd), &calm).unwrap();
    assert_eq!(run.steps_done(), 5);
    finished(run.train(&mut (), &calm).unwrap());
    assert_eq!(weights(&dir.join("whole")), weights(&stopped));
}

#[test]
fn data_keys_that_do_not_fit_the_data_handed_in_are_errors_naming_them() {
    let dir = temp_dir("given-keys");
    let stop = AtomicBool::new(false);
    let x_nd = Arc::new(rows());
    let cases: Vec<(RunSpec, RunData, &str)> = vec![
        {
            let mut s = spec(3);
            s.data.paths = vec!["x.npy".into()];
            (s, RunData::Rows(x_nd.clone()), "`data.paths` names files")
        },
        {
            let mut s = spec(3);
            s.data.eval_fraction = Some(0.1);
            (s, stream(&x_nd, 100), "`data.eval_rows`")
        },
        {
            let mut s = spec(3);
            s.data.eval_rows = Some(10);
            (s, RunData::Rows(x_nd.clone()), "`data.eval_fraction`")
        },
        {
            let mut s = spec(3);
            s.data.given = Some(Given::Rows);
            (s, RunData::Spec, "`data.given`")
        },
    ];
    for (i, (spec, data, needle)) in cases.into_iter().enumerate() {
        let run_dir = dir.join(i.to_string());
        let err = Run::create_with(&spec, data, &run_dir, true, &stop)
            .err()
            .unwrap();
        assert!(err.to_string().contains(needle), "case {i}: {err}");
        assert!(
            !run_dir.join("config.toml").exists(),
            "case {i} wrote the run"
        );
    }
    let dry: RunData = RunData::Stream(Box::new(std::iter::empty()));
    let err = Run::create_with(&spec(3), dry, &dir.join("dry"), true, &stop)
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("ended before delivering a row"),
        "{err}"
    );
}
