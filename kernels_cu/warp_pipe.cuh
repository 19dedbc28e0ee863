// Per-warp pipelines for 16-bit caches. Each warp of a block streams chunks of 16 rows of one
// KV head through its own ring of shared-memory stages (cp.async, waited on with a warp barrier
// only) and scores them against the query group on tensor cores: the block never waits for its
// slowest warp while rows stream.
#pragma once
#include "common.cuh"

#define CHUNK_ROWS 16
// santa_cupy/_gpu.py mirrors these
#ifndef EXACT_PIPE_RINGS             // exact decode: most rings per block (half that for 256-wide rows)
#define EXACT_PIPE_RINGS 8
#endif
#ifndef EXACT_RING_WARPS_256         // exact decode, 256-wide rows: warps sharing a ring
#define EXACT_RING_WARPS_256 2
#endif
#ifndef EXACT_PIPE_STAGES            // exact decode: ring depth, K and V per stage
#define EXACT_PIPE_STAGES 2
#endif
#ifndef SCORE_PIPE_WARPS             // SANTA pass 1: warps per block
#define SCORE_PIPE_WARPS 4
#endif
#ifndef SCORE_PIPE_STAGES            // SANTA pass 1: ring depth per warp, K per stage
#define SCORE_PIPE_STAGES 2
#endif
#ifndef SCORE_PIPE_CHUNKS            // SANTA pass 1: chunks per stage
#define SCORE_PIPE_CHUNKS 2
#endif
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

// Stage layout of one operand: 16 rows, swizzled (common.cuh).
template <typename T, int D> struct Chunk {
  static constexpr int ROW_BYTES = D * (int)sizeof(T);
  static constexpr int BYTES = CHUNK_ROWS * ROW_BYTES;
  static constexpr int NCH = ROW_BYTES / 16;                // 16-byte pieces per row
  static constexpr int COPIES = CHUNK_ROWS * NCH / 32;      // per lane
  static_assert(NCH <= 32 && NCH % 8 == 0, "row pieces per warp");
  static __device__ __forceinline__ int at(int r, int p) { return swizzled(r, p, ROW_BYTES); }
};
// Exact decode holds K and V per stage: 256-wide rows get half the rings to fit shared memory,
// and two warps share each ring (each copies half its rows and accumulates half of p V), so that
// a multiprocessor still runs 8 warps.
template <int D> __host__ __device__ constexpr int exact_pipe_rings() {
  return D >= 256 ? EXACT_PIPE_RINGS / 2 : EXACT_PIPE_RINGS;
}
template <int D> __host__ __device__ constexpr int exact_ring_warps() { return D >= 256 ? EXACT_RING_WARPS_256 : 1; }

__device__ __forceinline__ float fast_exp2(float x) {
  float y; asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x)); return y;
}
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], const void* smem) {
  unsigned s = (unsigned)__cvta_generic_to_shared(smem);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], const void* smem) {
  unsigned s = (unsigned)__cvta_generic_to_shared(smem);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}

// Tensor-core A fragment k-step ks of the (up to 16) query heads of a group, for this lane: rows
// are heads (zero past G), columns head dimensions. `src` is the group's first query row.
template <typename T, int D>
__device__ __forceinline__ uint4 query_fragment(const T* src, int G, int ks, int lane) {
  const int g = lane >> 2, c = ks * 16 + (lane & 3) * 2;
  auto pair = [&](int h, int col) -> u32 {
    if (h >= G) return 0u;
    return (u32)src[h * D + col].x | ((u32)src[h * D + col + 1].x << 16);
  };
  return make_uint4(pair(g, c), pair(g + 8, c), pair(g, c + 8), pair(g + 8, c + 8));
}

// The pipelines look a step's row offsets up one step ahead (a paged cache's cost a page-table
// load before the copies can issue): lane l holds the offset of row pos0 + l % ROWS (-1: past
// `end` or on an out-of-range page), and the copies take it by a shuffle.
template <int D, int ROWS>
__device__ __forceinline__ long long rows_ahead(const Cache& cache, int b, int kvh, int pos0, int end) {
  const int pos = pos0 + (threadIdx.x & (ROWS - 1));
  return pos < end ? cache.row(b, pos, kvh, D) : -1;
}

