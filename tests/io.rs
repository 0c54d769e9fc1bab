//! The files of `sparse_autoencoder::io` from the library: an SAE saved and loaded bit for
//! bit, a trainer checkpointed halfway ending where the uninterrupted trainer ends, `.npy`
//! arrays written whole or batch by batch and read back with npyz, exports read back with the
//! safetensors crate, and every bad file refused with an error naming it.

mod common;

use std::fs;
use std::path::Path;

use common::{random_sae, read_npy, sae_config, synthetic_batch, temp_dir, tensor};
use ndarray::Array2;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde_json::json;
use sparse_autoencoder::backend::Cpu;
use sparse_autoencoder::io::{
    export_saelens, export_sparsify, write_npy, Checkpoint, CodesLayout, CodesWriter,
    ExportMetadata, NpyAppender, CHECKPOINT_CONFIG_FILE, CHECKPOINT_WEIGHTS_FILE, CONFIG_FILE,
    WEIGHTS_FILE,
};
use sparse_autoencoder::ParamTensors;
use sparse_autoencoder::TrainerState;
use sparse_autoencoder::{Architecture, Error, Sae, SaeConfig, TrainConfig, Trainer};

const ARCHS: [Architecture; 5] = [
    Architecture::RELU,
    Architecture::TopK { k: 4 },
    Architecture::BatchTopK { k: 4 },
    Architecture::JumpRelu,
    Architecture::Matryoshka { k: 4 },
];

/// Bit patterns, so that -0.0 ≠ 0.0 and NaN = NaN: "exact" means exact.
fn bits<'a>(values: impl IntoIterator<Item = &'a f32>) -> Vec<u32> {
    values.into_iter().map(|v| v.to_bits()).collect()
}

#[track_caller]
fn assert_sae_bits(a: &Sae, b: &Sae, what: &str) {
    assert_eq!(a.config(), b.config(), "{what}: config");
    assert_eq!(bits(a.w_enc_fd()), bits(b.w_enc_fd()), "{what}: w_enc_fd");
    assert_eq!(bits(a.b_enc_f()), bits(b.b_enc_f()), "{what}: b_enc_f");
    assert_eq!(bits(a.w_dec_fd()), bits(b.w_dec_fd()), "{what}: w_dec_fd");
    assert_eq!(bits(a.b_dec_d()), bits(b.b_dec_d()), "{what}: b_dec_d");
    assert_eq!(
        a.threshold().map(f32::to_bits),
        b.threshold().map(f32::to_bits),
        "{what}: threshold"
    );
}

#[track_caller]
fn assert_params_bits(a: &ParamTensors, b: &ParamTensors, what: &str) {
    assert_eq!(bits(&a.w_enc_fd), bits(&b.w_enc_fd), "{what}: w_enc_fd");
    assert_eq!(bits(&a.b_enc_f), bits(&b.b_enc_f), "{what}: b_enc_f");
    assert_eq!(bits(&a.w_dec_fd), bits(&b.w_dec_fd), "{what}: w_dec_fd");
    assert_eq!(bits(&a.b_dec_d), bits(&b.b_dec_d), "{what}: b_dec_d");
}

