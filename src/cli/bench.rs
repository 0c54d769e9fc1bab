//! `sae bench`: the encoder GEMM and full training steps timed side by side in one process,
//! with the step's phases and, optionally, the loader's share; under mpirun, each rank steps
//! its part of one global batch and rank 0 reports every rank's time in collectives, in the
//! exchange of gradients or parameters and outside them, and the bytes it sent.
//!
//! Timing runs in rounds: each round times one bare encoder GEMM, then one training step on a
//! batch in memory, then (with `--data`) one step fed by the loader. The first `--warmup`
//! rounds are discarded and every figure is the median over the remaining `--steps` rounds.
//! Alternating the measurements means a drift in the machine's speed (a shared VM's neighbours,
//! thermal limits) slows the GEMM and the step alike, so their ratio stays meaningful where two
//! benchmarks run one after the other would not.
//!
//! The in-memory batch is one fixed B×D batch reused by every step (as `cargo bench --bench
//! step` does), so the figures compare with that benchmark; its rows are activation-like and all
//! different: a per-column offset plus uniform noise in [−0.5, 0.5). The loader-fed steps read a
//! float16 `.npy` of 8·B rows drawn the same way, written under the system temporary directory
//! (removed afterwards) and read through the shuffle buffer and the prefetch thread exactly as
//! `sae train --data` reads activations.

use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use clap::Args;
use half::f16;
use ndarray::{s, Array2, ArrayView2};
use npyz::WriterBuilder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use sparse_autoencoder::backend::bf16::{self, Bf16Batch, Bf16Kernel, Bf16Rows};
use sparse_autoencoder::backend::{huge_copy, zeros_huge, Backend, Cpu, Device};
use sparse_autoencoder::data::{Batcher, LoaderConfig, NpyShards, Prefetcher};
use sparse_autoencoder::dist::{agree, part, Collective, Grid, Traffic, World};
use sparse_autoencoder::memory::{self, Estimate, Knob};
use sparse_autoencoder::run::ArchName;
use sparse_autoencoder::{PhaseTimes, Precision, Sae, SaeConfig, TrainConfig, Trainer};

use super::{at_least_one, usage, UsageError};

/// `sae bench`'s options: the shape, the rule and how long to measure.
#[derive(Args)]
pub struct BenchArgs {
    /// Width D of the activations.
    #[arg(long, default_value_t = 768, value_parser = at_least_one, allow_negative_numbers = true)]
    d: usize,
    /// Number of latents F.
    #[arg(long, default_value_t = 16384, value_parser = at_least_one, allow_negative_numbers = true)]
    f: usize,
    /// Active latents per row (topk; batchtopk: on average; relu: b_enc is set so that about k
    /// codes per row are positive, as in a trained ReLU SAE, while F/2 gives the dense codes of
    /// initialisation).
    #[arg(long, default_value_t = 64, value_parser = at_least_one, allow_negative_numbers = true)]
    k: usize,
    /// Rows per batch B.
    #[arg(long, default_value_t = 4096, value_parser = at_least_one, allow_negative_numbers = true)]
    batch: usize,
    /// Sparsity rule.
    #[arg(long, value_parser = super::arch_parser(), default_value = "batchtopk")]
    arch: ArchName,
    /// Worker threads for the GEMMs and the rest of the step (as `sae train --threads`)
    /// [default: all cores].
    #[arg(long, value_parser = at_least_one, allow_negative_numbers = true)]
    threads: Option<usize>,
    /// Under mpirun: shard the latents over groups of this many ranks (as `sae train
    /// --latent-shards`); each group steps its part of the batch, each rank its F/S latents.
    #[arg(long, value_name = "S", default_value_t = 1, value_parser = at_least_one, allow_negative_numbers = true)]
    latent_shards: usize,
    /// Measured rounds; each figure is the median over them.
    #[arg(long, default_value_t = 5, value_parser = at_least_one, allow_negative_numbers = true)]
    steps: usize,
    /// Rounds run first and not measured (page faults, thread start-up, b_dec's
    /// initialisation at the first step).
    #[arg(long, default_value_t = 2, allow_negative_numbers = true)]
    warmup: usize,
    /// Also time steps fed by the loader from a temporary float16 .npy of 8·B rows, and the
    /// time spent waiting for each batch.
    #[arg(long)]
    data: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Memory the bench may use, such as 8GiB; a shape whose estimated need exceeds it is
    /// refused before anything is allocated [default: what the machine, its cgroup and
    /// ulimit -v leave free].
    #[arg(long, value_name = "SIZE", value_parser = super::byte_size)]
    max_memory: Option<sparse_autoencoder::memory::ByteSize>,
    #[command(flatten)]
    device: super::DeviceArgs,
}

/// Batches in the `--data` file: enough for a few rounds between refills of the shuffle
/// buffer (which holds the whole file), small enough to write in a second at D = 768.
const DATA_BATCHES: usize = 8;

