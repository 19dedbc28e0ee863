// The sampling plan that SANTA pass 1 leaves for pass 2, built by the last block of a
// (batch, KV head) once every tile's (max, sum) statistics are written.
#pragma once
#include "common.cuh"

#define STAT_PARTS 4     // the per-warp pass 1 keeps statistics per 64-row part of a tile
#define PLAN_LOADS 8     // statistics loads in flight per lane while the plan is built

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
// the S draw positions, sorted. Records the call offset for pass 2. PARTS: statistics per tile.
template <int PARTS>
__device__ void build_plan(int b, int kvh, long long bh0, int G, int len, int tiles_max,
                           const float* stat_m, const float* stat_l, int scheme, int S, const Stream& st,
                           float* plan_M, double* plan_Z, double* plan_P, double* plan_pos, u32* plan_off,
                           char* smem_raw) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int tiles = (len + SANTA_TILE - 1) / SANTA_TILE, valid = valid_parts(len, PARTS);
  const u32 off = st.call_offset();
  if (threadIdx.x == 0) *plan_off = off;
  for (int g = warp; g < G; g += blockDim.x / 32) {
    const float* m = stat_m + (bh0 + g) * tiles_max * PARTS;
    const float* l = stat_l + (bh0 + g) * tiles_max * PARTS;
    double* P = plan_P + (bh0 + g) * (tiles_max + 1);
    // the block's last step: every load of a round is issued before any is used (L2 round trips
    // dominate here)
    float mx = NEG_INF;
    for (int p0 = 0; p0 < valid; p0 += 32 * PLAN_LOADS) {
      float x[PLAN_LOADS];
#pragma unroll
      for (int u = 0; u < PLAN_LOADS; ++u) x[u] = p0 + u * 32 + lane < valid ? __ldcg(m + p0 + u * 32 + lane) : NEG_INF;
#pragma unroll
      for (int u = 0; u < PLAN_LOADS; ++u) mx = fmaxf(mx, x[u]);
    }
    mx = warp_max(mx);
    double carry = 0.0;
    for (int base = 0; base < tiles; base += 32) {
      const int t = base + lane;
      float pm[PARTS], pl[PARTS];                  // this lane's tile; parts past `valid` add 0
#pragma unroll
      for (int j = 0; j < PARTS; ++j) {
        const int p = t * PARTS + j;
        const bool ok = t < tiles && p < valid;
        pm[j] = ok ? __ldcg(m + p) : NEG_INF;
        pl[j] = ok ? __ldcg(l + p) : 0.f;
      }
      double w = 0.0;
      if (t < tiles && mx != NEG_INF)
#pragma unroll
        for (int j = 0; j < PARTS; ++j) w += exp((double)pm[j] - (double)mx) * (double)pl[j];
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
