// Multi-LoRA for decode-sized batches (workers/lora.py; ops/reference.py's lora_apply): each
// row t applies the adapter in its slot s = slots[t] (-1: none), reading only that slot.
//   a  [L * W, K]: every slot's A (W rows per slot);   bt [L * W, N]: every slot's B^T
//   (the scale folded in);   out [T, N] += (x[t] . A_s^T) . Bt_s,   with h = x . A_s^T in float32.
// Two kernels per linear (a gather of the slot is never materialized); K and W multiples of 8.

// shrink: h[t, w] = sum_k x[t, k] * a[s * W + w, k]. Grid (T, ceil(W / 8)), block (32, 8):
// one warp per (t, w), 16-byte loads along K.
template <typename T>
__global__ void __launch_bounds__(256)
lora_shrink_kernel(float* __restrict__ h, const T* __restrict__ x, const T* __restrict__ a,
                   const long long* __restrict__ slots, int K, int W) {
  const int t = blockIdx.x;
  const int w = blockIdx.y * 8 + threadIdx.y;
  if (w >= W) return;
  const long long s = slots[t];
  float acc = 0.f;
  if (s >= 0) {
    const T* xr = x + (long long)t * K;
    const T* ar = a + (s * W + w) * (long long)K;
    for (int k = threadIdx.x * 8; k < K; k += 256) {
      float xv[8], av[8];
      unpack8<T>(*reinterpret_cast<const uint4*>(xr + k), xv);
      unpack8<T>(*reinterpret_cast<const uint4*>(ar + k), av);
#pragma unroll
      for (int j = 0; j < 8; ++j) acc = fmaf(xv[j], av[j], acc);
    }
#pragma unroll
    for (int o = 16; o; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  }
  if (threadIdx.x == 0) h[(long long)t * W + w] = acc;
}

// expand: out[t, n] += sum_w h[t, w] * bt[s * W + w, n]. Grid (T, ceil(N / 256)), block 256:
// one thread per output, reads of bt coalesced along n; rows without a slot are left alone.
template <typename T>
__global__ void __launch_bounds__(256)
lora_expand_kernel(T* __restrict__ out, const float* __restrict__ h, const T* __restrict__ bt,
                   const long long* __restrict__ slots, int N, int W) {
  const int t = blockIdx.x;
  const int n = blockIdx.y * 256 + threadIdx.x;
  const long long s = slots[t];
  if (s < 0 || n >= N) return;
  const float* hr = h + (long long)t * W;
  const T* b = bt + s * W * (long long)N + n;
  float acc = 0.f;
  for (int w = 0; w < W; ++w) acc = fmaf(hr[w], DT<T>::load(b, (long long)w * N), acc);
  const long long i = (long long)t * N + n;
  DT<T>::store(out, i, DT<T>::load(out, i) + acc);
}
