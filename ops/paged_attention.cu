// Paged-attention decode (one query token per sequence), GQA-aware, on tensor cores.
//
// KV cache layout per layer (see ops/reference.py):
//     key_cache, value_cache: [num_blocks, num_kv_heads, BLOCK_SIZE, HEAD_DIM]
// so the 16 tokens of one "tile" (16 consecutive positions inside one block,
// one kv head) are one contiguous 16 * HEAD_DIM run of K (and of V).
//
// Grid (num_kv_heads * n_sub, B, num_parts). One CTA per (kv head, group of
// up to 16 query heads of that kv head, sequence, context partition): it
// reads every K/V element of its partition once, for all of its query heads.
// The query heads are the 16 rows of an m16n8k16 MMA (rows >= nrows are
// zero padding), so S = Q K^T and O += P V run on tensor cores with float32
// accumulators, as in FlashAttention-2:
//   S[16 x 8 tokens]  = mma(A = Q [16 x 16 dims], B = K^T tile (ldmatrix))
//   O[16 x 8 dims]   += mma(A = P [16 x 16 tokens] (from S's registers),
//                           B = V tile (ldmatrix.trans))
// Each warp takes tiles round robin and streams them through its own
// STAGES-deep cp.async pipeline in its own slice of shared memory (rows
// XOR-swizzled in 16-byte units so ldmatrix is conflict-free). Positions past
// the context are zero-filled by cp.async (no read), so stale or NaN cache
// slots never reach the MMA; their scores are masked to -inf. The softmax is
// online, in float32, in log2 units (scores * scale * log2(e)); warps merge
// through shared memory at the end.
//
// Unsplit (gridDim.z == 1): the CTA writes the normalised output.
// Split (flash decoding, gridDim.z > 1): a sequence of n blocks is cut into
// partitions of pb = ceil(n / gridDim.z) blocks, per sequence and at run time
// (partition_blocks below), so a CUDA graph whose grid is sized for
// max_model_len still spreads a short context over all its partitions;
// partition p covers blocks [p * pb, (p + 1) * pb) and writes (max, sum,
// normalised partial out) in float32 and paged_attention_reduce_kernel merges
// the partitions. Partitions past a sequence's context return at once (a CUDA
// graph sizes the grid for max_model_len); the reduce reads only valid ones.
// Cluster split (sm_90, paged_attention_decode_cluster_kernel): the partitions of
// one (kv head, sequence) form a thread-block cluster and merge in distributed
// shared memory, without the reduce kernel.
//
// Programmatic dependent launch (sm_90, enable_pdl in ops/cupy_attention.py): in a decode
// step the kernel before this one (qkv) writes only q and each sequence's newest K/V. The
// kernel starts while it runs, issues its first tiles without the newest position, then
// pdl_wait()s, and loads that row and q (copy_row, the Q fragments) after the wait: at
// batch 1 most of the cache read hides behind the qkv GEMV.
//
// Needs sm_80+ (cp.async, ldmatrix, bf16 mma), the cluster variant sm_90. Built
// without any header (ops/dtypes.cu and ops/warp_ptx.cu are compiled in front):
// conversions are bit operations and PTX, so NVRTC needs no include path.

// Byte offset of 16-byte column c of row r in a tile of rows row_bytes long, XOR-swizzled
// over 8 rows (the layout cp.async writes and ldmatrix reads without bank conflicts).
__device__ __forceinline__ unsigned int swizzled(int r, int c, int row_bytes) {
  return (unsigned int)(r * row_bytes + ((c ^ (r & 7)) << 4));
}

