//! Generates `capi/include/sae.h` from `capi/src/lib.rs` with `capi/cbindgen.toml`.
//!
//! ```sh
//! cargo run --manifest-path capi/header/Cargo.toml            # writes the header
//! cargo run --manifest-path capi/header/Cargo.toml -- --check # fails if it is stale
//! ```

#![warn(missing_docs)]

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let check = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--check") => true,
        Some(other) => {
            eprintln!("sae-header: unknown argument {other:?}; pass nothing or --check");
            return ExitCode::from(2);
        }
    };
    let capi = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("capi/header lies in capi/");
    let config = match cbindgen::Config::from_file(capi.join("cbindgen.toml")) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("sae-header: capi/cbindgen.toml: {err}");
            return ExitCode::from(2);
        }
    };
    let bindings = match cbindgen::Builder::new()
        .with_config(config)
        .with_src(capi.join("src/lib.rs"))
        .generate()
    {
        Ok(bindings) => bindings,
        Err(err) => {
            eprintln!("sae-header: cbindgen cannot read capi/src/lib.rs: {err}");
            return ExitCode::from(2);
        }
    };
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let path = capi.join("include/sae.h");
    if !check {
        if let Err(err) = std::fs::write(&path, &generated) {
            eprintln!("sae-header: {}: {err}", path.display());
            return ExitCode::from(2);
        }
        println!("wrote {}", path.display());
        return ExitCode::SUCCESS;
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    if committed == generated {
        println!("{} is current", path.display());
        return ExitCode::SUCCESS;
    }
    let (old, new) = (
        String::from_utf8_lossy(&committed),
        String::from_utf8_lossy(&generated),
    );
    let line = old
        .lines()
        .zip(new.lines())
        .position(|(a, b)| a != b)
        .unwrap_or(old.lines().count().min(new.lines().count()));
    eprintln!(
        "sae-header: {} is stale (first difference at line {}): regenerate it with \
         cargo run --manifest-path capi/header/Cargo.toml",
        path.display(),
        line + 1
    );
    ExitCode::FAILURE
}
