//! Training: the [`Trainer`] owns an SAE, its Adam state, the dead-latent counters and the
//! step's workspaces, and runs one step as encode → select → decode → loss → backward →
//! update.

mod backward;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
mod shard;
mod state;

use std::time::{Duration, Instant};

use ndarray::{Array2, ArrayView2, Axis, Zip};
use rayon::prelude::*;

use crate::arch::{DecoderConstraint, Penalty, Rules, Selection};
use crate::backend::{sparse, Backend, Cpu, Device};
use crate::config::TrainConfig;
use crate::dist::{Collective, SingleProcess};
use crate::error::Result;
use crate::optim::{lr_factor, sparsity_scale, sq, Adam, AdamConfig, Grads, ParamTensors, RowPrep};
use crate::sae::{geometric_median, resize, Sae};
use crate::select::{select_into, Codes, Selector};
use shard::{Gathered, Shard};

pub use crate::config::MAX_STEPS;
pub use backward::dense_threshold_default;
pub use state::TrainerState;

/// What one step measured. Losses are means over the batch's rows.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepStats {
    /// The optimised loss: `mse + penalty`.
    pub loss: f32,
    /// mean_b ‖x − x̂‖².
    pub mse: f32,
    /// The architecture's extra term as added to the loss: α·AuxK, or λ·s(t)·L1.
    pub penalty: f32,
    /// The unweighted extra term: the normalised AuxK loss, or mean_b Σ_j f_bj·n_j.
    pub aux: f32,
    /// Fraction of variance explained, 1 − mse / mean_b ‖x − x̄‖²; NaN when the batch has no
    /// variance (a single row, or identical rows).
    pub fve: f32,
    /// Mean active latents per row.
    pub l0: f32,
    /// Fraction of latents dead (no firing for `dead_tokens` tokens) after this step.
    pub dead_fraction: f32,
    /// Learning rate used by this step.
    pub lr: f32,
    /// BatchTopK's threshold θ after this step.
    pub threshold: Option<f32>,
}

/// Wall-clock time of each phase of the last step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PhaseTimes {
    /// x − b_dec, the encoder GEMM, bias and ReLU.
    pub encode: Duration,
    /// Sparsification (top-k, batch top-k or ReLU codes).
    pub select: Duration,
    /// Dead-latent and θ bookkeeping, decoding, the losses and their upstream gradients
    /// (AuxK's selection and decoding included).
    pub decode_loss: Duration,
    /// The backward pass to all four parameter gradients.
    pub backward: Duration,
    /// Projection, clipping and the fused Adam step.
    pub update: Duration,
}

/// Dense copies of a step's internals, recorded when [`Trainer::set_capture`] is on (tests and
/// debugging; costs B×F memory).
#[derive(Clone, Debug)]
pub struct Captured {
    /// Parameters the gradients were taken at (after b_dec's initialisation).
    pub params: ParamTensors,
    /// The code f, B×F.
    pub codes_bf: Array2<f32>,
    /// AuxK's codes among dead latents, B×F (zeros when none are dead).
    pub aux_codes_bf: Array2<f32>,
    /// The reconstruction, B×D.
    pub x_hat_bd: Array2<f32>,
    /// ∂loss/∂parameters straight from the backward pass.
    pub raw_grads: ParamTensors,
    /// The gradients Adam steps with: projected and clipped as the architecture asks.
    pub update_grads: ParamTensors,
}

/// Step-sized buffers, reused across steps (reallocated only when the batch size changes).
#[derive(Default)]
struct Workspace {
    xc_bd: Array2<f32>,
    /// The encoder GEMM's output xc·W_encᵀ, B×F (readers add b_enc); on the dense ReLU path it
    /// is turned into the codes ReLU(pre) in place.
    pre_bf: Array2<f32>,
    codes: Codes,
    aux_codes: Codes,
    selector: Selector,
    /// Rows 0..B: ∂L/∂x̂; rows B..2B: ∂L/∂ê (AuxK's reconstruction of the residual).
    upstream_bd: Array2<f32>,
    x_hat_bd: Array2<f32>,
    aux_hat_bd: Array2<f32>,
    scratch: backward::Scratch,
    /// Every process's rows, for the backward pass of a distributed step.
    gathered: Gathered,
    /// Dense ReLU path only: ∂L/∂pre, B×F.
    g_pre_bf: Array2<f32>,
    fired_f: Vec<u64>,
    dead_f: Vec<u32>,
}