/// Runs `sae bench`. Under an MPI launcher every rank steps its part of the same global
/// batch (`dist::part`), and rank 0 prints the figures with the collectives' share.
pub fn run(args: BenchArgs, world: &World) -> Result<Option<u8>> {
    let collective = world.collective();
    // Every check a rank may fail (a bad option, memory, a device) is agreed before the first
    // step, so that no rank waits in a collective for one that has stopped.
    let setup = Setup::new(&args, &collective);
    let (setup, _) = agree(&*collective, setup, false)?;
    let Setup {
        device,
        threads,
        x_bd,
        rows,
        latents,
        mut gemm,
        mut trainer,
        backend,
        exchanges,
        mut bf16,
    } = setup;
    let x_bd = x_bd.slice(s![rows.clone(), ..]);

    let data = if args.data {
        Some(DataFile::write(args.batch, args.d)?)
    } else {
        None
    };
    let mut loader = match &data {
        Some(file) => Some(file.loader(args.batch)?),
        None => None,
    };

    let (mut m, mut m_bf16) = (Measured::default(), Measured::default());
    for round in 0..args.warmup + args.steps {
        let measured = round >= args.warmup;

        let gemm = gemm.time()?;
        let bf16_gemm = bf16.as_mut().map(|side| side.gemm.time()).transpose()?;

        let (traffic, sums) = (collective.traffic(), exchanges.get());
        let t = Instant::now();
        let stats = trainer.step(x_bd).map_err(usage);
        let step = t.elapsed();
        let (traffic, sums) = (collective.traffic() - traffic, exchanges.get() - sums);
        // Outside the timed step: a rank whose step failed stops every rank.
        let (stats, _) = agree(&*collective, stats, false)?;
        let mut phases = trainer.phase_times();
        if device != Device::Cpu && measured {
            // Phases of a GPU step need waits at their boundaries: timed in a step of their own.
            trainer.set_device_phase_timing(true);
            trainer.step(x_bd).map_err(usage)?;
            phases = trainer.phase_times();
            trainer.set_device_phase_timing(false);
        }

        let fed = match loader.as_mut() {
            Some(loader) => {
                let t = Instant::now();
                let batch = loader.next_batch().context("reading the --data batch")?;
                let wait = t.elapsed();
                trainer.step(batch.view()).map_err(usage)?;
                drop(batch);
                Some((wait, t.elapsed()))
            }
            None => None,
        };

        // `--precision bf16`: the same batch through the bf16 trainer, in the same round.
        let bf16_step = match &mut bf16 {
            Some(side) => {
                let t = Instant::now();
                let stats = side.trainer.step(x_bd).map_err(usage)?;
                Some((t.elapsed(), stats.l0, side.trainer.phase_times()))
            }
            None => None,
        };

        if measured {
            if let (Some(gemm), Some((step, l0, phases))) = (bf16_gemm, bf16_step) {
                let m = &mut m_bf16;
                m.gemm.push(gemm);
                m.step.push(step);
                m.collective.push(Traffic::default());
                m.exchange.push(Duration::ZERO);
                m.l0.push(l0);
                m.phases.push(phases);
            }
            m.gemm.push(gemm);
            m.step.push(step);
            m.collective.push(traffic);
            m.exchange.push(sums);
            m.l0.push(stats.l0);
            m.phases.push(phases);
            if let Some((wait, fed_step)) = fed {
                m.wait.push(wait);
                m.fed_step.push(fed_step);
            }
        }
    }
    drop(loader);
    drop(data);

    let mut report = Report::new(&args, device, threads, backend, &m);
    report.gemm_shape = (rows.len(), latents);
    if collective.world_size() > 1 {
        // Each rank's own medians, for the balance between them.
        let mine = RankFigures::of(&m);
        let all = collective.gather_bytes(0, &mine.to_bytes());
        report.ranks = Some(RanksReport {
            size: collective.world_size(),
            latent_shards: args.latent_shards,
            local_rows: rows.len(),
            figures: all.iter().map(|b| RankFigures::from_bytes(b)).collect(),
        });
    }
    if collective.rank() == 0 {
        match &bf16 {
            None if args.json => println!("{}", report.json()),
            None => print!("{}", report.table()),
            Some(side) => {
                let backend = format!("{} (bf16 encoder GEMM, f32 accumulation)", side.kernel);
                let bf16 = Report::new(&args, device, threads, backend, &m_bf16);
                if args.json {
                    let mut json = bf16.json();
                    json["precision"] = json!("bf16");
                    json["f32"] = report.json();
                    json["gemm_speedup_over_f32"] = json!(report.gemm_ms / bf16.gemm_ms);
                    json["step_ratio_to_f32"] = json!(bf16.step_ms / report.step_ms);
                    println!("{json}");
                } else {
                    print!("{}", report.table());
                    println!("\n--precision bf16, in the same rounds:\n");
                    print!("{}", bf16.table());
                    println!(
                        "\nbf16 against f32: GEMM {:.2}× as fast ({:.1} against {:.1} GFLOP/s), \
                         step {:.3} of f32's ({:.0} against {:.0} tokens/s)",
                        report.gemm_ms / bf16.gemm_ms,
                        bf16.gemm_gflops(),
                        report.gemm_gflops(),
                        bf16.step_ms / report.step_ms,
                        bf16.tokens_per_s(bf16.step_ms),
                        report.tokens_per_s(report.step_ms)
                    );
                }
            }
        }
    }
    Ok(None)
}

