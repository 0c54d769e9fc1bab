//! Memory a run or bench needs, estimated from its sizes before anything big is allocated, and
//! checked against what this process may use, so a run too big for the machine is one error
//! instead of an abort half-way through.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::config::{Architecture, SaeConfig};

/// What a user changes to make a part of the estimate smaller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Knob {
    /// Rows per batch (`batch_size`).
    BatchSize,
    /// Latents per SAE (`dict_size` or `expansion`).
    DictSize,
    /// Both, for the B×F buffers: either one lowers them.
    BatchAndDictSize,
    /// Rows of the loader's shuffle buffer (`buffer_rows`).
    BufferRows,
    /// The built-in synthetic set's `[synthetic]` sizes.
    Synthetic,
}

impl Knob {
    /// How a config file spells it.
    pub fn key(self) -> &'static str {
        match self {
            Knob::BatchSize => "batch_size",
            Knob::DictSize => "dict_size (or expansion)",
            Knob::BatchAndDictSize => "batch_size or dict_size (or expansion)",
            Knob::BufferRows => "buffer_rows",
            Knob::Synthetic => "[synthetic] n_features and d_model",
        }
    }
}

/// One part of an estimate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    /// What it holds, for messages (`"B×F step buffers"`).
    pub what: &'static str,
    /// What makes it smaller.
    pub knob: Knob,
    /// Bytes (u128 and saturating: sizes from the command line can multiply past u64).
    pub bytes: u128,
}

/// The memory something needs at its peak, by part.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Estimate {
    /// The parts, each counted once.
    pub parts: Vec<Part>,
}

/// Saturating product of sizes.
pub(crate) fn mul(factors: &[u128]) -> u128 {
    factors.iter().fold(1u128, |acc, &x| acc.saturating_mul(x))
}

pub(crate) fn u(n: usize) -> u128 {
    n as u128
}

/// Resident memory of the program itself (code, libraries, thread stacks), measured at about
/// 10 MiB for a tiny run.
pub(crate) const RUNTIME_BYTES: u128 = 16 << 20;

impl Estimate {
    pub(crate) fn add(&mut self, what: &'static str, knob: Knob, bytes: u128) {
        if bytes > 0 {
            self.parts.push(Part { what, knob, bytes });
        }
    }

    /// Total bytes.
    pub fn total(&self) -> u128 {
        self.parts
            .iter()
            .fold(RUNTIME_BYTES, |acc, p| acc.saturating_add(p.bytes))
    }

    /// The knob whose parts add up to the most, and that sum.
    pub fn largest(&self) -> Option<(Knob, u128)> {
        let mut sums: Vec<(Knob, u128)> = Vec::new();
        for part in &self.parts {
            match sums.iter_mut().find(|(k, _)| *k == part.knob) {
                Some((_, sum)) => *sum = sum.saturating_add(part.bytes),
                None => sums.push((part.knob, part.bytes)),
            }
        }
        sums.into_iter().max_by_key(|&(_, bytes)| bytes)
    }

