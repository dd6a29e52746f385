// The reduce step of split paged-attention decode (ops/paged_attention.cu, compiled in
// front: partition_blocks_of, DT, RAYTP_NEG_INF).

// Merges the partitions of the split kernel. Grid (Hq, B), 128 threads;
// dynamic shared memory: num_parts floats. max_tokens = max_blocks * block_size
// (the decode kernel clamps contexts to it too).
template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(128)
paged_attention_reduce_kernel(
    T* __restrict__ out,                   // [B, Hq, D]
    const float* __restrict__ part_out,    // [B, Hq, P, D]
    const float* __restrict__ part_max,    // [B, Hq, P]
    const float* __restrict__ part_sum,    // [B, Hq, P]
    const int* __restrict__ context_lens,  // [B]
    int num_parts, int block_size, int max_tokens) {
  extern __shared__ float sm_w[];
  const int h = blockIdx.x;
  const int b = blockIdx.y;
  const int num_heads = gridDim.x;
  const int ctx = min(context_lens[b], max_tokens);
  const int n_blocks = (ctx + block_size - 1) / block_size;
  const int pb = partition_blocks_of(n_blocks, num_parts);
  const int n_p = (n_blocks + pb - 1) / pb;  // the partitions holding context
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
    float acc = 0.f;
    for (int p = 0; p < n_p; ++p) acc = fmaf(sm_w[p], part_out[(base + p) * HEAD_DIM + d], acc);
    DT<T>::store(out, ((long long)b * num_heads + h) * HEAD_DIM + d, acc * inv);
  }
}