/// `--precision bf16`'s second trainer and bare GEMM, timed beside the f32 ones.
struct Bf16Side {
    kernel: &'static str,
    gemm: EncoderGemm,
    trainer: Trainer,
}

/// What the bench has ready before its first round.
struct Setup {
    device: Device,
    threads: usize,
    /// The whole global batch (the same on every rank).
    x_bd: Array2<f32>,
    /// This rank's rows of it.
    rows: std::ops::Range<usize>,
    /// This rank's latents (all F unless `--latent-shards` splits them).
    latents: usize,
    gemm: EncoderGemm,
    trainer: Trainer,
    backend: String,
    exchanges: Arc<ExchangeTimes>,
    bf16: Option<Bf16Side>,
}

impl Setup {
    fn new(args: &BenchArgs, collective: &Arc<dyn Collective>) -> Result<Self> {
        let device = args.device.device()?;
        let exchanges = Arc::new(ExchangeTimes::default());
        let timed: Arc<dyn Collective> = Arc::new(TimedExchanges {
            inner: collective.clone(),
            times: exchanges.clone(),
        });
        let grid = Grid::new(timed, args.latent_shards)?;
        if grid.shards > 1 && device != Device::Cpu {
            return Err(UsageError(
                "--latent-shards above 1 runs on the CPU only; drop --device".into(),
            )
            .into());
        }
        // The groups split the batch; a group's shards split the latents.
        let (rank, size) = (grid.group(), grid.groups());
        if args.k > args.f {
            return Err(UsageError(format!(
                "invalid --k: {} is more than the {} latents of --f",
                args.k, args.f
            ))
            .into());
        }
        let bf16 = args.device.precision() == Some(Precision::Bf16);
        if bf16 && (collective.world_size() > 1 || args.data) {
            return Err(UsageError(
                "--precision bf16 times bf16 beside f32 in one process, on the in-memory \
                 batch: drop mpirun and --data for it"
                    .into(),
            )
            .into());
        }
        let bf16_kernel = match bf16 {
            true => Some(Bf16Kernel::detect().map_err(usage)?),
            false => None,
        };
        if collective.world_size() > 1 {
            if args.data {
                return Err(UsageError(
                    "--data is not supported by a distributed `sae bench`: run it without \
                     mpirun or srun (or drop --data)"
                        .into(),
                )
                .into());
            }
            if !args.batch.is_multiple_of(size) {
                return Err(sparse_autoencoder::Error::Distributed {
                    reason: match args.latent_shards {
                        1 => format!(
                            "--batch {} does not split evenly over {size} ranks: use a multiple \
                             of {size}",
                            args.batch
                        ),
                        s => format!(
                            "--batch {} does not split evenly over the {size} groups of \
                             --latent-shards {s}: use a multiple of {size}",
                            args.batch
                        ),
                    },
                }
                .into());
            }
        }
        let sae_config = SaeConfig {
            d_model: args.d,
            dict_size: args.f,
            arch: args.arch.with_k(args.k),
        };
        // Sizes are checked before anything is allocated: first that the arrays can be
        // addressed, then that they fit in the memory there is.
        sae_config
            .validate()
            .map_err(|err| UsageError(format!("invalid --f: {err}")))?;
        let latents = part(args.f, grid.shard, grid.shards);
        let latents_len = latents.len();
        let shard_config = SaeConfig {
            dict_size: latents.len(),
            ..sae_config
        };
        // The whole global batch is built on every rank (and, for relu, its pre-activations):
        // estimated at B rows, a bound on each rank's need.
        let estimate = Estimate::bench(
            &shard_config,
            args.batch,
            args.data.then_some(DATA_BATCHES),
            bf16,
        );
        memory::check(&estimate, args.max_memory).map_err(|err| {
            let option = |knob| match knob {
                Knob::BatchSize => "--batch".to_string(),
                Knob::BatchAndDictSize => "--batch or --f".to_string(),
                Knob::DictSize | Knob::Synthetic => "--f (or --d)".to_string(),
                Knob::BufferRows => "--batch (the --data file is 8 batches)".to_string(),
            };
            UsageError(format!(
                "the bench {}",
                err.describe(option, "--max-memory")
            ))
        })?;
        if let Some(threads) = args.threads {
            super::train::set_threads(threads)?;
        }
        let threads = args.threads.unwrap_or_else(rayon::current_num_threads);
        let train_config = TrainConfig {
            total_steps: 1_000_000,
            warmup_steps: 0,
            ..TrainConfig::default()
        };
        let x_bd =
            Array2::from_shape_vec((args.batch, args.d), rows(args.batch, args.d, 0).collect())
                .expect("B·D values");
        let local = part(args.batch, rank, size);
        let mut sae = Sae::new_shard(sae_config, 0, latents).map_err(usage)?;
        if args.arch == ArchName::Relu {
            sae = relu_with_density(sae, x_bd.view(), args.k)?;
        }
        // The bare GEMM gets the huge-page memory the trainer's buffers get, so the ratio
        // compares like with like; it runs on this rank's rows, as the trainer's does.
        let gemm = EncoderGemm::new(device, &sae, x_bd.slice(s![local.clone(), ..]))?;
        let sae_bf16 = sae.clone();
        let trainer = if grid.shards > 1 {
            Trainer::sharded(sae, sae_config, train_config.clone(), &grid)
        } else {
            Trainer::with_parts(
                sae,
                train_config.clone(),
                Box::new(Cpu),
                Box::new(grid.world.clone()),
            )
        }
        .map_err(usage)?;
        let trainer = trainer.to_device(device).map_err(usage)?;
        let bf16 = match bf16_kernel {
            Some(kernel) => Some(Bf16Side {
                kernel: kernel.name(),
                gemm: EncoderGemm::bf16(kernel, &sae_bf16, x_bd.slice(s![local.clone(), ..]))?,
                trainer: Trainer::new(
                    sae_bf16,
                    TrainConfig {
                        precision: Precision::Bf16,
                        ..train_config
                    },
                )
                .map_err(usage)?,
            }),
            None => None,
        };
        let backend = match device {
            Device::Cpu => Cpu.name().to_string(),
            Device::Cuda(gpu) => format!(
                "cuBLAS ({}) + NVRTC kernels on {}",
                if gpu.tf32 { "TF32" } else { "f32" },
                trainer.device_name()
            ),
        };
        Ok(Setup {
            device,
            threads,
            x_bd,
            rows: local,
            latents: latents_len,
            gemm,
            trainer,
            backend,
            exchanges,
            bf16,
        })
    }
}

