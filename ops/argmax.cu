// Row-wise argmax of float32 logits for greedy sampling, as ops/reference.py's argmax (torch's
// argmax): the first index of the maximum, a NaN counting as larger than any number. Two
// passes: CTAs over chunks of each row, then one warp per row over the chunks' winners.
// torch's reduction takes ~28 us for one 128256-wide row (Llama 3's vocabulary) on an H200;
// one CTA per row, streaming it alone, still took 20.

// (v, i) comes before (best, bi) in the order argmax picks from.
__device__ __forceinline__ bool argmax_better(float v, int i, float best, int bi) {
  const bool vn = v != v, bn = best != best;
  if (vn != bn) return vn;
  if (!vn && v != best) return v > best;
  return i < bi;
}

__device__ __forceinline__ void argmax_take(float v, int i, float& best, int& bi) {
  if (argmax_better(v, i, best, bi)) { best = v; bi = i; }
}

__device__ __forceinline__ void argmax_warp(float& best, int& bi) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float v = __shfl_xor_sync(0xffffffffu, best, off);
    const int i = __shfl_xor_sync(0xffffffffu, bi, off);
    argmax_take(v, i, best, bi);
  }
}

#define ARGMAX_NONE_V (-__int_as_float(0x7f800000))  // (-inf, INT_MAX): every element beats it
#define ARGMAX_NONE_I 0x7fffffff

// Grid (chunks, rows), 256 threads: chunk c of row r -> its winner in part_[r * chunks + c].
// VEC: 4 reads float4 (row stride, width and chunk multiples of 4, 16-byte aligned rows).
template <int VEC>
__global__ void __launch_bounds__(256)
argmax_chunks_kernel(float* __restrict__ part_v, int* __restrict__ part_i, const float* __restrict__ x,
                     long long row_stride, int width, int chunk) {
  const float* row = x + blockIdx.y * row_stride;
  const int begin = blockIdx.x * chunk, end = min(width, begin + chunk);
  float best = ARGMAX_NONE_V;
  int bi = ARGMAX_NONE_I;
  if constexpr (VEC == 4) {
    for (int j = begin + 4 * threadIdx.x; j < end; j += 4 * blockDim.x) {
      const float4 v = __ldg(reinterpret_cast<const float4*>(row + j));
      argmax_take(v.x, j, best, bi);
      argmax_take(v.y, j + 1, best, bi);
      argmax_take(v.z, j + 2, best, bi);
      argmax_take(v.w, j + 3, best, bi);
    }
  } else {
    for (int j = begin + threadIdx.x; j < end; j += blockDim.x) argmax_take(__ldg(row + j), j, best, bi);
  }
  argmax_warp(best, bi);
  __shared__ float s_v[8];
  __shared__ int s_i[8];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) { s_v[warp] = best; s_i[warp] = bi; }
  __syncthreads();
  if (warp != 0) return;
  best = lane < (int)(blockDim.x >> 5) ? s_v[lane] : ARGMAX_NONE_V;
  bi = lane < (int)(blockDim.x >> 5) ? s_i[lane] : ARGMAX_NONE_I;
  argmax_warp(best, bi);
  if (lane == 0) {
    part_v[blockIdx.y * gridDim.x + blockIdx.x] = best;
    part_i[blockIdx.y * gridDim.x + blockIdx.x] = bi;
  }
}

// Grid (rows), one warp (W = 32): out[r] = the winner among row r's chunk winners.
template <int W>
__global__ void __launch_bounds__(W)
argmax_rows_kernel(long long* __restrict__ out, const float* __restrict__ part_v, const int* __restrict__ part_i,
                   int chunks) {
  float best = ARGMAX_NONE_V;
  int bi = ARGMAX_NONE_I;
  for (int c = threadIdx.x; c < chunks; c += W)
    argmax_take(part_v[blockIdx.x * chunks + c], part_i[blockIdx.x * chunks + c], best, bi);
  argmax_warp(best, bi);
  if (threadIdx.x == 0) out[blockIdx.x] = bi;  // a real index: every element beats the start
}
