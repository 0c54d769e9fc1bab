// CUDA kernels for the device-resident training step, compiled at run time by NVRTC
// (backend::cuda). Matrices are row-major f32; names follow the Rust side's shapes (B batch,
// D width, F latents). Every reduction runs in a fixed order, and the only atomics are on
// integers, so a step gives the same bits on every run.
//
// Selection works on sort keys: a pre-activation v > 0 has the key bits(v) (positive floats
// order like their bit patterns), anything else the key 0, which is never selected. A row's
// selection is then "keys above cut_b, plus the first quota_b keys equal to cut_b in latent
// order": ReLU is cut 0, a threshold θ is cut bits(θ), top-k and batch top-k find their cut by
// radix selection.

typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

#define FULL 0xffffffffu

// ---------------------------------------------------------------- helpers

template <typename T> __device__ __forceinline__ T warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(FULL, v, o);
    return v;
}

// The sum of every thread's v, returned to all threads. `sh` holds 32 elements. A fixed tree,
// so deterministic for a given block size.
template <typename T> __device__ T block_sum(T v, T* sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        T s = lane < nw ? sh[lane] : T(0);
        s = warp_sum(s);
        if (lane == 0) sh[0] = s;
    }
    __syncthreads();
    T r = sh[0];
    __syncthreads();
    return r;
}

// Exclusive prefix sum of v over the block (thread order); *total gets the block's sum.
// `sh` holds 32 elements.
__device__ u32 block_exclusive_scan(u32 v, u32* sh, u32* total) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    u32 x = v;
    for (int o = 1; o < 32; o <<= 1) {
        u32 y = __shfl_up_sync(FULL, x, o);
        if (lane >= o) x += y;
    }
    __syncthreads();
    if (lane == 31) sh[w] = x;
    __syncthreads();
    if (w == 0) {
        u32 s = lane < nw ? sh[lane] : 0;
        for (int o = 1; o < 32; o <<= 1) {
            u32 y = __shfl_up_sync(FULL, s, o);
            if (lane >= o) s += y;
        }
        if (lane < nw) sh[lane] = s;
    }
    __syncthreads();
    u32 before = w > 0 ? sh[w - 1] : 0;
    *total = sh[nw - 1];
    __syncthreads();
    return before + x - v;
}

// The sort key of latent j's pre-activation in a row (see the top of the file). `mask_f`, when
// not null, excludes latents whose flag is 0 (kernels taking a mask null it when has_mask is 0).
__device__ __forceinline__ u32 key_at(const float* row, const float* b_enc_f, const u32* mask_f,
                                      i64 j) {
    if (mask_f && !mask_f[j]) return 0;
    u32 bits = __float_as_uint(row[j] + b_enc_f[j]);
    return bits >= 0x80000000u ? 0u : bits;
}

// ---------------------------------------------------------------- encode

extern "C" __global__ void sub_row(const float* x_bd, const float* v_d, float* out_bd,
                                   i64 rows, i64 d) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    i64 stride = (i64)gridDim.x * blockDim.x;
    for (; i < rows * d; i += stride) out_bd[i] = x_bd[i] - v_d[i % d];
}

// ---------------------------------------------------------------- selection plans

// Per row (one block each): cut_b = bits(θ) for a threshold (0 for ReLU), no ties, and the
// number of keys above it.
extern "C" __global__ void threshold_plan(const float* pre_bf, const float* b_enc_f, i64 f,
                                          u32 cut, u32* cut_b, u32* quota_b, u32* count_b) {
    __shared__ u32 sh[32];
    const float* row = pre_bf + (i64)blockIdx.x * f;
    u32 n = 0;
    for (i64 j = threadIdx.x; j < f; j += blockDim.x) n += key_at(row, b_enc_f, 0, j) > cut;
    n = block_sum(n, sh);
    if (threadIdx.x == 0) {
        cut_b[blockIdx.x] = cut;
        quota_b[blockIdx.x] = 0;
        count_b[blockIdx.x] = n;
    }
}