/// Time spent in `all_reduce_sum_f32` and `all_gather_f32`, which the trainer calls only to
/// exchange gradients or parameters: on the sparse path the gathers of the batch's rows and of
/// every rank's updated latent rows, on the dense one the gradient sums.
#[derive(Default)]
struct ExchangeTimes {
    nanos: AtomicU64,
}

impl ExchangeTimes {
    fn get(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::Relaxed))
    }

    /// Runs `exchange`, adding its time.
    fn add(&self, exchange: impl FnOnce()) {
        let t = Instant::now();
        exchange();
        let nanos = t.elapsed().as_nanos() as u64;
        self.nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

/// The world's collective, timing its f32 sums and gathers into [`ExchangeTimes`].
struct TimedExchanges {
    inner: Arc<dyn Collective>,
    times: Arc<ExchangeTimes>,
}

impl Collective for TimedExchanges {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce_sum_u64(&self, buf: &mut [u64]) {
        self.inner.all_reduce_sum_u64(buf)
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) {
        self.inner.all_reduce_sum_f64(buf)
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) {
        self.times.add(|| self.inner.all_reduce_sum_f32(buf))
    }
    fn all_reduce_min_f32(&self, buf: &mut [f32]) {
        self.inner.all_reduce_min_f32(buf)
    }
    fn all_reduce_max_u64(&self, buf: &mut [u64]) {
        self.inner.all_reduce_max_u64(buf)
    }
    fn broadcast_bytes(&self, root: usize, buf: &mut Vec<u8>) {
        self.inner.broadcast_bytes(root, buf)
    }
    fn gather_bytes(&self, root: usize, local: &[u8]) -> Vec<Vec<u8>> {
        self.inner.gather_bytes(root, local)
    }
    fn all_gather_f32(&self, buf: &mut [f32], counts: &[usize]) {
        self.times.add(|| self.inner.all_gather_f32(buf, counts))
    }
    fn all_gather_bytes(&self, local: &[u8]) -> Vec<Vec<u8>> {
        self.inner.all_gather_bytes(local)
    }
    fn split(&self, color: usize) -> Arc<dyn Collective> {
        Arc::new(TimedExchanges {
            inner: self.inner.split(color),
            times: self.times.clone(),
        })
    }
    fn traffic(&self) -> Traffic {
        self.inner.traffic()
    }
    fn record_agreed_failure(&self) {
        self.inner.record_agreed_failure()
    }
}

/// The bare encoder GEMM x·W_encᵀ on the bench's device, in the memory the trainer's own
/// buffers get (huge pages on the CPU, device memory on a GPU), so the ratio compares like with
/// like.
enum EncoderGemm {
    Cpu {
        x_bd: Array2<f32>,
        w_enc_fd: Array2<f32>,
        gemm_bf: Array2<f32>,
    },
    Bf16 {
        kernel: Bf16Kernel,
        batch: Bf16Batch,
        w_enc: Bf16Rows,
        gemm_bf: Array2<f32>,
    },
    Cuda {
        dev: Box<sparse_autoencoder::backend::cuda::CudaDevice>,
        x_bd: sparse_autoencoder::backend::cuda::DeviceMatrix,
        w_enc_fd: sparse_autoencoder::backend::cuda::DeviceMatrix,
        gemm_bf: sparse_autoencoder::backend::cuda::DeviceMatrix,
    },
}

impl EncoderGemm {
    fn new(device: Device, sae: &Sae, x_bd: ArrayView2<'_, f32>) -> Result<Self> {
        match device {
            Device::Cpu => Ok(EncoderGemm::Cpu {
                x_bd: x_bd.to_owned(),
                w_enc_fd: huge_copy(sae.w_enc_fd()),
                gemm_bf: zeros_huge(x_bd.nrows(), sae.config().dict_size),
            }),
            Device::Cuda(gpu) => {
                let dev =
                    sparse_autoencoder::backend::cuda::CudaDevice::open(gpu).map_err(usage)?;
                Ok(EncoderGemm::Cuda {
                    x_bd: dev.upload(x_bd).map_err(usage)?,
                    w_enc_fd: dev.upload(sae.w_enc_fd()).map_err(usage)?,
                    gemm_bf: dev
                        .zeros(x_bd.nrows(), sae.config().dict_size)
                        .map_err(usage)?,
                    dev: Box::new(dev),
                })
            }
        }
    }

    /// The bf16 GEMM of `--precision bf16`: W_enc and the rows rounded beforehand, as the
    /// trainer keeps them, so that only the multiplication is timed.
    fn bf16(kernel: Bf16Kernel, sae: &Sae, x_bd: ArrayView2<'_, f32>) -> Result<Self> {
        let mut batch = Bf16Batch::default();
        let mut xc_bd = Array2::zeros(x_bd.dim());
        batch.form(x_bd, None, xc_bd.view_mut()).map_err(usage)?;
        Ok(EncoderGemm::Bf16 {
            kernel,
            batch,
            w_enc: Bf16Rows::new(sae.w_enc_fd()),
            gemm_bf: zeros_huge(x_bd.nrows(), sae.config().dict_size),
        })
    }

    /// One GEMM, timed to its end (on a GPU, until the stream has run it).
    fn time(&mut self) -> Result<Duration> {
        let t = Instant::now();
        match self {
            EncoderGemm::Cpu {
                x_bd,
                w_enc_fd,
                gemm_bf,
            } => Cpu.gemm(1.0, x_bd.view(), w_enc_fd.t(), 0.0, gemm_bf.view_mut()),
            EncoderGemm::Bf16 {
                kernel,
                batch,
                w_enc,
                gemm_bf,
            } => bf16::gemm(*kernel, batch, w_enc, gemm_bf.view_mut()).map_err(usage)?,
            EncoderGemm::Cuda {
                dev,
                x_bd,
                w_enc_fd,
                gemm_bf,
            } => {
                dev.gemm(1.0, x_bd, false, w_enc_fd, true, 0.0, gemm_bf)
                    .map_err(usage)?;
                dev.synchronize().map_err(usage)?;
            }
        }
        Ok(t.elapsed())
    }
}

/// A ReLU SAE whose codes on `x_bd` have about `k` positive entries per row: one b_enc for
/// every latent, minus the (1 − k/F) quantile of a sample of the pre-activations.
fn relu_with_density(sae: Sae, x_bd: ArrayView2<'_, f32>, k: usize) -> Result<Sae> {
    let pre_bf = sae.pre_activations(&Cpu, x_bd).map_err(usage)?;
    let mut sample: Vec<f32> = pre_bf.iter().step_by(61).copied().collect();
    let above = (sample.len() as f64 * k as f64 / sae.config().dict_size as f64) as usize;
    let rank = above.min(sample.len() - 1);
    let cut = *sample.select_nth_unstable_by(rank, |a, b| b.total_cmp(a)).1;
    let b_enc_f = sae.b_enc_f().mapv(|b| b - cut);
    Sae::from_parts(
        *sae.config(),
        sae.w_enc_fd().to_owned(),
        b_enc_f,
        sae.w_dec_fd().to_owned(),
        sae.b_dec_d().to_owned(),
    )
    .map_err(usage)
}

/// B rows of width D, activation-like and all different: column d's offset d·10⁻³ plus uniform
/// noise in [−0.5, 0.5) (the values of `cargo bench --bench loader`'s shards).
fn rows(n: usize, d: usize, seed: u64) -> impl Iterator<Item = f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n * d).map(move |i| (i % d) as f32 * 1e-3 + rng.gen::<f32>() - 0.5)
}

