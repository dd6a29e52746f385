// Fused decode GEMVs for small batches (M <= 8 tokens) at TP=1: each weight GEMM of a
// decoder layer with the element-wise work around it, as ops/reference.py's
// norm_qkv_rope_cache, linear_add and norm_gate_up_silu define it. At a handful of rows
// a layer is a pass over its weights, and each of the seven small kernels around its
// GEMMs (norms, RoPE, cache write, SiLU, split-K reductions) costs ~2 us of launch and
// latency, a quarter of a 4096x4096 GEMV; here they ride along with the GEMVs instead:
//   XNORM:  x is the residual stream, normed on the fly: the dot products take x * g
//           and each output is scaled by rsqrt(mean(x^2) + eps) (the normed x is not
//           rounded to T as the unfused path stores it: the same up to rounding);
//   Y_ADD:  y = T(T(x W^T + b) + residual): the new residual stream;
//   Y_SILU: rows (n, n + I) are gate and up: y[:, n] = T(silu(T(gate)) * T(up));
//   Y_QKV:  rows (n, n + D/2) of one head: RoPE on q and k, q to y, k and v to the
//           paged cache at slot_mapping (slots < 0 are padding: skipped).
// Each warp owns pairs of weight rows (n_a, n_b = n_a + pair_offset) with
// n_a = (g / pair_period) * pair_stride + g % pair_period for pair g; each lane loads 16
// bytes of both rows per load, UNROLL loads in flight. w bypasses L1 (read once); x (and
// g) through L1. fp32 accumulation, one warp reduction per
// output. K % 8 == 0 and 16-byte aligned rows (the launcher checks). The model uses them
// at M = 1 only: from M = 2 on cuBLAS's tensor-core GEMMs are faster (workers/model.py).

constexpr int Y_ADD = 0, Y_SILU = 1, Y_QKV = 2;

// No L2 prefetch-size qualifier: measured, .L2::256B slows the whole batch-1 step by 3%
// (H200, benchmarks.decode_step, one machine: 4.363 ms with it, 4.229 with .L2::128B,
// 4.228 without).
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

template <typename T>
__device__ __forceinline__ float round_t(float v) { return DT<T>::to_float(DT<T>::from_float(v)); }

// The arguments every kernel instance takes (unused ones are zero).
#define DECODE_GEMV_PARAMS                                                                   \
  T *__restrict__ y, const T *__restrict__ x, long long x_stride, const T *__restrict__ norm_w, \
      float eps, const T *__restrict__ w, const T *__restrict__ bias, int N, int K,           \
      int pair_period, int pair_stride, int pair_offset, const T *__restrict__ residual,      \
      const long long *__restrict__ positions, const float *__restrict__ cos_sin,             \
      T *__restrict__ key_cache, T *__restrict__ value_cache,                                 \
      const long long *__restrict__ slot_mapping, int q_size, int kv_size, int head_dim,      \
      int num_kv_heads, int block_size

// Token m's outputs of rows na and nb (their sums a and b, bias not yet added).
template <typename T, int YMODE>
__device__ __forceinline__ void store_pair(float a, float b, int m, int na, int nb, DECODE_GEMV_PARAMS) {
  if (bias != nullptr) { a += DT<T>::load(bias, na); b += DT<T>::load(bias, nb); }
  a = round_t<T>(a);
  b = round_t<T>(b);
  if constexpr (YMODE == Y_ADD) {
    const long long r = (long long)m * N;
    DT<T>::store(y, r + na, a + DT<T>::load(residual, r + na));
    DT<T>::store(y, r + nb, b + DT<T>::load(residual, r + nb));
  } else if constexpr (YMODE == Y_SILU) {
    DT<T>::store(y, (long long)m * pair_offset + na, a / (1.f + __expf(-a)) * b);
  } else {  // Y_QKV: q | k | v sections, each a whole number of heads
    const int half = head_dim >> 1;
    const int j = na % head_dim;  // < half: nb is the same head's partner dim
    if (na < q_size + kv_size) {
      const float* cs = cos_sin + positions[m] * head_dim;
      const float c = cs[j], s = cs[half + j];
      const float ra = a * c - b * s, rb = b * c + a * s;
      a = ra;
      b = rb;
    }
    if (na < q_size) {
      DT<T>::store(y, (long long)m * q_size + na, a);
      DT<T>::store(y, (long long)m * q_size + nb, b);
      return;
    }
    const long long slot = slot_mapping[m];
    if (slot < 0) return;
    const bool is_k = na < q_size + kv_size;
    const int h = (na - q_size - (is_k ? 0 : kv_size)) / head_dim;
    const long long blk = slot / block_size;
    const long long dst = ((blk * num_kv_heads + h) * block_size + (slot - blk * block_size)) * head_dim + j;
    T* cache = is_k ? key_cache : value_cache;
    DT<T>::store(cache, dst, a);
    DT<T>::store(cache, dst + half, b);
  }
}

