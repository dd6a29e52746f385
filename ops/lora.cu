// Multi-LoRA for decode-sized batches (workers/lora.py; ops/reference.py's lora_apply): each
// row t applies the adapter in its slot s = slots[t] (-1: none), reading only that slot.
//   a  [L * W, K]: every slot's A (W rows per slot);   bt [L * W, N]: every slot's B^T
//   (the scale folded in);   out [T, N] += (x[t] . A_s^T) . Bt_s,   with h = x . A_s^T in float32.
// Two kernels per linear (a gather of the slot is never materialized); K and W multiples of 8.

// shrink: h[t, w] = sum_k x[t, k] * a[s * W + w, k]. Grid (T, W), block 256: a block per
// (t, w), its threads over K in 16-byte loads (unrolled, so that loads overlap), then reduced.
template <typename T>
__global__ void __launch_bounds__(256)
lora_shrink_kernel(float* __restrict__ h, const T* __restrict__ x, const T* __restrict__ a,
                   const long long* __restrict__ slots, int K, int W) {
  __shared__ float warp_sums[8];
  const int t = blockIdx.x, w = blockIdx.y;
  const long long s = slots[t];
  if (s < 0) {
    if (threadIdx.x == 0) h[(long long)t * W + w] = 0.f;
    return;
  }
  const T* xr = x + (long long)t * K;
  const T* ar = a + (s * W + w) * (long long)K;
  float acc = 0.f;
#pragma unroll 4
  for (int k = threadIdx.x * 8; k < K; k += 256 * 8) {
    float xv[8], av[8];
    unpack8<T>(*reinterpret_cast<const uint4*>(xr + k), xv);
    unpack8<T>(*reinterpret_cast<const uint4*>(ar + k), av);
#pragma unroll
    for (int j = 0; j < 8; ++j) acc = fmaf(xv[j], av[j], acc);
  }
#pragma unroll
  for (int o = 16; o; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) total += warp_sums[i];
    h[(long long)t * W + w] = total;
  }
}

// expand: out[t, n] += sum_w h[t, w] * bt[s * W + w, n]. Grid (T, ceil(N / 128)), block 128:
// one thread per output, reads of bt coalesced along n and 8 in flight; rows without a slot
// are left alone.
template <typename T>
__global__ void __launch_bounds__(128)
lora_expand_kernel(T* __restrict__ out, const float* __restrict__ h, const T* __restrict__ bt,
                   const long long* __restrict__ slots, int N, int W) {
  const int t = blockIdx.x;
  const int n = blockIdx.y * 128 + threadIdx.x;
  const long long s = slots[t];
  if (s < 0 || n >= N) return;
  const float* hr = h + (long long)t * W;
  const T* b = bt + s * W * (long long)N + n;
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int w = 0; w < W; w += 8) {  // W is a multiple of 8
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[j] = fmaf(hr[w + j], DT<T>::load(b, (long long)(w + j) * N), acc[j]);
  }
  float total = 0.f;
#pragma unroll
  for (int j = 0; j < 8; ++j) total += acc[j];
  const long long i = (long long)t * N + n;
  DT<T>::store(out, i, DT<T>::load(out, i) + total);
}
