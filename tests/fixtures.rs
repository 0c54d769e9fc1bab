//! Agreement with the PyTorch reference (dictionary_learning 0.1.0's trainers), through the
//! fixtures that `fixtures/generate.py` wrote: every intermediate of one step, and the state
//! after 25 steps with warm-up, decay, AuxK and θ all active.
//!
//! Relative error = max |ours − reference| / max |reference| per array: ≤ 1e-5 for one-step
//! quantities, ≤ 1e-4 after 25 steps.

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};

use common::assert_close;
use ndarray::{Array1, Array2, ArrayD, Axis, Ix1, Ix2};
use serde_json::Value;
use sparse_autoencoder::backend::Cpu;
use sparse_autoencoder::ParamTensors;
use sparse_autoencoder::{Architecture, ReluVariant, Sae, SaeConfig, TrainConfig, Trainer};

const ONE_STEP: f64 = 1e-5;
const MANY_STEPS: f64 = 1e-4;

struct Case {
    dir: PathBuf,
    config: Value,
}

impl Case {
    fn open(name: &str) -> Case {
        // Read at run time first: a test binary built here and run from a copy of the
        // repository elsewhere (scripts/gpu-tests.sh) finds the fixtures of that copy.
        let root = std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string());
        let dir = Path::new(&root).join("fixtures").join(name);
        let text = std::fs::read_to_string(dir.join("config.json"))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        Case {
            config: serde_json::from_str(&text).unwrap(),
            dir,
        }
    }

    fn array(&self, name: &str) -> ArrayD<f32> {
        let path = self.dir.join(format!("{name}.npy"));
        let file = File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let npy = npyz::NpyFile::new(std::io::BufReader::new(file)).unwrap();
        let shape: Vec<usize> = npy.shape().iter().map(|&n| n as usize).collect();
        ArrayD::from_shape_vec(shape, npy.into_vec::<f32>().unwrap()).unwrap()
    }

    fn matrix(&self, name: &str) -> Array2<f32> {
        self.array(name).into_dimensionality::<Ix2>().unwrap()
    }

    fn vector(&self, name: &str) -> Array1<f32> {
        self.array(name).into_dimensionality::<Ix1>().unwrap()
    }

    fn scalar(&self, name: &str) -> f32 {
        self.array(name).iter().copied().next().unwrap()
    }

    fn params(&self, prefix: &str) -> ParamTensors {
        // JumpReLU's thresholds are a fifth parameter.
        let jump = self.arch() == Architecture::JumpRelu;
        ParamTensors {
            w_enc_fd: self.matrix(&format!("{prefix}w_enc")),
            b_enc_f: self.vector(&format!("{prefix}b_enc")),
            w_dec_fd: self.matrix(&format!("{prefix}w_dec")),
            b_dec_d: self.vector(&format!("{prefix}b_dec")),
            threshold_f: if jump {
                self.vector(&format!("{prefix}threshold"))
            } else {
                Array1::zeros(0)
            },
        }
    }

    fn usize(&self, key: &str) -> usize {
        self.config[key].as_u64().unwrap_or_else(|| panic!("{key}")) as usize
    }

    fn f32_or(&self, key: &str, default: f32) -> f32 {
        self.config[key].as_f64().map_or(default, |v| v as f32)
    }

    fn u64_or(&self, key: &str, default: u64) -> u64 {
        self.config[key].as_u64().unwrap_or(default)
    }

    fn arch(&self) -> Architecture {
        match self.config["arch"].as_str().unwrap() {
            "relu" => Architecture::Relu {
                variant: match self.config["relu_variant"].as_str() {
                    Some("unit_decoder") => ReluVariant::UnitDecoder,
                    _ => ReluVariant::DecoderNorm,
                },
            },
            "topk" => Architecture::TopK { k: self.usize("k") },
            "batchtopk" => Architecture::BatchTopK { k: self.usize("k") },
            "jumprelu" => Architecture::JumpRelu,
            "matryoshka" => Architecture::Matryoshka { k: self.usize("k") },
            other => panic!("unknown arch {other}"),
        }
    }

    fn trainer(&self) -> Trainer {
        let defaults = TrainConfig::default();
        let config = TrainConfig {
            total_steps: self.usize("total_steps") as u64,
            lr: Some(self.f32_or("lr", f32::NAN)),
            warmup_steps: self.u64_or("warmup_steps", 0),
            decay_start: self.config["decay_start"].as_u64(),
            sparsity_warmup_steps: self.u64_or("sparsity_warmup_steps", 0),
            l1_coefficient: self.f32_or("l1", defaults.l1_coefficient),
            auxk_alpha: self.f32_or("auxk_alpha", defaults.auxk_alpha),
            dead_tokens: self.u64_or("dead_tokens", defaults.dead_tokens),
            threshold_start_step: self.u64_or("threshold_start_step", 0),
            threshold_beta: self.config["threshold_beta"]
                .as_f64()
                .unwrap_or(defaults.threshold_beta),
            jumprelu_bandwidth: self.f32_or("bandwidth", defaults.jumprelu_bandwidth),
            l0_coefficient: self.f32_or("l0_coefficient", defaults.l0_coefficient),
            target_l0: self.f32_or("target_l0", defaults.target_l0),
            group_sizes: self.config["group_sizes"]
                .as_array()
                .map_or(vec![], |sizes| {
                    sizes.iter().map(|v| v.as_u64().unwrap() as usize).collect()
                }),
            ..defaults
        };
        let sae_config = SaeConfig {
            d_model: self.usize("d"),
            dict_size: self.usize("f"),
            arch: self.arch(),
        };
        let init = self.params("init_");
        let mut sae = Sae::from_parts(
            sae_config,
            init.w_enc_fd,
            init.b_enc_f,
            init.w_dec_fd,
            init.b_dec_d,
        )
        .unwrap();
        if sae_config.arch == Architecture::JumpRelu {
            sae.set_latent_thresholds(init.threshold_f).unwrap();
        }
        common::on_test_device(Trainer::new(sae, config).unwrap())
    }

    fn batch(&self, step: usize) -> Array2<f32> {
        self.array("x")
            .index_axis(Axis(0), step)
            .to_owned()
            .into_dimensionality::<Ix2>()
            .unwrap()
    }

    fn is_topk_family(&self) -> bool {
        matches!(
            self.arch(),
            Architecture::TopK { .. }
                | Architecture::BatchTopK { .. }
                | Architecture::Matryoshka { .. }
        )
    }
}

