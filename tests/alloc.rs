//! Steady-state training allocates no B×F or F×D buffer: after the first steps, workspaces,
//! gradients and moments are reused (issue 5). A counting allocator records every allocation
//! this test process makes.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use sparse_autoencoder::{Architecture, Sae, SaeConfig, TrainConfig, Trainer};

/// Passes every call to the system allocator; while `WATCH` is on, remembers the largest
/// allocation and counts those of at least `BIG` bytes.
struct Counting;

static WATCH: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);
static BIG_COUNT: AtomicUsize = AtomicUsize::new(0);
static BIG: AtomicUsize = AtomicUsize::new(usize::MAX);

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
    if WATCH.load(Ordering::Relaxed) {
        LARGEST.fetch_max(size, Ordering::Relaxed);
        if size >= BIG.load(Ordering::Relaxed) {
            BIG_COUNT.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn steady_state_steps_allocate_no_batch_by_latent_or_latent_by_width_buffer() {
    // F×D = 4 MiB of f32 and B×F = 8 MiB: far above any buffer sized by the GEMM's own
    // blocking, so only a per-step copy of a workspace, a gradient or a moment could reach it.
    let (b, d, f) = (256, 128, 8192);
    BIG.store(4 * f * d.min(b), Ordering::Relaxed);
    for arch in [
        Architecture::TopK { k: 16 },
        Architecture::BatchTopK { k: 16 },
        Architecture::RELU,
    ] {
        let config = SaeConfig {
            d_model: d,
            dict_size: f,
            arch,
        };
        let train = TrainConfig {
            total_steps: 100,
            warmup_steps: 1,
            threshold_start_step: 1,
            sparsity_warmup_steps: 10,
            // Every latent dead at once: AuxK's buffers take part too.
            dead_tokens: 1,
            ..TrainConfig::default()
        };
        let mut trainer = Trainer::new(Sae::new(config, 0).unwrap(), train).unwrap();
        let batches: Vec<_> = (0..2).map(|s| common::synthetic_batch(b, d, s)).collect();
        for x in &batches {
            trainer.step(x.view()).unwrap();
        }
        LARGEST.store(0, Ordering::Relaxed);
        BIG_COUNT.store(0, Ordering::Relaxed);
        WATCH.store(true, Ordering::Relaxed);
        for x in batches.iter().cycle().take(3) {
            trainer.step(x.view()).unwrap();
        }
        WATCH.store(false, Ordering::Relaxed);
        let (largest, big) = (
            LARGEST.load(Ordering::Relaxed),
            BIG_COUNT.load(Ordering::Relaxed),
        );
        assert_eq!(
            big,
            0,
            "{arch:?}: {big} allocations of ≥ {} bytes in 3 steady steps (largest {largest})",
            BIG.load(Ordering::Relaxed)
        );
    }
}
