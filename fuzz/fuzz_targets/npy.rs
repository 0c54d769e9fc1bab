//! Fuzz target `npy`: see `sae_fuzz::npy` for what it drives and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    if let Err(violation) = sae_fuzz::npy(input, &sae_fuzz::scratch_dir("npy")) {
        panic!("{violation}");
    }
});