    /// What one SAE's trainer holds for a whole run (parameters, Adam's m and v, gradients,
    /// counters) and its step buffers for batches of `batch` rows (see `train::Workspace`).
    /// One trainer stepping its part of a global batch of `batch` rows split over `ranks`
    /// processes.
    pub(crate) fn trainer(&mut self, sae: &SaeConfig, batch: usize, ranks: usize) {
        let (f, d) = (u(sae.dict_size), u(sae.d_model));
        let (b, b_global) = (u(batch / ranks.max(1)), u(batch));
        let params = mul(&[4, 2, f, d]).saturating_add(4 * (f + d));
        // Parameters, m, v and the gradients are four parameter-shaped arrays; per latent,
        // `tokens_since_fired_f`, `fired_f`, `row_sq_f` (8 bytes each), `dead_f` and the
        // gradients' active flags.
        let per_latent = mul(&[29, f]);
        self.add(
            "parameters, Adam moments and gradients",
            Knob::DictSize,
            mul(&[4, params]).saturating_add(per_latent),
        );
        // xc_bd, x_hat_bd, aux_hat_bd and the two halves of upstream_bd.
        self.add("B×D step buffers", Knob::BatchSize, mul(&[20, b, d]));
        // Each kept code is 8 bytes in `Codes`, 8 in the selector's chunk buffers and 8 in the
        // by-latent transpose.
        let (nnz, dense_extra, aux_nnz) = match sae.arch {
            // The sparse path keeps at most 5% of the codes (`dense_threshold_default`);
            // above that the dense path adds ∂L/∂pre, B×F.
            Architecture::Relu { .. } => (mul(&[b, f]) / 20, mul(&[4, b, f]), 0),
            Architecture::TopK { k } | Architecture::BatchTopK { k } => {
                (mul(&[b, u(k)]), 0, mul(&[b, (d / 2).min(f)]))
            }
            // And one B×D reconstruction and upstream per prefix (at most a few).
            Architecture::Matryoshka { k } => {
                (mul(&[b, u(k)]), mul(&[64, b, d]), mul(&[b, (d / 2).min(f)]))
            }
            // JumpReLU starts with θ_j = 0.001, where about half the pre-activations pass.
            Architecture::JumpRelu => (mul(&[b, f]) / 2, 0, 0),
        };
        let codes =
            mul(&[24, nnz.saturating_add(aux_nnz)]).saturating_add(mul(&[32, b.saturating_add(f)]));
        if ranks > 1 {
            // Every rank's x − b_dec and upstream rows (three B×D arrays), and their codes,
            // 8 bytes each in `Codes` and 8 in the by-latent transpose.
            let per_rank = ranks as u128;
            let gathered_codes = mul(&[16, per_rank, nnz.saturating_add(aux_nnz)]);
            self.add(
                "gathered batch rows",
                Knob::BatchSize,
                mul(&[12, b_global, d]).saturating_add(gathered_codes),
            );
        }
        self.add(
            "B×F step buffers",
            Knob::BatchAndDictSize,
            mul(&[4, b, f])
                .saturating_add(dense_extra.max(codes))
                .saturating_add(codes.min(dense_extra)),
        );
    }

    /// The bf16 encoder GEMM's copies (`--precision bf16`): W_enc and the batch of `batch`
    /// rows in bf16.
    pub(crate) fn bf16_copies(&mut self, sae: &SaeConfig, batch: usize) {
        let (f, d, b) = (u(sae.dict_size), u(sae.d_model), u(batch));
        self.add("bf16 W_enc", Knob::DictSize, mul(&[2, f, d]));
        self.add("bf16 batch", Knob::BatchSize, mul(&[2, b, d]));
    }

    /// `sae bench`: one trainer, its fixed batch, the bare GEMM's copies of W_enc and its
    /// B×F output, and with `data` the loader over a file of `data_batches` batches; with
    /// `bf16`, a second trainer and bare GEMM in bf16 beside them.
    pub fn bench(sae: &SaeConfig, batch: usize, data: Option<usize>, bf16: bool) -> Estimate {
        let mut e = Estimate::default();
        e.trainer(sae, batch, 1);
        if bf16 {
            e.trainer(sae, batch, 1);
            e.bf16_copies(sae, batch);
            // Its bare GEMM's own copies, and its B×F output.
            e.bf16_copies(sae, batch);
            let (f, b) = (u(sae.dict_size), u(batch));
            e.add(
                "bf16 bare GEMM output",
                Knob::BatchAndDictSize,
                mul(&[4, b, f]),
            );
        }
        let (f, d, b) = (u(sae.dict_size), u(sae.d_model), u(batch));
        // Sae::new's initialisation and the GEMM's own W_enc.
        e.add("initialisation copies", Knob::DictSize, mul(&[8, f, d]));
        e.add("bare GEMM output", Knob::BatchAndDictSize, mul(&[4, b, f]));
        e.add("fixed batch", Knob::BatchSize, mul(&[8, b, d]));
        if let Some(batches) = data {
            // The float16 file is written from one buffer, then every row lies in the
            // shuffle buffer, plus the prefetcher's batches.
            e.add(
                "loader",
                Knob::BatchSize,
                mul(&[u(batches), b, d, 4 + 2]).saturating_add(mul(&[4 * 4, b, d])),
            );
        }
        e
    }
}

