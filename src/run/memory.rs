//! What a training run needs in memory: [`crate::memory::Estimate`]s of a run of a resolved
//! [`RunSpec`] (its trainers, loader, checkpoint copy and synthetic set), and the checks that
//! refuse a run before it allocates.

use crate::data::LoaderConfig;
use crate::memory::{check, mul, u, Estimate, Knob};
use crate::synth::SynthConfig;
use crate::SaeConfig;

use super::RunSpec;

impl Estimate {
    /// A training run of `spec` (resolved: every SAE's `dict_size`, the batch size and the
    /// synthetic set filled in) on data of width `d_model`, with `train_rows` rows through the
    /// loader `loader` (`None` on the synthetic set, whose `synth_eval_rows` held-out rows are
    /// kept in memory), in one process of `ranks`: with more than one, the loader is in part
    /// mode (see `Batcher::for_part`), its buffer holding row indices only and its batches
    /// B/`ranks` rows.
    pub fn train(
        spec: &RunSpec,
        d_model: usize,
        loader: &LoaderConfig,
        train_rows: Option<u64>,
        synth_eval_rows: usize,
        ranks: usize,
    ) -> Estimate {
        let mut e = Estimate::default();
        let batch = spec.train.batch_size.unwrap_or(loader.batch_size);
        let d = u(d_model);
        let mut largest_fd = 0u128;
        let mut largest_f = 0usize;
        for sae in &spec.sae {
            let f = sae.dict_size.unwrap_or(0);
            let arch = sae
                .arch
                .unwrap_or(crate::run::ArchName::Batchtopk)
                .with_k(sae.k.unwrap_or(0));
            let config = SaeConfig {
                d_model,
                dict_size: f,
                arch,
            };
            e.trainer(&config, batch, ranks);
            if sae.precision == Some(crate::Precision::Bf16) {
                e.bf16_copies(&config, batch / ranks.max(1));
            }
            largest_fd = largest_fd.max(mul(&[u(f), d]));
            largest_f = largest_f.max(f);
        }
        if spec
            .sae
            .iter()
            .any(|s| s.threshold == Some(crate::ThresholdRule::Calibrate))
        {
            // The rows θ is calibrated on, and one batch's pre-activations at a time.
            e.add(
                "θ calibration rows",
                Knob::BatchAndDictSize,
                mul(&[4, u(crate::run::CALIBRATION_ROWS), d]).saturating_add(mul(&[
                    4,
                    u(batch),
                    u(largest_f.max(1)),
                ])),
            );
        }
        // A checkpoint copies one trainer's state (parameters, m, v: 24 bytes per weight);
        // the sliced writer writes the file from that copy in place (`io::write_sliced`).
        e.add("checkpoint copy", Knob::DictSize, mul(&[24, largest_fd]));
        let b_d = mul(&[4, u(batch), d]);
        match train_rows {
            Some(rows) => {
                // The prefetcher's queue, the batch being made and the one being trained on;
                // in part mode each holds this rank's B/ranks rows.
                let part_b_d = mul(&[4, u(batch / ranks.max(1)), d]);
                e.add(
                    "prefetched batches",
                    Knob::BatchSize,
                    mul(&[u(loader.prefetch) + 2, part_b_d]),
                );
                let capacity = u(loader.buffer_capacity(rows, d_model));
                // The rows (none in part mode), and the 8-byte slot table three times (the
                // batcher's, the prefetcher's cursor and a checkpoint's copy).
                let buffered = if ranks > 1 { 0 } else { mul(&[4, capacity, d]) };
                e.add(
                    "shuffle buffer",
                    Knob::BufferRows,
                    buffered.saturating_add(mul(&[24, capacity])),
                );
            }
            None => {
                e.add("synthetic batch", Knob::BatchSize, mul(&[2, b_d]));
                let synth = spec.synthetic.clone().unwrap_or_default();
                e.synthetic(&synth, synth_eval_rows);
                // Recovery: the true features' cosines with every latent, and a unit copy of
                // the decoder.
                let g = u(synth.n_features);
                e.add(
                    "recovery scores",
                    Knob::Synthetic,
                    mul(&[4, g, u(largest_f)]),
                );
                e.add(
                    "recovery's decoder copy",
                    Knob::DictSize,
                    mul(&[4, u(largest_f), d]),
                );
            }
        }
        e
    }

