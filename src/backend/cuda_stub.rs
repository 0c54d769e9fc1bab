//! The GPU's device code stand-in in a build without the `cuda` feature: the same names as
//! [`cuda`](self) has with the feature, none of which can be made. Opening a GPU returns the
//! error that says how to build with CUDA, so code that would use one needs no `cfg` of its
//! own.

use ndarray::{ArrayView1, ArrayView2};

use crate::arch::Selection;
use crate::backend::{Device, Gpu};
use crate::error::{Error, Result};
use crate::select::Codes;

/// No GPU in this build: this type has no values.
pub enum CudaDevice {}

/// No GPU matrix in this build: this type has no values.
pub enum DeviceMatrix {}

impl CudaDevice {
    /// Fails: this build has no CUDA.
    pub fn open(gpu: Gpu) -> Result<Self> {
        Err(Error::Device {
            device: Device::Cuda(gpu).to_string(),
            reason: "this build has no CUDA support; rebuild with \
                     `cargo build --release --features cuda`"
                .to_string(),
        })
    }

    /// The GPU's name.
    pub fn name(&self) -> String {
        match *self {}
    }

    /// Copies `a` to the GPU.
    pub fn upload(&self, _a: ArrayView2<'_, f32>) -> Result<DeviceMatrix> {
        match *self {}
    }

    /// Zeros on the GPU.
    pub fn zeros(&self, _rows: usize, _cols: usize) -> Result<DeviceMatrix> {
        match *self {}
    }

    /// `c ← alpha·op(a)·op(b) + beta·c`.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        _alpha: f32,
        _a: &DeviceMatrix,
        _trans_a: bool,
        _b: &DeviceMatrix,
        _trans_b: bool,
        _beta: f32,
        _c: &mut DeviceMatrix,
    ) -> Result<()> {
        match *self {}
    }

    /// Waits for the GPU's queued work.
    pub fn synchronize(&self) -> Result<()> {
        match *self {}
    }
}

/// No GPU encoder in this build: this type has no values.
pub(crate) enum DeviceEncoder {}

impl DeviceEncoder {
    /// Fails: this build has no CUDA.
    pub(crate) fn new(
        gpu: Gpu,
        _w_enc_fd: ArrayView2<'_, f32>,
        _b_enc_f: ArrayView1<'_, f32>,
        _b_dec_d: ArrayView1<'_, f32>,
        _selection: Selection,
        _theta: Option<f32>,
    ) -> Result<Self> {
        match CudaDevice::open(gpu)? {}
    }

    /// The codes of a checked batch.
    pub(crate) fn encode(&mut self, _x_bd: ArrayView2<'_, f32>) -> Result<Codes> {
        match *self {}
    }
}
