// Decode attention kernels: exact split-KV decode, and SANTA decode in two launches.
//
//   exact_decode    one launch: each block scores and accumulates a split of the sequence for
//                   the whole query group of one KV head; the last block of a (batch, KV head)
//                   merges the splits in a fixed order. 16-bit caches: every warp streams its
//                   own rows and keeps its own softmax (warp_pipe.cuh); float32: block stages.
//   stash_decode    the same p V over scores a SANTA pass 1 left in its stash (bernoulli.cu
//                   writes them from a feature-major cache): exact p V on estimated scores.
//   santa_scores    launch 1: reads every K row once, writes the scores (the stash) and (max, sum)
//                   statistics per tile (per 64-row part of a tile on 16-bit caches); the last
//                   block of a (batch, KV head) turns them into the global CDF's tile offsets
//                   (and, for iid, the sorted draw positions). santa_part_scores: the same with
//                   each part's own CDF in the stash in place of its scores.
//   santa_values    launch 2: a warp per (tile, head) with draws (santa_part_values: per round of
//                   a head's draws, over the CDFs of the parts they land in) finds the rows its
//                   draws land in (the draw ranges come from closed forms: no per-tile budget
//                   rounding) and gathers only those V rows; the last block merges the splits.
//
// No float atomics anywhere: results are bitwise reproducible for the same inputs and seed.
#include "common.cuh"
#include "plan.cuh"
#include "warp_pipe.cuh"

// q (batch, q_heads, D) of one query group, times scale, into shared memory.
template <typename T, int D>
__device__ void load_group_query(const T* q, int b, int kvh, int G, int q_heads, float scale, float* q_sm) {
  const T* src = q + ((long long)b * q_heads + (long long)kvh * G) * D;
  for (int i = threadIdx.x; i < G * D; i += SANTA_THREADS) q_sm[i] = to_float(src[i]) * scale;
}

// Copy rows [pos0, pos0 + R) of one KV head into a shared-memory stage (cp.async, zero-filled
// past `end` or on an out-of-range page); ok_sm[r] says whether row r is real.
template <typename T, int D, int SB>
__device__ __forceinline__ void issue_stage(char* buf, unsigned char* ok_sm, const T* base, const Cache& cache,
                                            int b, int kvh, int pos0, int end) {
  typedef Layout<T, D, SB> L;
#pragma unroll
  for (int i = 0; i < L::CPT; ++i) {
    const int c = threadIdx.x + i * SANTA_THREADS, r = c / L::NCH, ch = c % L::NCH;
    const long long off = pos0 + r < end ? cache.row(b, pos0 + r, kvh, D) : -1;
    cp_async16(buf + L::at(r, ch), off >= 0 ? (const void*)(base + off + ch * L::VEC) : (const void*)base,
               off >= 0);
    if (ok_sm && ch == 0) ok_sm[r] = off >= 0;
  }
}

// Scores of the R rows of a stage for the G heads: s_out[g * stride + r] (-inf for rows that
// are not real). Each lane keeps its chunks of RPT rows in registers and reads q once per head.
template <typename T, int D, int SB>
__device__ __forceinline__ void stage_scores(const char* buf, const unsigned char* ok_sm, const float* q_sm,
                                             float* s_out, int stride, int G) {
  typedef Layout<T, D, SB> L;
  const int lane_in_row = threadIdx.x % L::LPR, slot = threadIdx.x / L::LPR;
  float kf[L::RPT][L::CPL * L::VEC];
#pragma unroll
  for (int j = 0; j < L::RPT; ++j)
#pragma unroll
    for (int c = 0; c < L::CPL; ++c) {
      const int r = slot + j * L::RPP;
      uint4 w = *reinterpret_cast<const uint4*>(buf + L::at(r, lane_in_row + c * L::LPR));
      Vec<T>::unpack(w, kf[j] + c * L::VEC);
    }
  for (int g = 0; g < G; ++g) {
    float acc[L::RPT];
#pragma unroll
    for (int j = 0; j < L::RPT; ++j) acc[j] = 0.f;
#pragma unroll
    for (int c = 0; c < L::CPL; ++c) {
      const float4* qc = reinterpret_cast<const float4*>(q_sm + g * D + (lane_in_row + c * L::LPR) * L::VEC);
#pragma unroll
      for (int i4 = 0; i4 < L::VEC / 4; ++i4) {
        const float4 qq = qc[i4];
#pragma unroll
        for (int j = 0; j < L::RPT; ++j) {
          const float* kk = kf[j] + c * L::VEC + 4 * i4;
          acc[j] = fmaf(qq.x, kk[0], fmaf(qq.y, kk[1], fmaf(qq.z, kk[2], fmaf(qq.w, kk[3], acc[j]))));
        }
      }
    }
#pragma unroll
    for (int j = 0; j < L::RPT; ++j) {
#pragma unroll
      for (int o = L::LPR / 2; o; o >>= 1) acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], o);
      const int r = slot + j * L::RPP;
      if (lane_in_row == 0) s_out[g * stride + r] = ok_sm[r] ? acc[j] : NEG_INF;
    }
  }
}

// (head, 16-byte chunk) items of the value accumulation, spread over the block; when there
// are fewer items than threads, `phases` threads share an item and split the rows.
template <typename T, int D> struct Items {
  typedef Layout<T, D> L;
  int items, phases, phase;
  __device__ Items(int G) {
    items = G * L::NCH;
    phases = items >= SANTA_THREADS ? 1 : SANTA_THREADS / items;
    phase = items >= SANTA_THREADS ? 0 : threadIdx.x / items;
    if (phase >= phases) phase = -1;
  }
  __device__ __forceinline__ int item(int j) const {
    int it = items >= SANTA_THREADS ? threadIdx.x + j * SANTA_THREADS : (j == 0 ? threadIdx.x % items : items);
    return phase < 0 ? items : it;
  }
  // Sum the phases' accumulators (through red_sm) and write item (g, chunk) to
  // dst[g * head_stride + chunk * VEC ...].
  __device__ void store(float (&acc)[L::IPT][L::VEC], float* red_sm, float* dst, long long head_stride) const {
    reduce(acc, red_sm);
    if (phase != 0) return;
#pragma unroll
    for (int j = 0; j < L::IPT; ++j) {
      const int it = item(j);
      if (it < items) {
        float* o = dst + (it / L::NCH) * head_stride + (it % L::NCH) * L::VEC;
#pragma unroll
        for (int i = 0; i < L::VEC; ++i) o[i] = acc[j][i];
      }
    }
  }
  // Sum the phases' accumulators into the threads of phase 0.
  __device__ void reduce(float (&acc)[L::IPT][L::VEC], float* red_sm) const {
    if (phases > 1) {
      __syncthreads();
      if (phase > 0) {
        int it = item(0);
#pragma unroll
        for (int i = 0; i < L::VEC; ++i) red_sm[(phase * items + it) * L::VEC + i] = acc[0][i];
      }
      __syncthreads();
      if (phase == 0) {
        int it = item(0);
        for (int p = 1; p < phases; ++p)
#pragma unroll
          for (int i = 0; i < L::VEC; ++i) acc[0][i] += red_sm[(p * items + it) * L::VEC + i];
      }
    }
  }
};

#define CACHE_ARGS const int *kv_lens, const int *page_table, int max_pages, int page_size, \
                   int num_pages, int capacity, int kv_heads, int q_heads
#define MAKE_CACHE const Cache cache = make_cache(page_table, max_pages, page_size, num_pages, capacity, kv_heads)

// The sum over a head's splits, in split order, of 4 consecutive floats of their partials
// (p: split 0's, D floats apart), weighted by w[s].y when w is given; U loads in flight.
template <int D, int U>
__device__ __forceinline__ float4 sum_splits4(const float* p, int nsplit, const float2* w) {
  float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int s0 = 0; s0 < nsplit; s0 += U) {
    float4 x[U];
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (s0 + u < nsplit) x[u] = __ldcg(reinterpret_cast<const float4*>(p + (long long)(s0 + u) * D));
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (s0 + u >= nsplit) break;
      if (w) {
        const float ws = w[s0 + u].y;
        o.x = fmaf(ws, x[u].x, o.x); o.y = fmaf(ws, x[u].y, o.y); o.z = fmaf(ws, x[u].z, o.z); o.w = fmaf(ws, x[u].w, o.w);
      } else {
        o.x += x[u].x; o.y += x[u].y; o.z += x[u].z; o.w += x[u].w;
      }
    }
  }
  return o;
}
template <typename T> __device__ __forceinline__ void store4(T* dst, float4 v) {
  dst[0] = from_float<T>(v.x); dst[1] = from_float<T>(v.y); dst[2] = from_float<T>(v.z); dst[3] = from_float<T>(v.w);
}

// The last block of a (batch, KV head): merge the splits' partials (unnormalised output, running
// max and sum) in split order. smem: 8 G nsplit bytes of free shared memory.
template <typename T, int D>
__device__ void merge_exact_splits(long long bh0, int G, int nsplit, const float* part_o, const float* part_ml,
                                   char* smem, T* out, float* lse_out) {
  float2* ml_sm = reinterpret_cast<float2*>(smem);      // (max, sum) per head and split, then (max, weight)
  const float2* ml = reinterpret_cast<const float2*>(part_ml) + bh0 * nsplit;
  for (int i = threadIdx.x; i < G * nsplit; i += blockDim.x) ml_sm[i] = __ldcg(ml + i);
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int g = warp; g < G; g += blockDim.x >> 5) {     // a warp per head: weight exp(m_s - m) / l
    float2* mg = ml_sm + g * nsplit;
    float m = NEG_INF, l = 0.f;
    for (int s = lane; s < nsplit; s += 32) m = fmaxf(m, mg[s].x);
    m = warp_max(m);
    if (m != NEG_INF)
      for (int s = lane; s < nsplit; s += 32) l = fmaf(__expf(mg[s].x - m), mg[s].y, l);
    l = warp_sum(l);
    const float inv_l = l > 0.f ? 1.f / l : 0.f;
    for (int s = lane; s < nsplit; s += 32) mg[s].y = m == NEG_INF ? 0.f : __expf(mg[s].x - m) * inv_l;
    if (lse_out && lane == 0) lse_out[bh0 + g] = l > 0.f ? m + __logf(l) : NEG_INF;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < G * D / 4; i += blockDim.x) {
    const int g = i / (D / 4), d = (i % (D / 4)) * 4;
    store4(out + (bh0 + g) * D + d, sum_splits4<D, 8>(part_o + (bh0 + g) * nsplit * D + d, nsplit, ml_sm + g * nsplit));
  }
}

