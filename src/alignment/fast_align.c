/* The fast alignment's value and gradient, one client at a time in cache: src/alignment/fast_grad.py's
   fast_value_and_grad written out in C for d = 32 (src/alignment/native_align.py calls this).

   Per client: the table normalised (centred over items), ICA's positive terms through the community sums, the
   anchor rows S = e_A e^T [K, m] (register tiles of MR anchors x 32 items), then per anchor row:
   ICA (Eq. 3-4), lse_a = log sum_{k != a} exp(s_ak / tau) and its gradient coef_a softmax_k;
   GSA (Eq. 10), d_ak = W_ak (s_ak - S_g[a, k]) with W the configured mask, sum d^2 and its gradient
   2 beta scale d_ak, scale = 1 / (entries of W) (mean) or m / (valid anchors) (sum); the rows then hold
   G = dL/dS, G^T e_A and G e go to the gradient of e (register tiles again), and that gradient goes back through
   the normalisation and the centring.
   GCC vector extensions, no intrinsics, in vectors of the CPU's own width (VL floats: 16 with AVX-512, 8 with
   AVX2; a vector wider than the registers is lowered through memory), given as -DVL= by src/runtime/native.py
   (the tests build each width); the register tiles shrink with the width so their accumulators stay in registers. The
   clients are shared by OpenMP threads (torch's own runtime when the process has loaded it, so no second pool
   spins beside torch's). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef VL
#error "build with -DVL=<float lanes> (src/runtime/native.py: vector_lanes)"
#endif
#define D 32 /* the embedding width this kernel is written for (model.dim; others use the torch form) */
#define DV (D / VL) /* vectors of one embedding row */
#define MR (VL == 16 ? 8 : 2) /* anchor rows of the product's register tile (x 32 items) */
#define GI (VL == 16 ? 8 : 2) /* items of a register tile of G^T e_A */
#define GA (VL == 16 ? 4 : 2) /* anchors of a register tile of G e */

typedef float vf __attribute__((vector_size(4 * VL)));
typedef float vfu __attribute__((vector_size(4 * VL), aligned(4)));
typedef int32_t vi __attribute__((vector_size(4 * VL)));
typedef uint8_t vb __attribute__((vector_size(VL)));
typedef uint8_t vbu __attribute__((vector_size(VL), aligned(1)));

#if VL == 16
static const vi LANE = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
#elif VL == 8
static const vi LANE = {0, 1, 2, 3, 4, 5, 6, 7};
#else
static const vi LANE = {0, 1, 2, 3};
#endif

static inline vf load(const float *p, int64_t n) {
  if (n == VL) return *(const vfu *)p;
  vf x = {};
  memcpy(&x, p, sizeof(float) * n);
  return x;
}

static inline void store(float *p, vf x, int64_t n) {
  if (n == VL) *(vfu *)p = x;
  else memcpy(p, &x, sizeof(float) * n);
}

static inline vi load_mask(const uint8_t *p, int64_t n) {
  vb b = {};
  if (n == VL) b = *(const vbu *)p;
  else memcpy(&b, p, n);
  return __builtin_convertvector(b, vi) != 0;
}

static inline vf pick(vi mask, vf yes, vf no) { return (vf)(((vi)yes & mask) | ((vi)no & ~mask)); }

/* exp(x) for x <= 0 within a few float ulps (x below -87 gives about 1e-38, not 0): 2^n e^f, |f| <= ln2 / 2 */
static inline vf vexp(vf x) {
  const vf lo = (vf){} - 87.0f;
  x = pick(x < lo, lo, x);
  const vf n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest */
  const vf f = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  vf p = f * (1.0f / 720) + (1.0f / 120);
  p = p * f + (1.0f / 24);
  p = p * f + (1.0f / 6);
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  return p * (vf)bits;
}

/* Whether W_ak holds, for columns k0..k0+n of anchor a's row: mask 0 local (s >= sigma), 1 global (the server
   graph, or S_g >= sigma without one), 2 union; never the anchor's own column, nor past n. */
static inline vi kept(vf x, const float *sg, const uint8_t *graph, int mask, float sigma, int64_t k0, int64_t n,
                        int64_t a) {
  vi w;
  vi glob = {};
  if (mask != 0) glob = graph ? load_mask(graph + k0, n) : load(sg + k0, n) >= sigma;
  if (mask == 0) w = x >= sigma;
  else if (mask == 1) w = glob;
  else w = (x >= sigma) | glob;
  return w & (LANE < (int32_t)n) & ((LANE + (int32_t)k0) != (int32_t)a);
}