// Per row (one block each): the k largest positive keys among the latents `mask_f` allows (all
// when has_mask is 0), by radix selection on 8 bits at a time. Rows with at most k positive keys keep
// all of them (cut 0). Otherwise cut_b is the k-th largest key and quota_b how many keys equal
// to it to keep, the lowest latents first (the CPU's tie rule).
extern "C" __global__ void topk_plan(const float* pre_bf, const float* b_enc_f, const u32* mask_f,
                                     int has_mask, i64 f, u32 k, u32* cut_b, u32* quota_b,
                                     u32* count_b) {
    if (!has_mask) mask_f = 0;
    __shared__ u32 hist[256];
    __shared__ u32 pick[2];
    const float* row = pre_bf + (i64)blockIdx.x * f;
    u32 prefix = 0, prefix_mask = 0, remaining = k;
    for (int pass = 0; pass < 4; ++pass) {
        int shift = 24 - 8 * pass;
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        for (i64 j = threadIdx.x; j < f; j += blockDim.x) {
            u32 key = key_at(row, b_enc_f, mask_f, j);
            if (key != 0 && (key & prefix_mask) == prefix) atomicAdd(&hist[(key >> shift) & 255], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            u32 above = 0, total = 0;
            int digit = -1;
            for (int d = 255; d >= 0; --d) {
                if (digit < 0 && above + hist[d] >= remaining) digit = d;
                if (digit < 0) above += hist[d];
                total += hist[d];
            }
            // pass 0 sees every positive key: too few means keep them all.
            pick[0] = (pass == 0 && total <= remaining) ? 0xffffffffu : (u32)digit;
            pick[1] = pass == 0 && total <= remaining ? total : above;
        }
        __syncthreads();
        if (pick[0] == 0xffffffffu) {
            if (threadIdx.x == 0) {
                cut_b[blockIdx.x] = 0;
                quota_b[blockIdx.x] = 0;
                count_b[blockIdx.x] = pick[1];
            }
            return;
        }
        remaining -= pick[1];
        prefix |= pick[0] << shift;
        prefix_mask |= 255u << shift;
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        cut_b[blockIdx.x] = prefix;
        quota_b[blockIdx.x] = remaining;
        count_b[blockIdx.x] = k;
    }
}

// Batch top-k, one radix pass: histogram of the 8-bit digit at `shift` of the positive keys
// matching the prefix found so far. state = [prefix, prefix_mask, remaining, keep_all].
extern "C" __global__ void batch_hist(const float* pre_bf, const float* b_enc_f, i64 rows, i64 f,
                                      int shift, const u32* state, u32* hist) {
    __shared__ u32 local[256];
    if (state[3]) return;
    for (int i = threadIdx.x; i < 256; i += blockDim.x) local[i] = 0;
    __syncthreads();
    u32 prefix = state[0], prefix_mask = state[1];
    for (i64 b = blockIdx.x; b < rows; b += gridDim.x) {
        const float* row = pre_bf + b * f;
        for (i64 j = threadIdx.x; j < f; j += blockDim.x) {
            u32 key = key_at(row, b_enc_f, 0, j);
            if (key != 0 && (key & prefix_mask) == prefix) atomicAdd(&local[(key >> shift) & 255], 1u);
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < 256; i += blockDim.x)
        if (local[i]) atomicAdd(&hist[i], local[i]);
}

// Batch top-k: picks the digit holding the remaining-th largest key from `hist` (then clears
// it for the next pass). One block of 256 threads, thread t owning digit 255 − t, so an
// exclusive scan gives each digit the count of keys above it.
extern "C" __global__ void batch_pick(u32* hist, int shift, u32* state) {
    __shared__ u32 sh[32];
    // Every thread reads the state before the scan's syncs; only then does one thread write it.
    if (state[3]) return;
    u32 remaining = state[2];
    int digit = 255 - (int)threadIdx.x;
    u32 count = hist[digit], total;
    u32 above = block_exclusive_scan(count, sh, &total);
    hist[digit] = 0;
    if (shift == 24 && total <= remaining) {
        if (threadIdx.x == 0) state[3] = 1;  // no more positive keys than k·B: keep them all
        return;
    }
    if (above < remaining && above + count >= remaining) {
        state[0] |= (u32)digit << shift;
        state[1] |= 255u << shift;
        state[2] = remaining - above;
    }
}

// Batch top-k, per row (one block each): keys above the cut (gt_b) and equal to it (eq_b).
extern "C" __global__ void batch_row_counts(const float* pre_bf, const float* b_enc_f, i64 f,
                                            const u32* state, u32* gt_b, u32* eq_b) {
    __shared__ u32 sh[32];
    const float* row = pre_bf + (i64)blockIdx.x * f;
    u32 cut = state[3] ? 0 : state[0];
    u32 gt = 0, eq = 0;
    for (i64 j = threadIdx.x; j < f; j += blockDim.x) {
        u32 key = key_at(row, b_enc_f, 0, j);
        gt += key > cut;
        eq += key != 0 && key == cut;
    }
    gt = block_sum(gt, sh);
    eq = block_sum(eq, sh);
    if (threadIdx.x == 0) {
        gt_b[blockIdx.x] = gt;
        eq_b[blockIdx.x] = eq;
    }
}

// Batch top-k (one block): hands the ties' quota to rows in row-major order.
extern "C" __global__ void batch_quota(const u32* gt_b, const u32* eq_b, i64 rows, const u32* state,
                                       u32* cut_b, u32* quota_b, u32* count_b) {
    __shared__ u32 sh[32];
    u32 cut = state[3] ? 0 : state[0];
    u32 quota = state[3] ? 0 : state[2];
    u32 base = 0;
    for (i64 start = 0; start < rows; start += blockDim.x) {
        i64 b = start + threadIdx.x;
        u32 eq = b < rows ? eq_b[b] : 0, total;
        u32 before = base + block_exclusive_scan(eq, sh, &total);
        if (b < rows) {
            u32 q = before >= quota ? 0 : min(eq, quota - before);
            cut_b[b] = cut;
            quota_b[b] = q;
            count_b[b] = gt_b[b] + q;
        }
        base += total;
    }
}

// indptr[0] = 0, indptr[i + 1] = count[0] + … + count[i] (one block).
extern "C" __global__ void scan_counts(const u32* count, i64 n, i64* indptr) {
    __shared__ u32 sh[32];
    i64 base = 0;
    if (threadIdx.x == 0) indptr[0] = 0;
    for (i64 start = 0; start < n; start += blockDim.x) {
        i64 i = start + threadIdx.x;
        u32 c = i < n ? count[i] : 0, total;
        u32 before = block_exclusive_scan(c, sh, &total);
        if (i < n) indptr[i + 1] = base + before + c;
        base += total;
    }
}

// Per row (one block each): writes the selected entries (see the top of the file) at
// indptr[b].., in ascending latent order. Each warp owns a contiguous run of latents: it first
// counts its keys above the cut and its ties (ballots, no block-wide syncs), one thread turns
// those counts into each warp's output offset and tie rank, then each warp writes its run.
extern "C" __global__ void compact_rows(const float* pre_bf, const float* b_enc_f, const u32* mask_f,
                                        int has_mask, i64 f, const u32* cut_b, const u32* quota_b,
                                        const i64* indptr, u32* indices, float* values) {
    if (!has_mask) mask_f = 0;
    __shared__ u32 warp_gt[32], warp_ties[32], warp_out[32], warp_tie_base[32];
    i64 b = blockIdx.x;
    const float* row = pre_bf + b * f;
    u32 cut = cut_b[b], quota = quota_b[b];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    i64 per = ((f + nw - 1) / nw + 31) / 32 * 32;
    i64 j0 = w * per, j1 = min(f, j0 + per);
    u32 gt = 0, ties = 0;
    for (i64 base = j0; base < j1; base += 32) {
        i64 j = base + lane;
        u32 key = j < j1 ? key_at(row, b_enc_f, mask_f, j) : 0;
        gt += __popc(__ballot_sync(FULL, key > cut));
        ties += __popc(__ballot_sync(FULL, key != 0 && key == cut));
    }
    if (lane == 0) {
        warp_gt[w] = gt;
        warp_ties[w] = ties;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        u32 tie_base = 0, out = 0;
        for (int i = 0; i < nw; ++i) {
            warp_tie_base[i] = tie_base;
            warp_out[i] = out;
            u32 kept_ties = tie_base >= quota ? 0 : min(warp_ties[i], quota - tie_base);
            out += warp_gt[i] + kept_ties;
            tie_base += warp_ties[i];
        }
    }
    __syncthreads();
    i64 out = indptr[b] + warp_out[w];
    u32 ties_seen = warp_tie_base[w];
    u32 below = (1u << lane) - 1u;
    for (i64 base = j0; base < j1; base += 32) {
        i64 j = base + lane;
        u32 key = j < j1 ? key_at(row, b_enc_f, mask_f, j) : 0;
        bool tie = key != 0 && key == cut;
        u32 tie_bits = __ballot_sync(FULL, tie);
        bool sel = key > cut || (tie && ties_seen + __popc(tie_bits & below) < quota);
        u32 sel_bits = __ballot_sync(FULL, sel);
        if (sel) {
            i64 p = out + __popc(sel_bits & below);
            indices[p] = (u32)j;
            values[p] = row[j] + b_enc_f[j];
        }
        out += __popc(sel_bits);
        ties_seen += __popc(tie_bits);
    }
}

// ---------------------------------------------------------------- bookkeeping

// counts_f[j] += number of entries at latent j.
extern "C" __global__ void count_latents(const u32* indices, i64 nnz, u32* counts_f) {
    for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < nnz; e += (i64)gridDim.x * blockDim.x)
        atomicAdd(&counts_f[indices[e]], 1u);
}

// Tokens since each latent fired; dead_f[j] = 1 for latents silent for dead_tokens or more,
// counted into *n_dead.
extern "C" __global__ void update_dead(const u32* fired_f, u64* since_f, u64 rows, u64 dead_tokens,
                                       i64 f, u32* dead_f, u32* n_dead) {
    i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= f) return;
    u64 since = fired_f[j] ? 0 : since_f[j] + rows;
    since_f[j] = since;
    u32 dead = since >= dead_tokens;
    dead_f[j] = dead;
    if (dead) atomicAdd(n_dead, 1u);
}

