"""The README.md a pushed checkpoint carries: the Hub's model-card conventions (YAML front
matter with base_model, library_name, pipeline_tag, tags, license and, when an eval JSON
is present, a model-index), then what was done and how to load it.

Inputs are what the checkpoint already records (manifest, recipe, calibration hash), plus
optionally `compress eval --json` output (`eval.json` in the checkpoint, or given) and a
`compress report` directory (its results.json).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from compress import assets, hub
from compress.errors import CompressError
from compress.formats import checkpoint

EVAL_FILE = "eval.json"
REPORT_DIR = "report"


def write(directory: str | Path, repo_id: str | None = None, eval_json: Path | None = None,
          report_dir: Path | None = None, base_model: str | None = None,
          compatibility: list[str] | None = None) -> Path:
    """Render the card into `directory`/README.md (atomically) and return its path."""
    directory = Path(directory)
    path = directory / "README.md"
    checkpoint.atomic_write_bytes(path, render(directory, repo_id, eval_json, report_dir,
                                               base_model, compatibility).encode())
    return path


def render(directory: Path, repo_id: str | None = None, eval_json: Path | None = None,
           report_dir: Path | None = None, base_model: str | None = None,
           compatibility: list[str] | None = None) -> str:
    """The card; `compatibility`: `compress check`'s markdown lines (hub.serving_check)."""
    manifest = checkpoint.read_manifest(directory)
    if manifest is None:
        raise CompressError(f"{directory} has no compress_manifest.json; model cards are "
                            "written for checkpoints from `compress quantize`")
    recipe = manifest["recipe"]
    base = manifest.get("base_model") or {}
    base_id = base_model or _base_hub_id(base, directory)
    evals = _load_json(eval_json or directory / EVAL_FILE, required=eval_json is not None)
    report = _load_json((report_dir or directory / REPORT_DIR) / "results.json",
                        required=report_dir is not None)
    bits = sorted({s["bits"] for s in [recipe["scheme"], *recipe.get("overrides", [])]})
    method = recipe["method"]
    rotation = manifest.get("rotation")
    tags = ["compressed-tensors", "compress", "quantized",
            *[m for m in ("gptq", "awq") if m in method.split("+")],
            *([method] if method in ("rtn", "signround") else []),
            *[f"{b}-bit" for b in bits],
            *(["mixed-precision"] if recipe.get("overrides") else []),
            *([f"{rotation['kind']}-rotation"] if rotation else [])]
    meta: dict = {}
    if base_id:
        meta["base_model"] = base_id
        meta["base_model_relation"] = "quantized"
    meta.update({"library_name": "transformers", "pipeline_tag": "text-generation",
                 "tags": tags})
    license_ = _license(base, directory)
    if license_:
        meta["license"] = license_
    name = repo_id.split("/")[-1] if repo_id else directory.name
    if evals:
        meta["model-index"] = [_model_index(name, evals)]
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    where = repo_id or "ORG/NAME"
    overrides = recipe.get("overrides") or []
    schemes = describe_schemes(manifest)
    lines = [
        "---", front.rstrip(), "---", "",
        f"# {name}", "",
        f"{base_id or base.get('name', 'The base model')} quantised with "
        f"[compress](https://pypi.org/project/compress/) {manifest['library']['compress']}: "
        f"{METHOD_NAMES.get(method, method.upper())}, {schemes}"
        + (" (mixed precision, chosen per Linear)" if overrides else "")
        + (f", after {rotation['kind'].capitalize()} rotations of the weights" if rotation
           else "")
        + "; weights packed as compressed-tensors `pack-quantized` safetensors.", "",
        "## How it was made", "",
        f"- Method: `{method}`; {schemes}; kept in full precision: "
        + ", ".join(f"`{p}`" for p in recipe.get("ignore", [])) + ".",
    ]
    if rotation:
        lines.append(_rotation_line(rotation))
    if recipe.get("signround"):
        lines.append(_signround_line(recipe["signround"]))
    fitted = "" if overrides else _fitted_groups(recipe["scheme"], manifest)
    if fitted:
        lines.append(f"- The recipe asks for groups of {recipe['scheme']['group_size']}; "
                     f"{fitted}.")
    calibration = manifest.get("calibration")
    if calibration:
        lines.append(f"- Calibration: {calibration['samples']} × {calibration['seqlen']} "
                     f"tokens from {calibration['source']}; token ids sha256 "
                     f"`{calibration['tokens_sha256']}`, text sha256 "
                     f"`{calibration['text_sha256']}`.")
    else:
        lines.append("- No calibration data (round-to-nearest).")
    lines += ["- Recipe (`recipe.yaml` in this repository reproduces the checkpoint with "
              "`compress quantize BASE --recipe recipe.yaml`):", "",
              "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip()
              if len(overrides) <= 12 else _short_recipe(recipe), "```", ""]
    if evals:
        lines += _eval_section(evals)
    if report:
        lines += _report_section(report)
    if compatibility:
        lines += ["## Serving compatibility", "", *compatibility, ""]
    lines += [
        "## How to load it", "",
        "transformers (with `compressed-tensors` installed; symmetric checkpoints):", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{where}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
        "```", "",
        "vLLM (reads compressed-tensors checkpoints):", "",
        "```bash", f"vllm serve {where}", "```", "",
        "compress (CPU or GPU kernels that read the packed weights directly):", "",
        "```bash", f'compress generate {where} --prompt "Hello"',
        f"compress eval {where}", "```", "",
    ]
    return "\n".join(lines)