// Row r of a K tile (at kp) and a V tile (at vp) into their stage (at s_k, V tile_bytes
// after it, rows swizzled as the cp.async copies place them), by plain loads through L2:
// the newest position, which the kernel before this one may have written.
template <int HEAD_DIM, typename T>
__device__ __forceinline__ void copy_row(unsigned int s_k, int tile_bytes, const T* kp, const T* vp, int r, int lane) {
  constexpr int COLS = HEAD_DIM / 8;  // 16-byte columns per row
  if (lane >= COLS) return;
  const unsigned int soff = swizzled(r, lane, HEAD_DIM * 2);
  st_shared16(s_k + soff, __ldcg(reinterpret_cast<const uint4*>(kp + r * HEAD_DIM) + lane));
  st_shared16(s_k + tile_bytes + soff, __ldcg(reinterpret_cast<const uint4*>(vp + r * HEAD_DIM) + lane));
}

// Blocks per partition when n_blocks are split into num_parts (at least 1, so that the
// number of partitions holding context, ceil(n_blocks / pb), is defined for n_blocks 0).
__device__ __forceinline__ int partition_blocks_of(int n_blocks, int num_parts) {
  return max(1, (n_blocks + num_parts - 1) / num_parts);
}

#define PAGED_DECODE_PARAMS                                                                        \
  T *__restrict__ out,                     /* [B, Hq, D] (unsplit, cluster) */                     \
      float *__restrict__ part_out,        /* [B, Hq, P, D] (split) */                             \
      float *__restrict__ part_max,        /* [B, Hq, P] */                                        \
      float *__restrict__ part_sum,        /* [B, Hq, P] */                                        \
      const T *__restrict__ query,         /* [B, Hq, D], row stride q_stride elements */          \
      const T *__restrict__ key_cache,     /* [NB, Hk, BS, D] */                                   \
      const T *__restrict__ value_cache,   /* [NB, Hk, BS, D] */                                   \
      const int *__restrict__ block_tables, /* [B, max_blocks] */                                  \
      const int *__restrict__ context_lens, /* [B] */                                              \
      int num_kv_heads, int group, int n_sub, int max_blocks, long long q_stride, float scale_log2

