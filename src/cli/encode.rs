//! `sae encode`: an SAE's sparse codes for every row of some activations, as `.npy` files.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use sparse_autoencoder::data::{NpyShards, Source};
use sparse_autoencoder::dist::{agree, World};
use sparse_autoencoder::internals::Selection;
use sparse_autoencoder::io::{CodesLayout, CodesWriter};
use sparse_autoencoder::Encoder;
use sparse_autoencoder::{Architecture, Codes, Sae};

use super::{at_least_one, usage, UsageError};

/// `sae encode`'s options.
#[derive(Args)]
pub struct EncodeArgs {
    /// The SAE: a run directory (or a sweep's SAE subdirectory).
    #[arg(value_name = "SAE_DIR")]
    sae: PathBuf,
    /// Activations to encode, in order: .npy files, directories or globs.
    #[arg(long, num_args = 1.., value_name = "PATH", required = true)]
    data: Vec<PathBuf>,
    /// Directory for the codes: topk writes indices.npy (uint32, N×k) and values.npy
    /// (float32, N×k); relu and batchtopk write CSR indptr.npy (int64, N+1), indices.npy
    /// (uint32) and values.npy (float32). codes.json says which.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Rows encoded at a time.
    #[arg(long, default_value_t = 4096, value_parser = at_least_one, allow_negative_numbers = true)]
    batch_size: usize,
    /// Replace codes already in --out.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    device: super::DeviceArgs,
}

/// Refuses a `--batch-size` whose batches cannot fit in memory: each holds its rows (B×D) and
/// their pre-activations (B×F) as float32, and the data may hold any number of rows.
pub(super) fn check_batch_memory(batch_size: usize, n_rows: u64, d: usize, f: usize) -> Result<()> {
    let b = n_rows.min(batch_size as u64);
    let need = (d as u64)
        .checked_add(f as u64)
        .and_then(|w| w.checked_mul(b))
        .and_then(|e| e.checked_mul(4));
    let available = sparse_autoencoder::memory::available().map(|a| a.bytes);
    match (need, available) {
        (Some(need), Some(available)) if need <= available => Ok(()),
        (Some(_), None) => Ok(()),
        (need, available) => Err(UsageError(format!(
            "invalid --batch-size {batch_size}: a batch of {b} rows needs {} (rows × (D + F) \
             float32), more than the {} available; pass a smaller --batch-size",
            need.map_or("over 2^64 bytes".into(), |n| format!(
                "{:.1} GB",
                n as f64 / 1e9
            )),
            available.map_or("memory".into(), |a| format!("{:.1} GB", a as f64 / 1e9)),
        ))
        .into()),
    }
}

