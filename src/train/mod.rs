//! Training: the [`Trainer`] owns an SAE, its Adam state and the dead-latent counters, and runs
//! one step as encode → select → decode → loss → backward → update. What a step does (the
//! architecture's rules, the schedules, θ, who is dead, clipping) is decided here, once; how
//! each phase runs is a backend's (a `Phases` implementation: the CPU's or a GPU's, in `phases.rs`).

mod backward;
mod cpu;
// The one place that picks the GPU step or its stand-in, whose constructor says how to build
// with CUDA.
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "cuda_stub.rs"]
mod cuda;
mod engine;
mod loss;
mod phases;
mod resample;
mod shard;
mod state;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ndarray::ArrayView2;

use crate::arch::{DecoderConstraint, Penalty, Prefix, Rules};
use crate::backend::{Backend, Cpu, Device};
use crate::config::{SaeConfig, TrainConfig};
use crate::dist::{Collective, SingleProcess};
use crate::error::{Error, Result};
use crate::optim::{lr_factor, sparsity_scale, Adam, AdamConfig, RowPrep};
use crate::sae::{geometric_median, Sae};
use cpu::CpuStep;
use cuda::CudaStep;
use engine::Engine;
use phases::{BackwardArgs, JumpArgs, Phases, State, Step};
use resample::{resample_dead, resample_due};
use shard::Shard;

pub use backward::dense_threshold_default;
pub use phases::Captured;
pub use state::TrainerState;

/// What one step measured. Losses are means over the batch's rows.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepStats {
    /// The optimised loss: `mse + penalty` (Matryoshka: its prefixes' weighted MSEs +
    /// penalty).
    pub loss: f32,
    /// mean_b ‖x − x̂‖².
    pub mse: f32,
    /// The architecture's extra term as added to the loss: α·AuxK, λ·s(t)·L1, or JumpReLU's
    /// c·s(t)·(L0/target − 1)².
    pub penalty: f32,
    /// The unweighted extra term: the normalised AuxK loss, mean_b Σ_j f_bj·n_j, or
    /// (L0/target − 1)².
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
    /// Dead latents resampled after this step ([`TrainConfig::resample_every`]).
    pub resampled: usize,
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

/// Trains one SAE. Same seed, data and thread count give bit-identical parameters.
///
/// The batch-level state (BatchTopK's global selection, the dead-latent counters, the
/// gradients, b_dec's initialisation) goes through a [`Collective`], the single seam for
/// data-parallel training across processes.
pub struct Trainer {
    /// The SAE, Adam and the counters (on a GPU, as of the last [`Trainer::sync`]).
    state: State,
    config: TrainConfig,
    rules: Rules,
    /// The reconstructions the loss weighs.
    prefixes: Vec<Prefix>,
    lr: f32,
    step: u64,
    /// The backend running the phases.
    engine: Engine,
    /// The CPU's GEMMs and dense-ReLU crossover, kept for a return from a GPU.
    gemm: Arc<dyn Backend>,
    dense_threshold: f32,
    collective: Box<dyn Collective>,
    capture: Option<Captured>,
    capture_on: bool,
    times: PhaseTimes,
    /// On a GPU: wait for the device at each phase boundary, so phase times are real.
    time_device_phases: bool,
    /// Latent sharding: the SAE held is this process's shard of a larger dictionary.
    sharding: Option<Sharding>,
}

