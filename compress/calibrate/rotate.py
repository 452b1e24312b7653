"""Rotations folded into a model's weights before quantisation (QuaRot/SpinQuant-style).

Two rotations, both exact in full precision, both leaving an ordinary checkpoint (no op
is added at run time; transformers loads it as it loads any other):

- The residual stream, by Q (hidden x hidden). The stream is read only through RMSNorms
  and written only by Linears (the architecture table's `folds` and `stream_writers`),
  and rms(x Q) = rms(x), so: each norm's weight folds into the Linears reading it
  (columns times offset + w; the norm becomes ones), those Linears read x Q (W -> W Q),
  the writers write y Q (W -> Qᵀ W, b -> b Q), the embedding table is E Q and the
  output head, with the final norm folded in, W diag(offset + w) Q. A tied head is
  therefore untied. Refused (with the reason logged) where a post-norm sits between a
  writer and the stream (`Architecture.residual_rotation_problem`).
- Each attention head's values, by H (head_dim x head_dim): v_proj's rows of every KV
  head become Hᵀ W_g and o_proj's columns of every query head W_j H, so o_proj reads
  v H and undoes it. Exact on every family (attention mixes positions, not channels, and
  no family normalises v), grouped-query attention included: every head shares one H.

Works on name -> tensor mappings (the decoder layer's parameters, or a layer's tensors
read from the checkpoint), so RTN, which builds no layer, and the calibrated methods fold
the same way. Products are computed in float64; the touched tensors come back in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.models import Fold, ModelFiles
from compress.quant import rotate
from compress.quant.rotate import Rotation, RotationConfig


@dataclass(frozen=True, eq=False)
class RotationPlan:
    """The rotations of one run: `residual` None when the family refuses it (`skipped`
    says why)."""

    config: RotationConfig
    residual: Rotation | None
    heads: Rotation
    skipped: str | None = None

    def describe(self) -> dict:
        """What the manifest records."""
        residual = ({"skipped": self.skipped} if self.residual is None else
                    {"size": self.residual.dim, "construction": self.residual.construction})
        return {**self.config.to_dict(), "residual": residual,
                "heads": {"size": self.heads.dim, "construction": self.heads.construction}}


def plan(files: ModelFiles, config: RotationConfig) -> RotationPlan | None:
    """The run's rotations, from the config's seed (the same matrices on every run and
    on resume); None when the config rotates nothing."""
    if not config.enabled:
        return None
    cfg = files.decoder_config
    problem = files.arch.residual_rotation_problem
    residual = None if problem else rotate.randomized_hadamard(cfg.hidden_size, config.seed)
    # another seed for the heads: with head_dim == hidden the signs would otherwise repeat
    heads = rotate.randomized_hadamard(cfg.head_dim, config.seed + 1)
    return RotationPlan(config, residual, heads,
                        None if problem is None else f"residual stream not rotated: {problem}")


def _value_rows(files: ModelFiles, fold: Fold) -> slice:
    """v's rows in the fold's producer (all of v_proj, or v's part of a fused q|k|v)."""
    if fold.part is None:
        return slice(None)
    c = files.decoder_config
    q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return slice(q_out + kv_out, q_out + 2 * kv_out)


def rotate_layer(tensors: dict[str, torch.Tensor], files: ModelFiles, index: int,
                 rotations: RotationPlan) -> dict[str, torch.Tensor]:
    """Layer `index`'s tensors (layer-relative names, every Linear's weight and bias and
    every norm's weight) with the rotations folded in; tensors no rotation touches are
    returned as given."""
    arch = files.arch
    out = dict(tensors)

    def update(name: str, fn) -> None:
        if name in out:
            out[name] = fn(out[name].to(torch.float64)).to(torch.float32)

    folds = files.layer_folds(index)
    values = next(f for f in folds if f.group == (arch.o_proj,))
    rows = _value_rows(files, values)
    h = rotations.heads

    def values_out(w: torch.Tensor) -> torch.Tensor:
        w = w.clone()
        w[rows] = rotate.rotate_head_outputs(w[rows], h)
        return w

    update(f"{values.producer}.weight", values_out)
    update(f"{values.producer}.bias", values_out)
    update(f"{arch.o_proj}.weight", lambda w: rotate.rotate_head_inputs(w, h))

    q = rotations.residual
    if q is None:
        return out
    for fold in folds:
        if fold.producer not in (arch.attn_norm, arch.mlp_norm):
            continue
        norm = f"{fold.producer}.weight"
        scale = files.decoder_config.norm_offset + out[norm].to(torch.float64)
        for reader in fold.group:
            update(f"{reader}.weight", lambda w, s=scale: rotate.rotate_input(w, q, s))
        out[norm] = torch.full_like(out[norm], 1.0 - files.decoder_config.norm_offset,
                                    dtype=torch.float32)
    for writer in files.layer_writers(index):
        update(f"{writer}.weight", lambda w: rotate.rotate_output(w, q))
        update(f"{writer}.bias", lambda w: rotate.rotate_output(w, q))
    return out


def rotate_outer(tensors: dict[str, torch.Tensor], files: ModelFiles,
                 rotations: RotationPlan) -> dict[str, torch.Tensor]:
    """The tensors outside the decoder layers (full names) with the residual rotation
    folded in: the embedding table E Q in its own dtype, the final norm ones, and the
    output head W diag(offset + w) Q in float32 (from the embedding table when tied, so
    it is then a tensor of its own). Unchanged when the stream is not rotated."""
    q = rotations.residual
    if q is None:
        return dict(tensors)
    arch, offset = files.arch, files.decoder_config.norm_offset
    embed, norm, head = (f"{arch.embed}.weight", f"{arch.final_norm}.weight",
                         f"{arch.lm_head}.weight")
    out = dict(tensors)
    table = tensors[embed]
    source = tensors.get(head, table)
    scale = offset + tensors[norm].to(torch.float64)
    out[head] = rotate.rotate_input(source, q, scale, torch.float32)
    out[embed] = rotate_embedding(table, rotations)
    out[norm] = torch.full_like(tensors[norm], 1.0 - offset)
    return out


def rotate_embedding(table: torch.Tensor, rotations: RotationPlan) -> torch.Tensor:
    """The embedding table as exported: E Q in the table's own dtype (the table itself when
    the stream is not rotated). Calibration gathers layer 0's inputs from it."""
    q = rotations.residual
    return table if q is None else q.apply(table, table.dtype)


def rotated_tensors(files: ModelFiles, rotations: RotationPlan) -> dict[str, torch.Tensor]:
    """Every tensor of the model with the rotations folded in, unquantised and in float32:
    a dense copy that computes the same function (for checks and studies of the rotated
    model; the pipeline folds layer by layer instead)."""
    tensors = {}
    for i in range(files.num_layers):
        prefix = files.arch.layer_prefix(i)
        layer = {n.removeprefix(prefix): files.tensors.get(n)
                 for n in files.tensors.with_prefix(prefix)}
        tensors.update({prefix + n: t.float().contiguous()
                        for n, t in rotate_layer(layer, files, i, rotations).items()})
    rest = {n: files.tensors.get(n) for n in files.tensors.names() if n not in tensors}
    tensors.update({n: t.float().contiguous()
                    for n, t in rotate_outer(rest, files, rotations).items()})
    return tensors
