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
use sparse_autoencoder::Sae;

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
    let err = Run::resume(&dir, &ResumeOptions::default(), &no_stop()).err().expect("refused").to_string();
    assert!(
        err.contains("checkpoint") && err.contains("renamed"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