/// What a trainer of one latent shard knows of the others (see [`Trainer::sharded`]).
struct Sharding {
    /// The whole dictionary's configuration.
    global: SaeConfig,
    /// This shard's first latent.
    offset: usize,
    /// The shards of this process's group (same rows, the other latents).
    latent: Arc<dyn Collective>,
    /// Every process of the job.
    world: Arc<dyn Collective>,
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
        let global = *sae.config();
        Self::build(sae, global, config, backend, collective, None)
    }

    /// A trainer of one latent shard of a dictionary configured by `global` (OpenAI's latent
    /// sharding): `shard` holds latents `part(F, grid.shard, grid.shards)` (as
    /// [`Sae::new_shard`] makes them), and the ranks of `grid` train the whole dictionary
    /// together, each group of `grid.shards` ranks on its own rows of every global batch. The
    /// step is the single-process step on the same global batch, up to float rounding: the
    /// selection is exactly that one process would make, x̂ and b_dec's gradient are summed
    /// over the group, the gradient norm is the whole dictionary's. Only batch-sized tensors
    /// cross within a group; across groups, each shard's ranks exchange as data parallelism
    /// does over F/S latents (the batch's rows and their updated rows, or, for JumpReLU,
    /// Matryoshka and ReLU's dense path, their gradients). Resampling is refused.
    pub fn sharded(
        shard: Sae,
        global: SaeConfig,
        config: TrainConfig,
        grid: &crate::dist::Grid,
    ) -> Result<Self> {
        config.validate(&global)?;
        let rows = crate::dist::part(global.dict_size, grid.shard, grid.shards);
        let local = shard.config();
        if local.d_model != global.d_model
            || local.arch != global.arch
            || local.dict_size != rows.len()
        {
            return Err(Error::Distributed {
                reason: format!(
                    "shard {} of {} holds {} latents of width {}, not latents {rows:?} of the \
                     {}-latent, width-{} dictionary",
                    grid.shard,
                    grid.shards,
                    local.dict_size,
                    local.d_model,
                    global.dict_size,
                    global.d_model
                ),
            });
        }
        if config.resample_every.is_some() && grid.shards > 1 {
            return Err(Error::Distributed {
                reason: "resampling dead latents (--resample) is not available with \
                     --latent-shards above 1; drop one of them"
                    .into(),
            });
        }
        let sharding = Sharding {
            global,
            offset: rows.start,
            latent: grid.latent.clone(),
            world: grid.world.clone(),
        };
        let data = Box::new(grid.data.clone());
        Self::build(shard, global, config, Box::new(Cpu), data, Some(sharding))
    }

    fn build(
        sae: Sae,
        global: SaeConfig,
        config: TrainConfig,
        backend: Box<dyn Backend>,
        collective: Box<dyn Collective>,
        sharding: Option<Sharding>,
    ) -> Result<Self> {
        config.validate(&global)?;
        let mut sae = sae;
        sae.set_precision(config.precision)?;
        for w in [&mut sae.w_enc_fd, &mut sae.w_dec_fd] {
            *w = crate::backend::huge_copy(w.view());
        }
        let sae_config = *sae.config();
        let f = sae_config.dict_size;
        let adam = Adam::new(
            AdamConfig {
                beta1: config.adam_beta1(&global),
                beta2: config.adam_beta2,
                eps: config.adam_eps,
            },
            sae.config(),
        );
        let gemm: Arc<dyn Backend> = Arc::from(backend);
        let dense_threshold = dense_threshold_default();
        // A shard's prefixes end where the whole dictionary's do, counted from its first latent.
        let offset = sharding.as_ref().map_or(0, |s| s.offset);
        let prefixes = config
            .prefixes(&global)?
            .into_iter()
            .map(|p| Prefix {
                end: p.end.clamp(offset, offset + f) - offset,
                weight: p.weight,
            })
            .collect();
        let engine = Engine::Cpu(Box::new(CpuStep::new(gemm.clone(), dense_threshold, &sae)));
        Ok(Trainer {
            rules: Rules::for_config(&global, &config),
            prefixes,
            lr: config.learning_rate(&global),
            state: State {
                sae,
                adam,
                tokens_since_fired_f: vec![0; f],
            },
            config,
            step: 0,
            engine,
            gemm,
            dense_threshold,
            collective,
            capture: None,
            capture_on: false,
            times: PhaseTimes::default(),
            time_device_phases: false,
            sharding,
        })
    }

    /// Shares each global batch with the processes of `collective` from the next step on
    /// (see [`Trainer::with_parts`]): a trainer restored from a checkpoint joins a
    /// distributed run this way. Fails on a GPU, where training runs in one process only.
    pub fn set_collective(&mut self, collective: Box<dyn Collective>) -> Result<()> {
        if self.engine.is_gpu() && collective.world_size() > 1 {
            return Err(one_process_on_gpu(self.device_name()));
        }
        if self.sharding.is_some() {
            return Err(Error::Distributed {
                reason: "a latent shard's trainer keeps the grid it was made with".into(),
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
        if self.sharding.is_some() && device != Device::Cpu {
            return Err(one_process_on_gpu(device.to_string()));
        }
        device.check_precision(self.state.sae.precision())?;
        self.engine = match device {
            Device::Cpu if !self.engine.is_gpu() => return Ok(()),
            Device::Cpu => Engine::Cpu(Box::new(CpuStep::new(
                self.gemm.clone(),
                self.dense_threshold,
                &self.state.sae,
            ))),
            Device::Cuda(_) if self.collective.world_size() > 1 => {
                return Err(one_process_on_gpu(device.to_string()))
            }
            Device::Cuda(_) if self.config.resample_every.is_some() => {
                return Err(Error::Device {
                    device: device.to_string(),
                    reason: "resampling dead latents (resample_every, --resample) runs on the \
                             CPU only until it is tested on a GPU; drop --resample or --device"
                        .into(),
                })
            }
            Device::Cuda(_) if !self.state.sae.config.arch.runs_on_gpu() => {
                return Err(self.state.sae.config.arch.not_on_gpu(device.to_string()))
            }
            Device::Cuda(gpu) => Engine::Cuda(Box::new(CudaStep::new(&self.state, gpu)?)),
        };
        Ok(())
    }

    /// Where the steps run: `"cpu"` or the GPU's name.
    pub fn device_name(&self) -> String {
        self.engine.device_name()
    }

    /// On a GPU, copies the parameters, Adam's moments and the dead-latent counters back into
    /// the host copies that [`Trainer::sae`], [`Trainer::adam`], [`Trainer::tokens_since_fired`],
    /// [`Trainer::state`] and [`Trainer::into_sae`] return; until then those show the state
    /// as of the last sync. Across processes, gathers the Adam moments that each process
    /// updated for its own latents, so that every process holds them all: a collective call,
    /// which every process must make at the same point. A no-op on the CPU in one process, or
    /// when nothing changed since the last sync.
    pub fn sync(&mut self) -> Result<()> {
        self.engine.read_back(&mut self.state, &*self.collective)
    }

    /// The SAE being trained (on a GPU, as of the last [`Trainer::sync`]).
    pub fn sae(&self) -> &Sae {
        &self.state.sae
    }

    /// The whole dictionary's configuration: the SAE's own, or, for a latent shard (see
    /// [`Trainer::sharded`]), that of the dictionary it is part of.
    pub fn global_config(&self) -> SaeConfig {
        self.sharding
            .as_ref()
            .map_or(*self.state.sae.config(), |s| s.global)
    }

    /// Ends training, returning the SAE (on a GPU, as of the last [`Trainer::sync`]).
    pub fn into_sae(self) -> Sae {
        self.state.sae
    }
    /// Adam's state (on a GPU, or across processes where each steps only its own latents, as
    /// of the last [`Trainer::sync`]).
    pub fn adam(&self) -> &Adam {
        &self.state.adam
    }
    /// Steps taken so far.
    pub fn steps_done(&self) -> u64 {
        self.step
    }
    /// Tokens since each latent last fired (on a GPU, as of the last [`Trainer::sync`]).
    pub fn tokens_since_fired(&self) -> &[u64] {
        &self.state.tokens_since_fired_f
    }
    /// The training recipe.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// ReLU on the CPU: code density (active / (B·F)) above which a step uses dense GEMMs for
    /// the decoder and backward instead of the sparse kernels. Both give the same result up to
    /// float rounding; the crossover is a speed matter (default 5%).
    pub fn set_dense_threshold(&mut self, density: f32) {
        self.dense_threshold = density;
        if let Engine::Cpu(cpu) = &mut self.engine {
            cpu.set_dense_threshold(density);
        }
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
        self.state.sae.check_batch(x_bd)?;
        // The row kernels slice rows: a strided or transposed view is copied once here.
        let x_bd = x_bd.as_standard_layout();
        let (rules, config, lr) = (self.rules, &self.config, self.current_lr());
        let (f_local, d) = (
            self.state.sae.config.dict_size,
            self.state.sae.config.d_model,
        );
        let (engine, state, collective) = (&mut self.engine, &mut self.state, &*self.collective);
        let (f, offset, latent, world): (_, _, &dyn Collective, &dyn Collective) =
            match &self.sharding {
                Some(s) => (s.global.dict_size, s.offset, &*s.latent, &*s.world),
                None => (f_local, 0, &SingleProcess, collective),
            };
        let prefixes = &self.prefixes;
        engine.begin(x_bd.nrows())?;
        if self.step == 0 && rules.init_b_dec_from_median {
            engine.set_b_dec(state, geometric_median(x_bd.view(), collective, 100, 1e-5))?;
        }
        let shard = Shard::new(collective, x_bd.nrows(), f_local);
        let n = shard.n_global();
        let step = Step {
            x_bd: x_bd.view(),
            shard: &shard,
            collective,
            latent,
            world,
            offset,
            prefixes,
        };
        let mut clock = PhaseClock::start(!engine.queues() || self.time_device_phases);
        let mut times = PhaseTimes::default();

        engine.encode(state, &step)?;
        times.encode = clock.lap(engine)?;
        engine.select(state, &step, rules.selection)?;
        times.select = clock.lap(engine)?;

        // Who fired, who is dead, θ.
        let learn_threshold = rules.learn_threshold && self.step > config.threshold_start_step;
        let firing = engine.mark_fired(state, &step, rules.dead_tokens, learn_threshold)?;
        if learn_threshold {
            let theta = state.sae.threshold;
            let new = threshold_ema(config.threshold_beta, theta, firing.min_code);
            state.sae.threshold = Some(new);
        }

        // Decode, and the penalty: λ·s(t) for ReLU's L1 term (whose sum comes with the
        // backward pass); AuxK's value and α·value once some latents are dead.
        engine.decode(state, &step)?;
        let (mut l1, mut auxk, mut aux_g, mut jump) = (None, None, None, None);
        match rules.penalty {
            Penalty::L1 {
                coefficient,
                weight_by_decoder_norm,
                warmup_steps,
            } => {
                let coef = coefficient * sparsity_scale(self.step, warmup_steps);
                l1 = Some((coef, weight_by_decoder_norm));
            }
            Penalty::AuxK { alpha } if firing.n_dead > 0 => {
                let sums = engine.aux_residual(state, &step, (d / 2).min(firing.n_dead))?;
                if let Some((value, g)) = auxk_terms(sums, n, alpha) {
                    auxk = Some((value, alpha as f64 * value));
                    aux_g = Some(g);
                }
            }
            Penalty::AuxK { .. } => {}
            Penalty::L0 {
                coefficient,
                target_l0,
                bandwidth,
                warmup_steps,
            } => {
                // c·s(t)·(L0/target − 1)²: its value, and its slope in L0 for θ's gradient.
                let c = (coefficient * sparsity_scale(self.step, warmup_steps)) as f64;
                let l0 = firing.nnz as f64 / n as f64;
                let miss = l0 / target_l0 as f64 - 1.0;
                auxk = Some((miss * miss, c * miss * miss));
                jump = Some(JumpArgs {
                    bandwidth,
                    d_penalty_d_l0: (2.0 * c * miss / target_l0 as f64) as f32,
                });
            }
        }
        engine.set_aux_upstream(&step, aux_g)?;
        times.decode_loss = clock.lap(engine)?;

        let prep = RowPrep {
            project_eps: match rules.decoder {
                DecoderConstraint::UnitNorm { project_eps, .. } => Some(project_eps),
                DecoderConstraint::Free => None,
            },
            want_norm: rules.max_grad_norm.is_some(),
        };
        let capture = self.capture_on;
        let args = BackwardArgs {
            l1,
            jump,
            prep,
            capture,
        };
        engine.backward(state, &step, args)?;
        times.backward = clock.lap(engine)?;

        // Update: projection and norm, clipping, Adam.
        let grad_scale = clip_factor(rules.max_grad_norm, engine.grad_norm(state, &step)?);
        if capture {
            self.capture = Some(engine.captured(state, grad_scale)?);
        }
        engine.update(state, &step, lr, grad_scale, rules.decoder)?;
        times.update = clock.lap(engine)?;
        self.times = times;
        self.step += 1;

        let sums = engine.loss_sums()?;
        let resampled = if resample_due(self.step, config.resample_every, config.total_steps) {
            engine.read_back(state, collective)?;
            let e_bd = engine.residual(&step)?;
            let scale = config.resample_encoder_scale;
            let resampled = resample_dead(state, &step, &e_bd, rules.dead_tokens, scale, self.step);
            engine.params_changed();
            resampled
        } else {
            0
        };
        let mse = sums.sq_error / n as f64;
        // Undefined, not −∞, for a batch without variance (one row, or identical rows).
        let fve = if sums.variance > 0.0 {
            1.0 - sums.sq_error / sums.variance
        } else {
            f64::NAN
        };
        let (aux, penalty) = match (l1, auxk) {
            (Some((coef, _)), _) => (sums.l1 / n as f64, coef as f64 * (sums.l1 / n as f64)),
            (None, Some(terms)) => terms,
            (None, None) => (0.0, 0.0),
        };
        Ok(StepStats {
            loss: (sums.reconstruction / n as f64 + penalty) as f32,
            mse: mse as f32,
            penalty: penalty as f32,
            aux: aux as f32,
            fve: fve as f32,
            l0: firing.nnz as f32 / n as f32,
            dead_fraction: firing.n_dead as f32 / f as f32,
            lr: lr as f32,
            threshold: state.sae.threshold,
            resampled,
        })
    }

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

impl Trainer {
    /// A copy of the trainer's state, for a checkpoint (on a GPU, and for Adam's moments
    /// across processes, as of the last [`Trainer::sync`]).
    pub fn state(&self) -> TrainerState {
        TrainerState {
            sae: self.state.sae.clone(),
            adam_m: self.state.adam.m.clone(),
            adam_v: self.state.adam.v.clone(),
            adam_t: self.state.adam.t,
            step: self.step,
            tokens_since_fired_f: self.state.tokens_since_fired_f.clone(),
        }
    }

    /// A trainer (CPU, single process) that continues from `state`: its next step is the one
    /// the trainer that produced `state` would have taken, given the same `config` and
    /// batches. Fails if `config` does not fit the SAE or the state's arrays are misshapen.
    pub fn from_state(state: TrainerState, config: TrainConfig) -> Result<Trainer> {
        Trainer::resumed(state, |sae| Trainer::new(sae, config))
    }

    /// [`Trainer::from_state`] for one latent shard (see [`Trainer::sharded`]): `state` is this
    /// shard's, as a checkpoint of any shard count gives it back for these latents.
    pub fn sharded_from_state(
        state: TrainerState,
        global: SaeConfig,
        config: TrainConfig,
        grid: &crate::dist::Grid,
    ) -> Result<Trainer> {
        Trainer::resumed(state, |sae| Trainer::sharded(sae, global, config, grid))
    }

    /// The trainer `build` makes of `state`'s SAE, carrying on from the rest of `state`.
    fn resumed(state: TrainerState, build: impl FnOnce(Sae) -> Result<Trainer>) -> Result<Trainer> {
        state.validate()?;
        let TrainerState {
            sae,
            adam_m,
            adam_v,
            adam_t,
            step,
            tokens_since_fired_f,
        } = state;
        let mut trainer = build(sae)?;
        trainer.state.adam.m = adam_m;
        trainer.state.adam.v = adam_v;
        trainer.state.adam.t = adam_t;
        trainer.step = step;
        trainer.state.tokens_since_fired_f = tokens_since_fired_f;
        Ok(trainer)
    }
}

/// Times the phases of a step: each lap ends when the backend's queued work is done, or reads
/// zero when timing is off (a GPU not asked to wait).
struct PhaseClock {
    on: bool,
    last: Instant,
}

impl PhaseClock {
    fn start(on: bool) -> Self {
        PhaseClock {
            on,
            last: Instant::now(),
        }
    }

    fn lap(&mut self, engine: &Engine) -> Result<Duration> {
        if !self.on {
            return Ok(Duration::ZERO);
        }
        engine.wait()?;
        let now = Instant::now();
        Ok(std::mem::replace(&mut self.last, now).elapsed())
    }
}

/// The error for a GPU trainer asked to share its steps with other processes.
fn one_process_on_gpu(device: String) -> Error {
    Error::Device {
        device,
        reason: "training across processes runs on the CPU only; drop --device or run a \
                 single process"
            .into(),
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
