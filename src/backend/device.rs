//! Which device runs the numbers: the parsed `cpu` / `cuda` / `cuda:N` choice (whether it can
//! run here is [`Device::check`]'s, next to the GPU code in the backend).

use std::fmt;
use std::str::FromStr;

use crate::config::Precision;
use crate::error::{Error, Result};

/// Where a step runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// The CPU backend (the default).
    #[default]
    Cpu,
    /// An NVIDIA GPU.
    Cuda(Gpu),
}

/// A GPU, and how its GEMMs round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gpu {
    /// The GPU's number, as `nvidia-smi` numbers them (`cuda` is `cuda:0`).
    pub ordinal: usize,
    /// Let cuBLAS round the GEMMs' inputs to TF32 (a 10-bit mantissa) on tensor cores: several
    /// times f32's speed on Ampere and later GPUs, at about 1e-3 relative error per product.
    /// Off by default, as in PyTorch (`torch.backends.cuda.matmul.allow_tf32` is off since
    /// 1.12) and as the issue that specified the GPU path asks.
    pub tf32: bool,
}

impl Device {
    /// GPU `ordinal`, with full-f32 GEMMs.
    pub const fn cuda(ordinal: usize) -> Device {
        Device::Cuda(Gpu {
            ordinal,
            tf32: false,
        })
    }

    /// This device with TF32 GEMMs allowed (`on`), or as it is (`!on`). Only a GPU has them.
    pub fn with_tf32(self, on: bool) -> Result<Device> {
        match self {
            _ if !on => Ok(self),
            Device::Cpu => Err(Error::Device {
                device: self.to_string(),
                reason: "TF32 is a GPU mode; pass --device cuda (or cuda:N) with it, or drop it"
                    .to_string(),
            }),
            Device::Cuda(gpu) => Ok(Device::Cuda(Gpu { tf32: true, ..gpu })),
        }
    }
}

impl Device {
    /// Checks that this device runs the encoder GEMM at `precision`: bf16 is the CPU's (a
    /// GPU's GEMMs have TF32 instead), f32 runs everywhere.
    pub fn check_precision(self, precision: Precision) -> Result<()> {
        match (self, precision) {
            (Device::Cuda(_), Precision::Bf16) => Err(Error::Precision {
                precision,
                reason: "the bf16 encoder GEMM runs on the CPU; on a GPU pass --tf32 instead, \
                         or drop --device"
                    .into(),
            }),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(gpu) => write!(f, "cuda:{}", gpu.ordinal),
        }
    }
}

impl FromStr for Device {
    type Err = Error;

    /// `cpu`, `cuda` or `cuda:N` (case-insensitive).
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        let bad = |why: &str| Error::Device {
            device: s.to_string(),
            reason: format!("{why}; pass cpu, cuda or cuda:N (N the GPU's number, from 0)"),
        };
        match lower.as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::cuda(0)),
            _ => match lower.strip_prefix("cuda:") {
                Some(n) => n
                    .parse::<usize>()
                    .map(Device::cuda)
                    .map_err(|_| bad("the GPU number is not a non-negative integer")),
                None => Err(bad("unknown device")),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_cuda_and_numbered_gpus() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("CUDA".parse::<Device>().unwrap(), Device::cuda(0));
        assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::cuda(3));
        assert_eq!(Device::cuda(3).to_string(), "cuda:3");
        for bad in ["gpu", "cuda:", "cuda:-1", "cuda:x", "cuda:1.5", ""] {
            let err = bad.parse::<Device>().unwrap_err().to_string();
            assert!(
                err.contains("pass cpu, cuda or cuda:N"),
                "{bad:?} gave {err}"
            );
        }
    }

    #[test]
    fn bf16_is_a_cpu_mode() {
        assert!(Device::Cpu.check_precision(Precision::Bf16).is_ok());
        for device in [Device::Cpu, Device::cuda(1)] {
            assert!(device.check_precision(Precision::F32).is_ok());
        }
        let err = Device::cuda(1)
            .check_precision(Precision::Bf16)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--precision bf16") && err.contains("--tf32"),
            "{err}"
        );
    }

    #[test]
    fn tf32_is_a_gpu_mode() {
        let gpu = Device::cuda(2).with_tf32(true).unwrap();
        assert_eq!(
            gpu,
            Device::Cuda(Gpu {
                ordinal: 2,
                tf32: true
            })
        );
        assert_eq!(gpu.to_string(), "cuda:2");
        assert_eq!(Device::cuda(2).with_tf32(false).unwrap(), Device::cuda(2));
        assert_eq!(Device::Cpu.with_tf32(false).unwrap(), Device::Cpu);
        let err = Device::Cpu.with_tf32(true).unwrap_err().to_string();
        assert!(
            err.starts_with("device cpu: ") && err.contains("--device cuda"),
            "{err}"
        );
    }

    #[test]
    fn cpu_is_always_available() {
        assert_eq!(Device::Cpu.check().unwrap(), "cpu");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_build_it() {
        let err = Device::cuda(0).check().unwrap_err().to_string();
        assert!(
            err.contains("cuda:0") && err.contains("--features cuda"),
            "{err}"
        );
    }
}
