"""Peer baselines: llm-compressor's GPTQModifier or AWQModifier on CPU, fed our calibration ids.

Needs its own virtual environment (never install llmcompressor into the system
Python, and never let pip pull another torch). Recreate it with:

    python -m venv --system-site-packages /tmp/peer-venv   # reuses system torch 2.13.0+cpu
    echo "torch==2.13.0" > /tmp/peer-constraints.txt
    /tmp/peer-venv/bin/pip install -c /tmp/peer-constraints.txt llmcompressor==0.14.0.1

Where torch 2.13.0+cpu lives in a venv rather than in the system Python (e.g. the
project's /work/venv), --system-site-packages cannot reach it (a venv made from a venv's
python points at the base interpreter). Make the peer venv from the base interpreter and
append that venv's site-packages with a .pth file instead; the peer venv's own packages
still come first on sys.path, and pip leaves the other venv untouched (it only reads it):

    /root/.pyenv/versions/3.11.7/bin/python -m venv /tmp/peer-venv  # = /work/venv's "home"
    echo /work/venv/lib/python3.11/site-packages \
        > /tmp/peer-venv/lib/python3.11/site-packages/work-venv.pth
    echo "torch==2.13.0" > /tmp/peer-constraints.txt
    /tmp/peer-venv/bin/pip install -c /tmp/peer-constraints.txt llmcompressor==0.14.0.1

That gives, inside the venv only: llmcompressor 0.14.0.1, transformers 5.17.0 and
compressed-tensors 0.19.0 (llmcompressor pins these; they shadow the system 5.24 /
0.20.0), huggingface_hub 1.33.0, auto-round 0.15.1; torch, datasets, accelerate come
from the system (or the .pth'd venv). transformers 5.17 loads both bundled models'
converted directories (Gemma3ForCausalLM included) with the same logits as 5.24.

Run (does not import the `compress` package; no hub access, HF_HUB_OFFLINE=1):

    /tmp/peer-venv/bin/python benchmarks/peer_llmcompressor.py --method gptq \
        --model /root/.cache/compress/models/smollm2-135m-0.1.2-fp16 \
        --calib-ids /tmp/calib128.pt --out /tmp/peer-out-w4 --json /tmp/peer-w4.json

Gemma-3-270M (the `gemma3-270m` bundled model), W4 g128 everywhere:

    /tmp/peer-venv/bin/python benchmarks/peer_llmcompressor.py --method gptq --scheme w4g128 \
        --model /root/.cache/compress/models/gemma3-270m-1.0.0-fp16 \
        --calib-ids /tmp/gemma-calib128.pt --out /tmp/peer-gemma-w4g128 \
        --json /tmp/peer-gemma-w4g128.json

--calib-ids is a .pt int64 tensor [n_samples, seqlen]; all samples are used, in order
(for Gemma, make it with compress.data.calibration_set, which starts every sample with BOS).
Schemes (symmetric int, lm_head and embeddings not quantised): w4 / w3 = SmolLM2's layout,
group 64 for q/k/v/o/gate/up (in_features 576, not divisible by 128) and group 128 for
down_proj; w4g128 = group 128 for every Linear of the decoder layers (Gemma-3-270M: in
features 640/1024/2048; refused if a targeted Linear's in_features is not a multiple of
128); w3g128 likewise at 3 bits; w2g64 = 2 bits, group 64 for every Linear (ours:
--bits 2 --group-size 64);
w8 = per-channel.
--actorder none|weight ("weight" = "static"; llm-compressor's own default; "group"/"dynamic"
is rejected by GPTQ in 0.14: "Only 'weight' and 'static' are supported").
GPTQ settings: dampening_frac 0.01, block_size 128, sequential (layer-by-layer)
pipeline, batch size 1. AWQ (--method awq): AWQModifier (n_grid 20, duo_scaling True, its
defaults; it has no clipping search) followed by QuantizationModifier (RTN) with the same
config groups. RTN (--method rtn): QuantizationModifier alone, the same config groups on
its own grid (the calibration ids then only feed its observers). Calibration runs in
float32 by default (CPU fp16 is very slow); the model is cast to float16 (the source
dtype) before saving with save_compressed=True (compressed-tensors pack-quantized).
Note llm-compressor's symmetric scale is absmax / ((2**b - 1) / 2), e.g. absmax / 7.5
at 4 bits.

Mixture of experts (--moe-experts, see benchmarks/moe_peer.py): oneshot linearises the
fused experts of transformers 5 (MixtralExperts' 3D gate_up_proj/down_proj) into one
gate_proj/up_proj/down_proj Linear per expert, which the SMALL/DOWN targets match.
"all" is llm-compressor's default (oneshot's moe_calibrate_all_experts=True: every expert
runs on every token, only the routed outputs are kept); "routed" gives each expert only
its routed tokens. The router (Mixtral's mlp.gate, a MixtralTopKRouter, not a Linear) is
not targeted; --ignore adds it to the ignore list anyway, as `re:` patterns (default:
lm_head only). The JSON records the sha256 of the ids file and of the ids the model's
embedding actually saw (its LengthAwareSampler reorders equal-length samples, an unstable
argsort: the same rows, another order, which GPTQ's summed Hessians do not see), and every
module GPTQ compressed.
"""

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