/// Trains one SAE. Same seed, data and thread count give bit-identical parameters.
///
/// The batch-level state (BatchTopK's global selection, the dead-latent counters, the
/// gradients, b_dec's initialisation) goes through a [`Collective`], the single seam for
/// data-parallel training across processes.
pub struct Trainer {
    sae: Sae,
    config: TrainConfig,
    rules: Rules,
    lr: f32,
    adam: Adam,
    step: u64,
    tokens_since_fired_f: Vec<u64>,
    grads: Grads,
    backend: Box<dyn Backend>,
    collective: Box<dyn Collective>,
    ws: Workspace,
    dense_threshold: f32,
    capture: Option<Captured>,
    capture_on: bool,
    times: PhaseTimes,
    /// The GPU holding the state, when the trainer runs on one.
    #[cfg(feature = "cuda")]
    gpu: Option<Box<cuda::DeviceStep>>,
    /// Whether the host copies (SAE, moments, counters) lag behind the GPU's.
    host_stale: bool,
    /// On a GPU: wait for the device at each phase boundary, so phase times are real.
    time_device_phases: bool,
    /// Across processes: each updates only its own latents' moments, so the others' rows of
    /// `adam` are stale until [`Trainer::sync`] gathers them.
    moments_partial: bool,
}

impl Trainer {
    /// A trainer on the CPU backend in a single process.
    pub fn new(sae: Sae, config: TrainConfig) -> Result<Self> {
        Self::with_parts(sae, config, Box::new(Cpu), Box::new(SingleProcess))
    }

    /// A trainer on a given backend and collective.
    pub fn with_parts(
        sae: Sae,
        config: TrainConfig,
        backend: Box<dyn Backend>,
        collective: Box<dyn Collective>,
    ) -> Result<Self> {
        config.validate(sae.config())?;
        let mut sae = sae;
        for w in [&mut sae.w_enc_fd, &mut sae.w_dec_fd] {
            *w = crate::backend::huge_copy(w.view());
        }
        let (f, d) = (sae.config().dict_size, sae.config().d_model);
        let adam = Adam::new(
            AdamConfig {
                beta1: config.adam_beta1,
                beta2: config.adam_beta2,
                eps: config.adam_eps,
            },
            f,
            d,
        );
        Ok(Trainer {
            rules: Rules::for_config(sae.config(), &config),
            lr: config.learning_rate(sae.config()),
            sae,
            config,
            adam,
            step: 0,
            tokens_since_fired_f: vec![0; f],
            grads: Grads::zeros(f, d),
            backend,
            collective,
            ws: Workspace::default(),
            dense_threshold: dense_threshold_default(),
            capture: None,
            capture_on: false,
            times: PhaseTimes::default(),
            #[cfg(feature = "cuda")]
            gpu: None,
            host_stale: false,
            time_device_phases: false,
            moments_partial: false,
        })
    }

    /// Shares each global batch with the processes of `collective` from the next step on
    /// (see [`Trainer::with_parts`]): a trainer restored from a checkpoint joins a
    /// distributed run this way. Fails on a GPU, where training runs in one process only.
    pub fn set_collective(&mut self, collective: Box<dyn Collective>) -> Result<()> {
        #[cfg(feature = "cuda")]
        if self.gpu.is_some() && collective.world_size() > 1 {
            return Err(crate::Error::Device {
                device: self.device_name(),
                reason: "training across processes runs on the CPU only; drop --device or run \
                         a single process"
                    .into(),
            });
        }
        self.collective = collective;
        Ok(())
    }

    /// The trainer moved to `device`; see [`Trainer::set_device`].
    pub fn to_device(mut self, device: Device) -> Result<Trainer> {
        self.set_device(device)?;
        Ok(self)
    }

