// Paged-attention decode (one query token per sequence), GQA-aware.
//
// KV cache layout per layer (see ops/reference.py):
//     key_cache, value_cache: [num_blocks, num_kv_heads, BLOCK_SIZE, HEAD_DIM]
// so the keys of one (block, kv head) are one contiguous BLOCK_SIZE*HEAD_DIM tile.
//
// One CTA per (kv head, sequence, context partition). It holds the GQA query
// heads of its kv head (GQA = Hq / Hk of them) and reads every K/V element of
// its partition exactly once, for all of those query heads.
//
// Inside the CTA each warp takes "chunks" (CHUNK tokens of one block, CHUNK *
// HEAD_DIM * 2 bytes = 2 KB of K and 2 KB of V) round robin and streams them
// through a STAGES-deep cp.async pipeline in its own slice of shared memory.
// Lane layout: TPT = HEAD_DIM / 8 lanes own one token (8 elements = 16 bytes
// each), so a warp covers TPS = 32 / TPT tokens per 16-byte load; every lane
// reads back only the shared memory it copied itself, so the pipeline needs no
// barrier. Scores and the softmax are float32 in log2 units (the query is
// pre-scaled by scale * log2(e)), with an online softmax per warp; warps merge
// through shared memory at the end.
//
// Unsplit (gridDim.z == 1): the CTA writes the normalised output.
// Split (flash decoding, gridDim.z > 1): each partition of partition_blocks
// blocks writes (max, sum, normalised partial out) in float32, and
// paged_attention_reduce_kernel merges the partitions.
//
// Built without any header (no cuda_bf16.h): conversions are bit operations
// and PTX cvt, so that NVRTC needs no include path.

#ifndef RAYTP_DTYPES_DEFINED
#define RAYTP_DTYPES_DEFINED
// 2-byte model dtypes as plain bit containers (no cuda_bf16.h / cuda_fp16.h needed).
struct bf16_t { unsigned short bits; };
struct fp16_t { unsigned short bits; };

template <typename T> struct DT;
template <> struct DT<bf16_t> {
  static __device__ __forceinline__ float to_float(unsigned short b) {
    return __uint_as_float(((unsigned int)b) << 16);
  }
  static __device__ __forceinline__ unsigned short from_float(float f) {
    unsigned short r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
  }
  static __device__ __forceinline__ void unpack2(unsigned int w, float& lo, float& hi) {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
  }
  static __device__ __forceinline__ float load(const bf16_t* p, long long i) { return to_float(p[i].bits); }
  static __device__ __forceinline__ void store(bf16_t* p, long long i, float f) { p[i].bits = from_float(f); }
};
template <> struct DT<fp16_t> {
  static __device__ __forceinline__ float to_float(unsigned short b) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(b));
    return f;
  }
  static __device__ __forceinline__ unsigned short from_float(float f) {
    unsigned short r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
  }
  static __device__ __forceinline__ void unpack2(unsigned int w, float& lo, float& hi) {
    lo = to_float((unsigned short)(w & 0xffffu));
    hi = to_float((unsigned short)(w >> 16));
  }
  static __device__ __forceinline__ float load(const fp16_t* p, long long i) { return to_float(p[i].bits); }
  static __device__ __forceinline__ void store(fp16_t* p, long long i, float f) { p[i].bits = from_float(f); }
};
template <> struct DT<float> {
  static __device__ __forceinline__ float load(const float* p, long long i) { return p[i]; }
  static __device__ __forceinline__ void store(float* p, long long i, float f) { p[i] = f; }
};

// 8 consecutive 2-byte elements <-> 8 floats (one 16-byte vector).
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& u, float f[8]) {
  DT<T>::unpack2(u.x, f[0], f[1]);
  DT<T>::unpack2(u.y, f[2], f[3]);
  DT<T>::unpack2(u.z, f[4], f[5]);
  DT<T>::unpack2(u.w, f[6], f[7]);
}
template <typename T>
__device__ __forceinline__ uint4 pack8(const float f[8]) {
  uint4 u;
  u.x = DT<T>::from_float(f[0]) | ((unsigned int)DT<T>::from_float(f[1]) << 16);
  u.y = DT<T>::from_float(f[2]) | ((unsigned int)DT<T>::from_float(f[3]) << 16);
  u.z = DT<T>::from_float(f[4]) | ((unsigned int)DT<T>::from_float(f[5]) << 16);
  u.w = DT<T>::from_float(f[6]) | ((unsigned int)DT<T>::from_float(f[7]) << 16);
  return u;
}
#endif  // RAYTP_DTYPES_DEFINED

#define RAYTP_FULL_MASK 0xffffffffu
#define RAYTP_NEG_INF (__int_as_float(0xff800000))

__device__ __forceinline__ unsigned int smem_u32(const void* p) {
  unsigned int a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}

