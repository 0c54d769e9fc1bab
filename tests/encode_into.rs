//! `Sae::encode_into` and `EncodeBuffers` (the codes of `Sae::encode`, bit for bit, into the
//! caller's reused buffers, allocating nothing after warm-up), the borrowed CSR view
//! `SparseCodes` (its checked constructor) and `Sae::decode_into`.
//!
//! A counting allocator records the allocations of the threads a test marks (its own and the
//! threads of a rayon pool it builds), so the other tests of this binary, running at the same
//! time, are not counted.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use ndarray::{Array1, Array2, ArrayView2, ArrayViewMut2, ShapeBuilder};
use sparse_autoencoder::backend::bf16::Bf16Kernel;
use sparse_autoencoder::backend::{Backend, Cpu, Device};
use sparse_autoencoder::EncodeBuffers;
use sparse_autoencoder::SparseCodes;
use sparse_autoencoder::{
    Architecture, Codes, Error, Precision, Sae, SaeConfig, TrainConfig, Trainer,
};

struct Counting;

thread_local! {
    /// Whether this thread's allocations count while `ARMED`.
    static MARKED: Cell<bool> = const { Cell::new(false) };
}
static ARMED: AtomicBool = AtomicBool::new(false);
static COUNT: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);
/// One test at a time arms the counter.
static COUNTER: std::sync::Mutex<()> = std::sync::Mutex::new(());

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

