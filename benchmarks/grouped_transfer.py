"""Carry a peer's dense fake-quant checkpoint back from the device machine, byte for byte.

The device machine returns at most 64 MiB a call (16 MiB a file), and auto-round writes a
dense float16 model (270 MB for SmolLM2-135M). Every quantised weight takes at most 2^bits
distinct float16 values per group, so it is stored exactly as a codebook per group (its
distinct values' bit patterns, sorted) and one code per weight, packed into int64 words.
Nothing is re-derived from a scale: whatever auto-round saved comes back bit for bit, and
`unpack` checks that against the sha256 of every weight taken on the device.

    pack   DENSE_DIR BASE_DIR --bits B --group-size G --out DIR   (on the device)
    unpack PACK_DIR BASE_DIR --out DENSE_DIR                      (here)

The tensors that are not quantised are not carried: `pack` checks they equal the base
model's bytes, and `unpack` takes them from the base model here.
Runs in either Python (torch and safetensors only; no `compress` import).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SHARD_BYTES = 15 * 2**20  # under the device's 16 MiB a file
MANIFEST = "grouped_transfer.json"


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def per_word(bits: int) -> int:
    return 63 // bits  # codes per int64 word, the sign bit left clear


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    k = per_word(bits)
    flat = codes.flatten().long()
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % k)]).reshape(-1, k)
    shifts = torch.arange(k, dtype=torch.int64) * bits
    return (flat << shifts).sum(1)


def unpack_codes(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    k = per_word(bits)
    shifts = torch.arange(k, dtype=torch.int64) * bits
    return ((words.unsqueeze(1) >> shifts) & (2**bits - 1)).flatten()[:count]


def code_bits(width: int) -> int:
    return max(1, (width - 1).bit_length())


def encode(weight: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebook [groups, width] int16 bit patterns, packed codes) of a float16 weight.
    width is 2^bits, or one more where a group holds both zeros (0.0 and -0.0 are
    distinct bytes: rounding a small negative weight to zero keeps its sign)."""
    rows, cols = weight.shape
    pad = -cols % group  # a short last group is padded with a value it already holds
    w = weight.view(torch.int16)
    if pad:
        w = torch.cat([w, w[:, -1:].expand(rows, pad)], 1)
    groups = w.reshape(-1, group)
    values, order = groups.sort(dim=1)
    new = torch.ones_like(values, dtype=torch.bool)
    new[:, 1:] = values[:, 1:] != values[:, :-1]
    rank = new.long().cumsum(1) - 1
    width = max(int(rank[:, -1].max()) + 1, 2**bits)
    if width > 2**bits + 1:
        raise SystemExit(f"more than {2**bits} distinct values (and a signed zero) in a group")
    book = torch.zeros(groups.shape[0], width, dtype=torch.int16)
    book.scatter_(1, rank, values)
    codes = torch.empty_like(rank).scatter_(1, order, rank)
    return book, pack_codes(codes, code_bits(width))


def decode(book: torch.Tensor, words: torch.Tensor, shape: list[int], group: int
           ) -> torch.Tensor:
    rows, cols = shape
    padded = cols + (-cols % group)
    codes = unpack_codes(words, code_bits(book.shape[1]), rows * padded).reshape(-1, group)
    return book.gather(1, codes).reshape(rows, padded)[:, :cols].contiguous().view(torch.float16)


def pack(dense: Path, base: Path, bits: int, group: int, out: Path) -> None:
    quantised, base_t = tensors_of(dense), tensors_of(base)
    names = sorted(n for n in quantised if ".layers." in n and n.endswith("_proj.weight"))
    others = {n: sha(t) == sha(base_t[n]) for n, t in quantised.items() if n not in names}
    if not all(others.values()) or set(base_t) - set(quantised):
        raise SystemExit(f"tensors not quantised differ from the base model: {others}")
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"bits": bits, "group_size": group, "weights": {}, "shards": []}
    shard: dict[str, torch.Tensor] = {}

    def flush() -> None:
        if shard:
            name = f"grouped-{len(manifest['shards']):02d}.safetensors"
            save_file(shard, str(out / name))
            manifest["shards"].append(name)
            shard.clear()

    for n in names:
        w = quantised[n].cpu()
        if w.dtype != torch.float16:
            raise SystemExit(f"{n} is {w.dtype}; float16 expected")
        book, words = encode(w, bits, group)
        if not torch.equal(decode(book, words, list(w.shape), group), w):
            raise SystemExit(f"{n}: the encoding does not give the weight back")
        manifest["weights"][n] = {"shape": list(w.shape), "sha256": sha(w)}
        size = sum(t.numel() * t.element_size() for t in shard.values())
        if size + book.numel() * 2 + words.numel() * 8 > SHARD_BYTES:
            flush()
        shard[f"{n}.codebook"], shard[f"{n}.codes"] = book, words
    flush()
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def unpack(packed: Path, base: Path, out: Path) -> None:
    manifest = json.loads((packed / MANIFEST).read_text())
    group = manifest["group_size"]
    stored: dict[str, torch.Tensor] = {}
    for name in manifest["shards"]:
        stored.update(load_file(packed / name))
    tensors = tensors_of(base)
    for n, info in manifest["weights"].items():
        w = decode(stored[f"{n}.codebook"], stored[f"{n}.codes"], info["shape"], group)
        if sha(w) != info["sha256"]:
            raise SystemExit(f"{n}: sha256 differs from the device's")
        tensors[n] = w
    out.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():  # config and tokenizer; not the bundled model's provenance
        if f.suffix != ".safetensors" and f.is_file() and f.name != "compress_source.json":
            shutil.copy2(f, out / f.name)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    print(f"{len(manifest['weights'])} weights rebuilt, each sha256 equal to the device's")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("dense", type=Path)
    p.add_argument("base", type=Path)
    p.add_argument("--bits", type=int, required=True)
    p.add_argument("--group-size", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    u = sub.add_parser("unpack")
    u.add_argument("packed", type=Path)
    u.add_argument("base", type=Path)
    u.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.cmd == "pack":
        pack(args.dense, args.base, args.bits, args.group_size, args.out)
    else:
        unpack(args.packed, args.base, args.out)


if __name__ == "__main__":
    main()