METHOD_NAMES = {"signround": "SignRound (learned rounding)"}  # the rest: upper case


def _rotation_line(rotation: dict) -> str:
    """The manifest's `rotation` record (compress/calibrate/rotate.py `describe`)."""
    heads, residual = rotation["heads"], rotation["residual"]
    values = (f"each attention head's values by a {heads['size']} × {heads['size']} "
              f"{'matrix' if 'skipped' in residual else 'one'} ({heads['construction']})")
    if "skipped" in residual:
        where = f"{values}; {residual['skipped']}"
    else:
        where = (f"the residual stream by a {residual['size']} × {residual['size']} matrix "
                 f"({residual['construction']}) and {values}")
    return (f"- Rotation (`compress quantize --rotate`): seeded randomised "
            f"{rotation['kind'].capitalize()} rotations folded into the weights before "
            f"quantising, seed {rotation['seed']}: {where}. Unquantised, the rotated model "
            "computes the same function; nothing is rotated at run time, so the checkpoint "
            "loads as any other.")


def _signround_line(settings: dict) -> str:
    """The recipe's `signround` section (compress/quant/signround.py `SignRoundConfig`)."""
    step = (f"1/{settings['iters']}" if settings.get("lr") is None else f"{settings['lr']:g}")
    target = TARGET_WORDS[settings.get("target", "layer")]  # written before targets: "layer"
    start = (" Learning started from GPTQ's result for each layer (its grid and its "
             "error-compensated weights)." if settings.get("start") == "gptq" else "")
    return (f"- Learned rounding (SignRound): each weight's rounding direction and each "
            f"group's range learned per decoder layer by signed gradient descent against "
            f"{target} on the calibration data: {settings['iters']} steps of "
            f"{settings['batch']} samples, step size {step} decaying to 0.{start}")


TARGET_WORDS = {"model": "the unquantised model's output of that layer",
                "layer": "the unquantised layer's output on the quantised inputs"}


SCHEME_LABEL = re.compile(r"w(\d+)(?:g(\d+)|pc)-(sym|asym)")  # QuantScheme.label


def describe_schemes(manifest: dict) -> str:
    """The schemes the Linears actually got, most used first ("W4 g64 × 180 Linears,
    W4 g128 × 30 Linears"): the recipe's scheme alone misstates a checkpoint whose group
    size shrank to fit layers, or a mixed-precision one."""
    schemes = manifest.get("schemes") or {}
    if not schemes:  # written before the manifest recorded them: the recipe's scheme
        s = manifest["recipe"]["scheme"]
        return _scheme_name(s["bits"], s["group_size"], s.get("symmetric", True))
    counted = sorted(schemes.items(), key=lambda item: (-len(item[1]), item[0]))
    if len(counted) == 1:
        label, modules = counted[0]
        return f"{_label_name(label)} (all {len(modules)} quantised Linears)"
    return ", ".join(f"{_label_name(label)} × {_linears(len(modules))}"
                     for label, modules in counted)


def _linears(n: int) -> str:
    return f"{n} Linear" + ("" if n == 1 else "s")


def _label_name(label: str) -> str:
    match = SCHEME_LABEL.fullmatch(label)
    if match is None:
        return label
    bits, group, sym = match.groups()
    return _scheme_name(int(bits), -1 if group is None else int(group), sym == "sym")


def _scheme_name(bits: int, group_size: int, symmetric: bool) -> str:
    return (f"W{bits} " + ("per-channel" if group_size == -1 else f"g{group_size}")
            + ("" if symmetric else " asym"))


def _fitted_groups(asked: dict, manifest: dict) -> str:
    """Which group sizes replaced the recipe's, where it does not divide a layer's inputs
    ("" when none did)."""
    counts: dict[int, int] = {}
    for label, modules in (manifest.get("schemes") or {}).items():
        match = SCHEME_LABEL.fullmatch(label)
        if match and match.group(1) == str(asked["bits"]) and match.group(2) and (
                int(match.group(2)) < asked["group_size"]):
            counts[int(match.group(2))] = counts.get(int(match.group(2)), 0) + len(modules)
    return "; ".join(f"{_linears(n)} whose input size it does not divide use {g}"
                     for g, n in sorted(counts.items(), reverse=True))


