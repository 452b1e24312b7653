"""`compress check`: the engines' kernel rules on made-up shapes (each rule's oracle is the
vLLM or compressed-tensors source line cited in compress/compat.py), then the walk over
real tiny checkpoints: fused layers, tensor-parallel splits, exit codes and errors."""

from __future__ import annotations

import json

import pytest

from compress import api as compress_api
from compress import compat
from compress.compat import Quant, Shape
from compress.quant import QuantScheme
from compress.recipe import Override, Recipe


def kernels(q: Quant, s: Shape) -> dict[str, compat.Kernel]:
    return {k.name: k for k in compat.vllm_linear(q, s)}


W4G64 = Quant(4, 64, dtype="bfloat16")
WIDE = Shape.whole(4096, 4096)  # every tile and group fits


# ------------------------------------------------------------------ group sizes


@pytest.mark.parametrize("group,machete,conch,marlin", [
    (64, True, False, True),     # Machete takes 64 for 16-bit activations; Conch does not
    (128, True, True, True),
    (-1, True, True, True),
    (32, False, False, True),    # Marlin alone among these takes 32
    (256, False, False, False),  # Triton W4A16 does; the others do not
])
def test_group_sizes_per_kernel(group, machete, conch, marlin):
    k = kernels(Quant(4, group, dtype="bfloat16"), WIDE)
    assert (k["Machete"].ok, k["Conch"].ok, k["Marlin"].ok) == (machete, conch, marlin)
    if not machete:
        assert k["Machete"].reason == f"group size {group}; takes -1, 64, 128"
    assert k["Triton W4A16"].ok  # 32, 64, 128, 256 and per-channel


def test_machete_takes_64_only_with_16_bit_activations():
    k = kernels(Quant(4, 64, dtype="float32"), WIDE)
    assert not k["Machete"].ok and k["Machete"].reason == "group size 64; takes -1, 128"


def test_machete_needs_outputs_a_multiple_of_128_and_hopper():
    k = kernels(W4G64, Shape.whole(576, 960))
    assert k["Machete"].reason == "outputs 960 not a multiple of 128"
    ok = kernels(W4G64, Shape.whole(576, 3072))["Machete"]
    assert ok.ok and ok.serves(90) and not ok.serves(80) and not ok.serves(100)


# ------------------------------------------------- Marlin tiles and tensor parallel


def test_marlin_pads_misaligned_tiles_the_way_vllm_does():
    # (n % 64, k % 128) or (n % 128, k % 64), the cheaper; k a multiple of the group
    assert compat.marlin_padded_nk(960, 576, 64) == (1024, 576)
    assert compat.marlin_padded_nk(576, 576, 64) == (576, 640)
    assert compat.marlin_padded_nk(4096, 4096, 128) == (4096, 4096)
    assert compat.marlin_padded_nk(100, 96, 32) == (128, 128)
    m = kernels(W4G64, Shape.whole(576, 576))["Marlin"]
    assert m.ok and m.reason == "pads inputs 576->640; Marlin before vLLM PR #45295 refuses it"


def test_act_order_keeps_marlins_strict_tile_check():
    q = Quant(4, 64, g_idx=True, dtype="float16")
    m = kernels(q, Shape.whole(576, 1024))["Marlin"]
    assert not m.ok and m.reason == "act-order: inputs 576 not a multiple of 128"
    assert kernels(q, Shape.whole(1024, 1024))["Marlin"].ok


def test_inputs_split_by_tp_must_not_cut_a_group():
    # down_proj 1536 inputs, tp 3: 512 per rank holds 4 groups of 128 ...
    assert kernels(Quant(4, 128), Shape(512, 576, 1536, 576))["Marlin"].ok
    # ... 1536 / 5 does not divide, but say 1600 / 5 = 320 per rank cuts groups of 128
    only = compat.vllm_linear(Quant(4, 128), Shape(320, 576, 1600, 576))
    assert len(only) == 1 and not only[0].ok
    assert "groups of 128 straddle the tensor-parallel split (inputs per rank 320)" \
        in only[0].reason
    # per-channel scales are repeated on every rank: nothing to cut
    assert kernels(Quant(4, -1), Shape(320, 576, 1600, 576))["Marlin"].ok


def test_act_order_with_split_inputs_rules_out_machete_and_exllama():
    q = Quant(4, 128, g_idx=True, dtype="float16")
    k = kernels(q, Shape(2048, 4096, 4096, 4096))
    assert not k["Machete"].ok and not k["Exllama"].ok
    assert k["Exllama"].reason == "no act-order when inputs are split across ranks"
    assert k["Marlin"].ok and not k["Triton W4A16"].ok and not k["Humming"].ok


# ----------------------------------------------------- bit widths, zero points, dtypes


