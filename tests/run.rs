//! The `run` module from the library: a stop request checkpoints, periodic checkpoints are
//! written, a resumed run ends where an uninterrupted one does, and a finished run leaves no
//! checkpoint behind.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use common::temp_dir;
use sparse_autoencoder::run::{
    ArchName, Observer, Outcome, Progress, ResumeOptions, Run, RunSpec, SaeSpec, ScheduleSpec,
};
use sparse_autoencoder::synth::SynthConfig;
use sparse_autoencoder::{Architecture, ReluVariant, Sae};

/// Stops the run after `stop_at` steps, and records which step the checkpoint on disk held at
/// each step.
struct StopAt<'a> {
    stop_at: u64,
    stop: &'a AtomicBool,
    dir: PathBuf,
    checkpoint_steps: Vec<Option<u64>>,
}

fn checkpoint_step(dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join("checkpoint/run.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json["state"]["step"].as_u64()
}

impl Observer for StopAt<'_> {
    fn step(&mut self, p: &Progress<'_>) {
        self.checkpoint_steps.push(checkpoint_step(&self.dir));
        if p.step == self.stop_at {
            self.stop.store(true, Ordering::Relaxed);
        }
    }
    fn note(&mut self, _: &str) {}
}

fn no_stop() -> AtomicBool {
    AtomicBool::new(false)
}

fn spec() -> RunSpec {
    RunSpec {
        train: ScheduleSpec {
            steps: Some(30),
            batch_size: Some(64),
            checkpoint_every: Some(10),
            ..ScheduleSpec::default()
        },
        sae: vec![
            SaeSpec {
                arch: Some(ArchName::Topk),
                k: Some(4),
                dict_size: Some(96),
                ..SaeSpec::default()
            },
            SaeSpec {
                arch: Some(ArchName::Relu),
                dict_size: Some(80),
                ..SaeSpec::default()
            },
        ],
        ..RunSpec::default()
    }
}

