//! `--precision bf16` against f32 and against itself: training tracks f32 at equal steps
//! (held-out FVE within 0.003, feature recovery's MCC within 0.01) on the synthetic set and,
//! where the shared MiniLM activations are present, on real activations; the same seed and
//! threads give the same bits; a resumed or resampled run rounds W_enc afresh; data-parallel
//! and latent-sharded runs (threads standing in for ranks) train what one process trains.
//! Every test prints why it skips on a CPU without AVX-512 BF16.

mod common;

use std::sync::Arc;

use common::{assert_close, ok, s, sae, sae_config, synthetic_batch, temp_dir, usage_error};
use ndarray::{concatenate, s, Array2, Axis};
use sparse_autoencoder::backend::bf16::Bf16Kernel;
use sparse_autoencoder::backend::{Cpu, Device};
use sparse_autoencoder::data::{NpyShards, Source};
use sparse_autoencoder::dist::{part, Collective, Grid, Threads};
use sparse_autoencoder::eval::evaluate_on;
use sparse_autoencoder::synth::{recovery, Synth, SynthConfig};
use sparse_autoencoder::{Architecture, Precision, Sae, SaeConfig, TrainConfig, Trainer};

/// Whether this CPU runs the bf16 GEMM; prints why not.
fn bf16_here() -> bool {
    match Bf16Kernel::detect() {
        Ok(_) => true,
        Err(err) => {
            eprintln!("skipped: {err}");
            false
        }
    }
}

/// `steps` steps of `arch` at `precision` on the batches `next` gives; the trained SAE (set
/// to the same precision for inference).
fn train(
    config: SaeConfig,
    steps: u64,
    precision: Precision,
    next: impl Fn(u64) -> Array2<f32>,
) -> Sae {
    let recipe = TrainConfig {
        total_steps: steps,
        warmup_steps: steps / 10,
        decay_start: Some(steps * 4 / 5),
        lr: Some(5e-3),
        dead_tokens: 20 * 256,
        threshold_start_step: steps / 2,
        precision,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(Sae::new(config, 0).unwrap(), recipe).unwrap();
    for step in 0..steps {
        trainer.step(next(step).view()).unwrap();
    }
    let sae = trainer.into_sae();
    assert_eq!(sae.precision(), precision);
    sae
}

/// Held-out FVE of `sae` (evaluated at its own precision) on `x_nd`.
fn fve(sae: &Sae, x_nd: &Array2<f32>) -> f64 {
    evaluate_on(sae, Device::Cpu, &x_nd.view(), 4096, false)
        .unwrap()
        .fve
}

#[test]
fn bf16_training_tracks_f32_on_the_synthetic_set() {
    if !bf16_here() {
        return;
    }
    let synth = Synth::new(SynthConfig::default()).unwrap();
    let config = sae_config(
        Architecture::BatchTopK { k: 8 },
        synth.config().d_model,
        512,
    );
    let held_out = synth.batch(4096, u64::MAX);
    let [f32_run, bf16_run] = [Precision::F32, Precision::Bf16].map(|p| {
        let sae = train(config, 150, p, |step| synth.batch(256, step));
        let mcc = recovery(synth.true_features(), sae.w_dec_fd()).unwrap().mcc;
        (fve(&sae, &held_out), mcc)
    });
    eprintln!("f32 (FVE, MCC) {f32_run:?}, bf16 {bf16_run:?}");
    // Not a loose test: both runs have learnt most of the set by then.
    assert!(f32_run.0 > 0.5 && f32_run.1 > 0.5, "{f32_run:?}");
    assert!(
        (f32_run.0 - bf16_run.0).abs() <= 0.003,
        "FVE {f32_run:?} vs {bf16_run:?}"
    );
    assert!(
        (f32_run.1 - bf16_run.1).abs() <= 0.01,
        "MCC {f32_run:?} vs {bf16_run:?}"
    );
}

/// The shared MiniLM activations (all-MiniLM-L6-v2 layer 4, float16), beside the project.
const MINILM: &str = "../shared/data/minilm_l6v2_layer4_docstrings_f16.npy";

#[test]
fn bf16_training_tracks_f32_on_minilm_activations() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(MINILM);
    if !path.exists() {
        eprintln!(
            "skipped: the shared activations are not at {}",
            path.display()
        );
        return;
    }
    if !bf16_here() {
        return;
    }
    let source = NpyShards::open(&[&path]).unwrap();
    let d = source.d_model();
    let mut rows = Array2::zeros((8192, d));
    source.read_rows(0, rows.as_slice_mut().unwrap()).unwrap();
    // Training on the first 6,144 rows, held out the rest.
    let (train_rows, held_out) = (rows.slice(s![..6144, ..]), rows.slice(s![6144.., ..]));
    let held_out = held_out.to_owned();
    let config = sae_config(Architecture::TopK { k: 32 }, d, 2 * d);
    let [f32_fve, bf16_fve] = [Precision::F32, Precision::Bf16].map(|p| {
        let sae = train(config, 120, p, |step| {
            let start = (step as usize * 256) % 6144;
            train_rows.slice(s![start..start + 256, ..]).to_owned()
        });
        fve(&sae, &held_out)
    });
    eprintln!("held-out FVE: f32 {f32_fve:.4}, bf16 {bf16_fve:.4}");
    assert!(f32_fve > 0.5, "{f32_fve}");
    assert!(
        (f32_fve - bf16_fve).abs() <= 0.003,
        "{f32_fve} vs {bf16_fve}"
    );
}