__device__ __forceinline__ void cp_async16(unsigned int smem_addr, const void* gptr) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr), "l"(gptr));
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::);
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Shared memory the launcher must provide (bytes): the pipeline buffers, which
// are reused for the cross-warp merge once the pipeline has drained.
//   max(NUM_WARPS * STAGES * 2 * CHUNK * HEAD_DIM * 2,
//       NUM_WARPS * GQA * (HEAD_DIM + 2) * 4)
template <typename T, int HEAD_DIM, int BLOCK_SIZE, int GQA, int NUM_WARPS, int CHUNK, int STAGES>
__global__ void __launch_bounds__(NUM_WARPS * 32)
paged_attention_decode_kernel(
    T* __restrict__ out,               // [B, Hq, D] (unsplit)
    float* __restrict__ part_out,      // [B, Hq, P, D] (split)
    float* __restrict__ part_max,      // [B, Hq, P]
    float* __restrict__ part_sum,      // [B, Hq, P]
    const T* __restrict__ query,       // [B, Hq, D], row stride q_stride elements
    const T* __restrict__ key_cache,   // [NB, Hk, BS, D]
    const T* __restrict__ value_cache, // [NB, Hk, BS, D]
    const int* __restrict__ block_tables,  // [B, max_blocks]
    const int* __restrict__ context_lens,  // [B]
    int num_kv_heads, int max_blocks, long long q_stride,
    int partition_blocks, float scale_log2) {
  static_assert(HEAD_DIM % 8 == 0 && HEAD_DIM <= 256, "head_dim");
  constexpr int VEC = 8;                    // elements per 16-byte vector
  constexpr int TPT = HEAD_DIM / VEC;       // lanes per token
  constexpr int TPS = 32 / TPT;             // tokens per warp-wide load
  constexpr int STEPS = CHUNK / TPS;        // loads per lane per chunk (K, and V)
  constexpr int CPB = BLOCK_SIZE / CHUNK;   // chunks per block
  constexpr int CHUNK_ELEMS = CHUNK * HEAD_DIM;
  static_assert(CHUNK % TPS == 0 && BLOCK_SIZE % CHUNK == 0, "chunk");
  static_assert(STAGES >= 2, "stages");

  extern __shared__ __align__(16) unsigned char smem_raw[];

  const int kvh = blockIdx.x;
  const int b = blockIdx.y;
  const int part = blockIdx.z;
  const int num_parts = gridDim.z;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int vi = lane % TPT;  // which 16-byte slice of the head
  const int ti = lane / TPT;  // which token of a warp-wide load
  const int num_heads = num_kv_heads * GQA;

  const int ctx = context_lens[b];
  const int n_blocks = (ctx + BLOCK_SIZE - 1) / BLOCK_SIZE;
  const int blk_begin = part * partition_blocks;
  if (num_parts > 1 && blk_begin >= n_blocks) return;  // the reduce skips it
  const int blk_end = min(n_blocks, blk_begin + partition_blocks);
  const int c_begin = blk_begin * CPB;
  // Chunks that hold at least one position < ctx.
  const int c_end = max(c_begin, min(blk_end * CPB, (ctx + CHUNK - 1) / CHUNK));
  const int my_first = c_begin + warp;
  const int n_k = my_first < c_end ? (c_end - my_first + NUM_WARPS - 1) / NUM_WARPS : 0;

  // Query heads of this kv head, pre-scaled into log2 units.
  float q[GQA][VEC];
#pragma unroll
  for (int g = 0; g < GQA; ++g) {
    const uint4 u = *reinterpret_cast<const uint4*>(
        query + (long long)b * q_stride + (long long)(kvh * GQA + g) * HEAD_DIM + vi * VEC);
    unpack8<T>(u, q[g]);
#pragma unroll
    for (int j = 0; j < VEC; ++j) q[g][j] *= scale_log2;
  }

  float m[GQA], l[GQA], acc[GQA][VEC];
#pragma unroll
  for (int g = 0; g < GQA; ++g) {
    m[g] = RAYTP_NEG_INF;
    l[g] = 0.f;
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[g][j] = 0.f;
  }

  // This warp's pipeline: STAGES x (K chunk, V chunk).
  T* wbuf = reinterpret_cast<T*>(smem_raw) + (size_t)warp * STAGES * 2 * CHUNK_ELEMS;
  const unsigned int wbuf_addr = smem_u32(wbuf);
  const int lane_off = ti * HEAD_DIM + vi * VEC;  // element offset inside a chunk (step 0)
  const int* bt_row = block_tables + (long long)b * max_blocks;
  const long long head_off = (long long)kvh * (BLOCK_SIZE * HEAD_DIM);
  const long long block_stride = (long long)num_kv_heads * BLOCK_SIZE * HEAD_DIM;

  int bt_reg = 0;  // lane j: physical block of this warp's chunk (k & ~31) + j
  auto issue = [&](int k) {
    if ((k & 31) == 0) {
      const int kk = k + lane;
      bt_reg = kk < n_k ? bt_row[(my_first + kk * NUM_WARPS) / CPB] : 0;
    }
    const int c = my_first + k * NUM_WARPS;
    const int phys = __shfl_sync(RAYTP_FULL_MASK, bt_reg, k & 31);
    const long long g_off = (long long)phys * block_stride + head_off +
                            (long long)(c % CPB) * CHUNK_ELEMS + lane_off;
    const T* kp = key_cache + g_off;
    const T* vp = value_cache + g_off;
    const unsigned int s_k = wbuf_addr + (unsigned)(((k % STAGES) * 2 * CHUNK_ELEMS + lane_off) * 2);
    const unsigned int s_v = s_k + CHUNK_ELEMS * 2;
#pragma unroll
    for (int st = 0; st < STEPS; ++st) cp_async16(s_k + st * TPS * HEAD_DIM * 2, kp + st * TPS * HEAD_DIM);
#pragma unroll
    for (int st = 0; st < STEPS; ++st) cp_async16(s_v + st * TPS * HEAD_DIM * 2, vp + st * TPS * HEAD_DIM);
  };

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < n_k) issue(s);
    cp_async_commit();
  }

  for (int k = 0; k < n_k; ++k) {
    cp_async_wait<STAGES - 2>();  // chunk k has landed (this lane's part of it)
    const T* sk = wbuf + (k % STAGES) * 2 * CHUNK_ELEMS + lane_off;
    const T* sv = sk + CHUNK_ELEMS;
    const int tok0 = (my_first + k * NUM_WARPS) * CHUNK;  // position of the chunk's first token
    const bool masked = tok0 + CHUNK > ctx;              // warp-uniform

    // Scores: s[st][g] for token tok0 + st*TPS + ti.
    float s[STEPS][GQA];
#pragma unroll
    for (int st = 0; st < STEPS; ++st) {
      float kf[VEC];
      unpack8<T>(*reinterpret_cast<const uint4*>(sk + st * TPS * HEAD_DIM), kf);
#pragma unroll
      for (int g = 0; g < GQA; ++g) {
        float d = 0.f;
#pragma unroll
        for (int j = 0; j < VEC; ++j) d = fmaf(q[g][j], kf[j], d);
        s[st][g] = d;
      }
    }
#pragma unroll
    for (int st = 0; st < STEPS; ++st)
#pragma unroll
      for (int g = 0; g < GQA; ++g)
#pragma unroll
        for (int o = TPT / 2; o >= 1; o >>= 1) s[st][g] += __shfl_xor_sync(RAYTP_FULL_MASK, s[st][g], o);
    if (masked) {
#pragma unroll
      for (int st = 0; st < STEPS; ++st)
        if (tok0 + st * TPS + ti >= ctx) {
#pragma unroll
          for (int g = 0; g < GQA; ++g) s[st][g] = RAYTP_NEG_INF;
        }
    }

    // Online softmax (the chunk's first token is always valid, so cmax is finite).
#pragma unroll
    for (int g = 0; g < GQA; ++g) {
      float cmax = s[0][g];
#pragma unroll
      for (int st = 1; st < STEPS; ++st) cmax = fmaxf(cmax, s[st][g]);
#pragma unroll
      for (int o = TPT; o < 32; o <<= 1) cmax = fmaxf(cmax, __shfl_xor_sync(RAYTP_FULL_MASK, cmax, o));
      const float m_new = fmaxf(m[g], cmax);
      const float alpha = exp2f(m[g] - m_new);  // 0 on the first chunk (m = -inf)
      m[g] = m_new;
      float psum = 0.f;
#pragma unroll
      for (int st = 0; st < STEPS; ++st) {
        const float p = exp2f(s[st][g] - m_new);
        s[st][g] = p;
        psum += p;
      }
      l[g] = l[g] * alpha + psum;
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[g][j] *= alpha;
    }

    // P @ V.
#pragma unroll
    for (int st = 0; st < STEPS; ++st) {
      float vf[VEC];
      unpack8<T>(*reinterpret_cast<const uint4*>(sv + st * TPS * HEAD_DIM), vf);
      if (masked && tok0 + st * TPS + ti >= ctx) {
        // Slots past the context hold stale data (maybe NaN): 0 * NaN = NaN.
#pragma unroll
        for (int j = 0; j < VEC; ++j) vf[j] = 0.f;
      }
#pragma unroll
      for (int g = 0; g < GQA; ++g)
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[g][j] = fmaf(s[st][g], vf[j], acc[g][j]);
    }

    if (k + STAGES - 1 < n_k) issue(k + STAGES - 1);
    cp_async_commit();
  }
  cp_async_wait<0>();

  // Merge the token groups of the warp (lanes with the same vi).
