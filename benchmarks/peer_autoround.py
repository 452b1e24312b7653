"""Peer baseline: Intel's auto-round (SignRound) on CPU, fed our calibration ids.

Runs in the peer venv of benchmarks/peer_llmcompressor.py (/tmp/peer-venv, which already
holds auto-round 0.15.1 beside llmcompressor 0.14.0.1 and transformers 5.17.0; auto-round
alone installs with `/tmp/peer-venv/bin/pip install -c /tmp/peer-constraints.txt
auto-round==0.15.1`). Does not import the `compress` package; no hub access.

    /tmp/peer-venv/bin/python benchmarks/peer_autoround.py \
        --model /root/.cache/compress/models/smollm2-135m-0.1.2-fp16 \
        --calib-ids /tmp/calib_ids.pt --bits 4 --group-size 128 --iters 25 --batch-size 4 \
        --out /tmp/ar-w4g128 --json /tmp/ar-w4g128.json

benchmarks/lowbit.py (cell SETTING:autoround) makes the ids (our seed-0 windows), runs this
as a child process and scores what it writes.

Calibration: --calib-ids is a .pt int64 tensor [n, seqlen]. auto-round's `dataset`
accepts a list of tensors in place of a dataset name; each row goes in as one [1, seqlen]
tensor, in order, and nsamples/seqlen are set to the tensor's shape, so every window is
used verbatim (the JSON records whether the embedding saw exactly these rows, in order).
For tensor input auto-round builds the attention mask itself: the tokenizer's pad id
(SmolLM2: <|im_end|>, id 2) is masked, and so is the last position of every window (its
"all-ones mask" workaround); its block loss skips the last position (no next token) and
pad positions. The JSON counts pad ids in the windows (ours have none).

Settings: bits/group size/symmetric are auto-round's int "W{bits}A16" scheme. Its
symmetric int grid is full range, q in [-2^(b-1), 2^(b-1) - 1] with
scale = signed absmax / 2^(b-1) (the larger-magnitude end maps to -2^(b-1)), scale kept
in float16; the SignRound step then tunes a rounding offset per weight (not clamped: the
decaying step bounds its travel to about +-0.5) and per-group factors on the negative and
positive ends of the range (enable_minmax_tuning, clamped to [0, 1]) with signed SGD, lr
and minmax_lr default 1/iters (below 1,000 iters), linear decay to 0, one batch of
--batch-size windows per iteration, restoring the best-loss iteration per block. The
block's target is the unquantised model's output of that block (unquantised inputs);
it trains on the quantised model's inputs. Blocks are the 30 decoder layers, quantised
in order, each fed the previous quantised layers' outputs (enable_quanted_input).
--iters 0 is auto-round's RTN; by default its "optimized RTN" (an importance-weighted
scale search from the calibration activations) is switched off with disable_opt_rtn, so
--iters 0 is plain round-to-nearest on the grid above (--opt-rtn keeps the search).

Group sizes that do not divide in_features: auto-round zero-pads each row to a multiple
of the group size (reshape_pad_tensor_by_group_size), so SmolLM2's 576-wide
q/k/v/o/gate/up at g128 get 4 groups of 128 and a last group of 64 real columns (the
zero padding cannot raise a symmetric absmax); it skips (keeps in 16 bits) only Linears
with a dimension not a multiple of 32, which none here are. lm_head (tied to the
embedding) and the embedding are not quantised. The JSON lists every quantised Linear.

dtype: the model is loaded in --dtype (float32 default) and tuned with amp=False, so
auto-round trains in float32 (with amp on, its default, it casts the model to bfloat16
on a CPU with bf16 support; on an AVX2-only CPU it falls back to float32 anyway).
torch.compile is off by default (--torch-compile on to use it).

Output: auto-round's fake-quant state, i.e. after quantize() every quantised Linear's
weight is its dequantised quantised weight (scale * q). That model is saved as a plain
dense safetensors HF folder (cast to --save-dtype, float16 default, the source dtype;
scale * q in float16 can round in the last bit, the JSON records the largest such
difference) with the source's config and tokenizer, which `compress eval`'s harness scores
like any dense model. Before saving, every quantised weight is checked to take at most
2^bits distinct values per group (and to equal scale * q with q on the grid).
"""

import argparse
import hashlib
import json
import math
import os
import resource
import shutil
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

T0 = time.perf_counter()

