//! Fuzz target `run_config`: see `sae_fuzz::run_config` for what it drives and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    if let Err(violation) = sae_fuzz::run_config(input, &sae_fuzz::scratch_dir("run_config")) {
        panic!("{violation}");
    }
});