const D: usize = 12;
const F: usize = 48;
const B: usize = 32;

fn batch(step: u64) -> Array2<f32> {
    synthetic_batch(B, D, 100 + step)
}

fn recipe(steps: u64) -> TrainConfig {
    TrainConfig {
        total_steps: steps,
        warmup_steps: 2,
        sparsity_warmup_steps: 4,
        l1_coefficient: 0.1,
        lr: Some(1e-2),
        threshold_start_step: 2,
        dead_tokens: 96,
        precision: Precision::Bf16,
        ..TrainConfig::default()
    }
}

#[test]
fn bf16_runs_repeat_bit_for_bit_and_resume_exactly_through_a_resampling() {
    if !bf16_here() {
        return;
    }
    // Many latents die within the run, so resampling at step 3 re-initialises W_enc rows
    // that the bf16 copy then must round afresh.
    let config = sae_config(Architecture::TopK { k: 2 }, D, 4 * F);
    let recipe = TrainConfig {
        resample_every: Some(3),
        ..recipe(8)
    };
    let run = |interrupt: bool| {
        let mut trainer = Trainer::new(Sae::new(config, 1).unwrap(), recipe.clone()).unwrap();
        let mut resampled = 0;
        for step in 0..8 {
            if interrupt && step == 3 {
                trainer = Trainer::from_state(trainer.state(), recipe.clone()).unwrap();
            }
            resampled += trainer.step(batch(step).view()).unwrap().resampled;
        }
        (trainer.into_sae(), resampled)
    };
    let (whole, resampled) = run(false);
    assert!(resampled > 0, "the run resamples");
    assert_eq!(run(false).0, whole, "the same seed gives the same bits");
    assert_eq!(
        run(true).0,
        whole,
        "a resumed run rounds W_enc as the continuing one did"
    );
    // And bf16 is not f32: the same run in f32 differs.
    let mut f32_sae = Sae::new(config, 1).unwrap();
    let mut trainer = Trainer::new(
        f32_sae.clone(),
        TrainConfig {
            precision: Precision::F32,
            ..recipe
        },
    )
    .unwrap();
    for step in 0..8 {
        trainer.step(batch(step).view()).unwrap();
    }
    f32_sae = trainer.into_sae();
    assert_ne!(f32_sae.w_enc_fd(), whole.w_enc_fd());
}

/// W_enc, b_enc and W_dec, and b_dec, of a trained SAE.
fn tensors(sae: &Sae) -> [Array2<f32>; 4] {
    [
        sae.w_enc_fd().to_owned(),
        sae.b_enc_f().to_owned().insert_axis(Axis(1)),
        sae.w_dec_fd().to_owned(),
        sae.b_dec_d().to_owned().insert_axis(Axis(1)),
    ]
}

