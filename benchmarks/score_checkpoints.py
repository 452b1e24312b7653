"""Score finished checkpoints by the harness of benchmarks/lowbit.py, e.g. ones a recipe
or a `compress quantize` command wrote as a user runs it (results/score_checkpoints.json).

    python benchmarks/score_checkpoints.py DIR[=LABEL] ... [--eval-tokens 8192]
        [--seconds LABEL=S,...] [--command LABEL='compress quantize ...'] [--json PATH]

Each checkpoint gets KL (mean, p99) against the bundled fp16 model it was made from, top-1
agreement and perplexity on the same held-out tokens as the lowbit grid, with what its
manifest records: the recipe, the calibration windows (their token hash), the tuning's
calibration KL. Wall time is not in a checkpoint: give it (`--seconds`) from the run. A peer's dense
folder scores too (against the default model); what made it goes in --command.
Rows merge into --json by label.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _quantbench import HERE, report_model, score, write_report

from compress import assets, evaluation, models
from compress.progress import set_quiet


def labelled(items: str | None) -> dict[str, str]:
    """'a=1,b=2' -> {'a': '1', 'b': '2'}."""
    pairs = [item.partition("=") for item in filter(None, (items or "").split(","))]
    if any(not value for _, _, value in pairs):
        raise SystemExit(f"expected LABEL=VALUE,... got {items!r}")
    return {label: value for label, _, value in pairs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="DIR or DIR=LABEL")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--seconds", help="LABEL=SECONDS,...: the runs' wall time")
    parser.add_argument("--command", action="append", default=[],
                        help="LABEL=COMMAND: what made the checkpoint (repeatable)")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "score_checkpoints.json")
    args = parser.parse_args()
    seconds = {k: float(v) for k, v in labelled(args.seconds).items()}
    commands = dict(c.partition("=")[::2] for c in args.command)
    named = {}
    for item in args.checkpoints:
        path, _, label = item.partition("=")
        named[label or Path(path).name] = Path(path)
    set_quiet(True)
    manifests = {label: models.open_model(path).manifest or {}  # a peer's folder has none
                 for label, path in named.items()}
    bases = {label: m["base_model"]["name"] if isinstance(m.get("base_model"), dict)
             else assets.DEFAULT_MODEL for label, m in manifests.items()}
    base = next(iter(bases.values()))
    if len(set(bases.values())) > 1:
        raise SystemExit(f"the checkpoints were made from different models: {bases}")
    earlier = json.loads(args.json.read_text()) if args.json.is_file() else {}
    if earlier.get("model", report_model(base)) != report_model(base):
        raise SystemExit(f"{args.json} holds rows scored against {earlier['model']}, these "
                         f"against {base}: give another --json")
    rows = {}
    for label, path in named.items():
        manifest = manifests[label]
        rows[label] = {"checkpoint": str(path), "command": commands.get(label),
                       "seconds": seconds.get(label), "recipe": manifest.get("recipe"),
                       "calibration": manifest.get("calibration"),
                       "scale_tuning": manifest.get("scale_tuning"),
                       **score(path, args.eval_tokens, base)}
        r = rows[label]
        print(f"{label:40s} KL {r['kl_mean']:.4f} (p99 {r['kl_p99']:.3f})  top-1 "
              f"{r['top1_agreement']:.2%}  ppl {r['ppl']:8.3f}", flush=True)
    fp16 = evaluation.evaluate_perplexity(assets.bundled_model_dir(base),
                                          max_tokens=args.eval_tokens)
    before = earlier.get("rows", {})
    args.calib_samples = args.calib_seqlen = args.calib_seed = "each row's"  # rows: their own
    write_report(args.json, "score_checkpoints", args, fp16, base, rows={**before, **rows})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
