/* The server's sum of a chunk of clients' plain uploads, with the threshold and the sum in the product's
   epilogue (src/alignment/native_sums.py builds and calls this; README, Benchmark).

   For item rows [r0, r1) against the items from r0 on, every client's cosines x = <e_i, e_j> with j > i are
   computed in registers (an MR x 32 tile, d multiply-adds each), those with x > below are added to a tile of
   sums that stays in cache while all the chunk's clients pass over it, and counted per pair and per client.
   GCC vector extensions, no intrinsics, in vectors of the CPU's own width (VL floats: 16 with AVX-512, 8 with
   AVX2; a vector wider than the registers is lowered through memory, 20x slower), given as -DVL= by
   src/runtime/native.py (the tests build each width). The register tile is MR x 32 (MR = 8 with 32 registers, 2 with 16: 2 x 4
   accumulators, measured on AVX2). The tiles are shared by OpenMP threads (torch's own runtime when the process
   has loaded it, so no second pool spins beside torch's). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef VL
#error "build with -DVL=<float lanes> (src/runtime/native.py: vector_lanes)"
#endif
#define MR (VL == 16 ? 8 : 2) /* item rows of a register tile */
#define NR 32                 /* columns of a register tile (the panel width of et) */
#define NV (NR / VL)          /* vectors of a register tile's row */

typedef float vf __attribute__((vector_size(4 * VL)));
typedef float vfu __attribute__((vector_size(4 * VL), aligned(4)));
typedef int32_t vi __attribute__((vector_size(4 * VL)));
typedef int32_t viu __attribute__((vector_size(4 * VL), aligned(4)));

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
  const vf vb = (vf){} + below;
  vi lane;
  for (int l = 0; l < VL; l++) lane[l] = l;
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
      vi vc = (vi){};
      for (int64_t i0 = i1; i0 < i1 + rb; i0 += MR) {
        for (int64_t j0 = j1; j0 < j1 + cw; j0 += NR) {
          if (j0 + NR - 1 <= i0) continue; /* no j > i in this register tile */
          vf acc[MR][NV];
          for (int r = 0; r < MR; r++)
            for (int v = 0; v < NV; v++) acc[r][v] = (vf){};
          for (int64_t k = 0; k < d; k++) {
            vf b[NV];
            for (int v = 0; v < NV; v++) b[v] = *(const vfu *)(B + (j0 / NR) * d * NR + k * NR + VL * v);
            for (int r = 0; r < MR; r++) {
              const vf a = (vf){} + A[(i0 + r) * d + k];
              for (int v = 0; v < NV; v++) acc[r][v] += a * b[v];
            }
          }
          const int diag = j0 <= i0 + MR - 1;
          for (int r = 0; r < MR; r++) {
            float *srow = S + (i0 - i1 + r) * W + (j0 - j1);
            int32_t *hrow = H + (i0 - i1 + r) * W + (j0 - j1);
            for (int v = 0; v < NV; v++) {
              vi keep = acc[r][v] > vb; /* -1 where sent, 0 elsewhere */
              if (diag) keep &= (lane + (int32_t)(j0 + VL * v)) > (int32_t)(i0 + r);
              *(vfu *)(srow + VL * v) += (vf)((vi)acc[r][v] & keep);
              if (held) *(viu *)(hrow + VL * v) -= keep;
              vc -= keep;
            }
          }
        }
      }
      for (int l = 0; l < VL; l++) cnt[c] += vc[l];
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
