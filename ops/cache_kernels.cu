// reshape_and_cache: write this step's key/value [T, Hk, D] into the paged
// caches [num_blocks, Hk, block_size, D] at slot_mapping[t] (slot =
// block * block_size + offset; slots < 0 are padding and skipped).
//
// A pure copy, so the kernel is dtype-agnostic: W is the word it moves
// (uint4 = 16 bytes when every row start is 16-byte aligned, else a 2-byte
// word). One CTA per token; one thread per word of every (head, dim) row.
// key/value may be strided over tokens (e.g. views into a fused qkv output);
// within a token the heads must be contiguous (stride D, then 1).

// Word i of packed row t (i over Hk * words_per_head) <-> its word in a paged cache at
// slot (block * block_size + offset): the one index both copies share.
__device__ __forceinline__ long long cache_word(long long slot, int i, int num_kv_heads, int block_size,
                                                int words_per_head) {
  const long long blk = slot / block_size;
  const int off = (int)(slot - blk * block_size);
  const int h = i / words_per_head;
  const int w = i - h * words_per_head;
  return ((blk * num_kv_heads + h) * block_size + off) * (long long)words_per_head + w;
}

template <typename W>
__global__ void __launch_bounds__(256)
reshape_and_cache_kernel(
    const W* __restrict__ key,          // [T, Hk, D] (token stride key_stride words)
    const W* __restrict__ value,        // [T, Hk, D] (token stride value_stride words)
    W* __restrict__ key_cache,          // [NB, Hk, BS, D]
    W* __restrict__ value_cache,        // [NB, Hk, BS, D]
    const long long* __restrict__ slot_mapping,  // [T]
    long long key_stride, long long value_stride,
    int num_kv_heads, int block_size, int words_per_head) {
  pdl_trigger();  // the decode attention after it starts reading the rest of the cache meanwhile
  const int t = blockIdx.x;
  const long long slot = slot_mapping[t];
  if (slot < 0) return;
  for (int i = threadIdx.x; i < num_kv_heads * words_per_head; i += blockDim.x) {
    const long long dst = cache_word(slot, i, num_kv_heads, block_size, words_per_head);
    key_cache[dst] = key[t * key_stride + i];
    value_cache[dst] = value[t * value_stride + i];
  }
}

// gather_cache: reshape_and_cache's inverse, for prefill attention over cached context:
// the key/value rows of the given slots (all >= 0), packed [K, Hk, D] contiguous.
// One CTA per packed row, one thread per word, as above.
template <typename W>
__global__ void __launch_bounds__(256)
gather_cache_kernel(
    const W* __restrict__ key_cache,    // [NB, Hk, BS, D]
    const W* __restrict__ value_cache,  // [NB, Hk, BS, D]
    W* __restrict__ key,                // [K, Hk, D]
    W* __restrict__ value,              // [K, Hk, D]
    const long long* __restrict__ slots,  // [K]
    int num_kv_heads, int block_size, int words_per_head) {
  const long long t = blockIdx.x;
  const long long slot = slots[t];
  const int row_words = num_kv_heads * words_per_head;
  for (int i = threadIdx.x; i < row_words; i += blockDim.x) {
    const long long src = cache_word(slot, i, num_kv_heads, block_size, words_per_head);
    key[t * row_words + i] = key_cache[src];
    value[t * row_words + i] = value_cache[src];
  }
}
