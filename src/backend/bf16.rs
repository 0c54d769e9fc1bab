//! The bfloat16 encoder GEMM (`--precision bf16`): rounding to bf16, the batch packed by
//! panels of rows, W_enc's bf16 copy, and the AVX-512 BF16 kernel (`vdpbf16ps`) that multiplies
//! them with f32 accumulation. Which instruction set runs it is [`Bf16Kernel::detect`]'s.
//!
//! The kernel keeps a 32-row × 12-latent tile of C in 24 vector registers: the batch's panel
//! (32 rows, each 32-bit lane a pair of consecutive bf16 along D) is loaded as two vectors,
//! and each latent's pair is broadcast from W_enc's bf16 rows, which stay row-major so the
//! Adam pass can round each row as it updates it. Every entry of C is one kernel call's sum
//! over all of D in a fixed order, so the result depends on neither the thread count nor the
//! scheduling.

use std::ops::Range;

use ndarray::{Array2, ArrayView1, ArrayView2, ArrayViewMut2, Axis, Zip};
use rayon::prelude::*;

use crate::error::{check_shape, Error, Result};

/// Batch rows per packed panel: the kernel's two 16-lane vectors.
pub(crate) const PANEL: usize = 32;
/// Latents per kernel tile (with two vectors each, 24 of the 32 vector registers).
const TILE: usize = 12;
/// Latents per parallel task, at most: a block of batch rows is reused across this many of
/// W_enc's rows before the next block is read (32 tiles measured 4–7% faster than 8 at
/// D = 768 and 2048), and at least 8 tiles, so a task amortises its blocks' reads.
const TASK_LATENTS: std::ops::RangeInclusive<usize> = 8 * TILE..=32 * TILE;
/// Bytes of packed batch rows a task keeps in a core's L2 cache while it sweeps its latents.
const BLOCK_BYTES: usize = 256 << 10;

/// `x` rounded to the nearest bfloat16, ties to even (NaN stays NaN, quieted; values above
/// bf16's largest finite round to ±∞ as IEEE rounding does).
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits + 0x7fff + ((bits >> 16) & 1)) >> 16;
    // A select rather than an early return, so that loops over rows vectorise.
    let quiet_nan = (bits >> 16) | 0x0040;
    (if x.is_nan() { quiet_nan } else { rounded }) as u16
}

/// The f32 value of bfloat16 bits `h` (exact).
#[inline(always)]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `x` rounded to bfloat16 and back: the value the bf16 GEMM multiplies.
#[inline(always)]
pub fn round_bf16(x: f32) -> f32 {
    bf16_to_f32(to_bf16(x))
}

/// Two consecutive elements as the kernel's 32-bit lane: `lo` in the low half.
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    to_bf16(lo) as u32 | (to_bf16(hi) as u32) << 16
}

/// Rounds a row of D values into D/2 (rounded up) pairs, as [`Bf16Rows`] and [`Bf16Batch`]
/// hold them; an odd D's last pair has a zero high half.
#[inline(always)]
pub(crate) fn round_row_into(dst_p: &mut [u32], src_d: &[f32]) {
    let mut chunks = src_d.chunks_exact(2);
    for (out, c) in dst_p.iter_mut().zip(chunks.by_ref()) {
        *out = pair(c[0], c[1]);
    }
    if let [last] = chunks.remainder() {
        dst_p[src_d.len() / 2] = pair(*last, 0.0);
    }
}

/// The instruction set that runs the bf16 GEMM here; only [`Bf16Kernel::detect`] makes one,
/// so holding one means the CPU has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bf16Kernel {
    _detected: (),
}

impl Bf16Kernel {
    /// The kernel this CPU can run (AVX-512 BF16, `vdpbf16ps`: Intel Cooper Lake and later,
    /// AMD Zen 4 and later), or [`Error::Precision`] naming what it lacks.
    pub fn detect() -> Result<Self> {
        #[cfg(target_arch = "x86_64")]
        let present =
            std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16");
        #[cfg(not(target_arch = "x86_64"))]
        let present = false;
        Self::if_present(present)
    }