// ============================================================================ exact decode
// Block pipeline (float32 caches, and the stash path of every type): K and V rows stream through
// EXACT_STAGES shared-memory stages; per stage: scores, an online-softmax update per head, then
// p V accumulated from shared memory (on tensor cores for 16-bit types).
#ifndef EXACT_STAGES              // santa_cupy/_gpu.py mirrors these four
#define EXACT_STAGES 2
#endif
#ifndef EXACT_STAGE_BYTES
#define EXACT_STAGE_BYTES 16384
#endif

// STASH: the scores are not computed from q and K but read from SANTA pass 1's stash (scaled,
// -inf on rows that are not real); the K stages then hold the stash of the stage's rows.
template <typename T, int D, bool STASH>
__device__ __forceinline__ void exact_body(
    const T* q, const T* k, const T* v, CACHE_ARGS, float scale, int rows_per_split, const float* stash,
    int stash_stride, float* part_o, float* part_ml, int* counters, T* out, float* lse_out, u32* offset_advance) {
  typedef Layout<T, D, EXACT_STAGE_BYTES> L;
  static_assert(STASH || sizeof(T) == 4, "16-bit caches score in exact_body_pipelined");
  extern __shared__ __align__(128) char smem_raw[];
  const int G = q_heads / kv_heads, b = blockIdx.z, kvh = blockIdx.y, split = blockIdx.x;
  const int nsplit = gridDim.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  constexpr bool MMA = sizeof(T) == 2;
  char* kbuf = smem_raw;                                             // EXACT_STAGES x STAGE_BYTES
  char* vbuf = kbuf + EXACT_STAGES * L::STAGE_BYTES;                 // EXACT_STAGES x STAGE_BYTES
  float* q_sm = reinterpret_cast<float*>(vbuf + EXACT_STAGES * L::STAGE_BYTES);  // G x D
  float* p_sm = q_sm + G * D;                                        // G x R, later the phase reduction
  __shared__ unsigned char ok_sm[EXACT_STAGES][L::R];
  __shared__ float m_run[SANTA_GMAX], l_run[SANTA_GMAX], alpha[SANTA_GMAX];
  __shared__ int flag;
  MAKE_CACHE;
  const int len = clamp_len(kv_lens, b, capacity);
  const int start = min(len, split * rows_per_split);
  const int end = min(len, start + rows_per_split);
  const int nst = (end - start + L::R - 1) / L::R;
  const long long bh0 = (long long)b * q_heads + (long long)kvh * G;
  if constexpr (STASH) {
    if (offset_advance && blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0 && threadIdx.x == 0)
      atomicAdd(offset_advance, 1u);
  } else {
    load_group_query<T, D>(q, b, kvh, G, q_heads, scale, q_sm);
  }
  if (threadIdx.x < G) { m_run[threadIdx.x] = NEG_INF; l_run[threadIdx.x] = 0.f; }
  Items<T, D> it(G);
  float acc[L::IPT][L::VEC];                 // CUDA-core path: (head, chunk) items
#pragma unroll
  for (int j = 0; j < L::IPT; ++j)
#pragma unroll
    for (int i = 0; i < L::VEC; ++i) acc[j][i] = 0.f;
  constexpr int NDT = D / 64;                // tensor-core path: 8-dim n-tiles per warp
  const int grp = lane >> 2, tig = lane & 3;
  float pacc[NDT][4];
#pragma unroll
  for (int j = 0; j < NDT; ++j) pacc[j][0] = pacc[j][1] = pacc[j][2] = pacc[j][3] = 0.f;

  auto issue = [&](int s) {                  // stage s: its K rows (or stash) and V rows
    char* kb = kbuf + (s % EXACT_STAGES) * L::STAGE_BYTES;
    unsigned char* ok = ok_sm[s % EXACT_STAGES];
    const int pos0 = start + s * L::R;
    if constexpr (STASH) {
      float* sb = reinterpret_cast<float*>(kb);                       // G x R scores
      for (int c = threadIdx.x; c < G * (L::R / 4); c += SANTA_THREADS) {
        const int g = c / (L::R / 4), r4 = (c % (L::R / 4)) * 4;
        cp_async16(sb + g * L::R + r4, stash + (bh0 + g) * stash_stride + pos0 + r4, pos0 + r4 < end);
      }
      issue_stage<T, D, EXACT_STAGE_BYTES>(vbuf + (s % EXACT_STAGES) * L::STAGE_BYTES, ok, v, cache, b, kvh, pos0, end);
    } else {
      issue_stage<T, D, EXACT_STAGE_BYTES>(kb, ok, k, cache, b, kvh, pos0, end);
      issue_stage<T, D, EXACT_STAGE_BYTES>(vbuf + (s % EXACT_STAGES) * L::STAGE_BYTES, nullptr, v, cache, b, kvh, pos0, end);
    }
  };
#pragma unroll
  for (int s = 0; s < EXACT_STAGES - 1; ++s) {
    if (s < nst) issue(s);
    cp_async_commit();
  }
  for (int s = 0; s < nst; ++s) {
    cp_async_wait<EXACT_STAGES - 2>();
    __syncthreads();
    if (s + EXACT_STAGES - 1 < nst) issue(s + EXACT_STAGES - 1);
    cp_async_commit();
    const int cur = s % EXACT_STAGES;
    if constexpr (STASH) {
      const float* sb = reinterpret_cast<const float*>(kbuf + cur * L::STAGE_BYTES);
      for (int i = threadIdx.x; i < G * L::R; i += SANTA_THREADS) p_sm[i] = ok_sm[cur][i % L::R] ? sb[i] : NEG_INF;
    } else {
      stage_scores<T, D, EXACT_STAGE_BYTES>(kbuf + cur * L::STAGE_BYTES, ok_sm[cur], q_sm, p_sm, L::R, G);
    }
    __syncthreads();
    for (int g = warp; g < G; g += SANTA_THREADS / 32) {   // online softmax, one warp per head
      float* pg = p_sm + g * L::R;
      const float mold = m_run[g], lold = l_run[g];
      float mt = NEG_INF;
      for (int r = lane; r < L::R; r += 32) mt = fmaxf(mt, pg[r]);
      mt = warp_max(mt);
      const float mnew = fmaxf(mold, mt);
      const float a = mnew == NEG_INF ? 1.f : __expf(mold - mnew);
      float sum = 0.f;
      for (int r = lane; r < L::R; r += 32) {
        const float p = mnew == NEG_INF ? 0.f : __expf(pg[r] - mnew);
        pg[r] = p;
        sum += p;
      }
      sum = warp_sum(sum);
      __syncwarp();                            // every lane has read m_run and l_run
      if (lane == 0) { l_run[g] = lold * a + sum; m_run[g] = mnew; alpha[g] = a; }
    }
    __syncthreads();
    const char* vb = vbuf + cur * L::STAGE_BYTES;
    if constexpr (MMA) {                       // p V on tensor cores: heads x tokens times tokens x dims
      const float a_lo = grp < G ? alpha[grp] : 1.f, a_hi = grp + 8 < G ? alpha[grp + 8] : 1.f;
#pragma unroll
      for (int j = 0; j < NDT; ++j) { pacc[j][0] *= a_lo; pacc[j][1] *= a_lo; pacc[j][2] *= a_hi; pacc[j][3] *= a_hi; }
      auto P = [&](int h, int k) { return h < G ? p_sm[h * L::R + k] : 0.f; };
#pragma unroll
      for (int ks = 0; ks < L::R / 16; ++ks) {
        const int k0 = ks * 16 + tig * 2;
        const uint4 a = make_uint4(pack2<T>(P(grp, k0), P(grp, k0 + 1)), pack2<T>(P(grp + 8, k0), P(grp + 8, k0 + 1)),
                                   pack2<T>(P(grp, k0 + 8), P(grp, k0 + 9)), pack2<T>(P(grp + 8, k0 + 8), P(grp + 8, k0 + 9)));
#pragma unroll
        for (int j = 0; j < NDT; ++j) {
          u32 b0, b1;
          ldmatrix_x2_trans(b0, b1, vb + L::at(ks * 16 + (lane & 15), warp + j * 8));
          mma16816<T>(pacc[j], a, b0, b1);
        }
      }
    } else if (it.phase >= 0) {
#pragma unroll
      for (int j = 0; j < L::IPT; ++j) {
        const int item = it.item(j);
        if (item < it.items) {
          const int g = item / L::NCH, ch = item % L::NCH;
          const float a = alpha[g];
#pragma unroll
          for (int i = 0; i < L::VEC; ++i) acc[j][i] *= a;
          for (int r = it.phase; r < L::R; r += it.phases) {
            const float p = p_sm[g * L::R + r];
            float f[L::VEC];
            Vec<T>::unpack(*reinterpret_cast<const uint4*>(vb + L::at(r, ch)), f);
#pragma unroll
            for (int i = 0; i < L::VEC; ++i) acc[j][i] = fmaf(p, f[i], acc[j][i]);
          }
        }
      }
    }
  }
  cp_async_wait<0>();

  // partial (unnormalised output, running max and sum) of this split
  if constexpr (MMA) {
#pragma unroll
    for (int j = 0; j < NDT; ++j) {
      const int d = (warp + j * 8) * 8 + tig * 2;
      if (grp < G) {
        float* dst = part_o + ((bh0 + grp) * nsplit + split) * D + d;
        dst[0] = pacc[j][0]; dst[1] = pacc[j][1];
      }
      if (grp + 8 < G) {
        float* dst = part_o + ((bh0 + grp + 8) * nsplit + split) * D + d;
        dst[0] = pacc[j][2]; dst[1] = pacc[j][3];
      }
    }
  } else {
    it.store(acc, p_sm, part_o + (bh0 * nsplit + split) * D, (long long)nsplit * D);
  }
  if (threadIdx.x < G) {
    part_ml[((bh0 + threadIdx.x) * nsplit + split) * 2] = m_run[threadIdx.x];
    part_ml[((bh0 + threadIdx.x) * nsplit + split) * 2 + 1] = l_run[threadIdx.x];
  }
  if (last_block_done(counters, b * kv_heads + kvh, nsplit, &flag))
    merge_exact_splits<T, D>(bh0, G, nsplit, part_o, part_ml, smem_raw, out, lse_out);
}

