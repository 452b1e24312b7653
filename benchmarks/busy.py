"""Decode speed beside busy neighbours: ours (default thread policy, and the old policy of
every core with spinning OpenMP waits) against llama.cpp, in one run.

    python benchmarks/busy.py [--rounds 3] [--new-tokens 64]
                              [--llama-python /tmp/llama-venv/bin/python]

The bundled SmolLM2-135M, packed W4 g128 with the output head at 8 bits
(recipes/w4g128-head8-rtn.yaml: llama.cpp's Q4_0 file quantises its head too; RTN, as
decode speed does not depend on how the weights were rounded), decoded greedily for
--new-tokens through `compress generate` in a fresh process per measurement (the thread
policy samples the machine when a command starts, as a user's command would): eager,
and `--aot` with its compiled step already on disk (compiled once before the rounds, as
a user's second run finds it; its tokens/s exclude loading it). llama.cpp decodes its
Q4_0 GGUF of the same model
(see peer_llamacpp.py for its venv) with its default thread count (every core) and with
one thread. Neighbours are processes spinning a core each (`while True: pass`), started
a second before the measurement. Conditions and contenders are interleaved within each
round; medians over rounds are reported, and each busy figure as a ratio to the same
contender's idle figure. Goal (issue 22): under one busy neighbour, ours ≥ 0.5× our idle
figure and ≥ llama.cpp's under the same neighbour.

Writes benchmarks/results/busy.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from compress import assets

HERE = Path(__file__).parent
LLAMA_PYTHON = Path("/tmp/llama-venv/bin/python")
RECIPE = HERE.parent / "recipes" / "w4g128-head8-rtn.yaml"
PROMPT = "The history of the city begins with a small settlement on the river, where"
NEIGHBOURS = (0, 1, 2)


def ours(checkpoint: Path, new_tokens: int, env: dict[str, str],
         flags: tuple[str, ...] = ()) -> tuple[float, int]:
    """Decode tokens/s of one `compress generate`, and the threads it chose."""
    proc = subprocess.run(
        [sys.executable, "-m", "compress.cli", "generate", str(checkpoint), "-p", PROMPT,
         "-n", str(new_tokens), "--ignore-eos", *flags],
        capture_output=True, text=True, env={**os.environ, **env})
    if proc.returncode:
        raise SystemExit(f"compress generate failed:\n{proc.stderr[-2000:]}")
    speed = float(re.search(r"decode ([\d.]+) tokens/s", proc.stderr).group(1))
    chose = re.search(r"using (\d+) threads?", proc.stderr)
    return speed, int(chose.group(1)) if chose else -1


def llama_cpp(python: Path, new_tokens: int, threads: int, work: Path) -> float:
    out = work / "llama.json"
    proc = subprocess.run(
        [str(python), str(HERE / "peer_llamacpp.py"), "--json", str(out), "--new-tokens",
         str(new_tokens), "--n-threads", str(threads), "--repeats", "1", "--quants", "Q4_0"],
        capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"llama.cpp failed:\n{proc.stderr[-2000:]}")
    return json.loads(out.read_text())["results"]["Q4_0"]["decode_tok_s"]


def _isa() -> str:
    from compress.kernels import native

    return native.isa()


def start_neighbours(n: int) -> list[subprocess.Popen]:
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(n)]
    time.sleep(1.0)  # let the scheduler see them
    return spinners


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--llama-python", type=Path, default=LLAMA_PYTHON)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "busy.json")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    contenders = {  # name: (environment, flags)
        "ours": ({}, ()),  # the default policy: free cores, passive waits
        "ours_aot": ({}, ("--aot",)),
        "ours_all_cores_spinning": ({"COMPRESS_THREADS": str(cores),
                                     "OMP_WAIT_POLICY": "ACTIVE"}, ()),
    }
    with_llama = args.llama_python.exists()
    if not with_llama:
        print(f"llama.cpp skipped: {args.llama_python} not found (see peer_llamacpp.py)")
    speeds: dict[str, dict[int, list[float]]] = {}
    chosen: dict[int, list[int]] = {n: [] for n in NEIGHBOURS}
    with tempfile.TemporaryDirectory(prefix="compress-busy-") as tmp:
        work = Path(tmp)
        checkpoint = work / "w4"
        os.environ["COMPRESS_AOT_CACHE"] = str(work / "aot")  # the subprocesses inherit it
        subprocess.run([sys.executable, "-m", "compress.cli", "quantize",
                        str(assets.bundled_model_dir()), "--recipe", str(RECIPE),
                        "--out", str(checkpoint), "--no-eval", "-q"], check=True)
        ours(checkpoint, args.new_tokens, {}, ("--aot",))  # compiles and keeps the step
        for r in range(args.rounds):
            for n in NEIGHBOURS if r % 2 == 0 else NEIGHBOURS[::-1]:
                spinners = start_neighbours(n)
                try:
                    for name, (env, flags) in contenders.items():
                        speed, threads_used = ours(checkpoint, args.new_tokens, env, flags)
                        speeds.setdefault(name, {}).setdefault(n, []).append(speed)
                        if name == "ours":
                            chosen[n].append(threads_used)
                    if with_llama:
                        for threads in sorted({cores, 1}):
                            speeds.setdefault(f"llama_cpp_{threads}t", {}).setdefault(
                                n, []).append(llama_cpp(args.llama_python, args.new_tokens,
                                                        threads, work))
                finally:
                    for spinner in spinners:
                        spinner.kill()
                        spinner.wait()
                line = ", ".join(f"{k} {v[n][-1]:.1f}" for k, v in speeds.items())
                print(f"round {r + 1}, {n} busy neighbour(s): {line} tokens/s", flush=True)
    medians = {k: {n: statistics.median(v[n]) for n in NEIGHBOURS} for k, v in speeds.items()}
    result = {
        "benchmark": "busy", "cores": cores, "rounds": args.rounds,
        "checkpoint": RECIPE.name, "cpu_kernel": _isa(),
        "new_tokens": args.new_tokens, "load_before": os.getloadavg(),
        "threads_ours_chose": chosen, "tok_s": speeds, "median_tok_s": medians,
        "busy_over_idle": {k: {n: m[n] / m[0] for n in NEIGHBOURS[1:]}
                           for k, m in medians.items()},
    }
    llama = [k for k in medians if k.startswith("llama_cpp")]
    if llama:
        for name in ("ours", "ours_aot"):
            result[f"{name}_over_best_llama_cpp"] = {
                n: medians[name][n] / max(medians[k][n] for k in llama) for n in NEIGHBOURS}
    print(f"\n{'contender':<26}" + "".join(f"{f'{n} busy':>10}" for n in NEIGHBOURS))
    for k, m in medians.items():
        print(f"{k:<26}" + "".join(f"{m[n]:>10.1f}" for n in NEIGHBOURS))
    for k, ratios in result["busy_over_idle"].items():
        print(f"{k}: " + ", ".join(f"{n} busy {x:.2f}x idle" for n, x in ratios.items()))
    if llama:
        for name in ("ours", "ours_aot"):
            print(f"{name} / best llama.cpp: " + ", ".join(
                f"{n} busy {x:.2f}" for n, x in result[f"{name}_over_best_llama_cpp"].items()))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