/// How much memory this process may still take, and what sets that figure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Available {
    /// Bytes.
    pub bytes: u64,
    /// Where the figure comes from, for messages.
    pub source: &'static str,
}

/// A value of `/proc/meminfo` or `/proc/self/status` (`key:   1234 kB`), in bytes.
fn proc_kb(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kb.checked_mul(1024)
}

/// The least of what the machine has free (MemAvailable), what the process's cgroup still
/// allows (memory.max − memory.current) and the address space left under RLIMIT_AS (ulimit
/// -v), or `None` where none of them can be read.
pub fn available() -> Option<Available> {
    let mut best: Option<Available> = None;
    let mut offer = |bytes: Option<u64>, source: &'static str| {
        if let Some(bytes) = bytes {
            if best.is_none_or(|b| bytes < b.bytes) {
                best = Some(Available { bytes, source });
            }
        }
    };
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    offer(
        proc_kb(&meminfo, "MemAvailable:"),
        "available (MemAvailable)",
    );
    offer(cgroup_left(), "left in the cgroup's memory.max");
    offer(address_space_left(), "of address space left (ulimit -v)");
    best
}

/// memory.max − memory.current of this process's cgroup (v2), when it has a limit.
fn cgroup_left() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?.trim();
    let dir = std::path::Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let max: u64 = read("memory.max")?.trim().parse().ok()?;
    let current: u64 = read("memory.current")
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    Some(max.saturating_sub(current))
}

/// RLIMIT_AS less the address space already mapped, when a limit is set.
#[cfg(unix)]
fn address_space_left() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut limit) } != 0
        || limit.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let mapped = proc_kb(&status, "VmSize:").unwrap_or(0);
    // rlim_t is narrower than u64 on some targets.
    #[allow(clippy::unnecessary_cast)]
    let limit = limit.rlim_cur as u64;
    Some(limit.saturating_sub(mapped))
}

#[cfg(not(unix))]
fn address_space_left() -> Option<u64> {
    None
}

/// A run or bench that needs more memory than there is; [`fmt::Display`] names the config
/// keys, and [`MemoryError::describe`] lets the CLI name its options instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryError {
    /// Bytes needed.
    pub needed: u128,
    /// The knob with the largest share, and that share.
    pub largest: (Knob, u128),
    /// What may be used; `None` when the sizes exceed any address space.
    pub available: Option<Available>,
}

impl MemoryError {
    /// The message, naming each knob as `name` spells it and the budget's own setting as
    /// `budget` (for example `--max-memory`).
    pub fn describe(&self, name: impl Fn(Knob) -> String, budget: &str) -> String {
        let (knob, share) = self.largest;
        let (have, or_budget) = match &self.available {
            Some(a) if a.source == BUDGET => (
                format!("more than the {} {budget} allows", Bytes(a.bytes as u128)),
                format!(", or raise {budget}"),
            ),
            Some(a) => (
                format!("more than the {} {}", Bytes(a.bytes as u128), a.source),
                format!(", or set {budget} if more is free than detected"),
            ),
            None => ("more than any address space holds".into(), String::new()),
        };
        format!(
            "needs about {} of memory ({} of it grows with {}), {have}; lower {}{or_budget}",
            Bytes(self.needed),
            Bytes(share),
            name(knob),
            name(knob),
        )
    }
}

impl fmt::Display for MemoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe(|k| k.key().to_string(), "max_memory"))
    }
}

impl std::error::Error for MemoryError {}

/// The source of an [`Available`] the user set.
const BUDGET: &str = "set as the budget";

/// Checks `estimate` against `budget` bytes if given, else against [`available`]. Sizes past
/// the address space are refused even when nothing can be measured.
pub fn check(estimate: &Estimate, budget: Option<ByteSize>) -> Result<(), MemoryError> {
    let needed = estimate.total();
    let largest = estimate.largest().unwrap_or((Knob::BatchSize, 0));
    let available = match budget {
        Some(ByteSize(bytes)) => Some(Available {
            bytes,
            source: BUDGET,
        }),
        None => available(),
    };
    let limit = available.map_or(isize::MAX as u128, |a| a.bytes as u128);
    if needed > limit.min(isize::MAX as u128) {
        return Err(MemoryError {
            needed,
            largest,
            available: available.filter(|_| needed <= isize::MAX as u128),
        });
    }
    Ok(())
}

