// SANTA pass 1 over a feature-major key cache, with scores from stochastic ternary queries.
//
//   key_scores   each block first draws the group's ternary queries (santa_cupy/rng.py's stream,
//                as the reference does) and turns them into per-feature coefficients of the
//                estimated queries. It then reads, for each 256-token tile, only the features some
//                draw selected (each one contiguous run of tokens in this layout) and writes the
//                stash and per-tile statistics exactly as santa_scores does, so santa_values runs
//                unchanged on top (SANTA draws), or stash_decode for exact p V.
//                With key_draws = 0 the coefficients are the exact query and every feature is
//                read: exact scores from a feature-major cache.
#include "common.cuh"
#include "plan.cuh"

#define KEY_STAGES 4
#define KEY_GROUP_MEAN 0
#define KEY_GROUP_HEAD 1

// How many of the B draw positions of element i fall below a (iid: U_n; stratified:
// (n + U_n) / B; double index i * B + n), i.e. the sum of its B Bernoulli draws.
__device__ int ternary_count(double a, int B, int stratified, const Stream& st, int b, int head, int purpose,
                             u32 off, int i) {
  if (!(a > 0.0)) return 0;
  int c = 0;
  uint4 w = make_uint4(0u, 0u, 0u, 0u);
  long long pair = -1;
  for (int n = 0; n < B; ++n) {
    const long long idx = (long long)i * B + n;
    if ((idx >> 1) != pair) { pair = idx >> 1; w = st.words(b, head, purpose, off, pair); }
    double u = Stream::to_double(w, idx & 1);
    if (stratified) u = ((double)n + u) / B;
    c += u < a;
  }
  return c;
}