/// Runs `sae encode`. Under an MPI launcher the batches of `--batch-size` rows go to the
/// processes in turn, rank q encoding batches q, q + world, q + 2·world, …: each batch is the
/// one a single process would encode, so the codes are the same bits (even those of a
/// BatchTopK SAE without a threshold, which depend on the batch). Round by round, rank 0
/// gathers one batch from each process and writes them in row order, holding at most one
/// batch of codes per process.
pub fn run(args: EncodeArgs, world: &World) -> Result<Option<u8>> {
    let collective = world.collective();
    let c = &*collective;
    let (rank, size) = (c.rank(), c.world_size());
    let lead = rank == 0;
    let loaded = args.device.device().and_then(|device| {
        let mut sae = Sae::load(&args.sae).map_err(usage)?;
        args.device.set_precision(&mut sae)?;
        Ok((device, sae))
    });
    let ((device, sae), _) = agree(c, loaded, false)?;
    let ((mut encoder, rows, mut writer), _) = agree(c, open(&args, &sae, device, lead), false)?;
    let (n, d) = (rows.n_rows(), sae.config().d_model);
    let batch_rows = args.batch_size as u64;
    let rounds = n.div_ceil(batch_rows).div_ceil(size as u64);
    let mut x_bd = ndarray::Array2::zeros((0, d));
    let mut nnz = 0u64;
    // The lead's last round of writing, agreed with the next round's encoding.
    let mut written: Result<()> = Ok(());
    for round in 0..rounds {
        let start = ((round * size as u64 + rank as u64) * batch_rows).min(n);
        let b = (n - start).min(batch_rows) as usize;
        let encoded = if b == 0 {
            Ok(None)
        } else {
            encode_batch(&mut encoder, &rows, &mut x_bd, start, b).map(Some)
        };
        let (codes, _) = agree(c, written.and(encoded), false)?;
        // The lead keeps its own codes; the others send theirs.
        let sent = match (&codes, lead) {
            (Some(codes), false) => codes_to_bytes(codes),
            _ => Vec::new(),
        };
        let gathered = c.gather_bytes(0, &sent);
        written = match &mut writer {
            Some(writer) => (|| {
                if let Some(codes) = &codes {
                    nnz += codes.nnz() as u64;
                    writer.push(codes)?;
                }
                for bytes in gathered.iter().skip(1).filter(|b| !b.is_empty()) {
                    let codes = codes_from_bytes(bytes, sae.config().dict_size)?;
                    nnz += codes.nnz() as u64;
                    writer.push(&codes)?;
                }
                Ok(())
            })(),
            None => Ok(()),
        };
    }
    let finished = written.and_then(|()| match writer {
        Some(writer) => Ok(writer.finish()?),
        None => Ok(()),
    });
    agree(c, finished, false)?;
    if lead {
        println!(
            "encoded {n} rows ({:.2} active latents a row) into {}",
            nnz as f64 / n as f64,
            args.out.display()
        );
    }
    Ok(None)
}

/// Everything before the first batch, on every process: the encoder, the data checked
/// against the SAE; on the lead also --out, made ready and opened for the codes.
fn open<'a>(
    args: &EncodeArgs,
    sae: &'a Sae,
    device: sparse_autoencoder::backend::Device,
    lead: bool,
) -> Result<(Encoder<'a>, NpyShards, Option<CodesWriter>)> {
    // Before anything is written: a device that cannot run leaves --out untouched.
    let encoder = sae.encoder(device).map_err(usage)?;
    let rows = NpyShards::open(&args.data)?;
    if lead {
        for notice in rows.notices() {
            println!("note: {notice}");
        }
    }
    let (d, f) = (sae.config().d_model, sae.config().dict_size);
    if rows.d_model() != d {
        return Err(UsageError(format!(
            "invalid --data: its rows are {} wide but the SAE in {} takes {d}",
            rows.d_model(),
            args.sae.display()
        ))
        .into());
    }
    check_batch_memory(args.batch_size, rows.n_rows(), d, f)?;
    if !lead {
        return Ok((encoder, rows, None));
    }
    if args.out.join("codes.json").exists() && !args.force {
        return Err(UsageError(format!(
            "invalid --out {}: it already holds codes; pass --force to replace them",
            args.out.display()
        ))
        .into());
    }
    std::fs::create_dir_all(&args.out)
        .map_err(|err| UsageError(format!("invalid --out {}: {err}", args.out.display())))?;
    // Only TopK has k codes in every row.
    let layout = match sae.config().arch {
        Architecture::TopK { k } => CodesLayout::TopK { k },
        _ => CodesLayout::Csr,
    };
    let batch_rule = matches!(Selection::of(sae.config().arch), Selection::BatchTopK(_));
    if batch_rule && sae.threshold().is_none() {
        println!(
            "note: this SAE has no threshold θ yet; each batch keeps its own top k·B \
             codes, so codes depend on --batch-size"
        );
    }
    let writer = CodesWriter::new(&args.out, layout, f, rows.n_rows())?;
    Ok((encoder, rows, Some(writer)))
}