    /// The kernel when the CPU has the instructions, else the error naming what is missing.
    fn if_present(present: bool) -> Result<Self> {
        if present {
            return Ok(Bf16Kernel { _detected: () });
        }
        Err(Error::Precision {
            precision: crate::config::Precision::Bf16,
            reason: if cfg!(target_arch = "x86_64") {
                "this CPU lacks AVX-512 BF16 (the avx512_bf16 flag of /proc/cpuinfo), which the \
                 bf16 encoder GEMM runs on; pass --precision f32 (the default)"
            } else {
                "the bf16 encoder GEMM runs on x86-64 CPUs with AVX-512 BF16 (avx512_bf16) \
                 only; pass --precision f32 (the default)"
            }
            .to_string(),
        })
    }

    /// Its instruction set, for logs and benchmarks.
    pub fn name(self) -> &'static str {
        "AVX-512 BF16"
    }
}

/// W_enc (or any F×D matrix whose rows are the GEMM's columns) rounded to bf16: F rows of
/// ⌈D/2⌉ pairs, with zero rows up to a whole kernel tile.
#[derive(Clone, Debug)]
pub struct Bf16Rows {
    rows: usize,
    cols: usize,
    /// (F rounded up to a tile) × ⌈D/2⌉ pairs.
    pairs_fp: Array2<u32>,
}

impl Bf16Rows {
    /// `w_fd` rounded (in any memory layout).
    pub fn new(w_fd: ArrayView2<'_, f32>) -> Self {
        let w_fd = w_fd.as_standard_layout();
        let w_fd = w_fd.view();
        let (rows, cols) = w_fd.dim();
        let mut w = Bf16Rows {
            rows,
            cols,
            pairs_fp: Array2::zeros((rows.next_multiple_of(TILE), cols.div_ceil(2))),
        };
        w.refresh(w_fd, 0..rows);
        w
    }

    /// Rounds rows `rows` of `w_fd` (the matrix this copy was made of, since updated, in
    /// standard layout as an SAE's W_enc is) again.
    pub(crate) fn refresh(&mut self, w_fd: ArrayView2<'_, f32>, rows: Range<usize>) {
        debug_assert_eq!(w_fd.dim(), (self.rows, self.cols));
        let range = ndarray::s![rows, ..];
        Zip::from(self.pairs_fp.slice_mut(range).rows_mut())
            .and(w_fd.slice(range).rows())
            .par_for_each(|mut dst, src| {
                round_row_into(
                    dst.as_slice_mut().expect("standard layout"),
                    src.as_slice().expect("rows of a standard-layout matrix"),
                )
            });
    }

    /// Rows of pairs, one per row of the f32 matrix, for [`round_row_into`] (the fused
    /// refresh in the Adam pass).
    pub(crate) fn rows_mut(&mut self) -> ArrayViewMut2<'_, u32> {
        self.pairs_fp.slice_mut(ndarray::s![..self.rows, ..])
    }

    /// The f32 matrix's shape.
    pub(crate) fn dim(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }
}

/// A batch rounded to bf16 and packed for the kernel: panels of `PANEL` (32) rows, each pair
/// index holding the panel's 32 rows' pairs side by side (rows past B are zero).
#[derive(Clone, Debug, Default)]
pub struct Bf16Batch {
    rows: usize,
    cols: usize,
    words: Vec<u32>,
}

impl Bf16Batch {
    fn pairs(&self) -> usize {
        self.cols.div_ceil(2)
    }

