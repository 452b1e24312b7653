"""Mixture of experts against a peer: our GPTQ and llm-compressor's GPTQModifier on the same
MoE checkpoint and the same calibration token ids, W4 g128 symmetric, in one run.

    python benchmarks/moe_peer.py [--calib-samples 32] [--calib-seqlen 512]
                                  [--eval-tokens 8192] [--runs ours_routed,ours_all,...]
                                  [--peer-python /tmp/peer-venv/bin/python] [--work DIR]

The model is moe.py's upcycled SmolLM2-135M (each MLP copied into 4 experts with 20%
multiplicative noise, a random router, top-2, model_type mixtral). Calibration: 32 windows
of 512 tokens from the bundled calibration split, seed 0, made once by compress.data
(what `compress quantize` makes from the same flags) and written to calib_ids.pt, which the
peer reads verbatim. The ids are checked to be the same tensor three ways: the
tokens_sha256 in each of our checkpoints' manifests (the hash of the ids our pipeline
actually calibrated on) equals the file's; the peer script's hash of the file it loaded
equals it; and the peer's embedding layer, hooked, saw exactly those rows first (in its
LengthAwareSampler's order, a permutation: an unstable sort of equal lengths; GPTQ sums
the Hessian over samples, so the order changes nothing).

Runs (each a child process, wall time and the child's own peak RSS from _child.run_measured):
  ours_routed  `compress quantize --method gptq --bits 4 --group-size 128 --expert-tokens routed`
  ours_all     the same with --expert-tokens all
  peer_all     llm-compressor 0.14 GPTQModifier, oneshot(moe_calibrate_all_experts=True),
               its default: every token through every expert, routed outputs kept
  peer_routed  the same with moe_calibrate_all_experts=False: routed tokens only
Both sides: symmetric, damping 0.01, block 128, act-order with static groups (ours'
default; the peer's --actorder weight, its "static"), lm_head and the routers
(block_sparse_moe.gate) unquantised. Group 128 where it divides the input features (the
experts' down projections, 1536), 64 for the 576-wide rest: ours shrinks g128 to the
largest dividing power of two, the peer gets the same groups from --scheme w4; the run
checks that compress reads the same scheme for every module from both checkpoints.

llm-compressor saves each expert under its linearised names (experts.<e>.gate_proj /
up_proj / down_proj), which neither transformers' Mixtral (it leaves the fused experts
randomly initialised, with a MISSING warning) nor compress (w1/w3/w2) reads; the raw
checkpoint's load error is recorded, and it is scored from a copy whose expert tensors are
renamed to Mixtral's w1/w3/w2 (and config targets extended to match): names only, every
tensor byte the same. Every checkpoint is scored by moe.py's `scored` against the
unquantised MoE on the same held-out tokens: KL mean and p99, top-1 agreement, perplexity.
Writes benchmarks/results/moe_peer.json; a run of some --runs updates only theirs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _child import run_measured
from moe import scored, upcycled_smollm
from safetensors.torch import load_file, save_file

from compress import data, models
from compress.formats import checkpoint
from compress.progress import set_quiet

HERE = Path(__file__).parent
PEER_SCRIPT = HERE / "peer_llmcompressor.py"
RUNS = ("ours_routed", "ours_all", "peer_all", "peer_routed")
# llm-compressor's linearised expert names -> Mixtral's
EXPERT_LEAVES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
ROUTER_IGNORE = r"re:.*mlp\.gate$"  # transformers 5 names Mixtral's block_sparse_moe "mlp"


def sha256_ids(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()


def measured(cmd: list[str]) -> dict:
    code, seconds, rss, tail = run_measured(cmd)
    if code:
        raise SystemExit(f"failed ({code}): {' '.join(cmd)}\n{tail}")
    return {"seconds": seconds, "peak_rss_bytes": rss}


def ours(up: Path, out: Path, mode: str, args) -> dict:
    cmd = [sys.executable, "-m", "compress.cli", "quantize", str(up), "--method", "gptq",
           "--bits", "4", "--group-size", "128", "--calib-samples", str(args.calib_samples),
           "--calib-seqlen", str(args.calib_seqlen), "--expert-tokens", mode,
           "--out", str(out), "--overwrite", "--no-eval", "-q"]
    row = {"command": " ".join(cmd), **measured(cmd)}
    manifest = json.loads((out / checkpoint.MANIFEST).read_text())
    row["calibration"] = manifest["calibration"]
    return row


def peer(up: Path, ids: Path, out: Path, mode: str, args) -> dict:
    report = out.with_suffix(".json")
    cmd = [str(args.peer_python), str(PEER_SCRIPT), "--method", "gptq", "--scheme", "w4",
           "--model", str(up), "--calib-ids", str(ids), "--out", str(out), "--json",
           str(report), "--ignore", "lm_head", "--ignore", ROUTER_IGNORE,
           "--moe-experts", mode, "--actorder", "weight"]
    row = {"command": " ".join(cmd), **measured(cmd)}
    info = json.loads(report.read_text())
    # the module lists are long: keep their counts and what they say about experts/routers
    quantised, gptq = info.pop("quantised_modules"), info.pop("gptq_modules")
    info["quantised_module_count"] = len(quantised)
    info["gptq_module_count"] = len(gptq)
    info["every_quantised_module_went_through_gptq"] = set(quantised) == set(gptq)
    info["expert_modules_quantised"] = sum(".experts." in n for n in quantised)
    info["routers_or_lm_head_quantised"] = [n for n in quantised
                                            if n.endswith(".gate") or n == "lm_head"]
    row["peer"] = info
    return row


def raw_load_check(path: Path) -> str | None:
    """None if compress opens `path` and its shapes check; else the error, verbatim."""
    try:
        models.check_shapes(models.open_model(path))
    except Exception as e:  # recorded, not handled
        return f"{type(e).__name__}: {e}"
    return None


def renamed_copy(src: Path, dst: Path) -> int:
    """`src` with experts.<e>.{gate,up,down}_proj renamed to Mixtral's w1/w3/w2 (tensors
    untouched) and config targets extended to the new names. Returns the renamed count."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    pattern = re.compile(r"(\.experts\.\d+\.)(gate_proj|up_proj|down_proj)\.")
    renamed = 0
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            tensors = {}
            for name, t in load_file(str(f)).items():
                new = pattern.sub(lambda m: m.group(1) + EXPERT_LEAVES[m.group(2)] + ".", name)
                renamed += new != name
                tensors[new] = t
            save_file(tensors, str(dst / f.name), metadata={"format": "pt"})
        elif f.name == "model.safetensors.index.json":
            raise SystemExit("sharded peer checkpoint: renaming not implemented")
        elif f.name != "config.json":
            shutil.copyfile(f, dst / f.name)
    config = json.loads((src / "config.json").read_text())
    for group in config["quantization_config"]["config_groups"].values():
        for old, new in EXPERT_LEAVES.items():
            probe = f"model.layers.0.block_sparse_moe.experts.0.{old}"
            if any(t == probe or (t.startswith("re:") and re.match(t[3:], probe))
                   for t in group["targets"]):
                group["targets"].append(rf"re:.*\.experts\.\d+\.{new}$")
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return renamed