fn note(size: usize) {
    // `try_with`: a thread's allocations while its locals are torn down do not count.
    if ARMED.load(Ordering::Relaxed) && MARKED.try_with(Cell::get).unwrap_or(false) {
        COUNT.fetch_add(1, Ordering::Relaxed);
        LARGEST.fetch_max(size, Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// (allocations, largest size) by the marked threads while `f` runs.
fn counted(f: impl FnOnce()) -> (usize, usize) {
    COUNT.store(0, Ordering::Relaxed);
    LARGEST.store(0, Ordering::Relaxed);
    ARMED.store(true, Ordering::Relaxed);
    f();
    ARMED.store(false, Ordering::Relaxed);
    (
        COUNT.load(Ordering::Relaxed),
        LARGEST.load(Ordering::Relaxed),
    )
}

/// A rayon pool of two threads whose allocations count, and this thread's too. Jobs run in it
/// through one `install`, so rayon's own bookkeeping (the injector's blocks of 63 jobs, each
/// worker's deque of 64) is made before counting starts and never grows.
fn marked_pool() -> rayon::ThreadPool {
    MARKED.with(|m| m.set(true));
    rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .start_handler(|_| MARKED.with(|m| m.set(true)))
        .build()
        .unwrap()
}

/// A GEMM that allocates nothing (matrixmultiply allocates its packing space on every call),
/// so that what is counted is the encoder's own. Naive, for small shapes only.
struct NoAllocGemm;

impl Backend for NoAllocGemm {
    fn name(&self) -> &'static str {
        "naive"
    }
    fn gemm(
        &self,
        alpha: f32,
        a: ArrayView2<'_, f32>,
        b: ArrayView2<'_, f32>,
        beta: f32,
        mut c: ArrayViewMut2<'_, f32>,
    ) {
        for ((i, j), c) in c.indexed_iter_mut() {
            let dot: f32 = a.row(i).iter().zip(b.column(j)).map(|(x, y)| x * y).sum();
            *c = alpha * dot + if beta == 0.0 { 0.0 } else { beta * *c };
        }
    }
}

const D: usize = 16;
const F: usize = 96;

fn config(arch: Architecture) -> SaeConfig {
    SaeConfig {
        d_model: D,
        dict_size: F,
        arch,
    }
}

/// An SAE of `arch` with random parameters; JumpReLU's θ_j spread over the pre-activations'
/// range, so that some codes pass and some do not.
fn sae_of(arch: Architecture, seed: u64) -> Sae {
    let mut sae = common::random_sae(arch, D, F, seed);
    if arch == Architecture::JumpRelu {
        let theta = Array1::from_shape_fn(F, |j| (j % 7) as f32 * 0.15 - 0.2);
        sae.set_latent_thresholds(theta).unwrap();
    }
    sae
}

/// A BatchTopK-rule SAE (`arch`) trained a few steps past its threshold's start, so that it
/// encodes with θ.
fn trained_with_theta(arch: Architecture) -> Sae {
    let train = TrainConfig {
        total_steps: 20,
        warmup_steps: 1,
        threshold_start_step: 1,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(Sae::new(config(arch), 3).unwrap(), train).unwrap();
    for s in 0..4 {
        trainer
            .step(common::synthetic_batch(32, D, s).view())
            .unwrap();
    }
    let sae = trainer.into_sae();
    assert!(sae.threshold().is_some(), "{arch:?}: θ is set");
    sae
}

/// Every architecture, BatchTopK and Matryoshka with and without θ.
fn every_architecture() -> Vec<(String, Sae)> {
    let mut saes: Vec<(String, Sae)> = [
        Architecture::RELU,
        Architecture::TopK { k: 5 },
        Architecture::BatchTopK { k: 5 },
        Architecture::JumpRelu,
        Architecture::Matryoshka { k: 5 },
    ]
    .into_iter()
    .enumerate()
    .map(|(i, arch)| (format!("{arch:?}"), sae_of(arch, i as u64)))
    .collect();
    for arch in [
        Architecture::BatchTopK { k: 5 },
        Architecture::Matryoshka { k: 5 },
    ] {
        saes.push((format!("{arch:?} with θ"), trained_with_theta(arch)));
    }
    saes
}

/// Batches of several sizes (growing, shrinking, growing again), from several seeds.
fn batches() -> Vec<Array2<f32>> {
    [40, 40, 13, 1, 64, 24]
        .iter()
        .enumerate()
        .map(|(s, &b)| common::synthetic_batch(b, D, s as u64))
        .collect()
}

/// The same codes, values compared by their bits.
fn assert_same_bits(got: SparseCodes<'_>, expected: &Codes, what: &str) {
    assert_eq!(got.n_latents(), expected.n_latents, "{what}: n_latents");
    assert_eq!(got.indptr(), &expected.indptr[..], "{what}: indptr");
    assert_eq!(got.indices(), &expected.indices[..], "{what}: indices");
    let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(got.values()), bits(&expected.values), "{what}: values");
}

fn assert_same_array_bits(got: &Array2<f32>, expected: &Array2<f32>, what: &str) {
    assert_eq!(got.dim(), expected.dim(), "{what}");
    let same = got
        .iter()
        .zip(expected)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same, "{what}: {got} != {expected}");
}

#[test]
fn encode_into_gives_the_bits_of_encode_for_every_architecture() {
    for (name, sae) in every_architecture() {
        // One set of buffers across every batch size and, below, every SAE.
        let mut buffers = EncodeBuffers::new();
        let mut encoder = sae.encoder(Device::Cpu).unwrap();
        let mut nnz = 0;
        for (i, x_bd) in batches().iter().enumerate() {
            let what = format!("{name}, batch {i} ({} rows)", x_bd.nrows());
            let expected = sae.encode(&Cpu, x_bd.view()).unwrap();
            let codes = sae.encode_into(&Cpu, x_bd.view(), &mut buffers).unwrap();
            assert_same_bits(codes, &expected, &what);
            assert_same_bits(buffers.codes(), &expected, &what);
            assert_same_bits(
                encoder.encode(x_bd.view()).unwrap().view(),
                &expected,
                &what,
            );
            nnz += expected.nnz();
        }
        assert!(nnz > 0, "{name}: some codes");
        // A rejected batch is rejected as encode rejects it.
        let bad = Array2::zeros((3, D + 1));
        assert!(matches!(
            sae.encode_into(&Cpu, bad.view(), &mut buffers),
            Err(Error::Shape { .. })
        ));
        let empty = Array2::zeros((0, D));
        assert!(matches!(
            sae.encode_into(&Cpu, empty.view(), &mut buffers),
            Err(Error::Empty { .. })
        ));
    }
    // Buffers grown by a larger SAE serve a smaller one, and the other way round.
    let big = common::random_sae(Architecture::TopK { k: 3 }, 2 * D, 2 * F, 9);
    let small = sae_of(Architecture::TopK { k: 3 }, 10);
    let mut buffers = EncodeBuffers::new();
    for sae in [&big, &small, &big] {
        let x_bd = common::synthetic_batch(20, sae.config().d_model, 1);
        let expected = sae.encode(&Cpu, x_bd.view()).unwrap();
        let codes = sae.encode_into(&Cpu, x_bd.view(), &mut buffers).unwrap();
        assert_same_bits(codes, &expected, "buffers across SAEs");
    }
    assert_eq!(buffers.into_codes().n_latents, 2 * F);
}

/// The kernel, or why this test cannot run here (printed, so a skip is visible).
fn bf16_or_skip() -> Option<Bf16Kernel> {
    match Bf16Kernel::detect() {
        Ok(kernel) => Some(kernel),
        Err(err) => {
            eprintln!("skipped: {err}");
            None
        }
    }
}

#[test]
fn bf16_encode_into_gives_the_bits_of_encode_and_follows_a_changed_sae() {
    if bf16_or_skip().is_none() {
        return;
    }
    let mut buffers = EncodeBuffers::new();
    for (name, mut sae) in every_architecture() {
        sae.set_precision(Precision::Bf16).unwrap();
        for (i, x_bd) in batches().iter().enumerate() {
            let what = format!("bf16 {name}, batch {i}");
            let expected = sae.encode(&Cpu, x_bd.view()).unwrap();
            let codes = sae.encode_into(&Cpu, x_bd.view(), &mut buffers).unwrap();
            assert_same_bits(codes, &expected, &what);
            let mut encoder = sae.encoder(Device::Cpu).unwrap();
            assert_same_bits(
                encoder.encode(x_bd.view()).unwrap().view(),
                &expected,
                &what,
            );
        }
        // bf16 rounds: the codes differ from f32's somewhere, so the test sees the bf16 path.
        let x_bd = &batches()[0];
        let bf16 = sae.encode(&Cpu, x_bd.view()).unwrap();
        let mut f32_sae = sae.clone();
        f32_sae.set_precision(Precision::F32).unwrap();
        assert_ne!(bf16, f32_sae.encode(&Cpu, x_bd.view()).unwrap(), "{name}");
        // W_enc changed in place: the buffers' bf16 copy follows it.
        sae.params_mut().w_enc_fd.mapv_inplace(|w| w * -1.5 + 0.01);
        let expected = sae.encode(&Cpu, x_bd.view()).unwrap();
        assert_ne!(expected, bf16, "{name}: the change changes the codes");
        let codes = sae.encode_into(&Cpu, x_bd.view(), &mut buffers).unwrap();
        assert_same_bits(codes, &expected, &format!("bf16 {name} after a change"));
    }
}

#[test]
fn encode_into_allocates_nothing_after_warm_up() {
    let _one = COUNTER.lock().unwrap_or_else(|e| e.into_inner());
    let pool = marked_pool();
    let x_bd = common::synthetic_batch(64, D, 7);
    // After one batch of 64 rows: the same batch, its first rows (fewer), and all 64 again.
    let rows = [64, 64, 40, 9, 1, 64];
    for (name, sae) in every_architecture() {
        pool.install(|| {
            let mut buffers = EncodeBuffers::new();
            let mut x_hat_bd = Array2::zeros((64, D));
            sae.encode_into(&NoAllocGemm, x_bd.view(), &mut buffers)
                .unwrap();
            let (count, largest) = counted(|| {
                for &b in &rows {
                    let x = x_bd.slice(ndarray::s![..b, ..]);
                    let codes = sae.encode_into(&NoAllocGemm, x, &mut buffers).unwrap();
                    let x_hat = x_hat_bd.slice_mut(ndarray::s![..b, ..]);
                    sae.decode_into(codes, x_hat).unwrap();
                }
            });
            assert_eq!(
                (count, largest),
                (0, 0),
                "{name}: allocations (and the largest) in {} calls after warm-up",
                rows.len()
            );
            // With the crate's CPU GEMM: nothing beyond what the GEMM alone allocates.
            let (xc, mut gemm_bf) = (Array2::zeros((64, D)), Array2::zeros((64, F)));
            Cpu.gemm(1.0, xc.view(), sae.w_enc_fd().t(), 0.0, gemm_bf.view_mut());
            let (gemm_count, _) =
                counted(|| Cpu.gemm(1.0, xc.view(), sae.w_enc_fd().t(), 0.0, gemm_bf.view_mut()));
            sae.encode_into(&Cpu, x_bd.view(), &mut buffers).unwrap();
            let (count, _) = counted(|| {
                sae.encode_into(&Cpu, x_bd.view(), &mut buffers).unwrap();
            });
            assert_eq!(count, gemm_count, "{name}: allocations beside the GEMM's");
        });
    }
}

#[test]
fn bf16_encode_into_allocates_nothing_after_warm_up() {
    if bf16_or_skip().is_none() {
        return;
    }
    let _one = COUNTER.lock().unwrap_or_else(|e| e.into_inner());
    let pool = marked_pool();
    let b = 64;
    let x_bd = common::synthetic_batch(b, D, 7);
    for (name, mut sae) in every_architecture() {
        sae.set_precision(Precision::Bf16).unwrap();
        pool.install(|| {
            let mut buffers = EncodeBuffers::new();
            sae.encode_into(&Cpu, x_bd.view(), &mut buffers).unwrap();
            let (count, largest) = counted(|| {
                for b in [64, 40, 64] {
                    let x = x_bd.slice(ndarray::s![..b, ..]);
                    sae.encode_into(&Cpu, x, &mut buffers).unwrap();
                }
            });
            assert_eq!(
                (count, largest),
                (0, 0),
                "bf16 {name}: allocations (count, largest bytes) in 3 calls"
            );
        });
    }
}

#[test]
fn sparse_codes_new_rejects_each_malformed_input() {
    let out_of_range = |r: sparse_autoencoder::Result<SparseCodes<'_>>, part: &str| match r {
        Err(err @ Error::OutOfRange { .. }) => {
            assert!(err.to_string().contains(part), "{err} should name {part}")
        }
        other => panic!("{part}: expected OutOfRange, got {other:?}"),
    };
    let (indices, values) = ([1u32, 5, 0, 7], [0.5f32, 2.0, 1.0, 3.0]);
    let good = SparseCodes::new(8, &[0, 2, 2, 4], &indices, &values).unwrap();
    assert_eq!((good.n_rows(), good.nnz(), good.n_latents()), (3, 4, 8));
    assert_eq!(good.row(1), (&[][..], &[][..]));
    assert_eq!(good.row(2), (&[0u32, 7][..], &[1.0f32, 3.0][..]));
    assert!(good.is_canonical());
    assert_eq!(good.mean_l0(), 4.0 / 3.0);
    assert_eq!(good.to_codes().view(), good);
    // No rows at all.
    let none = SparseCodes::new(8, &[0], &[], &[]).unwrap();
    assert_eq!((none.n_rows(), none.to_dense().dim()), (0, (0, 8)));

    assert!(matches!(
        SparseCodes::new(8, &[], &[], &[]),
        Err(Error::Shape { .. })
    ));
    match SparseCodes::new(8, &[0, 2, 2, 4], &indices, &values[..3]) {
        Err(Error::Shape {
            what,
            expected,
            got,
        }) => {
            assert!(what.contains("values"), "{what}");
            assert_eq!((expected, got), (vec![4], vec![3]));
        }
        other => panic!("expected Shape, got {other:?}"),
    }
    out_of_range(
        SparseCodes::new(8, &[1, 2, 2, 4], &indices, &values),
        "indptr[0]",
    );
    // Decreasing, past the end of indices, and ending short of it.
    out_of_range(
        SparseCodes::new(8, &[0, 3, 2, 4], &indices, &values),
        "indptr[2], the end of row 1",
    );
    out_of_range(
        SparseCodes::new(8, &[0, 2, 5, 4], &indices, &values),
        "indptr[2], the end of row 1",
    );
    out_of_range(
        SparseCodes::new(8, &[0, 2, 2, 3], &indices, &values),
        "indptr[3], the end of the last row",
    );
    // A latent at or past F, and an int32 index of -1 as u32 reads it.
    out_of_range(
        SparseCodes::new(7, &[0, 2, 2, 4], &indices, &values),
        "indices[3], a latent of row 2",
    );
    let negative = [1u32, (-1i32) as u32, 0, 7];
    out_of_range(
        SparseCodes::new(8, &[0, 2, 2, 4], &negative, &values),
        "indices[1], a latent of row 0",
    );
    for bad in [f32::NAN, f32::INFINITY] {
        let values = [0.5f32, 2.0, bad, 3.0];
        assert!(matches!(
            SparseCodes::new(8, &[0, 2, 2, 4], &indices, &values),
            Err(Error::NonFinite { row: 2, .. })
        ));
    }
    // Not ascending, and a latent twice: accepted (scipy allows both), summed like scipy.
    let loose = SparseCodes::new(8, &[0, 3], &[5, 1, 5], &[1.0, 2.0, 0.5]).unwrap();
    assert!(!loose.is_canonical());
    let mut dense = Array2::zeros((1, 8));
    dense[[0, 1]] = 2.0;
    dense[[0, 5]] = 1.5;
    assert_eq!(loose.to_dense(), dense);
}

