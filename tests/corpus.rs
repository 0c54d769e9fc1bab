//! The fuzzing regression corpus: every file under fuzz/regressions/<target>/ replayed through
//! the code path of its fuzz target (fuzz/src/lib.rs, included here), each in a thread of its
//! own that must finish within a time bound, without a panic, with an error of one clean line
//! or an accepted input. A file named `ok-*` must be accepted and one named `err-*` refused;
//! any other (a fuzzer finding) may be either. Every failing file is reported by name.

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod replay;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use replay::Verdict;

/// How long one input may take (the debug build, on a loaded 2-core machine).
const LIMIT: Duration = Duration::from_secs(5);

fn regressions(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target)
}

/// Replays every file of `target`'s directory; panics listing each file that failed and why.
fn replay_target(target: &str) {
    let (_, run) = replay::TARGETS
        .into_iter()
        .find(|(name, _)| *name == target)
        .expect("a known target");
    let dir = regressions(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("{}: {err}", dir.display()))
        .map(|entry| entry.expect("listing the corpus").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no inputs", dir.display());
    let failures: Vec<String> = files
        .iter()
        .enumerate()
        .filter_map(|(i, path)| {
            let name = path.file_name().expect("a file").to_string_lossy();
            let scratch = replay::scratch_dir(&format!("corpus-{target}-{i}"));
            replay_one(run, path, &scratch)
                .err()
                .map(|why| format!("{target}/{name}: {why}"))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} regression inputs of {target} failed:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}

/// Runs `path` through `run` in its own thread, with the expectation its name states.
fn replay_one(run: replay::Target, path: &Path, scratch: &Path) -> Result<(), String> {
    let input = std::fs::read(path).map_err(|err| err.to_string())?;
    let name = path
        .file_name()
        .expect("a file")
        .to_string_lossy()
        .into_owned();
    let (tx, rx) = mpsc::channel();
    let thread_scratch = scratch.to_path_buf();
    let start = Instant::now();
    std::thread::spawn(move || {
        let outcome = std::panic::catch_unwind(|| run(&input, &thread_scratch));
        let _ = tx.send(outcome);
    });
    let outcome = match rx.recv_timeout(LIMIT) {
        Ok(outcome) => outcome,
        // The thread is left running: a hang cannot be stopped from outside.
        Err(_) => return Err(format!("did not finish within {LIMIT:?}")),
    };
    let _ = std::fs::remove_dir_all(scratch);
    let verdict = match outcome {
        Ok(Ok(verdict)) => verdict,
        Ok(Err(broken)) => return Err(broken),
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            return Err(format!("panicked: {message}"));
        }
    };
    match verdict {
        Verdict::Refused(message) if name.starts_with("ok-") => {
            Err(format!("refused a valid input: {message}"))
        }
        Verdict::Accepted if name.starts_with("err-") => Err("accepted a bad input".into()),
        _ if start.elapsed() > LIMIT => Err(format!("took {:?}", start.elapsed())),
        _ => Ok(()),
    }
}

#[test]
fn npy_regressions() {
    replay_target("npy");
}

#[test]
fn sae_load_regressions() {
    replay_target("sae_load");
}

#[test]
fn checkpoint_regressions() {
    replay_target("checkpoint");
}

#[test]
fn run_config_regressions() {
    replay_target("run_config");
}

/// Writes the corpus's hand-made inputs (the valid seeds and the inputs of issue 13's defects)
/// with the library; fuzzer findings are added by hand. Run it after a format change:
/// `cargo test --test corpus -- --ignored write_regression_inputs`.
#[test]
#[ignore]
fn write_regression_inputs() {
    inputs::write_all();
}

mod inputs {
    use std::collections::HashMap;
    use std::fs;
    use std::path::Path;

    use ndarray::Array2;
    use safetensors::tensor::{Dtype, TensorView};
    use safetensors::SafeTensors;
    use sparse_autoencoder::io::{write_npy, Checkpoint};
    use sparse_autoencoder::{Architecture, Sae, SaeConfig, TrainConfig, Trainer};

    use super::{regressions, replay};

    fn put(target: &str, name: &str, bytes: &[u8]) {
        let dir = regressions(target);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(name), bytes).unwrap();
    }

    /// A version 1.0 `.npy` file: `header` padded to a multiple of 64 bytes, then `data`.
    fn npy_v1(header: &str, data: &[u8]) -> Vec<u8> {
        let mut header = header.as_bytes().to_vec();
        while !(10 + header.len() + 1).is_multiple_of(64) {
            header.push(b' ');
        }
        header.push(b'\n');
        let len = u16::try_from(header.len()).unwrap().to_le_bytes();
        [&b"\x93NUMPY\x01\x00"[..], &len, &header, data].concat()
    }

    fn npy_file(write: impl FnOnce(&Path)) -> Vec<u8> {
        let path = replay::scratch_dir("write-npy").with_extension("npy");
        write(&path);
        let bytes = fs::read(&path).unwrap();
        fs::remove_file(&path).unwrap();
        bytes
    }

    fn npy() {
        let t = "npy";
        let values: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 2.0).collect();
        put(
            t,
            "ok-f32-3x4.npy",
            &npy_file(|p| write_npy(p, &[3, 4], &values).unwrap()),
        );
        let halves: Vec<half::f16> = values.iter().map(|&v| half::f16::from_f32(v)).collect();
        let f16 = npy_file(|p| write_npy(p, &[2, 2, 3], &halves).unwrap());
        put(t, "ok-f16-2x2x3.npy", &f16);
        let doubles: Vec<f64> = values.iter().map(|&v| v as f64).collect();
        put(
            t,
            "ok-f64-1d.npy",
            &npy_file(|p| write_npy(p, &[12], &doubles).unwrap()),
        );
        let data: Vec<u8> = bytemuck::cast_slice(&values).to_vec();
        let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 3), }";
        let mut v2 = npy_v1(header, &data);
        v2.splice(
            6..10,
            [2, 0, (v2.len() - 10 - data.len()) as u8 - 2, 0, 0, 0],
        );
        put(t, "ok-v2-header.npy", &v2);
        // Issue 13 item 1: the 27-byte file whose parse took minutes.
        put(
            t,
            "err-nested-braces-27.npy",
            b"\x93NUMPY\x01\x00\x11\x00{{{{{{{{{{{{{{{{\n",
        );
        let lists = format!(
            "{{'descr': {}{}, 'fortran_order': False, 'shape': (4, 3), }}",
            "[".repeat(22),
            "]".repeat(22)
        );
        put(t, "err-nested-lists-22.npy", &npy_v1(&lists, &data));
        // Item 18: a control sequence in the dtype (clears the terminal when echoed).
        let esc = "{'descr': '\x1b[2J<f4', 'fortran_order': False, 'shape': (4, 3), }";
        put(t, "err-esc-in-descr.npy", &npy_v1(esc, &data));
        let esc = "{'descr': '<f4\x1b[2J', 'fortran_order': False, 'shape': (4, 3), }";
        put(t, "err-esc-after-dtype.npy", &npy_v1(esc, &data));
        // Item 11: a syntax error, which the parser reported with a caret diagram.
        let open = "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 3), ";
        put(t, "err-syntax-error.npy", &npy_v1(open, &data));
        // Items 7 and 12: shapes far beyond the file.
        let wide = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 67108864), }";
        put(t, "err-shape-beyond-file.npy", &npy_v1(wide, &data));
        let overflow = "{'descr': '<f4', 'fortran_order': False, \
                        'shape': (4294967296, 4294967296, 4294967296), }";
        put(t, "err-shape-overflow.npy", &npy_v1(overflow, &data));
        let mut long = v2.clone();
        long.splice(8..12, 0xffff_ff00u32.to_le_bytes());
        put(t, "err-header-length-beyond-file.npy", &long);
        let object = "{'descr': '|O', 'fortran_order': False, 'shape': (4, 3), }";
        put(t, "err-object-dtype.npy", &npy_v1(object, &data));
        let fortran = "{'descr': '<f4', 'fortran_order': True, 'shape': (4, 3), }";
        put(t, "err-fortran-order.npy", &npy_v1(fortran, &data));
        put(t, "err-empty.npy", b"");
        put(t, "err-magic-only.npy", b"\x93NUMPY");
    }

    /// The files of a directory that `save` writes, joined as the target splits them.
    fn saved(save: impl FnOnce(&Path), json: &str, weights: &str) -> (Vec<u8>, Vec<u8>) {
        let dir = replay::scratch_dir("write-saved");
        let _ = fs::remove_dir_all(&dir);
        save(&dir);
        let files = (
            fs::read(dir.join(json)).unwrap(),
            fs::read(dir.join(weights)).unwrap(),
        );
        fs::remove_dir_all(&dir).unwrap();
        files
    }

    /// `bytes` (a safetensors file) rewritten with `edit` applied to each tensor's f32 values
    /// and `metadata` for its header's.
    fn edited(
        bytes: &[u8],
        metadata: Option<HashMap<String, String>>,
        edit: impl Fn(&str, &mut [f32]),
    ) -> Vec<u8> {
        let tensors = SafeTensors::deserialize(bytes).unwrap();
        let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, view) in tensors.tensors() {
            let mut data = view.data().to_vec();
            if view.dtype() == Dtype::F32 {
                let mut values: Vec<f32> = data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                edit(&name, &mut values);
                data = bytemuck::cast_slice(&values).to_vec();
            }
            owned.push((name, view.dtype(), view.shape().to_vec(), data));
        }
        let views = owned
            .iter()
            .map(|(name, dtype, shape, data)| {
                (
                    name.clone(),
                    TensorView::new(*dtype, shape.clone(), data).unwrap(),
                )
            })
            .collect::<Vec<_>>();
        safetensors::serialize(views, metadata).unwrap()
    }

    fn config(arch: Architecture) -> SaeConfig {
        SaeConfig {
            d_model: 4,
            dict_size: 8,
            arch,
        }
    }

    const ARCHS: [(&str, Architecture); 3] = [
        ("topk", Architecture::TopK { k: 2 }),
        ("relu", Architecture::RELU),
        ("batchtopk", Architecture::BatchTopK { k: 2 }),
    ];

    /// A huge tensor claimed by a safetensors header over a few bytes of data.
    fn huge_claim() -> Vec<u8> {
        let header = br#"{"w_enc_fd":{"dtype":"F32","shape":[1099511627776,4],"data_offsets":[0,17592186044416]}}"#;
        let len = (header.len() as u64).to_le_bytes();
        [&len[..], header, &[0u8; 16]].concat()
    }

    fn sae_load() {
        let t = "sae_load";
        let files = |arch| {
            let sae = Sae::new(config(arch), 0).unwrap();
            saved(|d| sae.save(d).unwrap(), "sae.json", "sae.safetensors")
        };
        for (name, arch) in ARCHS {
            let (json, weights) = files(arch);
            put(t, &format!("ok-{name}.bin"), &replay::join(&json, &weights));
        }
        let (json, weights) = files(Architecture::TopK { k: 2 });
        // Item 19: non-finite weights.
        let nan = edited(&weights, None, |n, v| {
            if n == "w_enc_fd" {
                v[5] = f32::NAN;
            }
        });
        put(t, "err-nan-weights.bin", &replay::join(&json, &nan));
        let inf = edited(&weights, None, |n, v| {
            if n == "b_dec_d" {
                v[0] = f32::INFINITY;
            }
        });
        put(t, "err-inf-b-dec.bin", &replay::join(&json, &inf));
        let (btk_json, btk_weights) = files(Architecture::BatchTopK { k: 2 });
        let tensors = SafeTensors::deserialize(&btk_weights).unwrap();
        let mut owned: Vec<(String, TensorView<'_>)> = tensors.tensors();
        let theta = f32::NAN.to_le_bytes();
        owned.push((
            "threshold".into(),
            TensorView::new(Dtype::F32, vec![], &theta).unwrap(),
        ));
        let nan_theta = safetensors::serialize(owned, None).unwrap();
        put(
            t,
            "err-nan-threshold.bin",
            &replay::join(&btk_json, &nan_theta),
        );
        // Item 12: sizes claimed beyond the file.
        put(
            t,
            "err-huge-tensor-claim.bin",
            &replay::join(&json, &huge_claim()),
        );
        let text = String::from_utf8(json.clone()).unwrap();
        let huge = text.replace("\"dict_size\": 8", "\"dict_size\": 4611686018427387904");
        put(
            t,
            "err-huge-config.bin",
            &replay::join(huge.as_bytes(), &weights),
        );
        put(
            t,
            "err-truncated-weights.bin",
            &replay::join(&json, &weights[..weights.len() / 2]),
        );
        // Item 18: control characters in the JSON, echoed by serde's messages.
        let esc = text.replacen("\"format\"", "\"\x1b[2Jformat\"", 1);
        put(
            t,
            "err-esc-in-json-key.bin",
            &replay::join(esc.as_bytes(), &weights),
        );
        let esc = text.replace("\"topk\"", "\"\\u001b[2Jtopk\"");
        put(
            t,
            "err-esc-in-json-value.bin",
            &replay::join(esc.as_bytes(), &weights),
        );
    }

    fn checkpoint() {
        let t = "checkpoint";
        let files = |arch| {
            let train = TrainConfig {
                total_steps: 20,
                warmup_steps: 2,
                threshold_start_step: 1,
                sparsity_warmup_steps: 2,
                ..TrainConfig::default()
            };
            let mut trainer = Trainer::new(Sae::new(config(arch), 0).unwrap(), train).unwrap();
            let x_bd = Array2::from_shape_fn((8, 4), |(b, d)| ((b * 4 + d) as f32 * 0.37).sin());
            for _ in 0..3 {
                trainer.step(x_bd.view()).unwrap();
            }
            let checkpoint = Checkpoint {
                state: trainer.state(),
                extra: serde_json::json!({ "name": "fuzz" }),
            };
            saved(
                |d| checkpoint.save(&d.join("checkpoint")).unwrap(),
                "checkpoint/checkpoint.json",
                "checkpoint/checkpoint.safetensors",
            )
        };
        for (name, arch) in ARCHS {
            let (json, weights) = files(arch);
            put(t, &format!("ok-{name}.bin"), &replay::join(&json, &weights));
        }
        let (json, weights) = files(Architecture::TopK { k: 2 });
        let text = String::from_utf8(json.clone()).unwrap();
        let nan = edited(
            &weights,
            Some(HashMap::from([("step".into(), "3".into())])),
            |n, v| {
                if n == "adam_v.w_enc_fd" {
                    v[0] = f32::NAN;
                }
            },
        );
        put(t, "nan-adam-moment.bin", &replay::join(&json, &nan));
        let at = |step: &str| {
            let json = text.replace("\"step\": 3", &format!("\"step\": {step}"));
            let meta = HashMap::from([("step".into(), step.into())]);
            replay::join(json.as_bytes(), &edited(&weights, Some(meta), |_, _| {}))
        };
        put(t, "step-max.bin", &at("18446744073709551615"));
        let adam_t = text.replace("\"adam_t\": 3", "\"adam_t\": 18446744073709551615");
        put(
            t,
            "adam-t-max.bin",
            &replay::join(adam_t.as_bytes(), &weights),
        );
        let mismatch = text.replace("\"step\": 3", "\"step\": 4");
        put(
            t,
            "err-step-mismatch.bin",
            &replay::join(mismatch.as_bytes(), &weights),
        );
        put(
            t,
            "err-huge-tensor-claim.bin",
            &replay::join(&json, &huge_claim()),
        );
        // Item 18 in checkpoint.json: serde's message quotes the unknown variant.
        let esc = text.replace("\"topk\"", "\"\\u001b[2Jtopk\"");
        put(
            t,
            "err-esc-in-json-value.bin",
            &replay::join(esc.as_bytes(), &weights),
        );
        let no_moments = edited(&weights, Some(HashMap::new()), |_, _| {});
        put(
            t,
            "err-no-step-metadata.bin",
            &replay::join(&json, &no_moments),
        );
    }

    fn run_config() {
        let t = "run_config";
        let dir = replay::template_run(replay::scratch_dir("write-run"));
        let written = fs::read_to_string(dir.join("config.toml")).unwrap();
        let written = written.replace(&*dir.to_string_lossy(), replay::RUN_DIR);
        fs::remove_dir_all(&dir).unwrap();
        put(t, "ok-template.toml", written.as_bytes());
        let without = |key: &str| {
            let kept: Vec<&str> = written.lines().filter(|l| !l.starts_with(key)).collect();
            assert!(
                kept.len() < written.lines().count(),
                "{key} is in config.toml"
            );
            kept.join("\n")
        };
        // Item 6: keys an edited config.toml lacks, which Run::resume expected.
        put(
            t,
            "err-missing-batch-size.toml",
            without("batch_size =").as_bytes(),
        );
        put(
            t,
            "err-missing-metrics-every.toml",
            without("metrics_every =").as_bytes(),
        );
        put(t, "err-missing-steps.toml", without("steps =").as_bytes());
        let zero = written.replace("metrics_every = 5", "metrics_every = 0");
        put(t, "err-zero-metrics-every.toml", zero.as_bytes());
        // Item 3: sweep names that collide with the checkpoint's directories.
        for name in ["checkpoint.old", "checkpoint.new", "checkpoint", "../a", ""] {
            let renamed = written.replace("name = \"a\"", &format!("name = {name:?}"));
            let file = match name {
                "../a" => "err-sweep-name-dotdot.toml".to_string(),
                "" => "err-sweep-name-empty.toml".to_string(),
                _ => format!("err-sweep-name-{}.toml", name.replace('.', "-")),
            };
            put(t, &file, renamed.as_bytes());
        }
        // Item 7: sizes whose products overflow.
        let expansion = written.replace("dict_size = 32", "expansion = 1152921504606846976");
        put(t, "err-huge-expansion.toml", expansion.as_bytes());
        let batch = written.replace("batch_size = 8", "batch_size = 18446744073709551615");
        put(t, "err-huge-batch-size.toml", batch.as_bytes());
        put(
            t,
            "err-unknown-key.toml",
            format!("{written}\n[train2]\nx = 1\n").as_bytes(),
        );
        put(t, "err-not-toml.toml", b"[[sae]\nname = \"a\x1b[2J\"\n");
    }

    pub(super) fn write_all() {
        npy();
        sae_load();
        checkpoint();
        run_config();
    }
}
