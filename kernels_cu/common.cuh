// Shared device code: storage types, 16-byte row loads, cache addressing, Philox, block scans.
// Header-free on purpose: NVRTC compiles it with no CUDA include path.
#pragma once

typedef unsigned long long u64;
typedef unsigned int u32;

#define SANTA_THREADS 256
#define SANTA_TILE 256
#define SANTA_GMAX 16
#define NEG_INF (-__int_as_float(0x7f800000))

// scheme codes (santa_cupy/_gpu.py: SCHEME_CODES) and random-stream purposes (santa_cupy/rng.py)
#define SCHEME_IID 0
#define SCHEME_STRATIFIED 1
#define SCHEME_SYSTEMATIC 2
#define SCHEME_TILE 3
#define PURPOSE_VALUES 0
#define PURPOSE_KEYS 1
#define PURPOSE_GROUP_KEYS 2

// 16-bit storage types; arithmetic is always float.
struct bf16_t { unsigned short x; };
struct f16_t { unsigned short x; };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(bf16_t v) { return __uint_as_float(((u32)v.x) << 16); }
__device__ __forceinline__ float to_float(f16_t v) {
  float f; asm("{ cvt.f32.f16 %0, %1; }" : "=f"(f) : "h"(v.x)); return f;
}
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16_t from_float<bf16_t>(float v) {
  u32 u = __float_as_uint(v);
  bf16_t r;
  if ((u & 0x7fffffffu) > 0x7f800000u) { r.x = 0x7fc0; return r; }   // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                     // round to nearest even
  r.x = (unsigned short)(u >> 16);
  return r;
}
template <> __device__ __forceinline__ f16_t from_float<f16_t>(float v) {
  f16_t r; asm("{ cvt.rn.f16.f32 %0, %1; }" : "=h"(r.x) : "f"(v)); return r;
}

// Elements of T in one 16-byte vector, unpacked to float.
template <typename T> struct Vec;
template <> struct Vec<float> {
  static constexpr int N = 4;
  __device__ __forceinline__ static void unpack(uint4 w, float* f) {
    f[0] = __uint_as_float(w.x); f[1] = __uint_as_float(w.y);
    f[2] = __uint_as_float(w.z); f[3] = __uint_as_float(w.w);
  }
};
template <> struct Vec<bf16_t> {
  static constexpr int N = 8;
  __device__ __forceinline__ static void unpack(uint4 w, float* f) {
    u32 a[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(a[i] << 16);
      f[2 * i + 1] = __uint_as_float(a[i] & 0xffff0000u);
    }
  }
};
template <> struct Vec<f16_t> {
  static constexpr int N = 8;
  __device__ __forceinline__ static void unpack(uint4 w, float* f) {
    u32 a[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f16_t lo, hi; lo.x = (unsigned short)(a[i] & 0xffffu); hi.x = (unsigned short)(a[i] >> 16);
      f[2 * i] = to_float(lo); f[2 * i + 1] = to_float(hi);
    }
  }
};

// Shared-memory stages hold unpadded rows; 16-byte piece p of row r sits at piece p ^ (r % 8) of
// the row. The 8 rows an ldmatrix (or a column read) touches fall in distinct banks, and the 8
// lanes that copy 128 bytes of a row fill one 128-byte line of shared memory (stage bases are
// 128-byte aligned): with rows padded by 16 bytes, that line straddled two and the L2 saw 1.5x
// the sectors (H200, bench/NOTES.md version 32).
__device__ __forceinline__ int swizzled(int r, int p, int row_bytes) { return r * row_bytes + ((p ^ (r & 7)) << 4); }

// Thread layout over one cache row of D elements: LPR lanes read CPL 16-byte chunks each.
// Rows stream through shared memory in stages of R rows (SB bytes of data) per operand.
template <typename T, int D, int SB = 8192> struct Layout {
  static constexpr int VEC = Vec<T>::N;
  static constexpr int NCH = D / VEC;                  // 16-byte chunks per row
  static constexpr int LPR = NCH < 32 ? NCH : 32;      // lanes per row
  static constexpr int CPL = NCH / LPR;                // chunks per lane
  static constexpr int RPP = SANTA_THREADS / LPR;      // rows per pass of the block
  static constexpr int ROW_BYTES = D * (int)sizeof(T);
  static constexpr int R = SB / ROW_BYTES;             // rows per stage
  static constexpr int STAGE_BYTES = R * ROW_BYTES;
  static constexpr int RPT = R / RPP;                  // rows per thread per stage
  static constexpr int CPT = R * NCH / SANTA_THREADS;  // 16-byte copies per thread per stage
  static constexpr int IPT = (SANTA_GMAX * NCH + SANTA_THREADS - 1) / SANTA_THREADS;  // (head, chunk) items per thread
  static_assert(R % RPP == 0 && SANTA_TILE % R == 0 && NCH % 8 == 0, "stage rows");
  static __device__ __forceinline__ int at(int r, int ch) { return swizzled(r, ch, ROW_BYTES); }
};