    /// The synthetic set's own arrays: the true features (held twice, by the set and by the
    /// run's recovery check) and its held-out rows.
    pub fn synthetic(&mut self, synth: &SynthConfig, eval_rows: usize) {
        let (g, d) = (u(synth.n_features), u(synth.d_model));
        self.add(
            "synthetic features and held-out rows",
            Knob::Synthetic,
            mul(&[8, g, d]).saturating_add(mul(&[4, u(eval_rows), d])),
        );
    }
}

/// Refuses a run of `spec` on the synthetic set that needs more memory than it may use,
/// before the set and its `eval_rows` held-out rows are built (seconds in a debug build).
/// Runs on files pass: their width is known once the files are open.
pub fn check_synthetic(spec: &RunSpec, eval_rows: usize) -> crate::Result<()> {
    if !spec.data.paths.is_empty() || spec.data.given.is_some() {
        return Ok(());
    }
    let synth = spec.synthetic.clone().unwrap_or_default();
    // The synthetic set's defaults, as `Run::create` applies them.
    let batch_size = spec.train.batch_size.unwrap_or(1024).max(1);
    let steps = match (spec.train.steps, spec.train.tokens) {
        (Some(steps), _) => steps,
        (None, Some(tokens)) => tokens.div_ceil(batch_size as u64),
        (None, None) => 3000,
    };
    let cx = super::Context {
        d_model: synth.d_model,
        synthetic: true,
        steps,
        batch_size,
    };
    let one_default = [super::SaeSpec::default()];
    let saes = if spec.sae.is_empty() {
        &one_default[..]
    } else {
        &spec.sae[..]
    };
    let resolved = RunSpec {
        // The run resolves each SAE in this same context: its error comes as it would.
        sae: saes
            .iter()
            .map(|sae| {
                let sae = sae.with_synthetic_defaults(&synth);
                sae.resolve(cx).map(|(resolved, _, _)| resolved)
            })
            .collect::<Result<_, _>>()?,
        train: super::ScheduleSpec {
            batch_size: Some(batch_size),
            ..spec.train.clone()
        },
        synthetic: Some(synth.clone()),
        ..spec.clone()
    };
    let loader = LoaderConfig::default();
    let estimate = Estimate::train(&resolved, synth.d_model, &loader, None, eval_rows, 1);
    Ok(check(&estimate, spec.train.max_memory)?)
}

