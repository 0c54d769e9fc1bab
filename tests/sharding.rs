//! Latent sharding ([`Trainer::sharded`]) with threads standing in for ranks: one group of two
//! shards, and two groups of two, train what one process trains on the same global batches
//! (every architecture, AuxK's dead latents and Matryoshka's prefixes across shards included),
//! and two sharded runs are bit-identical.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{assert_close, synthetic_batch};
use ndarray::{concatenate, s, Array1, Array2, Axis};
use sparse_autoencoder::dist::{part, Collective, Grid, Threads};
use sparse_autoencoder::run::{
    ArchName, Observer, Outcome, Progress, ResumeOptions, Run, RunSpec, SaeSpec, ScheduleSpec,
};
use sparse_autoencoder::synth::SynthConfig;
use sparse_autoencoder::{Architecture, ReluVariant, Sae, SaeConfig, TrainConfig, Trainer};

const D: usize = 12;
const F: usize = 48;
const B: usize = 32;
const STEPS: u64 = 16;
const SEED: u64 = 3;

fn recipe() -> TrainConfig {
    TrainConfig {
        total_steps: STEPS,
        warmup_steps: 3,
        decay_start: Some(12),
        sparsity_warmup_steps: 6,
        l1_coefficient: 0.1,
        threshold_start_step: 2,
        // AuxK's dead latents within the run.
        dead_tokens: 96,
        lr: Some(1e-2),
        // Prefixes that end inside a shard and at its edge.
        group_sizes: vec![6, 18, 24],
        ..TrainConfig::default()
    }
}

fn arches() -> [Architecture; 6] {
    [
        Architecture::RELU,
        Architecture::Relu {
            variant: ReluVariant::UnitDecoder,
        },
        Architecture::TopK { k: 4 },
        Architecture::BatchTopK { k: 4 },
        Architecture::JumpRelu,
        Architecture::Matryoshka { k: 4 },
    ]
}

fn batch(step: u64) -> Array2<f32> {
    synthetic_batch(B, D, 100 + step)
}

fn config(arch: Architecture) -> SaeConfig {
    SaeConfig {
        d_model: D,
        dict_size: F,
        arch,
    }
}

/// W_enc, b_enc, W_dec and (JumpReLU) θ as columns, then b_dec.
type Tensors = (Vec<Array2<f32>>, Array1<f32>);
/// One rank's group, shard and tensors.
type Rank = (usize, usize, Vec<Array2<f32>>, Array1<f32>);

/// W_enc, b_enc, W_dec and (JumpReLU) θ of `sae`, then b_dec.
fn tensors(sae: &Sae) -> Tensors {
    let theta = sae.latent_thresholds().to_owned();
    let theta = theta
        .clone()
        .into_shape_with_order((theta.len(), 1))
        .unwrap();
    (
        vec![
            sae.w_enc_fd().to_owned(),
            sae.b_enc_f().to_owned().insert_axis(Axis(1)),
            sae.w_dec_fd().to_owned(),
            theta,
        ],
        sae.b_dec_d().to_owned(),
    )
}

/// The single-process run's tensors.
fn single(arch: Architecture) -> Tensors {
    let mut trainer = Trainer::new(Sae::new(config(arch), SEED).unwrap(), recipe()).unwrap();
    for step in 0..STEPS {
        trainer.step(batch(step).view()).unwrap();
    }
    tensors(trainer.sae())
}