def schemes_of(path: Path) -> dict:
    """What compress reads from a checkpoint: module -> scheme, as counts and a hash."""
    labels = {n: s.label for n, s in models.open_model(path).schemes.items()}
    return {"modules": len(labels),
            "counts": {k: sum(v == k for v in labels.values())
                       for k in sorted(set(labels.values()))},
            "routers": sorted(n for n in labels if n.endswith("block_sparse_moe.gate")),
            "lm_head": "lm_head" in labels,
            "sha256": hashlib.sha256(json.dumps(sorted(labels.items())).encode()).hexdigest()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--runs", default=",".join(RUNS),
                        help=f"comma-separated subset of {','.join(RUNS)}")
    parser.add_argument("--peer-python", type=Path, default=Path("/tmp/peer-venv/bin/python"))
    parser.add_argument("--work", type=Path, default=None,
                        help="where checkpoints go (default: a new /tmp directory, kept)")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "moe_peer.json")
    args = parser.parse_args()
    runs = args.runs.split(",")
    if unknown := set(runs) - set(RUNS):
        parser.error(f"unknown {sorted(unknown)}; choose from {', '.join(RUNS)}")
    if any(r.startswith("peer") for r in runs) and not args.peer_python.is_file():
        parser.error(f"{args.peer_python} not found (see benchmarks/peer_llmcompressor.py)")
    set_quiet(True)
    work = args.work or Path(tempfile.mkdtemp(prefix="compress-moe-peer-"))
    work.mkdir(parents=True, exist_ok=True)
    git = lambda *a: subprocess.run(["git", *a], cwd=HERE, capture_output=True,  # noqa: E731
                                    text=True).stdout.strip()
    report: dict = json.loads(args.json.read_text()) if args.json.is_file() else {}
    report.update({
        "benchmark": "moe_peer",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git": {"head": git("rev-parse", "HEAD"),
                "dirty": git("status", "--short", "--untracked-files=no").splitlines()},
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_at_start": os.getloadavg(),
        "model": "SmolLM2-135M upcycled: 4 experts per layer (MLP copies, 20% noise), "
                 "random router, top-2, mixtral (benchmarks/moe.py upcycled_smollm)",
        "scheme": "W4 symmetric, g128 (g64 where 128 does not divide: 576-wide inputs), "
                  "GPTQ damp 0.01, block 128, no act-order; lm_head and routers unquantised",
        "calibration": {"samples": args.calib_samples, "seqlen": args.calib_seqlen,
                        "source": "bundled calibration split, seed 0 (compress.data)"},
        "eval_tokens": args.eval_tokens,
        "work": str(work),
    })

    def save() -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")

    up = work / "upcycled"
    upcycled_smollm(up)
    base = models.open_model(up)
    calib = data.calibration_set(data.load_tokenizer(up), None, args.calib_samples,
                                 args.calib_seqlen, 0)
    ids_path = work / "calib_ids.pt"
    torch.save(calib.samples, ids_path)
    ids_sha = sha256_ids(torch.load(ids_path))
    assert ids_sha == calib.sha256
    if report.get("calibration_ids_sha256_of_earlier_runs", ids_sha) != ids_sha:
        raise SystemExit(f"{args.json} holds runs on other calibration ids; move it aside")
    report["calibration_ids_sha256_of_earlier_runs"] = ids_sha
    report["calibration"].update({"ids_file": str(ids_path), "tokens_sha256": ids_sha,
                                  "shape": list(calib.samples.shape)})
    checks: dict = report.setdefault("same_ids_checks", {})
    for run in runs:
        side, mode = run.split("_")
        out = work / run
        print(f"{run}: quantising ({time.strftime('%H:%M:%S')}, load "
              f"{os.getloadavg()[0]:.2f})", flush=True)
        if side == "ours":
            row = ours(up, out, mode, args)
            checks[f"{run}: manifest tokens_sha256 == calib_ids.pt"] = (
                row["calibration"]["tokens_sha256"] == ids_sha)
            scored_path = out
        else:
            row = peer(up, ids_path, out, mode, args)
            p = row["peer"]
            checks[f"{run}: sha256 of the ids file it loaded == calib_ids.pt"] = (
                p["calib_ids_sha256"] == ids_sha)
            checks[f"{run}: its embedding's first {args.calib_samples} input rows are the "
                   "ids' rows (in its sampler's order)"] = (
                p["embedding_first_n_rows_same_rows_as_ids"]
                and sorted(p["embedding_order_of_ids"]) == list(range(args.calib_samples)))
            checks[f"{run}: those rows reordered == ids"] = p["embedding_first_n_rows_sha256"] == (
                sha256_ids(calib.samples[p["embedding_order_of_ids"]]))
            row["raw_checkpoint_compress_error"] = raw_load_check(out)
            scored_path = work / f"{run}_renamed"
            row["renamed_expert_tensors"] = renamed_copy(out, scored_path)
            row["renamed_checkpoint_compress_error"] = raw_load_check(scored_path)
        row["load_after"] = os.getloadavg()
        row["schemes"] = schemes_of(scored_path)
        row.update(scored(scored_path, base, args.eval_tokens))
        report[run] = row
        print(f"{run}: KL {row['kl_mean']:.4f} (p99 {row['kl_p99']:.3f}), top-1 "
              f"{row['top1_agreement']:.4f}, ppl {row['ppl']:.2f} vs {row['baseline_ppl']:.2f}, "
              f"{row['seconds']:.0f} s, peak RSS {row['peak_rss_bytes'] / 1e9:.2f} GB",
              flush=True)
        save()
    # Same module -> scheme on every side (what compress reads from each checkpoint)
    done = [r for r in RUNS if isinstance(report.get(r), dict)]
    ref = report[done[0]]["schemes"]["sha256"]
    report["same_schemes"] = {r: report[r]["schemes"]["sha256"] == ref for r in done}
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    save()
    print(f"\nunquantised MoE ppl {report[done[0]]['baseline_ppl']:.3f}; "
          f"{args.eval_tokens} held-out tokens; calibration {args.calib_samples} x "
          f"{args.calib_seqlen} ids sha256 {ids_sha[:16]}")
    print(f"{'run':<12} {'KL mean':>8} {'KL p99':>7} {'top-1':>7} {'ppl':>8} {'seconds':>8} "
          f"{'peak RSS GB':>11}")
    for r in done:
        row = report[r]
        print(f"{r:<12} {row['kl_mean']:>8.4f} {row['kl_p99']:>7.3f} "
              f"{row['top1_agreement']:>7.4f} {row['ppl']:>8.3f} {row['seconds']:>8.0f} "
              f"{row['peak_rss_bytes'] / 1e9:>11.2f}")
    print(f"same ids: {all(checks.values())} ({len(checks)} checks); same schemes: "
          f"{all(report['same_schemes'].values())}")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