// The warp copies its part (of PARTS) of 16 rows of one KV head from `a` into the chunk at shared
// address sa (and from `b_src` into sb when OPS == 2); `ahead` holds the rows' offsets from lane
// `first` on. Rows that are not real read nothing and are zero-filled. Each copy instruction moves
// 128 bytes (8 lanes) of each of 4 rows (H200: 2% faster than 256 bytes of each of 2 rows).
template <typename T, int D, int OPS, int PARTS = 1>
__device__ __forceinline__ void issue_chunk(u32 sa, const T* a, u32 sb, const T* b_src, long long ahead, int first,
                                            int part) {
  typedef Chunk<T, D> C;
  constexpr int PPR = C::NCH / 8;                 // copies per row
  constexpr int RPL = C::COPIES / PARTS / PPR;    // rows per lane
  static_assert(C::COPIES % (PARTS * PPR) == 0, "whole rows per part");
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < RPL; ++j) {
    const int r = 4 * (part * RPL + j) + (lane >> 3);
    const long long off = __shfl_sync(0xffffffffu, ahead, first + r);
    const long long src = (off >= 0 ? off : 0) + (lane & 7) * (16 / (int)sizeof(T));
    const u32 dst = C::at(r, lane & 7);           // piece 8 p + lane % 8 sits 128 p bytes further
#pragma unroll
    for (int p = 0; p < PPR; ++p) {
      cp_async16(sa + dst + 128 * p, a + src + p * (128 / (int)sizeof(T)), off >= 0);
      if constexpr (OPS == 2) cp_async16(sb + dst + 128 * p, b_src + src + p * (128 / (int)sizeof(T)), off >= 0);
    }
  }
}

// A warp's ring of NS stages, each a step of SC chunks of K (and then SC of V when OPS == 2): the
// step's copies, their row offsets one step ahead, and the masks of real rows (bit r: row r of
// the step). `pos(i)` is the first row of the warp's step i. When step i lands, the stage of step
// i - 1 is refilled before step i's body: NS - 1 steps are in flight while the warp waits.
// PW warps (consecutive) may share a ring: each copies 1 / PW of every step, and they wait for
// each other on named barrier `bar_id` (1-15) where a lone warp needs only a warp barrier.
template <typename T, int D, int NS, int SC, int OPS, int PW = 1>
struct WarpRing {
  typedef Chunk<T, D> C;
  static constexpr int STEP_ROWS = SC * CHUNK_ROWS;
  static constexpr int STAGE_BYTES = OPS * SC * C::BYTES;
  static_assert(STEP_ROWS <= 32, "a step's rows are looked up one per lane");
  char* ring;
  u32* mask_sm;             // NS entries of this ring
  int bar_id;               // PW > 1 only
  long long ahead;
  __device__ __forceinline__ const char* stage(int i) const { return ring + (i % NS) * STAGE_BYTES; }
  __device__ __forceinline__ u32 mask(int i) const { return mask_sm[i % NS]; }
  __device__ __forceinline__ void sync() const {
    if constexpr (PW == 1) __syncwarp();
    else asm volatile("bar.sync %0, %1;" :: "r"(bar_id), "n"(32 * PW) : "memory");
  }

  // Runs the warp's `steps` steps: body(i, stage, mask) once step i has landed.
  template <class Pos, class Body>
  __device__ __forceinline__ void run(const T* k, const T* v, const Cache& cache, int b, int kvh, int end,
                                      int steps, Pos pos, Body body) {
    ahead = rows_ahead<D, STEP_ROWS>(cache, b, kvh, pos(0), end);
    const int part = (threadIdx.x >> 5) % PW;
    const u32 base = (u32)__cvta_generic_to_shared(ring);
    auto issue = [&](int i) {
      const u32 st = base + (i % NS) * STAGE_BYTES;
      // every warp of the ring finds the same mask; the first one stores it
      const u32 m = __ballot_sync(0xffffffffu, ahead >= 0) & (0xffffffffu >> (32 - STEP_ROWS));
#pragma unroll
      for (int c = 0; c < SC; ++c)
        issue_chunk<T, D, OPS, PW>(st + c * C::BYTES, k, st + (SC + c) * C::BYTES, v, ahead, c * CHUNK_ROWS, part);
      ahead = rows_ahead<D, STEP_ROWS>(cache, b, kvh, pos(i + 1), end);
      if ((threadIdx.x & 31) == 0 && part == 0) mask_sm[i % NS] = m;
    };
#pragma unroll
    for (int i = 0; i < NS - 1; ++i) {
      if (i < steps) issue(i);
      cp_async_commit();
    }
    for (int i = 0; i < steps; ++i) {
      cp_async_wait<NS - 2>();
      sync();                               // step i has landed (and the stage of step i - 1 is free)
      if (i + NS - 1 < steps) issue(i + NS - 1);
      cp_async_commit();
      body(i, stage(i), mask(i));
    }
    cp_async_wait<0>();
  }
};

// Raw dot products of the 16 rows of a K stage with the query heads: c[nt] is the 16 x 8 tile of
// heads x rows [8 nt, 8 nt + 8) in the mma accumulator layout.
template <typename T, int D>
__device__ __forceinline__ void chunk_dots(const char* kst, const uint4 (&qf)[D / 16], float (&c)[2][4]) {
  typedef Chunk<T, D> C;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.f;
  // ldmatrix x4: rows 0-7 and 8-15, each at dims [16 ks, 16 ks + 8) and [16 ks + 8, 16 ks + 16)
  const int row = (lane & 7) + ((lane >> 4) << 3), piece = (lane >> 3) & 1;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    u32 kb[4];
    ldmatrix_x4(kb, kst + C::at(row, 2 * ks + piece));
    mma16816<T>(c[0], qf[ks], kb[0], kb[1]);
    mma16816<T>(c[1], qf[ks], kb[2], kb[3]);
  }
}
