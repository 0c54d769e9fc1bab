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
//! # The API
//!
//! What this crate promises to keep, and all it shows; everything else is internal.
//!
//! - **Configurations** and their errors: [`SaeConfig`] (D, F, [`Architecture`]),
//!   [`TrainConfig`] (the training recipe, its defaults those of dictionary_learning), each
//!   checked by `validate()` into a [`ConfigError`] naming the field; [`Precision`].
//! - **[`Sae`]**: [`Sae::new`], [`Sae::load`] and [`Sae::save`] (a directory of
//!   `sae.safetensors` and `sae.json`), [`Sae::encode`] to [`Codes`] (CSR), [`Sae::decode`],
//!   [`Sae::fold_input_scale`], the weights as array views, and an [`Encoder`] for batch
//!   after batch on one device. Exports for SAELens and sparsify are in [`io`].
//! - **[`Trainer`]**: one step at a time on batches you hand it ([`Trainer::step`] →
//!   [`StepStats`]), its whole state as a [`TrainerState`] and on disk as an
//!   [`io::Checkpoint`], resumed bit-exactly.
//! - **Data** ([`data`]): the [`data::Source`] of rows (`.npy` shards through
//!   [`data::NpyShards`], in-memory arrays, your own), the shuffling [`data::Batcher`] and its
//!   background [`data::Prefetcher`], and [`data::StreamLoader`] for arrays that arrive once.
//! - **Evaluation** ([`eval`]) and **recovery** of known features on the synthetic set
//!   ([`synth`]).
//! - **Runs** ([`run`]): what `sae train` does, a sweep of SAEs over one data pass with
//!   metrics, checkpoints, resumption and evaluation in a run directory, on files, on rows
//!   handed in or on a stream ([`run::RunData`]); [`plot`] draws its figures.
//! - The seams a run is built on: [`backend`] (the CPU, or a GPU with the `cuda` feature),
//!   [`dist`] (the processes of a distributed run, through [`dist::Collective`]) and
//!   [`memory`] (what a run will need, checked before it starts).
//!
//! Inside, data flows in this order: a batch `x_bd` → the trainer's step, whose phases run on
//! the CPU or a GPU: encode (the encoder GEMM on a [`backend::Backend`]) → select (sparsify)
//! → decode → loss → backward → update (Adam). One internal module says how each
//! architecture behaves.
//!
//! With `default-features = false` the crate is the library alone: the `cli` feature (on by
//! default) adds the `sae` binary and the dependencies only it uses.
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

// The API: these modules, and the items re-exported below.
pub mod backend;
pub mod data;
pub mod dist;
pub mod eval;
pub mod io;
pub mod memory;
pub mod plot;
pub mod run;
pub mod synth;

// Internals: what the modules above are built from, free to change.
pub(crate) mod arch;
pub(crate) mod calibrate;
pub(crate) mod config;
pub(crate) mod encode;
pub(crate) mod error;
pub(crate) mod optim;
pub(crate) mod sae;
pub(crate) mod select;
pub(crate) mod train;

pub use config::{
    Architecture, ConfigError, Precision, ReluVariant, SaeConfig, ThresholdRule, TrainConfig,
    MAX_STEPS,
};
pub use data::DataError;
pub use encode::{EncodeBuffers, Encoder};
pub use error::{Error, Result};
pub use optim::ParamTensors;
pub use sae::Sae;
pub use select::{Codes, SparseCodes};
pub use train::{PhaseTimes, StepStats, Trainer, TrainerState};

/// Internals the `sae` binary's benchmark and this crate's own tests reach into: not part of
/// the API, and changed without notice.
#[doc(hidden)]
pub mod internals {
    pub use crate::arch::Selection;
    pub use crate::backend::bf16;
    pub use crate::backend::{huge_copy, zeros_huge};
}