    /// Moves the trainer to `device`: on a GPU, parameters, moments, counters and every step
    /// buffer then live in GPU memory and steps run there; back on the CPU, they are copied
    /// home first. Fails with [`crate::Error::Device`] when the device cannot run here (a
    /// build without `cuda`, no driver, library or GPU), and on a GPU when training runs
    /// across processes; the trainer is then left where it was.
    pub fn set_device(&mut self, device: Device) -> Result<()> {
        self.sync()?;
        match device {
            Device::Cpu => {
                #[cfg(feature = "cuda")]
                {
                    self.gpu = None;
                }
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(gpu) => {
                if self.collective.world_size() > 1 {
                    return Err(crate::Error::Device {
                        device: device.to_string(),
                        reason: "training across processes runs on the CPU only; drop --device \
                                 or run a single process"
                            .into(),
                    });
                }
                self.gpu = Some(Box::new(cuda::DeviceStep::new(self, gpu)?));
                Ok(())
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => device.check().map(drop),
        }
    }

    /// Where the steps run: `"cpu"` or the GPU's name.
    pub fn device_name(&self) -> String {
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.gpu {
            return gpu.device_name();
        }
        "cpu".to_string()
    }

    /// On a GPU, copies the parameters, Adam's moments and the dead-latent counters back into
    /// the host copies that [`Trainer::sae`], [`Trainer::adam`], [`Trainer::tokens_since_fired`],
    /// [`Trainer::state`] and [`Trainer::into_sae`] return; until then those show the state
    /// as of the last sync. Across processes, gathers the Adam moments that each process
    /// updated for its own latents, so that every process holds them all: a collective call,
    /// which every process must make at the same point. A no-op on the CPU in one process, or
    /// when nothing changed since the last sync.
    pub fn sync(&mut self) -> Result<()> {
        if self.moments_partial {
            let c = &*self.collective;
            let shard = Shard::for_latents(c, self.sae.config.dict_size);
            for m in [&mut self.adam.m, &mut self.adam.v] {
                shard.gather_latents(c, &mut m.w_enc_fd, &mut m.w_dec_fd, &mut m.b_enc_f);
            }
            self.moments_partial = false;
        }
        #[cfg(feature = "cuda")]
        if self.host_stale {
            if let Some(gpu) = self.gpu.take() {
                let done = gpu.download_into(self);
                self.gpu = Some(gpu);
                done?;
            }
        }
        self.host_stale = false;
        Ok(())
    }

    /// The SAE being trained (on a GPU, as of the last [`Trainer::sync`]).
    pub fn sae(&self) -> &Sae {
        &self.sae
    }
    /// Ends training, returning the SAE (on a GPU, as of the last [`Trainer::sync`]).
    pub fn into_sae(self) -> Sae {
        self.sae
    }
    /// Adam's state (on a GPU, or across processes where each steps only its own latents, as
    /// of the last [`Trainer::sync`]).
    pub fn adam(&self) -> &Adam {
        &self.adam
    }
    /// Steps taken so far.
    pub fn steps_done(&self) -> u64 {
        self.step
    }
    /// Tokens since each latent last fired (on a GPU, as of the last [`Trainer::sync`]).
    pub fn tokens_since_fired(&self) -> &[u64] {
        &self.tokens_since_fired_f
    }
    /// The training recipe.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// ReLU only: code density (active / (B·F)) above which a step uses dense GEMMs for the
    /// decoder and backward instead of the sparse kernels. Both give the same result up to
    /// float rounding; the crossover is a speed matter (default [`dense_threshold_default`]).
    pub fn set_dense_threshold(&mut self, density: f32) {
        self.dense_threshold = density;
    }

    /// Records dense copies of each step's internals, readable with [`Trainer::captured`].
    /// Across processes, capture sums the gradients instead of gathering the batch (so that
    /// every process holds them all): every process must set it alike.
    pub fn set_capture(&mut self, on: bool) {
        self.capture_on = on;
        if !on {
            self.capture = None;
        }
    }

    /// On a GPU, steps are queued whole and [`Trainer::phase_times`] reads zero unless this is
    /// on: the host then waits for the device at each phase boundary, which costs a few
    /// launches' latency per step. No effect on the CPU, whose phases are always timed.
    pub fn set_device_phase_timing(&mut self, on: bool) {
        self.time_device_phases = on;
    }

    /// How long each phase of the last step took.
    pub fn phase_times(&self) -> PhaseTimes {
        self.times
    }

    /// The last step's internals, when capture is on.
    pub fn captured(&self) -> Option<&Captured> {
        self.capture.as_ref()
    }

    /// One training step on the batch `x_bd` (B rows of width D).
    pub fn step(&mut self, x_bd: ArrayView2<'_, f32>) -> Result<StepStats> {
        self.sae.check_batch(x_bd)?;
        #[cfg(feature = "cuda")]
        if self.gpu.is_some() {
            return self.step_on_device(x_bd);
        }
        // The row kernels slice rows: a strided or transposed view is copied once here.
        let x_bd = x_bd.as_standard_layout();
        let x_bd = x_bd.view();
        let rules = self.rules;
        if self.step == 0 && rules.init_b_dec_from_median {
            self.sae.b_dec_d = geometric_median(x_bd, &*self.collective, 100, 1e-5);
        }
        let n_local = x_bd.nrows();
        let shard = Shard::new(&*self.collective, n_local, self.sae.config.dict_size);
        let n_global = shard.n_global();
        let distributed = self.collective.world_size() > 1;

        // Encode.
        let mut clock = Instant::now();
        let mut lap = || {
            let now = Instant::now();
            std::mem::replace(&mut clock, now).elapsed()
        };
        let mut times = PhaseTimes::default();
        let ws = &mut self.ws;
        self.sae
            .pre_activations_into(&*self.backend, x_bd, &mut ws.xc_bd, &mut ws.pre_bf);
        times.encode = lap();
        // Every process takes the same path, chosen on the global batch's density.
        let dense = rules.selection == Selection::Relu && {
            let pre = self.sae.pre_acts(&ws.pre_bf);
            let mut counts = [
                pre.positive_count() as u64,
                (n_local * pre.n_latents()) as u64,
            ];
            self.collective.all_reduce_sum_u64(&mut counts);
            counts[0] as f32 / counts[1].max(1) as f32 > self.dense_threshold
        };
        if dense {
            // The dense path multiplies the codes matrix itself: make it ReLU(pre).
            let b_enc = &self.sae.b_enc_f;
            Zip::from(ws.pre_bf.rows_mut()).par_for_each(|mut row| {
                Zip::from(&mut row)
                    .and(b_enc)
                    .for_each(|v, &b| *v = (*v + b).max(0.0))
            });
        } else {
            select_into(
                &mut ws.selector,
                rules.selection,
                self.sae.pre_acts(&ws.pre_bf),
                &*self.collective,
                &mut ws.codes,
            );
        }

        times.select = lap();

        // Batch-level bookkeeping: who fired, who is dead, θ.
        ws.fired_f.clear();
        ws.fired_f.resize(self.sae.config.dict_size, 0);
        if dense {
            let counts = backward::column_sums_by(ws.pre_bf.view(), |v| (v > 0.0) as u8 as f32);
            for (fired, c) in ws.fired_f.iter_mut().zip(counts) {
                *fired = c as u64;
            }
        } else {
            for &j in &ws.codes.indices {
                ws.fired_f[j as usize] += 1;
            }
        }
        let nnz_local: u64 = if dense {
            ws.fired_f.iter().sum()
        } else {
            ws.codes.nnz() as u64
        };
        self.collective.all_reduce_sum_u64(&mut ws.fired_f);
        for (since, &fired) in self.tokens_since_fired_f.iter_mut().zip(&ws.fired_f) {
            *since = if fired > 0 {
                0
            } else {
                // Saturating: a counter only needs to say "more than dead_tokens".
                since.saturating_add(n_global as u64)
            };
        }
        if rules.learn_threshold && self.step > self.config.threshold_start_step {
            let mut min = [ws
                .codes
                .values
                .iter()
                .copied()
                .fold(f32::INFINITY, f32::min)];
            self.collective.all_reduce_min_f32(&mut min);
            let beta = self.config.threshold_beta;
            self.sae.threshold = Some(threshold_ema(beta, self.sae.threshold, min[0]));
        }

        // Decode, reconstruction loss and its upstream gradient ∂L/∂x̂ = −2e/B.
        let d = self.sae.config.d_model;
        resize(&mut ws.upstream_bd, (2 * n_local, d));
        resize(&mut ws.x_hat_bd, (n_local, d));
        if dense {
            ws.x_hat_bd.assign(&self.sae.b_dec_d);
            self.backend.gemm(
                1.0,
                ws.pre_bf.view(),
                self.sae.w_dec_fd.view(),
                1.0,
                ws.x_hat_bd.view_mut(),
            );
        } else {
            sparse::decode_into(
                &ws.codes,
                self.sae.w_dec_fd.view(),
                Some(self.sae.b_dec_d.view()),
                ws.x_hat_bd.view_mut(),
            );
        }
        let scale = -2.0 / n_global as f32;
        let (mut up_main, mut up_aux) = ws.upstream_bd.view_mut().split_at(Axis(0), n_local);
        Zip::from(&mut up_main)
            .and(&x_bd)
            .and(&ws.x_hat_bd)
            .par_for_each(|u, &x, &xh| *u = scale * (x - xh));
        // Residuals e = x − x̂ are −u·B/2; the batch sums below use e directly.
        let mut sums = [
            row_sq_sum(x_bd, &ws.x_hat_bd, None),
            total_variance_times_n(x_bd, &*self.collective),
        ];
        self.collective.all_reduce_sum_f64(&mut sums[..1]);
        let mse = sums[0] / n_global as f64;
        // Undefined, not −∞, for a batch without variance (one row, or identical rows).
        let fve = if sums[1] > 0.0 {
            1.0 - sums[0] / sums[1]
        } else {
            f64::NAN
        };

        // The architecture's penalty.
        let mut aux = 0.0f64;
        let mut penalty = 0.0f64;
        let mut l1_coef = 0.0f32;
        let mut aux_active = false;
        match rules.penalty {
            Penalty::L1 {
                coefficient,
                warmup_steps,
                ..
            } => {
                l1_coef = coefficient * sparsity_scale(self.step, warmup_steps);
                up_aux.fill(0.0);
            }
            Penalty::AuxK { alpha, dead_tokens } => {
                ws.dead_f.clear();
                ws.dead_f.extend(
                    self.tokens_since_fired_f
                        .iter()
                        .enumerate()
                        .filter(|(_, &t)| t >= dead_tokens)
                        .map(|(j, _)| j as u32),
                );
                if ws.dead_f.is_empty() {
                    up_aux.fill(0.0);
                } else {
                    let k_aux = (d / 2).min(ws.dead_f.len());
                    let pre = self.sae.pre_acts(&ws.pre_bf);
                    ws.selector
                        .topk_among(pre, &ws.dead_f, k_aux, &mut ws.aux_codes);
                    resize(&mut ws.aux_hat_bd, (n_local, d));
                    sparse::decode_into(
                        &ws.aux_codes,
                        self.sae.w_dec_fd.view(),
                        None,
                        ws.aux_hat_bd.view_mut(),
                    );
                    // e − ê, and e − mean_b(e), with e = x − x̂ held constant.
                    let mut e_sum = residual_sum(x_bd, &ws.x_hat_bd);
                    self.collective.all_reduce_sum_f64(&mut e_sum);
                    let e_mean: Vec<f64> = e_sum.iter().map(|s| s / n_global as f64).collect();
                    let mut parts = [
                        aux_sq_sum(x_bd, &ws.x_hat_bd, &ws.aux_hat_bd),
                        row_sq_sum(x_bd, &ws.x_hat_bd, Some(&e_mean)),
                    ];
                    self.collective.all_reduce_sum_f64(&mut parts);
                    if let Some((value, g)) = auxk_terms(parts, n_global, alpha) {
                        aux = value;
                        penalty = alpha as f64 * value;
                        aux_active = true;
                        Zip::from(&mut up_aux)
                            .and(&x_bd)
                            .and(&ws.x_hat_bd)
                            .and(&ws.aux_hat_bd)
                            .par_for_each(|u, &x, &xh, &ah| *u = g * ((x - xh) - ah));
                    } else {
                        up_aux.fill(0.0);
                    }
                }
            }
        }
        if !aux_active {
            ws.aux_codes = Codes::empty(self.sae.config.dict_size);
            ws.aux_codes.indptr.resize(n_local + 1, 0);
        }

        times.decode_loss = lap();

        // Backward. Unless the raw gradients are wanted (capture), the update's per-row work
        // is done by the backward pass itself. Across processes, the sparse path gathers every
        // process's rows and takes the whole batch's gradients of this process's latents (see
        // `shard`); the others sum the gradients of each process's rows.
        let prep = RowPrep {
            project_eps: match rules.decoder {
                DecoderConstraint::UnitNorm { project_eps, .. } => Some(project_eps),
                DecoderConstraint::Free => None,
            },
            want_norm: rules.max_grad_norm.is_some(),
        };
        let fuse = !dense && !self.capture_on;
        let gather = fuse && distributed;
        let ctx = backward::Context {
            fused_prep: fuse.then_some(prep),
            sae: &self.sae,
            n_global,
            l1_coef,
            weight_by_decoder_norm: matches!(
                rules.penalty,
                Penalty::L1 {
                    weight_by_decoder_norm: true,
                    ..
                }
            ),
            latents: if gather {
                shard.latents()
            } else {
                0..self.sae.config.dict_size
            },
            collective: &*self.collective,
        };
        let l1 = if dense {
            backward::dense_relu(&ctx, &*self.backend, ws, &mut self.grads)
        } else {
            let batch = if gather {
                ws.gathered.gather(
                    &*self.collective,
                    &shard,
                    ws.xc_bd.view(),
                    ws.upstream_bd.view(),
                    aux_active,
                    &ws.codes,
                    &ws.aux_codes,
                );
                let g = &ws.gathered;
                backward::Batch::of(g.xc_bd.view(), g.upstream_bd.view(), &g.codes, &g.aux_codes)
            } else {
                backward::Batch::of(
                    ws.xc_bd.view(),
                    ws.upstream_bd.view(),
                    &ws.codes,
                    &ws.aux_codes,
                )
            };
            backward::sparse(&ctx, batch, &mut ws.scratch, &mut self.grads)
        };
        if let Penalty::L1 { .. } = rules.penalty {
            let mut l1_sum = [l1];
            if !gather {
                self.collective.all_reduce_sum_f64(&mut l1_sum);
            }
            aux = l1_sum[0] / n_global as f64;
            penalty = l1_coef as f64 * aux;
        }
        if distributed && !gather {
            all_reduce_grads(&mut self.grads, &*self.collective);
        }
        let raw_grads = self.capture_on.then(|| self.grads.to_dense());

        times.backward = lap();

        // Update. Across processes each steps its own latents, then gathers the others'.
        let own = shard.latents();
        let norm = if gather {
            // Rows and b_enc entries are each held by one process; b_dec by all.
            let rows = &self.ws.scratch.row_sq_f[own.clone()];
            let b_enc = &self.grads.tensors.b_enc_f.as_slice().expect("contiguous")[own.clone()];
            let mut parts = [rows.iter().sum::<f64>() + sq(b_enc)];
            if prep.want_norm {
                self.collective.all_reduce_sum_f64(&mut parts);
            }
            (parts[0] + sq(self.grads.tensors.b_dec_d.as_slice().expect("contiguous"))).sqrt()
        } else if fuse {
            self.grads.global_norm(&self.ws.scratch.row_sq_f)
        } else {
            self.grads.project_and_norm(&self.sae.w_dec_fd, prep)
        };
        let grad_scale = clip_factor(rules.max_grad_norm, norm);
        if let Some(raw_grads) = raw_grads {
            let mut update_grads = self.grads.to_dense();
            update_grads.scale(grad_scale);
            let ws = &self.ws;
            self.capture = Some(Captured {
                params: ParamTensors {
                    w_enc_fd: self.sae.w_enc_fd.clone(),
                    b_enc_f: self.sae.b_enc_f.clone(),
                    w_dec_fd: self.sae.w_dec_fd.clone(),
                    b_dec_d: self.sae.b_dec_d.clone(),
                },
                codes_bf: if dense {
                    ws.pre_bf.clone()
                } else {
                    ws.codes.to_dense()
                },
                aux_codes_bf: ws.aux_codes.to_dense(),
                x_hat_bd: ws.x_hat_bd.clone(),
                raw_grads,
                update_grads,
            });
        }
        let lr = self.current_lr();
        self.adam.step_latents(
            self.sae.params_mut(),
            &self.grads,
            lr,
            grad_scale,
            rules.decoder,
            own,
        );
        if distributed {
            let sae = &mut self.sae;
            shard.gather_latents(
                &*self.collective,
                &mut sae.w_enc_fd,
                &mut sae.w_dec_fd,
                &mut sae.b_enc_f,
            );
            self.moments_partial = true;
        }
        self.step += 1;
        times.update = lap();
        self.times = times;

        let mut nnz = [nnz_local];
        self.collective.all_reduce_sum_u64(&mut nnz);
        let n_dead = match rules.penalty {
            Penalty::AuxK { .. } => self.ws.dead_f.len(),
            Penalty::L1 { .. } => self
                .tokens_since_fired_f
                .iter()
                .filter(|&&t| t >= self.config.dead_tokens)
                .count(),
        };
        Ok(StepStats {
            loss: (mse + penalty) as f32,
            mse: mse as f32,
            penalty: penalty as f32,
            aux: aux as f32,
            fve: fve as f32,
            l0: nnz[0] as f32 / n_global as f32,
            dead_fraction: n_dead as f32 / self.sae.config.dict_size as f32,
            lr: lr as f32,
            threshold: self.sae.threshold,
        })
    }
}

impl Trainer {
    /// The learning rate of the step about to be taken.
    fn current_lr(&self) -> f64 {
        self.lr as f64
            * lr_factor(
                self.step,
                self.config.warmup_steps,
                self.config.decay_start,
                self.config.total_steps,
            )
    }
}

/// BatchTopK's θ after a step whose smallest kept code is `min` (+∞ when none was kept): an
/// EMA with weight `beta` on the old θ, started at the first minimum.
fn threshold_ema(beta: f64, theta: Option<f32>, min: f32) -> f32 {
    // The reference counts an empty selection as a minimum of 0.
    let m = if min.is_finite() { min } else { 0.0 };
    // f32 arithmetic with β and 1 − β rounded from f64, as torch does with Python floats.
    match theta {
        None => m,
        Some(theta) => beta as f32 * theta + (1.0 - beta) as f32 * m,
    }
}

/// torch's clip_grad_norm_: the factor max/(‖g‖ + 1e-6) when that is below 1, else 1.
fn clip_factor(max_grad_norm: Option<f32>, norm: f64) -> f32 {
    match max_grad_norm {
        Some(max) => (max as f64 / (norm + 1e-6)).min(1.0) as f32,
        None => 1.0,
    }
}

/// AuxK from the batch sums `[Σ‖(e − ê)‖², Σ‖e − mean_b(e)‖²]` over `n` rows: its value
/// (normalised by the residual's variance) and the factor g of its gradient
/// ∂(α·AuxK)/∂ê = g·(e − ê), g = −2α/(n·variance). `None` when the value is not finite (a
/// residual without variance), which the reference then leaves out.
fn auxk_terms(sums: [f64; 2], n: usize, alpha: f32) -> Option<(f64, f32)> {
    let denom = sums[1] / n as f64;
    let value = (sums[0] / n as f64) / denom;
    value
        .is_finite()
        .then(|| (value, (-2.0 * alpha as f64 / (n as f64 * denom)) as f32))
}

/// Σ_b ‖(x_b − x̂_b) − c‖² in f64 (c = 0 when `None`), summed row by row in a fixed order.
fn row_sq_sum(x_bd: ArrayView2<'_, f32>, x_hat_bd: &Array2<f32>, c: Option<&[f64]>) -> f64 {
    Zip::from(x_bd.rows())
        .and(x_hat_bd.rows())
        .par_map_collect(|x, xh| {
            let (x, xh) = (x.to_slice().unwrap(), xh.to_slice().unwrap());
            lanes_sum(x.len(), |i| {
                let e = (x[i] - xh[i]) as f64 - c.map_or(0.0, |c| c[i]);
                e * e
            })
        })
        .sum()
}

/// Σ_b ‖(x_b − x̂_b) − ê_b‖² in f64 (e − ê formed in f32 as the reference does).
fn aux_sq_sum(x_bd: ArrayView2<'_, f32>, x_hat_bd: &Array2<f32>, aux_hat_bd: &Array2<f32>) -> f64 {
    Zip::from(x_bd.rows())
        .and(x_hat_bd.rows())
        .and(aux_hat_bd.rows())
        .par_map_collect(|x, xh, ah| {
            let (x, xh, ah) = (
                x.to_slice().unwrap(),
                xh.to_slice().unwrap(),
                ah.to_slice().unwrap(),
            );
            lanes_sum(x.len(), |i| {
                let r = ((x[i] - xh[i]) - ah[i]) as f64;
                r * r
            })
        })
        .sum()
}

/// Σ_{i < n} term(i) in f64 with 8 independent partial sums: a long row reduces at the speed
/// of the adds, not of one chain of dependent additions. Deterministic for a given n.
#[inline]
fn lanes_sum(n: usize, term: impl Fn(usize) -> f64) -> f64 {
    let mut acc = [0.0f64; 8];
    let main = n - n % 8;
    for i in (0..main).step_by(8) {
        for (l, a) in acc.iter_mut().enumerate() {
            *a += term(i + l);
        }
    }
    let tail: f64 = (main..n).map(&term).sum();
    acc.iter().sum::<f64>() + tail
}

/// Σ_b (x_b − x̂_b) per column, in f64.
fn residual_sum(x_bd: ArrayView2<'_, f32>, x_hat_bd: &Array2<f32>) -> Vec<f64> {
    sum_over_rows(x_bd.nrows(), x_bd.ncols(), |b, acc| {
        for ((a, &x), &xh) in acc.iter_mut().zip(x_bd.row(b)).zip(x_hat_bd.row(b)) {
            *a += (x - xh) as f64;
        }
    })
}

/// Σ_b ‖x_b − x̄‖² over the global batch (x̄ its mean), for the FVE.
fn total_variance_times_n(x_bd: ArrayView2<'_, f32>, collective: &dyn Collective) -> f64 {
    let d = x_bd.ncols();
    let mut sum = sum_over_rows(x_bd.nrows(), d, |b, acc| {
        for (a, &x) in acc.iter_mut().zip(x_bd.row(b)) {
            *a += x as f64;
        }
    });
    sum.push(x_bd.nrows() as f64);
    collective.all_reduce_sum_f64(&mut sum);
    let n = sum[d];
    let mean: Vec<f64> = sum[..d].iter().map(|s| s / n).collect();
    let mut total = [x_bd
        .axis_iter(Axis(0))
        .into_par_iter()
        .map(|row| {
            let row = row.to_slice().unwrap();
            lanes_sum(row.len(), |i| (row[i] as f64 - mean[i]).powi(2))
        })
        .collect::<Vec<f64>>()
        .iter()
        .sum::<f64>()];
    collective.all_reduce_sum_f64(&mut total);
    total[0]
}

/// Σ over rows b < `n_rows` of what `add_row(b, acc)` adds into a `width`-vector: fixed
/// chunks of rows in parallel, their partial sums added in order (deterministic).
fn sum_over_rows<T>(n_rows: usize, width: usize, add_row: impl Fn(usize, &mut [T]) + Sync) -> Vec<T>
where
    T: Copy + Default + std::ops::AddAssign + Send,
{
    const ROWS: usize = 64;
    let partials: Vec<Vec<T>> = (0..n_rows.div_ceil(ROWS))
        .into_par_iter()
        .map(|c| {
            let mut acc = vec![T::default(); width];
            for b in c * ROWS..((c + 1) * ROWS).min(n_rows) {
                add_row(b, &mut acc);
            }
            acc
        })
        .collect();
    let mut total = vec![T::default(); width];
    for p in partials {
        total.iter_mut().zip(p).for_each(|(t, v)| *t += v);
    }
    total
}

/// Sums every process's gradients (inactive rows zeroed first, then all rows active).
fn all_reduce_grads(grads: &mut Grads, collective: &dyn Collective) {
    let dense = grads.to_dense();
    grads.tensors = dense;
    let t = &mut grads.tensors;
    for a in [&mut t.w_enc_fd, &mut t.w_dec_fd] {
        collective.all_reduce_sum_f32(a.as_slice_mut().expect("standard layout"));
    }
    for a in [&mut t.b_enc_f, &mut t.b_dec_d] {
        collective.all_reduce_sum_f32(a.as_slice_mut().expect("standard layout"));
    }
    grads.active_f.fill(true);
}
