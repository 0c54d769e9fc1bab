/* The C side of capi/tests/smoke.rs: loads the SAE of a case directory the Rust test wrote,
 * encodes its rows through every path of the C ABI and decodes the codes, comparing each
 * result with the Rust library's, bit for bit; then drives the error paths (missing
 * directory, wrong d_model, NaN rows, null pointers, malformed CSR) and checks each status
 * code and message.
 *
 *   smoke CASE_DIR
 *
 * CASE_DIR holds sae/ (the SAE), meta.txt ("n_rows d_model dict_size k arch"), x.f32 (the
 * rows), indptr.u64, indices.u32, values.f32 (the Rust library's codes of them) and
 * xhat.f32 (its decoding of those codes). Prints each failed check and a closing
 * "smoke: N passed, M failed" line; exits 1 when a check failed, 2 when the case cannot be
 * read. */

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sae.h"

static int passed = 0;
static int failed = 0;

#define CHECK(cond, ...)                                                  \
  do {                                                                    \
    if (cond) {                                                           \
      passed++;                                                           \
    } else {                                                              \
      failed++;                                                           \
      fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);     \
      fprintf(stderr, __VA_ARGS__);                                       \
      fprintf(stderr, "\n");                                              \
    }                                                                     \
  } while (0)

/* The whole file CASE_DIR/name, its length in *len; exits 2 when unreadable. */
static void *read_file(const char *dir, const char *name, size_t *len) {
  char path[4096];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  FILE *f = fopen(path, "rb");
  if (!f) {
    fprintf(stderr, "smoke: cannot open %s\n", path);
    exit(2);
  }
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  void *buf = malloc(n > 0 ? (size_t)n : 1);
  if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n) {
    fprintf(stderr, "smoke: cannot read %s\n", path);
    exit(2);
  }
  fclose(f);
  *len = (size_t)n;
  return buf;
}

/* Whether codes equal the expected CSR arrays, bit for bit. */
static int same_codes(size_t n_rows, size_t nnz, const size_t *indptr, const uint32_t *indices,
                      const float *values, const size_t *want_indptr,
                      const uint32_t *want_indices, const float *want_values, size_t want_nnz) {
  return nnz == want_nnz && memcmp(indptr, want_indptr, (n_rows + 1) * sizeof *indptr) == 0 &&
         (nnz == 0 || (memcmp(indices, want_indices, nnz * sizeof *indices) == 0 &&
                       memcmp(values, want_values, nnz * sizeof *values) == 0));
}

static int contains(const char *text, const char *part) { return strstr(text, part) != NULL; }

struct job {
  const sae_t *sae;
  const float *x;
  size_t n_rows, d_model;
  sae_codes_t *codes;
  int status;
};

