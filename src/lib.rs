//! Sparse autoencoders (SAEs) for mechanistic interpretability, trained fast on the CPU.
//!
//! An SAE maps an activation x (D numbers) to a sparse code f (F ≫ D numbers, almost all zero)
//! and back: pre = (x − b_dec)·W_encᵀ + b_enc, f = sparsify(ReLU(pre)), x̂ = f·W_dec + b_dec.
//! Sparsity comes from an L1 penalty ([`Architecture::Relu`]), a per-row top-k
//! ([`Architecture::TopK`]), a batch-wide top-(k·B) ([`Architecture::BatchTopK`], and with
//! nested prefixes [`Architecture::Matryoshka`]) or a threshold learned per latent
//! ([`Architecture::JumpRelu`]), with the semantics of the reference Python library
//! dictionary_learning.
//!
//! Data flows through the modules in this order: [`data`] (shuffled batches from `.npy`
//! shards) → a batch `x_bd` → [`train`]'s step, whose phases run on the CPU or a GPU: encode
//! ([`sae`]'s encoder GEMM on a [`backend`]) → [`select`] (sparsify) → decode → loss →
//! backward → update ([`optim`]'s Adam). [`arch`] is the one place that says how each
//! architecture behaves; [`dist`] is the seam for data-parallel training.
//!
//! Arrays are named by their shape, as the reference does: `x_bd` is B×D, `w_enc_fd` F×D,
//! `b_enc_f` F long. B is rows in a batch, D the activations' width (`d_model`), F latents
//! (`dict_size`), K active codes per row, N rows of a dataset or evaluation set, G true
//! features of the synthetic set.
//!
//! ```
//! use ndarray::Array2;
//! use sparse_autoencoder::{Architecture, Sae, SaeConfig, TrainConfig, Trainer};
//!
//! let sae_config = SaeConfig { d_model: 16, dict_size: 64, arch: Architecture::TopK { k: 4 } };
//! let train_config = TrainConfig { total_steps: 20, warmup_steps: 2, ..TrainConfig::default() };
//! let mut trainer = Trainer::new(Sae::new(sae_config, 0)?, train_config)?;
//! let x_bd = Array2::from_shape_fn((32, 16), |(b, d)| ((b * 16 + d) as f32 * 0.37).sin());
//! for _ in 0..20 {
//!     let stats = trainer.step(x_bd.view())?;
//!     assert!(stats.loss.is_finite());
//! }
//! let sae = trainer.into_sae();
//! let codes = sae.encode(&sparse_autoencoder::backend::Cpu, x_bd.view())?;
//! assert!(codes.mean_l0() <= 4.0);
//! let x_hat_bd = sae.decode(&codes)?;
//! assert_eq!(x_hat_bd.dim(), (32, 16));
//! # Ok::<(), sparse_autoencoder::Error>(())
//! ```

#![warn(missing_docs)]

#[cfg(feature = "openblas")]
extern crate blas_src;

pub mod arch;
pub mod backend;
pub mod calibrate;
pub mod config;
pub mod data;
pub mod dist;
pub mod encode;
pub mod error;
pub mod eval;
pub mod io;
pub mod memory;
pub mod optim;
pub mod plot;
pub mod run;
pub mod sae;
pub mod select;
pub mod synth;
pub mod train;

pub use config::{
    Architecture, ConfigError, Precision, ReluVariant, SaeConfig, ThresholdRule, TrainConfig,
};
pub use error::{Error, Result};
pub use sae::Sae;
pub use select::Codes;
pub use train::{PhaseTimes, StepStats, Trainer};
