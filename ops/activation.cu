// silu_and_mul (SwiGLU activation), as ops/reference.py defines it.

// silu_and_mul: x [T, 2I] = (gate | up) -> out [T, I] = T(silu(float(gate)) * float(up)).
// Grid (T, ceil(I / (VEC * blockDim.x))); x rows have stride x_stride elements.
template <typename T, int VEC>
__global__ void __launch_bounds__(256)
silu_and_mul_kernel(T* __restrict__ out, const T* __restrict__ x, long long x_stride, int inter) {
  const long long row = blockIdx.x;
  const int i = (blockIdx.y * blockDim.x + threadIdx.x) * VEC;
  if (i >= inter) return;
  const T* gate = x + row * x_stride + i;
  const T* up = gate + inter;
  float g[VEC], u[VEC], o[VEC];
  if constexpr (VEC == 8) {
    unpack8<T>(*reinterpret_cast<const uint4*>(gate), g);
    unpack8<T>(*reinterpret_cast<const uint4*>(up), u);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) { g[j] = DT<T>::load(gate, j); u[j] = DT<T>::load(up, j); }
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) o[j] = g[j] / (1.f + __expf(-g[j])) * u[j];
  T* dst = out + row * (long long)inter + i;
  if constexpr (VEC == 8) {
    *reinterpret_cast<uint4*>(dst) = pack8<T>(o);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) DT<T>::store(dst, j, o[j]);
  }
}
