//! The code path of each fuzz target, through the crate's public API only: the file goes where
//! sae would read it, the library loads it, and whatever loads is used a little. Shared with
//! tests/corpus.rs (included there by path), which replays the committed regression inputs
//! under fuzz/regressions/<target>/ through the same functions on stable.
//!
//! Each function returns the verdict on the input, or the broken promise as `Err`: an error
//! message that is not one clean line, or an input accepted that must be refused. A panic or a
//! hang is a broken promise too, left to the fuzzer (or the test's thread and clock) to catch.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use ndarray::Array2;
use sparse_autoencoder::data::{NpyShards, Source};
use sparse_autoencoder::io::{Checkpoint, CHECKPOINT_CONFIG_FILE, CHECKPOINT_WEIGHTS_FILE};
use sparse_autoencoder::run::{Context, ResumeOptions, Run, RunSpec};
use sparse_autoencoder::{Sae, TrainConfig, Trainer};

/// What the library made of an input.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Loaded (and used) without complaint.
    Accepted,
    /// Refused with this error message.
    Refused(String),
}

/// A target: the input and a scratch directory it may empty and reuse, to the verdict or the
/// promise the library broke.
pub type Target = fn(&[u8], &Path) -> Result<Verdict, String>;

/// Every target by name, as fuzz/fuzz_targets and fuzz/regressions name them.
pub const TARGETS: [(&str, Target); 4] = [
    ("npy", npy),
    ("sae_load", sae_load),
    ("checkpoint", checkpoint),
    ("run_config", run_config),
];

/// Elements a target reads or encodes at most, so that the target itself never allocates
/// much; an input's own size bounds what the library may rightly accept well below this.
const MAX_ELEMENTS: u64 = 1 << 22;

/// This process's scratch directory for `target`, on tmpfs where there is one (the fuzzer
/// writes every input there).
pub fn scratch_dir(target: &str) -> PathBuf {
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    base.join(format!("sae-fuzz-{target}-{}", std::process::id()))
}

/// `dir`, emptied (created if absent).
fn fresh(dir: &Path) -> PathBuf {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).expect("the scratch directory can be created");
    dir.to_path_buf()
}

/// The library's refusal, checked against the promise of one clear line (unless the
/// environment sets `SAE_FUZZ_ANY_MESSAGE`, to look only for panics and hangs in code whose
/// messages are known to break it).
fn refused(message: String) -> Result<Verdict, String> {
    if std::env::var_os("SAE_FUZZ_ANY_MESSAGE").is_some() {
        return Ok(Verdict::Refused(message));
    }
    if let Some(c) = message.chars().find(|c| c.is_control()) {
        return Err(format!(
            "the error message holds the control character {c:?} (one line, escaped, is the \
             promise): {message:?}"
        ));
    }
    if message.matches("(os error").count() > 1 {
        return Err(format!(
            "the error message gives the OS error twice: {message:?}"
        ));
    }
    Ok(Verdict::Refused(message))
}

/// Splits `input` at the length its first two bytes give (little-endian, cut to what
/// follows): the first file's bytes and the second's.
pub fn split(input: &[u8]) -> (&[u8], &[u8]) {
    let Some((head, rest)) = input.split_first_chunk::<2>() else {
        return (&[], input);
    };
    rest.split_at((u16::from_le_bytes(*head) as usize).min(rest.len()))
}

/// Joins two files' bytes as [`split`] splits them.
pub fn join(first: &[u8], second: &[u8]) -> Vec<u8> {
    let len = u16::try_from(first.len()).expect("the first file is under 64 KiB");
    [&len.to_le_bytes()[..], first, second].concat()
}

