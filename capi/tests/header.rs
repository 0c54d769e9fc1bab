//! `include/sae.h` is the header cbindgen makes of `src/lib.rs` with `cbindgen.toml`: this test
//! regenerates it and fails, with a diff's first line, when the committed one differs.
//! `SAE_UPDATE_HEADER=1` writes the new header instead.

use std::path::Path;

#[test]
fn committed_header_is_current() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(root.join("src/lib.rs"))
        .generate()
        .expect("cbindgen parses src/lib.rs")
        .write(&mut generated);
    let generated = String::from_utf8(generated).expect("UTF-8 header");
    let path = root.join("include/sae.h");
    if std::env::var_os("SAE_UPDATE_HEADER").is_some() {
        std::fs::write(&path, &generated).expect("write include/sae.h");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != generated {
        let line = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(committed.lines().count().min(generated.lines().count()));
        panic!(
            "capi/include/sae.h is stale (first difference at line {}): regenerate it with \
             SAE_UPDATE_HEADER=1 cargo test --manifest-path capi/Cargo.toml --test header",
            line + 1
        );
    }
}
