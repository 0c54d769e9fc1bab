//! Fuzz target `sae_load`: see `sae_fuzz::sae_load` for what it drives and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    if let Err(violation) = sae_fuzz::sae_load(input, &sae_fuzz::scratch_dir("sae_load")) {
        panic!("{violation}");
    }
});
