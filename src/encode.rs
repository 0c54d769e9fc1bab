//! Inference: an SAE's codes for batches (the encoder GEMM, then the selection training uses,
//! with BatchTopK's learned θ in place of its batch rule) on the CPU or a GPU, and the
//! reconstruction from codes. The SAE itself ([`crate::sae`]) knows nothing of devices.

use ndarray::{Array2, ArrayView2, ArrayViewMut2};

use crate::arch::Selection;
use crate::backend::bf16::Bf16Encoder;
use crate::backend::cuda_select::DeviceEncoder;
use crate::backend::{sparse, Backend, Device};
use crate::dist::{Collective, SingleProcess};
use crate::error::{check_shape, Error, Result};
use crate::sae::Sae;
use crate::select::{select_into, Codes, PreActs, Selector, SparseCodes};

/// The caller's workspace for [`Sae::encode_into`]: x − b_dec, the encoder GEMM's B×F output,
/// the selection's buffers, the codes themselves, and in bf16 the packed batch and W_enc's
/// bf16 copy. Each grows to the largest batch (and the most codes) it has held and keeps its
/// capacity, so encoding batch after batch of at most that size allocates nothing. One set
/// serves any SAE; an SAE of another shape regrows what it needs.
#[derive(Default)]
pub struct EncodeBuffers {
    /// x − b_dec, at least B×D numbers (the first B·D used, row-major).
    xc: Vec<f32>,
    /// The GEMM part of the pre-activations, at least B×F numbers.
    gemm: Vec<f32>,
    selector: Selector,
    codes: Codes,
    bf16: Option<Bf16State>,
}

/// The bf16 GEMM's working set in [`EncodeBuffers`], and the W_enc shape (F, D) its copy was
/// made of.
struct Bf16State {
    encoder: Bf16Encoder,
    shape: (usize, usize),
}

impl EncodeBuffers {
    /// Empty buffers; the first [`Sae::encode_into`] sizes them.
    pub fn new() -> Self {
        Self::default()
    }

    /// The codes of the last [`Sae::encode_into`] (no rows before the first).
    pub fn codes(&self) -> SparseCodes<'_> {
        self.codes.view()
    }

    /// The codes of the last [`Sae::encode_into`], owned, giving up the buffers.
    pub fn into_codes(self) -> Codes {
        self.codes
    }
}

impl std::fmt::Debug for EncodeBuffers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncodeBuffers")
            .field("xc_capacity", &self.xc.len())
            .field("gemm_capacity", &self.gemm.len())
            .field("codes", &self.codes.view())
            .field("bf16", &self.bf16.is_some())
            .finish()
    }
}

/// `v` with at least `n` elements (grown, when it must, in memory from
/// [`crate::backend::zeros_huge`], as the step's workspaces are); its first `n` as a
/// `rows × (n / rows)` matrix.
fn grown(v: &mut Vec<f32>, rows: usize, cols: usize) -> ArrayViewMut2<'_, f32> {
    let n = rows * cols;
    if v.len() < n {
        *v = Vec::new();
        *v = crate::backend::zeros_huge(1, n).into_raw_vec_and_offset().0;
    }
    ArrayViewMut2::from_shape((rows, cols), &mut v[..n]).expect("rows × cols elements")
}

impl Sae {
    /// Sparse codes of `x_bd` as used outside training: ReLU keeps every positive code, TopK
    /// the k largest per row, BatchTopK those above θ (or, before θ is learned, the k·B largest
    /// of this batch, the training rule).
    /// The encoder GEMM runs on `backend`, or in bf16 after [`Sae::set_precision`].
    /// [`Sae::encode_into`] gives the same codes into reused buffers.
    pub fn encode(&self, backend: &dyn Backend, x_bd: ArrayView2<'_, f32>) -> Result<Codes> {
        let mut buffers = EncodeBuffers::new();
        self.encode_shard_into(backend, &mut buffers, false, x_bd, 0, &SingleProcess)?;
        Ok(buffers.into_codes())
    }