// Asynchronous 16-byte global->shared copy; `valid == false` writes zeros and reads nothing.
// The L2 fetches the whole 128-byte line on a miss (H200: 1.5-2% faster streams than sector fills).
__device__ __forceinline__ void cp_async16(u32 smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" :: "r"(smem), "l"(gmem), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  cp_async16((u32)__cvta_generic_to_shared(smem), gmem, valid);
}
// Asks for the 128-byte lines of [p, p + BYTES) ahead of the loads that need them, holding no
// register while they travel (prefetch.global.L1: the lines come through the L2, so that L2-only
// loads find them there too).
template <int BYTES> __device__ __forceinline__ void prefetch_lines(const void* p) {
#pragma unroll
  for (int i = 0; i < (BYTES + 127) / 128; ++i)
    asm volatile("prefetch.global.L1 [%0];" :: "l"(__cvta_generic_to_global(reinterpret_cast<const char*>(p) + 128 * i)));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N)); }

// A contiguous cache is the paged layout with one page of `capacity` rows per sequence.
struct Cache {
  const int* page_table;   // (batch, max_pages) or null
  int max_pages, page_size, num_pages, capacity, kv_heads;
  u32 page_magic;          // pos / page_size = (umulhi(pos, page_magic) + pos) >> page_shift for
  int page_shift;          // 0 <= pos < 2^31: a multiply and a shift per row instead of a division
  // Slot of position pos in its sequence's page-table row.
  __device__ __forceinline__ int page_slot(int pos) const {
    return (int)((__umulhi((u32)pos, page_magic) + (u32)pos) >> page_shift);
  }
  // Element offset of (b, pos, kvh, 0), or -1 where the page index is out of range.
  __device__ __forceinline__ long long row(int b, int pos, int kvh, int D) const {
    long long r;
    if (page_table) {
      const int slot = page_slot(pos);
      const int page = page_table[(long long)b * max_pages + slot];
      if (page < 0 || page >= num_pages) return -1;
      r = (long long)page * page_size + (pos - slot * page_size);
    } else {
      r = (long long)b * capacity + pos;
    }
    return (r * kv_heads + kvh) * D;
  }
  // Feature-major cache ((batch, kv_heads, D, capacity) or (num_pages, kv_heads, D, page_size)):
  // element offset of (b, pos, kvh, feature 0), or -1 where the page index is out of range (once
  // per tile, so a division is fine).
  // Feature f lies fm_width() elements further.
  __device__ __forceinline__ long long fm_row(int b, int pos, int kvh, int D) const {
    if (page_table) {
      int page = page_table[(long long)b * max_pages + pos / page_size];
      if (page < 0 || page >= num_pages) return -1;
      return ((long long)page * kv_heads + kvh) * D * page_size + pos % page_size;
    }
    return ((long long)b * kv_heads + kvh) * D * capacity + pos;
  }
  __device__ __forceinline__ long long fm_width() const { return page_table ? page_size : capacity; }
};

__device__ __forceinline__ Cache make_cache(const int* page_table, int max_pages, int page_size, int num_pages,
                                            int capacity, int kv_heads) {
  Cache c = {page_table, max_pages, page_size, num_pages, capacity, kv_heads, 0u, 0};
  if (page_table) {                                   // page_size >= 1
    c.page_shift = 32 - __clz(page_size - 1);         // ceil(log2(page_size))
    c.page_magic = (u32)((((1ull << c.page_shift) - page_size) << 32) / page_size + 1);
  }
  return c;
}

__device__ __forceinline__ int clamp_len(const int* kv_lens, int b, int capacity) {
  if (!kv_lens) return capacity;
  int n = kv_lens[b];
  return n < 0 ? 0 : (n > capacity ? capacity : n);
}

// ------------------------------------------------------------------ Philox4x32-10 (Random123)
__device__ __forceinline__ uint4 philox(uint4 c, u32 k0, u32 k1) {
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    if (r) { k0 += 0x9E3779B9u; k1 += 0xBB67AE85u; }
    u32 lo0 = 0xD2511F53u * c.x, hi0 = __umulhi(0xD2511F53u, c.x);
    u32 lo1 = 0xCD9E8D57u * c.z, hi1 = __umulhi(0xCD9E8D57u, c.z);
    c = make_uint4(hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0);
  }
  return c;
}

