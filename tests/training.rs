//! Whole training steps: reproducibility, the two ReLU paths, θ, dead latents, learning, and
//! the edge cases (k ≥ F, k·B ≥ B·F, all-zero rows, D = 1, F = 1, one-row batches).

mod common;

use common::{assert_close, sae_config, synthetic_batch};
use ndarray::Array2;
use sparse_autoencoder::backend::Cpu;
use sparse_autoencoder::dist::{part, Threads};
use sparse_autoencoder::TrainerState;
use sparse_autoencoder::{Architecture, Error, ReluVariant, Sae, StepStats, TrainConfig, Trainer};

fn short_run() -> TrainConfig {
    TrainConfig {
        total_steps: 40,
        warmup_steps: 5,
        decay_start: Some(30),
        sparsity_warmup_steps: 10,
        l1_coefficient: 0.1,
        threshold_start_step: 3,
        dead_tokens: 64,
        lr: Some(1e-2),
        ..TrainConfig::default()
    }
}

/// Trains `steps` steps on fresh synthetic batches; returns the trainer and the last stats.
fn train(
    arch: Architecture,
    d: usize,
    f: usize,
    b: usize,
    steps: usize,
    config: TrainConfig,
) -> (Trainer, StepStats) {
    let mut trainer = Trainer::new(Sae::new(sae_config(arch, d, f), 11).unwrap(), config).unwrap();
    let mut stats = StepStats::default();
    for s in 0..steps {
        let x = synthetic_batch(b, d, 100 + s as u64);
        stats = trainer.step(x.view()).unwrap();
        assert!(
            stats.loss.is_finite() && stats.mse.is_finite() && stats.aux.is_finite(),
            "step {s}: {stats:?}"
        );
    }
    (trainer, stats)
}

fn all_finite(sae: &Sae) -> bool {
    sae.w_enc_fd()
        .iter()
        .chain(sae.w_dec_fd().iter())
        .chain(sae.b_enc_f().iter())
        .chain(sae.b_dec_d().iter())
        .all(|v| v.is_finite())
}

const ARCHS: [Architecture; 5] = [
    Architecture::RELU,
    Architecture::TopK { k: 4 },
    Architecture::BatchTopK { k: 4 },
    Architecture::JumpRelu,
    Architecture::Matryoshka { k: 4 },
];

#[test]
fn same_seed_and_threads_give_bit_identical_parameters() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    for arch in ARCHS {
        let run = || pool.install(|| train(arch, 24, 96, 64, 30, short_run()).0);
        let (a, b) = (run(), run());
        assert_eq!(a.sae(), b.sae(), "{arch:?}");
        assert_eq!(a.adam(), b.adam(), "{arch:?}");
    }
}

/// Inspecting a step (which moves the update's row preparation out of the backward pass) does
/// not change training by a single bit.
#[test]
fn capture_does_not_change_training() {
    for arch in ARCHS {
        let run = |capture: bool| {
            let sae = Sae::new(sae_config(arch, 16, 64), 8).unwrap();
            let mut trainer = Trainer::new(sae, short_run()).unwrap();
            trainer.set_capture(capture);
            for s in 0..15 {
                trainer
                    .step(synthetic_batch(32, 16, 40 + s).view())
                    .unwrap();
            }
            trainer.into_sae()
        };
        assert_eq!(run(false), run(true), "{arch:?}");
    }
}

/// A batch passed as a strided or transposed view trains exactly like the same rows in a
/// standard array.
#[test]
fn non_contiguous_batches_are_accepted() {
    let config = short_run();
    let sae = Sae::new(sae_config(Architecture::TopK { k: 3 }, 8, 32), 1).unwrap();
    let (mut a, mut b, mut c) = (
        Trainer::new(sae.clone(), config.clone()).unwrap(),
        Trainer::new(sae.clone(), config.clone()).unwrap(),
        Trainer::new(sae, config).unwrap(),
    );
    for s in 0..5 {
        let x = synthetic_batch(16, 8, 70 + s);
        let x_db = x.t().to_owned(); // D×B, so x_db.t() is a transposed view of x
        let mut wide = Array2::zeros((16, 16));
        wide.slice_mut(ndarray::s![.., ..;2]).assign(&x); // every other column
        a.step(x.view()).unwrap();
        b.step(x_db.t()).unwrap();
        c.step(wide.slice(ndarray::s![.., ..;2])).unwrap();
    }
    assert_eq!(a.sae(), b.sae());
    assert_eq!(a.sae(), c.sae());
}