// Shared memory the launcher must provide (bytes):
//   max(NUM_WARPS * STAGES * 2 * 16 * HEAD_DIM * 2,                  (pipeline)
//       NUM_WARPS * 16 * (HEAD_DIM + 4) * 4 + NUM_WARPS * 16 * 2 * 4)  (warp merge)
//   + CLUSTER ? (16 * HEAD_DIM + 32) * 4 : 0                           (the CTA's partition result)
// CLUSTER: the split variant whose partitions are the CTAs of one thread-block cluster
// (grid z == cluster size): each CTA leaves its partition's result in shared memory and
// the cluster merges them through distributed shared memory, instead of the round trip
// through global memory and paged_attention_reduce_kernel.
template <typename T, int HEAD_DIM, int BLOCK_SIZE, int NUM_WARPS, int STAGES, bool CLUSTER>
__device__ __forceinline__ void paged_attention_decode(PAGED_DECODE_PARAMS) {
  static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "head_dim");
  constexpr int TILE = 16;                        // tokens per MMA tile
  static_assert(BLOCK_SIZE % TILE == 0, "block_size");
  constexpr int TPB = BLOCK_SIZE / TILE;          // tiles per block
  constexpr int ROW_BYTES = HEAD_DIM * 2;
  constexpr int COLS = HEAD_DIM / 8;              // 16-byte columns per row
  constexpr int TILE_BYTES = TILE * ROW_BYTES;    // K (or V) of one tile
  constexpr int STAGE_BYTES = 2 * TILE_BYTES;
  constexpr int PIECES = TILE * COLS / 32;        // 16-byte copies per lane per K (or V) tile
  constexpr int KSTEPS = HEAD_DIM / 16;           // MMA k-steps of Q K^T
  constexpr int NT = HEAD_DIM / 8;                // MMA n-tiles of the output
  constexpr int SO_STRIDE = HEAD_DIM + 4;         // floats per row of the merge buffer
  static_assert(STAGES >= 2, "stages");
  static_assert((TILE * COLS) % 32 == 0, "pieces");

  extern __shared__ __align__(128) unsigned char smem_raw[];

  const int sub = blockIdx.x % n_sub;
  const int kvh = blockIdx.x / n_sub;
  const int b = blockIdx.y;
  const int part = blockIdx.z;
  const int num_parts = gridDim.z;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int gid = lane >> 2;  // MMA row group
  const int tig = lane & 3;   // thread in group
  const int num_heads = num_kv_heads * group;
  const int h0 = kvh * group + sub * 16;            // first query head of this CTA
  const int nrows = min(16, group - sub * 16);      // query heads of this CTA

  const int ctx = min(context_lens[b], max_blocks * BLOCK_SIZE);
  const int n_blocks = (ctx + BLOCK_SIZE - 1) / BLOCK_SIZE;
  const int partition_blocks = partition_blocks_of(n_blocks, num_parts);
  const int blk_begin = part * partition_blocks;
  // A partition past the context: the reduce skips it; a cluster's CTA stays for the
  // barriers, with no tiles (its result: max -inf, sum 0, weight 0 in the merge).
  if (!CLUSTER && num_parts > 1 && blk_begin >= n_blocks) return;
  const int blk_end = min(n_blocks, blk_begin + partition_blocks);
  const int t_begin = blk_begin * TPB;
  // Tiles that hold at least one position < ctx.
  const int t_end = max(t_begin, min(blk_end * TPB, (ctx + TILE - 1) / TILE));
  const int my_first = t_begin + warp;
  const int n_k = my_first < t_end ? (t_end - my_first + NUM_WARPS - 1) / NUM_WARPS : 0;

  // o[n]: rows (gid, gid + 8) x dims n*8 + 2*tig (+1); m/l for rows gid (0) and gid + 8 (1).
  float o[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m0 = RAYTP_NEG_INF, m1 = RAYTP_NEG_INF, l0 = 0.f, l1 = 0.f;

  const unsigned int wbuf = smem_u32(smem_raw) + (unsigned int)(warp * STAGES * STAGE_BYTES);
  const int* bt_row = block_tables + (long long)b * max_blocks;
  const long long head_off = (long long)kvh * (BLOCK_SIZE * HEAD_DIM);
  const long long block_stride = (long long)num_kv_heads * BLOCK_SIZE * HEAD_DIM;

  int bt_reg = 0;  // lane j: physical block of this warp's tile (k & ~31) + j
  // Copies tile k into its stage. Before pdl_wait the newest position (ctx - 1), whose K/V
  // the kernel before this one writes, is left out: it is loaded after the wait.
  auto issue = [&](int k, bool before_wait) {
    if ((k & 31) == 0) {
      const int kk = k + lane;
      bt_reg = kk < n_k ? bt_row[(my_first + kk * NUM_WARPS) / TPB] : 0;
    }
    const int t = my_first + k * NUM_WARPS;  // tile index inside the sequence
    const int phys = __shfl_sync(RAYTP_FULL_MASK, bt_reg, k & 31);
    const long long g_off = (long long)phys * block_stride + head_off +
                            (long long)(t % TPB) * (TILE * HEAD_DIM);
    const T* kp = key_cache + g_off;
    const T* vp = value_cache + g_off;
    const int tok0 = t * TILE;
    const unsigned int s_k = wbuf + (unsigned int)((k % STAGES) * STAGE_BYTES);
#pragma unroll
    for (int i = 0; i < PIECES; ++i) {
      const int p = lane + 32 * i;
      const int r = p / COLS, c = p % COLS;
      const unsigned int soff = swizzled(r, c, ROW_BYTES);
      if (before_wait && tok0 + r == ctx - 1) continue;
      const int nbytes = tok0 + r < ctx ? 16 : 0;
      cp_async16(s_k + soff, kp + r * HEAD_DIM + c * 8, nbytes);
      cp_async16(s_k + TILE_BYTES + soff, vp + r * HEAD_DIM + c * 8, nbytes);
    }
  };

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < n_k) issue(s, true);
    cp_async_commit();
  }
  // Everything above reads only what earlier steps wrote (the cache but for the newest
  // position, block tables, context lengths); q and the newest K/V come after the wait.
  pdl_wait();
  const int t_new = (ctx - 1) / TILE, k_new = (t_new - my_first) / NUM_WARPS;
  if (ctx > 0 && t_new >= my_first && (t_new - my_first) % NUM_WARPS == 0 && k_new < min(n_k, STAGES - 1)) {
    const long long g_off = (long long)bt_row[t_new / TPB] * block_stride + head_off +
                            (long long)(t_new % TPB) * (TILE * HEAD_DIM);
    copy_row<HEAD_DIM>(wbuf + (unsigned int)((k_new % STAGES) * STAGE_BYTES), TILE_BYTES, key_cache + g_off,
                       value_cache + g_off, (ctx - 1) % TILE, lane);
  }
  // Q as MMA A fragments: qa[ks] = rows (gid, gid + 8), dims ks*16 + 2*tig (+1, +8, +9).
  unsigned int qa[KSTEPS][4];
  {
    const T* qb = query + (long long)b * q_stride + (long long)h0 * HEAD_DIM + 2 * tig;
    const bool r0 = gid < nrows, r1 = gid + 8 < nrows;
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
      const T* p0 = qb + gid * HEAD_DIM + ks * 16;
      const T* p1 = p0 + 8 * HEAD_DIM;
      qa[ks][0] = r0 ? __ldcg(reinterpret_cast<const unsigned int*>(p0)) : 0u;
      qa[ks][1] = r1 ? __ldcg(reinterpret_cast<const unsigned int*>(p1)) : 0u;
      qa[ks][2] = r0 ? __ldcg(reinterpret_cast<const unsigned int*>(p0 + 8)) : 0u;
      qa[ks][3] = r1 ? __ldcg(reinterpret_cast<const unsigned int*>(p1 + 8)) : 0u;
    }
  }

  for (int k = 0; k < n_k; ++k) {
    cp_async_wait<STAGES - 2>();  // tile k has landed (this lane's copies)
    __syncwarp();                 // ... and every lane's
    const unsigned int sK = wbuf + (unsigned int)((k % STAGES) * STAGE_BYTES);
    const unsigned int sV = sK + TILE_BYTES;
    const int tok0 = (my_first + k * NUM_WARPS) * TILE;

    // S = Q K^T: n-tile nt holds tokens nt*8 .. nt*8+7.
    float s[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
      const int r = nt * 8 + (lane & 7);
#pragma unroll
      for (int kp2 = 0; kp2 < KSTEPS / 2; ++kp2) {
        const int c = kp2 * 4 + (lane >> 3);
        unsigned int b0, b1, b2, b3;
        ldmatrix_x4(sK + swizzled(r, c, ROW_BYTES), b0, b1, b2, b3);
        MMA<T>::run(s[nt], qa[2 * kp2], b0, b1);
        MMA<T>::run(s[nt], qa[2 * kp2 + 1], b2, b3);
      }
    }

    // Online softmax. s[nt][i]: row gid (i < 2) or gid + 8, token nt*8 + 2*tig + (i & 1).
    float mx0 = RAYTP_NEG_INF, mx1 = RAYTP_NEG_INF;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float v = s[nt][i] * scale_log2;
        if (tok0 + nt * 8 + 2 * tig + (i & 1) >= ctx) v = RAYTP_NEG_INF;
        s[nt][i] = v;
        if (i < 2) mx0 = fmaxf(mx0, v); else mx1 = fmaxf(mx1, v);
      }
    mx0 = fmaxf(mx0, __shfl_xor_sync(RAYTP_FULL_MASK, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(RAYTP_FULL_MASK, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(RAYTP_FULL_MASK, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(RAYTP_FULL_MASK, mx1, 2));
    // The tile's first position is < ctx, so mx0/mx1 are finite.
    const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
    const float a0 = exp2f(m0 - mn0), a1 = exp2f(m1 - mn1);  // 0 on the first tile
    m0 = mn0;
    m1 = mn1;
    float ps0 = 0.f, ps1 = 0.f;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float p = exp2f(s[nt][i] - (i < 2 ? mn0 : mn1));
        s[nt][i] = p;
        if (i < 2) ps0 += p; else ps1 += p;
      }
    l0 = l0 * a0 + ps0;  // lane-partial sums (this lane's tokens); reduced at the end
    l1 = l1 * a1 + ps1;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      o[n][0] *= a0; o[n][1] *= a0;
      o[n][2] *= a1; o[n][3] *= a1;
    }

    // O += P V. P's A fragment comes straight from S's accumulators.
    unsigned int pa[4];
    pa[0] = MMA<T>::pack2(s[0][0], s[0][1]);
    pa[1] = MMA<T>::pack2(s[0][2], s[0][3]);
    pa[2] = MMA<T>::pack2(s[1][0], s[1][1]);
    pa[3] = MMA<T>::pack2(s[1][2], s[1][3]);
    {
      const int j = lane >> 3;
      const int r = (j & 1) * 8 + (lane & 7);
#pragma unroll
      for (int q2 = 0; q2 < NT / 2; ++q2) {
        const int c = 2 * q2 + (j >> 1);
        unsigned int v0, v1, v2, v3;
        ldmatrix_x4_trans(sV + swizzled(r, c, ROW_BYTES), v0, v1, v2, v3);
        MMA<T>::run(o[2 * q2], pa, v0, v1);
        MMA<T>::run(o[2 * q2 + 1], pa, v2, v3);
      }
    }

    __syncwarp();  // every lane is done with this stage before it is refilled
    if (k + STAGES - 1 < n_k) issue(k + STAGES - 1, false);
    cp_async_commit();
  }
  cp_async_wait<0>();

  l0 += __shfl_xor_sync(RAYTP_FULL_MASK, l0, 1);
  l0 += __shfl_xor_sync(RAYTP_FULL_MASK, l0, 2);
  l1 += __shfl_xor_sync(RAYTP_FULL_MASK, l1, 1);
  l1 += __shfl_xor_sync(RAYTP_FULL_MASK, l1, 2);

  // Merge the warps through shared memory (reusing the pipeline buffers).
  __syncthreads();
  float* sm_o = reinterpret_cast<float*>(smem_raw);      // [NUM_WARPS][16][SO_STRIDE]
  float* sm_m = sm_o + NUM_WARPS * 16 * SO_STRIDE;       // [NUM_WARPS][16]
  float* sm_l = sm_m + NUM_WARPS * 16;                   // [NUM_WARPS][16]
  constexpr int PIPE_BYTES = NUM_WARPS * STAGES * STAGE_BYTES;
  constexpr int MERGE_BYTES = NUM_WARPS * 16 * SO_STRIDE * 4 + NUM_WARPS * 16 * 2 * 4;
  float* cl_o = reinterpret_cast<float*>(smem_raw + (PIPE_BYTES > MERGE_BYTES ? PIPE_BYTES : MERGE_BYTES));
  float* cl_m = cl_o + 16 * HEAD_DIM;  // [16] (CLUSTER: this partition's result)
  float* cl_l = cl_m + 16;             // [16]
  {
    float* r0 = sm_o + (warp * 16 + gid) * SO_STRIDE + 2 * tig;
    float* r1 = r0 + 8 * SO_STRIDE;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      *reinterpret_cast<float2*>(r0 + n * 8) = make_float2(o[n][0], o[n][1]);
      *reinterpret_cast<float2*>(r1 + n * 8) = make_float2(o[n][2], o[n][3]);
    }
    if (tig == 0) {
      sm_m[warp * 16 + gid] = m0;
      sm_m[warp * 16 + gid + 8] = m1;
      sm_l[warp * 16 + gid] = l0;
      sm_l[warp * 16 + gid + 8] = l1;
    }
  }
  __syncthreads();

  for (int idx = threadIdx.x; idx < nrows * HEAD_DIM; idx += NUM_WARPS * 32) {
    const int r = idx / HEAD_DIM;
    const int d = idx % HEAD_DIM;
    float M = RAYTP_NEG_INF;
#pragma unroll
    for (int w = 0; w < NUM_WARPS; ++w) M = fmaxf(M, sm_m[w * 16 + r]);
    float L = 0.f, O = 0.f;
    if (M != RAYTP_NEG_INF) {
#pragma unroll
      for (int w = 0; w < NUM_WARPS; ++w) {
        const float f = exp2f(sm_m[w * 16 + r] - M);  // 0 for a warp that saw no tile
        L = fmaf(sm_l[w * 16 + r], f, L);
        O = fmaf(sm_o[(w * 16 + r) * SO_STRIDE + d], f, O);
      }
    }
    const float val = L > 0.f ? O / L : 0.f;
    const int hq = h0 + r;
    if constexpr (CLUSTER) {
      cl_o[r * HEAD_DIM + d] = val;
      if (d == 0) {
        cl_m[r] = M;
        cl_l[r] = L;
      }
    } else if (num_parts == 1) {
      DT<T>::store(out, ((long long)b * num_heads + hq) * HEAD_DIM + d, val);
    } else {
      const long long pi = ((long long)b * num_heads + hq) * num_parts + part;
      part_out[pi * HEAD_DIM + d] = val;
      if (d == 0) {
        part_max[pi] = M;
        part_sum[pi] = L;
      }
    }
  }
  if constexpr (CLUSTER) {
    // Each CTA merges a 1/num_parts share of the outputs from every partition that holds
    // context (as paged_attention_reduce_kernel does), then waits until every peer is
    // done reading its shared memory before it exits.
    cluster_sync();
    const int n_p = min(num_parts, (n_blocks + partition_blocks - 1) / partition_blocks);
    for (int idx = cluster_rank() * NUM_WARPS * 32 + threadIdx.x; idx < nrows * HEAD_DIM;
         idx += num_parts * NUM_WARPS * 32) {
      const int r = idx / HEAD_DIM, d = idx % HEAD_DIM;
      float M = RAYTP_NEG_INF;
      for (int q = 0; q < n_p; ++q) M = fmaxf(M, ld_peer(&cl_m[r], q));
      float L = 0.f, O = 0.f;
      for (int q = 0; q < n_p; ++q) {
        const float mq = ld_peer(&cl_m[r], q);
        const float wq = mq == RAYTP_NEG_INF ? 0.f : ld_peer(&cl_l[r], q) * exp2f(mq - M);
        L += wq;
        O = fmaf(wq, ld_peer(&cl_o[r * HEAD_DIM + d], q), O);
      }
      DT<T>::store(out, ((long long)b * num_heads + h0 + r) * HEAD_DIM + d, L > 0.f ? O / L : 0.f);
    }
    cluster_sync();
  }
}