#[test]
fn bf16_across_threads_as_ranks_trains_what_one_process_trains() {
    if !bf16_here() {
        return;
    }
    const STEPS: u64 = 12;
    for arch in [Architecture::BatchTopK { k: 4 }, Architecture::RELU] {
        let config = sae_config(arch, D, F);
        let mut trainer = Trainer::new(Sae::new(config, 3).unwrap(), recipe(STEPS)).unwrap();
        for step in 0..STEPS {
            trainer.step(batch(step).view()).unwrap();
        }
        let want = tensors(trainer.sae());
        // Two data-parallel ranks: each rounds the rows the other updated after the gather.
        // Then one group of two latent shards, and two groups of two.
        for (groups, shards) in [(2, 1), (1, 2), (2, 2)] {
            let handles: Vec<_> = Threads::world(groups * shards)
                .into_iter()
                .map(|world| {
                    std::thread::spawn(move || {
                        let world: Arc<dyn Collective> = Arc::new(world);
                        let grid = Grid::new(world, shards).unwrap();
                        let latents = part(F, grid.shard, shards);
                        let mut trainer = if shards > 1 {
                            let shard = Sae::new_shard(config, 3, latents).unwrap();
                            Trainer::sharded(shard, config, recipe(STEPS), &grid).unwrap()
                        } else {
                            let sae = Sae::new(config, 3).unwrap();
                            let data = Box::new(grid.data.clone());
                            Trainer::with_parts(sae, recipe(STEPS), Box::new(Cpu), data).unwrap()
                        };
                        let rows = part(B, grid.group(), groups);
                        for step in 0..STEPS {
                            trainer
                                .step(batch(step).slice(s![rows.clone(), ..]))
                                .unwrap();
                        }
                        (grid.group(), tensors(trainer.sae()))
                    })
                })
                .collect();
            let ranks: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            let group0: Vec<_> = ranks.iter().filter(|r| r.0 == 0).map(|r| &r.1).collect();
            let names = ["w_enc_fd", "b_enc_f", "w_dec_fd"];
            for (t, name) in names.iter().enumerate() {
                let parts: Vec<_> = group0.iter().map(|r| r[t].view()).collect();
                let got = concatenate(Axis(0), &parts).unwrap();
                let what = format!("{arch:?} {groups}×{shards} {name}");
                assert_close(&what, &got, &want[t], 1e-5);
            }
            assert_close("b_dec_d", &group0[0][3], &want[3], 1e-5);
        }
    }
}

#[test]
fn the_cli_trains_evaluates_encodes_and_benches_in_bf16_and_refuses_it_on_a_gpu() {
    // A GPU with bf16 is refused before anything runs, on any CPU.
    for command in [
        &["train", "--steps", "5"][..],
        &["bench"],
        &["eval", "x", "--data", "y"],
        &["encode", "x", "--data", "y", "--out", "z"],
    ] {
        let mut args = command.to_vec();
        args.extend(["--precision", "bf16", "--device", "cuda"]);
        usage_error(&sae(&args), &["--precision", "--tf32"]);
    }
    if !bf16_here() {
        return;
    }
    let dir = temp_dir("bf16-cli");
    let (run, data) = (dir.join("run"), dir.join("data"));
    let train = [
        "train",
        "--steps",
        "20",
        "--batch-size",
        "256",
        "--threads",
        "1",
    ];
    ok(&sae(&[
        &train[..],
        &["--precision", "bf16", "--out", &s(&run)],
    ]
    .concat()));
    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(config.contains("precision = \"bf16\""), "{config}");
    assert!(
        config.contains("name = \"batchtopk-k8-f512-bf16\""),
        "{config}"
    );
    // The run keeps its precision: resuming cannot change it.
    let resumed = sae(&["train", "--resume", &s(&run), "--precision", "f32"]);
    usage_error(&resumed, &["--precision", "--resume"]);

    ok(&sae(&["synth", "--out", &s(&data), "--rows", "2048"]));
    let rows = s(&data.join("activations.npy"));
    let fve = |precision: &str| {
        let out = dir.join(format!("eval-{precision}"));
        let args = ["eval", &s(&run), "--data", &rows, "--out", &s(&out)];
        ok(&sae(&[&args[..], &["--precision", precision]].concat()));
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
        report["eval"]["fve"].as_f64().unwrap()
    };
    let (in_bf16, in_f32) = (fve("bf16"), fve("f32"));
    assert!(
        in_bf16 > 0.1 && (in_bf16 - in_f32).abs() < 0.01,
        "{in_bf16} vs {in_f32}"
    );
    let codes = dir.join("codes");
    let args = ["encode", &s(&run), "--data", &rows, "--out", &s(&codes)];
    let stdout = ok(&sae(&[&args[..], &["--precision", "bf16"]].concat()));
    assert!(stdout.contains("encoded 2048 rows"), "{stdout}");

    let bench = [
        "bench",
        "--d",
        "32",
        "--f",
        "96",
        "--k",
        "4",
        "--batch",
        "64",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--threads",
        "1",
        "--precision",
        "bf16",
    ];
    let report: serde_json::Value =
        serde_json::from_str(&ok(&sae(&[&bench[..], &["--json"]].concat()))).unwrap();
    assert_eq!(report["precision"], "bf16");
    assert!(
        report["backend"].as_str().unwrap().contains("AVX-512 BF16"),
        "{report}"
    );
    assert_eq!(report["f32"]["gemm_latents"], 96);
    assert!(
        report["gemm_speedup_over_f32"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert!(
        report["step_ratio_to_f32"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    let table = ok(&sae(&bench));
    assert!(
        table.contains("--precision bf16, in the same rounds")
            && table.contains("bf16 against f32: GEMM"),
        "{table}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
