//! Which backend runs a trainer's phases: an enum over the CPU and the GPU step (the GPU's a
//! stand-in that cannot be built in a build without CUDA), forwarding each phase.

use ndarray::{Array1, Array2};

use super::cpu::CpuStep;
use super::cuda::CudaStep;
use super::phases::{BackwardArgs, Captured, Firing, LossSums, Phases, State, Step};
use crate::arch::{DecoderConstraint, Selection};
use crate::dist::Collective;
use crate::error::Result;

/// The backend of a trainer.
pub(crate) enum Engine {
    Cpu(Box<CpuStep>),
    Cuda(Box<CudaStep>),
}

impl Engine {
    /// Whether the steps run on a GPU.
    pub fn is_gpu(&self) -> bool {
        matches!(self, Engine::Cuda(_))
    }
}

/// `$body` with `$s` bound to the backend inside `$engine`.
macro_rules! each {
    ($engine:expr, $s:ident => $body:expr) => {
        match $engine {
            Engine::Cpu($s) => $body,
            Engine::Cuda($s) => $body,
        }
    };
}

impl Phases for Engine {
    fn device_name(&self) -> String {
        each!(self, s => s.device_name())
    }

    fn queues(&self) -> bool {
        each!(self, s => s.queues())
    }

    fn wait(&self) -> Result<()> {
        each!(self, s => s.wait())
    }

    fn read_back(&mut self, state: &mut State, collective: &dyn Collective) -> Result<()> {
        each!(self, s => s.read_back(state, collective))
    }

    fn begin(&mut self, rows: usize) -> Result<()> {
        each!(self, s => s.begin(rows))
    }

    fn set_b_dec(&mut self, state: &mut State, b_dec_d: Array1<f32>) -> Result<()> {
        each!(self, s => s.set_b_dec(state, b_dec_d))
    }

    fn encode(&mut self, state: &State, step: &Step<'_>) -> Result<()> {
        each!(self, s => s.encode(state, step))
    }

    fn select(&mut self, state: &State, step: &Step<'_>, selection: Selection) -> Result<()> {
        each!(self, s => s.select(state, step, selection))
    }

    fn mark_fired(
        &mut self,
        state: &mut State,
        step: &Step<'_>,
        dead_tokens: u64,
        want_min_code: bool,
    ) -> Result<Firing> {
        each!(self, s => s.mark_fired(state, step, dead_tokens, want_min_code))
    }

    fn decode(&mut self, state: &State, step: &Step<'_>) -> Result<()> {
        each!(self, s => s.decode(state, step))
    }

    fn aux_residual(&mut self, state: &State, step: &Step<'_>, k_aux: usize) -> Result<[f64; 2]> {
        each!(self, s => s.aux_residual(state, step, k_aux))
    }

    fn set_aux_upstream(&mut self, step: &Step<'_>, g: Option<f32>) -> Result<()> {
        each!(self, s => s.set_aux_upstream(step, g))
    }

    fn backward(&mut self, state: &State, step: &Step<'_>, args: BackwardArgs) -> Result<()> {
        each!(self, s => s.backward(state, step, args))
    }

    fn grad_norm(&mut self, state: &State, step: &Step<'_>) -> Result<f64> {
        each!(self, s => s.grad_norm(state, step))
    }

    fn captured(&mut self, state: &State, grad_scale: f32) -> Result<Captured> {
        each!(self, s => s.captured(state, grad_scale))
    }

    fn update(
        &mut self,
        state: &mut State,
        step: &Step<'_>,
        lr: f64,
        grad_scale: f32,
        decoder: DecoderConstraint,
    ) -> Result<()> {
        each!(self, s => s.update(state, step, lr, grad_scale, decoder))
    }

    fn loss_sums(&mut self) -> Result<LossSums> {
        each!(self, s => s.loss_sums())
    }

    fn params_changed(&mut self) {
        each!(self, s => s.params_changed())
    }

    fn residual(&mut self, step: &Step<'_>) -> Result<Array2<f32>> {
        each!(self, s => s.residual(step))
    }
}