#[test]
fn decode_of_a_view_from_raw_slices_equals_decode_of_the_codes() {
    for (name, sae) in every_architecture() {
        let x_bd = common::synthetic_batch(37, D, 2);
        let codes = sae.encode(&Cpu, x_bd.view()).unwrap();
        // The three arrays as another tool holds them: its own memory.
        let (indptr, indices, values) = (
            codes.indptr.clone(),
            codes.indices.clone(),
            codes.values.clone(),
        );
        let view = SparseCodes::new(F, &indptr, &indices, &values).unwrap();
        assert_eq!(view, codes.view());
        assert_eq!(view.to_dense(), codes.to_dense());
        let expected = sae.decode(&codes).unwrap();
        assert_same_array_bits(&sae.decode(view).unwrap(), &expected, &name);
        let mut x_hat_bd = Array2::from_elem((37, D), f32::NAN);
        sae.decode_into(view, x_hat_bd.view_mut()).unwrap();
        assert_same_array_bits(&x_hat_bd, &expected, &name);
        // Into a column of a wider array: rows still contiguous.
        let mut wide = Array2::from_elem((37, 2 * D), f32::NAN);
        sae.decode_into(&codes, wide.slice_mut(ndarray::s![.., D..]))
            .unwrap();
        assert_same_array_bits(
            &wide.slice(ndarray::s![.., D..]).to_owned(),
            &expected,
            &name,
        );

        // Wrong output shape, rows not contiguous, codes of another F.
        let mut short = Array2::zeros((36, D));
        assert!(matches!(
            sae.decode_into(view, short.view_mut()),
            Err(Error::Shape { .. })
        ));
        let mut column_major = Array2::zeros((37, D).f());
        assert!(matches!(
            sae.decode_into(view, column_major.view_mut()),
            Err(Error::Shape { .. })
        ));
        let other = SparseCodes::new(F + 1, &indptr, &indices, &values).unwrap();
        assert!(matches!(sae.decode(other), Err(Error::Shape { .. })));
    }
    // A latent listed twice decodes as once with the sum (up to rounding).
    let sae = sae_of(Architecture::RELU, 4);
    let twice = SparseCodes::new(F, &[0, 2], &[3, 3], &[0.25, 0.5]).unwrap();
    let once = SparseCodes::new(F, &[0, 1], &[3], &[0.75]).unwrap();
    let diff = sae.decode(twice).unwrap() - sae.decode(once).unwrap();
    assert!(diff.iter().all(|v| v.abs() < 1e-6), "{diff}");
}

/// The buffers can live in another thread's object (a Python binding's, say) and the views
/// cross threads.
#[test]
fn buffers_and_views_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<EncodeBuffers>();
    send_sync::<SparseCodes<'static>>();
}