// UNROLL 16-byte loads of rows na and nb at vector k, k + 32, ... (zeros past the row).
template <int UNROLL>
__device__ __forceinline__ void load_pair(uint4 va[UNROLL], uint4 vb[UNROLL], const uint4* wa, const uint4* wb,
                                          int k, int kv) {
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const bool in = k + 32 * u < kv;
    va[u] = in ? ld_stream(wa + k + 32 * u) : make_uint4(0, 0, 0, 0);
    vb[u] = in ? ld_stream(wb + k + 32 * u) : make_uint4(0, 0, 0, 0);
  }
}

__device__ __forceinline__ int pair_row(int g, int period, int stride) { return (g / period) * stride + g % period; }

// XNORM: rsqrt(mean(x[m]^2) + eps) for every row m, summed by one warp. A warp calls it once
// its first pair is done (x is in L1 by then), so the weight stream never waits on it.
template <typename T, int M>
__device__ __forceinline__ void warp_inv_rms(float inv[M], const T* x, long long x_stride, int K, float eps) {
  const int lane = threadIdx.x & 31, kv = K >> 3;
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float ss = 0.f;
    for (int i = lane; i < kv; i += 32) {
      float f[8];
      unpack8<T>(__ldg(reinterpret_cast<const uint4*>(x + m * x_stride) + i), f);
#pragma unroll
      for (int j = 0; j < 8; ++j) ss = fmaf(f[j], f[j], ss);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
    inv[m] = rsqrtf(ss / (float)K + eps);
  }
}

// A grid of a few CTAs per SM; each warp walks its row pairs g, g + all warps, ... in
// batches of UNROLL vectors per lane, loading the next batch before it computes this one
// (software pipelining).
template <typename T, int M, bool XNORM, int YMODE, int UNROLL>
__global__ void __launch_bounds__(128) decode_gemv_kernel(DECODE_GEMV_PARAMS) {
  pdl_trigger();  // the decode attention after qkv starts reading the cache meanwhile
  const int lane = threadIdx.x & 31;
  const int kv = K >> 3;  // 16-byte vectors per row
  const int warps = gridDim.x * (blockDim.x >> 5), pairs = N >> 1;
  const uint4* w4 = reinterpret_cast<const uint4*>(w);
  int g = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), kb = 0;  // kb: the batch's first vector
  uint4 va[UNROLL], vb[UNROLL];
  if (g < pairs) {
    const int na = pair_row(g, pair_period, pair_stride);
    load_pair<UNROLL>(va, vb, w4 + (long long)na * kv, w4 + (long long)(na + pair_offset) * kv, lane, kv);
  }
  float acc[2][M], inv[M];
  bool have_inv = !XNORM;
#pragma unroll
  for (int m = 0; m < M; ++m) acc[0][m] = acc[1][m] = 0.f;
  // Whole warps only from here: the shuffles below need all 32 lanes.
  while (g < pairs) {
    const int na = pair_row(g, pair_period, pair_stride), nb = na + pair_offset;
    int kb2 = kb + 32 * UNROLL, g2 = g;  // warp-uniform, so the warp moves to the next pair as one
    if (kb2 >= kv) { kb2 = 0; g2 = g + warps; }
    uint4 va2[UNROLL], vb2[UNROLL];
    if (g2 < pairs) {
      const int na2 = pair_row(g2, pair_period, pair_stride);
      load_pair<UNROLL>(va2, vb2, w4 + (long long)na2 * kv, w4 + (long long)(na2 + pair_offset) * kv, kb2 + lane, kv);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int kk = kb + lane + 32 * u;
      if (kk >= kv) break;
      float fa[8], fb[8];
      unpack8<T>(va[u], fa);
      unpack8<T>(vb[u], fb);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        float xf[8];
        unpack8<T>(__ldg(reinterpret_cast<const uint4*>(x + m * x_stride) + kk), xf);
        if constexpr (XNORM) {
          float gf[8];
          unpack8<T>(__ldg(reinterpret_cast<const uint4*>(norm_w) + kk), gf);
#pragma unroll
          for (int j = 0; j < 8; ++j) xf[j] *= gf[j];
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          acc[0][m] = fmaf(fa[j], xf[j], acc[0][m]);
          acc[1][m] = fmaf(fb[j], xf[j], acc[1][m]);
        }
      }
    }
    if (g2 != g) {  // pair g is complete: reduce over the lanes; lane m writes token m's outputs
      if constexpr (XNORM) {
        if (!have_inv) { warp_inv_rms<T, M>(inv, x, x_stride, K, eps); have_inv = true; }
      }
#pragma unroll
      for (int m = 0; m < M; ++m) {
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
          acc[0][m] += __shfl_xor_sync(0xffffffffu, acc[0][m], off);
          acc[1][m] += __shfl_xor_sync(0xffffffffu, acc[1][m], off);
        }
        if constexpr (XNORM) { acc[0][m] *= inv[m]; acc[1][m] *= inv[m]; }
        if (lane == m)
          store_pair<T, YMODE>(acc[0][m], acc[1][m], m, na, nb, y, x, x_stride, norm_w, eps, w, bias, N, K,
                               pair_period, pair_stride, pair_offset, residual, positions, cos_sin, key_cache,
                               value_cache, slot_mapping, q_size, kv_size, head_dim, num_kv_heads, block_size);
        acc[0][m] = acc[1][m] = 0.f;
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) { va[u] = va2[u]; vb[u] = vb2[u]; }
    g = g2;
    kb = kb2;
  }
}