/// `.npy` header and reader: `input` as one shard, opened by [`NpyShards::open`], every row
/// read through [`Source::read_rows`] in chunks of at most 16 Ki values.
pub fn npy(input: &[u8], scratch: &Path) -> Result<Verdict, String> {
    let path = fresh(scratch).join("shard.npy");
    fs::write(&path, input).expect("the scratch file can be written");
    let shards = match NpyShards::open(&[&path]) {
        Ok(shards) => shards,
        Err(err) => return refused(err.to_string()),
    };
    let (d, n) = (shards.d_model() as u64, shards.n_rows());
    // Every value takes at least two bytes of the file.
    if n.saturating_mul(d).saturating_mul(2) > input.len() as u64 || d == 0 {
        return Err(format!(
            "accepted {n} rows of {d} values from a file of {} bytes",
            input.len()
        ));
    }
    if n * d > MAX_ELEMENTS {
        return Ok(Verdict::Accepted);
    }
    let chunk_rows = (16384 / d).max(1);
    let mut out = vec![0f32; (chunk_rows * d) as usize];
    let mut row = 0;
    while row < n {
        let rows = chunk_rows.min(n - row);
        if let Err(err) = shards.read_rows(row, &mut out[..(rows * d) as usize]) {
            return refused(err.to_string());
        }
        row += rows;
    }
    shards.locate(0);
    shards.locate(n - 1);
    Ok(Verdict::Accepted)
}

/// An SAE directory: `sae.json` and `sae.safetensors` from `input` ([`split`]), loaded by
/// [`Sae::load`]; a loaded SAE must hold finite parameters only, and encodes and decodes a
/// batch of two rows.
pub fn sae_load(input: &[u8], scratch: &Path) -> Result<Verdict, String> {
    let dir = fresh(scratch);
    let (json, weights) = split(input);
    fs::write(dir.join(sparse_autoencoder::io::CONFIG_FILE), json).expect("scratch writable");
    fs::write(dir.join(sparse_autoencoder::io::WEIGHTS_FILE), weights).expect("scratch writable");
    let sae = match Sae::load(&dir) {
        Ok(sae) => sae,
        Err(err) => return refused(err.to_string()),
    };
    finite_parameters(&sae)?;
    use_sae(&sae)
}

/// Errs when any parameter of `sae` (θ included) is NaN or infinite.
fn finite_parameters(sae: &Sae) -> Result<(), String> {
    let tensors = [
        (
            "w_enc_fd",
            sae.w_enc_fd().iter().copied().collect::<Vec<_>>(),
        ),
        ("b_enc_f", sae.b_enc_f().to_vec()),
        ("w_dec_fd", sae.w_dec_fd().iter().copied().collect()),
        ("b_dec_d", sae.b_dec_d().to_vec()),
        ("threshold", sae.threshold().into_iter().collect()),
    ];
    for (name, values) in tensors {
        if let Some(v) = values.iter().find(|v| !v.is_finite()) {
            return Err(format!("accepted an SAE whose {name} holds {v}"));
        }
    }
    Ok(())
}

/// Encodes and decodes two rows with `sae`, when that is small.
fn use_sae(sae: &Sae) -> Result<Verdict, String> {
    let (d, f) = (sae.config().d_model, sae.config().dict_size);
    if (d as u64).saturating_mul(f as u64) > MAX_ELEMENTS {
        return Ok(Verdict::Accepted);
    }
    let x_bd = Array2::from_shape_fn((2, d), |(b, i)| ((b * d + i) as f32 * 0.37).sin());
    let codes = match sae.encode(&sparse_autoencoder::backend::Cpu, x_bd.view()) {
        Ok(codes) => codes,
        Err(err) => return refused(err.to_string()),
    };
    match sae.decode(&codes) {
        Ok(x_hat_bd) if x_hat_bd.dim() == (2, d) => Ok(Verdict::Accepted),
        Ok(x_hat_bd) => Err(format!("decoded {:?}, not (2, {d})", x_hat_bd.dim())),
        Err(err) => refused(err.to_string()),
    }
}