fn assert_params(what: &str, ours: &ParamTensors, reference: &ParamTensors, tol: f64) {
    assert_close(
        &format!("{what} W_enc"),
        &ours.w_enc_fd,
        &reference.w_enc_fd,
        tol,
    );
    assert_close(
        &format!("{what} b_enc"),
        &ours.b_enc_f,
        &reference.b_enc_f,
        tol,
    );
    assert_close(
        &format!("{what} W_dec"),
        &ours.w_dec_fd,
        &reference.w_dec_fd,
        tol,
    );
    assert_close(
        &format!("{what} b_dec"),
        &ours.b_dec_d,
        &reference.b_dec_d,
        tol,
    );
    assert_eq!(
        ours.threshold_f.len(),
        reference.threshold_f.len(),
        "{what} θ"
    );
    if !reference.threshold_f.is_empty() {
        assert_close(
            &format!("{what} θ"),
            &ours.threshold_f,
            &reference.threshold_f,
            tol,
        );
    }
}

fn sae_params(sae: &Sae) -> ParamTensors {
    ParamTensors {
        w_enc_fd: sae.w_enc_fd().to_owned(),
        b_enc_f: sae.b_enc_f().to_owned(),
        w_dec_fd: sae.w_dec_fd().to_owned(),
        b_dec_d: sae.b_dec_d().to_owned(),
        threshold_f: sae.latent_thresholds().to_owned(),
    }
}

#[track_caller]
fn assert_scalar(what: &str, ours: f32, reference: f32, tol: f64) {
    let err = (ours as f64 - reference as f64).abs() / (reference as f64).abs().max(1e-30);
    assert!(
        err <= tol,
        "{what}: {ours} vs reference {reference} (relative error {err:e})"
    );
}

fn one_step(name: &str) {
    let case = Case::open(name);
    let mut trainer = case.trainer();
    trainer.set_capture(true);
    let x = case.batch(0);
    let stats = trainer.step(x.view()).unwrap();
    trainer.sync().unwrap();
    let cap = trainer.captured().unwrap().clone();
    let one_step = common::device_tol(ONE_STEP);

    if case.is_topk_family() {
        assert_close(
            "geometric median b_dec",
            &cap.params.b_dec_d,
            &case.vector("geometric_median"),
            one_step,
        );
        assert_eq!(
            (stats.dead_fraction * case.usize("f") as f32).round(),
            case.scalar("n_dead"),
            "dead latents"
        );
        assert_scalar("AuxK", stats.aux, case.scalar("loss_aux"), one_step);
    } else if case.arch() == Architecture::JumpRelu {
        assert_scalar("L0", stats.l0, case.scalar("l0"), one_step);
    } else {
        assert_scalar("L1 term", stats.aux, case.scalar("loss_l1"), one_step);
    }
    let mut at_step = Sae::from_parts(
        *trainer.sae().config(),
        cap.params.w_enc_fd.clone(),
        cap.params.b_enc_f.clone(),
        cap.params.w_dec_fd.clone(),
        cap.params.b_dec_d.clone(),
    )
    .unwrap();
    if case.arch() == Architecture::JumpRelu {
        at_step
            .set_latent_thresholds(cap.params.threshold_f.clone())
            .unwrap();
    }
    let pre = at_step.pre_activations(&Cpu, x.view()).unwrap();
    assert_close("pre-activations", &pre, &case.matrix("pre"), one_step);
    assert_close("codes", &cap.codes_bf, &case.matrix("codes"), one_step);
    // Same support exactly: a selection difference would be a semantic bug, not rounding.
    assert_eq!(
        cap.codes_bf.mapv(|v| v != 0.0),
        case.matrix("codes").mapv(|v| v != 0.0),
        "active set"
    );
    assert_close("x_hat", &cap.x_hat_bd, &case.matrix("x_hat"), one_step);
    assert_scalar("MSE", stats.mse, case.scalar("loss_mse"), one_step);
    assert_scalar("loss", stats.loss, case.scalar("loss_total"), one_step);

    assert_params(
        "raw gradient",
        &cap.raw_grads,
        &case.params("grad_raw_"),
        one_step,
    );
    assert_params(
        "update gradient",
        &cap.update_grads,
        &case.params("grad_"),
        one_step,
    );
    assert_params(
        "parameters after 1 step",
        &sae_params(trainer.sae()),
        &case.params("step1_"),
        one_step,
    );
    assert_params(
        "Adam m after 1 step",
        &trainer.adam().m,
        &case.params("step1_m_"),
        one_step,
    );
    assert_params(
        "Adam v after 1 step",
        &trainer.adam().v,
        &case.params("step1_v_"),
        one_step,
    );
}