// The group's estimated queries as coef_sm[f * G + g], and the features any of them reads listed
// in feat_sm (ascending); returns how many. B = 0: the exact queries, every feature.
// Mean group: one draw of m = mean_g |q_g| for the group; per head: one draw per query head.
template <typename T, int D>
__device__ int query_coefficients(const T* q, int b, int kvh, int G, int q_heads, int B,
                                  int stratified, int group_mode, const Stream& st, u32 off,
                                  float* coef_sm, int* feat_sm, int* read_sm, double* m_sm) {
  __shared__ double norm_sm[SANTA_GMAX];
  __shared__ int nfeat_sm;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const T* src = q + ((long long)b * q_heads + (long long)kvh * G) * D;
  auto qd = [&](int g, int f) { return (double)to_float(src[g * D + f]); };
  if (B == 0) {
    for (int i = threadIdx.x; i < G * D; i += SANTA_THREADS) coef_sm[(i % D) * G + i / D] = to_float(src[i]);
    for (int f = threadIdx.x; f < D; f += SANTA_THREADS) feat_sm[f] = f;
    __syncthreads();
    return D;
  }
  for (int f = threadIdx.x; f < D; f += SANTA_THREADS) read_sm[f] = 0;
  if (group_mode == KEY_GROUP_MEAN) {
    for (int f = threadIdx.x; f < D; f += SANTA_THREADS) {
      double m = 0.0;
      for (int g = 0; g < G; ++g) m += fabs(qd(g, f));
      m_sm[f] = m / G;
    }
    __syncthreads();
    if (warp == 0) {
      double mx = 0.0;
      for (int f = lane; f < D; f += 32) mx = fmax(mx, m_sm[f]);
      for (int o = 16; o; o >>= 1) mx = fmax(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      if (lane == 0) norm_sm[0] = mx;
    }
    __syncthreads();
    const double norm = norm_sm[0];
    for (int f = threadIdx.x; f < D; f += SANTA_THREADS) {
      const double m = m_sm[f];
      const int c = ternary_count(norm > 0.0 ? m / norm : 0.0, B, stratified, st, b, kvh, PURPOSE_GROUP_KEYS, off, f);
      const double m_hat = norm * c / B;
      for (int g = 0; g < G; ++g) coef_sm[f * G + g] = m > 0.0 ? (float)(m_hat * (qd(g, f) / m)) : 0.f;
      read_sm[f] = c > 0;
    }
  } else {
    for (int g = warp; g < G; g += SANTA_THREADS / 32) {
      double mx = 0.0;
      for (int f = lane; f < D; f += 32) mx = fmax(mx, fabs(qd(g, f)));
      for (int o = 16; o; o >>= 1) mx = fmax(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      if (lane == 0) norm_sm[g] = mx;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < G * D; i += SANTA_THREADS) {
      const int g = i / D, f = i % D;
      const double x = qd(g, f), norm = norm_sm[g];
      const int c = ternary_count(norm > 0.0 ? fabs(x) / norm : 0.0, B, stratified, st, b, kvh * G + g,
                                  PURPOSE_KEYS, off, f);
      const double sgn = x > 0.0 ? 1.0 : (x < 0.0 ? -1.0 : 0.0);
      coef_sm[f * G + g] = (float)(norm * sgn * c / B);
      if (c > 0) read_sm[f] = 1;               // every writer stores the same value
    }
  }
  __syncthreads();
  if (warp == 0) {                             // list the features read, in order
    int n = 0;
    for (int base = 0; base < D; base += 32) {
      const bool r = read_sm[base + lane] != 0;
      const unsigned ballot = __ballot_sync(0xffffffffu, r);
      if (r) feat_sm[n + __popc(ballot & ((1u << lane) - 1u))] = base + lane;
      n += __popc(ballot);
    }
    if (lane == 0) nfeat_sm = n;
  }
  __syncthreads();
  return nfeat_sm;
}

// Tensor-core A fragments of the coefficients, one uint4 per (feature group, lane) and per part:
// rows are heads (zero past G), columns the group's 16 listed features (zero past nfeat). Each
// coefficient is split into hi + lo in T, so the two products keep about 16 of its bits.
template <typename T>
__device__ void coefficient_fragments(const float* coef_sm, const int* feat_sm, int nfeat, int nfg, int G,
                                      uint4* frag_sm) {
  for (int i = threadIdx.x; i < nfg * 32; i += SANTA_THREADS) {
    const int lane = i % 32, g = lane >> 2, c = (i / 32) * 16 + (lane & 3) * 2;
    auto part = [&](int h, int col, bool lo) -> float {
      const float x = h < G && col < nfeat ? coef_sm[feat_sm[col] * G + h] : 0.f;
      return lo ? x - to_float(from_float<T>(x)) : x;
    };
    auto pair = [&](int h, int col, bool lo) { return pack2<T>(part(h, col, lo), part(h, col + 1, lo)); };
    for (int lo = 0; lo < 2; ++lo)
      frag_sm[2 * i + lo] = make_uint4(pair(g, c, lo), pair(g + 8, c, lo), pair(g, c + 8, lo), pair(g + 8, c + 8, lo));
  }
}

// Stages hold RF feature rows of one tile (8 KB of data, rows padded by 16 bytes). 16-bit types:
// warp w computes tokens [32 w, 32 w + 32) of the tile for all heads on tensor cores (features are
// the k dimension, 16 per stage). float: thread i accumulates token i on CUDA cores. At a tile's
// last stage its scores go to the stash and its (max, sum) per head to stat_m, stat_l.
template <typename T, int D>
__global__ void __launch_bounds__(SANTA_THREADS) key_scores(
    const T* q, const T* k, CACHE_ARGS, float scale, int tiles_per_split, int tiles_max, int stash_stride,
    float* stash, float* stat_m, float* stat_l, int* counters,
    int scheme, int S, const u64* keys, u64 key, int seq_per_batch, const u32* offset_ptr, u32 offset,
    float* plan_M, double* plan_Z, double* plan_P, double* plan_pos, u32* plan_off, int* ready,
    int key_draws, int key_stratified, int key_group) {
  let_dependent_kernel_start();     // pass 2 waits for the plans it needs
  constexpr bool MMA = sizeof(T) == 2;
  constexpr int ROW_BYTES = SANTA_TILE * (int)sizeof(T);   // one feature over a tile
  constexpr int ROW_STRIDE = ROW_BYTES + 16;              // padding: ldmatrix rows hit distinct banks
  constexpr int RF = 8192 / ROW_BYTES;                    // feature rows per stage (16 for 16-bit types)
  constexpr int STAGE_BYTES = RF * ROW_STRIDE;
  constexpr int CPR = ROW_BYTES / 16;                     // 16-byte chunks per row
  constexpr int CPT = RF * CPR / SANTA_THREADS;           // copies per thread per stage
  constexpr int VEC = 16 / (int)sizeof(T);
  constexpr int NT = SANTA_TILE / 8 / (SANTA_THREADS / 32);  // 8-token n-tiles per warp
  static_assert(RF * CPR % SANTA_THREADS == 0 && SANTA_THREADS == SANTA_TILE && (!MMA || RF == 16), "stage shape");
  extern __shared__ __align__(128) char smem_raw[];
  const int G = q_heads / kv_heads, b = blockIdx.z, kvh = blockIdx.y, split = blockIdx.x;
  const int nsplit = gridDim.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, grp = lane >> 2, tig = lane & 3;
  char* kbuf = smem_raw;                                                    // KEY_STAGES x STAGE_BYTES
  uint4* frag_sm = reinterpret_cast<uint4*>(kbuf + KEY_STAGES * STAGE_BYTES);  // (D / 16) x 32 x 2
  double* m_sm = reinterpret_cast<double*>(frag_sm + (D / 16) * 64);        // D
  float* coef_sm = reinterpret_cast<float*>(m_sm + D);                       // D x G
  int* feat_sm = reinterpret_cast<int*>(coef_sm + D * G);                    // D
  int* read_sm = feat_sm + D;                                                // D
  __shared__ float red_m[SANTA_GMAX][32], red_l[SANTA_GMAX][32];   // per head: (max, sum) of 32 token groups
  static_assert(SANTA_THREADS / 8 == 32, "one partial per lane");
  __shared__ int flag;
  MAKE_CACHE;
  const Stream st{keys, key, seq_per_batch, offset_ptr, offset};
  const int len = clamp_len(kv_lens, b, capacity);
  const int tiles = (len + SANTA_TILE - 1) / SANTA_TILE;
  const int t0 = min(tiles, split * tiles_per_split), t1 = min(tiles, t0 + tiles_per_split);
  const long long bh0 = (long long)b * q_heads + (long long)kvh * G;
  const long long width = cache.fm_width();
  const int nfeat = query_coefficients<T, D>(q, b, kvh, G, q_heads, key_draws, key_stratified, key_group, st,
                                             st.call_offset(), coef_sm, feat_sm, read_sm, m_sm);
  const int nfg = max(1, (nfeat + RF - 1) / RF);          // stages per tile
  const int nst = (t1 - t0) * nfg;
  if constexpr (MMA) {
    coefficient_fragments<T>(coef_sm, feat_sm, nfeat, nfg, G, frag_sm);
    __syncthreads();
  }
  const bool split_coef = MMA && key_draws > 0;           // exact queries are exact in T: no lo part

  // rows past the listed features are zero-filled: their coefficients are zero, and 0 * stale NaN is not
  static_assert(SANTA_THREADS % CPR == 0, "a thread copies one token chunk in every row");
  const int col = threadIdx.x % CPR;
  // stages run tile by tile, nfg feature groups each; issuing runs KEY_STAGES - 1 stages ahead
  // (counters, not divisions by the run-time nfg)
  int issued = 0, issue_t = t0, issue_fg = 0;
  long long chunk = -1;                   // offset of the thread's token chunk in the tile, or -1
  auto issue_next = [&]() {
    char* buf = kbuf + (issued % KEY_STAGES) * STAGE_BYTES;
    if (issue_fg == 0) {
      const int pos = issue_t * SANTA_TILE + col * VEC;
      chunk = pos < len ? cache.fm_row(b, pos, kvh, D) : -1;
    }
    const int f0 = issue_fg * RF;
#pragma unroll
    for (int i = 0; i < CPT; ++i) {
      const int r = (threadIdx.x + i * SANTA_THREADS) / CPR;
      const bool ok = f0 + r < nfeat && chunk >= 0;
      cp_async16(buf + r * ROW_STRIDE + col * 16, ok ? (const void*)(k + chunk + feat_sm[f0 + r] * width) : (const void*)k, ok);
    }
    if (++issue_fg == nfg) { issue_fg = 0; ++issue_t; }
    ++issued;
  };
#pragma unroll
  for (int s = 0; s < KEY_STAGES - 1; ++s) {
    if (s < nst) issue_next();
    cp_async_commit();
  }
  float acc[MMA ? NT : SANTA_GMAX][4];     // MMA: (n-tile, fragment); float: (head, -)
#pragma unroll
  for (int j = 0; j < (MMA ? NT : SANTA_GMAX); ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  int t = t0, fg = 0;                      // the stage being computed
  for (int s = 0; s < nst; ++s) {
    cp_async_wait<KEY_STAGES - 2>();
    __syncthreads();
    if (s + KEY_STAGES - 1 < nst) issue_next();
    cp_async_commit();
    const char* buf = kbuf + (s % KEY_STAGES) * STAGE_BYTES;
    if constexpr (MMA) {
      const uint4 hi = frag_sm[2 * (fg * 32 + lane)], lo = frag_sm[2 * (fg * 32 + lane) + 1];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        u32 b0, b1;
        ldmatrix_x2_trans(b0, b1, buf + (lane & 15) * ROW_STRIDE + (warp * NT + j) * 16);
        mma16816<T>(acc[j], hi, b0, b1);
        if (split_coef) mma16816<T>(acc[j], lo, b0, b1);
      }
    } else {
      const int rows = min(RF, nfeat - fg * RF);
      for (int r = 0; r < rows; ++r) {
        const float kv = to_float(reinterpret_cast<const T*>(buf + r * ROW_STRIDE)[threadIdx.x]);
        const float* cf = coef_sm + feat_sm[fg * RF + r] * G;
#pragma unroll
        for (int g = 0; g < SANTA_GMAX; ++g)
          if (g < G) acc[g][0] = fmaf(cf[g], kv, acc[g][0]);
      }
    }
    if (++fg < nfg) continue;
    // the tile is complete: stash its scores and reduce (max, sum) per head over the block
    const int pos0 = t * SANTA_TILE;
    auto real = [&](int pos) { return pos < len && (!page_table || cache.fm_row(b, pos, kvh, D) >= 0); };
    if constexpr (MMA) {
      unsigned ok = 0;                                      // which of the thread's 2 NT tokens are real
#pragma unroll
      for (int i = 0; i < 2 * NT; ++i) ok |= (unsigned)real(pos0 + (warp * NT + i / 2) * 8 + tig * 2 + i % 2) << i;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int g = grp + 8 * half;
        if (g >= G) break;                                  // uniform over the 4 lanes of a row
        float v[2 * NT], m = NEG_INF;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const int p = (warp * NT + j) * 8 + tig * 2;       // even: the pair is one 8-byte store
          v[2 * j] = ok >> (2 * j) & 1 ? acc[j][2 * half] * scale : NEG_INF;
          v[2 * j + 1] = ok >> (2 * j + 1) & 1 ? acc[j][2 * half + 1] * scale : NEG_INF;
          float* dst = stash + (bh0 + g) * stash_stride + pos0 + p;
          if (pos0 + p + 1 < len) *reinterpret_cast<float2*>(dst) = make_float2(v[2 * j], v[2 * j + 1]);
          else if (pos0 + p < len) dst[0] = v[2 * j];
          m = fmaxf(m, fmaxf(v[2 * j], v[2 * j + 1]));
        }
        float l = 0.f;
#pragma unroll
        for (int i = 0; i < 2 * NT; ++i) l += m == NEG_INF ? 0.f : __expf(v[i] - m);
        red_m[g][warp * 4 + tig] = m;           // (max, sum exp) of this thread's tokens
        red_l[g][warp * 4 + tig] = l;
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    } else {
      const int pos = pos0 + threadIdx.x;
      const bool ok = real(pos);
#pragma unroll
      for (int g = 0; g < SANTA_GMAX; ++g) {
        if (g >= G) break;
        const float sc = ok ? acc[g][0] * scale : NEG_INF;
        if (pos < len) stash[(bh0 + g) * stash_stride + pos] = sc;
        const float wm = warp_max(sc);
        const float ws = warp_sum(wm == NEG_INF ? 0.f : __expf(sc - wm));
        if (lane < 4) {                         // the warp's (max, sum exp) in the first of its 4 slots
          red_m[g][warp * 4 + lane] = lane ? NEG_INF : wm;
          red_l[g][warp * 4 + lane] = lane ? 0.f : ws;
        }
        acc[g][0] = 0.f;
      }
    }
    __syncthreads();
    for (int g = warp; g < G; g += SANTA_THREADS / 32) {   // merge the 32 partials of head g
      const float pm = red_m[g][lane], m = warp_max(pm);
      const float l = warp_sum(pm == NEG_INF ? 0.f : red_l[g][lane] * __expf(pm - m));
      if (lane == 0) {
        stat_m[(bh0 + g) * tiles_max + t] = m;
        stat_l[(bh0 + g) * tiles_max + t] = l;
      }
    }
    fg = 0;
    ++t;
  }
  cp_async_wait<0>();
  if (!last_block_done(counters, b * kv_heads + kvh, nsplit, &flag)) return;
  build_plan<1>(b, kvh, bh0, G, len, tiles_max, stat_m, stat_l, scheme, S, st, plan_M, plan_Z, plan_P, plan_pos,
                plan_off, ready ? ready + b * kv_heads + kvh : nullptr);
}