#[test]
fn stop_checkpoint_and_resume_end_where_the_uninterrupted_run_ends() {
    let dir = temp_dir("run-lib");
    let (straight, resumed) = (dir.join("straight"), dir.join("resumed"));
    let mut run = Run::create(&spec(), &straight, false, &no_stop()).unwrap();
    let Outcome::Finished(summaries) = run.train(&mut (), &AtomicBool::new(false)).unwrap() else {
        panic!("the run was not asked to stop");
    };
    assert_eq!(summaries.len(), 2);
    assert!(summaries.iter().all(|s| s.recovery.is_some()));
    assert!(
        !straight.join("checkpoint").exists(),
        "a finished run keeps no checkpoint"
    );

    let stop = AtomicBool::new(false);
    let mut observer = StopAt {
        stop_at: 17,
        stop: &stop,
        dir: resumed.clone(),
        checkpoint_steps: Vec::new(),
    };
    let mut run = Run::create(&spec(), &resumed, false, &no_stop()).unwrap();
    let outcome = run.train(&mut observer, &stop).unwrap();
    assert!(
        matches!(outcome, Outcome::Interrupted { step: 17 }),
        "{outcome:?}"
    );
    // Periodic checkpoints at steps 10 (seen from step 11 on); the stop wrote step 17's.
    let expected: Vec<Option<u64>> = (1..=17)
        .map(|s| if s <= 10 { None } else { Some(10) })
        .collect();
    assert_eq!(observer.checkpoint_steps, expected);
    assert_eq!(checkpoint_step(&resumed), Some(17));
    drop(run);

    let mut run = Run::resume(&resumed, &ResumeOptions::default(), &no_stop()).unwrap();
    assert_eq!(run.steps_done(), 17);
    assert!(matches!(
        run.train(&mut (), &AtomicBool::new(false)).unwrap(),
        Outcome::Finished(_)
    ));
    assert_eq!(run.names(), ["topk-k4-f96", "relu-l1_0.3-f80"]);
    for name in run.names() {
        let a = Sae::load(&straight.join(name)).unwrap();
        let b = Sae::load(&resumed.join(name)).unwrap();
        assert_eq!(a, b, "{name}");
    }
    assert!(!resumed.join("checkpoint").exists());
    // The run still holds its directory: a second one is refused, naming the holder.
    let err = Run::resume(&resumed, &ResumeOptions::default(), &no_stop())
        .err()
        .expect("locked")
        .to_string();
    let me = format!("pid {}", std::process::id());
    assert!(err.contains("in use by") && err.contains(&me), "{err}");
    drop(run);
    let err = Run::resume(&resumed, &ResumeOptions::default(), &no_stop())
        .err()
        .expect("nothing to resume")
        .to_string();
    assert!(err.contains("no checkpoint"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_checkpoint_of_another_configuration_is_refused() {
    let dir = temp_dir("run-lib-mismatch");
    let stop = AtomicBool::new(true);
    let mut run = Run::create(&spec(), &dir, false, &no_stop()).unwrap();
    assert!(matches!(
        run.train(&mut (), &stop).unwrap(),
        Outcome::Interrupted { step: 0 }
    ));
    drop(run);
    // Someone edits the config between the sessions: the SAEs no longer match.
    let config = dir.join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("topk-k4-f96", "renamed")).unwrap();
    let err = Run::resume(&dir, &ResumeOptions::default(), &no_stop())
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("checkpoint") && err.contains("renamed"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// One small SAE on a small synthetic set: runs of a few steps take well under a second.
fn tiny(steps: u64) -> RunSpec {
    RunSpec {
        train: ScheduleSpec {
            steps: Some(steps),
            batch_size: Some(32),
            ..ScheduleSpec::default()
        },
        sae: vec![SaeSpec {
            arch: Some(ArchName::Topk),
            k: Some(4),
            dict_size: Some(32),
            ..SaeSpec::default()
        }],
        synthetic: Some(SynthConfig {
            d_model: 16,
            n_features: 32,
            ..SynthConfig::default()
        }),
        ..RunSpec::default()
    }
}

/// Runs an observer's closure after each step.
struct OnStep<F: FnMut(u64)>(F);

impl<F: FnMut(u64)> Observer for OnStep<F> {
    fn step(&mut self, p: &Progress<'_>) {
        (self.0)(p.step)
    }
    fn note(&mut self, _: &str) {}
}

#[test]
fn sae_names_the_run_directory_uses_are_refused_before_anything_is_written() {
    let dir = temp_dir("run-names");
    for bad in [
        "checkpoint",
        "checkpoint.old",
        "checkpoint.new",
        "run.lock",
        "config.toml",
        "config.toml.tmp",
        "metrics.jsonl",
        "eval.json",
        "feature_density.npy",
        "curves.png",
        "density.png",
        "sae.safetensors",
        "sae.json",
        "a/b",
        "a\\b",
        "..",
        ".",
        "",
        " lead",
        "trail ",
        "esc\u{1b}[2J",
        "tab\there",
    ] {
        let mut spec = tiny(2);
        spec.sae.push(SaeSpec {
            name: Some(bad.into()),
            ..spec.sae[0].clone()
        });
        let run_dir = dir.join("run");
        let err = Run::create(&spec, &run_dir, false, &no_stop())
            .err()
            .unwrap_or_else(|| panic!("{bad:?} was accepted"))
            .to_string();
        assert!(
            err.contains(&format!("{bad:?}")) && err.contains("rename it"),
            "{bad:?}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
        // An escape sequence is shown escaped, never sent to the terminal.
        assert!(!err.contains('\u{1b}'), "{err}");
        assert!(!run_dir.exists(), "{bad:?}: the directory was touched");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// A run of `spec` stopped at step 0 (a checkpoint of no steps), and its `config.toml`.
fn interrupted(dir: &Path, spec: &RunSpec) -> PathBuf {
    let mut run = Run::create(spec, dir, false, &no_stop()).unwrap();
    let outcome = run.train(&mut (), &AtomicBool::new(true)).unwrap();
    assert!(
        matches!(outcome, Outcome::Interrupted { step: 0 }),
        "{outcome:?}"
    );
    dir.join("config.toml")
}

#[test]
fn an_edited_config_toml_is_one_error_naming_the_key() {
    let dir = temp_dir("run-edited-config");
    let config = interrupted(&dir, &tiny(4));
    let written = std::fs::read_to_string(&config).unwrap();
    let resume = || {
        Run::resume(&dir, &ResumeOptions::default(), &no_stop())
            .err()
            .expect("refused")
            .to_string()
    };
    let cases: [(&str, String, &[&str]); 9] = [
        (
            "batch_size",
            drop_line(&written, "batch_size"),
            &["train.batch_size", "missing"],
        ),
        (
            "metrics_every",
            drop_line(&written, "metrics_every"),
            &["train.metrics_every", "missing"],
        ),
        (
            "steps",
            drop_line(&written, "steps ="),
            &["train.steps", "missing"],
        ),
        (
            "seed",
            drop_line(&written, "seed ="),
            &["train.seed", "missing"],
        ),
        (
            "a string",
            written.replace("batch_size = 32", "batch_size = \"32\""),
            &["batch_size", "line"],
        ),
        (
            "tokens",
            written.replace("[train]\n", "[train]\ntokens = 100\n"),
            &["train.tokens"],
        ),
        (
            "zero",
            written.replace("metrics_every = 10", "metrics_every = 0"),
            &["train.metrics_every", "at least 1"],
        ),
        (
            "a late warm-up",
            written.replace("warmup_steps = 0", "warmup_steps = 100"),
            &["topk-k4-f32", "warmup_steps"],
        ),
        (
            "a bad name",
            written.replace("name = \"topk-k4-f32\"", "name = \"checkpoint.old\""),
            &["checkpoint.old", "rename it"],
        ),
    ];
    for (what, text, needles) in cases {
        assert_ne!(text, written, "{what}: the edit did nothing");
        std::fs::write(&config, &text).unwrap();
        let err = resume();
        assert_eq!(err.lines().count(), 1, "{what}: {err}");
        assert!(
            err.contains("config.toml") || what == "a bad name",
            "{what}: {err}"
        );
        for needle in needles {
            assert!(err.contains(needle), "{what}: {needle:?} not in {err}");
        }
    }
    std::fs::write(&config, &written).unwrap();
    let mut run = Run::resume(&dir, &ResumeOptions::default(), &no_stop()).unwrap();
    assert!(matches!(
        run.train(&mut (), &no_stop()).unwrap(),
        Outcome::Finished(_)
    ));
    std::fs::remove_dir_all(dir).unwrap();
}

/// A checkpoint written before the SAE's configuration recorded the ReLU variant (format 1)
/// resumes with config.toml's variant: unit-norm decoder rows to the end.
#[test]
fn a_format_1_checkpoint_resumes_with_the_relu_variant_of_config_toml() {
    let dir = temp_dir("run-format-1-relu");
    let mut spec = tiny(6);
    spec.sae[0] = SaeSpec {
        arch: Some(ArchName::Relu),
        relu_variant: Some(ReluVariant::UnitDecoder),
        dict_size: Some(32),
        ..SaeSpec::default()
    };
    interrupted(&dir, &spec);
    let path = dir.join("checkpoint/0/checkpoint.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(json["sae"]["relu_variant"], "unit_decoder");
    json["format"] = 1.into();
    json["sae"].as_object_mut().unwrap().remove("relu_variant");
    std::fs::write(&path, json.to_string()).unwrap();
    let mut run = Run::resume(&dir, &ResumeOptions::default(), &no_stop()).unwrap();
    assert!(matches!(
        run.train(&mut (), &no_stop()).unwrap(),
        Outcome::Finished(_)
    ));
    // One SAE: the run directory is its directory.
    let sae = Sae::load(&dir).unwrap();
    let unit = Architecture::Relu {
        variant: ReluVariant::UnitDecoder,
    };
    assert_eq!(sae.config().arch, unit);
    for row in sae.w_dec_fd().rows() {
        let norm = row.dot(&row).sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "a decoder row of norm {norm}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

fn drop_line(text: &str, starting: &str) -> String {
    text.lines()
        .filter(|l| !l.starts_with(starting))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn a_second_run_in_a_directory_in_use_is_refused_naming_the_holder() {
    let dir = temp_dir("run-lock");
    let run = Run::create(&tiny(4), &dir, false, &no_stop()).unwrap();
    let me = format!("pid {}", std::process::id());
    let again = Run::create(&tiny(4), &dir, true, &no_stop())
        .err()
        .expect("locked");
    let resumed = Run::resume(&dir, &ResumeOptions::default(), &no_stop())
        .err()
        .expect("locked");
    for err in [again.to_string(), resumed.to_string()] {
        assert!(err.contains("in use by") && err.contains(&me), "{err}");
        assert!(err.contains("run.lock"), "{err}");
    }
    // --force did not clear the running run's files.
    assert!(dir.join("config.toml").is_file());
    drop(run);
    // The lock goes with its holder.
    Run::create(&tiny(4), &dir, true, &no_stop()).unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_stop_before_training_writes_nothing_and_leaves_the_checkpoint() {
    let parent = temp_dir("run-stop-early");
    let dir = parent.join("run");
    let stopped = AtomicBool::new(true);
    let err = Run::create(&tiny(4), &dir, false, &stopped)
        .err()
        .expect("stopped");
    assert!(
        matches!(err, sparse_autoencoder::Error::Stopped { .. }),
        "{err}"
    );
    assert!(!dir.exists(), "a stopped create wrote {dir:?}");

    interrupted(&dir, &tiny(4));
    let before = std::fs::read(dir.join("checkpoint/run.json")).unwrap();
    let err = Run::resume(&dir, &ResumeOptions::default(), &stopped)
        .err()
        .expect("stopped");
    assert!(err.to_string().contains("checkpoint is as it was"), "{err}");
    assert_eq!(
        std::fs::read(dir.join("checkpoint/run.json")).unwrap(),
        before
    );
    std::fs::remove_dir_all(parent).unwrap();
}

#[test]
fn a_stop_during_the_final_evaluation_leaves_saved_saes_and_a_resumable_run() {
    let dir = temp_dir("run-stop-eval");
    let (straight, stopped) = (dir.join("straight"), dir.join("stopped"));
    let mut run = Run::create(&tiny(6), &straight, false, &no_stop()).unwrap();
    assert!(matches!(
        run.train(&mut (), &no_stop()).unwrap(),
        Outcome::Finished(_)
    ));

    let stop = AtomicBool::new(false);
    let mut run = Run::create(&tiny(6), &stopped, false, &no_stop()).unwrap();
    // The stop request comes as the last step ends: training is over, the evaluation starts.
    let mut observer = OnStep(|step| {
        if step == 6 {
            stop.store(true, Ordering::Relaxed)
        }
    });
    let outcome = run.train(&mut observer, &stop).unwrap();
    let Outcome::Unevaluated { step: 6, dirs } = outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!(dirs, std::slice::from_ref(&stopped));
    assert_eq!(Sae::load(&stopped).unwrap(), Sae::load(&straight).unwrap());
    assert!(!stopped.join("eval.json").exists());
    drop(run);
    let mut run = Run::resume(&stopped, &ResumeOptions::default(), &no_stop()).unwrap();
    assert_eq!(run.steps_done(), 6);
    assert!(matches!(
        run.train(&mut (), &no_stop()).unwrap(),
        Outcome::Finished(_)
    ));
    assert!(stopped.join("eval.json").is_file() && !stopped.join("checkpoint").exists());
    assert_eq!(Sae::load(&stopped).unwrap(), Sae::load(&straight).unwrap());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_failed_final_save_leaves_the_run_resumable_to_the_same_parameters() {
    let dir = temp_dir("run-final-save");
    let (straight, failed) = (dir.join("straight"), dir.join("failed"));
    // No periodic checkpoints: only the one at the last step keeps the trained state.
    let mut run = Run::create(&tiny(6), &straight, false, &no_stop()).unwrap();
    assert!(matches!(
        run.train(&mut (), &no_stop()).unwrap(),
        Outcome::Finished(_)
    ));

    let mut run = Run::create(&tiny(6), &failed, false, &no_stop()).unwrap();
    // A directory where the save's temporary file must go: the write fails, as on a full disk.
    let blocker = failed.join("sae.safetensors.tmp");
    let mut observer = OnStep(|step| {
        if step == 6 {
            std::fs::create_dir(&blocker).unwrap();
        }
    });
    let err = run
        .train(&mut observer, &no_stop())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("saving the trained SAE failed")
            && err.contains("free space")
            && err.contains("--resume")
            && err.contains("step 6"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    drop(run);
    std::fs::remove_dir(&blocker).unwrap();
    let mut run = Run::resume(&failed, &ResumeOptions::default(), &no_stop()).unwrap();
    assert_eq!(run.steps_done(), 6);
    assert!(matches!(
        run.train(&mut (), &no_stop()).unwrap(),
        Outcome::Finished(_)
    ));
    assert_eq!(
        std::fs::read(failed.join("sae.safetensors")).unwrap(),
        std::fs::read(straight.join("sae.safetensors")).unwrap()
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// A float32 `.npy` of `rows` rows of width `d`.
fn write_rows(path: &Path, rows: usize, d: usize) {
    let x = common::synthetic_batch(rows, d, 5);
    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    common::write_npy(path, "<f4", &[rows, d], &bytes);
}

#[test]
fn resuming_on_data_of_another_width_names_the_files_and_the_cause() {
    let dir = temp_dir("run-width");
    let data = dir.join("acts.npy");
    write_rows(&data, 128, 16);
    let mut spec = tiny(4);
    spec.synthetic = None;
    spec.data.paths = vec![data.clone()];
    spec.data.eval_fraction = Some(0.0);
    let run_dir = dir.join("run");
    interrupted(&run_dir, &spec);
    write_rows(&data, 128, 32);
    let err = Run::resume(&run_dir, &ResumeOptions::default(), &no_stop())
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("acts.npy") && err.contains("32 wide") && err.contains("D=16"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A data file cut short while the run reads it: the loader's error ends the run with one line
/// naming the file, after a checkpoint of the last completed step, and once the file is
/// restored the run resumes from that checkpoint to the end.
#[test]
fn a_data_file_truncated_mid_run_checkpoints_and_names_the_file() {
    let dir = temp_dir("run-shrunk");
    let data = dir.join("acts.npy");
    let (rows, d) = (4096, 16);
    write_rows(&data, rows, d);
    let header_len = std::fs::metadata(&data).unwrap().len() - (rows * d * 4) as u64;
    let mut spec = tiny(100);
    spec.synthetic = None;
    spec.data.paths = vec![data.clone()];
    spec.data.eval_fraction = Some(0.0);
    // A small shuffle buffer keeps the loader reading the file while the run trains.
    spec.data.buffer_rows = Some(64);
    let run_dir = dir.join("run");
    let stop = no_stop();
    let mut run = Run::create(&spec, &run_dir, false, &stop).unwrap();
    let mut truncate_at_5 = OnStep(|step| {
        if step == 5 {
            let file = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
            file.set_len(header_len).unwrap();
        }
    });
    let err = run
        .train(&mut truncate_at_5, &stop)
        .expect_err("the run stops on the shrunk file")
        .to_string();
    assert!(
        err.contains("acts.npy") && err.contains("--resume"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let step = checkpoint_step(&run_dir).expect("a checkpoint was written before the error");
    assert!((5..100).contains(&step), "checkpoint at step {step}");
    drop(run);
    write_rows(&data, rows, d);
    let mut resumed = Run::resume(&run_dir, &ResumeOptions::default(), &no_stop()).unwrap();
    assert_eq!(resumed.steps_done(), step);
    assert!(matches!(
        resumed.train(&mut (), &no_stop()).unwrap(),
        Outcome::Finished(_)
    ));
    std::fs::remove_dir_all(dir).unwrap();
}
