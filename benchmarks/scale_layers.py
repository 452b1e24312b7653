"""Per-layer cost of GPTQ and AWQ on Llama-3-8B, Llama-3-70B and Llama-3.1-405B shapes on
this CPU, and the whole-model time / memory / disk model built from it (docs/scale.md).

    python benchmarks/scale_layers.py [--threads 1] [--workdir DIR]
    python benchmarks/scale_layers.py --project-only     # the model again, from the JSON

Two kinds of measurement, each in a child process (`_child.run_measured`: wall seconds and
peak RSS):

- whole decoder layers through `compress quantize --no-eval` on a one-layer random-weight
  checkpoint (`_synthetic.write_synthetic_llama`), timed per layer from the moments the
  child records its progress.json. Calibrated at two token counts, so that the cost splits
  into a part proportional to the tokens (forwards, Hessian accumulation) and a part that
  is not (GPTQ's solves, AWQ's scale search);
- the parts of a layer one at a time (`--micro`, through compress.quant directly): the
  matmul and Hessian-accumulation rates, GPTQ solves of single Linears up to a 405B
  k_proj (1024 x 16384), AWQ's scale search on one Linear at two grid sizes.

Seconds are CPU seconds of the measured process at one thread: this machine's 2 cores
are shared with other work, and the wall clock would count the other processes' turns
too (the JSON keeps the wall seconds and load averages beside them).

On 2 shared cores a whole 8B layer takes minutes and a 70B layer about half an hour with
GPTQ (its solves alone), so only 8B layers run whole here; 70B and 405B layers are the
sum of their measured parts scaled by flop count (the JSON keeps the measurements under
`micro` and `layers`, the model under `projection`).
Writes benchmarks/results/scale_layers.json and prints tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from _child import run_measured
from _synthetic import write_synthetic_llama

HERE = Path(__file__).parent
RESULT = HERE / "results" / "scale_layers.json"
SEQLEN = 512
FULL_TOKENS = 128 * 512  # the calibration the whole-model figures are for


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int

    @property
    def kv(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    def linears(self) -> dict[str, tuple[int, int]]:
        """Linear -> (out, in) of one decoder layer."""
        h, i, kv = self.hidden, self.intermediate, self.kv
        return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
                "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}

    def groups(self) -> list[tuple[int, list[int]]]:
        """The true-sequential groups as (input width, each Linear's rows): one Hessian
        each, solved one group after another."""
        lin = self.linears()
        return [(self.hidden, [lin["q_proj"][0], lin["k_proj"][0], lin["v_proj"][0]]),
                (self.hidden, [lin["o_proj"][0]]),
                (self.hidden, [lin["gate_proj"][0], lin["up_proj"][0]]),
                (self.intermediate, [lin["down_proj"][0]])]

    @property
    def params(self) -> int:
        return sum(o * i for o, i in self.linears().values())


SHAPES = {
    "llama3-8b": Shape(4096, 14336, 32, 8, 32),
    "llama3-70b": Shape(8192, 28672, 64, 8, 80),
    "llama3.1-405b": Shape(16384, 53248, 128, 8, 126),
}

# (kind, arguments): what each child measures; sized to finish in minutes on one core
MICRO_JOBS = [
    ("matmul", (4096, 4096, 14336)),      # tokens, in, out: a forward's Linear
    ("matmul", (2048, 16384, 16384)),
    ("hessian", (4096, 8192)),            # in, tokens
    ("hessian", (16384, 2048)),
    ("gptq", (1024, 4096)),               # out, in: 8B k_proj
    ("gptq", (4096, 4096)),               # 8B q_proj / o_proj
    ("gptq", (1024, 8192)),               # 70B k_proj
    ("gptq", (1024, 16384)),              # 405B k_proj
    ("awq", (4096, 4096, 2)),             # out, in, grid
    ("awq", (4096, 4096, 4)),
]
# (method, samples, extra flags) on one 8B-shape layer
LAYER_RUNS = [
    ("gptq", 16, []),
    ("awq", 2, ["--awq-grid", "2"]),
    ("gptq", 2, []),
]


# -- children --------------------------------------------------------------------------

def micro(kind: str, args: list[int]) -> dict:
    """One part of a layer, timed in this (child) process: wall seconds and CPU seconds
    (`cpu_seconds`, the figure used: on a shared machine the wall clock also counts the
    time other processes hold the core)."""
    clock = _Timer()
    result = _micro(kind, args, clock)
    return {**result, "seconds": clock.cpu, "wall_seconds": clock.wall}


class _Timer:
    """Wall and CPU seconds of the section between start() and stop() (accumulated)."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def start(self) -> None:
        self._w, self._c = time.perf_counter(), time.process_time()

    def stop(self) -> float:
        self.wall += time.perf_counter() - self._w
        self.cpu += time.process_time() - self._c
        return self.cpu


def _micro(kind: str, args: list[int], clock: _Timer) -> dict:
    import torch

    from compress.quant import QuantScheme, awq, gptq

    gen = torch.Generator().manual_seed(0)
    scheme = QuantScheme(4, 128, True)
    if kind == "matmul":
        tokens, n_in, n_out = args
        x, w = torch.randn(tokens, n_in, generator=gen), torch.randn(n_out, n_in, generator=gen)
        torch.nn.functional.linear(x[:64], w)  # first-call setup out of the timing
        clock.start()
        torch.nn.functional.linear(x, w)
        clock.stop()
        return {"flops": 2 * tokens * n_in * n_out}
    if kind == "hessian":
        n_in, tokens = args
        x = torch.randn(tokens, n_in, generator=gen)
        acc = gptq.HessianAccumulator(n_in)
        clock.start()
        for chunk in x.split(4096):  # a calibration chunk: 8 samples x 512 tokens
            acc.add(chunk)
        clock.stop()
        # flops of the full square, though only the upper block triangle is computed
        return {"flops": 2 * tokens * n_in * n_in}
    hessian = _spd(args[1], gen)
    w = torch.randn(args[0], args[1], generator=gen) * 0.02
    if kind == "gptq":
        clock.start()
        gptq.quantize_layer(w, hessian, scheme, gptq.GPTQConfig(), torch.float16)
        clock.stop()
        return {}
    if kind == "awq":
        cfg = awq.AWQConfig(grid=args[2])
        magnitude = torch.rand(args[1], generator=gen) + 0.1
        clip = _Timer()
        clock.start()
        awq.search_scales([w], [scheme], hessian, magnitude, cfg, torch.float16)
        clock.stop()
        clip.start()
        awq.search_clip(w, scheme, hessian, cfg, torch.float16)
        clip.stop()
        return {"scores": 2 * cfg.grid, "clip_seconds": clip.cpu}
    raise SystemExit(f"unknown micro kind {kind!r}")


def _spd(n: int, gen) -> object:
    """A positive definite Hessian-like [n, n] matrix, made cheaply (the solve's cost does
    not depend on its values): a low-rank X^T X plus a positive diagonal."""
    import torch

    x = torch.randn(256, n, generator=gen)
    h = x.T @ x / 256
    h.diagonal().add_(torch.rand(n, generator=gen) + 0.5)
    return h


# -- the parent: measurements ------------------------------------------------------------

def run_micro(kind: str, args: tuple, threads: int, work: Path) -> dict:
    result = work / f"micro-{kind}-{'-'.join(map(str, args))}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--micro", kind,
           *map(str, args), "--result", str(result), "--threads", str(threads)]
    code, _, rss, tail = run_measured(cmd)
    if code:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{tail}")
    return {"kind": kind, "args": list(args), **json.loads(result.read_text()),
            "peak_rss_bytes": rss, "loads": os.getloadavg()}


