// The 2-byte model dtypes and their conversions, and the programmatic-dependent-launch controls,
// shared by every kernel source: ops/cupy_runtime.py compiles each .cu with this file in front
// (NVRTC gets no include path, so no cuda_bf16.h).

// 2-byte model dtypes as plain bit containers.
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

// Programmatic dependent launch (ops/cupy_runtime.py, _launch_dependent): a kernel launched
// with it may start while the kernel before it runs, and must pass pdl_wait() before it
// reads anything that kernel writes (reading it with __ldcg: nothing stale from L1);
// pdl_trigger() lets the next kernel, if launched so, start. No-ops before sm_90 and for
// kernels launched the ordinary way.
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}
