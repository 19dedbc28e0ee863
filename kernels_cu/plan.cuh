// The sampling plan that SANTA pass 1 leaves for pass 2, built by the last block of a
// (batch, KV head) once every tile's (max, sum) statistics are written.
#pragma once
#include "common.cuh"

#define STAT_PARTS 4     // the per-warp pass 1 keeps statistics per 64-row part of a tile
#define PLAN_TILES 4     // consecutive tiles a lane loads per round while the plan is built

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

// One array's PARTS statistics of tile t; parts at or past `valid` (so every part of a tile past
// the sequence) read as `fill`.
template <int PARTS>
__device__ __forceinline__ void load_parts(const float* x, int t, int valid, float fill, float (&v)[PARTS]) {
  const int p0 = t * PARTS;
  if (p0 < valid) {                       // the tile lies within the buffer
    if constexpr (PARTS == 4) {           // a head's statistics start 16-byte aligned
      const float4 a = __ldcg(reinterpret_cast<const float4*>(x) + t);
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    } else {
#pragma unroll
      for (int j = 0; j < PARTS; ++j) v[j] = __ldcg(x + p0 + j);
    }
  }
#pragma unroll
  for (int j = 0; j < PARTS; ++j) v[j] = p0 + j < valid ? v[j] : fill;
}

// iid: each head's S draw positions, sorted (bitonic, in shared memory u_sm).
__device__ __forceinline__ void sort_positions(int b, int kvh, long long bh0, int G, int S, const Stream& st, u32 off,
                                               double* plan_pos, double* u_sm) {
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

// Heads bh0 .. bh0 + G - 1 are query heads kvh * G .. of sequence b, of length len. Per head:
// global max M, total mass Z and exclusive tile offsets P_t (double sums in a fixed order); for
// iid also the S draw positions, sorted. Records the call offset for pass 2 and publishes the
// plan on `ready` (if not null: pass 2 may be running already). PARTS: statistics
// per tile. A warp takes a head in rounds of 32 x PLAN_TILES tiles, a lane PLAN_TILES consecutive
// ones, each round's loads issued together: this runs after the kernel's last block, so its L2
// round trips and exponentials (float: the tile masses need no more) are the critical path.
template <int PARTS>
__device__ __noinline__ void build_plan(int b, int kvh, long long bh0, int G, int len, int tiles_max,
                           const float* stat_m, const float* stat_l, int scheme, int S, const Stream& st,
                           float* plan_M, double* plan_Z, double* plan_P, double* plan_pos, u32* plan_off,
                           int* ready, char* smem_raw) {
  constexpr int K = PLAN_TILES, ROUND = 32 * PLAN_TILES;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int tiles = (len + SANTA_TILE - 1) / SANTA_TILE, valid = valid_parts(len, PARTS);
  const u32 off = st.call_offset();
  if (threadIdx.x == 0) *plan_off = off;
  for (int g = warp; g < G; g += blockDim.x / 32) {
    const float* m = stat_m + (bh0 + g) * tiles_max * PARTS;
    const float* l = stat_l + (bh0 + g) * tiles_max * PARTS;
    double* P = plan_P + (bh0 + g) * (tiles_max + 1);
    float pm[K][PARTS], pl[K][PARTS];
    auto load_round = [&](int t0) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        load_parts<PARTS>(m, t0 + lane * K + k, valid, NEG_INF, pm[k]);
        load_parts<PARTS>(l, t0 + lane * K + k, valid, 0.f, pl[k]);
      }
    };
    load_round(0);
    float mx = NEG_INF;
#pragma unroll
    for (int k = 0; k < K; ++k)
#pragma unroll
      for (int j = 0; j < PARTS; ++j) mx = fmaxf(mx, pm[k][j]);
    for (int t0 = ROUND; t0 < tiles; t0 += 2 * ROUND) {     // longer sequences: the maximum first
      float x[2][K][PARTS];
#pragma unroll
      for (int u = 0; u < 2; ++u)
#pragma unroll
        for (int k = 0; k < K; ++k) load_parts<PARTS>(m, t0 + u * ROUND + lane * K + k, valid, NEG_INF, x[u][k]);
#pragma unroll
      for (int u = 0; u < 2; ++u)
#pragma unroll
        for (int k = 0; k < K; ++k)
#pragma unroll
          for (int j = 0; j < PARTS; ++j) mx = fmaxf(mx, x[u][k][j]);
    }
    mx = warp_max(mx);
    double carry = 0.0;
    for (int t0 = 0; t0 < tiles; t0 += ROUND) {
      if (t0 > 0) load_round(t0);
      double c[K], run = 0.0;                // this lane's inclusive sums of tile masses
#pragma unroll
      for (int k = 0; k < K; ++k) {
        float w = 0.f;
        if (mx != NEG_INF)
#pragma unroll
          for (int j = 0; j < PARTS; ++j) w += pl[k][j] * __expf(pm[k][j] - mx);
        run += (double)w;
        c[k] = run;
      }
      const double incl = warp_inclusive_scan(run), before = carry + (incl - run);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int t = t0 + lane * K + k;
        if (t < tiles) P[t] = before + (k ? c[k - 1] : 0.0);
      }
      carry += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (lane == 0) { P[tiles] = carry; plan_Z[bh0 + g] = carry; plan_M[bh0 + g] = mx; }
  }
  if (scheme == SCHEME_IID) sort_positions(b, kvh, bh0, G, S, st, off, plan_pos, reinterpret_cast<double*>(smem_raw));
  if (ready) publish(ready);
}
