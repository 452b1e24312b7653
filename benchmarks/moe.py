"""Mixture-of-experts figures, in one run: GPTQ time and memory, decode speed against a
dense model of the same active size, and routed vs all-token expert calibration.

    python benchmarks/moe.py [--layers 4] [--hidden 1024] [--intermediate 2048]
                             [--experts 8] [--top-k 2] [--rounds 3]
                             [--parts synthetic,decode,quality] [--methods rtn,gptq,...]

1. A synthetic Mixtral (random fp16 weights; by default 8 experts, top-2, hidden 1024,
   4 layers) quantised by `compress quantize` in a child process with each calibrated
   method and expert-calibration mode: wall time and the child's own peak RSS, against one layer's
   weights with all its experts (float32, as calibration holds them) plus the
   calibration activations.
2. Decode tokens/s at batch 1 of that MoE packed W4 g128 (RTN) against a dense Llama of
   the same active parameters (intermediate = top-k × the experts'), both through
   `compress generate`, in alternating rounds.
3. Quality: SmolLM2-135M "upcycled" into a MoE (each layer's MLP copied into 4 experts
   with 20% multiplicative noise, a random router, top-2) so that its text is language,
   quantised W4 g128 by RTN, GPTQ on routed tokens, GPTQ on all tokens, AWQ and AWQ+GPTQ
   (routed); KL against the unquantised MoE and perplexity, same windows. Random experts
   are more alike than trained ones: the difference between the two modes is a lower
   bound on a real model's.

Writes benchmarks/results/moe.json; a run of some parts or methods updates only theirs.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _child import run_measured
from safetensors.torch import load_file, save_file

from compress import assets, evaluation, models
from compress.progress import set_quiet

HERE = Path(__file__).parent
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
PARTS = ("synthetic", "decode", "quality")
# quality label -> (method, extra flags; calibrated methods also get the calibration's)
QUALITY = {
    "rtn": ("rtn", []),
    "gptq_routed": ("gptq", ["--expert-tokens", "routed"]),
    "gptq_all": ("gptq", ["--expert-tokens", "all"]),
    "awq": ("awq", ["--expert-tokens", "routed"]),
    "awq_gptq": ("awq+gptq", ["--expert-tokens", "routed"]),
}
PROMPT = "The history of the city begins with a small settlement on the river, where"


def _copy_tokenizer(path: Path) -> None:
    bundled = assets.bundled_model_dir()
    for name in TOKENIZER_FILES:
        shutil.copyfile(bundled / name, path / name)


def _save(path: Path, tensors: dict[str, torch.Tensor], config: dict) -> int:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))
    _copy_tokenizer(path)
    return sum(t.nbytes for t in tensors.values())


def synthetic(path: Path, args, dense: bool = False) -> int:
    """Random fp16 Mixtral (or, `dense`, a Llama whose MLP is as wide as top-k experts)."""
    gen = torch.Generator().manual_seed(0)
    d, heads, kv = args.hidden, args.hidden // 64, max(1, args.hidden // 256)

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=gen) * std).to(torch.float16)

    tensors = {"model.embed_tokens.weight": rand(49152, d, std=1.0),
               "model.norm.weight": torch.ones(d, dtype=torch.float16)}
    for i in range(args.layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": rand(heads * 64, d),
            p + "self_attn.k_proj.weight": rand(kv * 64, d),
            p + "self_attn.v_proj.weight": rand(kv * 64, d),
            p + "self_attn.o_proj.weight": rand(d, heads * 64),
            p + "input_layernorm.weight": torch.ones(d, dtype=torch.float16),
            p + "post_attention_layernorm.weight": torch.ones(d, dtype=torch.float16),
        })
        if dense:
            width = args.top_k * args.intermediate
            tensors.update({p + "mlp.gate_proj.weight": rand(width, d),
                            p + "mlp.up_proj.weight": rand(width, d),
                            p + "mlp.down_proj.weight": rand(d, width)})
            continue
        tensors[p + "block_sparse_moe.gate.weight"] = rand(args.experts, d, std=0.1)
        for e in range(args.experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            tensors.update({q + "w1.weight": rand(args.intermediate, d),
                            q + "w3.weight": rand(args.intermediate, d),
                            q + "w2.weight": rand(d, args.intermediate)})
    config = {
        "architectures": ["LlamaForCausalLM" if dense else "MixtralForCausalLM"],
        "model_type": "llama" if dense else "mixtral", "dtype": "float16",
        "hidden_size": d, "intermediate_size": args.top_k * args.intermediate if dense
        else args.intermediate, "num_hidden_layers": args.layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": 64,
        "vocab_size": 49152, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": True, "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": 2}
    if not dense:
        config.update({"num_local_experts": args.experts, "num_experts_per_tok": args.top_k,
                       "sliding_window": None})
    return _save(path, tensors, config)


def upcycled_smollm(path: Path, experts: int = 4, top_k: int = 2, noise: float = 0.2) -> None:
    """The bundled SmolLM2 with each MLP copied into `experts` noisy experts."""
    src = assets.bundled_model_dir()
    gen = torch.Generator().manual_seed(1)
    dense = load_file(str(src / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    tensors = {}
    for name, t in dense.items():
        m = re.fullmatch(r"(model\.layers\.\d+\.)mlp\.(gate|up|down)_proj\.weight", name)
        if not m:
            tensors[name] = t
            continue
        leaf = {"gate": "w1", "up": "w3", "down": "w2"}[m.group(2)]
        for e in range(experts):
            jitter = 1 + noise * torch.randn(t.shape, generator=gen)
            tensors[f"{m.group(1)}block_sparse_moe.experts.{e}.{leaf}.weight"] = (
                t.float() * jitter).to(t.dtype)
        router = f"{m.group(1)}block_sparse_moe.gate.weight"
        if router not in tensors:
            tensors[router] = (torch.randn(experts, config["hidden_size"], generator=gen)
                               * 0.5).to(t.dtype)
    config.update({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
                   "num_local_experts": experts, "num_experts_per_tok": top_k,
                   "sliding_window": None})
    _save(path, tensors, config)


def quantize(src: Path, out: Path, method: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "compress.cli", "quantize", str(src), "--method", method,
           "--bits", "4", "--group-size", "128", "--out", str(out), "--overwrite",
           "--no-eval", "-q", *extra]
    code, seconds, rss, tail = run_measured(cmd)
    if code:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{tail}")
    return {"seconds": seconds, "peak_rss_bytes": rss}


def decode_tok_s(path: Path, tokens: int) -> float:
    proc = subprocess.run(
        [sys.executable, "-m", "compress.cli", "generate", str(path), "-p", PROMPT, "-n",
         str(tokens), "--ignore-eos"], capture_output=True, text=True, check=True)
    return float(re.search(r"decode ([\d.]+) tokens/s", proc.stderr).group(1))


def scored(path: Path, base: models.ModelFiles, eval_tokens: int) -> dict:
    report = evaluation.evaluate(models.open_model(path), base, max_tokens=eval_tokens)
    m = report.match
    return {"ppl": report.ppl.ppl, "baseline_ppl": report.baseline_ppl.ppl,
            "kl_mean": m.kl_mean, "kl_p99": m.kl_p99, "top1_agreement": m.top1_agreement}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--methods", default=",".join(QUALITY),
                        help=f"quality part: comma-separated subset of {','.join(QUALITY)}")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "moe.json")
    args = parser.parse_args()
    parts, methods = args.parts.split(","), args.methods.split(",")
    for chosen, known in ((parts, PARTS), (methods, QUALITY)):
        if unknown := set(chosen) - set(known):
            parser.error(f"unknown {sorted(unknown)}; choose from {', '.join(known)}")
    set_quiet(True)
    calib = ["--calib-samples", str(args.calib_samples), "--calib-seqlen", "512"]
    result: dict = json.loads(args.json.read_text()) if args.json.is_file() else {}
    result.update({"benchmark": "moe", "threads": torch.get_num_threads(),
                   "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "synthetic": {k: getattr(args, k) for k in
                                 ("layers", "hidden", "intermediate", "experts", "top_k")},
                   "calibration": {"samples": args.calib_samples, "seqlen": 512}})
    with tempfile.TemporaryDirectory(prefix="compress-moe-bench-") as tmp:
        work = Path(tmp)
        moe, dense = work / "moe", work / "dense"
        result["synthetic"]["checkpoint_bytes"] = synthetic(moe, args)
        synthetic(dense, args, dense=True)
        files = models.open_model(moe)
        layer = sum(4 * files.tensors.nbytes(n) // 2
                    for n in files.tensors.with_prefix(files.arch.layer_prefix(0)))
        activations = args.calib_samples * 512 * args.hidden * 4
        result["synthetic"]["one_layer_fp32_bytes"] = layer
        result["synthetic"]["calibration_activation_bytes"] = activations
        if "synthetic" in parts:
            # RTN holds one layer at a time and no calibration state: its peak is the
            # process, the libraries and the source file's mapped pages. What a calibrated
            # method adds above it is what the bound is about.
            floor = quantize(moe, work / "synthetic-rtn", "rtn", [])
            result["synthetic_rtn"] = floor
            print(f"synthetic MoE rtn: {floor['seconds']:.0f} s, peak RSS "
                  f"{floor['peak_rss_bytes'] / 1e9:.2f} GB (the floor)")
        for label in [m for m in methods if m != "rtn"] if "synthetic" in parts else ():
            method, extra = QUALITY[label]
            run = quantize(moe, work / f"synthetic-{label}", method, [*calib, *extra])
            run["above_rtn_bytes"] = run["peak_rss_bytes"] - floor["peak_rss_bytes"]
            result[f"synthetic_{label}"] = run
            print(f"synthetic MoE {label}: {run['seconds']:.0f} s, peak RSS "
                  f"{run['peak_rss_bytes'] / 1e9:.2f} GB, {run['above_rtn_bytes'] / 1e9:.2f} GB "
                  f"above RTN's (one layer fp32 {layer / 1e9:.2f} GB + activations "
                  f"{activations / 1e9:.2f} GB)", flush=True)
        if "decode" in parts:
            result["decode"] = decode(work, moe, dense, args)
        if "quality" in parts:
            quality = upcycled_quality(work, args, calib, methods)
            result["upcycled_smollm2"] = {**result.get("upcycled_smollm2", {}), **quality}
            q = result["upcycled_smollm2"]
            if "gptq_all" in q and "gptq_routed" in q:
                q["all_over_routed_kl"] = q["gptq_all"]["kl_mean"] / q["gptq_routed"]["kl_mean"]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")


def decode(work: Path, moe: Path, dense: Path, args) -> dict:
    for name, src in (("moe", moe), ("dense", dense)):
        quantize(src, work / f"rtn-{name}", "rtn", [])
    speeds: dict[str, list[float]] = {"moe": [], "dense": []}
    for r in range(args.rounds):
        order = ("moe", "dense") if r % 2 == 0 else ("dense", "moe")
        for name in order:
            speeds[name].append(decode_tok_s(work / f"rtn-{name}", args.decode_tokens))
        print(f"round {r + 1}: MoE {speeds['moe'][-1]:.1f}, dense "
              f"{speeds['dense'][-1]:.1f} tokens/s")
    moe_speed, dense_speed = (statistics.median(speeds[k]) for k in ("moe", "dense"))
    print(f"decode batch 1 (W4 g128): MoE {moe_speed:.1f} vs dense same active "
          f"{dense_speed:.1f} tokens/s -> {moe_speed / dense_speed:.2f}x")
    return {"tokens": args.decode_tokens, "rounds": speeds, "moe_median": moe_speed,
            "dense_median": dense_speed, "moe_over_dense": moe_speed / dense_speed}


def upcycled_quality(work: Path, args, calib: list[str], methods: list[str]) -> dict:
    up = work / "upcycled"
    upcycled_smollm(up)
    base = models.open_model(up)
    quality: dict = {"experts": 4, "top_k": 2, "noise": 0.2}
    for label in methods:
        method, extra = QUALITY[label]
        run = quantize(up, work / f"up-{label}", method, [*calib, *extra] if extra else [])
        run.update(scored(work / f"up-{label}", base, args.eval_tokens))
        quality[label] = run
        print(f"upcycled SmolLM2 MoE, {label}: KL {run['kl_mean']:.4f} (p99 "
              f"{run['kl_p99']:.3f}), ppl {run['ppl']:.2f} vs {run['baseline_ppl']:.2f}, "
              f"{run['seconds']:.0f} s", flush=True)
    return quality


if __name__ == "__main__":
    main()