#pragma unroll
  for (int g = 0; g < GQA; ++g) {
#pragma unroll
    for (int o = TPT; o < 32; o <<= 1) l[g] += __shfl_xor_sync(RAYTP_FULL_MASK, l[g], o);
#pragma unroll
    for (int j = 0; j < VEC; ++j)
#pragma unroll
      for (int o = TPT; o < 32; o <<= 1) acc[g][j] += __shfl_xor_sync(RAYTP_FULL_MASK, acc[g][j], o);
  }

  // Merge the warps through shared memory (reusing the pipeline buffers).
  __syncthreads();
  float* sm_acc = reinterpret_cast<float*>(smem_raw);         // [NUM_WARPS][GQA][HEAD_DIM]
  float* sm_m = sm_acc + NUM_WARPS * GQA * HEAD_DIM;          // [NUM_WARPS][GQA]
  float* sm_l = sm_m + NUM_WARPS * GQA;                       // [NUM_WARPS][GQA]
  if (ti == 0) {
#pragma unroll
    for (int g = 0; g < GQA; ++g) {
      float4* dst = reinterpret_cast<float4*>(sm_acc + (warp * GQA + g) * HEAD_DIM + vi * VEC);
      dst[0] = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
      dst[1] = make_float4(acc[g][4], acc[g][5], acc[g][6], acc[g][7]);
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < GQA; ++g) {
      sm_m[warp * GQA + g] = m[g];
      sm_l[warp * GQA + g] = l[g];
    }
  }
  __syncthreads();

  for (int idx = threadIdx.x; idx < GQA * HEAD_DIM; idx += NUM_WARPS * 32) {
    const int g = idx / HEAD_DIM;
    const int d = idx % HEAD_DIM;
    float M = RAYTP_NEG_INF;
#pragma unroll
    for (int w = 0; w < NUM_WARPS; ++w) M = fmaxf(M, sm_m[w * GQA + g]);
    float L = 0.f, O = 0.f;
    if (M != RAYTP_NEG_INF) {
#pragma unroll
      for (int w = 0; w < NUM_WARPS; ++w) {
        const float f = exp2f(sm_m[w * GQA + g] - M);
        L = fmaf(sm_l[w * GQA + g], f, L);
        O = fmaf(sm_acc[(w * GQA + g) * HEAD_DIM + d], f, O);
      }
    }
    const float o = L > 0.f ? O / L : 0.f;
    const int hq = kvh * GQA + g;
    if (num_parts == 1) {
      DT<T>::store(out, ((long long)b * num_heads + hq) * HEAD_DIM + d, o);
    } else {
      const long long pi = ((long long)b * num_heads + hq) * num_parts + part;
      part_out[pi * HEAD_DIM + d] = o;
      if (d == 0) {
        part_max[pi] = M;
        part_sum[pi] = L;
      }
    }
  }
}