template <typename T, int HEAD_DIM, int BLOCK_SIZE, int NUM_WARPS, int STAGES>
__global__ void __launch_bounds__(NUM_WARPS * 32) paged_attention_decode_kernel(PAGED_DECODE_PARAMS) {
  paged_attention_decode<T, HEAD_DIM, BLOCK_SIZE, NUM_WARPS, STAGES, false>(
      out, part_out, part_max, part_sum, query, key_cache, value_cache, block_tables, context_lens, num_kv_heads,
      group, n_sub, max_blocks, q_stride, scale_log2);
}

// Grid (num_kv_heads * n_sub, B, CL): the CL partitions of a (kv head, sequence) are one cluster.
template <typename T, int HEAD_DIM, int BLOCK_SIZE, int NUM_WARPS, int STAGES, int CL>
__global__ void __cluster_dims__(1, 1, CL) __launch_bounds__(NUM_WARPS * 32)
    paged_attention_decode_cluster_kernel(PAGED_DECODE_PARAMS) {
  paged_attention_decode<T, HEAD_DIM, BLOCK_SIZE, NUM_WARPS, STAGES, true>(
      out, part_out, part_max, part_sum, query, key_cache, value_cache, block_tables, context_lens, num_kv_heads,
      group, n_sub, max_blocks, q_stride, scale_log2);
}
