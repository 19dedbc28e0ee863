// The sampling plan that SANTA pass 1 leaves for pass 2, built by the last block of a
// (batch, KV head) once every tile's (max, sum) statistics are written.
#pragma once
#include "common.cuh"

// Statistics come per part of a tile (`parts` per tile, SANTA_TILE / parts rows each; a head's
// parts are contiguous, tiles_max * parts of them); parts at or past `valid` lie past the
// sequence and were not written.
__device__ __forceinline__ int valid_parts(int len, int parts) {
  const int rows = SANTA_TILE / parts;
  return (len + rows - 1) / rows;
}
// (max, sum of exp(s - max)) of tile t of one head from its parts.
__device__ __forceinline__ void tile_stats(const float* m, const float* l, int t, int parts, int valid, float& mt,
                                           float& lt) {
  const int p0 = t * parts, p1 = min(p0 + parts, valid);
  mt = NEG_INF;
  for (int p = p0; p < p1; ++p) mt = fmaxf(mt, __ldcg(m + p));
  lt = 0.f;
  if (mt != NEG_INF)
    for (int p = p0; p < p1; ++p) lt += __ldcg(l + p) * __expf(__ldcg(m + p) - mt);
}

// Heads bh0 .. bh0 + G - 1 are query heads kvh * G .. of sequence b, of length len. Per head:
// global max M, total mass Z and exclusive tile offsets P_t (double, fixed order); for iid also
// the S draw positions, sorted. Records the call offset for pass 2.
__device__ void build_plan(int b, int kvh, long long bh0, int G, int len, int tiles_max, int parts,
                           const float* stat_m, const float* stat_l, int scheme, int S, const Stream& st,
                           float* plan_M, double* plan_Z, double* plan_P, double* plan_pos, u32* plan_off,
                           char* smem_raw) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int tiles = (len + SANTA_TILE - 1) / SANTA_TILE, valid = valid_parts(len, parts);
  const u32 off = st.call_offset();
  if (threadIdx.x == 0) *plan_off = off;
  for (int g = warp; g < G; g += blockDim.x / 32) {
    const float* m = stat_m + (bh0 + g) * tiles_max * parts;
    const float* l = stat_l + (bh0 + g) * tiles_max * parts;
    double* P = plan_P + (bh0 + g) * (tiles_max + 1);
    float mx = NEG_INF;
    for (int p = lane; p < valid; p += 32) mx = fmaxf(mx, __ldcg(m + p));
    mx = warp_max(mx);
    double carry = 0.0;
    for (int base = 0; base < tiles; base += 32) {
      const int t = base + lane;
      double w = 0.0;
      if (t < tiles && mx != NEG_INF)
        for (int p = t * parts; p < min(t * parts + parts, valid); ++p)
          w += exp((double)__ldcg(m + p) - (double)mx) * (double)__ldcg(l + p);
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
    for (int i = threadIdx.x; i < N; i += blockDim.x) u_sm[i] = i < S ? st.uniform(b, h, PURPOSE_VALUES, off, i) : 2.0;
    __syncthreads();
    for (int kk = 2; kk <= N; kk <<= 1)
      for (int j = kk >> 1; j > 0; j >>= 1) {
        for (int i = threadIdx.x; i < N; i += blockDim.x) {
          int ixj = i ^ j;
          if (ixj > i) {
            double x = u_sm[i], y = u_sm[ixj];
            if ((x > y) == ((i & kk) == 0)) { u_sm[i] = y; u_sm[ixj] = x; }
          }
        }
        __syncthreads();
      }
    for (int i = threadIdx.x; i < S; i += blockDim.x) plan_pos[(bh0 + g) * S + i] = u_sm[i];
  }
}
