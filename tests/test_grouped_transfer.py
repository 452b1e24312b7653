"""benchmarks/grouped_transfer.py carries a peer's fake-quant weights back from the device
machine; its encoding must give every float16 bit pattern back, or the peer's score here
would not be the peer's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "grouped_transfer.py"
spec = importlib.util.spec_from_file_location("grouped_transfer", SCRIPT)
grouped_transfer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(grouped_transfer)


def fake_quant(rows: int, cols: int, bits: int, group: int, seed: int) -> torch.Tensor:
    """scale * q per group, q on the signed grid, in float16, as auto-round saves it."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (rows, cols), generator=g)
    groups = -(-cols // group)
    scale = torch.rand(rows, groups, generator=g) * 0.02 + 1e-3
    return (q * scale.repeat_interleave(group, 1)[:, :cols]).half()


@pytest.mark.parametrize("bits,group,cols", [(2, 64, 576), (3, 128, 576), (4, 128, 1536),
                                             (3, 128, 200)])  # 576 and 200: a short last group
def test_weights_come_back_bit_for_bit(bits, group, cols):
    w = fake_quant(48, cols, bits, group, seed=bits * 1000 + cols)
    first = w[0, :group]  # its zeros made -0.0: a sign bit alone must come back too
    first[0] = 0
    first[first == 0] = -0.0
    book, words = grouped_transfer.encode(w, bits, group)
    back = grouped_transfer.decode(book, words, list(w.shape), group)
    assert back.dtype == torch.float16
    assert torch.equal(back.view(torch.int16), w.view(torch.int16))
    # the codes take bits each (one more where a group holds both zeros), 63 // that
    # to an int64 word
    code_bits = grouped_transfer.code_bits(book.shape[1])
    assert code_bits in (bits, bits + 1)
    assert words.numel() == -(-48 * (cols + -cols % group) // (63 // code_bits))


def test_both_signed_zeros_in_a_group_come_back():
    """Rounding a small negative weight to zero keeps its sign: a group may hold 0.0 and
    -0.0 beside the grid's other values (seen in auto-round's RTN), 2^bits + 1 patterns."""
    w = fake_quant(8, 128, 4, 128, seed=5)
    w[:, 0], w[:, 1] = 0.0, -0.0
    book, words = grouped_transfer.encode(w, 4, 128)
    assert book.shape[1] == 17  # codes take 5 bits in that tensor
    back = grouped_transfer.decode(book, words, list(w.shape), 128)
    assert torch.equal(back.view(torch.int16), w.view(torch.int16))


def test_more_distinct_values_than_the_grid_is_refused():
    w = torch.linspace(-1, 1, 64 * 4).reshape(4, 64).half()  # 64 distinct values per group
    with pytest.raises(SystemExit, match=r"more than 8 distinct values \(and a signed zero\)"):
        grouped_transfer.encode(w, 3, 64)


def test_pack_and_unpack_rebuild_a_folder(tmp_path):
    from safetensors.torch import load_file, save_file

    base, dense = tmp_path / "base", tmp_path / "dense"
    for folder in (base, dense):
        folder.mkdir()
    weight = fake_quant(32, 576, 3, 128, seed=7)
    norm = torch.rand(576).half()
    save_file({"model.layers.0.mlp.up_proj.weight": torch.rand(32, 576).half(),
               "model.norm.weight": norm}, str(base / "model.safetensors"))
    (base / "config.json").write_text("{}")
    (base / "compress_source.json").write_text("{}")
    save_file({"model.layers.0.mlp.up_proj.weight": weight, "model.norm.weight": norm},
              str(dense / "model.safetensors"))
    grouped_transfer.pack(dense, base, 3, 128, tmp_path / "packed")
    grouped_transfer.unpack(tmp_path / "packed", base, tmp_path / "rebuilt")
    rebuilt = load_file(tmp_path / "rebuilt" / "model.safetensors")
    assert torch.equal(rebuilt["model.layers.0.mlp.up_proj.weight"], weight)
    assert torch.equal(rebuilt["model.norm.weight"], norm)
    assert sorted(p.name for p in (tmp_path / "rebuilt").iterdir()) == [
        "config.json", "model.safetensors"]
    # a tensor the peer should not have touched, changed: refused on the device
    save_file({"model.layers.0.mlp.up_proj.weight": weight, "model.norm.weight": norm + 1},
              str(dense / "model.safetensors"))
    with pytest.raises(SystemExit, match="differ from the base model"):
        grouped_transfer.pack(dense, base, 3, 128, tmp_path / "packed2")
