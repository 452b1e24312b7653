"""The architecture table: the only place that knows model families.

An `Architecture` says where a family's tensors live (HF state-dict names) and how its
decoder layer is put together: which Linears it has and in which true-sequential groups,
which norms sit where, and which of config.json's knobs its attention honours. The
layers (`layers.py`), the loader (`load.py`), calibration (`compress.calibrate`) and AWQ's
folds all read it; none of them names a family. Adding a family is one entry in
`ARCHITECTURES` plus, at most, one new layer feature (docs/architectures.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from compress.errors import CompressError

# Parts of a fused projection's output rows, in order (Phi-3 stores q|k|v and gate|up).
QKV_PARTS = ("q", "k", "v")
GATE_UP_PARTS = ("gate", "up")


@dataclass(frozen=True)
class Fold:
    """An AWQ fold: the input channels of `group` are produced by `producer` (a norm's
    weight, or a Linear's output rows; `part` names a slice of a fused Linear's rows), so
    scaling the group's weight columns by s and the producer's output by 1/s leaves the
    layer's function unchanged."""

    producer: str
    group: tuple[str, ...]
    part: str | None = None


@dataclass(frozen=True)
class Experts:
    """Where a mixture-of-experts MLP keeps its parts, relative to a decoder layer: the
    router (a Linear from hidden size to one logit per expert) and expert e's
    projections at `{block}.{experts}.{e}.<name>`. Each expert is a gated MLP
    down(act(gate(x)) * up(x)) that reads only the tokens routed to it."""

    block: str
    router: str = "gate"
    experts: str = "experts"
    gate_up: tuple[str, str] = ("gate_proj", "up_proj")
    down: str = "down_proj"
    # A shared expert (Qwen-MoE): a gated MLP every token goes through, named like the
    # experts' projections, its output scaled by sigmoid(shared_gate(x)) when there is one.
    shared: str | None = None
    shared_gate: str | None = None

    def expert(self, e: int) -> str:
        return f"{self.block}.{self.experts}.{e}."

    @property
    def router_name(self) -> str:
        return f"{self.block}.{self.router}"

    @property
    def shared_prefix(self) -> str | None:
        return None if self.shared is None else f"{self.block}.{self.shared}."

    @property
    def shared_gate_name(self) -> str | None:
        return None if self.shared_gate is None else f"{self.block}.{self.shared_gate}"

    def mlps(self, experts: int) -> list[str]:
        """Every gated MLP of a sparse layer, by name prefix, in the order they run: the
        shared expert (it reads every token) first, as transformers runs it."""
        shared = [self.shared_prefix] if self.shared_prefix else []
        return [*shared, *(self.expert(e) for e in range(experts))]