// Where a sequence's random stream lives (santa_cupy/rng.py documents the layout).
struct Stream {
  const u64* keys;     // per-sequence keys, or null: every sequence uses `key`
  u64 key;
  int seq_per_batch;   // 1: counter word 2 holds the batch index; 0: it holds 0
  const u32* offset_ptr;  // device call counter (seed=None), or null: `offset`
  u32 offset;
  // The Philox output holding doubles 2 pair and 2 pair + 1 of a stream.
  __device__ __forceinline__ uint4 words(int b, int head, int purpose, u32 off, long long pair) const {
    u64 k = keys ? keys[b] : key;
    u32 seq = seq_per_batch ? (u32)b : 0u;
    uint4 c = make_uint4((u32)pair, (u32)head, (seq & 0xFFFFFFu) | ((u32)purpose << 24), off);
    return philox(c, (u32)k, (u32)(k >> 32));
  }
  __device__ __forceinline__ static double to_double(uint4 w, bool second) {
    u32 a = second ? w.z : w.x, bb = second ? w.w : w.y;
    return ((double)(a >> 5) * 67108864.0 + (double)(bb >> 6)) * (1.0 / 9007199254740992.0);
  }
  __device__ __forceinline__ double uniform(int b, int head, int purpose, u32 off, long long index) const {
    return to_double(words(b, head, purpose, off, index >> 1), index & 1);
  }
  __device__ __forceinline__ u32 call_offset() const { return offset_ptr ? *offset_ptr : offset; }
};

// ------------------------------------------------------------------ reductions and scans
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
// Inclusive scan over each run of `width` lanes (a power of two).
template <typename X> __device__ __forceinline__ X warp_inclusive_scan(X v, int width = 32) {
  const int lane = threadIdx.x & (width - 1);
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    if (o >= width) break;
    X n = __shfl_up_sync(0xffffffffu, v, o, width);
    if (lane >= o) v += n;
  }
  return v;
}

// Programmatic dependent launch (sm_90+): a kernel launched as a dependent of the previous one in
// its stream may start while that one still runs, and must wait here before it reads what that
// kernel writes (a no-op for a plain launch). The previous kernel lets it start early.
__device__ __forceinline__ void wait_for_previous_kernel() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void let_dependent_kernel_start() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}

// Thread 0's acquire-release increment of a completion counter: true for the last of `total`
// arrivals, which resets the counter for the next call.
__device__ __forceinline__ bool last_arrival(int* counter, int total) {
  int prev;
  asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;" : "=r"(prev) : "l"(counter) : "memory");
  if (prev != total - 1) return false;
  *counter = 0;
  return true;
}

// Signals that this block is the last of `total` blocks to finish the work of `slot`; the
// last one may then read what the others wrote. One acquire-release atomic by one thread orders
// the whole block's writes (the barrier before it makes them its own), as a grid barrier does;
// no thread waits in a full fence.
__device__ __forceinline__ bool last_block_done(int* counters, int slot, int total, int* flag_sm) {
  __syncthreads();
  if (threadIdx.x == 0) *flag_sm = last_arrival(counters + slot, total);
  __syncthreads();
  return *flag_sm;
}

// A flag between kernels that run at the same time: `publish` makes the block's writes before it
// visible to any block that has seen the flag in `wait_published`. The reader resets the flag.
__device__ __forceinline__ void publish(int* flag) {
  __syncthreads();
  if (threadIdx.x == 0) asm volatile("st.release.gpu.global.s32 [%0], 1;" :: "l"(flag) : "memory");
}
__device__ __forceinline__ void wait_published(const int* flag) {
  if (threadIdx.x == 0) {
    int v;
    for (;;) {
      asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(flag) : "memory");
      if (v) break;
      __nanosleep(256);
    }
  }
  __syncthreads();
}

// ------------------------------------------------------------------ tensor cores (16-bit types)
// D (16x8, f32) += A (16x16, row) * B (16x8, col) with A, B in T (bf16 or f16).
template <typename T> __device__ __forceinline__ void mma16816(float (&c)[4], uint4 a, u32 b0, u32 b1);
template <> __device__ __forceinline__ void mma16816<bf16_t>(float (&c)[4], uint4 a, u32 b0, u32 b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma16816<f16_t>(float (&c)[4], uint4 a, u32 b0, u32 b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
}
// Two 8x8 16-bit matrices from shared memory, transposed (B fragments of a row-major k x n tile).
__device__ __forceinline__ void ldmatrix_x2_trans(u32& b0, u32& b1, const void* smem) {
  unsigned s = (unsigned)__cvta_generic_to_shared(smem);
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(b0), "=r"(b1) : "r"(s));
}
template <typename T> __device__ __forceinline__ u32 pack2(float lo, float hi) {
  return (u32)from_float<T>(lo).x | ((u32)from_float<T>(hi).x << 16);
}