#[test]
fn relu_dense_and_sparse_paths_agree() {
    let run = |threshold: f32| {
        let mut trainer = Trainer::new(
            Sae::new(sae_config(Architecture::RELU, 16, 64), 5).unwrap(),
            short_run(),
        )
        .unwrap();
        trainer.set_dense_threshold(threshold);
        for s in 0..20 {
            trainer.step(synthetic_batch(32, 16, s).view()).unwrap();
        }
        trainer.into_sae()
    };
    let (sparse, dense) = (run(2.0), run(0.0));
    assert_close(
        "W_enc",
        &dense.w_enc_fd().to_owned(),
        &sparse.w_enc_fd().to_owned(),
        1e-4,
    );
    assert_close(
        "W_dec",
        &dense.w_dec_fd().to_owned(),
        &sparse.w_dec_fd().to_owned(),
        1e-4,
    );
    assert_close(
        "b_enc",
        &dense.b_enc_f().to_owned(),
        &sparse.b_enc_f().to_owned(),
        1e-4,
    );
    assert_close(
        "b_dec",
        &dense.b_dec_d().to_owned(),
        &sparse.b_dec_d().to_owned(),
        1e-4,
    );
}

#[test]
fn training_learns_the_synthetic_data() {
    for arch in ARCHS {
        let config = TrainConfig {
            total_steps: 300,
            warmup_steps: 20,
            lr: Some(5e-3),
            l1_coefficient: 0.02,
            sparsity_warmup_steps: 50,
            ..TrainConfig::default()
        };
        let (_, first) = train(arch, 16, 64, 64, 1, config.clone());
        let (_, last) = train(arch, 16, 64, 64, 300, config);
        assert!(last.fve > 0.8, "{arch:?}: FVE {} after 300 steps", last.fve);
        assert!(
            last.mse < 0.2 * first.mse,
            "{arch:?}: {first:?} -> {last:?}"
        );
    }
}

#[test]
fn batchtopk_learns_a_threshold_and_uses_it_outside_training() {
    let (trainer, stats) = train(Architecture::BatchTopK { k: 4 }, 16, 64, 32, 3, short_run());
    // The reference updates θ only on steps after threshold_start_step (3).
    assert_eq!(stats.threshold, None);
    assert_eq!(trainer.sae().threshold(), None);
    let (trainer, stats) = train(
        Architecture::BatchTopK { k: 4 },
        16,
        64,
        32,
        10,
        short_run(),
    );
    let theta = stats.threshold.expect("θ is set after step 4");
    assert!(theta > 0.0);
    let sae = trainer.into_sae();
    let x = synthetic_batch(50, 16, 999);
    let codes = sae.encode(&Cpu, x.view()).unwrap();
    assert!(codes.values.iter().all(|&v| v > theta));
    let pre = sae.pre_activations(&Cpu, x.view()).unwrap();
    let expected = pre.mapv(|v| if v > theta { v } else { 0.0 });
    assert_eq!(codes.to_dense(), expected);
}

#[test]
fn dead_latents_are_counted_and_revived_by_auxk() {
    // 512 latents for 16-wide data with k = 2: most never fire and die after 64 tokens.
    let (trainer, stats) = train(Architecture::TopK { k: 2 }, 16, 512, 32, 6, short_run());
    assert!(stats.dead_fraction > 0.5, "{stats:?}");
    assert!(stats.aux > 0.0, "AuxK should be active: {stats:?}");
    let since = trainer.tokens_since_fired();
    let dead = since.iter().filter(|&&t| t >= 64).count();
    assert_eq!(dead as f32 / 512.0, stats.dead_fraction);
}

