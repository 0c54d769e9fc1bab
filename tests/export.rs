//! `sae export` and `sae encode`: the exported tensors are the SAE's (transposed where SAELens
//! wants it), the written codes are `Sae::encode`'s, and impossible exports are usage errors.

mod common;

use std::path::Path;

use common::{
    ok, random_sae, read_npy, sae, synthetic_batch, temp_dir, tensor, usage_error_line, write_npy,
};
use ndarray::Array2;
use sparse_autoencoder::backend::Cpu;
use sparse_autoencoder::{Architecture, Sae};

/// A random SAE saved in `dir`; with `learn_threshold`, trained for three steps so that
/// BatchTopK learns θ (only training sets it).
fn saved(dir: &Path, arch: Architecture, learn_threshold: bool) -> Sae {
    let mut sae = random_sae(arch, 6, 20, 3);
    if learn_threshold {
        let config = sparse_autoencoder::TrainConfig {
            total_steps: 10,
            warmup_steps: 1,
            threshold_start_step: 0,
            ..Default::default()
        };
        let mut trainer = sparse_autoencoder::Trainer::new(sae, config).unwrap();
        for s in 0..3 {
            trainer.step(synthetic_batch(32, 6, s).view()).unwrap();
        }
        sae = trainer.into_sae();
        assert!(sae.threshold().is_some());
    }
    sae.save(dir).unwrap();
    sae
}