// Exact decode of a 16-bit cache (FlashDecoding): each warp keeps its own online softmax over
// its own chunks of the block's split (chunks warp, warp + W, ...), in log2 units. The
// scores never leave registers: the two 16 x 8 score tiles of a chunk are, rounded to T, the A
// fragment of p V. The block merges its warps, then the last block merges the splits.
template <typename T, int D>
__device__ __forceinline__ void exact_body_pipelined(
    const T* q, const T* k, const T* v, CACHE_ARGS, float scale, int rows_per_split,
    float* part_o, float* part_ml, int* counters, T* out, float* lse_out) {
  typedef Chunk<T, D> C;
  constexpr int PW = exact_ring_warps<D>(), NS = EXACT_PIPE_STAGES;
  const int R = blockDim.x / (32 * PW);                     // rings: at most exact_pipe_rings<D>()
  constexpr int DW = D / PW;                                // p V dimensions of each warp of a ring
  extern __shared__ __align__(128) char smem_raw[];
  __shared__ u32 mask_sm[exact_pipe_rings<D>()][NS];
  __shared__ int flag;
  const int G = q_heads / kv_heads, b = blockIdx.z, kvh = blockIdx.y, split = blockIdx.x;
  const int nsplit = gridDim.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, grp = lane >> 2, tig = lane & 3;
  MAKE_CACHE;
  const int len = clamp_len(kv_lens, b, capacity);
  const int start = min(len, split * rows_per_split);
  const int end = min(len, start + rows_per_split);
  const int chunks = (end - start + CHUNK_ROWS - 1) / CHUNK_ROWS;
  const int rg = warp / PW, half = warp % PW;               // the warp's ring, its share of p V
  const int mine = chunks > rg ? (chunks - rg + R - 1) / R : 0;
  const long long bh0 = (long long)b * q_heads + (long long)kvh * G;
  uint4 qf[D / 16];
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) qf[ks] = query_fragment<T, D>(q + bh0 * D, G, ks, lane);
  const float scale2 = scale * LOG2E;
  float o[DW / 8][4];                                       // dims [half DW, half DW + DW)
#pragma unroll
  for (int j = 0; j < DW / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m_lo = NEG_INF, m_hi = NEG_INF, l_lo = 0.f, l_hi = 0.f;   // heads grp and grp + 8; l per lane

  // NS stages of (K, V)
  WarpRing<T, D, NS, 1, 2, PW> ring{smem_raw + rg * NS * 2 * C::BYTES, mask_sm[rg], 1 + rg};
  // the ring's i-th chunk: chunk rg + i R of the split (the warps of a ring score it alike)
  ring.run(k, v, cache, b, kvh, end, mine, [&](int i) { return start + (rg + i * R) * CHUNK_ROWS; },
           [&](int, const char* kst, u32 mask) {
    float c[2][4];
    chunk_dots<T, D>(kst, qf, c);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) c[nt][e] = (mask >> (nt * 8 + tig * 2 + (e & 1))) & 1u ? c[nt][e] * scale2 : NEG_INF;
    const float mn_lo = fmaxf(m_lo, quad_max(fmaxf(fmaxf(c[0][0], c[0][1]), fmaxf(c[1][0], c[1][1]))));
    const float mn_hi = fmaxf(m_hi, quad_max(fmaxf(fmaxf(c[0][2], c[0][3]), fmaxf(c[1][2], c[1][3]))));
    const float ref_lo = mn_lo == NEG_INF ? 0.f : mn_lo, ref_hi = mn_hi == NEG_INF ? 0.f : mn_hi;
    const float a_lo = fast_exp2(m_lo - ref_lo), a_hi = fast_exp2(m_hi - ref_hi);
    m_lo = mn_lo; m_hi = mn_hi;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      c[nt][0] = fast_exp2(c[nt][0] - ref_lo); c[nt][1] = fast_exp2(c[nt][1] - ref_lo);
      c[nt][2] = fast_exp2(c[nt][2] - ref_hi); c[nt][3] = fast_exp2(c[nt][3] - ref_hi);
    }
    l_lo = l_lo * a_lo + (c[0][0] + c[0][1]) + (c[1][0] + c[1][1]);
    l_hi = l_hi * a_hi + (c[0][2] + c[0][3]) + (c[1][2] + c[1][3]);
    const uint4 pa = make_uint4(pack2<T>(c[0][0], c[0][1]), pack2<T>(c[0][2], c[0][3]),
                                pack2<T>(c[1][0], c[1][1]), pack2<T>(c[1][2], c[1][3]));
    // the accumulators are rescaled only when a maximum moved (rare after the first chunks; a
    // factor of exactly 1 changes nothing)
    if (__any_sync(0xffffffffu, a_lo != 1.f || a_hi != 1.f)) {
#pragma unroll
      for (int j = 0; j < DW / 8; ++j) { o[j][0] *= a_lo; o[j][1] *= a_lo; o[j][2] *= a_hi; o[j][3] *= a_hi; }
    }
    // p V: ldmatrix x4 (transposed) gives the B fragments of dims [8 j, 8 j + 16) over the 16 rows
    const int vpiece = (lane >> 4) + half * DW * (int)sizeof(T) / 16;
#pragma unroll
    for (int j = 0; j < DW / 8; j += 2) {
      u32 vb[4];
      ldmatrix_x4_trans(vb, kst + C::BYTES + C::at(lane & 15, vpiece + j));
      mma16816<T>(o[j], pa, vb[0], vb[1]);
      mma16816<T>(o[j + 1], pa, vb[2], vb[3]);
    }
  });
  l_lo = quad_sum(l_lo); l_hi = quad_sum(l_hi);

  // the block's partial: rings merged in a fixed order (the rings' stages are free now)
  __syncthreads();
  float* wo = reinterpret_cast<float*>(smem_raw);                    // R x G x D
  float* wm = wo + R * G * D;                                        // R x G
  float* wl = wm + R * G;
#pragma unroll
  for (int j = 0; j < DW / 8; ++j) {
    const int d = half * DW + j * 8 + tig * 2;
    if (grp < G) { wo[(rg * G + grp) * D + d] = o[j][0]; wo[(rg * G + grp) * D + d + 1] = o[j][1]; }
    if (grp + 8 < G) { wo[(rg * G + grp + 8) * D + d] = o[j][2]; wo[(rg * G + grp + 8) * D + d + 1] = o[j][3]; }
  }
  if (half == 0 && tig == 0 && grp < G) { wm[rg * G + grp] = m_lo; wl[rg * G + grp] = l_lo; }
  if (half == 0 && tig == 0 && grp + 8 < G) { wm[rg * G + grp + 8] = m_hi; wl[rg * G + grp + 8] = l_hi; }
  __syncthreads();
  for (int i = threadIdx.x; i < G * (D + 1); i += blockDim.x) {
    const int g = i / (D + 1), d = i % (D + 1);               // d == D: the (max, sum) pair
    float mx = NEG_INF;
#pragma unroll
    for (int w = 0; w < R; ++w) mx = fmaxf(mx, wm[w * G + g]);
    const float ref = mx == NEG_INF ? 0.f : mx;
    float acc = 0.f;
#pragma unroll
    for (int w = 0; w < R; ++w)
      acc += fast_exp2(wm[w * G + g] - ref) * (d < D ? wo[(w * G + g) * D + d] : wl[w * G + g]);
    if (d < D) {
      part_o[((bh0 + g) * nsplit + split) * D + d] = acc;
    } else {
      part_ml[((bh0 + g) * nsplit + split) * 2] = mx * LN2;            // natural-log units from here on
      part_ml[((bh0 + g) * nsplit + split) * 2 + 1] = acc;
    }
  }
  if (last_block_done(counters, b * kv_heads + kvh, nsplit, &flag))
    merge_exact_splits<T, D>(bh0, G, nsplit, part_o, part_ml, smem_raw, out, lse_out);
}

// 16-bit caches run the per-warp pipelines (up to exact_pipe_rings x exact_ring_warps warps per
// block, any rows_per_split), float32 the block pipeline (SANTA_THREADS per block, rows_per_split a
// multiple of the stage rows).
template <typename T, int D>
__global__ void __launch_bounds__(SANTA_THREADS) exact_decode(
    const T* q, const T* k, const T* v, CACHE_ARGS, float scale, int rows_per_split,
    float* part_o, float* part_ml, int* counters, T* out, float* lse_out) {
  if constexpr (sizeof(T) == 2)
    exact_body_pipelined<T, D>(q, k, v, kv_lens, page_table, max_pages, page_size, num_pages, capacity, kv_heads,
                               q_heads, scale, rows_per_split, part_o, part_ml, counters, out, lse_out);
  else
    exact_body<T, D, false>(q, k, v, kv_lens, page_table, max_pages, page_size, num_pages, capacity, kv_heads,
                            q_heads, scale, rows_per_split, nullptr, 0, part_o, part_ml, counters, out, lse_out,
                            nullptr);
}

// Exact p V over the scores a SANTA pass 1 left in the stash (ternary-query scores, or a
// feature-major cache's exact scores).
template <typename T, int D>
__global__ void __launch_bounds__(SANTA_THREADS) stash_decode(
    const T* v, CACHE_ARGS, int rows_per_split, const float* stash, int stash_stride,
    float* part_o, float* part_ml, int* counters, T* out, float* lse_out, u32* offset_advance) {
  wait_for_previous_kernel();      // the stash of key_scores
  exact_body<T, D, true>(nullptr, nullptr, v, kv_lens, page_table, max_pages, page_size, num_pages, capacity,
                         kv_heads, q_heads, 1.f, rows_per_split, stash, stash_stride, part_o, part_ml, counters,
                         out, lse_out, offset_advance);
}