// *out = min(*out, bits of the values) (values are positive, so their bits order like them).
extern "C" __global__ void min_value(const float* values, i64 n, u32* out) {
    u32 m = 0x7f800000u;
    for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (i64)gridDim.x * blockDim.x)
        m = min(m, __float_as_uint(values[e]));
    for (int o = 16; o > 0; o >>= 1) m = min(m, __shfl_down_sync(FULL, m, o));
    if ((threadIdx.x & 31) == 0) atomicMin(out, m);
}

// ---------------------------------------------------------------- decode and loss

// x_hat[b] = b_dec (if has_bias) + Σ over row b's codes of value·W_dec[index]. One block per
// row; each thread owns columns t, t + blockDim.x, … and adds codes in their stored order.
extern "C" __global__ void decode_csr(const i64* indptr_b, const u32* indices, const float* values,
                                      const float* w_dec_fd, const float* b_dec_d, int has_bias,
                                      float* x_hat_bd, i64 d) {
    i64 b = blockIdx.x;
    i64 start = indptr_b[b], end = indptr_b[b + 1];
    for (i64 c = threadIdx.x; c < d; c += blockDim.x) {
        float acc = has_bias ? b_dec_d[c] : 0.0f;
        for (i64 e = start; e < end; ++e) acc += values[e] * w_dec_fd[(i64)indices[e] * d + c];
        x_hat_bd[b * d + c] = acc;
    }
}