    /// Forms `xc_bd` (shaped like `x_bd`) as x − `b_dec_d` (or x itself when `b_dec_d` is
    /// `None`) in f32, and this packed, rounded copy of it in the same pass. Fails with
    /// [`Error::Shape`] when the shapes disagree.
    pub fn form(
        &mut self,
        x_bd: ArrayView2<'_, f32>,
        b_dec_d: Option<ArrayView1<'_, f32>>,
        mut xc_bd: ArrayViewMut2<'_, f32>,
    ) -> Result<()> {
        let (b, d) = x_bd.dim();
        check_shape("x − b_dec (xc_bd)", xc_bd.shape(), &[b, d])?;
        if let Some(b_dec) = &b_dec_d {
            check_shape("b_dec_d", b_dec.shape(), &[d])?;
        }
        self.rows = b;
        self.cols = d;
        let pairs = self.pairs();
        let panel_words = PANEL * pairs;
        // Only the length: every word of the batch's rows is written below, and the padding
        // rows of the last panel only ever feed output rows that are not stored.
        self.words.resize(b.div_ceil(PANEL) * panel_words, 0);
        xc_bd
            .axis_chunks_iter_mut(Axis(0), PANEL)
            .into_par_iter()
            .zip(x_bd.axis_chunks_iter(Axis(0), PANEL))
            .zip(self.words.par_chunks_mut(panel_words))
            .for_each(|((mut xc_rd, x_rd), panel)| {
                for (r, (mut xc, x)) in xc_rd.rows_mut().into_iter().zip(x_rd.rows()).enumerate() {
                    match &b_dec_d {
                        Some(b_dec) => Zip::from(&mut xc)
                            .and(&x)
                            .and(b_dec)
                            .for_each(|c, &x, &bd| *c = x - bd),
                        None => xc.assign(&x),
                    }
                    // Rounded from the f32 row just written, straight into the panel: no
                    // scratch row, so forming a batch allocates nothing.
                    let mut values = xc.iter().copied();
                    for p in 0..pairs {
                        let lo = values.next().unwrap_or(0.0);
                        let hi = values.next().unwrap_or(0.0);
                        panel[p * PANEL + r] = pair(lo, hi);
                    }
                }
            });
        Ok(())
    }
}

/// The bf16 encoder GEMM's working set: the kernel, W_enc's bf16 copy (made at the first
/// batch, then kept current by whoever updates W_enc: the Adam pass rounds each row it
/// updates, see [`Bf16Encoder::w_enc_mut`]) and the packed batch.
#[derive(Clone, Debug)]
pub(crate) struct Bf16Encoder {
    kernel: Bf16Kernel,
    w_enc: Option<Bf16Rows>,
    batch: Bf16Batch,
}

impl Bf16Encoder {
    /// An encoder on `kernel`, with no copy of W_enc yet.
    pub fn new(kernel: Bf16Kernel) -> Self {
        Bf16Encoder {
            kernel,
            w_enc: None,
            batch: Bf16Batch::default(),
        }
    }

    /// x − b_dec (x when `b_dec_d` is `None`) into `xc_bd` in f32, and its product with
    /// `w_enc_fd`ᵀ into `gemm_bf`, both in bf16: the encoder GEMM of `--precision bf16`.
    /// `w_enc_fd` must be the matrix the copy was made of, as updated since through
    /// [`Bf16Encoder::w_enc_mut`] or [`Bf16Encoder::refresh`].
    pub fn encode(
        &mut self,
        w_enc_fd: ArrayView2<'_, f32>,
        x_bd: ArrayView2<'_, f32>,
        b_dec_d: Option<ArrayView1<'_, f32>>,
        xc_bd: ArrayViewMut2<'_, f32>,
        gemm_bf: ArrayViewMut2<'_, f32>,
    ) {
        let w = self.w_enc.get_or_insert_with(|| Bf16Rows::new(w_enc_fd));
        debug_assert_eq!(w.dim(), w_enc_fd.dim());
        // The caller (`Sae::pre_activations_into`) sizes every array from the SAE.
        self.batch
            .form(x_bd, b_dec_d, xc_bd)
            .expect("x − b_dec sized from the batch");
        gemm(self.kernel, &self.batch, w, gemm_bf).expect("output sized from the SAE");
    }

    /// W_enc's copy, a row of pairs per latent, for the Adam pass to round the rows it
    /// updates into ([`round_row_into`]); `None` before the first batch made it.
    pub fn w_enc_mut(&mut self) -> Option<ArrayViewMut2<'_, u32>> {
        self.w_enc.as_mut().map(Bf16Rows::rows_mut)
    }

    /// Rounds rows `rows` of `w_enc_fd` into the copy again (rows updated by another
    /// process), if there is a copy.
    pub fn refresh(&mut self, w_enc_fd: ArrayView2<'_, f32>, rows: Range<usize>) {
        if let Some(w) = &mut self.w_enc {
            w.refresh(w_enc_fd, rows);
        }
    }

    /// Drops the copy, after W_enc changed where nothing rounded it (resampling): the next
    /// batch makes it afresh.
    pub fn invalidate(&mut self) {
        self.w_enc = None;
    }
}

