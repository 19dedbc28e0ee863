// The sampling plan that SANTA pass 1 leaves for pass 2, built by the last block of a
// (batch, KV head) once every tile's (max, sum) statistics are written.
#pragma once
#include "common.cuh"

// Heads bh0 .. bh0 + G - 1 are query heads kvh * G .. of sequence b. Per head: global max M, total mass Z and exclusive tile offsets P_t (double, fixed order); for
// iid also the S draw positions, sorted. Records the call offset for pass 2.
__device__ void build_plan(int b, int kvh, long long bh0, int G, int tiles, int tiles_max, const float* stat_m,
                           const float* stat_l, int scheme, int S, const Stream& st, float* plan_M,
                           double* plan_Z, double* plan_P, double* plan_pos, u32* plan_off, char* smem_raw) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const u32 off = st.call_offset();
  if (threadIdx.x == 0) *plan_off = off;
  for (int g = warp; g < G; g += SANTA_THREADS / 32) {
    const float* m = stat_m + (bh0 + g) * tiles_max;
    const float* l = stat_l + (bh0 + g) * tiles_max;
    double* P = plan_P + (bh0 + g) * (tiles_max + 1);
    float mx = NEG_INF;
    for (int t = lane; t < tiles; t += 32) mx = fmaxf(mx, __ldcg(m + t));
    mx = warp_max(mx);
    double carry = 0.0;
    for (int base = 0; base < tiles; base += 32) {
      int t = base + lane;
      double w = (t < tiles && mx != NEG_INF) ? exp((double)__ldcg(m + t) - (double)mx) * (double)__ldcg(l + t) : 0.0;
      double incl = warp_inclusive_scan(w);
      if (t < tiles) P[t] = carry + (incl - w);
      carry += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (lane == 0) { P[tiles] = carry; plan_Z[bh0 + g] = carry; plan_M[bh0 + g] = mx; }
  }
  if (scheme != SCHEME_IID) return;
  // bitonic sort of each head's positions in shared memory
  double* u_sm = reinterpret_cast<double*>(smem_raw);
  int N = 1;
  while (N < S) N <<= 1;
  for (int g = 0; g < G; ++g) {
    const int h = kvh * G + g;
    __syncthreads();
    for (int i = threadIdx.x; i < N; i += SANTA_THREADS) u_sm[i] = i < S ? st.uniform(b, h, PURPOSE_VALUES, off, i) : 2.0;
    __syncthreads();
    for (int kk = 2; kk <= N; kk <<= 1)
      for (int j = kk >> 1; j > 0; j >>= 1) {
        for (int i = threadIdx.x; i < N; i += SANTA_THREADS) {
          int ixj = i ^ j;
          if (ixj > i) {
            double x = u_sm[i], y = u_sm[ixj];
            if ((x > y) == ((i & kk) == 0)) { u_sm[i] = y; u_sm[ixj] = x; }
          }
        }
        __syncthreads();
      }
    for (int i = threadIdx.x; i < S; i += SANTA_THREADS) plan_pos[(bh0 + g) * S + i] = u_sm[i];
  }
}