/// The `--data` file: a float16 [8·B, D] `.npy` in a fresh temporary directory, removed on
/// drop.
struct DataFile {
    dir: PathBuf,
    path: PathBuf,
}

impl DataFile {
    fn write(batch: usize, d: usize) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("sae-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let file = DataFile {
            path: dir.join("acts_f16.npy"),
            dir,
        };
        let n = batch * DATA_BATCHES;
        write_f16(&file.path, n, d, rows(n, d, 1))
            .with_context(|| format!("writing {}", file.path.display()))?;
        Ok(file)
    }

    fn loader(&self, batch: usize) -> Result<Prefetcher> {
        let source = NpyShards::open(&[&self.path])?;
        let config = LoaderConfig {
            batch_size: batch,
            ..LoaderConfig::default()
        };
        Ok(Prefetcher::new(Batcher::new(source, config)?))
    }
}

impl Drop for DataFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn write_f16(path: &Path, n: usize, d: usize, values: impl Iterator<Item = f32>) -> Result<()> {
    let file = std::fs::File::create(path)?;
    let mut writer = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&[n as u64, d as u64])
        .writer(BufWriter::with_capacity(1 << 22, file))
        .begin_nd()?;
    writer.extend(values.map(f16::from_f32))?;
    writer.finish()?;
    Ok(())
}