// ============================================================================ SANTA pass 1
#ifndef SCORE_STAGES
#define SCORE_STAGES 4
#endif
#ifndef SCORE_STAGE_BYTES
#define SCORE_STAGE_BYTES 8192
#endif

// Pass 1 on a 16-bit cache: each warp scores 64-row parts of the block's split (parts warp,
// warp + W, ...) one ring stage (SCORE_PIPE_CHUNKS chunks of 16 rows) at a time, stores the
// scores straight from the mma accumulators and keeps each head's online (max, sum) per lane; at
// a part's end the quad merges them into the part's statistics (STAT_PARTS per tile: whole tiles
// per warp would balance poorly).
// CDF (for santa_part_values): the stash holds each part's own CDF instead of the scores: per
// head and row, the sum of exp(s - m) over the part's rows up to it (m: the part's maximum, its
// statistic; the last row's sum is the other). A warp holds a part's scores in registers until
// its last step, when the maximum is known, so pass 2 scans nothing.
template <typename T, int D, bool CDF>
__device__ __forceinline__ void scores_body_pipelined(
    const T* q, const T* k, CACHE_ARGS, float scale, int rows_per_split, int tiles_max, int stash_stride,
    float* stash, float* stat_m, float* stat_l, int* counters,
    int scheme, int S, const u64* keys, u64 key, int seq_per_batch, const u32* offset_ptr, u32 offset,
    float* plan_M, double* plan_Z, double* plan_P, double* plan_pos, u32* plan_off, int* ready,
    int tail_units, int* queue) {
  typedef Chunk<T, D> C;
  constexpr int W = SCORE_PIPE_WARPS, NS = SCORE_PIPE_STAGES, SC = SCORE_PIPE_CHUNKS;
  constexpr int PART = SANTA_TILE / STAT_PARTS, SPP = PART / (SC * CHUNK_ROWS);   // rows, steps per part
  constexpr int UNIT = W * PART;                                                   // rows of a tail unit
  extern __shared__ __align__(128) char smem_raw[];
  __shared__ u32 mask_sm[W][NS];
  __shared__ int flag;
  const int nsplit = gridDim.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, grp = lane >> 2, tig = lane & 3;
  const int G = q_heads / kv_heads;
  MAKE_CACHE;
  // Work units: first the block's own split but its last tail_units units of UNIT rows, then
  // (tail_units > 0) any pair's tail units from a queue shared by all blocks, so that blocks
  // that stream fast take the work of slow ones. A pair's plan follows its last unit.
  const int static_rows = rows_per_split - tail_units * UNIT;
  const int units_total = nsplit * kv_heads * gridDim.z * tail_units, arrivals = nsplit * (1 + tail_units);
  // queue[0]: the next ticket; queue[1]: blocks that have left, the last of which (no block
  // draws again) resets the queue for the next call
  auto leave = [&]() {
    if (tail_units > 0 && threadIdx.x == 0 && last_arrival(queue + 1, (int)(gridDim.x * gridDim.y * gridDim.z)))
      *queue = 0;
  };
  int b = blockIdx.z, kvh = blockIdx.y, first = blockIdx.x * rows_per_split, rows = static_rows;
  int len;
#pragma unroll 1
  for (;;) {
  len = clamp_len(kv_lens, b, capacity);
  const int start = min(len, first), end = min(len, first + rows);
  const int parts = (end - start + PART - 1) / PART;
  const int mine = (parts > warp ? (parts - warp + W - 1) / W : 0) * SPP;   // steps
  const long long bh0 = (long long)b * q_heads + (long long)kvh * G;
  const long long stat_stride = (long long)tiles_max * STAT_PARTS;
  uint4 qf[D / 16];
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) qf[ks] = query_fragment<T, D>(q + bh0 * D, G, ks, lane);
  float m_lo = NEG_INF, m_hi = NEG_INF, l_lo = 0.f, l_hi = 0.f;   // heads grp and grp + 8, this lane's rows

  WarpRing<T, D, NS, SC, 1> ring{smem_raw + warp * NS * SC * C::BYTES, mask_sm[warp]};
  // the warp's i-th step: step i % SPP of part warp + (i / SPP) W of the split
  auto step_pos = [&](int i) { return start + (warp + (i / SPP) * W) * PART + (i % SPP) * SC * CHUNK_ROWS; };
  if constexpr (CDF) {
    // the part's earlier steps: scores of head grp (e 0, 1) and grp + 8 (e 2, 3)
    float held[SPP > 1 ? SPP - 1 : 1][SC][2][4];
    ring.run(k, (const T*)nullptr, cache, b, kvh, end, mine, step_pos, [&](int i, const char* st, u32 mask) {
      float c[SC][2][4];
#pragma unroll
      for (int j = 0; j < SC; ++j) chunk_dots<T, D>(st + j * C::BYTES, qf, c[j]);
#pragma unroll
      for (int j = 0; j < SC; ++j)
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            c[j][nt][e] = (mask >> (j * CHUNK_ROWS + nt * 8 + tig * 2 + (e & 1))) & 1u ? c[j][nt][e] * scale : NEG_INF;
      if (i % SPP != SPP - 1) {
#pragma unroll
        for (int s = 0; s < SPP - 1; ++s)
#pragma unroll
          for (int j = 0; j < SC; ++j)
#pragma unroll
            for (int nt = 0; nt < 2; ++nt)
#pragma unroll
              for (int e = 0; e < 4; ++e) held[s][j][nt][e] = s + 2 < SPP ? held[s + 1][j][nt][e] : c[j][nt][e];
        return;
      }
      const int pos0 = step_pos(i) - (SPP - 1) * SC * CHUNK_ROWS;      // the part's first row
      const long long part = pos0 / PART;
      // head h's part CDF: score (s, j, nt, e) is row s SC 16 + j 16 + nt 8 + 2 tig + e; each 8 rows'
      // sums come from a quad scan, their totals carried in order
      auto part_cdf = [&](int hi, int h) {
        auto score = [&](int s, int j, int nt, int e) {
          return s < SPP - 1 ? held[s][j][nt][2 * hi + e] : c[j][nt][2 * hi + e];
        };
        float mx = NEG_INF;
#pragma unroll
        for (int s = 0; s < SPP; ++s)
#pragma unroll
          for (int j = 0; j < SC; ++j)
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) mx = fmaxf(mx, fmaxf(score(s, j, nt, 0), score(s, j, nt, 1)));
        mx = quad_max(mx);
        const float ref = mx == NEG_INF ? 0.f : mx;
        float run = 0.f;
        float* dst = stash + (bh0 + h) * stash_stride + pos0 + tig * 2;
#pragma unroll
        for (int s = 0; s < SPP; ++s)
#pragma unroll
          for (int j = 0; j < SC; ++j)
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
              const float a = __expf(score(s, j, nt, 0) - ref), two = a + __expf(score(s, j, nt, 1) - ref);
              float x = two, y = __shfl_up_sync(0xffffffffu, x, 1, 4);
              if (tig >= 1) x += y;
              y = __shfl_up_sync(0xffffffffu, x, 2, 4);
              if (tig >= 2) x += y;
              if (h < G)
                *reinterpret_cast<float2*>(dst + (s * SC + j) * CHUNK_ROWS + nt * 8) =
                    make_float2(run + (x - two) + a, run + x);
              run += __shfl_sync(0xffffffffu, x, 3, 4);
            }
        if (tig == 0 && h < G) {
          stat_m[(bh0 + h) * stat_stride + part] = mx;
          stat_l[(bh0 + h) * stat_stride + part] = run;
        }
      };
      part_cdf(0, grp);
      if (G > 8) part_cdf(1, grp + 8);
    });
  } else {
    ring.run(k, (const T*)nullptr, cache, b, kvh, end, mine, step_pos, [&](int i, const char* st, u32 mask) {
      float c[SC][2][4];
#pragma unroll
      for (int j = 0; j < SC; ++j) chunk_dots<T, D>(st + j * C::BYTES, qf, c[j]);
      const int pos0 = step_pos(i);
      float mx_lo = m_lo, mx_hi = m_hi;
#pragma unroll
      for (int j = 0; j < SC; ++j)
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e)
            c[j][nt][e] = (mask >> (j * CHUNK_ROWS + nt * 8 + tig * 2 + (e & 1))) & 1u ? c[j][nt][e] * scale : NEG_INF;
          float* dst = stash + (bh0 + grp) * stash_stride + pos0 + j * CHUNK_ROWS + nt * 8 + tig * 2;
          if (grp < G) *reinterpret_cast<float2*>(dst) = make_float2(c[j][nt][0], c[j][nt][1]);
          if (grp + 8 < G) *reinterpret_cast<float2*>(dst + 8 * (long long)stash_stride) = make_float2(c[j][nt][2], c[j][nt][3]);
          mx_lo = fmaxf(mx_lo, fmaxf(c[j][nt][0], c[j][nt][1]));
          mx_hi = fmaxf(mx_hi, fmaxf(c[j][nt][2], c[j][nt][3]));
        }
      const float ref_lo = mx_lo == NEG_INF ? 0.f : mx_lo;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < SC; ++j)
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) sum += __expf(c[j][nt][0] - ref_lo) + __expf(c[j][nt][1] - ref_lo);
      l_lo = l_lo * __expf(m_lo - ref_lo) + sum;
      m_lo = mx_lo;
      if (G > 8) {                                // heads 8-15 of the mma tile exist
        const float ref_hi = mx_hi == NEG_INF ? 0.f : mx_hi;
        sum = 0.f;
#pragma unroll
        for (int j = 0; j < SC; ++j)
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) sum += __expf(c[j][nt][2] - ref_hi) + __expf(c[j][nt][3] - ref_hi);
        l_hi = l_hi * __expf(m_hi - ref_hi) + sum;
        m_hi = mx_hi;
      }
      if (i % SPP != SPP - 1) return;
      // the part is complete: merge the quad's (max, sum) per head
      const long long part = (pos0 - (SPP - 1) * SC * CHUNK_ROWS) / PART;
      const float q_lo = quad_max(m_lo), q_hi = quad_max(m_hi);
      const float s_lo = quad_sum(q_lo == NEG_INF ? 0.f : l_lo * __expf(m_lo - q_lo));
      const float s_hi = quad_sum(q_hi == NEG_INF ? 0.f : l_hi * __expf(m_hi - q_hi));
      if (tig == 0 && grp < G) { stat_m[(bh0 + grp) * stat_stride + part] = q_lo; stat_l[(bh0 + grp) * stat_stride + part] = s_lo; }
      if (tig == 0 && grp + 8 < G) {
        stat_m[(bh0 + grp + 8) * stat_stride + part] = q_hi; stat_l[(bh0 + grp + 8) * stat_stride + part] = s_hi;
      }
      m_lo = m_hi = NEG_INF; l_lo = l_hi = 0.f;
    });
  }
  // The block that finishes a pair's last unit builds its plan and leaves (a call inside the loop
  // would make the compiler keep the loop's values across it: spills); the others take the next
  // unit from the queue.
  if (last_block_done(counters, b * kv_heads + kvh, arrivals, &flag)) break;
  if (tail_units == 0) return;
  __shared__ int ticket_sm;
  if (threadIdx.x == 0) ticket_sm = atomicAdd(queue, 1);
  __syncthreads();
  const int t = ticket_sm;
  if (t >= units_total) {
    leave();
    return;
  }
  // ticket order: KV heads fastest (they share the rows' memory), then units, splits, sequences
  kvh = t % kv_heads;
  const int u = (t / kv_heads) % tail_units, s = (t / (kv_heads * tail_units)) % nsplit;
  b = t / (kv_heads * tail_units * nsplit);
  first = s * rows_per_split + static_rows + u * UNIT;
  rows = UNIT;
  }
  leave();
  build_plan<STAT_PARTS>(b, kvh, (long long)b * q_heads + (long long)kvh * G, G, len, tiles_max, stat_m, stat_l,
                         scheme, S, Stream{keys, key, seq_per_batch, offset_ptr, offset}, plan_M, plan_Z, plan_P,
                         plan_pos, plan_off, ready ? ready + b * kv_heads + kvh : nullptr);
}