/// A trainer checkpoint: `checkpoint.json` and `checkpoint.safetensors` from `input`
/// ([`split`]), loaded by [`Checkpoint::load`]; a loaded one resumes a trainer
/// ([`Trainer::from_state`], default recipe) that takes one step on four rows, when small.
pub fn checkpoint(input: &[u8], scratch: &Path) -> Result<Verdict, String> {
    let dir = fresh(scratch).join("checkpoint");
    fs::create_dir(&dir).expect("scratch writable");
    let (json, weights) = split(input);
    fs::write(dir.join(CHECKPOINT_CONFIG_FILE), json).expect("scratch writable");
    fs::write(dir.join(CHECKPOINT_WEIGHTS_FILE), weights).expect("scratch writable");
    let loaded = match Checkpoint::load(&dir) {
        Ok(loaded) => loaded,
        Err(err) => return refused(err.to_string()),
    };
    let sae = &loaded.state.sae;
    let (d, f) = (sae.config().d_model, sae.config().dict_size);
    if (d as u64).saturating_mul(f as u64) > MAX_ELEMENTS / 8 {
        return Ok(Verdict::Accepted);
    }
    let mut trainer = match Trainer::from_state(loaded.state, TrainConfig::default()) {
        Ok(trainer) => trainer,
        Err(err) => return refused(err.to_string()),
    };
    let x_bd = Array2::from_shape_fn((4, d), |(b, i)| ((b * d + i) as f32 * 0.37).sin());
    match trainer.step(x_bd.view()) {
        Ok(_) => Ok(Verdict::Accepted),
        Err(err) => refused(err.to_string()),
    }
}

/// Stands for the run directory's path in a `config.toml` input: data paths are relative to
/// the working directory, which cannot be the run's for every input, so the template names
/// its data file through this.
pub const RUN_DIR: &str = "$RUN_DIR";

/// The template run [`run_config`] resumes: a sweep of two tiny SAEs on a tiny `.npy` file
/// (the synthetic set's 16,384 evaluation rows take seconds to make in a debug build).
pub const TEMPLATE_CONFIG: &str = r#"
[data]
paths = ["$RUN_DIR/acts.npy"]
buffer_rows = 64
[train]
batch_size = 8
steps = 20
seed = 3
metrics_every = 5
[[sae]]
name = "a"
arch = "topk"
k = 4
dict_size = 32
[[sae]]
name = "b"
arch = "relu"
dict_size = 32
"#;

/// The template run's data: 64 rows of 16.
fn template_rows() -> Vec<f32> {
    (0..64 * 16)
        .map(|i| ((i * 7919) % 113) as f32 / 50.0 - 1.0)
        .collect()
}

/// `text` with [`RUN_DIR`] replaced by `dir`.
fn in_dir(text: &str, dir: &Path) -> String {
    text.replace(RUN_DIR, &dir.to_string_lossy())
}

/// A run of [`TEMPLATE_CONFIG`] in `dir`, stopped before its first step (so its checkpoint is
/// written), made once per directory.
pub fn template_run(dir: PathBuf) -> PathBuf {
    if !dir.join("config.toml").is_file() {
        fs::create_dir_all(&dir).expect("scratch writable");
        let data = dir.join("acts.npy");
        sparse_autoencoder::io::write_npy(&data, &[64, 16], &template_rows())
            .expect("scratch writable");
        let text = in_dir(TEMPLATE_CONFIG, &dir);
        let spec: RunSpec = toml::from_str(&text).expect("the template parses");
        let go = AtomicBool::new(false);
        let mut run = Run::create(&spec, &dir, true, &go).expect("the template run starts");
        run.train(&mut (), &AtomicBool::new(true))
            .expect("the template run checkpoints");
        // `force` cleared the directory: the data goes back after.
        sparse_autoencoder::io::write_npy(&data, &[64, 16], &template_rows())
            .expect("scratch writable");
    }
    dir
}

/// Copies the directory tree `from` to `to`.
fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("scratch writable");
    for entry in fs::read_dir(from).expect("template readable") {
        let entry = entry.expect("template readable");
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).expect("scratch writable");
        }
    }
}

/// Names a sweep's SAE may not take: the run directory's own entries.
const RESERVED_NAMES: [&str; 3] = ["checkpoint", "checkpoint.old", "checkpoint.new"];