class _LayerClock:
    """The moments a quantize child records each finished layer in progress.json (the
    first: when the file appears, before layer 0 starts), in wall seconds and in the CPU
    seconds of this process's children (the figure used on a shared machine)."""

    def __init__(self, progress: Path):
        self.progress, self.times, self.cpu = progress, [], []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    @staticmethod
    def _children_cpu() -> float:
        total = 0.0
        for child in psutil.Process().children(recursive=True):
            try:
                t = child.cpu_times()
                total += t.user + t.system
            except psutil.Error:  # it ended between listing and reading
                pass
        return total

    def _watch(self) -> None:
        seen = -1
        while not self.done.is_set():
            try:
                count = len(json.loads(self.progress.read_text())["done"])
            except (OSError, ValueError, KeyError):
                count = -1
            if count > seen:
                self.times.extend([time.perf_counter()] * (count - seen))
                self.cpu.extend([self._children_cpu()] * (count - seen))
                seen = count
            time.sleep(0.05)

    def layer_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.cpu, self.cpu[1:], strict=False)]

    def layer_wall_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:], strict=False)]


def run_layer(shape: str, method: str, samples: int, extra: list[str], threads: int,
              work: Path) -> dict:
    s = SHAPES[shape]
    model = work / f"{shape}-1layer"
    if not (model / "config.json").is_file():
        write_synthetic_llama(model, 1, s.hidden, s.intermediate, s.heads, s.kv_heads)
    out = work / f"out-{shape}-{method}-{samples}"
    cmd = [sys.executable, "-m", "compress.cli", "quantize", str(model), "--method", method,
           "--bits", "4", "--group-size", "128", "--calib-samples", str(samples),
           "--calib-seqlen", str(SEQLEN), "--no-eval", "-q", "--overwrite",
           "--threads", str(threads), "--out", str(out), *extra]
    clock = _LayerClock(out.with_name(out.name + ".partial") / "progress.json")
    clock.thread.start()
    code, seconds, rss, tail = run_measured(cmd)
    clock.done.set()
    clock.thread.join()
    if code:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{tail}")
    return {"shape": shape, "method": method, "samples": samples, "seqlen": SEQLEN,
            "tokens": samples * SEQLEN, "flags": extra, "layer_seconds": clock.layer_seconds(),
            "layer_wall_seconds": clock.layer_wall_seconds(),
            "process_seconds": seconds, "peak_rss_bytes": rss, "loads": os.getloadavg(),
            "command": " ".join(cmd[1:])}