// Pass 1 on a float32 cache: block-wide stages, scores on CUDA cores through shared memory.
template <typename T, int D>
__device__ __forceinline__ void scores_body(
    const T* q, const T* k, CACHE_ARGS, float scale, int rows_per_split, int tiles_max, int stash_stride,
    float* stash, float* stat_m, float* stat_l, int* counters,
    int scheme, int S, const u64* keys, u64 key, int seq_per_batch, const u32* offset_ptr, u32 offset,
    float* plan_M, double* plan_Z, double* plan_P, double* plan_pos, u32* plan_off, int* ready, int, int*) {
  typedef Layout<T, D, SCORE_STAGE_BYTES> L;
  extern __shared__ __align__(128) char smem_raw[];
  const int G = q_heads / kv_heads, b = blockIdx.z, kvh = blockIdx.y, split = blockIdx.x;
  const int nsplit = gridDim.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  char* kbuf = smem_raw;                                                          // SCORE_STAGES x STAGE_BYTES
  float* q_sm = reinterpret_cast<float*>(kbuf + SCORE_STAGES * L::STAGE_BYTES);   // G x D
  float* s_sm = q_sm + G * D;                                                     // G x TILE
  __shared__ unsigned char ok_sm[SCORE_STAGES][L::R];
  __shared__ int flag;
  MAKE_CACHE;
  const int len = clamp_len(kv_lens, b, capacity);
  const int start = min(len, split * rows_per_split);
  const int end = min(len, start + rows_per_split);
  const int nst = (end - start + L::R - 1) / L::R;
  constexpr int SPT = SANTA_TILE / L::R;            // stages per tile
  const long long bh0 = (long long)b * q_heads + (long long)kvh * G;
  load_group_query<T, D>(q, b, kvh, G, q_heads, scale, q_sm);

#pragma unroll
  for (int s = 0; s < SCORE_STAGES - 1; ++s) {
    if (s < nst) issue_stage<T, D, SCORE_STAGE_BYTES>(kbuf + s * L::STAGE_BYTES, ok_sm[s], k, cache, b, kvh, start + s * L::R, end);
    cp_async_commit();
  }
  for (int s = 0; s < nst; ++s) {
    cp_async_wait<SCORE_STAGES - 2>();
    __syncthreads();
    const int nx = s + SCORE_STAGES - 1;
    if (nx < nst)
      issue_stage<T, D, SCORE_STAGE_BYTES>(kbuf + (nx % SCORE_STAGES) * L::STAGE_BYTES, ok_sm[nx % SCORE_STAGES], k, cache, b, kvh,
                        start + nx * L::R, end);
    cp_async_commit();
    const int cur = s % SCORE_STAGES;
    stage_scores<T, D, SCORE_STAGE_BYTES>(kbuf + cur * L::STAGE_BYTES, ok_sm[cur], q_sm, s_sm + (s % SPT) * L::R,
                                          SANTA_TILE, G);
    if ((s + 1) % SPT && s + 1 < nst) continue;
    // a tile is complete: stash its scores and write its (max, sum) per head
    __syncthreads();
    const int t = (start / SANTA_TILE) + s / SPT, pos0 = t * SANTA_TILE, rows = min(SANTA_TILE, len - pos0);
    for (int g = warp; g < G; g += SANTA_THREADS / 32) {
      const float* sg = s_sm + g * SANTA_TILE;
      float* dst = stash + (bh0 + g) * stash_stride + pos0;
      float mt = NEG_INF;
      for (int r = lane; r < rows; r += 32) { mt = fmaxf(mt, sg[r]); dst[r] = sg[r]; }
      mt = warp_max(mt);
      float sum = 0.f;
      if (mt != NEG_INF)
        for (int r = lane; r < rows; r += 32) sum += __expf(sg[r] - mt);
      sum = warp_sum(sum);
      if (lane == 0) { stat_m[(bh0 + g) * tiles_max + t] = mt; stat_l[(bh0 + g) * tiles_max + t] = sum; }
    }
  }
  cp_async_wait<0>();
  if (!last_block_done(counters, b * kv_heads + kvh, nsplit, &flag)) return;

  build_plan<1>(b, kvh, bh0, G, len, tiles_max, stat_m, stat_l, scheme, S,
                Stream{keys, key, seq_per_batch, offset_ptr, offset}, plan_M, plan_Z, plan_P, plan_pos, plan_off,
                ready ? ready + b * kv_heads + kvh : nullptr);
}

// 16-bit caches run the per-warp pipelines (SCORE_PIPE_WARPS x 32 threads per block, statistics
// per part of a tile, rows_per_split a multiple of the part), float32 the block pipeline
// (SANTA_THREADS per block, statistics per tile, rows_per_split a multiple of the tile). The bound
// allows 128 registers: two float32 blocks per SM, three 16-bit ones (4 warps, 2 chunks per stage:
// shared memory allows three); 256-wide rows keep their registers (their stages allow one block).
// `ready`: one flag per (sequence, KV head) on which its plan is published (or null): pass 2 runs
// beside this kernel on the pairs it has finished.
#define SCORE_ARGS const T *q, const T *k, CACHE_ARGS, float scale, int rows_per_split, int tiles_max,          \
    int stash_stride, float *stash, float *stat_m, float *stat_l, int *counters, int scheme, int S,               \
    const u64 *keys, u64 key, int seq_per_batch, const u32 *offset_ptr, u32 offset, float *plan_M, double *plan_Z,  \
    double *plan_P, double *plan_pos, u32 *plan_off, int *ready, int tail_units, int *queue
#define SCORE_ARG_NAMES q, k, kv_lens, page_table, max_pages, page_size, num_pages, capacity, kv_heads, q_heads,    \
    scale, rows_per_split, tiles_max, stash_stride, stash, stat_m, stat_l, counters, scheme, S, keys, key,         \
    seq_per_batch, offset_ptr, offset, plan_M, plan_Z, plan_P, plan_pos, plan_off, ready, tail_units, queue
template <typename T, int D>
__global__ void __launch_bounds__(SANTA_THREADS, D >= 256 ? 1 : 2) santa_scores(SCORE_ARGS) {
  let_dependent_kernel_start();     // pass 2 waits for the plans it needs
  if constexpr (sizeof(T) == 2) scores_body_pipelined<T, D, false>(SCORE_ARG_NAMES);
  else scores_body<T, D>(SCORE_ARG_NAMES);
}
// santa_scores with part CDFs in the stash, before santa_part_values (16-bit caches only).
template <typename T, int D>
__global__ void __launch_bounds__(SANTA_THREADS, D >= 256 ? 1 : 2) santa_part_scores(SCORE_ARGS) {
  let_dependent_kernel_start();
  if constexpr (sizeof(T) == 2) scores_body_pipelined<T, D, true>(SCORE_ARG_NAMES);
}