    /// [`Sae::encode`] into `buffers`, the caller's workspace kept from call to call: the same
    /// codes, bit for bit, and once the buffers have held a batch at least as large, no
    /// allocation by this crate, unless a batch needs more room for its codes or the
    /// selection's candidates than the batches before it (TopK keeps at most k codes a row;
    /// ReLU, JumpReLU and θ keep as many as the data passes). The CPU GEMM library may still
    /// allocate its own packing space (matrixmultiply does, on every product).
    ///
    /// The codes returned borrow `buffers` until the next call ([`EncodeBuffers::codes`] gives
    /// them again). In bf16, W_enc's bf16 copy lives in `buffers` and is rounded again from
    /// this SAE on every call (F·D numbers, no allocation), so the same buffers serve an SAE
    /// that has changed since; a [`Sae::encoder`] keeps its copy without that pass.
    ///
    /// ```
    /// use ndarray::Array2;
    /// use sparse_autoencoder::backend::Cpu;
    /// use sparse_autoencoder::EncodeBuffers;
    /// use sparse_autoencoder::{Architecture, Sae, SaeConfig};
    ///
    /// let config = SaeConfig { d_model: 16, dict_size: 64, arch: Architecture::TopK { k: 4 } };
    /// let sae = Sae::new(config, 0)?;
    /// let mut buffers = EncodeBuffers::new();
    /// let mut x_hat_bd = Array2::zeros((32, 16));
    /// for step in 0..3 {
    ///     let x_bd = Array2::from_shape_fn((32, 16), |(b, d)| ((step * 99 + b * 16 + d) as f32).sin());
    ///     let codes = sae.encode_into(&Cpu, x_bd.view(), &mut buffers)?;
    ///     assert!(codes.mean_l0() <= 4.0);
    ///     assert_eq!(codes, sae.encode(&Cpu, x_bd.view())?.view());
    ///     sae.decode_into(codes, x_hat_bd.view_mut())?;
    /// }
    /// # Ok::<(), sparse_autoencoder::Error>(())
    /// ```
    pub fn encode_into<'b>(
        &self,
        backend: &dyn Backend,
        x_bd: ArrayView2<'_, f32>,
        buffers: &'b mut EncodeBuffers,
    ) -> Result<SparseCodes<'b>> {
        self.encode_shard_into(backend, buffers, false, x_bd, 0, &SingleProcess)?;
        Ok(buffers.codes.view())
    }

    /// [`Sae::encode`] by a latent shard of a dictionary (see [`Sae::load_shard`]) into
    /// `buffers`, the one implementation of every CPU encode: this SAE holds latents
    /// `offset..`, the other processes of `latent` the rest of the same rows, and the codes
    /// (left in `buffers.codes`) are this shard's entries (local indices) of those one process
    /// holding the whole SAE would choose: TopK exchanges each shard's candidates, BatchTopK
    /// without θ cuts the batch across the shards, the other rules need nothing of the others.
    /// `w_enc_current`: the bf16 copy in `buffers`, if there is one of W_enc's shape, is of
    /// this SAE's W_enc as it is now (an [`Encoder`], which borrows the SAE), so it need not be
    /// rounded again.
    pub(crate) fn encode_shard_into(
        &self,
        backend: &dyn Backend,
        buffers: &mut EncodeBuffers,
        w_enc_current: bool,
        x_bd: ArrayView2<'_, f32>,
        offset: usize,
        latent: &dyn Collective,
    ) -> Result<()> {
        self.check_batch(x_bd)?;
        let (b, d, f) = (x_bd.nrows(), self.config.d_model, self.config.dict_size);
        let EncodeBuffers {
            xc,
            gemm,
            selector,
            codes,
            bf16,
        } = buffers;
        let bf16 = match self.bf16 {
            None => None,
            Some(kernel) => {
                let shape = self.w_enc_fd.dim();
                match bf16 {
                    Some(state) if state.shape == shape => {
                        if !w_enc_current {
                            state.encoder.refresh(self.w_enc_fd.view(), 0..f);
                        }
                    }
                    _ => {
                        *bf16 = Some(Bf16State {
                            encoder: Bf16Encoder::new(kernel),
                            shape,
                        })
                    }
                }
                bf16.as_mut().map(|state| &mut state.encoder)
            }
        };
        let xc_bd = grown(xc, b, d);
        let mut gemm_bf = grown(gemm, b, f);
        self.pre_activations_in(backend, bf16, x_bd, xc_bd, gemm_bf.view_mut());
        let bias_f = self.b_enc_f.as_slice().expect("contiguous");
        let pre = PreActs::new(gemm_bf.view(), bias_f).expect("encoder output matches the SAE");
        // Inference differs from training only in BatchTopK's threshold.
        let shards = latent.world_size();
        match (Selection::of(self.config.arch), self.threshold) {
            (Selection::BatchTopK(_), Some(theta)) => selector.threshold(pre, theta, codes),
            (Selection::TopK(k), _) if shards > 1 => {
                selector.topk_sharded(pre, k, offset, latent, codes)
            }
            (Selection::BatchTopK(k), None) if shards > 1 => {
                let k_total = k * b;
                selector.batch_topk_sharded(pre, k_total, latent, shards, codes)
            }
            (selection, _) => {
                let threshold_f = self.threshold_f.as_slice().expect("contiguous");
                select_into(selector, selection, pre, threshold_f, &SingleProcess, codes)
            }
        }
        Ok(())
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
                buffers: EncodeBuffers::new(),
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
                buffers: EncodeBuffers::new(),
            }),
        }
    }

    /// Reconstruction x̂ = codes·W_dec + b_dec, B×D, of [`Codes`] (`&codes`) or a
    /// [`SparseCodes`] view. Fails with [`Error::Shape`] when the codes are not of F latents.
    pub fn decode<'c>(&self, codes: impl Into<SparseCodes<'c>>) -> Result<Array2<f32>> {
        self.decode_shard(codes, &SingleProcess)
    }

    /// [`Sae::decode`] into `x_hat_bd`, the caller's B×D array (any layout whose rows are
    /// contiguous, as a standard-layout array's are), every entry overwritten: the same
    /// numbers, bit for bit, and no allocation. Fails with [`Error::Shape`] when the codes are
    /// not of F latents or `x_hat_bd` not of their B rows by D.
    pub fn decode_into<'c>(
        &self,
        codes: impl Into<SparseCodes<'c>>,
        x_hat_bd: ArrayViewMut2<'_, f32>,
    ) -> Result<()> {
        let codes = codes.into();
        self.check_codes(codes)?;
        let (b, d) = (codes.n_rows(), self.config.d_model);
        check_shape("x_hat_bd", x_hat_bd.shape(), &[b, d])?;
        if d > 1 && b > 0 && x_hat_bd.strides()[1] != 1 {
            return Err(Error::Shape {
                what: "x_hat_bd (its rows are not contiguous; pass a standard-layout array)".into(),
                expected: vec![b, d],
                got: vec![b, d],
            });
        }
        sparse::decode_into(
            codes,
            self.w_dec_fd.view(),
            Some(self.b_dec_d.view()),
            x_hat_bd,
        );
        Ok(())
    }

    /// Checks that `codes` are of this SAE's F latents.
    fn check_codes(&self, codes: SparseCodes<'_>) -> Result<()> {
        if codes.n_latents() != self.config.dict_size {
            return Err(Error::Shape {
                what: "codes".into(),
                expected: vec![codes.n_rows(), self.config.dict_size],
                got: vec![codes.n_rows(), codes.n_latents()],
            });
        }
        Ok(())
    }

    /// [`Sae::decode`] by a latent shard (see [`Sae::encode_shard_into`]): every shard's part
    /// of x̂ summed over `latent` (B×D numbers each), b_dec added once.
    pub(crate) fn decode_shard<'c>(
        &self,
        codes: impl Into<SparseCodes<'c>>,
        latent: &dyn Collective,
    ) -> Result<Array2<f32>> {
        let codes = codes.into();
        self.check_codes(codes)?;
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
    /// The CPU's workspace, bf16 copy of W_enc included (current: the SAE is borrowed).
    buffers: EncodeBuffers,
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

    /// [`Sae::encode_shard_into`] on the CPU, the workspace and bf16 copy kept from batch to
    /// batch; the codes handed out.
    pub(crate) fn encode_shard(
        &mut self,
        x_bd: ArrayView2<'_, f32>,
        offset: usize,
        latent: &dyn Collective,
    ) -> Result<Codes> {
        let cpu = &crate::backend::Cpu;
        let buffers = &mut self.buffers;
        self.sae
            .encode_shard_into(cpu, buffers, true, x_bd, offset, latent)?;
        Ok(std::mem::take(&mut buffers.codes))
    }
}