#[track_caller]
fn assert_state_bits(a: &TrainerState, b: &TrainerState, what: &str) {
    assert_sae_bits(&a.sae, &b.sae, what);
    assert_params_bits(&a.adam_m, &b.adam_m, &format!("{what}: Adam m"));
    assert_params_bits(&a.adam_v, &b.adam_v, &format!("{what}: Adam v"));
    assert_eq!(a.adam_t, b.adam_t, "{what}: Adam t");
    assert_eq!(a.step, b.step, "{what}: step");
    assert_eq!(
        a.tokens_since_fired_f, b.tokens_since_fired_f,
        "{what}: tokens_since_fired_f"
    );
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

/// A short recipe in which every piece of state moves: the learning rate warms up and
/// decays, ReLU's λ warms up, BatchTopK learns θ from step 2, and latents die after 96
/// tokens (three batches without firing) so AuxK runs.
fn recipe() -> TrainConfig {
    TrainConfig {
        total_steps: 12,
        warmup_steps: 2,
        decay_start: Some(8),
        sparsity_warmup_steps: 3,
        threshold_start_step: 2,
        dead_tokens: 96,
        lr: Some(1e-2),
        ..TrainConfig::default()
    }
}

/// Trains a fresh trainer on steps `steps` (batch i is `synthetic_batch(32, 8, i)`).
fn run(trainer: &mut Trainer, steps: std::ops::Range<u64>) {
    for s in steps {
        trainer.step(synthetic_batch(32, 8, s).view()).unwrap();
    }
}

#[test]
fn save_then_load_is_bit_identical_for_every_architecture() {
    let dir = temp_dir("io-roundtrip");
    for arch in ARCHS {
        let mut sae = random_sae(arch, 5, 12, 7);
        if matches!(arch, Architecture::BatchTopK { .. }) {
            // Only training sets θ.
            let mut trainer = Trainer::new(sae, recipe()).unwrap();
            for s in 0..4 {
                trainer.step(synthetic_batch(32, 5, s).view()).unwrap();
            }
            sae = trainer.into_sae();
            assert!(sae.threshold().is_some());
        }
        let d = dir.join(format!("{arch:?}"));
        sae.save(&d).unwrap();
        let back = Sae::load(&d).unwrap();
        assert_sae_bits(&back, &sae, &format!("{arch:?}"));
        assert_eq!(back, sae);
        let (shape, w_enc) = tensor(&d.join(WEIGHTS_FILE), "w_enc_fd");
        assert_eq!(shape, [12, 5]);
        assert_eq!(bits(&w_enc), bits(sae.w_enc_fd()));
        let cfg = json(&d.join(CONFIG_FILE));
        assert_eq!(cfg["config"]["dict_size"], 12);
    }
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_learned_threshold_is_saved_as_a_tensor_and_loaded_exactly() {
    let dir = temp_dir("io-threshold");
    let mut trainer = Trainer::new(
        Sae::new(sae_config(Architecture::BatchTopK { k: 4 }, 8, 32), 1).unwrap(),
        recipe(),
    )
    .unwrap();
    run(&mut trainer, 0..5);
    let sae = trainer.into_sae();
    let theta = sae
        .threshold()
        .expect("θ is learned after threshold_start_step");
    sae.save(&dir).unwrap();
    let (shape, values) = tensor(&dir.join(WEIGHTS_FILE), "threshold");
    assert_eq!((shape.len(), bits(&values)), (0, vec![theta.to_bits()]));
    assert_eq!(
        Sae::load(&dir).unwrap().threshold().map(f32::to_bits),
        Some(theta.to_bits())
    );
    // Files without the tensor (written before it existed) still give θ from sae.json.
    let plain = random_sae(Architecture::BatchTopK { k: 4 }, 8, 32, 2);
    plain.save(&dir).unwrap();
    let path = dir.join(CONFIG_FILE);
    let text = fs::read_to_string(&path).unwrap();
    fs::write(
        &path,
        text.replace("\"threshold\": null", "\"threshold\": 0.5"),
    )
    .unwrap();
    assert_eq!(Sae::load(&dir).unwrap().threshold(), Some(0.5));
    fs::remove_dir_all(dir).unwrap();
}

/// A safetensors file holding `tensors` (name, dtype, shape, bytes).
fn safetensors_file(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views = tensors.iter().map(|(name, dtype, shape, data)| {
        (*name, TensorView::new(*dtype, shape.clone(), data).unwrap())
    });
    fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

#[test]
fn loading_a_bad_sae_directory_names_the_file_and_the_fix() {
    let dir = temp_dir("io-bad-sae");
    let missing = dir.join("nothing-here");
    let err = Sae::load(&missing).unwrap_err();
    assert!(matches!(err, Error::RunDir { .. }), "{err}");
    assert!(err.to_string().contains("no such directory"), "{err}");

    let sae = random_sae(Architecture::TopK { k: 2 }, 4, 8, 0);
    sae.save(&dir).unwrap();
    let cfg = dir.join(CONFIG_FILE);
    let text = fs::read_to_string(&cfg).unwrap();
    let weights = dir.join(WEIGHTS_FILE);
    let good = fs::read(&weights).unwrap();

    let expect = |needles: &[&str]| {
        let err = Sae::load(&dir).unwrap_err();
        assert!(
            matches!(err, Error::RunFile { .. } | Error::RunDir { .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        for needle in needles {
            assert!(msg.contains(needle), "{needle:?} not in: {msg}");
        }
    };
    fs::write(&cfg, "{\"format\": 1,").unwrap();
    expect(&[CONFIG_FILE, "malformed", "save the SAE again"]);
    fs::write(&cfg, text.replace("\"format\": 1", "\"format\": 7")).unwrap();
    expect(&[CONFIG_FILE, "format 7"]);
    fs::write(&cfg, text.replace("\"k\": 2", "\"k\": 0")).unwrap();
    expect(&[CONFIG_FILE, "k must be at least 1"]);
    fs::write(&cfg, text.replace("\"d_model\": 4", "\"d_model\": 5")).unwrap();
    expect(&[WEIGHTS_FILE, "\"w_enc_fd\"", "[8, 5]"]);
    fs::write(&cfg, &text).unwrap();

    // A tensor of the right shape in float64.
    let f64s: Vec<u8> = (0..32).flat_map(|i| (i as f64).to_le_bytes()).collect();
    safetensors_file(&weights, &[("w_enc_fd", Dtype::F64, vec![8, 4], f64s)]);
    expect(&[WEIGHTS_FILE, "F64", "F32 [8, 4]"]);
    // A tensor missing.
    safetensors_file(
        &weights,
        &[("w_enc_fd", Dtype::F32, vec![8, 4], vec![0; 128])],
    );
    expect(&[WEIGHTS_FILE, "no tensor \"b_enc_f\""]);
    fs::write(&weights, &good[..good.len() - 3]).unwrap();
    expect(&[WEIGHTS_FILE, "not a readable safetensors file"]);
    fs::write(&weights, b"").unwrap();
    expect(&[WEIGHTS_FILE]);
    fs::remove_file(&weights).unwrap();
    expect(&[WEIGHTS_FILE, "missing"]);
    fs::write(&weights, &good).unwrap();
    assert_eq!(Sae::load(&dir).unwrap(), sae);
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_checkpoint_halfway_resumes_to_the_bits_of_the_uninterrupted_run() {
    let dir = temp_dir("io-checkpoint");
    for arch in ARCHS {
        // A wide dictionary with a small k, so some latents stay silent for several batches
        // and whether they count as dead depends on the counters carried over.
        let arch = match arch {
            Architecture::Relu { .. } | Architecture::JumpRelu => arch,
            Architecture::TopK { .. } => Architecture::TopK { k: 2 },
            Architecture::BatchTopK { .. } => Architecture::BatchTopK { k: 2 },
            Architecture::Matryoshka { .. } => Architecture::Matryoshka { k: 2 },
        };
        let config = SaeConfig {
            d_model: 8,
            dict_size: 128,
            arch,
        };
        let fresh = || Trainer::new(Sae::new(config, 3).unwrap(), recipe()).unwrap();
        let mut straight = fresh();
        run(&mut straight, 0..12);

        let mut first = fresh();
        run(&mut first, 0..6);
        let ckpt = dir.join(format!("{arch:?}"));
        let extra = json!({ "next_batch": 6, "train": recipe() });
        Checkpoint {
            state: first.state(),
            extra: extra.clone(),
        }
        .save(&ckpt)
        .unwrap();
        drop(first);

        let loaded = Checkpoint::load(&ckpt).unwrap();
        assert_eq!(loaded.extra, extra);
        let config: TrainConfig = serde_json::from_value(loaded.extra["train"].clone()).unwrap();
        let next = loaded.extra["next_batch"].as_u64().unwrap();
        let mut resumed = Trainer::from_state(loaded.state.clone(), config).unwrap();
        run(&mut resumed, next..12);
        assert_state_bits(&resumed.state(), &straight.state(), &format!("{arch:?}"));

        // The state that matters did move: TopK latents died (AuxK ran), BatchTopK learned θ,
        // and a resume that forgot Adam's moments ends elsewhere.
        let state = straight.state();
        if arch.k().is_some() {
            assert!(
                state.tokens_since_fired_f.iter().any(|&t| t >= 96),
                "{arch:?}: no latent died, so AuxK never ran"
            );
        }
        assert_eq!(
            state.sae.threshold().is_some(),
            matches!(
                arch,
                Architecture::BatchTopK { .. } | Architecture::Matryoshka { .. }
            )
        );
        let mut forgetful_state = loaded.state;
        let shape = *forgetful_state.sae.config();
        forgetful_state.adam_m = ParamTensors::zeros_for(&shape);
        let mut forgetful = Trainer::from_state(forgetful_state, recipe()).unwrap();
        run(&mut forgetful, 6..12);
        assert_ne!(bits(forgetful.sae().w_dec_fd()), bits(state.sae.w_dec_fd()));
    }
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_checkpoint_is_replaced_whole_and_survives_a_crash_between_its_renames() {
    let dir = temp_dir("io-checkpoint-swap");
    let ckpt = dir.join("checkpoint");
    let mut trainer = Trainer::new(
        Sae::new(sae_config(Architecture::TopK { k: 4 }, 8, 32), 0).unwrap(),
        recipe(),
    )
    .unwrap();
    let save = |trainer: &Trainer| {
        Checkpoint {
            state: trainer.state(),
            extra: json!(null),
        }
        .save(&ckpt)
        .unwrap()
    };
    save(&trainer);
    run(&mut trainer, 0..2);
    save(&trainer);
    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["checkpoint"], "no .new or .old left behind");
    assert_eq!(Checkpoint::load(&ckpt).unwrap().state.step, 2);
    let json = json(&ckpt.join(CHECKPOINT_CONFIG_FILE));
    assert_eq!(
        (json["step"].as_u64(), json["adam_t"].as_u64()),
        (Some(2), Some(2))
    );

    // A crash after `checkpoint` became `checkpoint.old` but before `checkpoint.new` took its
    // place: the old one is loaded, and the next save cleans up.
    fs::rename(&ckpt, dir.join("checkpoint.old")).unwrap();
    assert_eq!(Checkpoint::load(&ckpt).unwrap().state.step, 2);
    run(&mut trainer, 2..3);
    save(&trainer);
    assert!(!dir.join("checkpoint.old").exists());
    assert_eq!(Checkpoint::load(&ckpt).unwrap().state.step, 3);

    // A directory holding anything else is not replaced.
    let busy = dir.join("busy");
    fs::create_dir_all(&busy).unwrap();
    fs::write(busy.join("notes.txt"), "mine").unwrap();
    let err = Checkpoint {
        state: trainer.state(),
        extra: json!(null),
    }
    .save(&busy)
    .unwrap_err();
    assert!(err.to_string().contains("notes.txt"), "{err}");
    assert!(busy.join("notes.txt").exists());
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_bad_checkpoint_is_refused_naming_the_file() {
    let dir = temp_dir("io-checkpoint-bad");
    let err = Checkpoint::load(&dir.join("none")).unwrap_err();
    assert!(
        err.to_string().contains("not a checkpoint directory"),
        "{err}"
    );

    let mut trainer = Trainer::new(
        Sae::new(sae_config(Architecture::BatchTopK { k: 4 }, 8, 32), 0).unwrap(),
        recipe(),
    )
    .unwrap();
    let (a, b) = (dir.join("a"), dir.join("b"));
    let save = |trainer: &Trainer, to: &Path| {
        Checkpoint {
            state: trainer.state(),
            extra: json!({}),
        }
        .save(to)
        .unwrap()
    };
    save(&trainer, &a);
    run(&mut trainer, 0..4);
    save(&trainer, &b);
    let b_json = b.join(CHECKPOINT_CONFIG_FILE);
    let good = fs::read_to_string(&b_json).unwrap();

    // Files of two checkpoints mixed by hand.
    fs::copy(a.join(CHECKPOINT_CONFIG_FILE), &b_json).unwrap();
    let err = Checkpoint::load(&b).unwrap_err().to_string();
    assert!(
        err.contains(CHECKPOINT_WEIGHTS_FILE) && err.contains("different checkpoints"),
        "{err}"
    );
    fs::write(
        &b_json,
        good.replace("\"dict_size\": 32", "\"dict_size\": 33"),
    )
    .unwrap();
    let err = Checkpoint::load(&b).unwrap_err().to_string();
    assert!(
        err.contains(CHECKPOINT_WEIGHTS_FILE) && err.contains("[33, 8]"),
        "{err}"
    );
    fs::write(&b_json, "[").unwrap();
    let err = Checkpoint::load(&b).unwrap_err().to_string();
    assert!(
        err.contains(CHECKPOINT_CONFIG_FILE) && err.contains("malformed"),
        "{err}"
    );
    fs::write(&b_json, &good).unwrap();
    fs::remove_file(b.join(CHECKPOINT_WEIGHTS_FILE)).unwrap();
    let err = Checkpoint::load(&b).unwrap_err().to_string();
    assert!(
        err.contains(CHECKPOINT_WEIGHTS_FILE) && err.contains("missing"),
        "{err}"
    );

    // A state that does not fit its SAE, or a recipe that does not fit the SAE, is refused.
    let mut state = trainer.state();
    state.tokens_since_fired_f.pop();
    let err = Trainer::from_state(state.clone(), recipe()).err().unwrap();
    assert!(matches!(err, Error::Shape { .. }), "{err}");
    let err = Checkpoint {
        state,
        extra: json!({}),
    }
    .save(&dir.join("c"))
    .unwrap_err();
    assert!(matches!(err, Error::Shape { .. }), "{err}");
    let short = TrainConfig {
        total_steps: 2,
        ..recipe()
    };
    assert!(matches!(
        Trainer::from_state(trainer.state(), short),
        Err(Error::Config(_))
    ));
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn npy_arrays_read_back_with_npyz() {
    let dir = temp_dir("io-npy");
    write_npy(
        &dir.join("f.npy"),
        &[2, 3],
        &[1.5f32, -0.0, 3.0, 4.0, 5.0, 6.0],
    )
    .unwrap();
    assert_eq!(
        read_npy::<f32>(&dir.join("f.npy")),
        (vec![2, 3], vec![1.5, -0.0, 3.0, 4.0, 5.0, 6.0])
    );
    write_npy(&dir.join("u.npy"), &[3], &[7u32, 0, u32::MAX]).unwrap();
    assert_eq!(
        read_npy::<u32>(&dir.join("u.npy")),
        (vec![3], vec![7, 0, u32::MAX])
    );
    write_npy(&dir.join("q.npy"), &[1, 1, 2], &[u64::MAX, 1u64]).unwrap();
    assert_eq!(
        read_npy::<u64>(&dir.join("q.npy")),
        (vec![1, 1, 2], vec![u64::MAX, 1])
    );
    let err = write_npy(&dir.join("bad.npy"), &[2, 2], &[0f32; 3]).unwrap_err();
    assert!(matches!(err, Error::Shape { .. }), "{err}");
    assert!(!dir.join("bad.npy").exists());

    // Batch by batch: the leading axis is whatever was appended.
    let path = dir.join("rows.npy");
    let mut rows = NpyAppender::<f32>::create(&path, &[3]).unwrap();
    rows.append(&[1.0, 2.0, 3.0]).unwrap();
    rows.append(&[]).unwrap();
    rows.append(&[4.0, 5.0, 6.0, 7.0, 8.0, 9.0]).unwrap();
    let err = rows.append(&[1.0]).unwrap_err();
    assert!(matches!(err, Error::Shape { .. }), "{err}");
    assert!(!path.exists(), "the file appears only when finished");
    assert_eq!(rows.finish().unwrap(), 3);
    let (shape, values) = read_npy::<f32>(&path);
    assert_eq!(shape, [3, 3]);
    assert_eq!(values, (1..=9).map(|v| v as f32).collect::<Vec<_>>());
    // numpy aligns the data to 64 bytes; so does the appender.
    let bytes = fs::read(&path).unwrap();
    assert_eq!(
        (10 + u16::from_le_bytes([bytes[8], bytes[9]]) as usize) % 64,
        0
    );

    let path = dir.join("ptr.npy");
    let mut ptr = NpyAppender::<i64>::create(&path, &[]).unwrap();
    ptr.append(&[0, 5]).unwrap();
    ptr.append(&[9]).unwrap();
    ptr.finish().unwrap();
    assert_eq!(read_npy::<i64>(&path), (vec![3], vec![0, 5, 9]));
    let empty = dir.join("empty.npy");
    NpyAppender::<u32>::create(&empty, &[4])
        .unwrap()
        .finish()
        .unwrap();
    assert_eq!(read_npy::<u32>(&empty), (vec![0, 4], vec![]));

    // Dropped before finishing: no file, no temporary left.
    let mut dropped = NpyAppender::<f32>::create(&dir.join("dropped.npy"), &[2]).unwrap();
    dropped.append(&[1.0, 2.0]).unwrap();
    drop(dropped);
    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "empty.npy",
            "f.npy",
            "ptr.npy",
            "q.npy",
            "rows.npy",
            "u.npy"
        ]
    );
    assert!(NpyAppender::<f32>::create(&dir.join("z.npy"), &[0]).is_err());
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn codes_written_batch_by_batch_read_back_as_the_codes() {
    let dir = temp_dir("io-codes");
    for (arch, layout) in [
        (Architecture::RELU, CodesLayout::Csr),
        (Architecture::TopK { k: 4 }, CodesLayout::TopK { k: 4 }),
    ] {
        let sae = random_sae(arch, 8, 32, 5);
        let batches: Vec<Array2<f32>> = (0..3)
            .map(|s| synthetic_batch(7 + s, 8, s as u64))
            .collect();
        let n: usize = batches.iter().map(|b| b.nrows()).sum();
        let out = dir.join(format!("{arch:?}"));
        fs::create_dir_all(&out).unwrap();
        let mut writer = CodesWriter::new(&out, layout, 32, n as u64).unwrap();
        let mut expected = Vec::new();
        for x in &batches {
            let codes = sae.encode(&Cpu, x.view()).unwrap();
            writer.push(&codes).unwrap();
            expected.extend(codes.to_dense().rows().into_iter().map(|r| r.to_vec()));
        }
        writer.finish().unwrap();
        let (idx_shape, indices) = read_npy::<u32>(&out.join("indices.npy"));
        let (_, values) = read_npy::<f32>(&out.join("values.npy"));
        let mut dense = vec![vec![0.0f32; 32]; n];
        match layout {
            CodesLayout::TopK { k } => {
                assert_eq!(idx_shape, [n as u64, k as u64]);
                for (e, (&j, &v)) in indices.iter().zip(&values).enumerate() {
                    dense[e / k][j as usize] += v;
                }
            }
            CodesLayout::Csr => {
                let (shape, indptr) = read_npy::<i64>(&out.join("indptr.npy"));
                assert_eq!(shape, [n as u64 + 1]);
                assert_eq!(indptr.last().map(|&p| p as usize), Some(indices.len()));
                for (b, row) in dense.iter_mut().enumerate() {
                    for e in indptr[b] as usize..indptr[b + 1] as usize {
                        row[indices[e] as usize] = values[e];
                    }
                }
            }
        }
        assert_eq!(dense, expected, "{arch:?}");
        let manifest = json(&out.join("codes.json"));
        assert_eq!(manifest["n_rows"], n);
        assert_eq!(manifest["n_latents"], 32);
    }
    // Replacing the CSR codes above with TopK ones: until the new set is finished no
    // codes.json vouches for the files, a short set is refused, and the finished set leaves
    // no indptr.npy of the old one behind.
    let out = dir.join(format!("{:?}", Architecture::RELU));
    let sae = random_sae(Architecture::TopK { k: 4 }, 8, 32, 5);
    let codes = sae.encode(&Cpu, synthetic_batch(5, 8, 0).view()).unwrap();
    let mut writer = CodesWriter::new(&out, CodesLayout::TopK { k: 4 }, 32, 6).unwrap();
    assert!(!out.join("codes.json").exists());
    writer.push(&codes).unwrap();
    let err = writer.finish().unwrap_err();
    assert!(matches!(err, Error::Shape { .. }), "{err}");
    assert!(!out.join("codes.json").exists());
    let mut writer = CodesWriter::new(&out, CodesLayout::TopK { k: 4 }, 32, 5).unwrap();
    writer.push(&codes).unwrap();
    writer.finish().unwrap();
    assert!(!out.join("indptr.npy").exists());
    assert_eq!(json(&out.join("codes.json"))["n_rows"], 5);
    assert_eq!(read_npy::<u32>(&out.join("indices.npy")).0, [5, 4]);

    // Codes of another dictionary are refused.
    let out = dir.join("mismatch");
    fs::create_dir_all(&out).unwrap();
    let mut writer = CodesWriter::new(&out, CodesLayout::Csr, 16, 1).unwrap();
    let codes = random_sae(Architecture::RELU, 8, 32, 5)
        .encode(&Cpu, synthetic_batch(1, 8, 0).view())
        .unwrap();
    assert!(matches!(writer.push(&codes), Err(Error::Shape { .. })));
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn exports_hold_the_tensors_and_config_the_python_libraries_read() {
    let dir = temp_dir("io-export");
    let meta = ExportMetadata {
        model_name: Some("gpt2".into()),
        hook_name: Some("blocks.6.hook_resid_post".into()),
    };
    let mut trainer = Trainer::new(
        Sae::new(sae_config(Architecture::BatchTopK { k: 4 }, 8, 32), 0).unwrap(),
        recipe(),
    )
    .unwrap();
    run(&mut trainer, 0..4);
    let batchtopk = trainer.into_sae();
    let theta = batchtopk.threshold().unwrap();
    let mut trainer = Trainer::new(
        Sae::new(sae_config(Architecture::JumpRelu, 8, 32), 0).unwrap(),
        recipe(),
    )
    .unwrap();
    run(&mut trainer, 0..4);
    let jumprelu = trainer.into_sae();
    for sae in [
        random_sae(Architecture::RELU, 8, 32, 1),
        random_sae(Architecture::TopK { k: 4 }, 8, 32, 1),
        batchtopk,
        jumprelu,
    ] {
        let arch = sae.config().arch;
        let out = dir.join(format!("{arch:?}-saelens"));
        export_saelens(&sae, &out, &meta).unwrap();
        let cfg = json(&out.join("cfg.json"));
        let expected = match arch {
            Architecture::Relu { .. } => "standard",
            Architecture::TopK { .. } => "topk",
            Architecture::BatchTopK { .. }
            | Architecture::JumpRelu
            | Architecture::Matryoshka { .. } => "jumprelu",
        };
        assert_eq!(cfg["architecture"], expected);
        assert_eq!(
            (cfg["d_in"].as_u64(), cfg["d_sae"].as_u64()),
            (Some(8), Some(32))
        );
        assert_eq!(cfg["dtype"], "float32");
        // JumpReLU encodes x itself.
        assert_eq!(cfg["apply_b_dec_to_input"], arch != Architecture::JumpRelu);
        assert_eq!(cfg["normalize_activations"], "none");
        // Without a version >= 6 here SAELens reads the pre-6 layout and drops the metadata.
        assert!(cfg["metadata"]["sae_lens_version"]
            .as_str()
            .unwrap()
            .starts_with('6'));
        assert_eq!(cfg["metadata"]["model_name"], "gpt2");
        assert_eq!(cfg["metadata"]["hook_name"], "blocks.6.hook_resid_post");
        assert_eq!(
            cfg["k"].as_u64(),
            arch.k().filter(|_| expected == "topk").map(|k| k as u64)
        );
        let weights = out.join("sae_weights.safetensors");
        let (shape, w_enc) = tensor(&weights, "W_enc");
        assert_eq!(shape, [8, 32]);
        assert_eq!(bits(&w_enc), bits(sae.w_enc_fd().t().iter()));
        let (shape, w_dec) = tensor(&weights, "W_dec");
        assert_eq!(shape, [32, 8]);
        assert_eq!(bits(&w_dec), bits(sae.w_dec_fd()));
        assert_eq!(bits(&tensor(&weights, "b_enc").1), bits(sae.b_enc_f()));
        assert_eq!(bits(&tensor(&weights, "b_dec").1), bits(sae.b_dec_d()));
        let bytes = fs::read(&weights).unwrap();
        let names = SafeTensors::deserialize(&bytes).unwrap().names().len();
        if expected == "jumprelu" {
            let (shape, threshold) = tensor(&weights, "threshold");
            assert_eq!(shape, [32]);
            if arch == Architecture::JumpRelu {
                assert_eq!(bits(&threshold), bits(sae.latent_thresholds()));
                // Trained: the thresholds moved apart from their common start.
                assert!(threshold.iter().any(|&t| t != threshold[0]));
            } else {
                assert!(threshold.iter().all(|t| t.to_bits() == theta.to_bits()));
            }
            assert_eq!(names, 5);
        } else {
            assert_eq!(names, 4, "SAELens loads its state dict strictly");
        }

        let out = dir.join(format!("{arch:?}-sparsify"));
        if arch.k().is_none() {
            let err = export_sparsify(&sae, &out).unwrap_err();
            assert!(err.to_string().contains("--format saelens"), "{err}");
            assert!(err.to_string().contains(arch.name().as_str()), "{err}");
            continue;
        }
        export_sparsify(&sae, &out).unwrap();
        let cfg = json(&out.join("cfg.json"));
        assert_eq!(
            (cfg["d_in"].as_u64(), cfg["num_latents"].as_u64()),
            (Some(8), Some(32))
        );
        assert_eq!(cfg["k"], 4);
        let weights = out.join("sae.safetensors");
        let (shape, w_enc) = tensor(&weights, "encoder.weight");
        assert_eq!(shape, [32, 8]);
        assert_eq!(bits(&w_enc), bits(sae.w_enc_fd()));
        assert_eq!(
            bits(&tensor(&weights, "encoder.bias").1),
            bits(sae.b_enc_f())
        );
        assert_eq!(bits(&tensor(&weights, "W_dec").1), bits(sae.w_dec_fd()));
        assert_eq!(bits(&tensor(&weights, "b_dec").1), bits(sae.b_dec_d()));
    }
    fs::remove_dir_all(dir).unwrap();
}

/// `Sae::load(dir)`, failing the test if it takes longer than `secs` (a hang or a read of a
/// huge file) rather than waiting for it.
fn load_within(dir: &Path, secs: u64) -> Result<Sae, Error> {
    let (tx, rx) = std::sync::mpsc::channel();
    let dir = dir.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(Sae::load(&dir));
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("Sae::load took more than {secs} s"))
}

/// Asserts that loading `dir` fails within a second with one line naming every needle, and
/// no control character from the files.
#[track_caller]
fn refused(dir: &Path, needles: &[&str]) {
    let started = std::time::Instant::now();
    let err = load_within(dir, 5).unwrap_err();
    let elapsed = started.elapsed();
    let msg = err.to_string();
    assert!(elapsed.as_secs_f64() < 1.0, "{elapsed:?}: {msg}");
    assert_eq!(msg.lines().count(), 1, "{msg}");
    assert!(!msg.chars().any(|c| c.is_control()), "{msg:?}");
    for needle in needles {
        assert!(msg.contains(needle), "{needle:?} not in: {msg}");
    }
}

/// A safetensors file of `header` (JSON) whose data is `data_len` bytes of zeros, written as a
/// hole: `set_len` allocates nothing, so a file of terabytes costs nothing on disk.
fn sparse_safetensors(path: &Path, header: &str, data_len: u64) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    fs::write(path, &bytes).unwrap();
    let file = fs::OpenOptions::new().write(true).open(path).unwrap();
    file.set_len(bytes.len() as u64 + data_len).unwrap();
}

/// The header of an SAE file with tensors of `f` latents of width `d`, in the safetensors
/// layout (`extra` entries first).
fn sae_header(f: u64, d: u64, extra: &str) -> (String, u64) {
    let mut offset = 0;
    let mut entries = vec![];
    for (name, shape) in [
        ("w_enc_fd", vec![f, d]),
        ("b_enc_f", vec![f]),
        ("w_dec_fd", vec![f, d]),
        ("b_dec_d", vec![d]),
    ] {
        let len = 4 * shape.iter().product::<u64>();
        entries.push(format!(
            "\"{name}\":{{\"dtype\":\"F32\",\"shape\":{shape:?},\"data_offsets\":[{offset},{}]}}",
            offset + len
        ));
        offset += len;
    }
    (format!("{{{extra}{}}}", entries.join(",")), offset)
}

#[test]
fn a_sparse_huge_weights_file_is_refused_at_once_naming_the_file_and_tensor() {
    let dir = temp_dir("io-sparse-sae");
    let sae = random_sae(Architecture::TopK { k: 2 }, 4, 8, 0);
    sae.save(&dir).unwrap();
    let weights = dir.join(WEIGHTS_FILE);
    // A valid small file made 3 GiB long: the header accounts for 304 bytes of it.
    let file = fs::OpenOptions::new().write(true).open(&weights).unwrap();
    file.set_len(3 << 30).unwrap();
    drop(file);
    refused(
        &dir,
        &[WEIGHTS_FILE, "bytes no tensor owns", "save the SAE again"],
    );

    // A header claiming 4 GiB tensors, the file as long as they need.
    let (header, len) = sae_header(1 << 28, 4, "");
    sparse_safetensors(&weights, &header, len);
    refused(
        &dir,
        &[WEIGHTS_FILE, "\"w_enc_fd\"", "[268435456, 4]", "[8, 4]"],
    );
    // ... or a file shorter than they need.
    sparse_safetensors(&weights, &header, 3 << 30);
    refused(&dir, &[WEIGHTS_FILE, "\"", "ends at byte", "cut short"]);

    // sae.json agreeing with a header of terabytes: refused before anything is allocated.
    let cfg = dir.join(CONFIG_FILE);
    let text = fs::read_to_string(&cfg).unwrap();
    let f = 1u64 << 38;
    fs::write(
        &cfg,
        text.replace("\"dict_size\": 8", &format!("\"dict_size\": {f}")),
    )
    .unwrap();
    let (header, len) = sae_header(f, 4, "");
    sparse_safetensors(&weights, &header, len);
    refused(
        &dir,
        &[WEIGHTS_FILE, "\"w_enc_fd\"", "needs 4398046511104 bytes"],
    );
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_sparse_checkpoint_file_is_refused_at_once_naming_it() {
    let dir = temp_dir("io-sparse-ckpt");
    let ckpt = dir.join("checkpoint");
    let trainer = Trainer::new(
        Sae::new(sae_config(Architecture::TopK { k: 4 }, 8, 32), 0).unwrap(),
        recipe(),
    )
    .unwrap();
    Checkpoint {
        state: trainer.state(),
        extra: json!({}),
    }
    .save(&ckpt)
    .unwrap();
    let weights = ckpt.join(CHECKPOINT_WEIGHTS_FILE);
    let file = fs::OpenOptions::new().write(true).open(&weights).unwrap();
    file.set_len(3 << 30).unwrap();
    drop(file);
    let started = std::time::Instant::now();
    let err = Checkpoint::load(&ckpt).unwrap_err().to_string();
    assert!(started.elapsed().as_secs_f64() < 1.0, "{err}");
    assert!(
        err.contains(CHECKPOINT_WEIGHTS_FILE) && err.contains("bytes no tensor owns"),
        "{err}"
    );
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn non_finite_weights_and_a_bad_theta_are_refused_naming_the_tensor_and_index() {
    let dir = temp_dir("io-nan-sae");
    let base = random_sae(Architecture::BatchTopK { k: 2 }, 4, 8, 0);
    let parts = || {
        (
            base.w_enc_fd().to_owned(),
            base.b_enc_f().to_owned(),
            base.w_dec_fd().to_owned(),
            base.b_dec_d().to_owned(),
        )
    };
    for (name, bad, index) in [
        ("w_enc_fd", f32::NAN, "[2, 1]"),
        ("b_enc_f", f32::INFINITY, "[5]"),
        ("w_dec_fd", f32::NEG_INFINITY, "[7, 3]"),
        ("b_dec_d", f32::NAN, "[0]"),
    ] {
        let (mut w_enc, mut b_enc, mut w_dec, mut b_dec) = parts();
        match name {
            "w_enc_fd" => w_enc[[2, 1]] = bad,
            "b_enc_f" => b_enc[5] = bad,
            "w_dec_fd" => w_dec[[7, 3]] = bad,
            _ => b_dec[0] = bad,
        }
        Sae::from_parts(*base.config(), w_enc, b_enc, w_dec, b_dec)
            .unwrap()
            .save(&dir)
            .unwrap();
        let value = bad.to_string();
        refused(&dir, &[WEIGHTS_FILE, &format!("{name:?}"), &value, index]);
    }

    // θ in the tensor: NaN or negative.
    let (w_enc, b_enc, w_dec, b_dec) = parts();
    let le = |a: &[f32]| -> Vec<u8> { a.iter().flat_map(|v| v.to_le_bytes()).collect() };
    for (theta, needle) in [(f32::NAN, "NaN at index []"), (-1.0, "is -1")] {
        safetensors_file(
            &dir.join(WEIGHTS_FILE),
            &[
                (
                    "w_enc_fd",
                    Dtype::F32,
                    vec![8, 4],
                    le(w_enc.as_slice().unwrap()),
                ),
                (
                    "b_enc_f",
                    Dtype::F32,
                    vec![8],
                    le(b_enc.as_slice().unwrap()),
                ),
                (
                    "w_dec_fd",
                    Dtype::F32,
                    vec![8, 4],
                    le(w_dec.as_slice().unwrap()),
                ),
                (
                    "b_dec_d",
                    Dtype::F32,
                    vec![4],
                    le(b_dec.as_slice().unwrap()),
                ),
                ("threshold", Dtype::F32, vec![], le(&[theta])),
            ],
        );
        refused(&dir, &[WEIGHTS_FILE, "\"threshold\"", needle]);
    }
    // θ in sae.json (files without the tensor): negative, or too large for float32.
    base.save(&dir).unwrap();
    let cfg = dir.join(CONFIG_FILE);
    let text = fs::read_to_string(&cfg).unwrap();
    for (theta, needle) in [("-0.5", "threshold is -0.5"), ("1e39", "threshold is inf")] {
        fs::write(
            &cfg,
            text.replace("\"threshold\": null", &format!("\"threshold\": {theta}")),
        )
        .unwrap();
        refused(&dir, &[CONFIG_FILE, needle]);
    }
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn hostile_sae_files_are_refused_in_one_line_without_echoing_control_characters() {
    let dir = temp_dir("io-hostile-sae");
    let sae = random_sae(Architecture::TopK { k: 2 }, 4, 8, 0);
    sae.save(&dir).unwrap();
    let cfg = dir.join(CONFIG_FILE);
    let text = fs::read_to_string(&cfg).unwrap();
    let weights = dir.join(WEIGHTS_FILE);
    let good = fs::read(&weights).unwrap();

    // sae.json: shapes and architectures no SAE has.
    for (from, to, needle) in [
        (
            "\"d_model\": 4",
            "\"d_model\": 0",
            "d_model must be at least 1",
        ),
        (
            "\"k\": 2",
            "\"k\": 9",
            "k (9) must not exceed dict_size (8)",
        ),
        ("\"topk\"", "\"gated\"", "unknown variant"),
        ("\"topk\"", "\"\\u001b[2J\"", "\\u{1b}[2J"),
        (
            "\"dict_size\": 8",
            "\"dict_size\": 4611686018427387904",
            "dict_size is too large",
        ),
    ] {
        fs::write(&cfg, text.replace(from, to)).unwrap();
        refused(&dir, &[needle]);
    }
    fs::write(&cfg, &text).unwrap();

    // sae.safetensors: a dtype that is a terminal escape, a tensor twice, one too many, a
    // header longer than the file, none at all.
    let (header, len) = sae_header(8, 4, "");
    let esc = header.replacen("\"F32\"", "\"\\u001b[2J\"", 1);
    sparse_safetensors(&weights, &esc, len);
    refused(&dir, &[WEIGHTS_FILE, "\\u{1b}[2J"]);
    let twice = sae_header(
        8,
        4,
        "\"b_dec_d\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},",
    )
    .0;
    sparse_safetensors(&weights, &twice, len);
    refused(&dir, &[WEIGHTS_FILE, "names \"b_dec_d\" twice"]);
    let extra = header.replace(
        "}}",
        &format!("}},\"\\u001b]0;x\\u0007\":{{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[{len},{}]}}}}", len + 4),
    );
    sparse_safetensors(&weights, &extra, len + 4);
    refused(
        &dir,
        &[WEIGHTS_FILE, "holds a tensor \"\\u{1b}]0;x\\u{7}\""],
    );
    let mut long = (1u64 << 40).to_le_bytes().to_vec();
    long.extend(b"{}");
    fs::write(&weights, long).unwrap();
    refused(&dir, &[WEIGHTS_FILE, "header claims 1099511627776 bytes"]);
    fs::write(&weights, b"").unwrap();
    refused(&dir, &[WEIGHTS_FILE, "too short"]);
    fs::write(&weights, &good).unwrap();

    // A sae.json of gigabytes (sparse) is not read whole.
    let file = fs::OpenOptions::new().write(true).open(&cfg).unwrap();
    file.set_len(3 << 30).unwrap();
    drop(file);
    refused(&dir, &[CONFIG_FILE, "3221225472 bytes"]);
    fs::write(&cfg, &text).unwrap();

    // A FIFO in place of either file is refused, not opened (opening one blocks).
    for path in [&cfg, &weights] {
        fs::remove_file(path).unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .unwrap();
        assert!(made.success());
        refused(&dir, &[&path.display().to_string(), "not a regular file"]);
        fs::remove_file(path).unwrap();
        fs::write(&cfg, &text).unwrap();
        fs::write(&weights, &good).unwrap();
    }
    assert_eq!(Sae::load(&dir).unwrap(), sae);
    fs::remove_dir_all(dir).unwrap();
}
