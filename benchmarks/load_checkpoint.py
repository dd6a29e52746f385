"""Loading a Llama-3-8B checkpoint from disk: raytp's loader vs reading the files.

Writes an 8B-shaped Hugging Face checkpoint (config.json, 4 safetensors shards of
random bf16 weights and the index) unless --dir already holds one, then, with the
files evicted from the page cache before each pass (posix_fadvise DONTNEED, so both
read the disk):
  1. reads every file sequentially (1 MiB reads): the disk's speed here;
  2. builds the model on the GPU and runs workers/loader.load_weights on it, as a
     TP=1 worker does (progress bar included).
Reports GB/s of both and their ratio (goal: the loader at disk speed).

    python3 -m benchmarks.load_checkpoint                      # H100: ~16 GB to /tmp
    python3 -m benchmarks.load_checkpoint --shape tiny         # CPU smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from benchmarks.common import hf_config_dict, print_table, write_result

SHARDS = 4


def write_checkpoint(path: str, shape: str, device: str) -> int:
    """An HF-layout checkpoint of `shape` with random bf16 weights; returns its bytes."""
    from safetensors.torch import save_file
    from driver.config import ModelArch
    from workers.model import LlamaForCausalLM
    cfg = hf_config_dict(shape, "bfloat16")
    os.makedirs(path, exist_ok=True)
    with torch.device("meta"):  # names and full shapes only, no memory
        shapes = LlamaForCausalLM(ModelArch.from_hf_config(cfg)).checkpoint_shapes()
    names = list(shapes)
    per_shard = -(-len(names) // SHARDS)
    weight_map, total = {}, 0
    gen = torch.Generator(device=device).manual_seed(0)
    for i in range(SHARDS):
        fname = f"model-{i + 1:05d}-of-{SHARDS:05d}.safetensors"
        part = {}
        for name in names[i * per_shard:(i + 1) * per_shard]:
            t = torch.randn(shapes[name], generator=gen, device=device, dtype=torch.bfloat16).mul_(0.02)
            part[name] = t.cpu()
            weight_map[name] = fname
            total += t.numel() * 2
        save_file(part, os.path.join(path, fname), metadata={"format": "pt"})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return total


def evict(files: list[str]) -> None:
    """Drop the files' pages from the page cache (written back first)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_files(files: list[str]) -> float:
    """Seconds to read every file sequentially."""
    buf = bytearray(1 << 20)
    t = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t


def load_model(path: str, device: str) -> float:
    """Seconds for load_weights into a freshly built bf16 model on `device`."""
    from driver.config import ModelArch
    from workers.loader import load_weights
    from workers.model import LlamaForCausalLM
    with open(os.path.join(path, "config.json")) as f:
        arch = ModelArch.from_hf_config(json.load(f))
    with torch.device(device):
        model = LlamaForCausalLM(arch, torch.bfloat16)
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    load_weights(model, path, progress=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=("llama3-8b", "tiny"), default="llama3-8b")
    p.add_argument("--dir", default=None, help="checkpoint directory (default: /tmp/raytp-ckpt-<shape>)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda, or cpu for --shape tiny")
    p.add_argument("--out", default="benchmarks/results", help="directory for the JSON result")
    args = p.parse_args()
    args.device = args.device or ("cpu" if args.shape == "tiny" else "cuda")
    path = args.dir or f"/tmp/raytp-ckpt-{args.shape}"
    if not os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
        t = time.perf_counter()
        write_checkpoint(path, args.shape, args.device)
        print(f"wrote {path} in {time.perf_counter() - t:.1f} s")
    from workers.loader import checkpoint_files
    files = checkpoint_files(path)
    size = sum(os.path.getsize(f) for f in files)
    evict(files)
    read_s = read_files(files)
    evict(files)
    load_s = load_model(path, args.device)
    row = {"bytes": size, "read_s": round(read_s, 3), "read_GBps": round(size / read_s / 1e9, 3),
           "load_s": round(load_s, 3), "load_GBps": round(size / load_s / 1e9, 3),
           "load_over_read": round(read_s / load_s, 3)}
    write_result("load_checkpoint", {"config": {"shape": args.shape, "dir": path, "shards": len(files)},
                                     "results": row}, args.out, args.device)
    print_table(list(row), [list(row.values())])
    print(f"loader at {100 * row['load_over_read']:.0f}% of the cold sequential read speed")


if __name__ == "__main__":
    main()