def test_8_bit_symmetric():
    k = kernels(Quant(8, 128, dtype="float16"), WIDE)
    assert k["Marlin"].ok and k["Machete"].ok and k["Exllama"].ok
    assert not k["Triton W4A16"].ok and k["Triton W4A16"].reason == "uint8b128; takes 4-bit"
    per_channel = kernels(Quant(8, -1, dtype="float16"), WIDE)["AllSpark"]
    assert per_channel.ok and per_channel.serves(86) and not per_channel.serves(90)


def test_asymmetric_needs_a_zero_point_type():
    k4 = kernels(Quant(4, 128, symmetric=False, dtype="float16"), WIDE)
    assert k4["Marlin"].ok and k4["Machete"].ok and k4["Triton W4A16"].ok
    assert not k4["Exllama"].ok and k4["Exllama"].reason == "uint4; takes uint4b8, uint8b128"
    k8 = kernels(Quant(8, 128, symmetric=False, dtype="float16"), WIDE)
    assert not k8["Marlin"].ok and k8["Marlin"].reason == "uint8; takes uint4b8, uint8b128, uint4"
    assert k8["Machete"].ok  # Hopper only
    assert [n for n, k in k8.items() if k.serves(80)] == []


def test_2_and_3_bit_have_no_stock_kernel():
    k = kernels(Quant(3, 128, dtype="float16"), WIDE)
    assert [n for n, kern in k.items() if kern.ok] == ["Humming"]  # optional package
    assert not any(kern.serves(c) for kern in k.values() for _, c in compat.GPUS)
    asym = compat.vllm_linear(Quant(3, 128, symmetric=False), WIDE)
    assert asym[0].reason == "vLLM's WNA16 scheme takes 3-bit weights only symmetric"


def test_exllama_wants_float16_activations():
    k = kernels(Quant(4, 128, dtype="bfloat16"), WIDE)["Exllama"]
    assert not k.ok and k.reason.startswith("float16 activations only; this checkpoint is bfloat16")


@pytest.mark.parametrize("quant,ok,reason", [
    (Quant(4, 64), True, ""),
    (Quant(3, -1), True, ""),
    (Quant(4, 128, symmetric=False), False, "asymmetric"),
    (Quant(4, 128, g_idx=True), False, "actorder 'group' (g_idx)"),
])
def test_transformers_rules(quant, ok, reason):
    (k,) = compat.transformers_linear(quant)
    assert k.ok == ok and k.reason.startswith(reason)


def test_experts_on_fused_marlin_moe():
    (ok,) = compat.vllm_experts(Quant(4, 128), 2048, 768)
    assert ok.ok and ok.name == "Marlin MoE"
    (cut,) = compat.vllm_experts(Quant(4, 128), 2048, 320)
    assert not cut.ok and cut.reason == "expert width per rank 320 not a multiple of group size 128"
    (hidden,) = compat.vllm_experts(Quant(4, 64), 576, 768)
    assert hidden.reason == "hidden size 576 not a multiple of 128"
    (asym,) = compat.vllm_experts(Quant(4, 64, symmetric=False), 2048, 768)
    assert asym.reason.startswith("asymmetric")


# ------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def w4g32(tiny_llama, tmp_path_factory):
    """Hidden 64, MLP 160, 4 heads of 16, 2 KV heads, float32."""
    out = tmp_path_factory.mktemp("compat") / "w4g32"
    compress_api.quantize(tiny_llama, Recipe("rtn", QuantScheme(4, 32)), out, evaluate=False)
    return out


def test_tiny_checkpoint_on_vllm_tp1(w4g32):
    report = compat.check(w4g32)
    assert report.ok and len(report.linears) == 14
    roles = {lin.role: lin for lin in report.linears}
    # q, k and v run as one qkv_proj of (4 + 2 * 2) * 16 = 128 outputs
    assert roles["k"].shape == Shape(64, 128, 64, 128)
    assert roles["gate"].shape == Shape(64, 320, 64, 320)
    served = {k.name for k in roles["down"].kernels if k.ok}
    # float32 activations: Machete takes only -1/128 then, Triton and Exllama want 16-bit
    assert served == {"Marlin", "Humming"}
    assert report.lines()[-1] == ("verdict: every one of the 14 quantised Linears has a kernel "
                                  "on vLLM (tensor parallel 1), on every GPU family")


def test_tp2_cuts_down_projs_groups(w4g32, cli):
    report = compat.check(w4g32, "vllm", 2)
    down = [lin for lin in report.linears if lin.role == "down"]
    assert down[0].shape == Shape(80, 64, 160, 64)
    assert "groups of 32 straddle the tensor-parallel split (inputs per rank 80)" \
        in down[0].kernels[0].reason
    assert not report.ok and len(report.unserved) == 2
    proc = cli("check", w4g32, "--tp", "2")
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[-1] == ("verdict: 2 of 14 Linears have no kernel on vLLM "
                                            "(tensor parallel 2) on any GPU family")
    assert "  2 Linears (down, 160 inputs, 80 per rank, W4 g32 sym): any kernel ✗" \
        in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["--tp", "3"], "error: --tp 3 does not divide the attention heads (4); vLLM shards it "
                    "evenly across ranks: choose a tp that divides 4"),
    (["--tp", "0"], "error: --tp must be a positive integer, not 0"),
    (["--target", "tgi"], "error: --target 'tgi' is not known; choose vllm or transformers"),
    (["--target", "transformers", "--tp", "2"], "error: --tp applies to --target vllm"),
])
def test_bad_input_is_one_line(w4g32, cli, args, message):
    proc = cli("check", w4g32, *args)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(message) and len(proc.stderr.strip().splitlines()) == 1