#[test]
fn k_equal_to_f_keeps_every_positive_code() {
    // k above F is a configuration error (ConfigError::KAboveDictSize); k = F is the edge.
    for arch in [
        Architecture::TopK { k: 32 },
        Architecture::BatchTopK { k: 32 },
    ] {
        let sae = Sae::new(sae_config(arch, 8, 32), 2).unwrap();
        let x = synthetic_batch(10, 8, 3);
        let mut trainer = Trainer::new(sae, short_run()).unwrap();
        trainer.set_capture(true);
        trainer.step(x.view()).unwrap();
        let cap = trainer.captured().unwrap();
        let pre = Sae::from_parts(
            *trainer.sae().config(),
            cap.params.w_enc_fd.clone(),
            cap.params.b_enc_f.clone(),
            cap.params.w_dec_fd.clone(),
            cap.params.b_dec_d.clone(),
        )
        .unwrap()
        .pre_activations(&Cpu, x.view())
        .unwrap();
        assert_eq!(cap.codes_bf, pre.mapv(|v| v.max(0.0)), "{arch:?}");
    }
}

#[test]
fn all_zero_rows_d1_f1_and_single_rows_train_without_nan() {
    for arch in ARCHS {
        // All-zero rows mixed with data, and a batch of nothing but zeros.
        let mut trainer =
            Trainer::new(Sae::new(sae_config(arch, 8, 32), 1).unwrap(), short_run()).unwrap();
        let mut x = synthetic_batch(16, 8, 1);
        x.rows_mut()
            .into_iter()
            .step_by(2)
            .for_each(|mut r| r.fill(0.0));
        for _ in 0..3 {
            assert!(trainer.step(x.view()).unwrap().loss.is_finite());
        }
        assert!(trainer
            .step(Array2::zeros((16, 8)).view())
            .unwrap()
            .loss
            .is_finite());
        assert!(all_finite(trainer.sae()), "{arch:?}");

        // D = 1 (AuxK's k_aux = D/2 = 0) and F = 1.
        for (d, f) in [(1, 8), (8, 1), (1, 1)] {
            let arch = match arch {
                Architecture::Relu { .. } | Architecture::JumpRelu => arch,
                Architecture::TopK { .. } => Architecture::TopK { k: 1 },
                Architecture::BatchTopK { .. } => Architecture::BatchTopK { k: 1 },
                Architecture::Matryoshka { .. } => Architecture::Matryoshka { k: 1 },
            };
            // Matryoshka's default fractions leave empty groups in a dictionary this small.
            let groups = TrainConfig {
                group_sizes: if f > 1 { vec![1, f - 1] } else { vec![1] },
                ..short_run()
            };
            let (trainer, _) = train(arch, d, f, 8, 12, groups);
            assert!(all_finite(trainer.sae()), "{arch:?} d={d} f={f}");
        }

        // One row per batch: AuxK's normaliser is 0, and the reference then counts AuxK as 0.
        let config = TrainConfig {
            dead_tokens: 4,
            ..short_run()
        };
        let (trainer, stats) = train(arch, 8, 64, 1, 12, config);
        assert!(all_finite(trainer.sae()), "{arch:?}");
        // A single row has no variance to explain.
        assert!(stats.fve.is_nan(), "{arch:?}: fve {}", stats.fve);
        if arch.k().is_some() {
            assert!(stats.dead_fraction > 0.0);
            assert_eq!(stats.aux, 0.0, "{stats:?}");
        }
    }
}

#[test]
fn bad_batches_are_errors_not_panics() {
    let mut trainer = Trainer::new(
        Sae::new(sae_config(Architecture::TopK { k: 2 }, 8, 16), 0).unwrap(),
        short_run(),
    )
    .unwrap();
    assert!(matches!(
        trainer.step(Array2::zeros((0, 8)).view()),
        Err(Error::Empty { .. })
    ));
    assert!(matches!(
        trainer.step(Array2::zeros((4, 7)).view()),
        Err(Error::Shape { .. })
    ));
    let mut x = Array2::zeros((4, 8));
    x[[3, 0]] = f32::INFINITY;
    let err = trainer.step(x.view()).unwrap_err();
    assert!(matches!(err, Error::NonFinite { row: 3, .. }), "{err}");
    // Nothing was consumed by the failed steps.
    assert_eq!(trainer.steps_done(), 0);
}