/// Every measured round's times.
#[derive(Default)]
struct Measured {
    gemm: Vec<Duration>,
    step: Vec<Duration>,
    phases: Vec<PhaseTimes>,
    /// What each step's collectives cost (nothing in one process).
    collective: Vec<Traffic>,
    /// Of that, the time exchanging gradients or parameters (`all_reduce_sum_f32`, `all_gather_f32`).
    exchange: Vec<Duration>,
    /// Active codes per row in each step.
    l0: Vec<f32>,
    /// `--data` only: waiting in `Prefetcher::next_batch`, and that wait plus the step.
    wait: Vec<Duration>,
    fed_step: Vec<Duration>,
}

/// One rank's medians over the measured steps, as rank 0 gathers them.
#[derive(Clone, Copy, Debug, PartialEq)]
struct RankFigures {
    step_ms: f64,
    /// Inside collectives, waiting for other ranks included.
    collective_ms: f64,
    /// Of that, in the f32 sums and gathers that exchange gradients or parameters.
    exchange_ms: f64,
    /// The step outside collectives (per step, then the median).
    compute_ms: f64,
    /// Bytes this rank sent.
    bytes_sent: f64,
    /// Collective operations called.
    calls: f64,
}

impl RankFigures {
    fn of(m: &Measured) -> Self {
        RankFigures {
            step_ms: median_ms(m.step.iter().copied()),
            collective_ms: median_ms(m.collective.iter().map(|t| t.time)),
            exchange_ms: median_ms(m.exchange.iter().copied()),
            compute_ms: median_ms(
                m.step
                    .iter()
                    .zip(&m.collective)
                    .map(|(&step, t)| step.saturating_sub(t.time)),
            ),
            bytes_sent: median(m.collective.iter().map(|t| t.bytes_sent as f64)),
            calls: median(m.collective.iter().map(|t| t.calls as f64)),
        }
    }

    fn to_bytes(self) -> Vec<u8> {
        [
            self.step_ms,
            self.collective_ms,
            self.exchange_ms,
            self.compute_ms,
            self.bytes_sent,
            self.calls,
        ]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
    }

    /// The inverse of [`RankFigures::to_bytes`] (NaN for what is missing).
    fn from_bytes(bytes: &[u8]) -> Self {
        let at = |i: usize| {
            bytes.get(8 * i..8 * i + 8).map_or(f64::NAN, |b| {
                f64::from_le_bytes(b.try_into().expect("8 bytes"))
            })
        };
        RankFigures {
            step_ms: at(0),
            collective_ms: at(1),
            exchange_ms: at(2),
            compute_ms: at(3),
            bytes_sent: at(4),
            calls: at(5),
        }
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "step_ms": self.step_ms,
            "collective_ms": self.collective_ms,
            "exchange_ms": self.exchange_ms,
            "compute_ms": self.compute_ms,
            "bytes_sent_per_step": self.bytes_sent,
            "collective_calls_per_step": self.calls,
        })
    }
}

/// The processes of a distributed bench.
struct RanksReport {
    size: usize,
    /// Ranks that split one group's latents (`--latent-shards`).
    latent_shards: usize,
    /// Rows of the global batch each rank steps.
    local_rows: usize,
    /// Every rank's figures, in rank order.
    figures: Vec<RankFigures>,
}

/// The median (the mean of the middle two for an even count); NaN for none.
fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The median in milliseconds (the mean of the middle two for an even count).
fn median_ms(times: impl IntoIterator<Item = Duration>) -> f64 {
    median(times.into_iter().map(|t| t.as_secs_f64() * 1e3))
}

fn max_ms(times: &[Duration]) -> f64 {
    times
        .iter()
        .map(|t| t.as_secs_f64() * 1e3)
        .fold(0.0, f64::max)
}

/// The loader-fed figures.
struct DataReport {
    rows: usize,
    wait_ms: f64,
    wait_max_ms: f64,
    step_ms: f64,
}