// Number of global draw positions below x (scheme iid, stratified or systematic).
__device__ __forceinline__ int draws_below(int scheme, double x, int S, double U, const Stream& st, int b,
                                           int h, u32 off, const double* pos) {
  if (!(x > 0.0)) return 0;
  if (x >= 1.0) return S;
  if (scheme == SCHEME_SYSTEMATIC) {
    double y = ceil(x * S - U);
    return y <= 0.0 ? 0 : (y >= S ? S : (int)y);
  }
  if (scheme == SCHEME_STRATIFIED) {
    int m = (int)floor(x * S);
    if (m >= S) return S;
    double u = ((double)m + st.uniform(b, h, PURPOSE_VALUES, off, m)) / S;
    return m + (u < x ? 1 : 0);
  }
  int lo = 0, hi = S;
  while (lo < hi) {
    int mid = (lo + hi) >> 1;
    if (__ldcg(pos + mid) < x) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// ============================================================================ SANTA pass 2
// Where the draws of one (tile or part, head) fall: draws [lo, hi) of the head land in it; draw
// j, at global CDF position u_j, sits at u_j * mass - base on the scale of its scanned weights
// exp(s - ref).
struct TileDraws {
  double base, mass, U;
  float ref, fac;            // fac: weight of one draw
  int lo, hi;
};

// A lane's 8 CDF edges, rows first .. first + 7, into the warp's edge buffer at `at`: +inf from
// row `rows` on, which keeps search_edges within the rows.
__device__ __forceinline__ void store_edges(float* at, float (&e)[8], int first, int rows) {
#pragma unroll
  for (int i = 0; i < 8; ++i)
    if (first + i >= rows) e[i] = -NEG_INF;
  reinterpret_cast<float4*>(at)[0] = make_float4(e[0], e[1], e[2], e[3]);
  reinterpret_cast<float4*>(at)[1] = make_float4(e[4], e[5], e[6], e[7]);
}

// The first of N CDF edges that passes x or, at the total `top`, reaches it (x <= top, so one
// test): the row a draw at x lands in.
template <int N>
__device__ __forceinline__ int search_edges(const float* edge, float x, float top) {
  int r = 0;
#pragma unroll
  for (int step = N / 2; step > 0; step >>= 1) {
    const float ed = edge[r + step - 1];
    if (!(ed > x || ed >= top)) r += step;
  }
  return r;
}

// The E = D / 32 elements [lane E, lane E + E) of a cache row: loaded as WORDS raw 32-bit words
// (what a load in flight holds in registers), then unpacked to float.
template <typename T, int D> struct RowSlice {
  static constexpr int E = D / 32;
  static constexpr int WORDS = E * (int)sizeof(T) / 4;
  __device__ __forceinline__ static void load(const T* row, u32 (&w)[WORDS]) {
    const u32* p = reinterpret_cast<const u32*>(row + (threadIdx.x & 31) * E);
    if constexpr (WORDS >= 4) {
#pragma unroll
      for (int i = 0; i < WORDS / 4; ++i) {
        const uint4 x = __ldg(reinterpret_cast<const uint4*>(p) + i);
        w[4 * i] = x.x; w[4 * i + 1] = x.y; w[4 * i + 2] = x.z; w[4 * i + 3] = x.w;
      }
    } else if constexpr (WORDS == 2) {
      const uint2 x = __ldg(reinterpret_cast<const uint2*>(p));
      w[0] = x.x; w[1] = x.y;
    } else {
      w[0] = __ldg(p);
    }
  }
  __device__ __forceinline__ static void unpack(const u32 (&w)[WORDS], float (&f)[E]) {
#pragma unroll
    for (int i = 0; i < WORDS; ++i) {
      if constexpr (sizeof(T) == 4) {
        f[i] = __uint_as_float(w[i]);
      } else {
        T lo, hi;
        lo.x = (unsigned short)(w[i] & 0xffffu); hi.x = (unsigned short)(w[i] >> 16);
        f[2 * i] = to_float(lo); f[2 * i + 1] = to_float(hi);
      }
    }
  }
};

#define VALUE_WARPS (SANTA_THREADS / 32)
#ifndef VALUE_BLOCKS_PER_SM       // register budget: 65536 / (VALUE_BLOCKS_PER_SM x SANTA_THREADS)
#define VALUE_BLOCKS_PER_SM 4
#endif
#ifndef VALUE_GATHER_FLOATS       // registers a lane gives to V rows in flight (8: fewer spills
#define VALUE_GATHER_FLOATS 8     // in tile tasks and as fast or faster than 16: NOTES version 88)
#endif

// Pass 2: warps work independently. santa_values: one (tile, head) with draws at a time; the warp
// reads the tile's stash, scans exp(s - ref) into CDF edges and finds each draw's row by binary
// search (a lane per draw: work per draw, not per row). santa_part_values (16-bit caches, where
// most parts receive no draw): rounds of 32 of the head's draws, each draw's row found by binary
// search over its 64-row part's CDF (the stash of santa_part_scores). Either way the warp lists
// each drawn row once with its draw count (the draws are in row order: a run of equal rows is one
// entry) and accumulates the listed V rows (weight: draws x fac) into its slice of the head's
// output. Warps split the heads of the group, then the block's tiles or draws; the block sums its
// warps in a fixed order per head and the last block merges the splits.
// A block starts once pass 1 has published its (sequence, KV head)'s plan, while pass 1 may still
// score other pairs. `counters` holds the split counters, then the published flags (reset here
// once every block of the pair is done), then a count of finished pairs (the last one advances
// the call counter: by then every plan has read it). Shared memory is kept small enough for one
// block beside three of pass 1 (H200: 228 KB per multiprocessor).
#define VALUE_WARP_BYTES (12 * SANTA_TILE)     // per warp: CDF edges (floats), listed rows and counts
#define VALUE_ARGS const T *v, CACHE_ARGS, int tiles_per_split, int tiles_max, int stash_stride,                 \
    const float *stash, const float *stat_m, const float *stat_l, int stat_parts, int *counters, int scheme, int S,  \
    const u64 *keys, u64 key, int seq_per_batch, const float *plan_M, const double *plan_Z, const double *plan_P,    \
    const double *plan_pos, const u32 *plan_off, float *part_o, T *out, float *lse_out, int *counts_out,             \
    u32 *offset_advance
#define VALUE_ARG_NAMES v, kv_lens, page_table, max_pages, page_size, num_pages, capacity, kv_heads, q_heads,         \
    tiles_per_split, tiles_max, stash_stride, stash, stat_m, stat_l, stat_parts, counters, scheme, S, keys, key,     \
    seq_per_batch, plan_M, plan_Z, plan_P, plan_pos, plan_off, part_o, out, lse_out, counts_out, offset_advance
// Q: 1 (tile tasks) or STAT_PARTS (part draws, 16-bit caches only).
template <typename T, int D, int Q>
__device__ __forceinline__ void values_body(VALUE_ARGS) {
  constexpr int E = RowSlice<T, D>::E;
  static_assert(D <= SANTA_TILE, "a warp's block sum fits its counts");
  extern __shared__ __align__(128) char smem_raw[];
  const int G = q_heads / kv_heads, b = blockIdx.z, kvh = blockIdx.y, split = blockIdx.x;
  const int nsplit = gridDim.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int pair = b * kv_heads + kvh, pairs = gridDim.y * gridDim.z;
  int* ready = counters + pairs;
  wait_published(ready + pair);    // pass 1's stash and plan of this pair
  float* edge = reinterpret_cast<float*>(smem_raw + warp * VALUE_WARP_BYTES);   // this warp's CDF edges,
  u32* list_u = reinterpret_cast<u32*>(edge + SANTA_TILE);     //   the drawn rows' V offsets (in rows of D),
  int* list_c = reinterpret_cast<int*>(list_u + SANTA_TILE);   //   and their draw counts
  // warp w's share of the block sum sits in its counts, free once its tiles are done
  auto red_sm = [&](int w) { return reinterpret_cast<float*>(smem_raw + w * VALUE_WARP_BYTES) + 2 * SANTA_TILE; };
  __shared__ int flag;
  MAKE_CACHE;
  const Stream st{keys, key, seq_per_batch, nullptr, 0u};
  const u32 off = *plan_off;
  const int len = clamp_len(kv_lens, b, capacity);
  const int tiles = (len + SANTA_TILE - 1) / SANTA_TILE;
  const int t0 = min(tiles, split * tiles_per_split), t1 = min(tiles, t0 + tiles_per_split);
  const long long bh0 = (long long)b * q_heads + (long long)kvh * G;
  const int budget = scheme == SCHEME_TILE && tiles > 0 ? max(1, S / tiles) : 1;   // tile scheme: draws per tile
  // Tile tasks: where the draws of each (tile, head) fall. Part tasks, per head: draws before each
  // part (16 bits: S <= MAX_SAMPLES_GPU), each part's CDF offset in its tile, each tile's offset,
  // and the head's total mass, systematic offset and maximum score.
  TileDraws* td_sm = reinterpret_cast<TileDraws*>(smem_raw + VALUE_WARPS * VALUE_WARP_BYTES);   // tiles x G
  const int nparts = valid_parts(len, STAT_PARTS), p0 = min(nparts, t0 * STAT_PARTS);
  const int np = min(nparts, t1 * STAT_PARTS) - p0, nt = t1 - t0;
  unsigned short* bnd = reinterpret_cast<unsigned short*>(td_sm);
  float2* part_at = reinterpret_cast<float2*>(bnd + 4 * ((G * (np + 1) + 3) / 4));
  double* tile_at = reinterpret_cast<double*>(part_at + G * np);
  double* z_sm = tile_at + G * nt;
  double* u_sm = z_sm + G;
  float* m_sm = reinterpret_cast<float*>(u_sm + G);

  // Where the draws fall, for every (tile, head) (or part boundary, head) of this split at once.
  if constexpr (Q == 1) {
  for (int i = threadIdx.x; i < (t1 - t0) * G; i += SANTA_THREADS) {
    const int g = i % G, t = t0 + i / G, h = kvh * G + g;
    const double Z = plan_Z[bh0 + g];
    TileDraws d;
    if (scheme == SCHEME_TILE) {
      float mt, lt;
      const long long head = (bh0 + g) * tiles_max * stat_parts;
      tile_stats(stat_m + head, stat_l + head, t, stat_parts, valid_parts(len, stat_parts), mt, lt);
      const double W = mt == NEG_INF ? 0.0 : exp((double)mt - (double)plan_M[bh0 + g]) * (double)lt;
      d.lo = 0; d.hi = mt == NEG_INF ? 0 : budget;
      d.fac = Z > 0.0 ? (float)(W / (Z * budget)) : 0.f;
      d.ref = mt; d.base = 0.0; d.mass = lt;
      d.U = st.uniform(b, h, PURPOSE_VALUES, off, t);
    } else {
      const double* P = plan_P + (bh0 + g) * (tiles_max + 1);
      const double U = scheme == SCHEME_SYSTEMATIC ? st.uniform(b, h, PURPOSE_VALUES, off, 0) : 0.0;
      const double inv_z = Z > 0.0 ? 1.0 / Z : 0.0;
      const double* pos = plan_pos + (bh0 + g) * S;
      d.lo = draws_below(scheme, P[t] * inv_z, S, U, st, b, h, off, pos);
      d.hi = t == tiles - 1 ? S : draws_below(scheme, P[t + 1] * inv_z, S, U, st, b, h, off, pos);
      d.fac = 1.f / S;
      d.ref = plan_M[bh0 + g]; d.base = P[t]; d.mass = Z; d.U = U;
    }
    td_sm[i] = d;
  }
  } else {
  // Per head g: bnd[g (np + 1) + k] draws before part p0 + k (draws are in CDF order, so part p
  // receives draws [bnd(p), bnd(p + 1))); a part's CDF offset is its tile's, tile_at[g nt + t - t0],
  // plus its own in the tile, part_at[g np + p - p0].x (the plan's float sum of the parts before it);
  // part_at[..].y = exp(M - m) turns the head's scale (exp(s - M), M its maximum) into that of the
  // part's stashed CDF (exp(s - m)). The head's totals and systematic offset first.
  if (threadIdx.x < G) {
    const int g = threadIdx.x;
    z_sm[g] = plan_Z[bh0 + g];
    m_sm[g] = plan_M[bh0 + g];
    u_sm[g] = scheme == SCHEME_SYSTEMATIC ? st.uniform(b, kvh * G + g, PURPOSE_VALUES, off, 0) : 0.0;
  }
  __syncthreads();
  // entry i = k G + g, stepped without a division per entry
  const int dk = SANTA_THREADS / G, dg = SANTA_THREADS - dk * G;
  for (int g = threadIdx.x % G, k = threadIdx.x / G; k < np + 1; k += dk) {
    const int p = p0 + k, h = kvh * G + g;
    int n = S;
    if (p < nparts) {
      const int t = p / STAT_PARTS, j = p % STAT_PARTS;
      const double Pt = plan_P[(bh0 + g) * (tiles_max + 1) + t], Z = z_sm[g], U = u_sm[g];
      const float mx = m_sm[g];
      const long long head = (bh0 + g) * tiles_max * STAT_PARTS;
      float pm[STAT_PARTS], pl[STAT_PARTS], c = 0.f;
      load_parts<STAT_PARTS>(stat_m + head, t, valid_parts(len, STAT_PARTS), NEG_INF, pm);
      if (j > 0) {
        load_parts<STAT_PARTS>(stat_l + head, t, valid_parts(len, STAT_PARTS), 0.f, pl);
        if (mx != NEG_INF)
#pragma unroll
          for (int q = 0; q < STAT_PARTS; ++q)
            if (q < j) c += pl[q] * __expf(pm[q] - mx);     // as build_plan sums a tile's mass
      }
      if (k < np) {
        // (a scale of inf: the part's mass is below float range, no draw lands there)
        part_at[g * np + k] = make_float2(c, pm[j] == NEG_INF ? 0.f : __expf(mx - pm[j]));
        if (j == 0) tile_at[g * nt + t - t0] = Pt;
      }
      n = draws_below(scheme, (Pt + (double)c) * (Z > 0.0 ? 1.0 / Z : 0.0), S, U, st, b, h, off,
                      plan_pos + (bh0 + g) * S);
    }
    bnd[g * (np + 1) + k] = (unsigned short)n;
    g += dg;
    if (g >= G) { g -= G; ++k; }
  }
  }
  __syncthreads();
  // Part draws: the stash of every (part, head) of the block that receives a draw, asked for at
  // once, so that the warps' rounds find it near (bench/NOTES.md, version 95).
  if constexpr (Q > 1)
    for (int i = threadIdx.x; i < G * np; i += SANTA_THREADS) {
      const int g = i / np, k = i - g * np;
      if (bnd[g * (np + 1) + k + 1] > bnd[g * (np + 1) + k])
        prefetch_lines<SANTA_TILE / Q * 4>(stash + (bh0 + g) * stash_stride + (size_t)(p0 + k) * (SANTA_TILE / Q));
    }

  // Warps over heads first, so that the heads of the group read the same tiles (and V rows) at
  // about the same time; wt warps (a power of two) over tiles (tile tasks: interleaved) or the
  // head's draws (part draws: a contiguous share each).
  int lwt = 0;    // log2 wt
  while ((2 << lwt) <= min(VALUE_WARPS / min(G, VALUE_WARPS), t1 - t0)) ++lwt;
  const int wt = 1 << lwt, HG = VALUE_WARPS >> lwt, wtile = warp & (wt - 1), hgrp = warp >> lwt;
  // a tile (part_rows = SANTA_TILE) takes the warp, a part 8 lanes; this lane's rows sl * 8 ..
  constexpr int part_rows = SANTA_TILE / Q;
  const int sl = lane % (32 / Q);
  for (int g0 = 0; g0 < G; g0 += HG) {
    const int g = g0 + hgrp;
    float acc[E];
#pragma unroll
    for (int k = 0; k < E; ++k) acc[k] = 0.f;
    // V rows e0 .. e0 + GB of the task's list into registers, and their weights (0 past n and on
    // out-of-range pages)
    constexpr int GB = VALUE_GATHER_FLOATS / E;
    // V row offsets in units of D elements fit 32 bits (rows x KV heads < 2^32 in any memory);
    // contiguous caches: row pos of this sequence and KV head at v_unit0 + pos kv_heads
    constexpr u32 NO_ROW = ~0u;
    const u32 v_unit0 = (u32)((long long)b * cache.capacity * cache.kv_heads + kvh);
    typedef RowSlice<T, D> Row;
    auto gather = [&](int e0, int n, float fac, u32 (&f)[GB][Row::WORDS], float (&wu)[GB]) {
#pragma unroll
      for (int u = 0; u < GB; ++u) {
        const u32 at = e0 + u < n ? list_u[e0 + u] : NO_ROW;
        wu[u] = at != NO_ROW ? (float)list_c[e0 + u] * fac : 0.f;
        if (at != NO_ROW) Row::load(v + (size_t)at * D, f[u]);
        else
#pragma unroll
          for (int k = 0; k < Row::WORDS; ++k) f[u][k] = 0u;
      }
    };
    auto accumulate = [&](const u32 (&f)[GB][Row::WORDS], const float (&wu)[GB]) {
#pragma unroll
      for (int u = 0; u < GB; ++u) {
        float x[E];
        Row::unpack(f[u], x);
#pragma unroll
        for (int k = 0; k < E; ++k) acc[k] = fmaf(wu[u], x[k], acc[k]);
      }
    };
    // gathers and adds the list's entries [from, n), one batch of GB rows in flight (two or more
    // batches spilled and were slower: bench/NOTES.md, version 87)
    auto gather_rest = [&](int from, int n, float fac) {
      for (int e0 = from; e0 < n; e0 += GB) {
        u32 f[GB][Row::WORDS];
        float wu[GB];
        gather(e0, n, fac, f, wu);
        accumulate(f, wu);
      }
    };
    // A round's drawn rows (row: this lane's, -1 for none; in order across the round) into the
    // list of n entries (at most cap): each run of equal rows once, by its first lane, with the
    // run's length; the lanes before the round's first run continue the list's last entry (prev:
    // its row). live: the round's draws.
    auto list_round = [&](int row, int live, int cap, int& n, int& prev) {
      const int up = __shfl_up_sync(0xffffffffu, row, 1);
      const bool head = row >= 0 && row != (lane == 0 ? prev : up);
      const unsigned heads = __ballot_sync(0xffffffffu, head);
      const unsigned later = heads & (0xfffffffeu << lane);
      const int at = n + __popc(heads & ((1u << lane) - 1u));
      if (head && at < cap) {
        u32 unit = v_unit0 + (u32)row * (u32)cache.kv_heads;
        if (cache.page_table) {
          const long long o = cache.row(b, row, kvh, D);
          unit = o < 0 ? NO_ROW : (u32)(o / D);
        }
        list_u[at] = unit;
        list_c[at] = (later ? __ffs(later) - 1 : live) - lane;
      }
      const int carried = heads ? __ffs(heads) - 1 : live;
      if (lane == 0 && carried > 0 && n > 0) list_c[n - 1] += carried;
      n = min(cap, n + __popc(heads));
      prev = __shfl_sync(0xffffffffu, row, 31);
      __syncwarp();
    };
    // Tile tasks: the first batch of a task's rows stays in flight while the warp scans its next
    // task.
    u32 pf[GB][Row::WORDS];
    float pw[GB];
    gather(0, 0, 0.f, pf, pw);
    // this lane's 8 stashed scores (part draws: CDF edges) of part `part`: rows part * part_rows + sl * 8 ..
    // (cached in the L1, where the block's prefetches leave them; wait_published's acquire orders
    // the loads after pass 1's stores whatever the cache operator: NOTES version 96)
    const float* stash_g = stash + (bh0 + min(g, G - 1)) * stash_stride + sl * 8;
    auto load_stash = [&](int part, float4& s0, float4& s1) {
      const float4* sg = reinterpret_cast<const float4*>(stash_g + part * part_rows);
      s0 = __ldca(sg); s1 = __ldca(sg + 1);
    };
    // One tile task: tile `tile` of `rows` rows, this lane's stashed scores s0, s1 and the draws d.
    auto task = [&](int tile, int rows, const float4 s0, const float4 s1, const TileDraws& d) {
      if (d.ref == NEG_INF) rows = 0;
      // the tile's CDF edges: scanned weights exp(s - ref), +inf past its rows
      float e[8] = {s0.x, s0.y, s0.z, s0.w, s1.x, s1.y, s1.z, s1.w};
      const bool ends = sl * 8 + 8 > rows;   // the tile ends at or before this lane's rows
#pragma unroll
      for (int i = 0; i < 8; ++i) e[i] = __expf(e[i] - d.ref);
      if (ends)
#pragma unroll
        for (int i = 0; i < 8; ++i)
          if (sl * 8 + i >= rows) e[i] = 0.f;
      float run = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        run += e[i];
        e[i] = run;
      }
      const float before = warp_inclusive_scan(run, 32) - run;
#pragma unroll
      for (int i = 0; i < 8; ++i) e[i] += before;
      store_edges(edge + 8 * lane, e, sl * 8, rows);
      __syncwarp();
      const float top = rows > 0 ? edge[rows - 1] : 0.f;
      // The task's draws [lo, hi), a lane each: its row by binary search over the tile's edges.
      // (the same in every lane; through shuffles the compiler spills less: NOTES v85)
      const int lo = __shfl_sync(0xffffffffu, d.lo, 0), hi = __reduce_max_sync(0xffffffffu, d.hi);
      const double inv_s = 1.0 / (scheme == SCHEME_TILE ? budget : S);
      const int pos0 = tile * SANTA_TILE;
      int n = 0, prev = -1;
      for (int j0 = lo; j0 < hi; j0 += 32) {
        const int j = j0 + lane;
        int key = -1;                      // the draw's row
        if (j < hi) {
          double u;
          if (scheme == SCHEME_IID) u = __ldcg(plan_pos + (bh0 + g) * S + j);
          else if (scheme == SCHEME_STRATIFIED) u = ((double)j + st.uniform(b, kvh * G + g, PURPOSE_VALUES, off, j)) * inv_s;
          else u = ((double)j + d.U) * inv_s;
          key = pos0 + search_edges<SANTA_TILE>(edge, fminf(fmaxf((float)(u * d.mass - d.base), 0.f), top), top);
          if (counts_out) atomicAdd(counts_out + (bh0 + g) * capacity + key, 1);
        }
        list_round(key, min(32, hi - j0), SANTA_TILE, n, prev);
      }
      // the previous task's first rows have arrived during this task's scan
      accumulate(pf, pw);
      gather(0, n, d.fac, pf, pw);
      gather_rest(GB, n, d.fac);         // the rest: gathered now
      __syncwarp();
    };
    float4 n0 = make_float4(0.f, 0.f, 0.f, 0.f), n1 = n0;
    if constexpr (Q == 1) {
      auto fetch = [&](int t) {                 // the stash of the warp's next tile, one tile ahead
        if (g >= G || t >= t1) return;
        const TileDraws& d = td_sm[(t - t0) * G + g];
        if (d.hi > d.lo) load_stash(t, n0, n1);
      };
      fetch(t0 + wtile);
      for (int t = t0 + wtile; g < G && t < t1; t += wt) {
        const float4 s0 = n0, s1 = n1;
        fetch(t + wt);
        const TileDraws d = td_sm[(t - t0) * G + g];
        if (d.hi <= d.lo) continue;
        task(t, min(SANTA_TILE, len - t * SANTA_TILE), s0, s1, d);
      }
    } else {
      // Part draws: the head's draws of this block, [bg[0], bg[np]) in order, an even share per
      // warp of the head, in rounds of 32, a lane each. A draw's part is the last whose first draw
      // it reaches (bg). The round's distinct parts are read 4 at a time, 8 lanes per part (one
      // coalesced 256-byte read; the next 4 in flight meanwhile), into the warp's edge buffer, where
      // each draw of those parts finds its row by binary search as tile tasks do.
      const int gc = min(g, G - 1);
      const unsigned short* bg = bnd + gc * (np + 1);     // bg[k]: head g's draws before part p0 + k
      const int lo = bg[0], per = (bg[np] - lo + wt - 1) >> lwt;
      const int w0 = lo + wtile * per, w1 = g < G ? min((int)bg[np], w0 + per) : w0;
      const int top_step = np > 1 ? 1 << (31 - __clz(np - 1)) : 0;
      const double mass = z_sm[gc], U = u_sm[gc], inv_s = 1.0 / S;
      const float fac = 1.f / S;
      // The drawn rows of the warp's rounds share one list (a run of draws across rounds is one
      // entry), gathered when the next round might not fit, and at the end.
      constexpr int LIST = SANTA_TILE - 32;
      int* slot = reinterpret_cast<int*>(list_u + LIST);   // lane of the round's n-th distinct part
      int n = 0, prev = -1;
      auto gather_list = [&]() {
        for (int e = GB + lane; e < n; e += 32) {      // the rows past the first batch, asked for at once
          const u32 at = list_u[e];
          if (at != NO_ROW) prefetch_lines<D * (int)sizeof(T)>(v + (size_t)at * D);
        }
        gather_rest(0, n, fac);
        n = 0; prev = -1;
        __syncwarp();
      };
      for (int j0 = w0; j0 < w1; j0 += 32) {
        const int j = j0 + lane;
        const bool valid = j < w1;
        int k = 0;
        float xr = 0.f;                    // the draw's position on its part's scale (unclamped)
        if (valid) {
          for (int step = top_step; step > 0; step >>= 1)
            if (k + step < np && bg[k + step] <= j) k += step;
          const float2 at = part_at[g * np + k];
          const double base = tile_at[g * nt + (p0 + k) / Q - t0] + (double)at.x;
          double u;
          if (scheme == SCHEME_IID) u = __ldcg(plan_pos + (bh0 + g) * S + j);
          else if (scheme == SCHEME_STRATIFIED) u = ((double)j + st.uniform(b, kvh * G + g, PURPOSE_VALUES, off, j)) * inv_s;
          else u = ((double)j + U) * inv_s;
          xr = (float)(u * mass - base) * at.y;
        }
        const int kup = __shfl_up_sync(0xffffffffu, k, 1);
        const unsigned starts = __ballot_sync(0xffffffffu, valid && (lane == 0 || k != kup));
        const int nr = __popc(starts), rank = __popc(starts & (0xffffffffu >> (31 - lane))) - 1;
        if ((starts >> lane) & 1u) slot[rank] = lane;
        __syncwarp();
        // this lane's share (8 rows) of the round's part 4 q + lane / 8, and its row count
        auto fetch = [&](int q, float4& a0, float4& a1, int& rows) {
          const int i = 4 * q + (lane >> 3);
          const int kq = __shfl_sync(0xffffffffu, k, i < nr ? slot[i] : 0);
          rows = i < nr ? min(part_rows, len - (p0 + kq) * part_rows) : 0;
          if (rows > 0) load_stash(p0 + kq, a0, a1);
        };
        float4 n0 = make_float4(0.f, 0.f, 0.f, 0.f), n1 = n0;
        int nrows;
        fetch(0, n0, n1, nrows);
        int key = -1;                      // the row of draw j0 + lane
        for (int q = 0; 4 * q < nr; ++q) {
          float e[8] = {n0.x, n0.y, n0.z, n0.w, n1.x, n1.y, n1.z, n1.w};
          const int rows = nrows;
          if (4 * q + 4 < nr) fetch(q + 1, n0, n1, nrows);
          store_edges(edge + 8 * lane, e, sl * 8, rows);
          __syncwarp();
          if (valid && rank >> 2 == q) {
            const float* pe = edge + (rank & 3) * part_rows;
            const int p = p0 + k, prow = min(part_rows, len - p * part_rows);
            const float top = pe[prow - 1];        // the part's total
            key = p * part_rows + search_edges<part_rows>(pe, fminf(fmaxf(xr, 0.f), top), top);
            if (counts_out) atomicAdd(counts_out + (bh0 + g) * capacity + key, 1);
          }
          __syncwarp();
        }
        if (n > LIST - 32) gather_list();
        list_round(key, min(32, w1 - j0), LIST, n, prev);
      }
      gather_list();
    }
    if constexpr (Q == 1) accumulate(pf, pw);
    // the block's sum for heads g0 .., warps in a fixed order
#pragma unroll
    for (int k = 0; k < E; ++k) red_sm(warp)[lane * E + k] = acc[k];
    __syncthreads();
    for (int i = threadIdx.x; i < HG * D; i += SANTA_THREADS) {
      const int hg = i / D, dd = i % D;
      if (g0 + hg >= G) continue;
      float o = 0.f;
      for (int w = 0; w < wt; ++w) o += red_sm(hg * wt + w)[dd];
      part_o[((bh0 + g0 + hg) * nsplit + split) * D + dd] = o;
    }
    __syncthreads();
  }

  if (!last_block_done(counters, pair, nsplit, &flag)) return;
  if (threadIdx.x == 0) {
    ready[pair] = 0;                     // every block of the pair has passed its wait
    if (offset_advance && last_arrival(ready + pairs, pairs)) atomicAdd(offset_advance, 1u);
  }
  // Each head's sum over the splits, in split order: R runs of consecutive splits per output
  // float4 on R neighbouring lanes, so that every thread has loads in flight; the first lane adds
  // the runs in order. (merge_exact_splits keeps one run: runs gained nothing there, NOTES v40.)
  const int elems = G * D / 4;
  int R = 1;
  while (2 * R * elems <= SANTA_THREADS && 2 * R <= nsplit) R *= 2;
  const int per_run = (nsplit + R - 1) / R;
  for (int i0 = 0; i0 < R * elems; i0 += SANTA_THREADS) {
    const int i = i0 + threadIdx.x, e = i / R, g = e / (D / 4), d = (e % (D / 4)) * 4;
    const int s0 = min(nsplit, (i % R) * per_run), s1 = min(nsplit, s0 + per_run);
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
    if (e < elems) o = sum_splits4<D, 8>(part_o + ((bh0 + g) * nsplit + s0) * D + d, s1 - s0, nullptr);
    float4 sum = o;
    for (int r = 1; r < R; ++r) {
      sum.x += __shfl_down_sync(0xffffffffu, o.x, r); sum.y += __shfl_down_sync(0xffffffffu, o.y, r);
      sum.z += __shfl_down_sync(0xffffffffu, o.z, r); sum.w += __shfl_down_sync(0xffffffffu, o.w, r);
    }
    if (e < elems && i % R == 0) store4(out + (bh0 + g) * D + d, sum);
  }
  if (lse_out && threadIdx.x < G) {
    const double Z = plan_Z[bh0 + threadIdx.x];
    lse_out[bh0 + threadIdx.x] = Z > 0.0 ? (float)((double)plan_M[bh0 + threadIdx.x] + log(Z)) : NEG_INF;
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(SANTA_THREADS, VALUE_BLOCKS_PER_SM) santa_values(VALUE_ARGS) {
  values_body<T, D, 1>(VALUE_ARG_NAMES);
}
template <typename T, int D>
__global__ void __launch_bounds__(SANTA_THREADS, VALUE_BLOCKS_PER_SM) santa_part_values(VALUE_ARGS) {
  values_body<T, D, STAT_PARTS>(VALUE_ARG_NAMES);
}
