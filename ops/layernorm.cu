// rms_norm and fused_add_rms_norm, as ops/reference.py defines them:
//   rms_norm(x):        out = T(float(x) * rsqrt(mean(float(x)^2) + eps) * float(w))
//   fused_add_rms_norm: r = T(float(x) + float(res)); out = rms_norm(r); returns (out, r)
// One CTA per row; 16-byte accesses when the hidden size and strides allow
// (VEC = 8), else element by element (VEC = 1). Out of place.

// Loads/stores VEC consecutive elements of a 2-byte dtype T as floats:
// one 16-byte access for VEC == 8, else element by element.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float f[VEC]) {
  if constexpr (VEC == 8) {
    unpack8<T>(*reinterpret_cast<const uint4*>(p), f);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) f[j] = DT<T>::load(p, j);
  }
}
template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const float f[VEC]) {
  if constexpr (VEC == 8) {
    *reinterpret_cast<uint4*>(p) = pack8<T>(f);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) DT<T>::store(p, j, f[j]);
  }
}

// Sum over the CTA (blockDim.x a multiple of 32, at most 1024).
__device__ __forceinline__ float block_sum(float v, float* sm) {
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  if (lane == 0) sm[warp] = v;
  __syncthreads();
  float t = 0.f;
  for (int w = 0; w < nw; ++w) t += sm[w];
  return t;
}

// One CTA per row. x / residual rows have strides x_stride / r_stride
// (elements); out and residual_out are contiguous [T, hidden].
// WT: weight dtype (T or float).
template <typename T, typename WT, int VEC, bool FUSED>
__global__ void __launch_bounds__(1024)
rms_norm_kernel(T* __restrict__ out, T* __restrict__ residual_out,
                const T* __restrict__ x, const T* __restrict__ residual,
                const WT* __restrict__ weight, long long x_stride, long long r_stride,
                int hidden, float eps) {
  __shared__ float sm[32];
  const long long row = blockIdx.x;
  const T* xr = x + row * x_stride;
  T* outr = out + row * (long long)hidden;

  float ss = 0.f;
  for (int i = threadIdx.x * VEC; i < hidden; i += blockDim.x * VEC) {
    float f[VEC];
    load_vec<T, VEC>(xr + i, f);
    if constexpr (FUSED) {
      float r[VEC];
      load_vec<T, VEC>(residual + row * r_stride + i, r);
#pragma unroll
      for (int j = 0; j < VEC; ++j) f[j] += r[j];
      store_vec<T, VEC>(residual_out + row * (long long)hidden + i, f);
      // The norm reads the sum rounded to T (the stored residual).
      load_vec<T, VEC>(residual_out + row * (long long)hidden + i, f);
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) ss = fmaf(f[j], f[j], ss);
  }
  const float inv = rsqrtf(block_sum(ss, sm) / (float)hidden + eps);

  const T* src = FUSED ? residual_out + row * (long long)hidden : xr;
  for (int i = threadIdx.x * VEC; i < hidden; i += blockDim.x * VEC) {
    float f[VEC];
    load_vec<T, VEC>(src + i, f);
#pragma unroll
    for (int j = 0; j < VEC; ++j) f[j] = f[j] * inv * DT<WT>::load(weight, i + j);
    store_vec<T, VEC>(outr + i, f);
  }
}