/// Medians and what follows from them.
struct Report {
    d: usize,
    f: usize,
    k: usize,
    batch: usize,
    arch: &'static str,
    threads: usize,
    /// What runs the GEMMs (and, on a GPU, the step).
    backend: String,
    steps: usize,
    warmup: usize,
    gemm_ms: f64,
    /// The rows and latents of this rank's GEMM (B and F in one process).
    gemm_shape: (usize, usize),
    step_ms: f64,
    /// Median active codes per row.
    l0: f64,
    /// (name, what it covers, median ms), in step order.
    phases: Vec<(&'static str, &'static str, f64)>,
    /// The median of each round's step time outside the five phases (input checks, the
    /// bookkeeping between them): per round, so it is not lost in the medians' own spread.
    other_ms: f64,
    data: Option<DataReport>,
    /// This process's collectives (zeros in one process).
    collectives: RankFigures,
    /// Under mpirun: every rank's figures.
    ranks: Option<RanksReport>,
}

impl Report {
    fn new(
        args: &BenchArgs,
        device: Device,
        threads: usize,
        backend: String,
        m: &Measured,
    ) -> Self {
        let phase = |get: fn(&PhaseTimes) -> Duration| median_ms(m.phases.iter().map(get));
        // A GPU step's phases come from separate steps that wait at each boundary; what lies
        // outside them is then not comparable with the unsynchronised step time.
        let timed = device == Device::Cpu;
        let phases = vec![
            ("encode", "x - b_dec, encoder GEMM", phase(|p| p.encode)),
            ("select", "sparsification", phase(|p| p.select)),
            ("decode_loss", "decoding, losses", phase(|p| p.decode_loss)),
            ("backward", "gradients", phase(|p| p.backward)),
            ("update", "projection, Adam", phase(|p| p.update)),
        ];
        Report {
            d: args.d,
            f: args.f,
            k: args.k,
            batch: args.batch,
            arch: args.arch.as_str(),
            threads,
            backend,
            steps: args.steps,
            warmup: args.warmup,
            gemm_ms: median_ms(m.gemm.iter().copied()),
            gemm_shape: (args.batch, args.f),
            step_ms: median_ms(m.step.iter().copied()),
            l0: {
                let mut l0 = m.l0.clone();
                l0.sort_by(f32::total_cmp);
                l0.get(l0.len() / 2).map_or(f64::NAN, |&v| v as f64)
            },
            phases,
            other_ms: if timed {
                median_ms(m.step.iter().zip(&m.phases).map(|(&step, p)| {
                    step.saturating_sub(p.encode + p.select + p.decode_loss + p.backward + p.update)
                }))
            } else {
                f64::NAN
            },
            data: (!m.fed_step.is_empty()).then(|| DataReport {
                rows: args.batch * DATA_BATCHES,
                wait_ms: median_ms(m.wait.iter().copied()),
                wait_max_ms: max_ms(&m.wait),
                step_ms: median_ms(m.fed_step.iter().copied()),
            }),
            collectives: RankFigures::of(m),
            ranks: None,
        }
    }

    fn tokens_per_s(&self, step_ms: f64) -> f64 {
        self.batch as f64 / (step_ms / 1e3)
    }

    /// GEMM throughput: 2·B·D·F flops, at this rank's rows and latents.
    fn gemm_gflops(&self) -> f64 {
        let (rows, latents) = self.gemm_shape;
        2.0 * rows as f64 * self.d as f64 * latents as f64 / (self.gemm_ms / 1e3) / 1e9
    }

    fn json(&self) -> serde_json::Value {
        let phases: serde_json::Map<String, serde_json::Value> = self
            .phases
            .iter()
            .map(|&(name, _, ms)| (name.to_string(), json!(ms)))
            .collect();
        json!({
            "d": self.d,
            "f": self.f,
            "k": self.k,
            "batch": self.batch,
            "arch": self.arch,
            "threads": self.threads,
            "backend": self.backend,
            "steps": self.steps,
            "warmup": self.warmup,
            "gemm_ms": self.gemm_ms,
            "gemm_gflops": self.gemm_gflops(),
            "step_ms": self.step_ms,
            "ratio": self.step_ms / self.gemm_ms,
            "tokens_per_s": self.tokens_per_s(self.step_ms),
            "l0": self.l0,
            "phases_ms": phases,
            "other_ms": self.other_ms,
            "ranks": self.ranks.as_ref().map_or(1, |r| r.size),
            "latent_shards": self.ranks.as_ref().map_or(1, |r| r.latent_shards),
            "gemm_rows": self.gemm_shape.0,
            "gemm_latents": self.gemm_shape.1,
            "local_rows": self.ranks.as_ref().map_or(self.batch, |r| r.local_rows),
            "collective_ms": self.collectives.collective_ms,
            "exchange_ms": self.collectives.exchange_ms,
            "compute_ms": self.collectives.compute_ms,
            "bytes_sent_per_step": self.collectives.bytes_sent,
            "per_rank": self.ranks.as_ref().map(|r| {
                r.figures.iter().map(RankFigures::json).collect::<Vec<_>>()
            }),
            "data": self.data.as_ref().map(|data| json!({
                "dtype": "float16",
                "rows": data.rows,
                "wait_ms": data.wait_ms,
                "wait_max_ms": data.wait_max_ms,
                "step_ms": data.step_ms,
                "tokens_per_s": self.tokens_per_s(data.step_ms),
            })),
        })
    }

