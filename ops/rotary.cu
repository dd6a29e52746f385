// Rotary position embedding (neox / HF rotate_half), as ops/reference.py defines it.

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