// out = g·((x − x̂) − ê), ê left out unless has_aux: the upstream gradients.
extern "C" __global__ void residual_grad(const float* x, const float* x_hat, const float* aux_hat,
                                         int has_aux, float g, float* out, i64 n) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        float e = x[i] - x_hat[i];
        if (has_aux) e = e - aux_hat[i];
        out[i] = g * e;
    }
}

// Per row (one block each): out_b = Σ_c (((x − y) − z) − mean)² in f64, with y, z and mean
// left out when their flag is 0 (the differences in f32, as the CPU forms them).
extern "C" __global__ void row_sq(const float* x, const float* y, int has_y, const float* z,
                                  int has_z, const double* mean_d, int has_mean, i64 d, double* out_b) {
    __shared__ double sh[32];
    i64 b = blockIdx.x;
    double acc = 0.0;
    for (i64 c = threadIdx.x; c < d; c += blockDim.x) {
        float e = x[b * d + c];
        if (has_y) e = e - y[b * d + c];
        if (has_z) e = e - z[b * d + c];
        double v = (double)e - (has_mean ? mean_d[c] : 0.0);
        acc += v * v;
    }
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0) out_b[b] = acc;
}

// Column sums of (x − y) (y left out when has_y is 0) in f64, first stage: block (cx, chunk)
// sums rows chunk·rows_per_chunk.. into partial[chunk][c].
extern "C" __global__ void col_partial(const float* x, const float* y, int has_y, i64 rows, i64 d,
                                       i64 rows_per_chunk, double* partial) {
    i64 c = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= d) return;
    i64 start = (i64)blockIdx.y * rows_per_chunk, end = min(rows, start + rows_per_chunk);
    double acc = 0.0;
    for (i64 b = start; b < end; ++b) {
        float e = x[b * d + c];
        if (has_y) e = e - y[b * d + c];
        acc += (double)e;
    }
    partial[(i64)blockIdx.y * d + c] = acc;
}