T0 = time.perf_counter()

import compressed_tensors  # noqa: E402
import llmcompressor  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from llmcompressor import oneshot  # noqa: E402
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier  # noqa: E402
from llmcompressor.modifiers.transform.awq import AWQModifier  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

if not torch.cuda.is_available():
    # llm-compressor 0.14's AWQ pins its activation cache unconditionally, which CPU-only
    # torch refuses ("Cannot access accelerator device"). Pinning only speeds host-to-GPU
    # copies, so on CPU a no-op changes nothing else.
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None

SMALL = r"re:.*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj)$"
DOWN = r"re:.*down_proj$"


def weights(bits: int, strategy: str, group_size: int | None = None) -> dict:
    w = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": strategy}
    if group_size is not None:
        w["group_size"] = group_size
    return w


def config_groups(scheme: str) -> dict:
    if scheme in ("w4", "w3"):
        bits = int(scheme[1])
        return {
            "group_576": {"targets": [SMALL], "weights": weights(bits, "group", 64)},
            "group_1536": {"targets": [DOWN], "weights": weights(bits, "group", 128)},
        }
    if uniform := re.fullmatch(r"w(\d)g(\d+)", scheme):
        bits, size = int(uniform[1]), int(uniform[2])
        return {f"group_{size}": {"targets": [SMALL, DOWN],
                                  "weights": weights(bits, "group", size)}}
    if scheme == "w8":
        return {"channel": {"targets": [SMALL, DOWN], "weights": weights(8, "channel")}}
    raise ValueError(scheme)


