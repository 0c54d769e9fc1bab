//! Runtime CPU-feature dispatch for the hand-written kernels: the default build targets
//! baseline x86-64 (SSE2), so hot loops are run inside a function compiled for AVX-512 or
//! AVX2+FMA when the CPU has them. Results may differ in the last bit between feature levels
//! (FMA), never between runs on one machine.

/// Runs `f` compiled for the best instruction set this CPU supports. `f` and everything it
/// inlines (mark kernels `#[inline(always)]`) get the wider vectors.
#[inline(always)]
pub fn dispatch<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports every feature the function is compiled for.
            return unsafe { with_avx512(f) };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { with_avx2(f) };
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn with_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Asks the CPU to start loading `data` into cache: used one item ahead in loops that jump
/// between rows, whose next address the hardware prefetcher cannot guess.
#[inline(always)]
pub fn prefetch(data: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in data.chunks(16) {
        // SAFETY: prefetching is only a hint, and the address lies inside `data`.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr() as *const i8
            )
        };
    }
}
