/* This machine's fp32 multiply-add peak, for the benchmark's roofline (src/bench.py: `fma_rate`): every thread
   runs 12 independent chains of 16-wide multiply-adds held in registers (enough to cover the latency of the
   pipelines of current x86 and ARM cores), so memory plays no part. Built by src/native.py. */
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef float v16 __attribute__((vector_size(64)));

/* Runs `iters` rounds of 12 x 16 multiply-adds on each of `threads` threads; returns a value that depends on all
   of them (so none is optimised away). */
float fma_peak(int64_t iters, int threads) {
  float total = 0.0f;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    v16 acc[12];
    const v16 a = (v16){} + 0.999999f, b = (v16){} + 1e-7f;
    for (int i = 0; i < 12; i++) acc[i] = (v16){} + (float)i;
    for (int64_t it = 0; it < iters; it++)
      for (int i = 0; i < 12; i++) acc[i] = acc[i] * a + b;
    for (int i = 0; i < 12; i++)
      for (int l = 0; l < 16; l++) total += acc[i][l];
  }
  return total;
}