// Merges the partitions of the split kernel. Grid (Hq, B); dynamic shared
// memory: num_parts floats.
template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(128)
paged_attention_reduce_kernel(
    T* __restrict__ out,                   // [B, Hq, D]
    const float* __restrict__ part_out,    // [B, Hq, P, D]
    const float* __restrict__ part_max,    // [B, Hq, P]
    const float* __restrict__ part_sum,    // [B, Hq, P]
    const int* __restrict__ context_lens,  // [B]
    int num_parts, int partition_tokens) {
  extern __shared__ float sm_w[];
  const int h = blockIdx.x;
  const int b = blockIdx.y;
  const int num_heads = gridDim.x;
  const int ctx = context_lens[b];
  const int n_p = min(num_parts, (ctx + partition_tokens - 1) / partition_tokens);
  const long long base = ((long long)b * num_heads + h) * num_parts;

  float M = RAYTP_NEG_INF;
  for (int p = 0; p < n_p; ++p) M = fmaxf(M, part_max[base + p]);
  for (int p = threadIdx.x; p < n_p; p += blockDim.x) {
    const float mp = part_max[base + p];
    sm_w[p] = (mp == RAYTP_NEG_INF) ? 0.f : part_sum[base + p] * exp2f(mp - M);
  }
  __syncthreads();
  float total = 0.f;
  for (int p = 0; p < n_p; ++p) total += sm_w[p];
  const float inv = total > 0.f ? 1.f / total : 0.f;
  for (int d = threadIdx.x; d < HEAD_DIM; d += blockDim.x) {
    float o = 0.f;
    for (int p = 0; p < n_p; ++p) o = fmaf(sm_w[p], part_out[(base + p) * HEAD_DIM + d], o);
    DT<T>::store(out, ((long long)b * num_heads + h) * HEAD_DIM + d, o * inv);
  }
}
