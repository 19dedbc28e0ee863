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
// the sequence) read as `fill`. Four parts: one load through the L1, where pass 2's set-up finds a
// tile's statistics again for its other parts (bench/NOTES.md, version 96).
template <int PARTS>
__device__ __forceinline__ void load_parts(const float* x, int t, int valid, float fill, float (&v)[PARTS]) {
  const int p0 = t * PARTS;
  if (p0 < valid) {                       // the tile lies within the buffer
    if constexpr (PARTS == 4) {           // a head's statistics start 16-byte aligned
      const float4 a = __ldca(reinterpret_cast<const float4*>(x) + t);
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    } else {
#pragma unroll
      for (int j = 0; j < PARTS; ++j) v[j] = __ldcg(x + p0 + j);
    }
  }
#pragma unroll
  for (int j = 0; j < PARTS; ++j) v[j] = p0 + j < valid ? v[j] : fill;
}

// The counting sort's bucket of position u of the e-th head of a batch: e S + its leading bits.
__device__ __forceinline__ int position_bucket(int e, int S, double u) { return e * S + min(S - 1, (int)(u * S)); }

// f(bucket, u) for each of the S positions u of the N / S query heads from kvh G + g0 of sequence
// b (the e-th of them at bucket position_bucket(e, S, u)). A Philox output holds two positions
// (S2 pairs per head). A function, not a generic lambda, which NVRTC before CUDA 13 compiles as
// host code.
template <typename F>
__device__ __forceinline__ void each_position(int b, int kvh, int G, int g0, int S, int N, int T, const Stream& st,
                                              u32 off, F f) {
  const int S2 = (S + 1) / 2;
#pragma unroll 1
  for (int p = threadIdx.x; p < (N / S) * S2; p += T) {
    const int e = p / S2, i = 2 * (p - e * S2);
    const uint4 w = st.words(b, kvh * G + g0 + e, PURPOSE_VALUES, off, i >> 1);
#pragma unroll 1
    for (int j = 0; j < 2 && i + j < S; ++j) {
      const double u = Stream::to_double(w, j);
      f(position_bucket(e, S, u), u);
    }
  }
}

// iid: each head's S draw positions, sorted, a few heads at a time (12 S bytes of the dynamic
// shared memory each: the positions, then a bucket counter per position). A counting sort on
// their leading bits: the positions are uniform, so each of a head's S buckets receives about
// one, and each position's rank within its bucket is a count over those few. Each position is
// drawn twice (to count it, then to place it), which takes less shared memory than keeping the
// unsorted ones.
__device__ __forceinline__ void sort_positions(int b, int kvh, long long bh0, int G, int S, const Stream& st, u32 off,
                                               double* plan_pos) {
  // the kernel's dynamic shared memory, named here so that its accesses are shared-memory ones
  // (build_plan is not inlined, so a pointer passed in would be generic)
  extern __shared__ __align__(128) char smem_raw[];
  double* u_sm = reinterpret_cast<double*>(smem_raw);
  __shared__ int warp_sum[32];
  u32 smem_bytes;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(smem_bytes));
  // heads at a time: batches of at most 1024 positions (larger ones sorted slower: bench/NOTES.md)
  const int per = max(1, min(min(G, 1024 / S), (int)(smem_bytes / (12u * S))));
  const int T = blockDim.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int g0 = 0; g0 < G; g0 += per) {
    const int N = min(per, G - g0) * S;              // positions of heads g0 .., head-major
    int* start = reinterpret_cast<int*>(u_sm + N);   // per bucket: its count, its first slot, its end
    __syncthreads();                                 // the previous heads are written out
    for (int i = threadIdx.x; i < N; i += T) start[i] = 0;
    __syncthreads();
    each_position(b, kvh, G, g0, S, N, T, st, off, [&](int k, double) { atomicAdd(start + k, 1); });
    __syncthreads();
    // counts -> first slots: each thread scans a run of buckets, the runs in thread order
    const int run = (N + T - 1) / T, k0 = min(N, threadIdx.x * run), k1 = min(N, k0 + run);
    int n = 0;
    for (int k = k0; k < k1; ++k) n += start[k];
    const int incl = warp_inclusive_scan(n);
    if (lane == 31) warp_sum[warp] = incl;
    __syncthreads();
    int at = incl - n;
    for (int w = 0; w < warp; ++w) at += warp_sum[w];
    for (int k = k0; k < k1; ++k) {
      const int c = start[k];
      start[k] = at;
      at += c;
    }
    __syncthreads();
    each_position(b, kvh, G, g0, S, N, T, st, off, [&](int k, double u) { u_sm[atomicAdd(start + k, 1)] = u; });
    __syncthreads();
    // bucket k is now [start[k - 1], start[k]): each position goes to its rank in the sorted
    // order, its bucket's start plus the number of its bucket's positions below it
    double* pos = plan_pos + (bh0 + g0) * S;
    for (int i = threadIdx.x; i < N; i += T) {
      const double x = u_sm[i];
      const int k = position_bucket(i / S, S, x);
      const int lo = k ? start[k - 1] : 0, hi = start[k];
      int at = lo;
      for (int j = lo; j < hi; ++j) at += u_sm[j] < x || (u_sm[j] == x && j < i);
      pos[at] = x;
    }
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
                           int* ready) {
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
  if (scheme == SCHEME_IID) sort_positions(b, kvh, bh0, G, S, st, off, plan_pos);
  if (ready) publish(ready);
}