// Second stage: out[c] = (Σ_chunk partial[chunk][c]) / divisor, chunks in order.
extern "C" __global__ void col_finish(const double* partial, i64 chunks, i64 d, double divisor,
                                      double* out) {
    i64 c = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= d) return;
    double acc = 0.0;
    for (i64 k = 0; k < chunks; ++k) acc += partial[k * d + c];
    out[c] = acc / divisor;
}

// *out = Σ v (one block, fixed order).
extern "C" __global__ void sum_f64(const double* v, i64 n, double* out) {
    __shared__ double sh[32];
    double acc = 0.0;
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) acc += v[i];
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0) *out = acc;
}

// *out = Σ v² in f64 (one block, fixed order).
extern "C" __global__ void sum_sq_f32(const float* v, i64 n, double* out) {
    __shared__ double sh[32];
    double acc = 0.0;
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) acc += (double)v[i] * (double)v[i];
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0) *out = acc;
}

// out_f[j] = ‖w[j]‖ (one warp per row).
extern "C" __global__ void row_norms(const float* w_fd, i64 f, i64 d, float* out_f) {
    i64 j = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (j >= f) return;
    float acc = 0.0f;
    for (i64 c = lane; c < d; c += 32) acc += w_fd[j * d + c] * w_fd[j * d + c];
    acc = warp_sum(acc);
    if (lane == 0) out_f[j] = sqrtf(acc);
}