#define SUM_BLOCK 128 /* items per partial sum of a long reduction */
/* S [kp, mp] = A [kp, D] B [D, mp] in register tiles of MR rows x 32 columns (kp a multiple of 8, mp of 32) */
static void rows_product(const float *A, const float *B, float *S, int64_t kp, int64_t mp) {
  for (int64_t i0 = 0; i0 < kp; i0 += MR)
    for (int64_t j0 = 0; j0 < mp; j0 += 32) {
      vf acc[MR][32 / VL];
      for (int r = 0; r < MR; r++)
        for (int v = 0; v < 32 / VL; v++) acc[r][v] = (vf){};
      for (int j = 0; j < D; j++) {
        vf b[32 / VL];
        for (int v = 0; v < 32 / VL; v++) b[v] = *(const vfu *)(B + j * mp + j0 + VL * v);
        for (int r = 0; r < MR; r++) {
          const vf a = (vf){} + A[(i0 + r) * D + j];
          for (int v = 0; v < 32 / VL; v++) acc[r][v] += a * b[v];
        }
      }
      for (int r = 0; r < MR; r++)
        for (int v = 0; v < 32 / VL; v++) *(vfu *)(S + (i0 + r) * mp + j0 + VL * v) = acc[r][v];
    }
}

/* From G [K, mp] (zero past m): gk [m, D] += G^T ea (s_ak = e_a . e_k: d/de_k = sum_a G_ak e_a), in tiles of
   GI items; ga [K, D] += G e (d/de_a = sum_k G_ak e_k), in tiles of GA anchors */
static void grads(const float *G, const float *e, const float *ea, int64_t K, int64_t m, int64_t mp, float *gk,
                  float *ga) {
  for (int64_t k0 = 0; k0 < m; k0 += GI) {
    vf acc[GI][DV];
    for (int i = 0; i < GI; i++)
      for (int v = 0; v < DV; v++) acc[i][v] = (vf){};
    for (int64_t a = 0; a < K; a++) {
      vf x[DV];
      for (int v = 0; v < DV; v++) x[v] = *(const vfu *)(ea + a * D + VL * v);
      for (int i = 0; i < GI; i++) {
        const vf g = (vf){} + G[a * mp + k0 + i];
        for (int v = 0; v < DV; v++) acc[i][v] += g * x[v];
      }
    }
    for (int i = 0; i < GI && k0 + i < m; i++)
      for (int v = 0; v < DV; v++) *(vfu *)(gk + (k0 + i) * D + VL * v) += acc[i][v];
  }
  for (int64_t a0 = 0; a0 < K; a0 += GA) {
    const int na = K - a0 < GA ? (int)(K - a0) : GA;
    vf total[GA][DV];
    for (int i = 0; i < GA; i++)
      for (int v = 0; v < DV; v++) total[i][v] = (vf){};
    for (int64_t b0 = 0; b0 < m; b0 += SUM_BLOCK) { /* partial sums of SUM_BLOCK items: rounding as a blocked GEMM */
      const int64_t b1 = b0 + SUM_BLOCK < m ? b0 + SUM_BLOCK : m;
      vf acc[GA][DV];
      for (int i = 0; i < GA; i++)
        for (int v = 0; v < DV; v++) acc[i][v] = (vf){};
      for (int64_t k = b0; k < b1; k++) {
        vf x[DV];
        for (int v = 0; v < DV; v++) x[v] = *(const vfu *)(e + k * D + VL * v);
        for (int i = 0; i < GA; i++) {
          const vf g = (vf){} + G[(a0 + (i < na ? i : 0)) * mp + k];
          for (int v = 0; v < DV; v++) acc[i][v] += g * x[v];
        }
      }
      for (int i = 0; i < GA; i++)
        for (int v = 0; v < DV; v++) total[i][v] += acc[i][v];
    }
    for (int i = 0; i < na; i++)
      for (int v = 0; v < DV; v++) *(vfu *)(ga + (a0 + i) * D + VL * v) += total[i][v];
  }
}

/* tables [C, m, D]; anchors [C, K]; valid [C, K] (0/1); labels [m] and sizes [L] (NULL: no ICA); gsim [m, m]
   (NULL: no GSA; graph [m, m] 0/1 or NULL). Writes ica [C] and gsa [C] (the per-client terms, as fast_grad's
   values) and grad [C, m, D] = d(alpha ICA + beta GSA)/d table. *status = 1 when a thread could not allocate
   its buffers (K x m floats and a few m x D). */