@dataclass(frozen=True)
class Architecture:
    """Names and structure of one family of decoder-only checkpoints.

    Linear roles hold module names relative to a decoder layer. `qkv` and `gate_up` are
    either the separate projections or one fused projection whose output rows are
    `QKV_PARTS` / `GATE_UP_PARTS` in order. A norm place that is None is absent in the
    family. The residual stream of every family here is

        x = x + attn_out_norm(attention(attn_norm(x)))
        x = x + mlp_out_norm(mlp(mlp_norm(x)))
    """

    name: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    qkv: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    o_proj: str = "self_attn.o_proj"
    gate_up: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    down_proj: str = "mlp.down_proj"
    attn_norm: str | None = "input_layernorm"
    attn_out_norm: str | None = None
    mlp_norm: str | None = "post_attention_layernorm"
    mlp_out_norm: str | None = None
    # RMSNorm over each head of q and k ("head", before RoPE) or over the whole q and k
    # projections ("projection"); None: no q/k norms.
    qk_norm: str | None = None
    q_norm: str = "self_attn.q_norm"
    k_norm: str = "self_attn.k_norm"
    # RMSNorm multiplies by (norm_offset + weight): Gemma stores weight - 1.
    norm_offset: float = 0.0
    # Embeddings are multiplied by sqrt(hidden_size) (Gemma).
    embed_scale: bool = False
    # config.json knobs the family's modelling code honours; others are ignored, as
    # transformers ignores them (Gemma-3's config keeps attn_logit_softcapping, unused).
    query_pre_attn_scalar: bool = False
    attn_softcap: bool = False
    final_softcap: bool = False
    # Sparse layers' MLP (which layers are sparse, and how many experts, is config.json's)
    moe: Experts | None = None

    def __post_init__(self) -> None:
        if len(self.qkv) not in (1, 3) or len(self.gate_up) not in (1, 2):
            raise ValueError(f"{self.name}: qkv takes 1 (fused) or 3 names, gate_up 1 or 2")
        if self.qk_norm not in (None, "head", "projection"):
            raise ValueError(f"{self.name}: qk_norm must be None, 'head' or 'projection'")

    @property
    def fused_qkv(self) -> bool:
        return len(self.qkv) == 1

    @property
    def fused_gate_up(self) -> bool:
        return len(self.gate_up) == 1

    @property
    def linear_groups(self) -> tuple[tuple[str, ...], ...]:
        """A dense layer's Linears grouped by the input they share, in execution order:
        the true-sequential order of calibrated quantisers."""
        return self.groups(0)

    def groups(self, experts: int) -> tuple[tuple[str, ...], ...]:
        """The groups of a layer with `experts` experts (0: a dense MLP). Experts run one
        after another, each on its own tokens, so each one's gate/up and down are groups
        of their own, in expert order (a shared expert first); the router (and a shared
        expert's gate) stays a dense Linear."""
        if not experts:
            return (self.qkv, (self.o_proj,), self.gate_up, (self.down_proj,))
        if self.moe is None:
            raise ValueError(f"{self.name} has no mixture-of-experts layout")
        m = self.moe
        per_mlp = ((tuple(p + n for n in m.gate_up), (p + m.down,)) for p in m.mlps(experts))
        return (self.qkv, (self.o_proj,), *(g for pair in per_mlp for g in pair))

    @property
    def layer_linears(self) -> tuple[str, ...]:
        """A dense layer's Linears (a sparse layer's: `ModelFiles.layer_linears`)."""
        return tuple(name for group in self.linear_groups for name in group)

    @property
    def layer_norms(self) -> tuple[str, ...]:
        """Every norm of a layer (q/k norms included), by module name."""
        places = (self.attn_norm, self.attn_out_norm, self.mlp_norm, self.mlp_out_norm)
        qk = (self.q_norm, self.k_norm) if self.qk_norm else ()
        return tuple(n for n in (*places, *qk) if n is not None)

    @property
    def scale_folds(self) -> tuple[Fold, ...]:
        """For AWQ, each group's input producer. A group read straight from the residual
        stream (OLMo-2 has no norm before attention or the MLP) has none: the residual is
        the sum of every earlier layer's output, so no single op can absorb a scale."""
        v = Fold(self.qkv[0], (self.o_proj,), "v") if self.fused_qkv else Fold(
            self.qkv[2], (self.o_proj,))
        up = Fold(self.gate_up[0], (self.down_proj,), "up") if self.fused_gate_up else Fold(
            self.gate_up[1], (self.down_proj,))
        folds = (Fold(self.attn_norm, self.qkv) if self.attn_norm else None, v,
                 Fold(self.mlp_norm, self.gate_up) if self.mlp_norm else None, up)
        return tuple(f for f in folds if f is not None)

    def folds(self, experts: int) -> tuple[Fold, ...]:
        """AWQ's folds in a layer with `experts` experts (0: dense, `scale_folds`). The
        MLP norm feeds the router, a shared expert's gate and every expert's gate/up, so
        one set of scales serves them all (the dense gates absorb it exactly); each
        expert's up feeds only its own down."""
        if not experts:
            return self.scale_folds
        m = self.moe
        if m is None:
            raise ValueError(f"{self.name} has no mixture-of-experts layout")
        attention = tuple(f for f in self.scale_folds if f.group in (self.qkv, (self.o_proj,)))
        dense = (m.router_name, *([m.shared_gate_name] if m.shared_gate_name else []))
        gate_ups = tuple(p + n for p in m.mlps(experts) for n in m.gate_up)
        mlp = (Fold(self.mlp_norm, (*dense, *gate_ups)),) if self.mlp_norm else ()
        downs = tuple(Fold(p + m.gate_up[1], (p + m.down,)) for p in m.mlps(experts))
        return (*attention, *mlp, *downs)

    def stream_writers(self, experts: int) -> tuple[str, ...]:
        """The Linears whose outputs are added to the residual stream: o_proj and each
        MLP's down projection (every expert's, and a shared expert's)."""
        if not experts:
            return (self.o_proj, self.down_proj)
        m = self.moe
        if m is None:
            raise ValueError(f"{self.name} has no mixture-of-experts layout")
        return (self.o_proj, *(p + m.down for p in m.mlps(experts)))

    @property
    def branch_out_norm(self) -> str | None:
        """A norm on a branch's output, before the residual add (Gemma's and OLMo-2's
        post-norms); None where the branches add their Linears' outputs as they are."""
        return self.attn_out_norm or self.mlp_out_norm

    @property
    def reads_stream_normed(self) -> bool:
        """Whether every branch reads the residual stream through a norm."""
        return bool(self.attn_norm and self.mlp_norm)

    @property
    def residual_rotation_problem(self) -> str | None:
        """Why rotating the residual stream cannot be folded exactly into this family's
        weights (None when it can). The stream is read only through RMSNorms, whose
        weights fold into their readers (`folds`), and written only by Linears; a norm on
        a branch's output (Gemma's and OLMo-2's post-norms) scales channels of a
        Linear's output before the add, and diag(w)·Q ≠ Q·diag(w)."""
        post = self.branch_out_norm
        if post:
            return (f"{self.name}'s {post} scales a Linear's output per channel before the "
                    "residual add (diag(w)·Q ≠ Q·diag(w))")
        if not self.reads_stream_normed:
            return f"{self.name} has a branch reading the residual stream without a norm"
        return None

    @property
    def clip_exempt(self) -> tuple[str, ...]:
        """Linears whose outputs become attention scores: output error is a poor proxy for
        them, so AWQ's clipping search leaves them alone (as the reference does). A fused
        q|k|v projection holds q and k, so it is exempt whole."""
        return self.qkv if self.fused_qkv else self.qkv[:2]

    def is_expert(self, name: str) -> bool:
        """Whether layer-relative Linear `name` belongs to an expert (sees routed tokens)."""
        return self.moe is not None and name.startswith(
            f"{self.moe.block}.{self.moe.experts}.")

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers}.{index}."


