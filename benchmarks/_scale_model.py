"""The whole-model time / memory / disk model of docs/scale.md, from scale_layers.py's
measurements. Every constant that is an assumption rather than a measurement is named
in ASSUMED and written into the JSON beside the figures.

Per decoder layer, at T calibration tokens on W workers (compress/distributed.py):
- token part, split over the ranks: forwards (2 x params x T flops at the measured matmul
  rate) + Hessian accumulation (2 x T x in^2 per group at the measured rate), each
  scaled by the factor the whole-layer 8B runs measured against them; plus an
  all-reduce of the Hessians (assumed bandwidth);
- GPTQ: each group's Linears dealt to ranks by rows (largest first, to the least-loaded
  rank, as `Context.deal`), each rank solving its rows in one pass: a*in^3 + b*rows*in^2
  fitted to the measured single-Linear solves, plus the relative-error matmuls; groups
  one after another, so q/k/v spread over at most 3 ranks, gate/up over 2, o and down
  over 1;
- AWQ: every fold's scale search on one rank while the others wait (folds in turn), so it
  does not shrink with W: 2 x grid scores of 2*rows*in^2 flops each, at the measured
  seconds per score; clipping dealt by Linear.
"""

from __future__ import annotations

import math

GB = 1e9
SEQLEN_TOKENS = 512  # tokens per calibration sample in the whole-model figures
ASSUMED = {
    "import_baseline_rss_bytes": 1.34e9,  # measured by scale_gptq.py (results/scale_gptq.json)
    "cpu_allreduce_bytes_per_s": 5e9,  # gloo on one host; across hosts, the network's
    "gpu_fp32_flops_per_s": 30e12,  # H200: 67 TFLOP/s fp32 peak (TF32 off), ~45% of it
    "gpu_allreduce_bytes_per_s": 100e9,  # NCCL over NVLink within a node
    "gpu_seconds_per_gptq_column": 80e-6,  # ~10 small kernel launches per column
    "awq_folds_gqa": "q/k/v, gate/up, down (v->o skipped: 8 kv heads)",
    "vocab": 128256,  # Llama-3: embedding and lm_head, untied, stay bf16
    "bits_per_weight": 4 + 16 / 128,  # w4g128: codes + a bf16 scale per 128
    "paused_forward_bytes_per_token": "4 x (2 x hidden + intermediate), bounded by a "
                                      "quarter of the free memory (the capture's budget)",
    "host_free_bytes": 22e9,  # this machine: 24 GiB, 22 GB available
    "gpu_free_bytes": 135e9,  # H200: 141 GB
}
WORKERS = (1, 8, 16, 64)
CHUNK = 8  # calibration samples per forward chunk (calibrate/layer.py CALIB_BATCH)
AWQ_GRID = 20


def _rates(micro: list[dict]) -> dict:
    mm = [m["flops"] / m["seconds"] for m in micro if m["kind"] == "matmul"]
    hs = [m["flops"] / m["seconds"] for m in micro if m["kind"] == "hessian"]
    return {"matmul_flops_per_s": sum(mm) / len(mm), "hessian_flops_per_s": sum(hs) / len(hs)}


def _solve_fit(micro: list[dict]) -> dict:
    """t = a*in^3 + b*rows*in^2, least squares on relative error over the measured solves."""
    pts = [(m["args"][0], m["args"][1], m["seconds"]) for m in micro if m["kind"] == "gptq"]
    rows = [(n ** 3 / t, r * n * n / t) for r, n, t in pts]  # each row divided by t
    s11 = sum(x * x for x, _ in rows)
    s12 = sum(x * y for x, y in rows)
    s22 = sum(y * y for _, y in rows)
    r1, r2 = sum(x for x, _ in rows), sum(y for _, y in rows)
    det = s11 * s22 - s12 * s12
    a, b = (r1 * s22 - r2 * s12) / det, (s11 * r2 - s12 * r1) / det
    residual = [a * n ** 3 + b * r * n * n - t for r, n, t in pts]
    return {"a_s_per_in3": a, "b_s_per_rows_in2": b,
            "points": [{"rows": r, "in": n, "seconds": t, "fit": t + e}
                       for (r, n, t), e in zip(pts, residual, strict=True)]}


def _awq_fit(micro: list[dict]) -> dict:
    runs = sorted((m for m in micro if m["kind"] == "awq"), key=lambda m: m["scores"])
    lo, hi = runs[0], runs[-1]
    rows, n = lo["args"][0], lo["args"][1]
    per_score = (hi["seconds"] - lo["seconds"]) / (hi["scores"] - lo["scores"])
    clip = sum(m["clip_seconds"] for m in runs) / len(runs)
    return {"s_per_score_rows_in2": per_score / (rows * n * n),
            "clip_s_per_rows_in": clip / (rows * n)}


