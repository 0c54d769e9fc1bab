//! `plot::redraw` on run directories: both plots from good files, and errors that name the
//! file for missing or malformed ones.

mod common;

use common::{f32_bytes, png_size, random_sae, temp_dir, write_npy};
use sparse_autoencoder::plot::{self, CURVES_SIZE, DENSITY_SIZE};
use sparse_autoencoder::run::MetricsRecord;
use sparse_autoencoder::{Architecture, StepStats};

fn metrics_lines(n: u64) -> String {
    (1..=n)
        .map(|i| {
            let stats = StepStats {
                loss: 5.0 / i as f32,
                mse: 4.0 / i as f32,
                fve: 1.0 - 1.0 / i as f32,
                l0: 16.0,
                dead_fraction: 0.01 * i as f32,
                ..StepStats::default()
            };
            let record = MetricsRecord::new(i * 10, i * 10 * 256, &stats, i as f64);
            serde_json::to_string(&record).unwrap() + "\n"
        })
        .collect()
}

#[test]
fn redraw_writes_both_plots_from_a_run_directory() {
    let dir = temp_dir("plot-redraw");
    std::fs::write(dir.join("metrics.jsonl"), metrics_lines(40)).unwrap();
    let freq = [0.0f32, 0.0, 0.001, 0.01, 0.02, 0.5, 1.0];
    write_npy(
        &dir.join("feature_density.npy"),
        "<f4",
        &[7],
        &f32_bytes(&freq),
    );
    let drawn = plot::redraw(&dir).unwrap();
    assert_eq!(drawn.curves, dir.join("curves.png"));
    assert_eq!(drawn.density, Some(dir.join("density.png")));
    assert_eq!(png_size(&drawn.curves), CURVES_SIZE);
    assert_eq!(png_size(&dir.join("density.png")), DENSITY_SIZE);
    // Float16 frequencies and a [1, F] array read the same.
    write_npy(
        &dir.join("feature_density.npy"),
        "<f2",
        &[1, 7],
        &common::f16_bytes(&freq),
    );
    let read = plot::read_feature_density(&dir.join("feature_density.npy")).unwrap();
    assert_eq!(read.len(), 7);
    assert!((read[3] - 0.01).abs() < 1e-4, "{read:?}");
}

#[test]
fn without_feature_density_only_the_curves_are_drawn() {
    let dir = temp_dir("plot-no-density");
    std::fs::write(dir.join("metrics.jsonl"), metrics_lines(3)).unwrap();
    let drawn = plot::redraw(&dir).unwrap();
    assert_eq!(drawn.density, None);
    assert!(drawn.curves.exists() && !dir.join("density.png").exists());
    // An empty metrics file is a run that has not logged yet: it still draws.
    std::fs::write(dir.join("metrics.jsonl"), "").unwrap();
    plot::redraw(&dir).unwrap();
    assert_eq!(png_size(&drawn.curves), CURVES_SIZE);
}

#[test]
fn metrics_errors_name_the_file_and_line() {
    let dir = temp_dir("plot-bad-metrics");
    let err = plot::redraw(&dir).unwrap_err().to_string();
    assert!(
        err.contains("metrics.jsonl") && err.contains("sae train"),
        "{err}"
    );

    let good = metrics_lines(3);
    let mut lines: Vec<&str> = good.lines().collect();
    lines.insert(1, "{\"step\": 5}");
    std::fs::write(dir.join("metrics.jsonl"), lines.join("\n") + "\n").unwrap();
    let err = plot::redraw(&dir).unwrap_err().to_string();
    assert!(
        err.contains("metrics.jsonl") && err.contains("line 2,") && err.contains("`tokens`"),
        "{err}"
    );

    std::fs::write(dir.join("metrics.jsonl"), b"\xff\xfe\n").unwrap();
    let err = plot::redraw(&dir).unwrap_err().to_string();
    assert!(
        err.contains("metrics.jsonl") && err.contains("line 1"),
        "{err}"
    );
}