#[test]
fn saelens_export_holds_the_transposed_encoder_and_the_threshold() {
    let dir = temp_dir("export-saelens");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    for (name, arch, architecture) in [
        ("relu", Architecture::RELU, "standard"),
        ("topk", Architecture::TopK { k: 3 }, "topk"),
        ("batchtopk", Architecture::BatchTopK { k: 3 }, "jumprelu"),
    ] {
        let run = dir.join(name);
        let sae_ = saved(&run, arch, matches!(arch, Architecture::BatchTopK { .. }));
        let out = dir.join(format!("{name}-saelens"));
        ok(&sae(&[
            "export",
            &s(&run),
            "--format",
            "saelens",
            "--out",
            &s(&out),
            "--model-name",
            "gpt2",
            "--hook-name",
            "blocks.6.hook_resid_post",
        ]));
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("cfg.json")).unwrap()).unwrap();
        assert_eq!(cfg["architecture"], architecture);
        assert_eq!(
            (cfg["d_in"].as_u64(), cfg["d_sae"].as_u64()),
            (Some(6), Some(20))
        );
        assert_eq!(cfg["apply_b_dec_to_input"], true);
        assert_eq!(cfg["normalize_activations"], "none");
        assert_eq!(cfg["metadata"]["model_name"], "gpt2");
        assert_eq!(cfg["metadata"]["hook_name"], "blocks.6.hook_resid_post");
        if architecture == "topk" {
            assert_eq!(cfg["k"], 3);
        }
        let weights = out.join("sae_weights.safetensors");
        let (shape, w_enc) = tensor(&weights, "W_enc");
        assert_eq!(shape, [6, 20]);
        let w_enc_df = Array2::from_shape_vec((6, 20), w_enc).unwrap();
        assert_eq!(w_enc_df.t(), sae_.w_enc_fd());
        let (shape, w_dec) = tensor(&weights, "W_dec");
        assert_eq!(shape, [20, 6]);
        assert_eq!(w_dec, sae_.w_dec_fd().iter().copied().collect::<Vec<_>>());
        assert_eq!(tensor(&weights, "b_enc").1, sae_.b_enc_f().to_vec());
        assert_eq!(tensor(&weights, "b_dec").1, sae_.b_dec_d().to_vec());
        if architecture == "jumprelu" {
            let (shape, threshold) = tensor(&weights, "threshold");
            assert_eq!(shape, [20]);
            assert!(threshold.iter().all(|&t| Some(t) == sae_.threshold()));
        }
    }
    // A BatchTopK SAE that never learned θ has no fixed encoding to export.
    let untrained = dir.join("untrained");
    saved(&untrained, Architecture::BatchTopK { k: 3 }, false);
    usage_error_line(
        &sae(&[
            "export",
            &s(&untrained),
            "--format",
            "saelens",
            "--out",
            &s(&dir.join("x")),
        ]),
        &["no threshold"],
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn sparsify_export_is_topk_and_refuses_relu() {
    let dir = temp_dir("export-sparsify");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let run = dir.join("topk");
    let sae_ = saved(&run, Architecture::TopK { k: 3 }, false);
    let out = dir.join("sparsify");
    ok(&sae(&[
        "export",
        &s(&run),
        "--format",
        "sparsify",
        "--out",
        &s(&out),
    ]));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("cfg.json")).unwrap()).unwrap();
    assert_eq!(
        (cfg["d_in"].as_u64(), cfg["num_latents"].as_u64()),
        (Some(6), Some(20))
    );
    assert_eq!(cfg["k"], 3);
    let weights = out.join("sae.safetensors");
    let (shape, w_enc) = tensor(&weights, "encoder.weight");
    assert_eq!(shape, [20, 6]);
    assert_eq!(w_enc, sae_.w_enc_fd().iter().copied().collect::<Vec<_>>());
    assert_eq!(tensor(&weights, "encoder.bias").1, sae_.b_enc_f().to_vec());
    assert_eq!(tensor(&weights, "b_dec").1, sae_.b_dec_d().to_vec());

    let relu = dir.join("relu");
    saved(&relu, Architecture::RELU, false);
    usage_error_line(
        &sae(&[
            "export",
            &s(&relu),
            "--format",
            "sparsify",
            "--out",
            &s(&dir.join("y")),
        ]),
        &["--format saelens"],
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn encoded_files_hold_the_codes_of_every_row_in_order() {
    let dir = temp_dir("encode");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    // 250 rows over two files, encoded 64 at a time: batches cross the file boundary.
    let x = synthetic_batch(250, 6, 11);
    let bytes = |rows: std::ops::Range<usize>| -> Vec<u8> {
        x.slice(ndarray::s![rows, ..])
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect()
    };
    write_npy(&dir.join("a.npy"), "<f4", &[100, 6], &bytes(0..100));
    write_npy(&dir.join("b.npy"), "<f4", &[150, 6], &bytes(100..250));
    for (name, arch) in [
        ("relu", Architecture::RELU),
        ("topk", Architecture::TopK { k: 3 }),
        ("batchtopk", Architecture::BatchTopK { k: 3 }),
    ] {
        let run = dir.join(name);
        let sae_ = saved(&run, arch, matches!(arch, Architecture::BatchTopK { .. }));
        let out = dir.join(format!("{name}-codes"));
        let stdout = ok(&sae(&[
            "encode",
            &s(&run),
            "--data",
            &s(&dir.join("a.npy")),
            &s(&dir.join("b.npy")),
            "--out",
            &s(&out),
            "--batch-size",
            "64",
        ]));
        assert!(stdout.contains("encoded 250 rows"), "{stdout}");
        let expected = sae_.encode(&Cpu, x.view()).unwrap().to_dense();
        let mut dense = Array2::<f32>::zeros((250, 20));
        let (idx_shape, indices) = read_npy::<u32>(&out.join("indices.npy"));
        let (_, values) = read_npy::<f32>(&out.join("values.npy"));
        if name == "topk" {
            assert_eq!(idx_shape, [250, 3]);
            for (i, (&j, &v)) in indices.iter().zip(&values).enumerate() {
                // Padding (value 0) sits at latents the row does not use, so adding is safe.
                dense[[i / 3, j as usize]] += v;
            }
        } else {
            let (shape, indptr) = read_npy::<i64>(&out.join("indptr.npy"));
            assert_eq!(shape, [251]);
            for b in 0..250 {
                for e in indptr[b] as usize..indptr[b + 1] as usize {
                    dense[[b, indices[e] as usize]] = values[e];
                }
            }
        }
        assert_eq!(dense, expected, "{name}");
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("codes.json")).unwrap())
                .unwrap();
        assert_eq!(manifest["n_rows"], 250, "{manifest}");
        if name == "topk" {
            assert_eq!(
                (&manifest["layout"], &manifest["k"]),
                (&"topk".into(), &3.into())
            );
        } else {
            assert_eq!(manifest["layout"], "csr", "{manifest}");
        }
        usage_error_line(
            &sae(&[
                "encode",
                &s(&run),
                "--data",
                &s(&dir.join("a.npy")),
                "--out",
                &s(&out),
            ]),
            &["--force"],
        );
    }
    let wide = dir.join("wide.npy");
    write_npy(&wide, "<f4", &[2, 7], &[0u8; 2 * 7 * 4]);
    usage_error_line(
        &sae(&[
            "encode",
            &s(&dir.join("topk")),
            "--data",
            &s(&wide),
            "--out",
            &s(&dir.join("z")),
        ]),
        &["--data"],
    );
    std::fs::remove_dir_all(dir).unwrap();
}
