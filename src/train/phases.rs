//! The seam between the trainer and the hardware: a step's phases as one trait ([`Phases`]),
//! which the CPU ([`super::cpu`]) and a GPU ([`super::cuda`]) implement, and the data they
//! exchange with the trainer. The trainer decides what a step does (the architecture's rules,
//! the schedules, θ, who is dead, clipping); a backend decides how, and keeps its fusions
//! inside its phases.

use std::ops::Range;

use ndarray::{Array1, Array2, ArrayView2};

use super::shard::Shard;
use crate::arch::{DecoderConstraint, Prefix, Selection};
use crate::dist::Collective;
use crate::error::Result;
use crate::optim::{Adam, ParamTensors, RowPrep};
use crate::sae::Sae;

/// What a trainer carries from one step to the next, in host memory: the SAE, Adam's state and
/// the dead-latent counters. A backend that keeps its own copy (a GPU) writes it back here on
/// [`Phases::read_back`].
pub(crate) struct State {
    pub sae: Sae,
    pub adam: Adam,
    /// Tokens since each latent last fired, F counters.
    pub tokens_since_fired_f: Vec<u64>,
}

/// What every phase of one step may read.
pub(crate) struct Step<'a> {
    /// This process's rows of the batch, B×D in standard layout.
    pub x_bd: ArrayView2<'a, f32>,
    /// Who holds which rows and latents (one process: everything).
    pub shard: &'a Shard,
    /// The processes holding the batch's other rows (data parallelism).
    pub collective: &'a dyn Collective,
    /// Latent sharding: the processes holding these rows' other latents (one process: only
    /// this one).
    pub latent: &'a dyn Collective,
    /// Every process of the step, `collective` and `latent` together.
    pub world: &'a dyn Collective,
    /// Index of this process's first latent in the whole dictionary (0 unless sharded).
    pub offset: usize,
    /// The reconstructions the loss weighs: the whole dictionary, or Matryoshka's prefixes
    /// (as far as they reach into this process's latents, at local indices).
    pub prefixes: &'a [Prefix],
}

impl Step<'_> {
    /// Whether other processes hold other rows of the batch.
    pub fn distributed(&self) -> bool {
        self.collective.world_size() > 1
    }

    /// Whether other processes hold other latents of these rows.
    pub fn sharded(&self) -> bool {
        self.latent.world_size() > 1
    }

    /// All latents, `0..F`.
    pub fn all_latents(&self) -> Range<usize> {
        0..self.shard.latents_per_rank.iter().sum()
    }
}

/// What counting the firing latents found, over the global batch.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Firing {
    /// Active codes.
    pub nnz: u64,
    /// Latents that have not fired for the dead threshold's tokens, this batch included.
    pub n_dead: usize,
    /// The smallest kept code (+∞ when none was kept, or when it was not asked for).
    pub min_code: f32,
}

/// The batch sums the losses are made of, over the global batch.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct LossSums {
    /// Σ_b ‖x_b − x̂_b‖².
    pub sq_error: f64,
    /// The reconstruction term's sum Σ_i c_i·Σ_b ‖x_b − x̂_{i,b}‖² over the prefixes the loss
    /// weighs (`sq_error` when there is one, of weight 1).
    pub reconstruction: f64,
    /// Σ_b ‖x_b − x̄‖² (x̄ the batch mean).
    pub variance: f64,
    /// ReLU's Σ_b Σ_j f_bj·n_j (0 for the other architectures).
    pub l1: f64,
}

/// JumpReLU's thresholds' gradient: the straight-through estimator's kernel width and the
/// L0 penalty's slope.
#[derive(Clone, Copy, Debug)]
pub(crate) struct JumpArgs {
    /// ε, the rectangle kernel's bandwidth.
    pub bandwidth: f32,
    /// ∂(penalty)/∂L0, with L0 the batch's mean active codes per row.
    pub d_penalty_d_l0: f32,
}

/// How the backward pass treats the penalty and the update's per-row preparation.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BackwardArgs {
    /// ReLU's L1 term: λ·s(t), and whether n_j is the decoder row's norm; `None` otherwise.
    pub l1: Option<(f32, bool)>,
    /// JumpReLU's thresholds; `None` for the other architectures.
    pub jump: Option<JumpArgs>,
    /// Projection of the decoder gradient and the gradient norm, as the architecture asks.
    pub prep: RowPrep,
    /// Keep the raw gradients for [`Phases::captured`].
    pub capture: bool,
}

/// Dense copies of a step's internals, recorded when [`super::Trainer::set_capture`] is on
/// (tests and debugging; costs B×F memory).
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