def _deal(sizes: list[int], world: int) -> list[list[int]]:
    """Each rank's rows, as `distributed.Context.deal` assigns them."""
    load, owned = [0] * world, [[] for _ in range(world)]
    for size in sorted(sizes, reverse=True):
        r = min(range(world), key=lambda r: (load[r], r))
        load[r] += size
        owned[r].append(size)
    return owned


def _layer_seconds(shape, tokens: int, world: int, method: str, fit: dict,
                   gpu: bool) -> dict[str, float]:
    """One layer's seconds by part, on the slowest rank."""
    rate = ASSUMED["gpu_fp32_flops_per_s"] if gpu else fit["matmul_flops_per_s"]
    h_rate = ASSUMED["gpu_fp32_flops_per_s"] if gpu else fit["hessian_flops_per_s"]
    share = tokens / world
    forwards = 2 if method == "awq" else 1  # AWQ: statistics pass, then the rounded forward
    fwd = forwards * 2 * shape.params * share / rate * fit["k_tokens"]
    hess = sum(2 * share * n * n for n, _ in shape.groups()) / h_rate * fit["k_tokens"]
    h_bytes = sum(4 * n * n for n, _ in shape.groups())
    bw = ASSUMED["gpu_allreduce_bytes_per_s" if gpu else "cpu_allreduce_bytes_per_s"]
    reduce = 0.0 if world == 1 else 2 * h_bytes * (world - 1) / world / bw
    out = {"forward": fwd, "hessian": hess, "allreduce": reduce}
    to_gpu = fit["matmul_flops_per_s"] / ASSUMED["gpu_fp32_flops_per_s"] if gpu else 1.0
    if method == "gptq":
        solve = 0.0
        for n, rows in shape.groups():
            per_rank = [sum(r) for r in _deal(rows, world) if r]
            # the measured solves include their relative-error matmuls
            cost = [fit["a_s_per_in3"] * n ** 3 + fit["b_s_per_rows_in2"] * r * n * n
                    for r in per_rank]
            cols = n * ASSUMED["gpu_seconds_per_gptq_column"] if gpu else 0.0
            solve += max(cost) * to_gpu * fit["k_solve"] + cols
        out["solve"] = solve
    else:
        lin = shape.linears()
        folds = [["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
        search = sum(2 * AWQ_GRID * fit["s_per_score_rows_in2"] * lin[m][0] * lin[m][1] ** 2
                     for fold in folds for m in fold)
        # per Linear: the clip search, and its relative error (two rows*in^2 matmuls)
        clips = [fit["clip_s_per_rows_in"] * o * i + 4 * o * i * i / fit["matmul_flops_per_s"]
                 for o, i in lin.values()]
        owned = _deal(clips, world)  # dealt by Linear (sizes stand in for rows here)
        out["awq_search"] = search * to_gpu * fit["k_awq"]
        out["awq_clip"] = max(sum(c) for c in owned if c) * to_gpu
    return out


def _host_bytes(shape, tokens: int, world: int, saving: bool, fit: dict,
                device: bool) -> float:
    """Peak memory of rank 0 for one layer: on the host (CPU calibration) or, with
    `device`, on the GPU (the layer, activations when they fit, Hessians, solve)."""
    layer = 4 * shape.params + (0 if device else 2 * shape.params)  # fp32 + mapped fp16
    acts = 4 * shape.hidden * tokens / world
    free = ASSUMED["gpu_free_bytes" if device else "host_free_bytes"]
    paused = min(4 * (2 * shape.hidden + shape.intermediate) * tokens / world, free / 4)
    widest = max(n for n, _ in shape.groups())
    solve = fit["k_hessian_copies"] * 4 * widest * widest
    gather = 4 * shape.hidden * tokens if saving and world > 1 and not device else 0
    base = 0 if device else ASSUMED["import_baseline_rss_bytes"]
    return base + layer + acts + paused + solve + gather


def _disk(shape, tokens: int) -> dict[str, float]:
    lin = shape.params * shape.layers * ASSUMED["bits_per_weight"] / 8
    dense = 2 * 2 * ASSUMED["vocab"] * shape.hidden  # embedding + lm_head, bf16
    act = 4 * shape.hidden * tokens
    return {"checkpoint": lin + dense, "activations_every_or_N_peak": 2 * act,
            "activations_every_or_N_steady": act, "activations_never": 0.0,
            "source_bf16": 2 * (shape.params * shape.layers) + dense}


def calibrate(results: dict, shapes: dict) -> dict:
    """The rates, fits and the factors the whole-layer runs put on them."""
    fit = {**_rates(results["micro"]), **_solve_fit(results["micro"]),
           **_awq_fit(results["micro"]), "k_tokens": 1.0, "k_solve": 1.0, "k_awq": 1.0}
    # the solve's peak memory, in [in, in] float32 copies, from the widest measured solve
    widest = max((m for m in results["micro"] if m["kind"] == "gptq"),
                 key=lambda m: m["args"][1])
    rows, n = widest["args"]
    torch_base = min(m["peak_rss_bytes"] for m in results["micro"])  # a child's import
    fit["k_hessian_copies"] = (widest["peak_rss_bytes"] - torch_base
                               - 3 * 4 * rows * n) / (4 * n * n)
    s8 = shapes["llama3-8b"]
    # The token part is measured directly, at two token counts for each of its parts
    # (k_tokens stays 1). The solves are measured one Linear at a time, and they are the
    # figure most sensitive to the neighbours' load: each whole GPTQ layer measures a
    # factor on them, and their mean is used.
    factors = []
    for r in (r for r in results["layers"] if r["method"] == "gptq"):
        p = _layer_seconds(s8, r["tokens"], 1, "gptq", fit, False)
        factors.append((r["layer_seconds"][0] - p["forward"] - p["hessian"]) / p["solve"])
    if factors:
        fit["k_solve_each_layer_run"] = factors
        fit["k_solve"] = sum(factors) / len(factors)
    fit["layer_checks"] = []
    awq = [r for r in results["layers"] if r["method"] == "awq"]
    if awq:
        r = awq[0]
        grid = int(r["flags"][r["flags"].index("--awq-grid") + 1])
        p = _layer_seconds(s8, r["tokens"], 1, "awq", fit, False)
        search = p["awq_search"] * grid / AWQ_GRID
        rest = p["forward"] + p["hessian"] + p["awq_clip"]
        fit["k_awq"] = (r["layer_seconds"][0] - rest) / search
    for r in results["layers"]:  # each whole layer against the parts (after the factors)
        grid = int(r["flags"][r["flags"].index("--awq-grid") + 1]) if r["flags"] else AWQ_GRID
        p = _layer_seconds(s8, r["tokens"], 1, r["method"], fit, False)
        if "awq_search" in p:
            p["awq_search"] *= grid / AWQ_GRID
        fit["layer_checks"].append({"method": r["method"], "tokens": r["tokens"],
                                    "measured_s": r["layer_seconds"][0],
                                    "parts_s": p, "clock": r.get("clock", "cpu"),
                                    "measured_peak_rss_bytes": r["peak_rss_bytes"],
                                    "modelled_peak_rss_bytes": _host_bytes(
                                        s8, r["tokens"], 1, False, fit, False)})
    # The pipeline holds more [in, in] copies than the bare solve (the accumulator's, the
    # mirrored Hessian): count them from the whole layers' peaks, and use that count.
    widest8 = max(n for n, _ in s8.groups())
    copies = [fit["k_hessian_copies"] + (c["measured_peak_rss_bytes"]
                                         - c["modelled_peak_rss_bytes"]) / (4 * widest8 ** 2)
              for c in fit["layer_checks"]]
    if copies:
        fit["k_hessian_copies_solve_alone"] = fit["k_hessian_copies"]
        fit["k_hessian_copies"] = sum(copies) / len(copies)
    return fit


def project(results: dict, shapes: dict, tokens: int) -> dict:
    fit = calibrate(results, shapes)
    out = {"assumed": ASSUMED, "fit": fit, "tokens": tokens, "models": {}}
    for name, shape in shapes.items():
        rows = {}
        for method in ("gptq", "awq"):
            for world in WORKERS:
                cpu = _layer_seconds(shape, tokens, world, method, fit, False)
                gpu = _layer_seconds(shape, tokens, world, method, fit, True)
                rows[f"{method}-w{world}"] = {
                    # each rank takes whole chunks of 8 samples: 128 samples, 16 ranks at most
                    "runnable": world <= -(-tokens // SEQLEN_TOKENS) // CHUNK,
                    "cpu_layer_parts_s": cpu, "gpu_layer_parts_s": gpu,
                    "cpu_hours": shape.layers * sum(cpu.values()) / 3600,
                    "gpu_hours": shape.layers * sum(gpu.values()) / 3600,
                    "peak_host_bytes_saving": _host_bytes(shape, tokens, world, True, fit,
                                                          False),
                    "peak_host_bytes_never": _host_bytes(shape, tokens, world, False, fit,
                                                         False),
                    "peak_device_bytes": _host_bytes(shape, tokens, world, False, fit, True),
                }
        out["models"][name] = {"layers": shape.layers, "params_per_layer": shape.params,
                               "disk_bytes": _disk(shape, tokens), "runs": rows}
    return out


def tables(results: dict) -> str:
    lines = ["measured (1 thread):"]
    for m in results["micro"]:
        lines.append(f"  {m['kind']:8s} {m['args']!s:22s} {m['seconds']:8.2f} s  "
                     f"peak RSS {m['peak_rss_bytes'] / GB:6.2f} GB")
    for r in results["layers"]:
        lines.append(f"  layer {r['shape']} {r['method']} {r['samples']}x{r['seqlen']} "
                     f"{' '.join(r['flags'])}: {r['layer_seconds'][0]:.1f} s, peak RSS "
                     f"{r['peak_rss_bytes'] / GB:.2f} GB")
    p = results["projection"]
    f = p["fit"]
    lines.append(f"rates: matmul {f['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s, Hessian "
                 f"{f['hessian_flops_per_s'] / 1e9:.0f} GFLOP/s; solve a={f['a_s_per_in3']:.3g} "
                 f"b={f['b_s_per_rows_in2']:.3g}; factors tokens {f['k_tokens']:.2f}, solve "
                 f"{f['k_solve']:.2f}, awq {f['k_awq']:.2f}")
    lines.append(f"whole models at {p['tokens']} tokens:")
    lines.append(f"  {'model':14s} {'run':9s} {'CPU h':>9s} {'GPU h*':>7s} {'host GB':>8s} "
                 f"{'(never)':>8s} {'GPU GB*':>8s}")
    for name, m in p["models"].items():
        for run, r in m["runs"].items():
            lines.append(f"  {name:14s} {run:9s} {r['cpu_hours']:9.1f} {r['gpu_hours']:7.2f} "
                         f"{r['peak_host_bytes_saving'] / GB:8.1f} "
                         f"{r['peak_host_bytes_never'] / GB:8.1f} "
                         f"{r['peak_device_bytes'] / GB:8.1f}"
                         + ("" if r["runnable"] else "  (refused: fewer chunks than workers)"))
        d = m["disk_bytes"]
        lines.append(f"  {name:14s} disk: checkpoint {d['checkpoint'] / GB:.1f} GB, resume "
                     f"activations {d['activations_every_or_N_steady'] / GB:.2f} GB "
                     f"(peak {d['activations_every_or_N_peak'] / GB:.2f} GB) every/N, 0 never")
    lines.append("  * GPU figures from assumed rates (no GPU here): see 'assumed'")
    return "\n".join(lines) + ("" if math.isfinite(f["k_solve"]) else "\n(no layer runs)")


def markdown(results: dict) -> str:
    """The whole-model table of docs/scale.md."""
    p = results["projection"]
    lines = ["| model | workers | GPTQ, CPU | GPTQ, GPU* | AWQ, CPU | AWQ, GPU* | host / rank "
             "(saving, never) | GPU / rank* | disk: checkpoint, resume activations |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, m in p["models"].items():
        d = m["disk_bytes"]
        disk = (f"{d['checkpoint'] / GB:.0f} GB, {d['activations_every_or_N_steady'] / GB:.1f}"
                f" GB (peak {d['activations_every_or_N_peak'] / GB:.1f} GB; never: 0)")
        for world in WORKERS:
            g, a = m["runs"][f"gptq-w{world}"], m["runs"][f"awq-w{world}"]
            note = "" if g["runnable"] else " (refused at 128 samples)"
            lines.append(
                f"| {name} ({m['layers']} layers) | {world}{note} | {_hours(g['cpu_hours'])} | "
                f"{_hours(g['gpu_hours'])} | {_hours(a['cpu_hours'])} | "
                f"{_hours(a['gpu_hours'])} | {g['peak_host_bytes_saving'] / GB:.0f}, "
                f"{g['peak_host_bytes_never'] / GB:.0f} GB | "
                f"{g['peak_device_bytes'] / GB:.0f} GB | {disk if world == 1 else ''} |")
    return "\n".join(lines)


def _hours(h: float) -> str:
    return f"{h * 60:.0f} min" if h < 1 else f"{h:.1f} h" if h < 100 else f"{h:.0f} h"
