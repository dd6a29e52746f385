// Rotary position embedding (neox / HF rotate_half), as ops/reference.py defines it.

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

// Neox-style rotary embedding, in place, as ops/reference.py defines it:
//   (x1, x2) = halves of a head; out = (x1*cos - x2*sin, x2*cos + x1*sin),
//   cos/sin = cos_sin_cache[pos] = (cos | sin), each D/2 wide; math in float32.
// Grid: (T, S): the S CTAs of a token stride over its (head, pair) items, query
// heads first, then key heads (S > 1 spreads a small batch over more SMs). query/key rows have token strides q_stride / k_stride
// (elements); heads within a token are contiguous (stride D).
// CT: dtype of cos_sin_cache (float or T).
template <typename T, typename CT>
__global__ void __launch_bounds__(256)
rotary_embedding_kernel(T* __restrict__ query, T* __restrict__ key,
                        const long long* __restrict__ positions,
                        const CT* __restrict__ cos_sin_cache,
                        long long q_stride, long long k_stride,
                        int num_heads, int num_kv_heads, int head_dim) {
  const long long t = blockIdx.x;
  const int half = head_dim / 2;
  const CT* cs = cos_sin_cache + positions[t] * head_dim;
  const int nq = num_heads * half;
  const int total = (num_heads + num_kv_heads) * half;
  for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < total; i += gridDim.y * blockDim.x) {
    T* base;
    int h, j;
    if (i < nq) {
      h = i / half; j = i - h * half;
      base = query + t * q_stride + (long long)h * head_dim;
    } else {
      const int ik = i - nq;
      h = ik / half; j = ik - h * half;
      base = key + t * k_stride + (long long)h * head_dim;
    }
    const float c = DT<CT>::load(cs, j);
    const float s = DT<CT>::load(cs, half + j);
    const float x1 = DT<T>::load(base, j);
    const float x2 = DT<T>::load(base, half + j);
    DT<T>::store(base, j, x1 * c - x2 * s);
    DT<T>::store(base, half + j, x2 * c + x1 * s);
  }
}
