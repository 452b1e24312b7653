"""Memory bound of the layer-by-layer GPTQ pipeline on a model bigger than its memory use.

    python benchmarks/scale_gptq.py [--layers 40] [--hidden 2048] [--intermediate 5632]

Writes a random-weight Llama-architecture checkpoint (fp16 safetensors, one shard per
layer, written layer by layer so this script never holds it either), quantises it with
`compress quantize --method gptq` in a child process, and reports the child's peak RSS
against the checkpoint size and against the bound "2 × (one layer's weights +
calibration activations)". Writes benchmarks/results/scale_gptq.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from _child import run_measured
from _synthetic import write_synthetic_llama


def peak_rss_of(cmd: list[str]) -> tuple[int, float, int]:
    """(exit code, wall seconds, peak RSS bytes) of a child process."""
    code, seconds, rss, tail = run_measured(cmd)
    if code:
        sys.stderr.write(tail)
    return code, seconds, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-seqlen", type=int, default=256)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path,
                        default=Path(__file__).parent / "results" / "scale_gptq.json")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="compress-scale-"))
    model = work / "synthetic"
    model_bytes = write_synthetic_llama(model, args.layers, args.hidden, args.intermediate,
                                        args.heads, args.kv_heads)
    layer_bytes = 2 * (args.hidden * args.hidden * 2
                       + 2 * args.hidden * (args.hidden // args.heads) * args.kv_heads
                       + 3 * args.hidden * args.intermediate)
    activation_bytes = 4 * args.calib_samples * args.calib_seqlen * args.hidden
    baseline_code, _, baseline_rss = peak_rss_of(
        [sys.executable, "-c", "import compress.cli, compress.pipeline, transformers"])
    code, seconds, rss = peak_rss_of([
        sys.executable, "-m", "compress.cli", "quantize", str(model), "--method", "gptq",
        "--calib-samples", str(args.calib_samples), "--calib-seqlen", str(args.calib_seqlen),
        "--out", str(work / "out"), "--overwrite", "--no-eval", "-q"])
    if code or baseline_code:
        sys.exit("quantisation failed")
    bound = 2 * (layer_bytes + activation_bytes)
    report = {
        "benchmark": "scale_gptq",
        "model": {"layers": args.layers, "hidden": args.hidden,
                  "intermediate": args.intermediate, "fp16_bytes": model_bytes},
        "calibration": {"samples": args.calib_samples, "seqlen": args.calib_seqlen},
        "one_layer_fp16_bytes": layer_bytes,
        "calibration_activation_bytes": activation_bytes,
        "peak_rss_bytes": rss,
        "import_baseline_rss_bytes": baseline_rss,
        "peak_rss_over_model": rss / model_bytes,
        "peak_rss_over_bound": rss / bound,
        "peak_rss_above_baseline_over_bound": (rss - baseline_rss) / bound,
        "quantize_seconds": seconds,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    gb = 1e9
    print(f"model {model_bytes / gb:.2f} GB fp16; peak RSS {rss / gb:.2f} GB "
          f"({rss / model_bytes:.2f}× the model); bound 2×(layer {layer_bytes / gb:.3f} GB + "
          f"activations {activation_bytes / gb:.3f} GB) = {bound / gb:.2f} GB -> "
          f"{rss / bound:.2f}× the bound ({(rss - baseline_rss) / bound:.2f}× above the "
          f"{baseline_rss / gb:.2f} GB import baseline); {seconds:.0f} s")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
