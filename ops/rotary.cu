// Rotary position embedding (neox / HF rotate_half), as ops/reference.py defines it.

// VEC consecutive elements of a row <-> VEC floats: one 16-byte vector of a 2-byte dtype,
// two of float, or (VEC = 1) a scalar of either.
template <typename T, int VEC> struct Vec;
template <typename T> struct Vec<T, 1> {
  static __device__ __forceinline__ void load(const T* p, float f[1]) { f[0] = DT<T>::load(p, 0); }
  static __device__ __forceinline__ void store(T* p, const float f[1]) { DT<T>::store(p, 0, f[0]); }
};
template <typename T> struct Vec<T, 8> {  // bf16_t, fp16_t: p 16-byte aligned
  static __device__ __forceinline__ void load(const T* p, float f[8]) {
    unpack8<T>(*reinterpret_cast<const uint4*>(p), f);
  }
  static __device__ __forceinline__ void store(T* p, const float f[8]) {
    *reinterpret_cast<uint4*>(p) = pack8<T>(f);
  }
};
template <> struct Vec<float, 8> {  // p 16-byte aligned
  static __device__ __forceinline__ void load(const float* p, float f[8]) {
    const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w; f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
  }
};

// Neox-style rotary embedding, in place, as ops/reference.py defines it:
//   (x1, x2) = halves of a head; out = (x1*cos - x2*sin, x2*cos + x1*sin),
//   cos/sin = cos_sin_cache[pos] = (cos | sin), each D/2 wide; math in float32.
// Grid: (T, S): the S CTAs of a token stride over its items of VEC pairs, query heads
// first, then key heads (S > 1 spreads a small batch over more SMs). query/key rows have
// token strides q_stride / k_stride (elements); heads within a token are contiguous
// (stride D). VEC = 8 (16-byte loads: a prefill step's rows are bandwidth, not latency)
// needs D/2 % 8 == 0 and 16-byte aligned rows and cache.
// CT: dtype of cos_sin_cache (float or T).
template <typename T, typename CT, int VEC>
__global__ void __launch_bounds__(256)
rotary_embedding_kernel(T* __restrict__ query, T* __restrict__ key,
                        const long long* __restrict__ positions,
                        const CT* __restrict__ cos_sin_cache,
                        long long q_stride, long long k_stride,
                        int num_heads, int num_kv_heads, int head_dim) {
  const long long t = blockIdx.x;
  const int half = head_dim / 2;
  const int per_head = half / VEC;
  const CT* cs = cos_sin_cache + positions[t] * head_dim;
  const int nq = num_heads * per_head;
  const int total = (num_heads + num_kv_heads) * per_head;
  for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < total; i += gridDim.y * blockDim.x) {
    T* base;
    int h, j;
    if (i < nq) {
      h = i / per_head; j = (i - h * per_head) * VEC;
      base = query + t * q_stride + (long long)h * head_dim;
    } else {
      const int ik = i - nq;
      h = ik / per_head; j = (ik - h * per_head) * VEC;
      base = key + t * k_stride + (long long)h * head_dim;
    }
    float c[VEC], s[VEC], x1[VEC], x2[VEC];
    Vec<CT, VEC>::load(cs + j, c);
    Vec<CT, VEC>::load(cs + half + j, s);
    Vec<T, VEC>::load(base + j, x1);
    Vec<T, VEC>::load(base + half + j, x2);
    float o1[VEC], o2[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      o1[e] = x1[e] * c[e] - x2[e] * s[e];
      o2[e] = x2[e] * c[e] + x1[e] * s[e];
    }
    Vec<T, VEC>::store(base + j, o1);
    Vec<T, VEC>::store(base + half + j, o2);
  }
}
