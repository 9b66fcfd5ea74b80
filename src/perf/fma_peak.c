/* This machine's fp32 multiply-add peak, for the benchmark's roofline (src/bench.py: `fma_rate`): every thread
   runs 12 independent chains of register-wide multiply-adds held in registers (enough to cover the latency of
   the pipelines of current x86 and ARM cores), so memory plays no part. Built by src/native.py. */
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* one register's width of floats, so the 12 chains and two constants fit the register file (no spills) */
#if defined(__AVX512F__)
#define VW 16
#elif defined(__AVX__)
#define VW 8
#else
#define VW 4
#endif
typedef float vec __attribute__((vector_size(4 * VW)));

/* Runs `iters` rounds of 12 x `fma_width()` multiply-adds on each of `threads` threads; returns a value that
   depends on all of them (so none is optimised away). */
int fma_width(void) { return VW; }

float fma_peak(int64_t iters, int threads) {
  float total = 0.0f;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    vec acc[12];
    const vec a = (vec){} + 0.999999f, b = (vec){} + 1e-7f;
    for (int i = 0; i < 12; i++) acc[i] = (vec){} + (float)i;
    for (int64_t it = 0; it < iters; it++)
      for (int i = 0; i < 12; i++) acc[i] = acc[i] * a + b;
    for (int i = 0; i < 12; i++)
      for (int l = 0; l < VW; l++) total += acc[i][l];
  }
  return total;
}