    fn table(&self) -> String {
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        line(format!(
            "shape: D={} F={} k={} B={}  arch: {}  threads: {}  backend: {}",
            self.d, self.f, self.k, self.batch, self.arch, self.threads, self.backend
        ));
        line(format!(
            "medians of {} rounds after {} warm-up (GEMM and step alternate in each round)",
            self.steps, self.warmup
        ));
        line(String::new());
        line(format!("{:<34} {:>10}  {:>6}", "", "ms", "share"));
        let (rows, latents) = self.gemm_shape;
        line(format!(
            "{:<34} {:>10.3}  {:>6}   {:.1} GFLOP/s",
            format!("encoder GEMM ({rows}x{})·({}x{latents})", self.d, self.d),
            self.gemm_ms,
            "",
            self.gemm_gflops()
        ));
        line(format!(
            "{:<34} {:>10.3}  {:>5.1}%",
            "training step", self.step_ms, 100.0
        ));
        for &(name, covers, ms) in &self.phases {
            line(format!(
                "{:<34} {:>10.3}  {:>5.1}%",
                format!("  {name} ({covers})"),
                ms,
                100.0 * ms / self.step_ms
            ));
        }
        let other = self.other_ms;
        if !other.is_nan() {
            line(format!(
                "{:<34} {:>10.3}  {:>5.1}%",
                "  other (outside the phases)",
                other,
                100.0 * other / self.step_ms
            ));
        }
        line(String::new());
        line(format!(
            "ratio step/GEMM: {:.3}",
            self.step_ms / self.gemm_ms
        ));
        line(format!(
            "tokens/s: {:.0}{}",
            self.tokens_per_s(self.step_ms),
            match &self.ranks {
                Some(r) => format!(" (the global batch of {} ranks)", r.size),
                None => String::new(),
            }
        ));
        line(format!(
            "active codes per row (L0): {:.1} ({:.2}% of F)",
            self.l0,
            100.0 * self.l0 / self.f as f64
        ));
        if let Some(ranks) = &self.ranks {
            line(String::new());
            let layout = match ranks.latent_shards {
                1 => format!("{} ranks", ranks.size),
                s => format!(
                    "{} ranks ({} of {s} latent shards, {latents} latents a rank)",
                    ranks.size,
                    match ranks.size / s {
                        1 => "one group".to_string(),
                        g => format!("{g} groups"),
                    },
                ),
            };
            line(format!(
                "{layout}, {} rows each (medians per step; collectives include waiting for the \
                 other ranks):",
                ranks.local_rows
            ));
            line(format!(
                "  {:<6} {:>10} {:>12} {:>12} {:>10} {:>14} {:>6}",
                "rank", "step ms", "compute ms", "collect. ms", "exch. ms", "MB sent", "calls"
            ));
            for (rank, r) in ranks.figures.iter().enumerate() {
                line(format!(
                    "  {:<6} {:>10.3} {:>12.3} {:>12.3} {:>10.3} {:>14.3} {:>6.0}",
                    rank,
                    r.step_ms,
                    r.compute_ms,
                    r.collective_ms,
                    r.exchange_ms,
                    r.bytes_sent / 1e6,
                    r.calls
                ));
            }
            line(
                "  (phases above are rank 0's; exch.: its f32 sums and gathers: gradients or \
                 parameters in backward and update, and with latent shards the partial x̂ \
                 summed)"
                    .to_string(),
            );
        }
        if let Some(data) = &self.data {
            line(String::new());
            line(format!(
                "loader-fed step (float16 .npy, {} rows, shuffle buffer + prefetch thread):",
                data.rows
            ));
            line(format!(
                "{:<34} {:>10.3}  {:>5.1}%   max {:.2} ms",
                "  data (wait in next_batch)",
                data.wait_ms,
                100.0 * data.wait_ms / data.step_ms,
                data.wait_max_ms
            ));
            line(format!(
                "{:<34} {:>10.3}  {:>5.1}%",
                "  step incl. wait", data.step_ms, 100.0
            ));
            line(format!(
                "  ratio fed/in-memory: {:.3}   tokens/s: {:.0}",
                data.step_ms / self.step_ms,
                self.tokens_per_s(data.step_ms)
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::median_ms;
    use std::time::Duration;

    #[test]
    fn median_of_odd_and_even_counts() {
        let ms = |v: &[u64]| {
            v.iter()
                .map(|&m| Duration::from_millis(m))
                .collect::<Vec<_>>()
        };
        assert_eq!(median_ms(ms(&[5, 1, 3])), 3.0);
        assert_eq!(median_ms(ms(&[4, 1, 3, 2])), 2.5);
        assert!(median_ms(ms(&[])).is_nan());
    }
}