void fast_align(const float *tables, int64_t C, int64_t K, int64_t m, const int64_t *anchors, const uint8_t *valid,
                const int64_t *labels, const int64_t *sizes, int64_t L, const float *gsim, const uint8_t *graph,
                float alpha, float beta, float tau, float tau0, float sigma, int centre, int mask, int mean,
                float *ica, float *gsa, float *grad, int threads, int *status) {
  const int64_t mp = (m + 31) / 32 * 32, kp = (K + 7) / 8 * 8;
  const float eps = 1e-12f, inv_tau = 1.0f / tau, two_beta = 2.0f * beta;
#pragma omp parallel num_threads(threads)
  {
  float *p = malloc(sizeof(float) * (mp + 16));
  float *et = calloc(D * mp, sizeof(float));
  float *ea = calloc(kp * D, sizeof(float));
  float *s = malloc(sizeof(float) * kp * mp);
  float *e = malloc(sizeof(float) * m * D);
  float *nrm = malloc(sizeof(float) * m);
  float *ge = malloc(sizeof(float) * m * D);
  float *gea = malloc(sizeof(float) * K * D);
  float *w = malloc(sizeof(float) * K), *coef = malloc(sizeof(float) * K), *pos = malloc(sizeof(float) * K);
  float *lse = malloc(sizeof(float) * K);
  float *csum = labels ? malloc(sizeof(float) * L * D) : NULL, *spread = labels ? malloc(sizeof(float) * L * D) : NULL;
  double *csum64 = labels ? malloc(sizeof(double) * L * D) : NULL;
  const int ok = p && et && ea && s && e && nrm && ge && gea && w && coef && pos && lse &&
                 (!labels || (csum && spread && csum64));
  if (!ok) __atomic_store_n(status, 1, __ATOMIC_RELAXED); /* out of memory: the caller raises */
#pragma omp for schedule(dynamic, 1)
  for (int64_t c = 0; c < C; c++) {
    if (!ok) continue;
    const float *t = tables + c * m * D;
    const int64_t *anc = anchors + c * K;
    const uint8_t *ok = valid + c * K;
    /* e = x / max(|x|, eps), x = the table centred over items */
    float mu[D] = {0};
    if (centre) {
      double acc[D] = {0};
      for (int64_t k = 0; k < m; k++)
        for (int j = 0; j < D; j++) acc[j] += t[k * D + j];
      for (int j = 0; j < D; j++) mu[j] = (float)(acc[j] / (double)m);
    }
    for (int64_t k = 0; k < m; k++) {
      float x[D], sq = 0.0f;
      for (int j = 0; j < D; j++) {
        x[j] = t[k * D + j] - mu[j];
        sq += x[j] * x[j];
      }
      float n = sqrtf(sq);
      n = n > eps ? n : eps;
      nrm[k] = n;
      for (int j = 0; j < D; j++) e[k * D + j] = x[j] / n;
    }
    memset(ge, 0, sizeof(float) * m * D);
    memset(gea, 0, sizeof(float) * K * D);
    for (int64_t r = 0; r < K; r++) coef[r] = 0.0f;
    if (labels) {
      /* Eq. 3-4, positives: sum_{p in P(a)} s_ap = e_a . (sum of a's community - e_a) */
      memset(csum64, 0, sizeof(double) * L * D);
      memset(spread, 0, sizeof(float) * L * D);
      for (int64_t k = 0; k < m; k++)
        for (int j = 0; j < D; j++) csum64[labels[k] * D + j] += e[k * D + j];
      for (int64_t i = 0; i < L * D; i++) csum[i] = (float)csum64[i];
      int64_t nv = 0;
      for (int64_t r = 0; r < K; r++) nv += ok[r] && sizes[labels[anc[r]]] > 1;
      for (int64_t r = 0; r < K; r++) {
        const int64_t a = anc[r], l = labels[a];
        const float npos = sizes[l] - 1 > 1 ? (float)(sizes[l] - 1) : 1.0f;
        w[r] = (ok[r] && sizes[l] > 1) ? 1.0f / (float)(nv > 1 ? nv : 1) : 0.0f;
        coef[r] = alpha * w[r] / tau0;
        float dot = 0.0f;
        for (int j = 0; j < D; j++) dot += e[a * D + j] * (csum[l * D + j] - e[a * D + j]);
        pos[r] = dot / tau / npos;
        const float pc = (-alpha / tau0) * w[r] / npos;
        for (int j = 0; j < D; j++) {
          spread[l * D + j] += pc * e[a * D + j];
          gea[r * D + j] = pc * (csum[l * D + j] - 2 * e[a * D + j]);
        }
      }
      for (int64_t k = 0; k < m; k++)
        for (int j = 0; j < D; j++) ge[k * D + j] = spread[labels[k] * D + j];
    }
    /* the anchor rows */
    for (int64_t k = 0; k < m; k++)
      for (int j = 0; j < D; j++) et[j * mp + k] = e[k * D + j];
    for (int64_t r = 0; r < K; r++) memcpy(ea + r * D, e + anc[r] * D, sizeof(float) * D);
    rows_product(ea, et, s, kp, mp);
    float sc = 0.0f, tbs = 0.0f;
    if (gsim) {
      int64_t nvalid = 0, nkept = 0;
      for (int64_t r = 0; r < K; r++) {
        const int64_t a = anc[r];
        nvalid += ok[r] != 0;
        if (!mean || !ok[r]) continue;
        const float *row = s + r * mp;
        vi cnt = {};
        for (int64_t k0 = 0; k0 < m; k0 += VL) {
          const int64_t n = m - k0 < VL ? m - k0 : VL;
          cnt -= kept(load(row + k0, n), gsim + a * m, graph ? graph + a * m : NULL, mask, sigma, k0, n, a);
        }
        for (int l = 0; l < VL; l++) nkept += cnt[l];
      }
      sc = mean ? 1.0f / (float)(nkept > 1 ? nkept : 1) : (float)m / (float)(nvalid > 1 ? nvalid : 1);
      tbs = two_beta * sc;
    }
    double sq = 0.0;
    for (int64_t r = 0; r < K; r++) {
      const int64_t a = anc[r];
      float *row = s + r * mp;
      float cz = 0.0f;
      if (labels) {
        const float own = row[a];
        row[a] = -INFINITY;
        vf top = (vf){} - INFINITY;
        for (int64_t k0 = 0; k0 < m; k0 += VL) {
          const int64_t n = m - k0 < VL ? m - k0 : VL;
          const vf x = load(row + k0, n);
          top = pick((x > top) & (LANE < (int32_t)n), x, top);
        }
        float tp = -INFINITY;
        for (int l = 0; l < VL; l++) tp = top[l] > tp ? top[l] : tp;
        tp *= inv_tau;
        vf z = {};
        for (int64_t k0 = 0; k0 < m; k0 += VL) {
          const int64_t n = m - k0 < VL ? m - k0 : VL;
          const vf x = pick(LANE < (int32_t)n, vexp(load(row + k0, n) * inv_tau - tp), (vf){});
          z += x;
          *(vfu *)(p + k0) = x;
        }
        row[a] = own;
        float zs = 0.0f;
        for (int l = 0; l < VL; l++) zs += z[l];
        zs -= p[a];
        p[a] = 0.0f;
        lse[r] = tp + logf(zs);
        cz = coef[r] / zs;
      }
      if (!gsim) {
        for (int64_t k0 = 0; k0 < m; k0 += VL) {
          const int64_t n = m - k0 < VL ? m - k0 : VL;
          store(row + k0, *(const vfu *)(p + k0) * cz, n);
        }
        continue;
      }
      const float *sg = gsim + a * m;
      const uint8_t *gr = graph ? graph + a * m : NULL;
      vf acc = {};
      for (int64_t k0 = 0; k0 < m; k0 += VL) {
        const int64_t n = m - k0 < VL ? m - k0 : VL;
        const vf x = load(row + k0, n);
        const vi keep = ok[r] ? kept(x, sg, gr, mask, sigma, k0, n, a) : (vi){};
        const vf d = (vf)((vi)(x - load(sg + k0, n)) & keep); /* Eq. 10: W o (S_u - S_g) */
        acc += d * d;
        vf g = d * tbs;
        if (labels) g += *(const vfu *)(p + k0) * cz;
        store(row + k0, g, n);
      }
      for (int l = 0; l < VL; l++) sq += acc[l];
    }
    if (labels || gsim) grads(s, e, ea, K, m, mp, ge, gea);
    if (labels) {
      float a1 = 0.0f, a2 = 0.0f;
      for (int64_t r = 0; r < K; r++) {
        a1 += w[r] * lse[r];
        a2 += w[r] * pos[r];
      }
      ica[c] = (tau / tau0) * (a1 - a2);
    }
    if (gsim) gsa[c] = (float)sq * sc;
    for (int64_t r = 0; r < K; r++)
      for (int j = 0; j < D; j++) ge[anc[r] * D + j] += gea[r * D + j];
    /* back through e = x / |x|: (g - e (e . g)) / |x| (g / eps where |x| <= eps), then minus its item mean */
    float *out = grad + c * m * D;
    double gsum[D] = {0};
    for (int64_t k = 0; k < m; k++) {
      float radial = 0.0f;
      for (int j = 0; j < D; j++) radial += e[k * D + j] * ge[k * D + j];
      if (!(nrm[k] > eps)) radial = 0.0f;
      for (int j = 0; j < D; j++) {
        out[k * D + j] = (ge[k * D + j] - e[k * D + j] * radial) / nrm[k];
        gsum[j] += out[k * D + j];
      }
    }
    if (centre) {
      float gm[D];
      for (int j = 0; j < D; j++) gm[j] = (float)(gsum[j] / (double)m);
      for (int64_t k = 0; k < m; k++)
        for (int j = 0; j < D; j++) out[k * D + j] -= gm[j];
    }
  }
  free(p); free(et); free(ea); free(s); free(e); free(nrm); free(ge); free(gea);
  free(w); free(coef); free(pos); free(lse); free(csum); free(spread); free(csum64);
  }
}