/// A number of bytes, as `--max-memory` and `max_memory` take it: `8GiB`, `512M`, `2e9`,
/// `1.5 TB` (K, M, G, T without `B` are binary, as ulimit and Slurm read them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl std::str::FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s
            .find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E')
            .unwrap_or(s.len());
        let (number, unit) = (s[..split].trim(), s[split..].trim());
        let value: f64 = number
            .parse()
            .map_err(|_| format!("{s:?} is not a size such as 8GiB, 512MB or 2000000000"))?;
        let scale: f64 = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1.0,
            "k" | "kib" => 1024.0,
            "m" | "mib" => 1024f64.powi(2),
            "g" | "gib" => 1024f64.powi(3),
            "t" | "tib" => 1024f64.powi(4),
            "kb" => 1e3,
            "mb" => 1e6,
            "gb" => 1e9,
            "tb" => 1e12,
            _ => {
                return Err(format!(
                    "unknown unit {unit:?}: use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB"
                ))
            }
        };
        let bytes = value * scale;
        if !(bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64) {
            return Err(format!("{s:?} must be at least 1 byte and below 16 EiB"));
        }
        Ok(ByteSize(bytes as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Exact, so a config file read back gives the same number.
        for (unit, size) in [
            ("TiB", 1u64 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ] {
            if self.0.is_multiple_of(size) {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(0) => Err(serde::de::Error::custom(
                "max_memory must be at least 1 byte",
            )),
            Raw::Bytes(n) => Ok(ByteSize(n)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Bytes for people: `3.7 GiB`.
struct Bytes(u128);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut value = self.0 as f64;
        for unit in ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"] {
            if value < 1024.0 || unit == "EiB" {
                return if unit == "B" {
                    write!(f, "{} B", self.0)
                } else {
                    write!(f, "{value:.1} {unit}")
                };
            }
            value /= 1024.0;
        }
        unreachable!("the loop returns at EiB")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::RunSpec;

    #[test]
    fn this_machine_reports_what_is_available() {
        if cfg!(target_os = "linux") {
            let a = available().expect("MemAvailable on Linux");
            assert!(a.bytes > 0, "{a:?}");
        }
        assert_eq!(
            proc_kb(
                "MemTotal: 10 kB\nMemAvailable:   2048 kB\n",
                "MemAvailable:"
            ),
            Some(2 << 20)
        );
        assert_eq!(proc_kb("MemTotal: 10 kB\n", "MemAvailable:"), None);
    }

    #[test]
    fn byte_sizes_parse_and_print_exactly() {
        for (text, bytes) in [
            ("8GiB", 8u64 << 30),
            ("8G", 8 << 30),
            ("8 gib", 8 << 30),
            ("500MB", 500_000_000),
            ("1.5GB", 1_500_000_000),
            ("2e9", 2_000_000_000),
            ("4096", 4096),
            ("1TiB", 1 << 40),
        ] {
            assert_eq!(text.parse::<ByteSize>(), Ok(ByteSize(bytes)), "{text}");
        }
        for bad in ["", "0", "-1GiB", "8XB", "GiB", "nan", "1e30"] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad}");
        }
        for bytes in [1, 1000, 8 << 30, (3 << 20) + 1] {
            let size = ByteSize(bytes);
            assert_eq!(size.to_string().parse::<ByteSize>(), Ok(size));
        }
        assert_eq!(ByteSize(8 << 30).to_string(), "8GiB");
        // In a config file, as text or a number of bytes.
        let spec: RunSpec = toml::from_str("[train]\nmax_memory = \"8GiB\"\n").unwrap();
        assert_eq!(spec.train.max_memory, Some(ByteSize(8 << 30)));
        let spec: RunSpec = toml::from_str("[train]\nmax_memory = 1000\n").unwrap();
        assert_eq!(spec.train.max_memory, Some(ByteSize(1000)));
        assert!(toml::from_str::<RunSpec>("[train]\nmax_memory = \"lots\"\n").is_err());
        let text = toml::to_string(&spec).unwrap();
        assert_eq!(toml::from_str::<RunSpec>(&text).unwrap(), spec);
    }
}