// L1 term per row: out_b = Σ over row b's codes of value·n_j, in f64.
extern "C" __global__ void l1_rows(const i64* indptr_b, const u32* indices, const float* values,
                                   const float* n_f, i64 rows, double* out_b) {
    i64 b = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= rows) return;
    double acc = 0.0;
    for (i64 e = indptr_b[b]; e < indptr_b[b + 1]; ++e) acc += (double)values[e] * (double)n_f[indices[e]];
    out_b[b] = acc;
}

// ---------------------------------------------------------------- backward

// Per row (one block each): drops each entry into its latent's segment (offsets_f from the
// per-latent counts) in arrival order, and records its row. sort_segments then orders them.
extern "C" __global__ void scatter_by_latent(const i64* indptr_b, const u32* indices,
                                             const i64* offsets_f, u32* fill_f, u32* unsorted,
                                             u32* row_of_entry) {
    i64 b = blockIdx.x;
    for (i64 e = indptr_b[b] + threadIdx.x; e < indptr_b[b + 1]; e += blockDim.x) {
        u32 j = indices[e];
        u32 slot = atomicAdd(&fill_f[j], 1u);
        unsorted[offsets_f[j] + slot] = (u32)e;
        row_of_entry[e] = (u32)b;
    }
}

#define SORT_SMALL 256
#define SORT_MAX_WORDS 4096

// Per latent (one block each): orders its segment by row, which fixes the order the backward
// pass sums in. A latent appears at most once per row, so rows are distinct keys: short
// segments rank by counting, long ones by a bitmap of the B rows.
extern "C" __global__ void sort_segments(const i64* offsets_f, const u32* unsorted,
                                         const u32* row_of_entry, i64 rows, u32* entry_sorted,
                                         u32* row_sorted) {
    __shared__ u32 bits[SORT_MAX_WORDS];
    __shared__ u32 before[SORT_MAX_WORDS];
    __shared__ u32 sh[32];
    i64 start = offsets_f[blockIdx.x];
    i64 n = offsets_f[blockIdx.x + 1] - start;
    if (n == 0) return;
    if (n <= SORT_SMALL) {
        u32* keys = bits;
        u32 e = 0, r = 0;
        if (threadIdx.x < n) {
            e = unsorted[start + threadIdx.x];
            r = row_of_entry[e];
            keys[threadIdx.x] = r;
        }
        __syncthreads();
        if (threadIdx.x < n) {
            u32 rank = 0;
            for (i64 i = 0; i < n; ++i) rank += keys[i] < r;
            entry_sorted[start + rank] = e;
            row_sorted[start + rank] = r;
        }
        return;
    }
    i64 words = (rows + 31) / 32;
    for (i64 w = threadIdx.x; w < words; w += blockDim.x) bits[w] = 0;
    __syncthreads();
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) {
        u32 r = row_of_entry[unsorted[start + i]];
        atomicOr(&bits[r >> 5], 1u << (r & 31));
    }
    __syncthreads();
    i64 per = (words + blockDim.x - 1) / blockDim.x;
    i64 w0 = threadIdx.x * per, w1 = min(words, w0 + per);
    u32 mine = 0, total;
    for (i64 w = w0; w < w1; ++w) mine += __popc(bits[w]);
    u32 acc = block_exclusive_scan(mine, sh, &total);
    for (i64 w = w0; w < w1; ++w) {
        before[w] = acc;
        acc += __popc(bits[w]);
    }
    __syncthreads();
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) {
        u32 e = unsorted[start + i];
        u32 r = row_of_entry[e];
        u32 rank = before[r >> 5] + __popc(bits[r >> 5] & ((1u << (r & 31)) - 1u));
        entry_sorted[start + rank] = e;
        row_sorted[start + rank] = r;
    }
}

