//! Inference: an SAE's codes for batches (the encoder GEMM, then the selection training uses,
//! with BatchTopK's learned θ in place of its batch rule) on the CPU or a GPU, and the
//! reconstruction from codes. The SAE itself ([`crate::sae`]) knows nothing of devices.

use ndarray::{Array2, ArrayView2};

use crate::arch::Selection;
use crate::backend::bf16::Bf16Encoder;
use crate::backend::cuda_select::DeviceEncoder;
use crate::backend::{sparse, Backend, Device};
use crate::dist::{Collective, SingleProcess};
use crate::error::{Error, Result};
use crate::sae::Sae;
use crate::select::{select_into, Codes, Selector};

impl Sae {
    /// Sparse codes of `x_bd` as used outside training: ReLU keeps every positive code, TopK
    /// the k largest per row, BatchTopK those above θ (or, before θ is learned, the k·B largest
    /// of this batch, the training rule).
    /// The encoder GEMM runs on `backend`, or in bf16 after [`Sae::set_precision`].
    pub fn encode(&self, backend: &dyn Backend, x_bd: ArrayView2<'_, f32>) -> Result<Codes> {
        self.encode_shard(backend, None, x_bd, 0, &SingleProcess)
    }

    /// [`Sae::encode`] by a latent shard of a dictionary (see [`Sae::load_shard`]): this SAE
    /// holds latents `offset..`, the other processes of `latent` the rest of the same rows,
    /// and the codes are this shard's entries (local indices) of those one process holding
    /// the whole SAE would choose: TopK exchanges each shard's candidates, BatchTopK without
    /// θ cuts the batch across the shards, the other rules need nothing of the others. `bf16`
    /// is the bf16 GEMM's working set kept across batches (see [`Sae::pre_activations_into`]).
    pub(crate) fn encode_shard(
        &self,
        backend: &dyn Backend,
        bf16: Option<&mut Bf16Encoder>,
        x_bd: ArrayView2<'_, f32>,
        offset: usize,
        latent: &dyn Collective,
    ) -> Result<Codes> {
        self.check_batch(x_bd)?;
        let (mut xc_bd, mut gemm_bf) = (Array2::zeros((0, 0)), Array2::zeros((0, 0)));
        self.pre_activations_into(backend, bf16, x_bd, &mut xc_bd, &mut gemm_bf);
        let pre = self.pre_acts(&gemm_bf);
        let mut codes = Codes::empty(self.config.dict_size);
        let mut selector = Selector::default();
        // Inference differs from training only in BatchTopK's threshold.
        let shards = latent.world_size();
        match (Selection::of(self.config.arch), self.threshold) {
            (Selection::BatchTopK(_), Some(theta)) => selector.threshold(pre, theta, &mut codes),
            (Selection::TopK(k), _) if shards > 1 => {
                selector.topk_sharded(pre, k, offset, latent, &mut codes)
            }
            (Selection::BatchTopK(k), None) if shards > 1 => {
                let k_total = k * x_bd.nrows();
                selector.batch_topk_sharded(pre, k_total, latent, shards, &mut codes)
            }
            (selection, _) => {
                let threshold_f = self.threshold_f.as_slice().expect("contiguous");
                select_into(
                    &mut selector,
                    selection,
                    pre,
                    threshold_f,
                    &SingleProcess,
                    &mut codes,
                )
            }
        }
        Ok(codes)
    }

    /// An [`Encoder`] of this SAE on `device`: on a GPU the encoder's parameters are uploaded
    /// once and every batch's GEMM and selection run there; on the CPU in bf16, W_enc is
    /// rounded once. Fails with [`Error::Device`] when the device cannot run here, and with
    /// [`Error::Precision`] for a GPU and an SAE set to bf16.
    pub fn encoder(&self, device: Device) -> Result<Encoder<'_>> {
        device.check_precision(self.precision())?;
        match device {
            Device::Cpu => Ok(Encoder {
                sae: self,
                gpu: None,
                bf16: self.bf16.map(Bf16Encoder::new),
            }),
            Device::Cuda(_) if !self.config.arch.runs_on_gpu() => {
                Err(self.config.arch.not_on_gpu(device.to_string()))
            }
            Device::Cuda(gpu) => Ok(Encoder {
                sae: self,
                gpu: Some(Box::new(DeviceEncoder::new(
                    gpu,
                    self.w_enc_fd.view(),
                    self.b_enc_f.view(),
                    self.b_dec_d.view(),
                    Selection::of(self.config.arch),
                    self.threshold,
                )?)),
                bf16: None,
            }),
        }
    }

    /// Reconstruction x̂ = codes·W_dec + b_dec.
    pub fn decode(&self, codes: &Codes) -> Result<Array2<f32>> {
        self.decode_shard(codes, &SingleProcess)
    }

    /// [`Sae::decode`] by a latent shard (see [`Sae::encode_shard`]): every shard's part of
    /// x̂ summed over `latent` (B×D numbers each), b_dec added once.
    pub(crate) fn decode_shard(
        &self,
        codes: &Codes,
        latent: &dyn Collective,
    ) -> Result<Array2<f32>> {
        if codes.n_latents != self.config.dict_size {
            return Err(Error::Shape {
                what: "codes".into(),
                expected: vec![codes.n_rows(), self.config.dict_size],
                got: vec![codes.n_rows(), codes.n_latents],
            });
        }
        let mut x_hat_bd = Array2::zeros((codes.n_rows(), self.config.d_model));
        let b_dec = (latent.rank() == 0).then(|| self.b_dec_d.view());
        sparse::decode_into(codes, self.w_dec_fd.view(), b_dec, x_hat_bd.view_mut());
        if latent.world_size() > 1 {
            latent.all_reduce_sum_f32(x_hat_bd.as_slice_mut().expect("standard layout"));
        }
        Ok(x_hat_bd)
    }
}

/// [`Sae::encode`] for batch after batch on one device (see [`Sae::encoder`]).
pub struct Encoder<'a> {
    sae: &'a Sae,
    gpu: Option<Box<DeviceEncoder>>,
    bf16: Option<Bf16Encoder>,
}

impl Encoder<'_> {
    /// The codes of `x_bd`, as [`Sae::encode`] gives them (on a GPU up to float rounding of the
    /// GEMM, so a value on the edge of the selection may fall the other way).
    pub fn encode(&mut self, x_bd: ArrayView2<'_, f32>) -> Result<Codes> {
        if let Some(gpu) = &mut self.gpu {
            self.sae.check_batch(x_bd)?;
            return gpu.encode(x_bd);
        }
        self.encode_shard(x_bd, 0, &SingleProcess)
    }

    /// [`Sae::encode_shard`] on the CPU, the bf16 working set kept from batch to batch.
    pub(crate) fn encode_shard(
        &mut self,
        x_bd: ArrayView2<'_, f32>,
        offset: usize,
        latent: &dyn Collective,
    ) -> Result<Codes> {
        let cpu = &crate::backend::Cpu;
        let bf16 = self.bf16.as_mut();
        self.sae.encode_shard(cpu, bf16, x_bd, offset, latent)
    }
}