def _short_recipe(recipe: dict) -> str:
    """Long override lists (mixed precision) summarised: the full list is in recipe.yaml."""
    counts: dict[str, int] = {}
    for o in recipe["overrides"]:
        key = f"w{o['bits']}" + ("" if o["group_size"] == -1 else f"g{o['group_size']}")
        counts[key] = counts.get(key, 0) + 1
    short = {k: v for k, v in recipe.items() if k != "overrides"}
    short["overrides"] = f"{len(recipe['overrides'])} modules by name: " + ", ".join(
        f"{n} at {k}" for k, n in sorted(counts.items()))
    return yaml.safe_dump(short, sort_keys=False).rstrip()


def _load_json(path: Path, required: bool) -> dict | None:
    if not path.is_file():
        if required:
            raise CompressError(f"{path} does not exist")
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CompressError(f"{path} is not valid JSON ({e})") from None


def _base_hub_id(base: dict, directory: Path) -> str | None:
    bundled = assets.BUNDLED_MODELS.get(base.get("name", ""))
    if bundled is not None:
        return bundled.hub_id
    config = json.loads((directory / "config.json").read_text())
    name = config.get("_name_or_path", "")
    return name if isinstance(name, str) and hub.is_repo_id(name) else None


# Licence names our bundled sources carry -> the Hub's licence ids (the card's `license:`).
HUB_LICENSES = {"gemma terms of use": "gemma"}


def _license(base: dict, directory: Path) -> str | None:
    source = base.get("source") or {}
    if source.get("license"):
        name = source["license"].lower()
        return HUB_LICENSES.get(name, name)
    readme = Path(base.get("path", "")) / "README.md"
    if readme.is_file():
        match = re.match(r"---\n(.*?)\n---", readme.read_text(), re.S)
        if match:
            meta = yaml.safe_load(match.group(1)) or {}
            if isinstance(meta, dict) and isinstance(meta.get("license"), str):
                return meta["license"]
    return None


def _model_index(name: str, evals: dict) -> dict:
    metrics = [{"type": "perplexity", "name": "perplexity", "value": round(evals["ppl"], 4)}]
    if evals.get("kl_mean") is not None:
        metrics.append({"type": "kl_divergence", "name": "KL vs base model (nats/token)",
                        "value": round(evals["kl_mean"], 6)})
    if evals.get("top1_agreement") is not None:
        metrics.append({"type": "top1_agreement", "name": "top-1 agreement with base",
                        "value": round(evals["top1_agreement"], 4)})
    results = [{"task": {"type": "text-generation", "name": "Language modelling"},
                "dataset": {"type": "text", "name": "held-out text",
                            "revision": evals.get("text_sha256")},
                "metrics": metrics}]
    for task, scores in (evals.get("tasks") or {}).items():
        quantised = scores.get("quantised", scores)
        values = [{"type": m, "value": round(v, 4)} for m, v in quantised.items()
                  if m in ("acc", "acc_norm", "exact_match") and isinstance(v, float)]
        if values:
            results.append({"task": {"type": "text-generation"},
                            "dataset": {"type": task.removeprefix("compress_"),
                                        "name": task.removeprefix("compress_")},
                            "metrics": values})
    return {"name": name, "results": results}


def _eval_section(evals: dict) -> list[str]:
    rows = [("perplexity", evals.get("baseline_ppl"), evals["ppl"])]
    if evals.get("kl_mean") is not None:
        rows.append(("KL(base ‖ this), nats/token", 0.0, evals["kl_mean"]))
        rows.append(("top-1 agreement", 1.0, evals["top1_agreement"]))
    for task, scores in (evals.get("tasks") or {}).items():
        q, b = scores.get("quantised", {}), scores.get("baseline") or {}
        metric = "acc" if "acc" in q else next(iter(q), None)
        if metric:
            rows.append((f"{task.removeprefix('compress_')} {metric}", b.get(metric),
                         q[metric]))
    lines = ["## Quality", "",
             f"`compress eval` on {evals.get('tokens', '?')} held-out tokens "
             f"({evals.get('ctx', '?')}-token windows):", "",
             "| metric | base | this | Δ |", "|---|---|---|---|"]
    for metric, base, this in rows:
        delta = "" if base is None else f"{this - base:+.4g}"
        lines.append(f"| {metric} | {'–' if base is None else f'{base:.4g}'} | "
                     f"{this:.4g} | {delta} |")
    return [*lines, ""]


def _report_section(report: dict) -> list[str]:
    lines = ["## Quality vs cost (compress report)", "",
             "| variant | bits/weight | MB | Δppl | KL | decode tok/s |",
             "|---|---|---|---|---|---|"]
    for r in report.get("rows", []):
        lines.append(f"| {r['label']} | {r['bits_per_weight']:.2f} | "
                     f"{r['checkpoint_bytes'] / 1e6:.1f} | {r['delta_ppl']:+.3f} | "
                     f"{r['kl_mean']:.4f} | {r['decode_tok_s']:.1f} |")
    if report.get("recommended"):
        lines += ["", f"Recommended within the report's quality budget: "
                      f"`{report['recommended']}`."]
    return [*lines, ""]
