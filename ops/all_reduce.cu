// All-reduce over the TP ranks of one node, fused with the residual add and RMSNorm
// that follow every row-parallel layer (compiled after layernorm.cu, whose helpers
// it uses). As ops/reference.py's all_reduce_rms_norm:
//   x = T(sum over ranks of float(partial_r));  residual_out = T(float(x) + float(residual))
//   out = rms_norm(residual_out)
//
// Every rank owns a buffer (two halves) and a flag area in symmetric memory (torch),
// which the peers load and store over NVLink; bufs[r] / flags[r] are rank r's. CTA b
// owns rows b, b + gridDim.x, ... on every rank (all ranks launch the same grid), so
// it only meets CTA b of each peer:
//   1. copy its rows of this rank's partial into the own buffer's half (epoch parity);
//   2. barrier: tell every peer's CTA b, wait until they told us;
//   3. per row: sum the row over all buffers' halves, add the residual, norm.
// No barrier at the end: the next call writes the other half, and the call after that
// writes this half again only once this rank finished the call in between, whose
// barriers no CTA passed before a peer started that call, i.e. finished this one
// (stream order), reads of our half included.
// The epoch, the number of calls so far plus one, picks the half and marks the barrier
// flags (64-bit, never reset, never wrapping). epochs[] keeps it in every slot, of
// launched CTAs or not, so all CTAs of a call agree whatever the earlier grids, and
// every rank makes the same calls, so the ranks agree. The grid never exceeds the SM
// count: all CTAs are resident and the spin-waits cannot starve a CTA a peer waits for.

constexpr int AR_MAX_RANKS = 8;
constexpr int AR_MAX_CTAS = 1024;  // flag slots per barrier (>= any SM count)

typedef unsigned long long u64;

__device__ __forceinline__ void st_release_sys(u64* p, u64 v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ u64 ld_acquire_sys(const u64* p) {
  u64 v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

// CTA blockIdx.x of every rank arrives here before any leaves. flags[r] holds
// [AR_MAX_CTAS][AR_MAX_RANKS] epochs; slot (cta, from-rank).
__device__ __forceinline__ void cta_barrier(u64* const* flags, u64 epoch, int rank, int world) {
  __syncthreads();  // this CTA's earlier writes happen before the release below
  if (threadIdx.x < world) {
    const long long slot = (long long)blockIdx.x * AR_MAX_RANKS;
    st_release_sys(flags[threadIdx.x] + slot + rank, epoch);
    const u64* mine = flags[rank] + slot + threadIdx.x;
    while (ld_acquire_sys(mine) < epoch) {
    }
  }
  __syncthreads();
}

// partial / residual / out / residual_out: contiguous [rows, hidden]; hidden % 8 == 0 and
// 16-byte aligned rows (the launcher checks). 8 elements (16 bytes) per access.
template <typename T, typename WT>
__global__ void __launch_bounds__(1024)
all_reduce_rms_norm_kernel(T* __restrict__ out, T* __restrict__ residual_out,
                           const T* __restrict__ partial, const T* __restrict__ residual,
                           const WT* __restrict__ weight, T* const* __restrict__ bufs,
                           u64* const* __restrict__ flags, u64* __restrict__ epochs,
                           long long half, int rank, int world, int rows, int hidden, float eps) {
  __shared__ float sm[32];
  const u64 epoch = epochs[blockIdx.x] + 1;
  const long long off = (long long)(epoch & 1) * half;  // elements: this call's half of every buffer
  T* own = bufs[rank] + off;
  for (int row = blockIdx.x; row < rows; row += gridDim.x) {
    const long long base = (long long)row * hidden;
    for (int i = threadIdx.x * 8; i < hidden; i += blockDim.x * 8)
      *reinterpret_cast<uint4*>(own + base + i) = *reinterpret_cast<const uint4*>(partial + base + i);
  }
  cta_barrier(flags, epoch, rank, world);

  for (int row = blockIdx.x; row < rows; row += gridDim.x) {
    const long long base = (long long)row * hidden;
    float ss = 0.f;
    for (int i = threadIdx.x * 8; i < hidden; i += blockDim.x * 8) {
      float sum[8], f[8];
      unpack8<T>(*reinterpret_cast<const uint4*>(bufs[0] + off + base + i), sum);
      for (int r = 1; r < world; ++r) {
        unpack8<T>(*reinterpret_cast<const uint4*>(bufs[r] + off + base + i), f);
#pragma unroll
        for (int j = 0; j < 8; ++j) sum[j] += f[j];
      }
      unpack8<T>(pack8<T>(sum), sum);  // the all-reduced value, rounded to T
      unpack8<T>(*reinterpret_cast<const uint4*>(residual + base + i), f);
#pragma unroll
      for (int j = 0; j < 8; ++j) f[j] += sum[j];
      const uint4 r = pack8<T>(f);
      *reinterpret_cast<uint4*>(residual_out + base + i) = r;
      unpack8<T>(r, f);  // the norm reads the sum rounded to T (the stored residual)
#pragma unroll
      for (int j = 0; j < 8; ++j) ss = fmaf(f[j], f[j], ss);
    }
    const float inv = rsqrtf(block_sum(ss, sm) / (float)hidden + eps);
    for (int i = threadIdx.x * 8; i < hidden; i += blockDim.x * 8) {
      float f[8];
      unpack8<T>(*reinterpret_cast<const uint4*>(residual_out + base + i), f);
#pragma unroll
      for (int j = 0; j < 8; ++j) f[j] = f[j] * inv * DT<WT>::load(weight, i + j);
      *reinterpret_cast<uint4*>(out + base + i) = pack8<T>(f);
    }
    __syncthreads();  // block_sum's shared slots are reused by the next row
  }
  // Every thread read epochs[blockIdx.x] before the barrier; slot j is CTA (j % grid)'s.
  for (int j = blockIdx.x + threadIdx.x * gridDim.x; j < AR_MAX_CTAS; j += blockDim.x * gridDim.x)
    epochs[j] = epoch;
}