static void *encode_job(void *arg) {
  struct job *job = arg;
  job->status = sae_encode(job->sae, job->x, job->n_rows, job->d_model, &job->codes);
  return NULL;
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: smoke CASE_DIR\n");
    return 2;
  }
  const char *dir = argv[1];
  size_t len;
  char *meta = read_file(dir, "meta.txt", &len);
  size_t n_rows, d_model, dict_size, k;
  char arch[32];
  if (sscanf(meta, "%zu %zu %zu %zu %31s", &n_rows, &d_model, &dict_size, &k, arch) != 5) {
    fprintf(stderr, "smoke: malformed meta.txt\n");
    return 2;
  }
  size_t x_len, indptr_len, indices_len, values_len, xhat_len;
  float *x = read_file(dir, "x.f32", &x_len);
  size_t *want_indptr = read_file(dir, "indptr.u64", &indptr_len);
  uint32_t *want_indices = read_file(dir, "indices.u32", &indices_len);
  float *want_values = read_file(dir, "values.f32", &values_len);
  float *want_xhat = read_file(dir, "xhat.f32", &xhat_len);
  size_t want_nnz = indices_len / sizeof(uint32_t);
  if (x_len != n_rows * d_model * sizeof(float) || indptr_len != (n_rows + 1) * sizeof(size_t) ||
      values_len != want_nnz * sizeof(float) || xhat_len != x_len) {
    fprintf(stderr, "smoke: the case's files disagree with meta.txt\n");
    return 2;
  }

  /* Loading, and what the SAE says of itself. */
  char sae_dir[4096];
  snprintf(sae_dir, sizeof sae_dir, "%s/sae", dir);
  sae_t *sae = NULL;
  int status = sae_load(sae_dir, &sae);
  CHECK(status == SAE_OK && sae != NULL, "sae_load(%s) = %d: %s", sae_dir, status, sae_last_error());
  if (!sae) {
    printf("smoke: %d passed, %d failed\n", passed, failed);
    return 1;
  }
  CHECK(sae_d_model(sae) == d_model, "d_model %zu, expected %zu", sae_d_model(sae), d_model);
  CHECK(sae_dict_size(sae) == dict_size, "dict_size %zu, expected %zu", sae_dict_size(sae), dict_size);
  CHECK(sae_k(sae) == k, "k %zu, expected %zu", sae_k(sae), k);
  CHECK(strcmp(sae_arch(sae), arch) == 0, "arch %s, expected %s", sae_arch(sae), arch);
  CHECK(strcmp(sae_version(), "") != 0, "empty version");

  /* sae_encode: the Rust library's codes, bit for bit. */
  sae_codes_t *codes = NULL;
  status = sae_encode(sae, x, n_rows, d_model, &codes);
  CHECK(status == SAE_OK && codes != NULL, "sae_encode = %d: %s", status, sae_last_error());
  if (!codes) {
    printf("smoke: %d passed, %d failed\n", passed, failed);
    return 1;
  }
  size_t nnz = sae_codes_nnz(codes);
  CHECK(sae_codes_n_rows(codes) == n_rows, "codes have %zu rows", sae_codes_n_rows(codes));
  CHECK(same_codes(n_rows, nnz, sae_codes_indptr(codes), sae_codes_indices(codes),
                   sae_codes_values(codes), want_indptr, want_indices, want_values, want_nnz),
        "sae_encode's codes (%zu entries) differ from the Rust library's (%zu)", nnz, want_nnz);
  sae_csr_t view = sae_codes_view(codes);
  CHECK(view.n_rows == n_rows && view.n_latents == dict_size && view.nnz == nnz &&
            view.indptr == sae_codes_indptr(codes) && view.indices == sae_codes_indices(codes) &&
            view.values == sae_codes_values(codes),
        "sae_codes_view disagrees with the accessors");

  /* sae_encode_into: the same codes, the workspace reused after a smaller batch. */
  sae_workspace_t *workspace = NULL;
  CHECK(sae_workspace_new(&workspace) == SAE_OK && workspace, "sae_workspace_new: %s", sae_last_error());
  sae_csr_t into;
  status = sae_encode_into(sae, x, n_rows > 1 ? n_rows / 2 : 1, d_model, workspace, &into);
  CHECK(status == SAE_OK, "sae_encode_into (half) = %d: %s", status, sae_last_error());
  for (int round = 0; round < 2; round++) {
    status = sae_encode_into(sae, x, n_rows, d_model, workspace, &into);
    CHECK(status == SAE_OK, "sae_encode_into = %d: %s", status, sae_last_error());
    CHECK(into.n_rows == n_rows && into.n_latents == dict_size &&
              same_codes(n_rows, into.nnz, into.indptr, into.indices, into.values, want_indptr,
                         want_indices, want_values, want_nnz),
          "sae_encode_into's codes (round %d) differ from the Rust library's", round);
  }

  /* Two threads encoding with one const sae_t at once. */
  struct job jobs[2];
  pthread_t threads[2];
  for (int t = 0; t < 2; t++) {
    jobs[t] = (struct job){sae, x, n_rows, d_model, NULL, -1};
    pthread_create(&threads[t], NULL, encode_job, &jobs[t]);
  }
  for (int t = 0; t < 2; t++) {
    pthread_join(threads[t], NULL);
    CHECK(jobs[t].status == SAE_OK &&
              same_codes(n_rows, sae_codes_nnz(jobs[t].codes), sae_codes_indptr(jobs[t].codes),
                         sae_codes_indices(jobs[t].codes), sae_codes_values(jobs[t].codes),
                         want_indptr, want_indices, want_values, want_nnz),
          "thread %d's codes differ (status %d)", t, jobs[t].status);
    sae_codes_free(jobs[t].codes);
  }

  /* sae_decode: the Rust library's reconstruction, bit for bit. */
  float *xhat = malloc(x_len);
  status = sae_decode(sae, sae_codes_indptr(codes), sae_codes_indices(codes), sae_codes_values(codes),
                      n_rows, xhat);
  CHECK(status == SAE_OK, "sae_decode = %d: %s", status, sae_last_error());
  CHECK(memcmp(xhat, want_xhat, x_len) == 0, "sae_decode's x_hat differs from the Rust library's");
  status = sae_decode(sae, into.indptr, into.indices, into.values, into.n_rows, xhat);
  CHECK(status == SAE_OK && memcmp(xhat, want_xhat, x_len) == 0, "decoding the workspace's view");

  /* Error paths: each a status code and a message, never a crash. */
  char missing[4200];
  snprintf(missing, sizeof missing, "%s/no-such-sae", dir);
  sae_t *none = (sae_t *)1;
  status = sae_load(missing, &none);
  CHECK(status == SAE_ERR_FILE, "sae_load(missing) = %d", status);
  CHECK(none == NULL, "sae_load left *out set on failure");
  CHECK(contains(sae_last_error(), missing), "message does not name the path: %s", sae_last_error());
  CHECK(contains(sae_last_error(), "no such directory"), "message: %s", sae_last_error());

  status = sae_load(dir, &none); /* a directory, but not an SAE's */
  CHECK(status == SAE_ERR_FILE && contains(sae_last_error(), "sae.json"), "sae_load(case) = %d: %s",
        status, sae_last_error());
  status = sae_load("/nonexistent-\xff\xfe-sae", &none);
  CHECK(status != SAE_OK && none == NULL, "a non-UTF-8 missing path = %d", status);
  status = sae_load(NULL, &none);
  CHECK(status == SAE_ERR_NULL_POINTER && contains(sae_last_error(), "dir"), "sae_load(NULL) = %d: %s",
        status, sae_last_error());
  CHECK(sae_load(sae_dir, NULL) == SAE_ERR_NULL_POINTER, "sae_load(.., NULL)");

  sae_codes_t *bad = (sae_codes_t *)1;
  status = sae_encode(sae, x, 1, d_model + 1, &bad); /* n_rows >= 2: x holds d_model + 1 */
  CHECK(status == SAE_ERR_SHAPE && bad == NULL, "wrong d_model = %d", status);
  CHECK(contains(sae_last_error(), "x_bd") && contains(sae_last_error(), "expected"),
        "message: %s", sae_last_error());
  status = sae_encode(sae, x, 0, d_model, &bad);
  CHECK(status == SAE_ERR_SHAPE && contains(sae_last_error(), "no rows"), "no rows = %d: %s",
        status, sae_last_error());
  status = sae_encode(sae, NULL, n_rows, d_model, &bad);
  CHECK(status == SAE_ERR_NULL_POINTER && contains(sae_last_error(), "x"), "x NULL = %d", status);
  status = sae_encode(NULL, x, n_rows, d_model, &bad);
  CHECK(status == SAE_ERR_NULL_POINTER && contains(sae_last_error(), "sae"), "sae NULL = %d", status);
  CHECK(sae_encode(sae, x, n_rows, d_model, NULL) == SAE_ERR_NULL_POINTER, "out NULL");
  status = sae_encode(sae, x, SIZE_MAX / 2, 3, &bad);
  CHECK(status == SAE_ERR_INVALID_ARGUMENT, "overflowing sizes = %d", status);

  float *nan_rows = malloc(x_len);
  memcpy(nan_rows, x, x_len);
  nan_rows[1 * d_model + d_model / 2] = NAN;
  status = sae_encode(sae, nan_rows, n_rows, d_model, &bad);
  CHECK(status == SAE_ERR_NON_FINITE && bad == NULL, "NaN row = %d", status);
  CHECK(contains(sae_last_error(), "row 1"), "message does not name row 1: %s", sae_last_error());
  nan_rows[1 * d_model + d_model / 2] = INFINITY;
  status = sae_encode_into(sae, nan_rows, n_rows, d_model, workspace, &into);
  CHECK(status == SAE_ERR_NON_FINITE && into.n_rows == 0 && into.indptr == NULL,
        "Inf row into a workspace = %d", status);
  CHECK(sae_encode_into(sae, x, n_rows, d_model, NULL, &into) == SAE_ERR_NULL_POINTER,
        "workspace NULL");

  /* The message stays after a success. */
  const char *kept = sae_last_error();
  char copy[1024];
  snprintf(copy, sizeof copy, "%s", kept);
  CHECK(sae_encode_into(sae, x, n_rows, d_model, workspace, &into) == SAE_OK, "encode again");
  CHECK(strcmp(sae_last_error(), copy) == 0, "a success changed the message");

  /* Malformed CSR: refused with the entry named, x_hat left as it was. */
  size_t *indptr = malloc((n_rows + 1) * sizeof *indptr);
  uint32_t *indices = malloc((nnz + 1) * sizeof *indices);
  float *values = malloc((nnz + 1) * sizeof *values);
  memcpy(indptr, want_indptr, (n_rows + 1) * sizeof *indptr);
  memcpy(indices, want_indices, nnz * sizeof *indices);
  memcpy(values, want_values, nnz * sizeof *values);
  for (size_t i = 0; i < n_rows * d_model; i++) xhat[i] = 12345.0f;
  if (nnz > 0) {
    indices[nnz - 1] = (uint32_t)dict_size;
    status = sae_decode(sae, indptr, indices, values, n_rows, xhat);
    CHECK(status == SAE_ERR_OUT_OF_RANGE && contains(sae_last_error(), "indices["),
          "index = dict_size: %d: %s", status, sae_last_error());
    indices[nnz - 1] = want_indices[nnz - 1];
    values[0] = NAN;
    status = sae_decode(sae, indptr, indices, values, n_rows, xhat);
    CHECK(status == SAE_ERR_NON_FINITE, "NaN value: %d: %s", status, sae_last_error());
    values[0] = want_values[0];
    CHECK(sae_decode(sae, indptr, NULL, values, n_rows, xhat) == SAE_ERR_NULL_POINTER, "indices NULL");
  }
  indptr[0] = 1;
  status = sae_decode(sae, indptr, indices, values, n_rows, xhat);
  CHECK(status == SAE_ERR_OUT_OF_RANGE && contains(sae_last_error(), "indptr[0]"),
        "indptr[0] = 1: %d: %s", status, sae_last_error());
  indptr[0] = 0;
  if (n_rows >= 2 && indptr[1] > 0) {
    size_t saved = indptr[2];
    indptr[2] = indptr[1] - 1; /* decreasing */
    status = sae_decode(sae, indptr, indices, values, n_rows, xhat);
    CHECK(status == SAE_ERR_OUT_OF_RANGE && contains(sae_last_error(), "indptr[2]"),
          "decreasing indptr: %d: %s", status, sae_last_error());
    indptr[2] = saved;
  }
  int untouched = 1;
  for (size_t i = 0; i < n_rows * d_model; i++) untouched &= xhat[i] == 12345.0f;
  CHECK(untouched, "a refused decode wrote x_hat");
  CHECK(sae_decode(sae, NULL, indices, values, n_rows, xhat) == SAE_ERR_NULL_POINTER, "indptr NULL");
  CHECK(sae_decode(sae, indptr, indices, values, n_rows, NULL) == SAE_ERR_NULL_POINTER, "out NULL");
  CHECK(sae_decode(NULL, indptr, indices, values, n_rows, xhat) == SAE_ERR_NULL_POINTER, "sae NULL");
  size_t empty_indptr[1] = {0};
  CHECK(sae_decode(sae, empty_indptr, NULL, NULL, 0, NULL) == SAE_OK, "no rows: %s", sae_last_error());
  status = sae_decode(sae, indptr, indices, values, n_rows, xhat);
  CHECK(status == SAE_OK && memcmp(xhat, want_xhat, x_len) == 0, "decoding the repaired copy");

  /* bf16: either it runs here, or it is refused with a message, and f32 comes back. */
  status = sae_set_bf16(sae, true);
  CHECK(status == SAE_OK || (status == SAE_ERR_UNSUPPORTED && contains(sae_last_error(), "bf16")),
        "sae_set_bf16 = %d: %s", status, sae_last_error());
  if (status == SAE_OK) {
    sae_codes_t *bf16 = NULL;
    CHECK(sae_encode(sae, x, n_rows, d_model, &bf16) == SAE_OK && sae_codes_n_rows(bf16) == n_rows,
          "bf16 encode: %s", sae_last_error());
    sae_codes_free(bf16);
  }
  CHECK(sae_set_bf16(sae, false) == SAE_OK, "back to f32: %s", sae_last_error());
  sae_codes_t *again = NULL;
  CHECK(sae_encode(sae, x, n_rows, d_model, &again) == SAE_OK &&
            same_codes(n_rows, sae_codes_nnz(again), sae_codes_indptr(again), sae_codes_indices(again),
                       sae_codes_values(again), want_indptr, want_indices, want_values, want_nnz),
        "f32 codes after bf16 differ");
  sae_codes_free(again);
  CHECK(sae_set_bf16(NULL, true) == SAE_ERR_NULL_POINTER, "sae_set_bf16(NULL)");

  CHECK(sae_d_model(NULL) == 0 && sae_dict_size(NULL) == 0 && sae_k(NULL) == 0, "getters of NULL");
  CHECK(sae_codes_nnz(NULL) == 0 && sae_codes_indptr(NULL) == NULL, "codes getters of NULL");

  sae_codes_free(codes);
  sae_workspace_free(workspace);
  sae_free(sae);
  sae_free(NULL);
  sae_codes_free(NULL);
  sae_workspace_free(NULL);
  free(indptr);
  free(indices);
  free(values);
  free(nan_rows);
  free(xhat);
  free(x);
  free(want_indptr);
  free(want_indices);
  free(want_values);
  free(want_xhat);
  free(meta);
  printf("smoke: %d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