def measure(threads: int, work: Path, previous: dict) -> dict:
    """Every job not already in `previous` (a rerun continues where one stopped)."""
    results = {"threads": threads, "micro": previous.get("micro", []),
               "layers": previous.get("layers", [])}
    done = {(m["kind"], tuple(m["args"])) for m in results["micro"]}
    for kind, args in MICRO_JOBS:
        if (kind, args) not in done:
            results["micro"].append(run_micro(kind, args, threads, work))
            m = results["micro"][-1]
            print(f"micro {kind} {args}: {m['seconds']:.1f} s CPU, {m['wall_seconds']:.1f} s "
                  f"wall, loads {m['loads']}", flush=True)
            _save(results)
    ran = {(r["method"], r["samples"]) for r in results["layers"]}
    for method, samples, extra in LAYER_RUNS:
        if (method, samples) not in ran:
            results["layers"].append(run_layer("llama3-8b", method, samples, extra, threads,
                                               work))
            print(f"layer llama3-8b {method} {samples}x{SEQLEN}: "
                  f"{results['layers'][-1]['layer_seconds']}", flush=True)
            _save(results)
    return results


def _save(results: dict) -> None:
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULT.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(RESULT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--project-only", action="store_true")
    args = parser.parse_args()
    if args.micro:
        import torch

        torch.set_num_threads(args.threads)
        args.result.write_text(json.dumps(micro(args.micro[0], [int(a) for a in args.micro[1:]])))
        return
    previous = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    if not args.project_only:
        work = args.workdir or Path(tempfile.mkdtemp(prefix="compress-layers-"))
        previous = measure(args.threads, work, previous)
    from _scale_model import markdown, project, tables

    previous["projection"] = project(previous, SHAPES, FULL_TOKENS)
    _save(previous)
    print(tables(previous))
    print(markdown(previous))


if __name__ == "__main__":
    main()
