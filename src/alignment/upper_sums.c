/* The server's sum of a chunk of clients' plain uploads, with the threshold and the sum in the product's
   epilogue (src/alignment/native_sums.py builds and calls this; README, Benchmark).

   For item rows [r0, r1) against the items from r0 on, every client's cosines x = <e_i, e_j> with j > i are
   computed in registers (an MR x 32 tile, d multiply-adds each), those with x > below are added to a tile of
   sums that stays in cache while all the chunk's clients pass over it, and counted per pair and per client.
   GCC vector extensions, no intrinsics: -march=native picks the vector width. The tiles are shared by OpenMP
   threads (torch's own runtime when the process has loaded it, so no second pool spins beside torch's). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define MR 8            /* item rows of a register tile */
#define NV 2            /* vectors of 16 columns of a register tile */
#define NR (16 * NV)    /* columns of a register tile */

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef int32_t vi16 __attribute__((vector_size(64)));
typedef int32_t vi16u __attribute__((vector_size(64), aligned(4)));

/* e [C, mp, d]: the normalised tables, rows m..mp zero (mp a multiple of 32); et [C, mp / 32, d, 32]: the same
   transposed in panels of 32 items, so the columns of a register tile are one contiguous 4 KB block (d = 32).
   Adds into total [r1 - r0, m - r0] (float32, column j at j - r0) the entries x > below with j > i summed over
   the C clients, into held (same shape, int32; NULL: not counted) how many clients send each, and into
   counts [C] how many entries each client sends. R (a multiple of MR) x W (a multiple of NR): the cache tile.
   below >= 0 (the padding's zeros are never sent). *status = 1 when a thread could not allocate its tile. */
void upper_sums(const float *e, const float *et, int64_t C, int64_t m, int64_t mp, int64_t d, float below,
                int64_t r0, int64_t r1, float *total, int32_t *held, int64_t *counts, int64_t R, int64_t W,
                int threads, int *status) {
  const int64_t nr = (r1 - r0 + R - 1) / R, nc = (m - r0 + W - 1) / W, ntiles = nr * nc, stride = m - r0;
  const v16 vb = (v16){} + below;
  const vi16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
#pragma omp parallel num_threads(threads)
  {
  float *S = malloc(sizeof(float) * R * W);
  int32_t *H = held ? malloc(sizeof(int32_t) * R * W) : NULL;
  int64_t *cnt = calloc(C, sizeof(int64_t));
  const int ok = S && cnt && (H || !held);
  if (!ok) __atomic_store_n(status, 1, __ATOMIC_RELAXED); /* out of memory: the caller raises */
#pragma omp for schedule(dynamic, 1)
  for (int64_t t = 0; t < ntiles; t++) {
    if (!ok) continue;
    const int64_t i1 = r0 + (t / nc) * R, j1 = r0 + (t % nc) * W;
    if (j1 + W <= i1 + 1) continue; /* wholly on or below the diagonal */
    const int64_t rb = (i1 + R <= r1) ? R : r1 - i1, cw = (j1 + W <= m) ? W : m - j1;
    memset(S, 0, sizeof(float) * R * W);
    if (held) memset(H, 0, sizeof(int32_t) * R * W);
    for (int64_t c = 0; c < C; c++) {
      const float *A = e + c * mp * d, *B = et + c * d * mp;
      vi16 vc = (vi16){};
      for (int64_t i0 = i1; i0 < i1 + rb; i0 += MR) {
        for (int64_t j0 = j1; j0 < j1 + cw; j0 += NR) {
          if (j0 + NR - 1 <= i0) continue; /* no j > i in this register tile */
          v16 acc[MR][NV];
          for (int r = 0; r < MR; r++)
            for (int v = 0; v < NV; v++) acc[r][v] = (v16){};
          for (int64_t k = 0; k < d; k++) {
            v16 b[NV];
            for (int v = 0; v < NV; v++) b[v] = *(const v16u *)(B + (j0 / NR) * d * NR + k * NR + 16 * v);
            for (int r = 0; r < MR; r++) {
              const v16 a = (v16){} + A[(i0 + r) * d + k];
              for (int v = 0; v < NV; v++) acc[r][v] += a * b[v];
            }
          }
          const int diag = j0 <= i0 + MR - 1;
          for (int r = 0; r < MR; r++) {
            float *srow = S + (i0 - i1 + r) * W + (j0 - j1);
            int32_t *hrow = H + (i0 - i1 + r) * W + (j0 - j1);
            for (int v = 0; v < NV; v++) {
              vi16 keep = acc[r][v] > vb; /* -1 where sent, 0 elsewhere */
              if (diag) keep &= (lane + (int32_t)(j0 + 16 * v)) > (int32_t)(i0 + r);
              *(v16u *)(srow + 16 * v) += (v16)((vi16)acc[r][v] & keep);
              if (held) *(vi16u *)(hrow + 16 * v) -= keep;
              vc -= keep;
            }
          }
        }
      }
      for (int l = 0; l < 16; l++) cnt[c] += vc[l];
    }
    /* rows past r1 and columns past m are zero rows of e and et: nothing was kept there */
    for (int64_t i = 0; i < rb; i++) {
      float *out = total + (i1 - r0 + i) * stride + (j1 - r0);
      for (int64_t j = 0; j < cw; j++) out[j] += S[i * W + j];
      if (held) {
        int32_t *h = held + (i1 - r0 + i) * stride + (j1 - r0);
        for (int64_t j = 0; j < cw; j++) h[j] += H[i * W + j];
      }
    }
  }
  if (ok)
    for (int64_t c = 0; c < C; c++) __atomic_fetch_add(counts + c, cnt[c], __ATOMIC_RELAXED);
  free(S);
  free(H);
  free(cnt);
  }
}
