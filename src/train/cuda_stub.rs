//! The GPU step's stand-in in a build without the `cuda` feature: it cannot be built (its
//! constructor returns the error that says how to build with CUDA), so it never runs a phase.

use ndarray::{Array1, Array2};

use super::phases::{BackwardArgs, Captured, Firing, LossSums, Phases, State, Step};
use crate::arch::{DecoderConstraint, Selection};
use crate::backend::cuda::CudaDevice;
use crate::backend::Gpu;
use crate::dist::Collective;
use crate::error::Result;

/// No GPU step: this type has no values.
pub(crate) enum CudaStep {}

impl CudaStep {
    /// Fails: this build has no CUDA.
    pub(crate) fn new(_state: &State, gpu: Gpu) -> Result<Self> {
        match CudaDevice::open(gpu)? {}
    }
}

impl Phases for CudaStep {
    fn device_name(&self) -> String {
        match *self {}
    }

    fn queues(&self) -> bool {
        match *self {}
    }

    fn wait(&self) -> Result<()> {
        match *self {}
    }

    fn read_back(&mut self, _state: &mut State, _collective: &dyn Collective) -> Result<()> {
        match *self {}
    }

    fn begin(&mut self, _rows: usize) -> Result<()> {
        match *self {}
    }

    fn set_b_dec(&mut self, _state: &mut State, _b_dec_d: Array1<f32>) -> Result<()> {
        match *self {}
    }

    fn encode(&mut self, _state: &State, _step: &Step<'_>) -> Result<()> {
        match *self {}
    }

    fn select(&mut self, _state: &State, _step: &Step<'_>, _selection: Selection) -> Result<()> {
        match *self {}
    }

    fn mark_fired(
        &mut self,
        _state: &mut State,
        _step: &Step<'_>,
        _dead_tokens: u64,
        _want_min_code: bool,
    ) -> Result<Firing> {
        match *self {}
    }

    fn decode(&mut self, _state: &State, _step: &Step<'_>) -> Result<()> {
        match *self {}
    }

    fn aux_residual(
        &mut self,
        _state: &State,
        _step: &Step<'_>,
        _k_aux: usize,
    ) -> Result<[f64; 2]> {
        match *self {}
    }

    fn set_aux_upstream(&mut self, _step: &Step<'_>, _g: Option<f32>) -> Result<()> {
        match *self {}
    }

    fn backward(&mut self, _state: &State, _step: &Step<'_>, _args: BackwardArgs) -> Result<()> {
        match *self {}
    }

    fn grad_norm(&mut self, _state: &State, _step: &Step<'_>) -> Result<f64> {
        match *self {}
    }

    fn captured(&mut self, _state: &State, _grad_scale: f32) -> Result<Captured> {
        match *self {}
    }

    fn update(
        &mut self,
        _state: &mut State,
        _step: &Step<'_>,
        _lr: f64,
        _grad_scale: f32,
        _decoder: DecoderConstraint,
    ) -> Result<()> {
        match *self {}
    }

    fn loss_sums(&mut self) -> Result<LossSums> {
        match *self {}
    }

    fn params_changed(&mut self) {
        match *self {}
    }

    fn residual(&mut self, _step: &Step<'_>) -> Result<Array2<f32>> {
        match *self {}
    }
}