LLAMA = Architecture("llama", ("llama", "mistral", "qwen2"))
ARCHITECTURES = (
    # Llama, Mistral and Qwen2 share one layout: biases (Qwen2's q/k/v) are found from the
    # tensors present, sliding windows and RoPE from config.json.
    LLAMA,
    replace(LLAMA, name="qwen3", model_types=("qwen3",), qk_norm="head"),
    replace(LLAMA, name="gemma2", model_types=("gemma2",),
            attn_out_norm="post_attention_layernorm", mlp_norm="pre_feedforward_layernorm",
            mlp_out_norm="post_feedforward_layernorm", norm_offset=1.0, embed_scale=True,
            query_pre_attn_scalar=True, attn_softcap=True, final_softcap=True),
    replace(LLAMA, name="gemma3", model_types=("gemma3_text",),
            attn_out_norm="post_attention_layernorm", mlp_norm="pre_feedforward_layernorm",
            mlp_out_norm="post_feedforward_layernorm", norm_offset=1.0, embed_scale=True,
            query_pre_attn_scalar=True, final_softcap=True, qk_norm="head"),
    replace(LLAMA, name="phi3", model_types=("phi3",), qkv=("self_attn.qkv_proj",),
            gate_up=("mlp.gate_up_proj",)),
    replace(LLAMA, name="olmo2", model_types=("olmo2",), attn_norm=None,
            attn_out_norm="post_attention_layernorm", mlp_norm=None,
            mlp_out_norm="post_feedforward_layernorm", qk_norm="projection"),
    # Mixtral names its experts' projections w1 (gate), w3 (up) and w2 (down).
    replace(LLAMA, name="mixtral", model_types=("mixtral",), moe=Experts(
        "block_sparse_moe", gate_up=("w1", "w3"), down="w2")),
    # Qwen3-MoE: dense layers (mlp_only_layers, decoder_sparse_step) keep Llama's MLP.
    replace(LLAMA, name="qwen3_moe", model_types=("qwen3_moe",), qk_norm="head",
            moe=Experts("mlp")),
    # OLMoE: Llama's norms, OLMo's q/k norms over the whole projections, Qwen-MoE's names.
    replace(LLAMA, name="olmoe", model_types=("olmoe",), qk_norm="projection",
            moe=Experts("mlp")),
    # Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2's attention, a gated shared expert.
    replace(LLAMA, name="qwen2_moe", model_types=("qwen2_moe",), moe=Experts(
        "mlp", shared="shared_expert", shared_gate="shared_expert_gate")),
)

GUIDE = "docs/architectures.md"


def supported_model_types() -> list[str]:
    return sorted(t for arch in ARCHITECTURES for t in arch.model_types)


def architecture_for(model_type: object) -> Architecture:
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    raise CompressError(
        f"unsupported architecture {model_type!r}; supported model types: "
        f"{', '.join(supported_model_types())} (adding one: {GUIDE})"
    )
