// CUDA kernels for the device-resident step, compiled at run time by NVRTC
// (backend::cuda::Kernels). Matrices are row-major f32; names follow the Rust side's shapes.

extern "C" __global__ void sub_row(const float* x_bd, const float* v_d, float* out_bd,
                                   long long rows, long long d) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long stride = (long long)gridDim.x * blockDim.x;
    for (; i < rows * d; i += stride) {
        out_bd[i] = x_bd[i] - v_d[i % d];
    }
}

// x_hat[b] = b_dec + sum over row b's codes of value * W_dec[index], codes in CSR form. One
// block per row; each thread owns columns t, t + blockDim.x, ... and adds the codes in their
// stored (ascending latent) order, so the result does not depend on scheduling.
extern "C" __global__ void decode_csr(const long long* indptr_b, const unsigned int* indices,
                                      const float* values, const float* w_dec_fd,
                                      const float* b_dec_d, float* x_hat_bd, long long d) {
    long long b = blockIdx.x;
    long long start = indptr_b[b], end = indptr_b[b + 1];
    for (long long c = threadIdx.x; c < d; c += blockDim.x) {
        float acc = b_dec_d[c];
        for (long long e = start; e < end; ++e) {
            acc += values[e] * w_dec_fd[(long long)indices[e] * d + c];
        }
        x_hat_bd[b * d + c] = acc;
    }
}
