"""Serving figures on the bundled model (CPU), in one run: batching throughput, speculative
decoding with a quantised self-draft, prefix-cache TTFT, INT8 KV cache memory and KL.

    python benchmarks/serving.py [--json benchmarks/results/serving.json]

- Batching: `compress bench`'s sweep (32 requests, prompts ~128 tokens, 64 new tokens
  each, all arriving at once) on the W4 g128 checkpoint; the figure is total tokens/s at
  the best batch size over batch 1's.
- Speculative: greedy decoding of 3 prompts x 128 tokens by the fp32 model alone and with
  a W4 g128 or W8 draft proposing k tokens per round; tokens/s ratio and acceptance rate.
  The output is checked to equal the verifier's own.
- Prefix cache: 8 requests sharing a 256-token system prompt (+ 16-48 tokens of their
  own) served one at a time; TTFT with the prefix cache over without (the first request
  fills it and is excluded).
- INT8 KV cache: its bytes against the float32 cache the CPU decoder keeps, and its
  cost through the eval harness (`compress eval M --baseline M --kv-cache int8`).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _quantbench import report_model

import compress
from compress import assets, data, evaluation, models, pipeline
from compress.progress import set_quiet
from compress.quant import QuantScheme
from compress.recipe import Recipe
from compress.serving import Engine, PrefixCache, Request, bench, generation
from compress.serving.speculative import SpeculativeDecoder

HERE = Path(__file__).parent


def timed_tokens(tokens_iter) -> tuple[list[int], float]:
    """All tokens and the decode tokens/s after the first (the prefill's) token."""
    it = iter(tokens_iter)
    out = [next(it)]
    start = time.perf_counter()
    out += list(it)
    return out, (len(out) - 1) / (time.perf_counter() - start)


def speculative(target, drafts: dict, prompts: list[list[int]], new_tokens: int) -> dict:
    params = generation.SamplingParams(max_new_tokens=new_tokens)
    base = [timed_tokens(generation.generate(target, p, params)) for p in prompts]
    alone = statistics.median(s for _, s in base)
    rows = {"verifier_alone_tok_s": alone}
    for name, draft in drafts.items():
        for k in (2, 4):
            spec = SpeculativeDecoder(target, draft, k)
            runs = [timed_tokens(spec.generate(p, params)) for p in prompts]
            same = all(r[0] == b[0] for r, b in zip(runs, base, strict=True))
            speed = statistics.median(s for _, s in runs)
            rows[f"{name}_k{k}"] = {"tok_s": speed, "speedup": speed / alone,
                                    "acceptance_rate": spec.stats.acceptance_rate,
                                    "equals_verifier": same}
            print(f"speculative {name} draft, k={k}: {speed:.1f} tok/s vs {alone:.1f} alone "
                  f"({speed / alone:.2f}x), acceptance {spec.stats.acceptance_rate:.0%}, "
                  f"identical tokens: {same}", flush=True)
    return rows


def prefix_ttft(model, text: torch.Tensor, system_len: int = 256, requests: int = 8) -> dict:
    rng = random.Random(0)
    system = text[:system_len].tolist()
    prompts = []
    for _ in range(requests):
        at = rng.randrange(system_len, text.numel() - 64)
        prompts.append(system + text[at:at + rng.randint(16, 48)].tolist())
    params = generation.SamplingParams(max_new_tokens=1)
    ttft = {}
    for label, cache in (("cold", None), ("prefix_cache", PrefixCache(block=16))):
        engine = Engine(model, slots=1, max_len=system_len + 64, prefix_cache=cache)
        times = []
        for p in prompts:
            engine.submit(Request(p, params))
            times.append(engine.run()[-1].ttft)
        ttft[label] = statistics.median(times[1:])  # the first request fills the cache
    ttft["saving"] = 1 - ttft["prefix_cache"] / ttft["cold"]
    print(f"prefix cache: TTFT {ttft['prefix_cache'] * 1e3:.0f} ms vs {ttft['cold'] * 1e3:.0f} "
          f"ms cold (-{ttft['saving']:.0%}), {system_len}-token shared system prompt",
          flush=True)
    return ttft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=HERE / "results" / "serving.json")
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    set_quiet(True)
    base = assets.bundled_model_dir()
    text = data.text_tokens(data.load_tokenizer(base)).tokens
    report = {"benchmark": "serving", "model": report_model(assets.DEFAULT_MODEL),
              "compress_version": compress.__version__, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {"int4": Path(tmp) / "w4g128", "int8": Path(tmp) / "w8"}
        pipeline.quantize(base, Recipe("rtn", QuantScheme(4, 128, True)), dirs["int4"])
        pipeline.quantize(base, Recipe("rtn", QuantScheme(8, -1, True)), dirs["int8"])
        int4 = models.load(dirs["int4"])[0]

        workload = bench.Workload(requests=32, prompt_len=128, output_len=64, seed=0)
        results = bench.sweep(int4, workload, text)
        best = max(results, key=lambda r: r.total_tokens_per_s)
        report["batching"] = {"workload": workload.__dict__,
                              "results": [r.to_dict() for r in results],
                              "best_batch_size": best.batch_size,
                              "best_over_batch1": best.total_tokens_per_s
                              / results[0].total_tokens_per_s}
        for r in results:
            print(f"batch {r.batch_size:>2}: {r.total_tokens_per_s:6.1f} tok/s total, "
                  f"{r.request_tokens_per_s:6.1f} per request, TTFT p95 {r.ttft_p95:.2f} s, "
                  f"ITL p95 {r.itl_p95 * 1e3:.0f} ms", flush=True)
        print(f"best batch {best.batch_size}: {report['batching']['best_over_batch1']:.2f}x "
              "batch 1's throughput", flush=True)

        prompts = [text[a:a + 24].tolist() for a in (0, 5000, 20000)]
        target = models.load(base)[0]
        drafts = {"int4": int4, "int8": models.load(dirs["int8"])[0]}
        report["speculative"] = speculative(target, drafts, prompts, args.new_tokens)
        report["prefix_cache_ttft"] = prefix_ttft(int4, text)

        kv = {}
        for name, model in (("fp32", target), ("int4", int4)):
            float_bytes = model.new_cache(1, 1024).nbytes
            int8_bytes = model.new_cache(1, 1024, quantized=True).nbytes
            start = time.perf_counter()
            path = base if name == "fp32" else dirs[name]
            cost = evaluation.evaluate(path, path, kv_cache="int8")
            kv[name] = {"float_bytes_per_token": float_bytes / 1024,
                        "int8_bytes_per_token": int8_bytes / 1024,
                        "int8_over_float": int8_bytes / float_bytes,
                        "kl_mean": cost.match.kl_mean, "kl_p99": cost.match.kl_p99,
                        "top1_agreement": cost.match.top1_agreement,
                        "ppl_float": cost.baseline_ppl.ppl, "ppl_int8": cost.ppl.ppl,
                        "eval_seconds": time.perf_counter() - start}
            print(f"INT8 KV on {name}: {int8_bytes / float_bytes:.2f}x the float32 cache's "
                  f"bytes ({float_bytes / 1024 / 1024:.1f} -> {int8_bytes / 1024 / 1024:.1f} "
                  f"KiB per token); KL {cost.match.kl_mean:.5f} (p99 {cost.match.kl_p99:.4f}),"
                  f" top-1 {cost.match.top1_agreement:.2%}, ppl {cost.baseline_ppl.ppl:.3f} -> "
                  f"{cost.ppl.ppl:.3f}", flush=True)
        report["int8_kv_cache"] = kv
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