def test_not_a_quantised_checkpoint(tiny_llama, tmp_path, cli):
    proc = cli("check", tiny_llama)
    assert proc.returncode == 2
    assert "has no quantization_config in config.json: not a quantised checkpoint" in proc.stderr
    assert cli("check", tmp_path / "missing").returncode == 2
    foreign = tmp_path / "awq"
    foreign.mkdir()
    config = json.loads((tiny_llama / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (foreign / "config.json").write_text(json.dumps(config))
    proc = cli("check", foreign)
    assert proc.returncode == 2 and "quant_method 'awq' is not supported" in proc.stderr


def test_a_fused_shard_with_its_own_scheme_cannot_load_in_vllm(tiny_llama, tmp_path):
    out = tmp_path / "mixed"
    recipe = Recipe("rtn", QuantScheme(4, 32), overrides=(
        Override("model.layers.0.self_attn.k_proj", QuantScheme(8, 32)),
        Override("model.layers.1.self_attn.o_proj", QuantScheme(8, 32)),))
    compress_api.quantize(tiny_llama, recipe, out, evaluate=False)
    report = compat.check(out)
    by_name = {lin.name: lin for lin in report.linears}
    (k,) = by_name["model.layers.0.self_attn.k_proj"].kernels
    assert not k.ok and "looks the fused layer up by class name, which gives the 'Linear' " \
                        "group's w4g32-sym, not its own w8g32-sym" in k.reason
    # an unfused Linear's own regex target is found by name
    assert any(k.ok for k in by_name["model.layers.1.self_attn.o_proj"].kernels)
    assert not report.ok


def test_asymmetric_checkpoint_on_transformers(tiny_llama, tmp_path, cli):
    out = tmp_path / "asym"
    compress_api.quantize(tiny_llama, Recipe("rtn", QuantScheme(4, 32, False)), out,
                          evaluate=False)
    proc = cli("check", out, "--target", "transformers")
    assert proc.returncode == 1
    assert "14 Linears (q/k/v/o/gate/up/down" not in proc.stdout  # two input sizes
    assert proc.stdout.splitlines()[-1] == ("verdict: does not load in transformers: 14 of "
                                            "14 Linears cannot be read")
    assert cli("check", out).returncode == 0  # vLLM has zero-point kernels for 4-bit


def test_moe_experts_share_one_fused_layer(tiny_factory, tmp_path):
    from conftest import ARCH_CASES

    model = tiny_factory("qwen3_moe", **ARCH_CASES["qwen3_moe"])
    out = tmp_path / "moe"
    compress_api.quantize(model, Recipe("rtn", QuantScheme(4, 32)), out, evaluate=False)
    report = compat.check(out)
    experts = [lin for lin in report.linears if lin.role == "expert"]
    assert len(experts) == 4 * 3  # layer 0: 4 experts x gate/up/down; layer 1 is dense
    # hidden size 64 is no multiple of 128: the fused Marlin MoE kernel refuses
    assert experts[0].kernels[0].reason == "hidden size 64 not a multiple of 128"
    assert not report.ok and any("fused MoE layer" in note for note in report.notes)


@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
def test_push_states_the_check_in_the_card_and_does_not_block(tiny_llama, tmp_path, hub):
    from hub_server import HUB_TOKEN

    from compress import hub as compress_hub

    out = tmp_path / "w3"
    compress_api.quantize(tiny_llama, Recipe("rtn", QuantScheme(3, 32)), out, evaluate=False)
    dry = compress_hub.push(out, "test-user/w3", dry_run=True)
    assert dry.compatibility == ("serving check (vLLM, tp 1): 14 of 14 Linears have no kernel "
                                 f"on vLLM (tensor parallel 1) on any GPU family; details: "
                                 f"compress check {out}")
    section = dry.card.split("## Serving compatibility\n\n", 1)[1].split("\n## ", 1)[0]
    assert "W3 g32 sym): Humming ✓ if humming is installed; Machete ✗ (uint3b4; takes" in section
    assert section.rstrip().endswith("**14 of 14 Linears have no kernel on vLLM (tensor "
                                     "parallel 1) on any GPU family.**")
    pushed = compress_hub.push(out, "test-user/w3", token=HUB_TOKEN, endpoint=hub.endpoint)
    assert pushed.commit and pushed.compatibility == dry.compatibility
    assert "## Serving compatibility" in (out / "README.md").read_text()
