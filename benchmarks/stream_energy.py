"""Where each layer's output (the residual stream) keeps its energy, raw and as the norms
that read it weigh it: the case for learned rounding's "normed" loss
(`SignRoundConfig.loss`; results/stream_energy.json).

    python benchmarks/stream_energy.py [--models smollm2-135m,gemma3-270m] [--windows 8]

Per layer, on the first calibration windows: the share of the stream's squared values
in its top 1% channels (the first position left out: it is an attention sink on both
bundled models), the same share with each channel weighed by the readers' gain squared
(`compress.calibrate.signround.reader_gains`, what the normed loss weighs it by), and the
first position's share of the whole. A raw share far above the weighed one means a plain
output loss spends itself on channels the next layers barely read.
"""

from __future__ import annotations

import argparse
import json

import torch
from _quantbench import HERE, report_model

from compress import assets, data, models
from compress.calibrate.signround import reader_gains
from compress.progress import set_quiet


def layer_outputs(name: str, windows: int) -> tuple[list[torch.Tensor], models.ModelFiles]:
    model, files = models.load(name, dtype=torch.float32)
    calib = data.calibration_set(data.load_tokenizer(assets.bundled_model_dir(name)), None,
                                 windows, 512, 0)
    outputs: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(
        lambda module, args, out: outputs.append(out[0] if isinstance(out, tuple) else out))
        for layer in model.model.layers]
    with torch.no_grad():
        model(calib.samples)
    for hook in hooks:
        hook.remove()
    return outputs, files


def top_share(energy: torch.Tensor, fraction: float = 0.01) -> float:
    """The share of `energy` (per channel) in its largest `fraction` of channels."""
    k = max(1, int(energy.numel() * fraction))
    return float(energy.topk(k).values.sum() / energy.sum())


def measure(name: str, windows: int) -> list[dict]:
    outputs, files = layer_outputs(name, windows)
    gains = reader_gains(files, residual_rotated=False)
    rows = []
    for index, (out, gain) in enumerate(zip(outputs, gains, strict=True)):
        squared = out.float().square()
        energy = squared[:, 1:].sum((0, 1))
        per_token = squared.sum(-1)
        rows.append({"layer": index, "top1pct_share_raw": top_share(energy),
                     "top1pct_share_read": top_share(energy * gain.square()),
                     "first_position_share": float(per_token[:, 0].sum() / per_token.sum())})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--windows", type=int, default=8)
    args = parser.parse_args()
    set_quiet(True)
    torch.set_num_threads(1)
    report = {"benchmark": "stream_energy", "windows": args.windows, "seqlen": 512,
              "models": {}}
    for name in args.models.split(","):
        rows = measure(name, args.windows)
        report["models"][report_model(name)] = rows
        print(f"{name}: layer, top 1% channels' share raw / as read, first position's share")
        for row in rows:
            print(f"  {row['layer']:2d}  {row['top1pct_share_raw']:.3f} / "
                  f"{row['top1pct_share_read']:.3f}  {row['first_position_share']:.3f}")
    path = HERE / "results" / "stream_energy.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