/// A run's `config.toml` from `input` ([`RUN_DIR`] in it replaced by the run directory), three
/// ways: (1) [`Run::resume`] on a copy of a stopped run (the template, [`TEMPLATE_CONFIG`])
/// whose config.toml is `input`, which gives the verdict; (2) the file parsed as a
/// [`RunSpec`], its schedule resolved (`ScheduleSpec::resolved`) and each SAE spec
/// (`SaeSpec::resolve`) as `Run::resume` does, to itself again; (3) when it asks for a small
/// run, [`Run::create`] on it, whose sweep must not take a name the run directory uses. Data
/// paths must be given, plain (no glob, no `..`) and absolute ones inside the run directory, so
/// the fuzzer does not walk the file system; others are not resumed or created.
pub fn run_config(input: &[u8], scratch: &Path) -> Result<Verdict, String> {
    let template = template_run(scratch.join("template"));
    let dir = fresh(&scratch.join("run"));
    copy_tree(&template, &dir);
    let text = String::from_utf8_lossy(input);
    let input = match text {
        std::borrow::Cow::Borrowed(text) => in_dir(text, &dir).into_bytes(),
        std::borrow::Cow::Owned(_) => input.to_vec(),
    };
    fs::write(dir.join("config.toml"), &input).expect("scratch writable");
    let parsed = std::str::from_utf8(&input)
        .ok()
        .and_then(|text| toml::from_str::<RunSpec>(text).ok());
    // The synthetic set's evaluation rows take milliseconds even in a release build, and a
    // huge one aborts on allocation (issue 13 item 7): left to the size checks' own tests.
    let contained = parsed.as_ref().is_none_or(|spec| {
        !spec.data.paths.is_empty()
            && spec
                .data
                .paths
                .iter()
                .chain(&spec.data.eval_paths)
                .all(|p| {
                    let text = p.to_string_lossy();
                    (p.is_relative() || p.starts_with(&dir))
                        && !text.contains(['*', '?', '[', '{'])
                        && !text.contains("..")
                })
    });
    // The verdict is the resume's; parsing, resolving and creating only look for broken
    // promises.
    let go = AtomicBool::new(false);
    let resumed = contained.then(|| Run::resume(&dir, &ResumeOptions::default(), &go));
    let verdict = match resumed {
        None => Verdict::Refused("not resumed: synthetic, or data outside the run".into()),
        Some(Ok(_)) => Verdict::Accepted,
        Some(Err(err)) => refused(err.to_string())?,
    };
    let Some(spec) = parsed else {
        return Ok(verdict);
    };
    let synthetic = spec.data.paths.is_empty();
    let (steps, batch_size) = match spec.train.resolved() {
        Ok(schedule) => (schedule.steps, schedule.batch_size),
        Err(err) => {
            refused(err.to_string())?;
            (
                spec.train.steps.unwrap_or(1),
                spec.train.batch_size.unwrap_or(1),
            )
        }
    };
    let cx = Context {
        d_model: 16,
        synthetic,
        steps,
        batch_size,
    };
    for sae_spec in &spec.sae {
        let (resolved, ..) = match sae_spec.resolve(cx) {
            Ok(resolved) => resolved,
            Err(err) => {
                refused(err.to_string())?;
                continue;
            }
        };
        // What config.toml records must resolve to itself.
        if let Err(err) = resolved.resolve(cx) {
            return Err(format!(
                "the resolved spec {resolved:?} does not resolve: {err}"
            ));
        }
    }
    if contained && !synthetic && small(&spec) {
        let created = fresh(&scratch.join("created"));
        match Run::create(&spec, &created, false, &go) {
            Ok(run) if run.names().len() > 1 => {
                if let Some(name) = run.names().iter().find(|n| RESERVED_NAMES.contains(n)) {
                    return Err(format!("a sweep accepted the SAE name {name:?}"));
                }
            }
            Ok(_) => {}
            Err(err) => {
                refused(err.to_string())?;
            }
        }
    }
    Ok(verdict)
}

/// Whether `spec`'s buffer and SAEs are small enough to build for every input (on the
/// template's data, D = 16).
fn small(spec: &RunSpec) -> bool {
    let buffer = spec.data.buffer_rows.unwrap_or(usize::MAX);
    let batch = spec.train.batch_size.unwrap_or(4096);
    let saes_small = spec.sae.iter().all(|s| {
        let f = s.dict_size.unwrap_or(512);
        let e = s.expansion.unwrap_or(1);
        f <= 1024 && e <= 16 && s.k.unwrap_or(8) <= 1024
    });
    buffer <= 4096 && batch <= 1024 && spec.sae.len() <= 4 && saes_small
}