// Per entry (one warp each): g_e = ∂L/∂f = u_b·W_dec[j] + l1_per_row·n_j (f > 0, so this is
// also ∂L/∂pre).
extern "C" __global__ void entry_grads(const u32* indices, const u32* row_of_entry, i64 nnz,
                                       const float* up_bd, const float* w_dec_fd, const float* n_f,
                                       float l1_per_row, i64 d, float* g_e) {
    i64 e = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (e >= nnz) return;
    i64 j = indices[e], b = row_of_entry[e];
    float acc = 0.0f;
    for (i64 c = lane; c < d; c += 32) acc += up_bd[b * d + c] * w_dec_fd[j * d + c];
    acc = warp_sum(acc);
    if (lane == 0) g_e[e] = l1_per_row != 0.0f ? acc + l1_per_row * n_f[j] : acc;
}

// Per latent (one block each), summing its entries in row order, main codes then AuxK's:
// ∂W_dec[j] = Σ v·u_b (+ the L1 decoder-norm term), ∂W_enc[j] = Σ g·xc_b, ∂b_enc[j] = Σ g.
// Latents without entries are marked inactive and their rows left unwritten.
extern "C" __global__ void latent_grads(
    const i64* offsets_f, const u32* entry_sorted, const u32* row_sorted, const float* values,
    const float* g_e, const i64* aux_offsets_f, const u32* aux_entry_sorted,
    const u32* aux_row_sorted, const float* aux_values, const float* aux_g_e, int has_aux,
    const float* up_bd, const float* aux_up_bd, const float* xc_bd, const float* w_dec_fd,
    const float* n_f, float l1_over_b, int weight_by_norm, i64 d, float* gw_dec_fd,
    float* gw_enc_fd, float* gb_enc_f, u32* active_f) {
    i64 j = blockIdx.x;
    i64 s = offsets_f[j], n = offsets_f[j + 1] - s;
    i64 as = has_aux ? aux_offsets_f[j] : 0, an = has_aux ? aux_offsets_f[j + 1] - as : 0;
    if (n == 0 && an == 0) {
        if (threadIdx.x == 0) {
            active_f[j] = 0;
            gb_enc_f[j] = 0.0f;
        }
        return;
    }
    float code_sum = 0.0f;
    for (i64 i = 0; i < n; ++i) code_sum += values[entry_sorted[s + i]];
    float dec_coef = 0.0f;
    if (weight_by_norm && l1_over_b != 0.0f && code_sum != 0.0f) dec_coef = l1_over_b * code_sum / n_f[j];
    for (i64 c = threadIdx.x; c < d; c += blockDim.x) {
        float gd = 0.0f, ge = 0.0f;
        for (i64 i = 0; i < n; ++i) {
            u32 e = entry_sorted[s + i];
            i64 b = row_sorted[s + i];
            gd += values[e] * up_bd[b * d + c];
            ge += g_e[e] * xc_bd[b * d + c];
        }
        for (i64 i = 0; i < an; ++i) {
            u32 e = aux_entry_sorted[as + i];
            i64 b = aux_row_sorted[as + i];
            gd += aux_values[e] * aux_up_bd[b * d + c];
            ge += aux_g_e[e] * xc_bd[b * d + c];
        }
        if (dec_coef != 0.0f) gd += dec_coef * w_dec_fd[j * d + c];
        gw_dec_fd[j * d + c] = gd;
        gw_enc_fd[j * d + c] = ge;
    }
    if (threadIdx.x == 0) {
        float gb = 0.0f;
        for (i64 i = 0; i < n; ++i) gb += g_e[entry_sorted[s + i]];
        for (i64 i = 0; i < an; ++i) gb += aux_g_e[aux_entry_sorted[as + i]];
        gb_enc_f[j] = gb;
        active_f[j] = 1;
    }
}