/// The codes of rows `start..start + b`, read into `x_bd`; a non-finite row is an error
/// naming it.
fn encode_batch(
    encoder: &mut Encoder<'_>,
    rows: &NpyShards,
    x_bd: &mut ndarray::Array2<f32>,
    start: u64,
    b: usize,
) -> Result<Codes> {
    if x_bd.nrows() != b {
        *x_bd = ndarray::Array2::zeros((b, x_bd.ncols()));
    }
    rows.read_rows(start, x_bd.as_slice_mut().expect("standard layout"))?;
    if let Some(bad) = x_bd
        .rows()
        .into_iter()
        .position(|r| r.iter().any(|v| !v.is_finite()))
    {
        // Not DataError::NonFinite: its fix, skipping such rows, would misalign the codes
        // with the rows they belong to.
        return Err(UsageError(format!(
            "invalid --data: non-finite value (NaN or Inf) at {}; the codes keep one row \
             per input row, so clean the data first",
            rows.locate(start + bad as u64)
        ))
        .into());
    }
    Ok(encoder.encode(x_bd.view())?)
}

/// `codes` as bytes for [`codes_from_bytes`]: rows and nnz (u64), the row offsets (u64),
/// the latents (u32) and the values (f32 bits), little-endian.
fn codes_to_bytes(codes: &Codes) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(16 + 8 * codes.indptr.len() + 8 * codes.nnz());
    bytes.extend((codes.n_rows() as u64).to_le_bytes());
    bytes.extend((codes.nnz() as u64).to_le_bytes());
    bytes.extend(codes.indptr.iter().flat_map(|&p| (p as u64).to_le_bytes()));
    bytes.extend(codes.indices.iter().flat_map(|&j| j.to_le_bytes()));
    bytes.extend(codes.values.iter().flat_map(|&v| v.to_le_bytes()));
    bytes
}

/// The codes [`codes_to_bytes`] wrote, for an SAE of `n_latents` latents.
fn codes_from_bytes(bytes: &[u8], n_latents: usize) -> Result<Codes> {
    let malformed = || anyhow::anyhow!("malformed codes from another process");
    let mut rest = bytes;
    let mut take = |n: usize| -> Result<&[u8]> {
        let (head, tail) = rest.split_at_checked(n).ok_or_else(malformed)?;
        rest = tail;
        Ok(head)
    };
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    let n_rows = word(take(8)?) as usize;
    let nnz = word(take(8)?) as usize;
    // Bytes of `count` elements of `width` bytes, if that is a number.
    let array = |count: Option<usize>, width: usize| {
        count
            .and_then(|c| c.checked_mul(width))
            .ok_or_else(malformed)
    };
    let indptr: Vec<usize> = take(array(n_rows.checked_add(1), 8)?)?
        .chunks_exact(8)
        .map(|b| word(b) as usize)
        .collect();
    let indices = take(array(Some(nnz), 4)?)?
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect();
    let values = take(array(Some(nnz), 4)?)?
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect();
    let ascending = indptr.windows(2).all(|w| w[0] <= w[1]);
    if !rest.is_empty() || indptr[0] != 0 || indptr[n_rows] != nnz || !ascending {
        return Err(malformed());
    }
    Ok(Codes {
        n_latents,
        indptr,
        indices,
        values,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_survive_the_trip_through_bytes() {
        let codes = Codes {
            n_latents: 9,
            indptr: vec![0, 2, 2, 5],
            indices: vec![1, 8, 0, 3, 4],
            values: vec![0.5, -1.25, f32::MIN_POSITIVE, 3.0, 7.5],
        };
        let bytes = codes_to_bytes(&codes);
        assert_eq!(codes_from_bytes(&bytes, 9).unwrap(), codes);
        for cut in [0, 7, 20, bytes.len() - 1] {
            assert!(codes_from_bytes(&bytes[..cut], 9).is_err(), "{cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(codes_from_bytes(&long, 9).is_err());
        // Offsets that do not end at nnz.
        let mut bad = bytes.clone();
        bad[16 + 3 * 8] = 4;
        assert!(codes_from_bytes(&bad, 9).is_err());
    }
}