/// `c_bf ← a · wᵀ` in bf16 with f32 accumulation: `a` B×D (packed), `w` F×D, `c_bf` B×F in
/// standard layout. Fails with [`Error::Shape`] when the shapes or the layout disagree.
pub fn gemm(
    kernel: Bf16Kernel,
    a: &Bf16Batch,
    w: &Bf16Rows,
    mut c_bf: ArrayViewMut2<'_, f32>,
) -> Result<()> {
    let _ = kernel;
    check_shape(
        "bf16 GEMM weights (w_fd)",
        &[w.rows, w.cols],
        &[w.rows, a.cols],
    )?;
    check_shape("bf16 GEMM output (c_bf)", c_bf.shape(), &[a.rows, w.rows])?;
    if !c_bf.is_standard_layout() {
        return Err(Error::Shape {
            what: "bf16 GEMM output (c_bf), which must be in standard layout".into(),
            expected: vec![a.rows, w.rows],
            got: c_bf.shape().to_vec(),
        });
    }
    let pairs = a.pairs();
    let panel_words = PANEL * pairs;
    let panels_per_block = (BLOCK_BYTES / (panel_words * 4)).max(1);
    let w_words = w.pairs_fp.as_slice().expect("standard layout");
    // Eight tasks a thread or more, for balance; within that, as wide as TASK_LATENTS allows.
    // The split changes which thread computes an entry, never how.
    let per_thread = w.rows / (8 * rayon::current_num_threads()) / TILE * TILE;
    let task_latents = per_thread.clamp(*TASK_LATENTS.start(), *TASK_LATENTS.end());
    c_bf.axis_chunks_iter_mut(Axis(1), task_latents)
        .into_par_iter()
        .enumerate()
        .for_each(|(task, mut c_bn)| {
            let n0 = task * task_latents;
            let n_task = c_bn.ncols();
            let mut tile = [0.0f32; PANEL * TILE];
            for block in a.words.chunks(panels_per_block * panel_words).enumerate() {
                let (block_i, block_words) = block;
                for t0 in (0..n_task).step_by(TILE) {
                    let w_tile = &w_words[(n0 + t0) * pairs..(n0 + t0 + TILE) * pairs];
                    let cols = TILE.min(n_task - t0);
                    for (p, a_panel) in block_words.chunks_exact(panel_words).enumerate() {
                        // SAFETY: `detect` found AVX-512 F and BF16 (the only way to make a
                        // `Bf16Kernel`), and the slices hold a whole panel and tile.
                        unsafe { avx512::tile(a_panel, w_tile, pairs, &mut tile) };
                        let r0 = (block_i * panels_per_block + p) * PANEL;
                        let rows = PANEL.min(a.rows - r0);
                        for r in 0..rows {
                            let mut c_row = c_bn.row_mut(r0 + r);
                            let c_row =
                                &mut c_row.as_slice_mut().expect("contiguous row")[t0..t0 + cols];
                            for (j, c) in c_row.iter_mut().enumerate() {
                                *c = tile[j * PANEL + r];
                            }
                        }
                    }
                }
            }
        });
    Ok(())
}

#[cfg(not(target_arch = "x86_64"))]
mod avx512 {
    use super::{PANEL, TILE};