/// A sharded run on `groups` × `shards` threads: each rank's (group, shard, tensors).
fn sharded(arch: Architecture, groups: usize, shards: usize) -> Vec<Rank> {
    let handles: Vec<_> = Threads::world(groups * shards)
        .into_iter()
        .map(|world| {
            std::thread::spawn(move || {
                let world: Arc<dyn Collective> = Arc::new(world);
                let grid = Grid::new(world, shards).unwrap();
                let latents = part(F, grid.shard, shards);
                let shard = Sae::new_shard(config(arch), SEED, latents).unwrap();
                let mut trainer = Trainer::sharded(shard, config(arch), recipe(), &grid).unwrap();
                let rows = part(B, grid.group(), groups);
                for step in 0..STEPS {
                    let x_bd = batch(step);
                    trainer.step(x_bd.slice(s![rows.clone(), ..])).unwrap();
                }
                let (t, b_dec) = tensors(trainer.sae());
                (grid.group(), grid.shard, t, b_dec)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Group `group`'s shards put back together, latents in shard order.
fn assembled(ranks: &[Rank], group: usize) -> Tensors {
    let mine: Vec<_> = ranks.iter().filter(|r| r.0 == group).collect();
    let whole = (0..4)
        .map(|t| {
            let parts: Vec<_> = mine.iter().map(|r| r.2[t].view()).collect();
            concatenate(Axis(0), &parts).unwrap()
        })
        .collect();
    (whole, mine[0].3.clone())
}

#[test]
fn a_shard_is_its_rows_of_the_whole_initialisation() {
    let whole = Sae::new(config(Architecture::TopK { k: 4 }), SEED).unwrap();
    let rows = part(F, 1, 3);
    let shard = Sae::new_shard(config(Architecture::TopK { k: 4 }), SEED, rows.clone()).unwrap();
    assert_eq!(
        shard.w_dec_fd(),
        whole.w_dec_fd().slice(s![rows.clone(), ..])
    );
    assert_eq!(shard.w_enc_fd(), whole.w_enc_fd().slice(s![rows, ..]));
    // A shard with fewer latents than k, or outside the dictionary, is refused by name.
    for rows in [0..3, 40..49, 5..5] {
        let err = Sae::new_shard(config(Architecture::TopK { k: 4 }), SEED, rows)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--latent-shards"), "{err}");
    }
}

#[test]
fn sharded_latents_train_what_one_process_trains() {
    const NAMES: [&str; 4] = ["w_enc_fd", "b_enc_f", "w_dec_fd", "threshold_f"];
    for arch in arches() {
        let (want, want_b_dec) = single(arch);
        for (groups, shards) in [(1, 2), (2, 2)] {
            let ranks = sharded(arch, groups, shards);
            let (got, got_b_dec) = assembled(&ranks, 0);
            let what = |name: &str| format!("{arch:?} {groups}×{shards} {name}");
            for (t, name) in NAMES.iter().enumerate() {
                assert_close(&what(name), &got[t], &want[t], 1e-5);
            }
            assert_close(&what("b_dec_d"), &got_b_dec, &want_b_dec, 1e-5);
            // Every group holds the same dictionary, bit for bit.
            for group in 1..groups {
                assert_eq!(assembled(&ranks, group), (got.clone(), got_b_dec.clone()));
            }
            // The rerun for the selections that exchange candidates across shards.
            if groups == 2
                && matches!(
                    arch,
                    Architecture::BatchTopK { .. } | Architecture::Matryoshka { .. }
                )
            {
                let again = sharded(arch, groups, shards);
                assert_eq!(assembled(&again, 0), (got, got_b_dec), "{arch:?}: rerun");
            }
        }
    }
}

/// A sweep of two SAEs (one learns θ) on a small synthetic set.
fn run_spec() -> RunSpec {
    RunSpec {
        train: ScheduleSpec {
            steps: Some(12),
            batch_size: Some(32),
            ..ScheduleSpec::default()
        },
        sae: vec![
            SaeSpec {
                arch: Some(ArchName::Topk),
                k: Some(4),
                dict_size: Some(48),
                ..SaeSpec::default()
            },
            SaeSpec {
                arch: Some(ArchName::Batchtopk),
                k: Some(4),
                dict_size: Some(48),
                ..SaeSpec::default()
            },
        ],
        synthetic: Some(SynthConfig {
            d_model: 16,
            n_features: 32,
            ..SynthConfig::default()
        }),
        ..RunSpec::default()
    }
}

/// Stops the run after `stop_at` steps.
struct StopAt<'a>(u64, &'a AtomicBool);

impl Observer for StopAt<'_> {
    fn step(&mut self, p: &Progress<'_>) {
        if p.step == self.0 {
            self.1.store(true, Ordering::Relaxed);
        }
    }
    fn note(&mut self, _: &str) {}
}

/// Trains the run in `dir` (started afresh, or resumed) on `ranks` threads in groups of
/// `shards`, stopping after `stop_at` steps: every rank's outcome.
fn run_on_threads(
    dir: &Path,
    resume: bool,
    ranks: usize,
    shards: usize,
    stop_at: u64,
) -> Vec<Outcome> {
    let handles: Vec<_> = Threads::world(ranks)
        .into_iter()
        .map(|world| {
            let dir = dir.to_path_buf();
            std::thread::spawn(move || {
                let grid = Grid::new(Arc::new(world), shards).unwrap();
                let stop = AtomicBool::new(false);
                let mut run = if resume {
                    Run::resume_sharded(&dir, &ResumeOptions::default(), &stop, grid)
                } else {
                    Run::create_sharded(&run_spec(), &dir, false, &stop, grid)
                }
                .unwrap();
                run.train(&mut StopAt(stop_at, &stop), &stop).unwrap()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn a_sharded_run_checkpoints_resumes_with_any_shard_count_and_saves_one_loadable_sae() {
    let dir = common::temp_dir("sharded-run");
    let straight = dir.join("straight");
    let mut run = Run::create(&run_spec(), &straight, false, &AtomicBool::new(false)).unwrap();
    run.train(&mut (), &AtomicBool::new(false)).unwrap();
    let names: Vec<String> = run.names().iter().map(|n| n.to_string()).collect();
    drop(run);
    // Stopped at step 5 on two groups of two shards; the checkpoint resumed on one group of
    // two, and on one process.
    for (resume_ranks, resume_shards) in [(2, 2), (1, 1)] {
        let sharded = dir.join(format!("sharded-{resume_ranks}"));
        for outcome in run_on_threads(&sharded, false, 4, 2, 5) {
            assert!(
                matches!(outcome, Outcome::Interrupted { step: 5 }),
                "{outcome:?}"
            );
        }
        for outcome in run_on_threads(&sharded, true, resume_ranks, resume_shards, 0) {
            assert!(matches!(outcome, Outcome::Finished(_)), "{outcome:?}");
        }
        for name in &names {
            let want = Sae::load(&straight.join(name)).unwrap();
            let got = Sae::load(&sharded.join(name)).unwrap();
            let theta = |sae: &Sae| sae.threshold().map(|t| ndarray::arr1(&[t]));
            if let (Some(g), Some(w)) = (theta(&got), theta(&want)) {
                assert_close(&format!("{name}: θ"), &g, &w, 1e-5);
            } else {
                assert_eq!(got.threshold(), want.threshold(), "{name}");
            }
            let (want, want_b_dec) = tensors(&want);
            let (got_t, got_b_dec) = tensors(&got);
            let what = |t: &str| format!("{name} resumed on {resume_ranks}: {t}");
            for (t, (g, w)) in got_t.iter().zip(&want).enumerate() {
                assert_close(&what(&t.to_string()), g, w, 1e-5);
            }
            assert_close(&what("b_dec_d"), &got_b_dec, &want_b_dec, 1e-5);
            assert!(!sharded.join("checkpoint").exists());
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}