/// One training step's phases, called in this order for each batch: [`begin`](Phases::begin),
/// [`encode`](Phases::encode), [`select`](Phases::select),
/// [`mark_fired`](Phases::mark_fired), [`decode`](Phases::decode), then for AuxK with dead
/// latents [`aux_residual`](Phases::aux_residual), [`set_aux_upstream`](Phases::set_aux_upstream),
/// [`backward`](Phases::backward), [`grad_norm`](Phases::grad_norm), optionally
/// [`captured`](Phases::captured), [`update`](Phases::update) and
/// [`loss_sums`](Phases::loss_sums). A phase may only queue its work (a GPU's stream): values
/// come back where a method returns them. Batch-wide results are over every process's rows.
pub(crate) trait Phases {
    /// The device's name: `"cpu"` or the GPU's model.
    fn device_name(&self) -> String;

    /// Whether phases return before their work is done, so that timing them needs
    /// [`Phases::wait`].
    fn queues(&self) -> bool;

    /// Waits until the work queued so far is done.
    fn wait(&self) -> Result<()>;

    /// Makes the backend's copy of the state current in `state` (a GPU's parameters, moments
    /// and counters; across processes, the moments each updated for its own latents). A
    /// collective call across processes.
    fn read_back(&mut self, state: &mut State, collective: &dyn Collective) -> Result<()>;

    /// Readies the buffers for a batch of `rows` rows, or says why this batch cannot run.
    fn begin(&mut self, rows: usize) -> Result<()>;

    /// Sets b_dec (its initialisation before the first step).
    fn set_b_dec(&mut self, state: &mut State, b_dec_d: Array1<f32>) -> Result<()>;

    /// x − b_dec, the encoder GEMM and its bias.
    fn encode(&mut self, state: &State, step: &Step<'_>) -> Result<()>;

    /// The codes, chosen by `selection`.
    fn select(&mut self, state: &State, step: &Step<'_>, selection: Selection) -> Result<()>;

    /// Counts each latent's firing, advances the tokens-since-fired counters and lists the
    /// latents dead for `dead_tokens` tokens; the smallest kept code when `want_min_code`.
    fn mark_fired(
        &mut self,
        state: &mut State,
        step: &Step<'_>,
        dead_tokens: u64,
        want_min_code: bool,
    ) -> Result<Firing>;

    /// The reconstruction x̂, ∂L/∂x̂ = −2(x − x̂)/B, and the sums of [`LossSums`] but L1.
    fn decode(&mut self, state: &State, step: &Step<'_>) -> Result<()>;

    /// AuxK: the `k_aux` largest codes among the dead latents, their reconstruction ê of the
    /// residual e = x − x̂, and the sums `[Σ_b ‖e − ê‖², Σ_b ‖e − mean_b(e)‖²]`.
    fn aux_residual(&mut self, state: &State, step: &Step<'_>, k_aux: usize) -> Result<[f64; 2]>;

    /// ∂L/∂ê = g·(e − ê), or no AuxK term in this step when `g` is `None`.
    fn set_aux_upstream(&mut self, step: &Step<'_>, g: Option<f32>) -> Result<()>;

    /// The gradients of the parameters.
    fn backward(&mut self, state: &State, step: &Step<'_>, args: BackwardArgs) -> Result<()>;

    /// Applies the projection of [`BackwardArgs::prep`] and returns the global gradient norm.
    fn grad_norm(&mut self, state: &State, step: &Step<'_>) -> Result<f64>;

    /// The step's internals, with the update's gradients scaled by `grad_scale` (only after a
    /// backward pass with [`BackwardArgs::capture`]).
    fn captured(&mut self, state: &State, grad_scale: f32) -> Result<Captured>;

    /// Adam at learning rate `lr` on the gradients scaled by `grad_scale`, then `decoder`'s
    /// renormalisation.
    fn update(
        &mut self,
        state: &mut State,
        step: &Step<'_>,
        lr: f64,
        grad_scale: f32,
        decoder: DecoderConstraint,
    ) -> Result<()>;

    /// The step's loss sums.
    fn loss_sums(&mut self) -> Result<LossSums>;

    /// The SAE's parameters in `State` changed outside the step (resampling): a backend that
    /// keeps a derived copy (the CPU's bf16 W_enc) makes it afresh.
    fn params_changed(&mut self);

    /// The step's residual x − x̂ on this process's rows (x̂ the whole dictionary's
    /// reconstruction), B×D, for resampling.
    fn residual(&mut self, step: &Step<'_>) -> Result<Array2<f32>>;
}