def check_group_sizes(model: torch.nn.Module, groups: dict) -> None:
    """Refuse a group size that does not divide a targeted Linear's in_features (a uniform
    g128 scheme fits Gemma-3-270M, not SmolLM2's 576-wide projections)."""
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        for group in groups.values():
            size = group["weights"].get("group_size")
            hit = any(re.fullmatch(t.removeprefix("re:"), name) for t in group["targets"])
            if hit and size and module.in_features % size:
                raise SystemExit(f"{name}: in_features {module.in_features} is not a multiple "
                                 f"of group size {size}; use --scheme w4 for this model")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="/root/.cache/compress/models/smollm2-135m-0.1.2-fp16")
    ap.add_argument("--method", choices=["gptq", "awq", "rtn"], default="gptq")
    ap.add_argument("--calib-ids", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--json", default=None)
    ap.add_argument("--scheme", default="w4",
                    choices=["w4", "w3", "w4g128", "w3g128", "w2g64", "w8"])
    ap.add_argument("--actorder", choices=["none", "weight"], default="none")
    dtypes = ["float16", "bfloat16", "float32"]
    ap.add_argument("--dtype", choices=dtypes, default="float32",
                    help="dtype for calibration + GPTQ (fp16 matmul is ~5x slower on this CPU)")
    ap.add_argument("--save-dtype", choices=dtypes, default="float16",
                    help="cast to this before saving (scales, embeddings, norms); source is fp16")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--ignore", action="append", default=None,
                    help="module name or re: pattern left unquantised (repeatable; "
                         "default: lm_head)")
    ap.add_argument("--moe-experts", choices=["all", "routed"], default="all",
                    help="MoE calibration: every token through every expert (llm-compressor's "
                         "default) or routed tokens only")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    ignore = args.ignore or ["lm_head"]
    ids = torch.load(args.calib_ids)
    assert ids.dtype == torch.int64 and ids.dim() == 2, (ids.dtype, ids.shape)
    ids_sha256 = hashlib.sha256(ids.numpy().tobytes()).hexdigest()
    n, seqlen = ids.shape
    ds = Dataset.from_dict({
        "input_ids": ids.tolist(),
        "attention_mask": torch.ones_like(ids).tolist(),
    })

    t_load = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    t_load = time.perf_counter() - t_load

    groups = config_groups(args.scheme)
    check_group_sizes(model, groups)
    if args.method == "gptq":
        recipe = GPTQModifier(
            config_groups=groups,
            ignore=ignore,
            block_size=128,
            dampening_frac=0.01,
            actorder=None if args.actorder == "none" else args.actorder,
        )
    elif args.method == "awq":
        recipe = [AWQModifier(n_grid=20, duo_scaling=True),
                  QuantizationModifier(config_groups=groups, ignore=ignore)]
    else:  # its round-to-nearest, on its own symmetric grid (absmax / 7.5 at 4 bits)
        recipe = QuantizationModifier(config_groups=groups, ignore=ignore)

    # What the calibration actually fed the model: the embedding's inputs, in call order.
    seen: list[torch.Tensor] = []
    hook = model.get_input_embeddings().register_forward_pre_hook(
        lambda module, inputs: seen.append(inputs[0].detach().reshape(-1, seqlen).cpu()))
    compressed: list[str] = []  # every module GPTQ compressed (RTN fallbacks included)
    if args.method == "gptq":
        compress_list = GPTQModifier.compress_module_list

        def counting(self, module_list):
            compressed.extend(self._module_names[m] for m in module_list)
            return compress_list(self, module_list)

        GPTQModifier.compress_module_list = counting

    t1 = time.perf_counter()
    model = oneshot(
        model=model,
        processor=tokenizer,
        recipe=recipe,
        dataset=ds,
        num_calibration_samples=n,
        max_seq_length=seqlen,
        shuffle_calibration_samples=False,
        batch_size=1,
        moe_calibrate_all_experts=args.moe_experts == "all",
    )
    oneshot_s = time.perf_counter() - t1
    hook.remove()
    fed = torch.cat(seen) if seen else torch.empty(0, seqlen, dtype=torch.int64)
    quantised = sorted(name for name, m in model.named_modules()
                       if getattr(m, "quantization_scheme", None) is not None)

    t2 = time.perf_counter()
    model.to(getattr(torch, args.save_dtype))
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    save_s = time.perf_counter() - t2

    result = {
        "peer": f"llmcompressor.{'GPTQModifier' if args.method == 'gptq' else 'AWQModifier'}",
        "scheme": args.scheme,
        "actorder": args.actorder,
        "config_groups": groups,
        "ignore": ignore,
        "moe_calibrate_all_experts": args.moe_experts == "all",
        "block_size": 128,
        "dampening_frac": 0.01,
        "dtype": args.dtype,
        "save_dtype": args.save_dtype,
        "calib_ids": os.path.abspath(args.calib_ids),
        "calib_ids_sha256": ids_sha256,
        # the embedding runs more than once per sample (calibrate, then propagate); the
        # first n rows are the calibration pass, in the sampler's order
        "embedding_calls_rows": int(fed.shape[0]),
        "embedding_first_n_rows_sha256": hashlib.sha256(
            fed[:n].contiguous().numpy().tobytes()).hexdigest(),
        "embedding_first_n_rows_equal_ids": bool(fed.shape[0] >= n and torch.equal(fed[:n], ids)),
        "embedding_first_n_rows_same_rows_as_ids": bool(
            fed.shape[0] >= n and sorted(map(tuple, fed[:n].tolist()))
            == sorted(map(tuple, ids.tolist()))),
        "embedding_order_of_ids": [next((j for j in range(n) if torch.equal(row, ids[j])), -1)
                                   for row in fed[:n]],
        "quantised_modules": quantised,
        "gptq_modules": compressed,
        "n_samples": n,
        "seqlen": seqlen,
        "torch_threads": torch.get_num_threads(),
        "load_s": round(t_load, 3),
        "oneshot_s": round(oneshot_s, 3),
        "save_s": round(save_s, 3),
        "total_s": round(time.perf_counter() - T0, 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "versions": {
            "llmcompressor": llmcompressor.__version__,
            "transformers": transformers.__version__,
            "compressed_tensors": compressed_tensors.__version__,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "model": os.path.abspath(args.model),
        "model_type": model.config.model_type,
        "out": os.path.abspath(args.out),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