    /// Never called: [`super::Bf16Kernel::detect`] fails off x86-64.
    pub(super) unsafe fn tile(_: &[u32], _: &[u32], _: usize, _: &mut [f32; PANEL * TILE]) {
        unreachable!("no Bf16Kernel exists off x86-64")
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{PANEL, TILE};

    /// One 32-row × [`TILE`]-latent tile over all `pairs`: `a_panel` a packed panel,
    /// `w_tile` [`TILE`] rows of `pairs` pairs; `out[j·32 + r]` gets row r's sum for latent j.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn tile(
        a_panel: &[u32],
        w_tile: &[u32],
        pairs: usize,
        out: &mut [f32; PANEL * TILE],
    ) {
        debug_assert!(a_panel.len() >= PANEL * pairs && w_tile.len() >= TILE * pairs);
        let mut lo = [_mm512_setzero_ps(); TILE];
        let mut hi = [_mm512_setzero_ps(); TILE];
        let a = a_panel.as_ptr();
        let w = w_tile.as_ptr();
        for p in 0..pairs {
            let a_lo: __m512bh = std::mem::transmute(_mm512_loadu_si512(a.add(p * PANEL).cast()));
            let a_hi: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(a.add(p * PANEL + 16).cast()));
            for j in 0..TILE {
                let wj: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*w.add(j * pairs + p) as i32));
                lo[j] = _mm512_dpbf16_ps(lo[j], a_lo, wj);
                hi[j] = _mm512_dpbf16_ps(hi[j], a_hi, wj);
            }
        }
        let o = out.as_mut_ptr();
        for j in 0..TILE {
            _mm512_storeu_ps(o.add(j * PANEL), lo[j]);
            _mm512_storeu_ps(o.add(j * PANEL + 16), hi[j]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array1;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(rows: usize, cols: usize, seed: u64) -> Array2<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Array2::from_shape_fn((rows, cols), |_| rng.gen_range(-1.0f32..1.0))
    }

    /// The kernel, or why this test cannot run here (printed, so a skip is visible).
    fn kernel_or_skip() -> Option<Bf16Kernel> {
        match Bf16Kernel::detect() {
            Ok(kernel) => Some(kernel),
            Err(err) => {
                eprintln!("skipped: {err}");
                None
            }
        }
    }

    #[test]
    fn a_cpu_without_the_instructions_gets_an_error_naming_the_flag_and_them() {
        let err = Bf16Kernel::if_present(false).unwrap_err().to_string();
        for needle in [
            "--precision bf16",
            "AVX-512 BF16",
            "avx512_bf16",
            "--precision f32",
        ] {
            assert!(err.contains(needle), "{err}");
        }
        assert!(Bf16Kernel::if_present(true).is_ok());
    }

    #[test]
    fn rounds_to_nearest_even() {
        // 1 + 2⁻⁸ lies halfway between 1 and 1 + 2⁻⁷: ties go to the even mantissa (1).
        assert_eq!(to_bf16(1.0 + 2f32.powi(-8)), 0x3f80);
        // 1 + 3·2⁻⁸ lies halfway between 1 + 2⁻⁷ (odd) and 1 + 2⁻⁶: up, to the even one.
        assert_eq!(to_bf16(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
        // Just above a tie rounds up, just below down.
        assert_eq!(to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(to_bf16(f32::from_bits(0x3f80_7fff)), 0x3f80);
        assert_eq!(to_bf16(-1.5), 0xbfc0);
        assert_eq!(round_bf16(0.1), 0.100_097_656);
        assert_eq!(to_bf16(0.0), 0);
        assert_eq!(to_bf16(-0.0), 0x8000);
        assert_eq!(to_bf16(f32::INFINITY), 0x7f80);
        assert_eq!(to_bf16(f32::NEG_INFINITY), 0xff80);
        // Above bf16's largest finite (0x7f7f), rounding carries into the exponent: ∞.
        assert_eq!(to_bf16(f32::MAX), 0x7f80);
        let nan = to_bf16(f32::from_bits(0x7f80_0001));
        assert!(
            bf16_to_f32(nan).is_nan(),
            "a NaN whose payload sits low stays NaN"
        );
        assert!(bf16_to_f32(to_bf16(f32::NAN)).is_nan());
        for x in [1.0f32, -2.5, 3.0e38, 1.0e-30, 65504.0] {
            let r = round_bf16(x);
            assert!(((r - x) / x).abs() <= 2f32.powi(-9), "{x} rounded to {r}");
        }
    }

    /// C of the bf16-rounded inputs in f64, and each entry's Σ|a·w| (the accumulation's
    /// error bound scales with it).
    fn reference(xc_bd: &Array2<f32>, w_fd: &Array2<f32>) -> (Array2<f64>, Array2<f64>) {
        let a = xc_bd.mapv(|v| round_bf16(v) as f64);
        let w = w_fd.mapv(|v| round_bf16(v) as f64);
        (a.dot(&w.t()), a.mapv(f64::abs).dot(&w.mapv(f64::abs).t()))
    }

    fn bf16_gemm(
        kernel: Bf16Kernel,
        x_bd: &Array2<f32>,
        b_dec: Option<&Array1<f32>>,
        w_fd: &Array2<f32>,
    ) -> (Array2<f32>, Array2<f32>) {
        let mut xc_bd = Array2::from_elem(x_bd.dim(), f32::NAN);
        let mut c_bf = Array2::from_elem((x_bd.nrows(), w_fd.nrows()), f32::NAN);
        let mut encoder = Bf16Encoder::new(kernel);
        let b_dec = b_dec.map(|b| b.view());
        encoder.encode(
            w_fd.view(),
            x_bd.view(),
            b_dec,
            xc_bd.view_mut(),
            c_bf.view_mut(),
        );
        (xc_bd, c_bf)
    }

    #[test]
    fn gemm_matches_an_f64_reference_of_the_rounded_inputs() {
        let Some(kernel) = kernel_or_skip() else {
            return;
        };
        // Shapes off every block size: B not a multiple of the 32-row panel, F not of the
        // 12-latent tile or the task's 96, D odd; and one spanning several tasks and blocks.
        for (b, f, d) in [(45, 29, 17), (1, 1, 1), (33, 13, 2), (300, 200, 96)] {
            let x_bd = random(b, d, 1);
            let w_fd = random(f, d, 2);
            let b_dec = Array1::from_iter((0..d).map(|i| i as f32 * 0.01 - 0.05));
            let (xc_bd, c_bf) = bf16_gemm(kernel, &x_bd, Some(&b_dec), &w_fd);
            assert_eq!(xc_bd, &x_bd - &b_dec, "x − b_dec stays f32");
            let (want, abs) = reference(&xc_bd, &w_fd);
            // f32 accumulation: each of the D products' additions rounds once, at most
            // 2⁻²⁴ of the running sum, which never exceeds Σ|a·w|.
            let unit = 2f64.powi(-24);
            for ((&got, &want), &abs) in c_bf.iter().zip(&want).zip(&abs) {
                let bound = d as f64 * unit * abs;
                assert!(
                    (got as f64 - want).abs() <= bound,
                    "{b}×{f}×{d}: {got} vs {want} (±{bound:e})"
                );
            }
            // Rounding matters: the f32 product of the unrounded inputs is farther away.
            if d > 16 {
                let exact = xc_bd.mapv(f64::from).dot(&w_fd.mapv(f64::from).t());
                let off = (&exact - &want).mapv(f64::abs).sum();
                assert!(
                    off > 1e-3 * exact.mapv(f64::abs).sum(),
                    "rounding had no effect"
                );
            }
        }
        // Without centring, x itself is rounded.
        let x_bd = random(40, 9, 3);
        let w_fd = random(14, 9, 4);
        let (xc_bd, c_bf) = bf16_gemm(kernel, &x_bd, None, &w_fd);
        assert_eq!(xc_bd, x_bd);
        let (want, abs) = reference(&x_bd, &w_fd);
        for ((&got, &want), &abs) in c_bf.iter().zip(&want).zip(&abs) {
            assert!((got as f64 - want).abs() <= 9.0 * 2f64.powi(-24) * abs);
        }
    }

    #[test]
    fn gemm_is_the_same_on_any_thread_count_and_after_a_refresh() {
        let Some(kernel) = kernel_or_skip() else {
            return;
        };
        // F = 3100: one thread takes tasks of 384 latents, three of 120.
        let (x_bd, mut w_fd) = (random(70, 50, 5), random(3100, 50, 6));
        let pool = |n| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .unwrap()
        };
        let (_, one) = pool(1).install(|| bf16_gemm(kernel, &x_bd, None, &w_fd));
        let (_, three) = pool(3).install(|| bf16_gemm(kernel, &x_bd, None, &w_fd));
        assert_eq!(one, three);
        // Refreshing some rows equals rounding the updated matrix afresh.
        let mut w = Bf16Rows::new(w_fd.view());
        w_fd.slice_mut(ndarray::s![100..150, ..])
            .mapv_inplace(|v| v * 3.0);
        w.refresh(w_fd.view(), 100..150);
        assert_eq!(w.pairs_fp, Bf16Rows::new(w_fd.view()).pairs_fp);
        // Any layout rounds alike.
        let w_df = w_fd.t().to_owned();
        assert_eq!(Bf16Rows::new(w_df.t()).pairs_fp, w.pairs_fp);
    }
}