/// Refuses a run of the resolved `spec` that needs more memory than it may use (see
/// [`Estimate::train`]) in each of its `ranks` processes, in groups of `latent_shards` that
/// share their rows and split the latents; called once the data is open and before the
/// trainers and the loader allocate.
pub fn check_run(
    spec: &RunSpec,
    d_model: usize,
    loader: &LoaderConfig,
    train_rows: Option<u64>,
    synth_eval_rows: usize,
    ranks: usize,
    latent_shards: usize,
) -> crate::Result<()> {
    // A latent shard holds F/S latents of each SAE; a group of S shards shares its rows.
    let mut spec = spec.clone();
    for sae in &mut spec.sae {
        sae.dict_size = sae.dict_size.map(|f| f.div_ceil(latent_shards.max(1)));
    }
    let groups = ranks / latent_shards.max(1);
    let estimate = Estimate::train(&spec, d_model, loader, train_rows, synth_eval_rows, groups);
    Ok(check(&estimate, spec.train.max_memory)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{ByteSize, RUNTIME_BYTES};
    use crate::run::{ArchName, SaeSpec, ScheduleSpec};

    fn spec(batch: usize, dict_sizes: &[usize]) -> RunSpec {
        RunSpec {
            train: ScheduleSpec {
                batch_size: Some(batch),
                ..ScheduleSpec::default()
            },
            sae: dict_sizes
                .iter()
                .map(|&f| SaeSpec {
                    arch: Some(ArchName::Topk),
                    k: Some(32),
                    dict_size: Some(f),
                    ..SaeSpec::default()
                })
                .collect(),
            ..RunSpec::default()
        }
    }

    fn part(e: &Estimate, what: &str) -> u128 {
        e.parts
            .iter()
            .filter(|p| p.what == what)
            .map(|p| p.bytes)
            .sum()
    }

    #[test]
    fn a_trainer_holds_four_parameter_sized_arrays_and_its_step_buffers() {
        let (b, f, d, k) = (1024u128, 4096u128, 256u128, 32u128);
        let e = Estimate::train(
            &spec(1024, &[4096]),
            256,
            &LoaderConfig::default(),
            Some(50_000),
            0,
            1,
        );
        let params = 4 * (2 * f * d + f + d);
        assert_eq!(
            part(&e, "parameters, Adam moments and gradients"),
            4 * params + 29 * f
        );
        assert_eq!(part(&e, "checkpoint copy"), 24 * f * d);
        assert_eq!(part(&e, "B×D step buffers"), 20 * b * d);
        let codes = 24 * (b * k + b * (d / 2)) + 32 * (b + f);
        assert_eq!(part(&e, "B×F step buffers"), 4 * b * f + codes);
        assert_eq!(part(&e, "prefetched batches"), 4 * 4 * b * d);
        // The buffer holds the whole dataset when it is smaller than 2^20 rows.
        assert_eq!(part(&e, "shuffle buffer"), 50_000 * (4 * d + 24));
        let sum: u128 = e.parts.iter().map(|p| p.bytes).sum();
        assert_eq!(e.total(), sum + RUNTIME_BYTES);
    }

    #[test]
    fn a_part_mode_loader_buffers_row_indices_and_prefetches_its_part() {
        let d = 256u128;
        let loader = LoaderConfig::default();
        let run =
            |ranks| Estimate::train(&spec(1024, &[4096]), 256, &loader, Some(50_000), 0, ranks);
        let (one, four) = (run(1), run(4));
        // 8 bytes a slot, three times over (batcher, prefetcher's cursor, checkpoint).
        assert_eq!(part(&four, "shuffle buffer"), 50_000 * 24);
        assert_eq!(part(&one, "shuffle buffer"), 50_000 * (4 * d + 24));
        // prefetch + 2 batches of B/ranks rows.
        assert_eq!(part(&four, "prefetched batches"), 4 * 4 * 256 * d);
        assert_eq!(part(&one, "prefetched batches"), 4 * 4 * 1024 * d);
        for what in ["parameters, Adam moments and gradients", "checkpoint copy"] {
            assert_eq!(part(&four, what), part(&one, what), "{what}");
        }
        // A rank's step buffers hold its rows, plus every rank's rows gathered for the
        // backward pass.
        assert_eq!(part(&four, "B×D step buffers"), 20 * 256 * d);
        assert_eq!(part(&one, "B×D step buffers"), 20 * 1024 * d);
        assert!(part(&four, "B×F step buffers") * 4 < part(&one, "B×F step buffers") + 4096 * 256);
        assert_eq!(part(&one, "gathered batch rows"), 0);
        assert_eq!(
            part(&four, "gathered batch rows"),
            12 * 1024 * d + 16 * 4 * (256 * 32 + 256 * 128)
        );
    }

    #[test]
    fn a_sweep_counts_every_trainer_and_one_checkpoint_copy() {
        let loader = LoaderConfig::default();
        let one = Estimate::train(&spec(256, &[2048]), 64, &loader, Some(1000), 0, 1);
        let two = Estimate::train(&spec(256, &[2048, 2048]), 64, &loader, Some(1000), 0, 1);
        for what in ["parameters, Adam moments and gradients", "B×F step buffers"] {
            assert_eq!(part(&two, what), 2 * part(&one, what), "{what}");
        }
        assert_eq!(part(&two, "checkpoint copy"), part(&one, "checkpoint copy"));
    }

    #[test]
    fn relu_counts_the_dense_path_and_the_synthetic_set_its_own_arrays() {
        let mut relu = spec(1000, &[1000]);
        relu.sae[0].arch = Some(ArchName::Relu);
        let e = Estimate::train(&relu, 64, &LoaderConfig::default(), None, 16384, 1);
        let (b, f) = (1000u128, 1000u128);
        // pre_bf and ∂L/∂pre, plus the sparse path's codes (5% of B·F, 24 bytes each).
        assert_eq!(
            part(&e, "B×F step buffers"),
            8 * b * f + 24 * (b * f / 20) + 32 * (b + f)
        );
        let synth = SynthConfig::default();
        assert_eq!(
            part(&e, "synthetic features and held-out rows"),
            8 * synth.n_features as u128 * 64 + 4 * 16384 * 64
        );
        assert_eq!(part(&e, "shuffle buffer"), 0);
    }

    #[test]
    fn the_largest_part_names_what_to_lower() {
        let loader = LoaderConfig::default();
        let big_batch = Estimate::train(&spec(1 << 20, &[512]), 64, &loader, Some(1000), 0, 1);
        assert_eq!(big_batch.largest().unwrap().0, Knob::BatchAndDictSize);
        let wide_batch = Estimate::train(&spec(1 << 20, &[16]), 4096, &loader, Some(1000), 0, 1);
        assert_eq!(wide_batch.largest().unwrap().0, Knob::BatchSize);
        let big_dict = Estimate::train(&spec(64, &[1 << 22]), 256, &loader, Some(1000), 0, 1);
        assert_eq!(big_dict.largest().unwrap().0, Knob::DictSize);
        let big_buffer = Estimate::train(&spec(64, &[512]), 256, &loader, Some(1 << 30), 0, 1);
        assert_eq!(big_buffer.largest().unwrap().0, Knob::BufferRows);
    }

    #[test]
    fn sizes_past_any_address_space_saturate_and_are_refused() {
        let e = Estimate::train(
            &spec(usize::MAX, &[usize::MAX]),
            usize::MAX,
            &LoaderConfig::default(),
            Some(u64::MAX),
            0,
            1,
        );
        assert_eq!(e.total(), u128::MAX);
        // Even a budget of 16 EiB does not admit it, and the message then offers no budget.
        let err = check(&e, Some(ByteSize(u64::MAX))).unwrap_err();
        assert_eq!(err.available, None);
        let line = err.describe(|k| k.key().to_string(), "--max-memory");
        assert!(line.contains("more than any address space"), "{line}");
        assert!(!line.contains("--max-memory"), "{line}");
    }

    #[test]
    fn the_budget_replaces_what_is_detected() {
        let e = Estimate::train(
            &spec(1024, &[4096]),
            256,
            &LoaderConfig::default(),
            Some(50_000),
            0,
            1,
        );
        let total = e.total() as u64;
        assert_eq!(check(&e, Some(ByteSize(total))), Ok(()));
        let err = check(&e, Some(ByteSize(total - 1))).unwrap_err();
        assert_eq!(err.needed, total as u128);
        assert_eq!(err.available.unwrap().bytes, total - 1);
        let line = err.to_string();
        assert!(line.contains("lower dict_size"), "{line}");
        assert!(line.contains("raise max_memory"), "{line}");
        assert!(!line.contains('\n'), "{line}");
    }
}