fn many_steps(name: &str) {
    let case = Case::open(name);
    let mut trainer = case.trainer();
    let n = case.array("x").shape()[0];
    let (mut losses, mut thresholds, mut dead) = (vec![], vec![], vec![]);
    for step in 0..n {
        let stats = trainer.step(case.batch(step).view()).unwrap();
        losses.push(stats.loss);
        thresholds.push(stats.threshold.unwrap_or(-1.0));
        dead.push((stats.dead_fraction * case.usize("f") as f32).round());
    }
    trainer.sync().unwrap();
    assert_close(
        "losses",
        &Array1::from(losses),
        &case.vector("losses"),
        MANY_STEPS,
    );
    if case.is_topk_family() {
        assert_eq!(
            Array1::from(dead),
            case.vector("n_dead_steps"),
            "dead latents per step"
        );
        let path = case.dir.join("tokens_since_fired.npy");
        let npy = npyz::NpyFile::new(std::io::BufReader::new(File::open(path).unwrap())).unwrap();
        let reference: Vec<u64> = npy
            .into_vec::<i64>()
            .unwrap()
            .iter()
            .map(|&t| t as u64)
            .collect();
        assert_eq!(
            trainer.tokens_since_fired(),
            &reference[..],
            "tokens since fired"
        );
    }
    if matches!(
        case.arch(),
        Architecture::BatchTopK { .. } | Architecture::Matryoshka { .. }
    ) {
        let reference = case.vector("threshold_steps");
        assert!(
            reference.iter().any(|&t| t > 0.0),
            "the fixture must exercise θ"
        );
        assert_close(
            "θ per step",
            &Array1::from(thresholds),
            &reference,
            MANY_STEPS,
        );
    }
    assert_params(
        "parameters after 25 steps",
        &sae_params(trainer.sae()),
        &case.params("final_"),
        MANY_STEPS,
    );
    assert_params(
        "Adam m after 25 steps",
        &trainer.adam().m,
        &case.params("final_m_"),
        MANY_STEPS,
    );
    assert_params(
        "Adam v after 25 steps",
        &trainer.adam().v,
        &case.params("final_v_"),
        MANY_STEPS,
    );
}

#[test]
fn relu_decoder_norm_one_step() {
    one_step("relu_decoder_norm_step1");
}

#[test]
fn relu_unit_decoder_one_step() {
    one_step("relu_unit_decoder_step1");
}

#[test]
fn topk_one_step() {
    one_step("topk_step1");
}

#[test]
fn batchtopk_one_step() {
    one_step("batchtopk_step1");
}

#[test]
fn relu_decoder_norm_25_steps() {
    many_steps("relu_decoder_norm_run25");
}

#[test]
fn relu_unit_decoder_25_steps() {
    many_steps("relu_unit_decoder_run25");
}

#[test]
fn topk_25_steps() {
    many_steps("topk_run25");
}

#[test]
fn batchtopk_25_steps() {
    many_steps("batchtopk_run25");
}

#[test]
fn matryoshka_one_step() {
    one_step("matryoshka_step1");
}

#[test]
fn matryoshka_25_steps() {
    many_steps("matryoshka_run25");
}

#[test]
fn jumprelu_one_step() {
    one_step("jumprelu_step1");
}

#[test]
fn jumprelu_25_steps() {
    let case = Case::open("jumprelu_run25");
    many_steps("jumprelu_run25");
    // The run moves every kind of θ: the fixture is only worth something if it does.
    let (init, last) = (
        case.vector("init_threshold"),
        case.vector("final_threshold"),
    );
    assert!(
        init.iter().zip(&last).filter(|(a, b)| a != b).count() > 100,
        "θ barely moved"
    );
}