// Per active latent (one block each): removes from ∂W_dec[j] its component along W_dec[j]
// (normalised as w/(‖w‖ + eps); skipped when eps < 0) and writes ‖∂W_dec[j]‖² + ‖∂W_enc[j]‖².
extern "C" __global__ void prep_rows(float* gw_dec_fd, const float* gw_enc_fd, const float* w_dec_fd,
                                     const u32* active_f, i64 d, float project_eps, double* row_sq_f) {
    __shared__ float shf[32];
    __shared__ double shd[32];
    i64 j = blockIdx.x;
    if (!active_f[j]) {
        if (threadIdx.x == 0) row_sq_f[j] = 0.0;
        return;
    }
    float* gd = gw_dec_fd + j * d;
    const float* ge = gw_enc_fd + j * d;
    const float* w = w_dec_fd + j * d;
    if (project_eps >= 0.0f) {
        float sq = 0.0f;
        for (i64 c = threadIdx.x; c < d; c += blockDim.x) sq += w[c] * w[c];
        float norm = sqrtf(block_sum(sq, shf)) + project_eps;
        float along = 0.0f;
        for (i64 c = threadIdx.x; c < d; c += blockDim.x) along += gd[c] * (w[c] / norm);
        along = block_sum(along, shf);
        for (i64 c = threadIdx.x; c < d; c += blockDim.x) gd[c] -= along * (w[c] / norm);
    }
    double acc = 0.0;
    for (i64 c = threadIdx.x; c < d; c += blockDim.x)
        acc += (double)gd[c] * (double)gd[c] + (double)ge[c] * (double)ge[c];
    acc = block_sum(acc, shd);
    if (threadIdx.x == 0) row_sq_f[j] = acc;
}

// ---------------------------------------------------------------- update

// One element of torch.optim.Adam, in torch's order of operations.
__device__ __forceinline__ void adam_one(float* p, float* m, float* v, float g, float one_minus_beta1,
                                         float beta2, float one_minus_beta2, float step_size,
                                         float bc2_sqrt, float eps) {
    float mm = *m + one_minus_beta1 * (g - *m);
    float vv = *v * beta2 + one_minus_beta2 * g * g;
    float denom = sqrtf(vv) / bc2_sqrt + eps;
    *m = mm;
    *v = vv;
    *p += -step_size * (mm / denom);
}

// Adam on latent j's row (one block each), the gradient read only when the latent is active
// (zero otherwise); then the row is divided by ‖row‖ + renorm_eps unless renorm_eps < 0.
extern "C" __global__ void adam_rows(float* p_fd, float* m_fd, float* v_fd, const float* g_fd,
                                     const u32* active_f, i64 d, float grad_scale,
                                     float one_minus_beta1, float beta2, float one_minus_beta2,
                                     float step_size, float bc2_sqrt, float eps, float renorm_eps) {
    __shared__ float sh[32];
    i64 j = blockIdx.x;
    int active = active_f[j];
    float* p = p_fd + j * d;
    for (i64 c = threadIdx.x; c < d; c += blockDim.x) {
        float g = active ? g_fd[j * d + c] * grad_scale : 0.0f;
        adam_one(p + c, m_fd + j * d + c, v_fd + j * d + c, g, one_minus_beta1, beta2,
                 one_minus_beta2, step_size, bc2_sqrt, eps);
    }
    if (renorm_eps >= 0.0f) {
        float sq = 0.0f;
        for (i64 c = threadIdx.x; c < d; c += blockDim.x) sq += p[c] * p[c];
        float norm = sqrtf(block_sum(sq, sh)) + renorm_eps;
        for (i64 c = threadIdx.x; c < d; c += blockDim.x) p[c] /= norm;
    }
}

// Adam on a vector parameter (the biases).
extern "C" __global__ void adam_vec(float* p, float* m, float* v, const float* g, i64 n,
                                    float grad_scale, float one_minus_beta1, float beta2,
                                    float one_minus_beta2, float step_size, float bc2_sqrt, float eps) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    adam_one(p + i, m + i, v + i, g[i] * grad_scale, one_minus_beta1, beta2, one_minus_beta2,
             step_size, bc2_sqrt, eps);
}