import auto_round  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from auto_round import AutoRound  # noqa: E402
from auto_round.algorithms.quantization.sign_round.quantizer import SignRoundQuantizer  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def group_check(weight: torch.Tensor, scale: torch.Tensor | None, bits: int,
                group: int) -> dict:
    """Distinct values per group (at most 2^bits) and weight == scale * q, q on the grid."""
    w = weight.detach().float()
    rows, cols = w.shape
    ngroups = math.ceil(cols / group)
    distinct = 0
    for g in range(ngroups):
        block = w[:, g * group:(g + 1) * group].sort(dim=1).values
        distinct = max(distinct, int((block[:, 1:] != block[:, :-1]).sum(1).max()) + 1)
    out = {"max_distinct_per_group": distinct, "groups_per_row": ngroups,
           "last_group_columns": cols - (ngroups - 1) * group}
    if scale is not None:
        s = scale.float().reshape(rows, ngroups)
        s = s.repeat_interleave(group, dim=1)[:, :cols]
        q = w / s
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        out["q_min"], out["q_max"] = int(q.round().min()), int(q.round().max())
        out["max_abs_q_minus_round"] = float((q - q.round()).abs().max())
        out["on_grid"] = bool(out["q_min"] >= lo and out["q_max"] <= hi)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="/root/.cache/compress/models/smollm2-135m-0.1.2-fp16")
    ap.add_argument("--calib-ids", required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--iters", type=int, default=200, help="auto-round's default 200; 0 = RTN")
    ap.add_argument("--batch-size", type=int, default=8, help="auto-round's default 8")
    ap.add_argument("--lr", type=float, default=None, help="default: auto-round's 1/iters")
    ap.add_argument("--minmax-lr", type=float, default=None, help="default: lr")
    ap.add_argument("--seed", type=int, default=42, help="auto-round's default 42")
    ap.add_argument("--opt-rtn", action="store_true",
                    help="--iters 0: keep auto-round's optimized RTN (scale search)")
    ap.add_argument("--torch-compile", choices=["on", "off"], default="off")
    dtypes = ["float16", "bfloat16", "float32"]
    ap.add_argument("--dtype", choices=dtypes, default="float32")
    ap.add_argument("--save-dtype", choices=dtypes, default="float16")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--device", default="cpu", help="auto-round's device_map: cpu, cuda")
    ap.add_argument("--out", required=True)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    ids = torch.load(args.calib_ids)
    assert ids.dtype == torch.int64 and ids.dim() == 2, (ids.dtype, ids.shape)
    ids_sha256 = hashlib.sha256(ids.numpy().tobytes()).hexdigest()
    n, seqlen = ids.shape

    t_load = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    t_load = time.perf_counter() - t_load
    pad_id = tokenizer.pad_token_id

    # What calibration actually fed the model: the embedding's inputs, in call order.
    seen: list[torch.Tensor] = []
    hook = model.get_input_embeddings().register_forward_pre_hook(
        lambda module, inputs: seen.append(inputs[0].detach().reshape(-1, seqlen).cpu()))

    # Wall time and count of SignRound's block tunings (one per decoder layer).
    block_seconds: list[float] = []
    tune = SignRoundQuantizer.quantize_block

    def timed(self, *a, **k):
        t = time.perf_counter()
        try:
            return tune(self, *a, **k)
        finally:
            block_seconds.append(time.perf_counter() - t)

    SignRoundQuantizer.quantize_block = timed

    kwargs = {}
    if args.iters == 0 and not args.opt_rtn:
        kwargs["disable_opt_rtn"] = True
    if args.lr is not None:
        kwargs["lr"] = args.lr
    if args.minmax_lr is not None:
        kwargs["minmax_lr"] = args.minmax_lr
    t_init = time.perf_counter()
    ar = AutoRound(
        model,
        tokenizer=tokenizer,
        scheme=f"W{args.bits}A16",
        bits=args.bits,
        group_size=args.group_size,
        sym=args.sym,
        dataset=[row.unsqueeze(0) for row in ids],
        nsamples=n,
        seqlen=seqlen,
        iters=args.iters,
        batch_size=args.batch_size,
        seed=args.seed,
        device_map=args.device,
        amp=False,
        enable_torch_compile=args.torch_compile == "on",
        **kwargs,
    )
    t_init = time.perf_counter() - t_init
    qcfg = getattr(ar, "quantize_config", None)
    ctx = ar.model_context

    t1 = time.perf_counter()
    model, layer_config = ar.quantize()
    quantize_s = time.perf_counter() - t1
    hook.remove()
    fed = torch.cat(seen) if seen else torch.empty(0, seqlen, dtype=torch.int64)

    settings = {
        "algorithm": type(qcfg).__name__,
        "scheme": f"W{args.bits}A16",
        "bits": getattr(qcfg, "bits", None),
        "group_size": getattr(qcfg, "group_size", None),
        "sym": getattr(qcfg, "sym", None),
        "data_type": getattr(qcfg, "data_type", None),
        "iters": getattr(qcfg, "iters", 0),
        "lr": getattr(qcfg, "lr", None),
        "minmax_lr": getattr(qcfg, "minmax_lr", None),
        "enable_minmax_tuning": getattr(qcfg, "enable_minmax_tuning", None),
        "enable_quanted_input": getattr(qcfg, "enable_quanted_input", None),
        "gradient_accumulate_steps": getattr(qcfg, "gradient_accumulate_steps", None),
        "not_use_best_mse": getattr(qcfg, "not_use_best_mse", None),
        "momentum": getattr(qcfg, "momentum", None),
        "nblocks": getattr(qcfg, "nblocks", None),
        "disable_opt_rtn": getattr(qcfg, "disable_opt_rtn", None),
        "enable_imatrix": getattr(qcfg, "enable_imatrix", None),
        "nsamples": ar.calibration_context.nsamples,
        "seqlen": ar.calibration_context.seqlen,
        "batch_size": ar.calibration_context.batch_size,
        "seed": args.seed,
        "amp": ctx.amp,
        "amp_dtype": str(ctx.amp_dtype),
        "torch_compile": bool(ar.compress_context.enable_torch_compile),
    }
    decoder_linears = {name: m for name, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and ".layers." in name}
    quantised = sorted(name for name, cfg in layer_config.items()
                       if cfg.get("bits", 16) < 16 and name in decoder_linears)
    not_quantised = sorted(set(decoder_linears) - set(quantised))
    scales = [getattr(decoder_linears[name], "scale", None) for name in quantised]
    settings["scale_dtype"] = sorted({str(s.dtype) for s in scales if s is not None})

    t2 = time.perf_counter()
    model.to(getattr(torch, args.save_dtype))
    checks, worst_cast = {}, 0.0
    for name in quantised:
        m = decoder_linears[name]
        scale = getattr(m, "scale", None)
        c = group_check(m.weight, scale, args.bits, args.group_size)
        checks[name] = c
        if c["max_distinct_per_group"] > 2 ** args.bits or not c.get("on_grid", True):
            raise SystemExit(f"{name}: not a {args.bits}-bit grouped weight: {c}")
        worst_cast = max(worst_cast, c.get("max_abs_q_minus_round", 0.0))
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    save_s = time.perf_counter() - t2

    per_layer = [round(s, 3) for s in block_seconds]
    iters = settings["iters"] or 0
    result = {
        "peer": "auto_round.AutoRound (" + ("SignRound" if iters else "RTN") + ")",
        "settings": settings,
        "dtype": args.dtype,
        "save_dtype": args.save_dtype,
        "calib_ids": os.path.abspath(args.calib_ids),
        "calib_ids_sha256": ids_sha256,
        "calib_pad_token_id": pad_id,
        "calib_pad_tokens": int((ids == pad_id).sum()) if pad_id is not None else 0,
        "embedding_calls_rows": int(fed.shape[0]),
        "embedding_first_n_rows_sha256": hashlib.sha256(
            fed[:n].contiguous().numpy().tobytes()).hexdigest(),
        "embedding_first_n_rows_equal_ids": bool(fed.shape[0] >= n and torch.equal(fed[:n], ids)),
        "quantised_linears": len(quantised),
        "decoder_linears": len(decoder_linears),
        "not_quantised_decoder_linears": not_quantised,
        "quantised_modules": quantised,
        "max_distinct_per_group": max((c["max_distinct_per_group"] for c in checks.values()),
                                      default=None),
        "last_group_columns": sorted({c["last_group_columns"] for c in checks.values()}),
        "max_abs_q_minus_round_after_save_cast": worst_cast,
        "group_checks_sample": {k: checks[k] for k in quantised[:7]},
        "block_seconds": per_layer,
        "block_seconds_total": round(sum(block_seconds), 3),
        "seconds_per_step_per_layer": (round(sum(block_seconds) / len(block_seconds) / iters, 3)
                                       if iters and block_seconds else None),
        "n_samples": n,
        "seqlen": seqlen,
        "torch_threads": torch.get_num_threads(),
        "device": (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else args.device),
        "load_s": round(t_load, 3),
        "init_s": round(t_init, 3),
        "quantize_s": round(quantize_s, 3),
        "save_s": round(save_s, 3),
        "total_s": round(time.perf_counter() - T0, 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "versions": {
            "auto_round": auto_round.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "model": os.path.abspath(args.model),
        "out": os.path.abspath(args.out),
        "output_format": f"dense {args.save_dtype} safetensors of the dequantised weights",
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
