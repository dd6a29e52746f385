"""How much of a big decode step could overlapping attention with the GEMMs win? (W1's
decode phase: Llama-3-8B shapes, bf16, batch 256, every context `--context` tokens.)

Per layer, the decode step's weight GEMMs (qkv, o, gate_up, down: cuBLAS) and its paged
attention (ops.cupy_ops.paged_attention_decode, the engine's kernel), over 32 layers with
their own weights and KV caches (no L2 reuse between layers). Timed, median of reps:

- gemms:      the GEMMs alone, whole batch
- attention:  the attention alone, whole batch
- serial:     the step as the engine runs it: per layer qkv, attention, o, gate_up, down
- two_streams: the batch as two halves, each the serial chain on its own CUDA stream, so
              one half's attention can run beside the other half's GEMMs (NanoFlow's idea)
- two_streams_carveout_N: the same with cuBLAS kept off N SMs (torch's experimental SM
              carveout), leaving room for the attention

    python3 -m benchmarks.overlap_probe            # GPU only
"""
from __future__ import annotations

import argparse

from benchmarks.common import cuda_ms, print_table, require_cuda, write_result

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS, BLOCK = 4096, 32, 8, 128, 14336, 32, 16


def build(batch: int, context: int):
    import torch
    dev, dt = "cuda", torch.bfloat16
    w = lambda n, k: torch.randn(n, k, device=dev, dtype=dt) / k ** 0.5
    layers = [dict(qkv=w((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN), o=w(HIDDEN, HIDDEN),
                   gate_up=w(2 * FFN, HIDDEN), down=w(HIDDEN, FFN)) for _ in range(LAYERS)]
    blocks_per_seq = -(-context // BLOCK)
    num_blocks = batch * blocks_per_seq
    caches = []
    for _ in range(LAYERS):
        k = torch.randn(num_blocks, KV_HEADS, BLOCK, HEAD_DIM, device=dev, dtype=dt)
        tables = torch.randperm(num_blocks, device=dev).to(torch.int32).view(batch, blocks_per_seq)
        caches.append((k, torch.randn_like(k), tables))
    lens = torch.full((batch,), context, device=dev, dtype=torch.int32)
    x = torch.randn(batch, HIDDEN, device=dev, dtype=dt)
    return layers, caches, lens, x


def step(layers, caches, lens, x, rows: slice, context: int, attention: bool = True, gemms: bool = True):
    """One decode step over `rows` of the batch; no host syncs, so two streams can overlap."""
    import torch.nn.functional as F
    from ops.cupy_ops import paged_attention_decode
    h = x[rows]  # [B, hidden]
    for L, (kc, vc, tables) in zip(layers, caches):
        qkv = F.linear(h, L["qkv"]) if gemms else h  # [B, (Hq + 2 Hk) * D]
        q = qkv[:, :HEADS * HEAD_DIM].view(-1, HEADS, HEAD_DIM)  # [B, Hq, D]
        a = paged_attention_decode(q, kc, vc, tables[rows], lens[rows], HEAD_DIM ** -0.5,
                                   max_context_len=context).view(-1, HIDDEN) if attention else h
        if gemms:
            h = F.linear(a, L["o"])
            gu = F.linear(h, L["gate_up"])  # [B, 2 FFN]
            h = F.linear(gu[:, :FFN], L["down"])  # no activation: the GEMMs' time is the point
        else:
            h = a
    return h


def two_streams(layers, caches, lens, x, batch: int, context: int):
    import torch
    main = torch.cuda.current_stream()
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]

    def run():
        for i, s in enumerate(streams):
            s.wait_stream(main)
            with torch.cuda.stream(s):
                step(layers, caches, lens, x, slice(i * batch // 2, (i + 1) * batch // 2), context)
        for s in streams:
            main.wait_stream(s)
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--context", type=int, default=640, help="tokens per sequence (W1's decode phase: ~600-700)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--carveouts", default="16,32", help="SMs kept from cuBLAS in the carveout variants")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    require_cuda("overlap_probe")
    import torch
    torch.manual_seed(0)
    layers, caches, lens, x = build(args.batch, args.context)
    whole = slice(0, args.batch)
    ctx = args.context
    variants = {"gemms": lambda: step(layers, caches, lens, x, whole, ctx, attention=False),
                "attention": lambda: step(layers, caches, lens, x, whole, ctx, gemms=False),
                "serial": lambda: step(layers, caches, lens, x, whole, ctx),
                "two_streams": two_streams(layers, caches, lens, x, args.batch, ctx)}
    results = {name: round(cuda_ms(fn, args.reps), 3) for name, fn in variants.items()}
    for n in (int(c) for c in args.carveouts.split(",") if c):
        torch._C._set_sm_carveout_experimental(n)
        try:
            results[f"two_streams_carveout_{n}"] = round(cuda_ms(variants["two_streams"], args.reps), 3)
            results[f"serial_carveout_{n}"] = round(cuda_ms(variants["serial"], args.reps), 3)
        finally:
            torch._C._set_sm_carveout_experimental(None)
    print_table(["variant", "ms per step"], [[k, v] for k, v in results.items()])
    best = min(v for k, v in results.items() if k.startswith("two_streams"))
    print(f"serial {results['serial']} ms; best two-stream {best} ms: {results['serial'] / best:.3f}x; "
          f"the bound max(gemms, attention) {max(results['gemms'], results['attention'])} ms")
    write_result("overlap_probe", {"config": vars(args), "results_ms": results}, args.out, "cuda")


if __name__ == "__main__":
    main()
