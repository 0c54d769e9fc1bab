//! Fuzz target `checkpoint`: see `sae_fuzz::checkpoint` for what it drives and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    if let Err(violation) = sae_fuzz::checkpoint(input, &sae_fuzz::scratch_dir("checkpoint")) {
        panic!("{violation}");
    }
});
