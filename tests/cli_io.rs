//! `sae encode` and `sae export` on bad input: every mistake a user can make is one line on
//! stderr naming the option or file, with exit status 2; and `--force` replaces codes of
//! another layout cleanly. (tests/export.rs checks the files they write.)

mod common;

use std::path::Path;

use common::{f32_bytes, ok, random_sae, sae, synthetic_batch, temp_dir, usage_error, write_npy};
use sparse_autoencoder::Architecture;

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

#[test]
fn encode_and_export_refuse_bad_input_with_status_2() {
    let dir = temp_dir("cli-io-errors");
    let run = dir.join("topk");
    random_sae(Architecture::TopK { k: 3 }, 6, 20, 1)
        .save(&run)
        .unwrap();
    let data = dir.join("x.npy");
    let x = synthetic_batch(10, 6, 0);
    write_npy(&data, "<f4", &[10, 6], &f32_bytes(x.as_slice().unwrap()));
    let out = dir.join("out");

    for command in ["encode", "export"] {
        let tail: Vec<String> = match command {
            "encode" => vec!["--data".into(), s(&data), "--out".into(), s(&out)],
            _ => vec!["--format".into(), "saelens".into(), "--out".into(), s(&out)],
        };
        let with = |sae_dir: &Path| {
            let mut args = vec![command.to_string(), s(sae_dir)];
            args.extend(tail.iter().cloned());
            sae(&args.iter().map(String::as_str).collect::<Vec<_>>())
        };
        let missing = dir.join("no-such-run");
        let err = with(&missing);
        usage_error(&err, &["no-such-run", "no such directory"]);
        assert_eq!(String::from_utf8_lossy(&err.stderr).lines().count(), 1);
        usage_error(&with(&dir), &["not an SAE directory"]);
        // A damaged weights file names itself.
        let broken = dir.join("broken");
        random_sae(Architecture::TopK { k: 3 }, 6, 20, 1)
            .save(&broken)
            .unwrap();
        std::fs::write(broken.join("sae.safetensors"), b"nonsense").unwrap();
        usage_error(&with(&broken), &["sae.safetensors"]);
    }

    // A NaN in row 4 of the data: the error names the file and the row.
    let mut values: Vec<f32> = x.iter().copied().collect();
    values[4 * 6 + 2] = f32::NAN;
    let nan = dir.join("nan.npy");
    write_npy(&nan, "<f4", &[10, 6], &f32_bytes(&values));
    let err = sae(&[
        "encode",
        &s(&run),
        "--data",
        &s(&nan),
        "--out",
        &s(&dir.join("nan-codes")),
    ]);
    usage_error(
        &err,
        &["--data", "nan.npy", "row 4", "non-finite", "clean the data"],
    );
    assert!(!String::from_utf8_lossy(&err.stderr).contains("skip"));
    assert!(!dir.join("nan-codes").join("codes.json").exists());

    // Options clap checks.
    usage_error(
        &sae(&[
            "encode",
            &s(&run),
            "--data",
            &s(&data),
            "--out",
            &s(&out),
            "--batch-size",
            "0",
        ]),
        &["--batch-size"],
    );
    usage_error(&sae(&["encode", &s(&run), "--out", &s(&out)]), &["--data"]);
    usage_error(
        &sae(&["export", &s(&run), "--format", "onnx", "--out", &s(&out)]),
        &["--format", "onnx"],
    );
    usage_error(
        &sae(&["export", &s(&run), "--out", &s(&out)]),
        &["--format"],
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn encode_force_replaces_codes_of_another_layout() {
    let dir = temp_dir("cli-io-force");
    let data = dir.join("x.npy");
    let x = synthetic_batch(40, 6, 2);
    write_npy(&data, "<f4", &[40, 6], &f32_bytes(x.as_slice().unwrap()));
    let (relu, topk) = (dir.join("relu"), dir.join("topk"));
    random_sae(Architecture::RELU, 6, 20, 1)
        .save(&relu)
        .unwrap();
    random_sae(Architecture::TopK { k: 3 }, 6, 20, 1)
        .save(&topk)
        .unwrap();
    let out = dir.join("codes");
    let encode = |run: &Path, force: bool| {
        let mut args = vec![
            "encode".to_string(),
            s(run),
            "--data".into(),
            s(&data),
            "--out".into(),
            s(&out),
            "--batch-size".into(),
            "16".into(),
        ];
        if force {
            args.push("--force".into());
        }
        sae(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    ok(&encode(&relu, false));
    assert!(out.join("indptr.npy").exists());
    usage_error(&encode(&topk, false), &["--force"]);
    // Refused: the ReLU codes are untouched.
    let manifest = std::fs::read_to_string(out.join("codes.json")).unwrap();
    assert!(manifest.contains("csr"), "{manifest}");

    ok(&encode(&topk, true));
    let manifest = std::fs::read_to_string(out.join("codes.json")).unwrap();
    assert!(manifest.contains("topk"), "{manifest}");
    assert!(
        !out.join("indptr.npy").exists(),
        "the CSR offsets of the replaced codes are gone"
    );
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["codes.json", "indices.npy", "values.npy"]);
    std::fs::remove_dir_all(dir).unwrap();
}