#[test]
fn invalid_train_config_is_rejected_by_the_trainer() {
    let sae = Sae::new(sae_config(Architecture::TopK { k: 2 }, 8, 16), 0).unwrap();
    let config = TrainConfig {
        lr: Some(-1.0),
        ..short_run()
    };
    assert!(matches!(
        Trainer::new(sae, config),
        Err(Error::Config(
            sparse_autoencoder::ConfigError::LearningRate(_)
        ))
    ));
}

/// `ranks` threads, each a process holding its part of every global batch in `batches`
/// (contiguous rows in rank order, as a distributed run splits them), step `config` on `sae`
/// and sync; returns every rank's final state.
fn train_across(
    sae: &Sae,
    config: &TrainConfig,
    dense_threshold: f32,
    batches: &[Array2<f32>],
    ranks: usize,
) -> Vec<TrainerState> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = Threads::world(ranks)
            .into_iter()
            .enumerate()
            .map(|(rank, threads)| {
                scope.spawn(move || {
                    let mut trainer = Trainer::with_parts(
                        sae.clone(),
                        config.clone(),
                        Box::new(Cpu),
                        Box::new(threads),
                    )
                    .unwrap();
                    trainer.set_dense_threshold(dense_threshold);
                    for x in batches {
                        let rows = part(x.nrows(), rank, ranks);
                        trainer.step(x.slice(ndarray::s![rows, ..])).unwrap();
                    }
                    trainer.sync().unwrap();
                    trainer.state()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn assert_states_close(what: &str, a: &TrainerState, reference: &TrainerState, tol: f64) {
    let tensors = |s: &TrainerState| {
        let p = s.sae.w_enc_fd().to_owned();
        [
            ("W_enc", p),
            ("W_dec", s.sae.w_dec_fd().to_owned()),
            ("m W_enc", s.adam_m.w_enc_fd.clone()),
            ("m W_dec", s.adam_m.w_dec_fd.clone()),
            ("v W_enc", s.adam_v.w_enc_fd.clone()),
            ("v W_dec", s.adam_v.w_dec_fd.clone()),
        ]
    };
    for ((name, x), (_, r)) in tensors(a).into_iter().zip(tensors(reference)) {
        assert_close(&format!("{what} {name}"), &x, &r, tol);
    }
    let vectors = |s: &TrainerState| {
        [
            s.sae.b_enc_f().to_owned(),
            s.sae.b_dec_d().to_owned(),
            s.adam_m.b_enc_f.clone(),
            s.adam_v.b_dec_d.clone(),
        ]
    };
    for (x, r) in vectors(a).iter().zip(&vectors(reference)) {
        assert_close(&format!("{what} biases"), x, r, tol);
    }
    assert_eq!(a.step, reference.step, "{what}");
    assert_eq!(
        a.tokens_since_fired_f, reference.tokens_since_fired_f,
        "{what}"
    );
    assert_eq!(
        a.sae.threshold().is_some(),
        reference.sae.threshold().is_some(),
        "{what}"
    );
}

/// Processes that each hold a part of every global batch train what one process holding
/// the whole batch trains, for every architecture and both backward paths (the gathered
/// sparse one, where each process owns some latents, and the dense one, where gradients are
/// summed); every process ends with the same bits, and so does a repeat.
#[test]
fn processes_sharing_each_batch_train_what_one_process_trains() {
    let unit_decoder = Architecture::Relu {
        variant: ReluVariant::UnitDecoder,
    };
    // The last two resample every 4 steps: rows drawn by error, gathered across processes.
    let cases: [(&str, Architecture, f32, Option<u64>); 9] = [
        ("relu dense", Architecture::RELU, 0.05, None),
        ("relu sparse", Architecture::RELU, 1.0, None),
        ("relu unit-norm", unit_decoder, 1.0, None),
        ("topk", Architecture::TopK { k: 4 }, 0.05, None),
        ("batchtopk", Architecture::BatchTopK { k: 4 }, 0.05, None),
        ("jumprelu", Architecture::JumpRelu, 0.05, None),
        ("matryoshka", Architecture::Matryoshka { k: 4 }, 0.05, None),
        ("topk resampled", Architecture::TopK { k: 4 }, 0.05, Some(4)),
        (
            "batchtopk resampled",
            Architecture::BatchTopK { k: 4 },
            0.05,
            Some(4),
        ),
    ];
    for (what, arch, dense_threshold, resample_every) in cases {
        let config = TrainConfig {
            // Dead latents within the run, so AuxK's terms are exchanged too.
            dead_tokens: 48,
            resample_every,
            ..short_run()
        };
        let sae = Sae::new(sae_config(arch, 16, 64), 4).unwrap();
        let batches: Vec<Array2<f32>> = (0..12).map(|s| synthetic_batch(48, 16, 500 + s)).collect();
        let single = train_across(&sae, &config, dense_threshold, &batches, 1).remove(0);
        if resample_every.is_some() {
            let config = TrainConfig {
                resample_every: None,
                ..config.clone()
            };
            let plain = train_across(&sae, &config, dense_threshold, &batches, 1).remove(0);
            assert_ne!(plain, single, "{what}: nothing was resampled");
        }
        for ranks in [2, 3] {
            let states = train_across(&sae, &config, dense_threshold, &batches, ranks);
            for (rank, state) in states.iter().enumerate() {
                assert_eq!(state, &states[0], "{what}: rank {rank} of {ranks} differs");
            }
            let what = format!("{what}, {ranks} ranks");
            assert_states_close(&what, &states[0], &single, 1e-5);
            let again = train_across(&sae, &config, dense_threshold, &batches, ranks);
            assert_eq!(again[0], states[0], "{what}: a repeat differs");
        }
    }
}

/// The recipe of [`short_run`] resampling every 4 steps: with 512 latents for 16-wide data and
/// k = 2, hundreds are dead (64 tokens without firing) by step 4, more than a batch has rows.
fn resampling_run() -> TrainConfig {
    TrainConfig {
        resample_every: Some(4),
        ..short_run()
    }
}

fn row_norm(r: ndarray::ArrayView1<'_, f32>) -> f32 {
    r.dot(&r).sqrt()
}

#[test]
fn resampling_points_dead_latents_at_the_batch_rows() {
    let (b, d, f) = (32, 16, 512);
    let arch = Architecture::TopK { k: 2 };
    let mut trainer = Trainer::new(
        Sae::new(sae_config(arch, d, f), 11).unwrap(),
        resampling_run(),
    )
    .unwrap();
    for s in 0..3 {
        let stats = trainer.step(synthetic_batch(b, d, 100 + s).view()).unwrap();
        assert_eq!(stats.resampled, 0, "step {s}");
    }
    let x = synthetic_batch(b, d, 103);
    let stats = trainer.step(x.view()).unwrap();
    // More dead latents than rows: each row is drawn once.
    assert_eq!(stats.resampled, b, "{stats:?}");

    let state = trainer.state();
    let sae = &state.sae;
    let since = &state.tokens_since_fired_f;
    let resampled: Vec<usize> = (0..f)
        .filter(|&j| {
            since[j] == 0
                && sae.b_enc_f()[j] == 0.0
                && state.adam_m.w_enc_fd.row(j).iter().all(|&v| v == 0.0)
                && state.adam_m.w_dec_fd.row(j).iter().all(|&v| v == 0.0)
        })
        .collect();
    assert_eq!(resampled.len(), b);
    let live: Vec<usize> = (0..f)
        .filter(|&j| since[j] < 64 && !resampled.contains(&j))
        .collect();
    assert!(!live.is_empty());
    let live_norm = live
        .iter()
        .map(|&j| row_norm(sae.w_enc_fd().row(j)))
        .sum::<f32>()
        / live.len() as f32;
    let mean_v = |a: &Array2<f32>| {
        live.iter()
            .fold(ndarray::Array1::<f32>::zeros(d), |acc, &j| acc + a.row(j))
            / live.len() as f32
    };
    let (v_enc, v_dec) = (
        mean_v(&state.adam_v.w_enc_fd),
        mean_v(&state.adam_v.w_dec_fd),
    );

    // Each resampled decoder row is a distinct batch row as the encoder sees it, x − b_dec,
    // at unit norm; the encoder row points the same way at a fifth of the live latents' norm.
    let centred = &x - &sae.b_dec_d();
    let mut rows_used = Vec::new();
    for &j in &resampled {
        let w_dec = sae.w_dec_fd().row(j).to_owned();
        assert!((row_norm(w_dec.view()) - 1.0).abs() < 1e-5);
        let (best, cos) = (0..b)
            .map(|r| (r, centred.row(r).dot(&w_dec) / row_norm(centred.row(r))))
            .fold((0, f32::MIN), |a, c| if c.1 > a.1 { c } else { a });
        assert!(
            cos > 1.0 - 1e-5,
            "latent {j}: cosine {cos} to its nearest row"
        );
        rows_used.push(best);
        let w_enc = sae.w_enc_fd().row(j).to_owned();
        assert!((row_norm(w_enc.view()) / live_norm - 0.2).abs() < 1e-4);
        assert!(w_enc.dot(&w_dec) / row_norm(w_enc.view()) > 1.0 - 1e-5);
        // Adam's second moments start where the live latents' are, so the first steps are
        // as large as theirs, not the sign steps of a zeroed moment.
        assert_close(
            "v W_enc",
            &state.adam_v.w_enc_fd.row(j).to_owned(),
            &v_enc,
            1e-5,
        );
        assert_close(
            "v W_dec",
            &state.adam_v.w_dec_fd.row(j).to_owned(),
            &v_dec,
            1e-5,
        );
    }
    rows_used.sort();
    rows_used.dedup();
    assert_eq!(rows_used.len(), b, "a row was drawn twice");
}

#[test]
fn resampling_training_repeats_and_resumes_to_the_same_bits() {
    for arch in [
        Architecture::RELU,
        Architecture::TopK { k: 2 },
        Architecture::JumpRelu,
    ] {
        let fresh = || {
            Trainer::new(
                Sae::new(sae_config(arch, 16, 512), 11).unwrap(),
                resampling_run(),
            )
            .unwrap()
        };
        let run = |trainer: &mut Trainer, steps: std::ops::Range<u64>| {
            steps
                .map(|s| {
                    trainer
                        .step(synthetic_batch(32, 16, 100 + s).view())
                        .unwrap()
                })
                .map(|stats| stats.resampled)
                .sum::<usize>()
        };
        let mut straight = fresh();
        let resampled = run(&mut straight, 0..14);
        assert!(resampled > 0, "{arch:?}: nothing was resampled");
        let mut again = fresh();
        run(&mut again, 0..14);
        assert_eq!(
            again.state(),
            straight.state(),
            "{arch:?}: a repeat differs"
        );
        let mut first = fresh();
        run(&mut first, 0..6);
        let mut resumed = Trainer::from_state(first.state(), resampling_run()).unwrap();
        run(&mut resumed, 6..14);
        assert_eq!(
            resumed.state(),
            straight.state(),
            "{arch:?}: the resume differs"
        );
        let mut plain = Trainer::new(
            Sae::new(sae_config(arch, 16, 512), 11).unwrap(),
            short_run(),
        )
        .unwrap();
        run(&mut plain, 0..14);
        assert_ne!(
            plain.state(),
            straight.state(),
            "{arch:?}: resampling changed nothing"
        );
    }
}

#[test]
fn resampling_is_refused_on_a_gpu_naming_the_option() {
    let sae = Sae::new(sae_config(Architecture::TopK { k: 2 }, 8, 32), 0).unwrap();
    let mut trainer = Trainer::new(sae, resampling_run()).unwrap();
    let err = trainer
        .set_device(sparse_autoencoder::backend::Device::cuda(0))
        .unwrap_err();
    assert!(matches!(err, Error::Device { .. }), "{err}");
    assert!(err.to_string().contains("--resample"), "{err}");
    assert_eq!(trainer.device_name(), "cpu");
}