#[test]
fn a_last_line_cut_short_is_a_record_being_written_and_is_skipped() {
    let dir = temp_dir("plot-cut-metrics");
    let path = dir.join("metrics.jsonl");
    let mut text = metrics_lines(4);
    text.push_str("{\"step\":50,\"tokens\":12");
    std::fs::write(&path, &text).unwrap();
    assert_eq!(plot::read_metrics(&path).unwrap().len(), 4);
    // With its newline it was written whole, and is malformed.
    text.push('\n');
    std::fs::write(&path, &text).unwrap();
    let err = plot::read_metrics(&path).unwrap_err().to_string();
    assert!(err.contains("line 5,"), "{err}");
}

#[test]
fn feature_density_errors_name_the_file() {
    let dir = temp_dir("plot-bad-density");
    std::fs::write(dir.join("metrics.jsonl"), metrics_lines(3)).unwrap();
    let npy = dir.join("feature_density.npy");
    let expect_error = |needle: &str| {
        let err = plot::redraw(&dir).unwrap_err().to_string();
        assert!(
            err.contains("feature_density.npy") && err.contains(needle),
            "{needle}: {err}"
        );
    };

    std::fs::write(&npy, b"not an npy file").unwrap();
    expect_error("not an .npy file");
    write_npy(&npy, "<f4", &[2, 3], &f32_bytes(&[0.1; 6]));
    expect_error("[2, 3]");
    write_npy(&npy, "<f4", &[3], &f32_bytes(&[0.1, 1.5, 0.2]));
    expect_error("latent 1");
    write_npy(&npy, "<f4", &[2], &f32_bytes(&[f32::NAN, 0.2]));
    expect_error("latent 0");
    write_npy(&npy, "<i4", &[2], &[0; 8]);
    expect_error("dtype");
}

#[test]
fn a_sparse_feature_density_of_512_mib_is_refused_before_it_is_read() {
    let dir = temp_dir("plot-sparse-density");
    std::fs::write(dir.join("metrics.jsonl"), metrics_lines(3)).unwrap();
    let npy = dir.join("feature_density.npy");
    // 2^27 float32 frequencies declared; the data is a hole, so nothing is written to disk.
    let n = 1u64 << 27;
    write_npy(&npy, "<f4", &[n as usize], &[]);
    let file = std::fs::OpenOptions::new().write(true).open(&npy).unwrap();
    file.set_len(file.metadata().unwrap().len() + 4 * n)
        .unwrap();
    drop(file);
    let refused = |needles: &[&str]| {
        let started = std::time::Instant::now();
        let err = match plot::read_feature_density(&npy) {
            Ok(freq_f) => panic!("read {} frequencies", freq_f.len()),
            Err(err) => err.to_string(),
        };
        assert!(started.elapsed().as_secs_f64() < 1.0, "{err}");
        for needle in needles {
            assert!(err.contains(needle), "{needle:?} not in: {err}");
        }
    };
    // Beside an SAE: its F.
    random_sae(Architecture::TopK { k: 2 }, 4, 8, 0)
        .save(&dir)
        .unwrap();
    refused(&["feature_density.npy", "134217728", "sae.json has 8 latents"]);
    // Alone: a bound on any SAE's.
    std::fs::remove_file(dir.join("sae.json")).unwrap();
    refused(&["feature_density.npy", "134217728", "67108864"]);
    // A FIFO is refused, not opened (opening one blocks until something writes to it).
    std::fs::remove_file(&npy).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&npy)
        .status()
        .unwrap();
    assert!(made.success());
    refused(&["feature_density.npy", "not a regular file"]);
    std::fs::remove_file(&npy).unwrap();
    // One frequency per latent of the SAE beside it is read.
    random_sae(Architecture::TopK { k: 2 }, 4, 3, 0)
        .save(&dir)
        .unwrap();
    write_npy(&npy, "<f4", &[3], &f32_bytes(&[0.1, 0.0, 1.0]));
    assert_eq!(
        plot::read_feature_density(&npy).unwrap(),
        [0.1f32, 0.0, 1.0].map(f64::from)
    );
    std::fs::remove_dir_all(dir).unwrap();
}
