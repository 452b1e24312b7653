"""Text -> token tensors: held-out evaluation windows and seeded calibration samples."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from compress import assets
from compress.errors import CompressError, first_line

if TYPE_CHECKING:
    from compress.models import ModelFiles

# The files a Hugging Face tokenizer is read from (one of the vocabularies, and its config).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "tokenizer_config.json")


def load_tokenizer(path: Path, needed_for: str | None = None, or_else: str | None = None):
    """The model's tokenizer, from local files only (never remote code). The error says
    what `needed_for` it, and offers `or_else` (another way on) beside the fix."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError) as e:
        if any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
            reason = first_line(e)
        else:  # transformers' own words list the files it tried: none, here
            reason = f"it has no tokenizer files: none of {', '.join(TOKENIZER_FILES)}"
        raise CompressError(
            f"cannot load a tokenizer from {path}"
            + (f", which {needed_for} needs" if needed_for else "")
            + f" ({reason}); copy the base model's tokenizer files into it"
            + (f", or {or_else}" if or_else else "")) from None


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer prepends BOS to text (Gemma/Llama-2 do; SmolLM2 does not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[0] == bos


@dataclass(frozen=True)
class TokenizedText:
    tokens: torch.Tensor  # (T,) int64, no special tokens
    sha256: str  # of the text
    description: str


def tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False).input_ids
    return torch.tensor(ids, dtype=torch.int64)


def text_tokens(tokenizer, path: str | Path | None = None, split: str = "heldout") -> TokenizedText:
    """Tokens of a user text source (see `read_text`), or of a bundled text split."""
    if path is None:
        text = assets.bundled_text(split)
        return TokenizedText(tokenize(tokenizer, text.text), text.sha256, text.description)
    content = read_text(path)
    return TokenizedText(tokenize(tokenizer, content),
                         hashlib.sha256(content.encode()).hexdigest(), str(path))


def read_text(path: str | Path) -> str:
    """Text from a UTF-8 file, a JSON/JSONL file or a local `datasets` directory.

    JSON(L) and datasets directories must have a "text" column; records are joined by
    blank lines, in order.
    """
    path = Path(path)
    if not path.exists():
        raise CompressError(f"text source {path} does not exist")
    if path.is_dir() or path.suffix in (".json", ".jsonl"):
        import datasets

        try:
            if path.is_dir():
                ds = datasets.load_from_disk(str(path))
                if isinstance(ds, datasets.DatasetDict):
                    split = "train" if "train" in ds else next(iter(ds))
                    ds = ds[split]
            else:
                ds = datasets.load_dataset("json", data_files=str(path), split="train")
        except (FileNotFoundError, ValueError, OSError) as e:
            raise CompressError(f"cannot read {path} as a dataset "
                                f"({str(e).splitlines()[0]})") from None
        except Exception as e:  # datasets wraps JSON errors in its own types
            raise CompressError(f"cannot read {path} as a dataset ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from None
        if "text" not in ds.column_names:
            raise CompressError(f"{path} has no 'text' column (columns: "
                                f"{', '.join(ds.column_names)})")
        return "\n\n".join(t for t in ds["text"] if isinstance(t, str) and t.strip())
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CompressError(f"{path} is not UTF-8 text") from None


# A sampled window starts from this many tokens of a calibration window (`with_sampled`).
SAMPLED_PROMPT = 4
# Sampled windows decode this many at a time, from one generator: the cache keeps its
# state before each batch, so that a kept set is reused up to any batch boundary.
SAMPLED_BATCH = 16


@dataclass(frozen=True)
class CalibrationSet:
    samples: torch.Tensor  # (n, seqlen) int64: the text's windows, then the sampled ones
    text_sha256: str
    source: str
    sampled: int = 0  # the last `sampled` windows were sampled from the model

    @property
    def sha256(self) -> str:
        """Hash of the exact token ids the quantiser saw."""
        return hashlib.sha256(self.samples.numpy().tobytes()).hexdigest()

    def describe(self) -> dict:
        n, seqlen = self.samples.shape
        described = {"source": self.source, "text_sha256": self.text_sha256,
                     "tokens_sha256": self.sha256, "samples": n - self.sampled,
                     "seqlen": seqlen}
        if self.sampled:
            described["sampled"] = self.sampled
        return described


def with_sampled(calib: CalibrationSet, model_files: ModelFiles, count: int, seed: int,
                 device: torch.device | str = "cpu") -> CalibrationSet:
    """`calib` and `count` more windows of its length sampled from the unquantised model
    (`model_files`, loaded whole on `device`): window i starts from the first
    `SAMPLED_PROMPT` tokens of calibration window i mod n and continues as the model
    would write it (`generation.sample_windows`). More tokens to fit on, with no more
    text: learned stages fitted 32 windows' 16k tokens far better than held-out text.

    The windows are kept on disk (`sampled_cache()`) under a key of everything that
    decides their bytes but their count, with the generator's state before each batch of
    `SAMPLED_BATCH`, saved after each batch. An ask for no more windows than are kept
    loads no model (a resumed run, `compress tune`); one for more (or a killed sampling,
    run again) samples only the new ones. Either way the bytes are those of sampling
    `count` windows at once: reuse stops at a batch boundary."""
    if count == 0:
        return calib
    from compress import models
    from compress.progress import status, track
    from compress.serving.generation import sample_windows

    n, seqlen = calib.samples.shape
    prompts = calib.samples[torch.arange(count) % n, :SAMPLED_PROMPT]
    path = sampled_cache() / (_sampled_key(calib, model_files, seed, device) + ".safetensors")
    kept = _read_sampled(path, calib, model_files.config.get("vocab_size"), device)
    windows, states = kept if kept is not None else (calib.samples[:0], [])
    if count <= len(windows) and (count % SAMPLED_BATCH == 0 or count == len(windows)):
        status(f"reusing {count} calibration windows sampled earlier from "
               f"{model_files.name} ({path})")
        windows = windows[:count]
    else:
        batch = min(count, len(windows)) // SAMPLED_BATCH
        first = batch * SAMPLED_BATCH
        reused = f", reusing {first} sampled earlier" if first else ""
        status(f"sampling {count - first} calibration windows of {seqlen} tokens from "
               f"{model_files.name}{reused}")
        generator = torch.Generator(device=device)
        if first:
            generator.set_state(states[batch])
        else:
            generator.manual_seed(seed)
        kept_count, rows, states = len(windows), [windows[:first]], states[:batch]
        keep = True
        model, _ = models.load(model_files, device)
        for start in track(range(first, count, SAMPLED_BATCH), desc="sampling windows",
                           unit="batch"):
            states.append(generator.get_state())
            rows.append(sample_windows(model, prompts[start:start + SAMPLED_BATCH], seqlen,
                                       generator, batch=SAMPLED_BATCH))
            done = start + len(rows[-1])
            if keep and done > kept_count:  # kept batch by batch: a kill loses one batch
                whole = [generator.get_state()] if done % SAMPLED_BATCH == 0 else []
                keep = _write_sampled(path, torch.cat(rows), states + whole)
        del model
        windows = torch.cat(rows)
    return CalibrationSet(torch.cat([calib.samples, windows]), calib.text_sha256,
                          f"{calib.source}; {count} windows sampled from the model",
                          calib.sampled + count)


def sampled_cache() -> Path:
    """COMPRESS_SAMPLED_CACHE, else `sampled/` in compress's cache. The files hold the
    first tokens of calibration windows as prompts: delete the folder to forget them."""
    return assets.cache_dir("sampled", "COMPRESS_SAMPLED_CACHE")


def _sampled_key(calib: CalibrationSet, model_files: ModelFiles, seed: int,
                 device: torch.device | str) -> str:
    """What decides sampled windows' bytes, but their count (a file serves every count).
    The thread count and device are in it because float reductions round differently
    across them, which changes some draws."""
    import compress

    fields = {"windows": calib.sha256, "seed": seed, "batch": SAMPLED_BATCH,
              "prompt_tokens": SAMPLED_PROMPT,
              "model": model_files.identity(),
              "device": torch.device(device).type, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "compress": compress.__version__}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def _read_sampled(path: Path, calib: CalibrationSet, vocab: int | None,
                  device: torch.device | str,
                  ) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
    """Kept windows and the generator's states before each of their whole batches, if
    the file is whole and fits (int64 ids in the vocabulary, of calib's length, each
    starting with its prompt; one state per batch boundary, of this generator's size),
    else None: a damaged or foreign file is sampled again, never used."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        kept = load_file(path)
    except (OSError, SafetensorError):
        return None
    windows, states = kept.get("windows"), kept.get("generator_states")
    n, seqlen = calib.samples.shape
    state_bytes = torch.Generator(device=device).get_state().numel()
    if (windows is None or states is None or windows.dtype != torch.int64
            or windows.dim() != 2 or windows.shape[1] != seqlen or windows.numel() == 0
            or states.dtype != torch.uint8
            or states.shape != (len(windows) // SAMPLED_BATCH + 1, state_bytes)
            or _ids_outside(windows, vocab)):
        return None
    prompts = calib.samples[torch.arange(len(windows)) % n, :SAMPLED_PROMPT]
    if not torch.equal(windows[:, :SAMPLED_PROMPT], prompts):
        return None
    # Each state its own tensor: Generator.set_state reads a view's storage from its
    # start, ignoring the view's offset (a crash or a wrong state).
    return windows, [state.clone() for state in states]


def _write_sampled(path: Path, windows: torch.Tensor, states: list[torch.Tensor]) -> bool:
    """Kept for the next run (False: could not be); a cache that cannot be written only
    costs that run time."""
    from compress.formats import checkpoint
    from compress.progress import status

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_save_safetensors(
            path, {"windows": windows.contiguous(), "generator_states": torch.stack(states)})
    except (OSError, CompressError) as e:
        status(f"note: could not keep the sampled windows in {path} ({first_line(e)}); "
               "a resumed run or compress tune will sample them again")
        return False
    return True


def calibration_set(tokenizer, path: str | Path | None, samples: int, seqlen: int,
                    seed: int) -> CalibrationSet:
    """`samples` windows of `seqlen` tokens at seeded random offsets of the calibration text.

    The bundled calibration split never overlaps the held-out evaluation text.
    """
    if samples < 1 or seqlen < 2:
        raise CompressError("calibration needs at least 1 sample of at least 2 tokens")
    if path is not None and Path(path).suffix == ".safetensors":
        return token_windows(path, len(tokenizer), samples, seqlen)
    text = text_tokens(tokenizer, path, split="calibration")
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    body = seqlen - 1 if bos is not None else seqlen
    tokens = text.tokens
    if tokens.numel() < body:
        raise CompressError(
            f"the calibration text has {tokens.numel()} tokens, fewer than one sample of "
            f"{body}; give at least {samples * body} tokens (~{samples * body * 4} characters) "
            "or lower --calib-seqlen")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - body + 1, (samples,), generator=gen)
    windows = torch.stack([tokens[s:s + body] for s in starts.tolist()])
    if bos is not None:
        windows = torch.cat([torch.full((samples, 1), bos, dtype=windows.dtype), windows], 1)
    source = text.description if path is not None else f"bundled: {text.description}"
    return CalibrationSet(windows, text.sha256, source)


def _ids_outside(windows: torch.Tensor, vocab: int | None) -> bool:
    """Whether any token id falls outside 0 ... vocab - 1 (no upper bound without one)."""
    return bool(windows.min() < 0 or (vocab is not None and windows.max() >= vocab))


def token_windows(path: str | Path, vocab: int | None, samples: int,
                  seqlen: int) -> CalibrationSet:
    """The first `samples` windows of a safetensors file holding token ids as `windows`
    (int64, [n, seqlen]), used verbatim: the same windows another tool, run or machine
    calibrated on (no seed applies)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        windows = load_file(path).get("windows")
    except (OSError, SafetensorError) as e:
        raise CompressError(f"cannot read token windows from {path} ({first_line(e)})") \
            from None
    if windows is None or windows.dtype != torch.int64 or windows.dim() != 2:
        raise CompressError(f"{path} holds no int64 [n, seqlen] tensor named 'windows' "
                            "(token ids; save one with safetensors.torch.save_file)")
    n, length = windows.shape
    if length != seqlen:
        raise CompressError(f"{path} holds windows of {length} tokens; pass "
                            f"--calib-seqlen {length}")
    if samples > n:
        raise CompressError(f"{path} holds {n} windows, fewer than the {samples} asked; "
                            f"pass --calib-samples {n} or fewer")
    windows = windows[:samples].contiguous()
    if _ids_outside(windows, vocab):
        limit = f" (0 ... {vocab - 1})" if vocab is not None else ""
        raise CompressError(f"{path} holds token ids outside this tokenizer's vocabulary"
                            f"{limit}: windows of another model's tokenizer?")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return CalibrationSet(windows, digest, f"{path} (token windows)")


@dataclass(frozen=True)
class EvalWindows:
    """Windows of held-out tokens and which of their positions are scored.

    tokens (N, ctx); window i scores the tokens at positions first_target[i] .. ctx-1,
    each predicted from the positions before it in that window."""

    tokens: torch.Tensor
    first_target: torch.Tensor
    stride: int | None = None  # None: non-overlapping windows

    @property
    def ctx(self) -> int:
        return self.tokens.shape[1]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def scored(self) -> int:
        return int((self.ctx - self.first_target).sum())


def eval_windows(tokens: torch.Tensor, ctx: int, max_tokens: int | None,
                 bos_id: int | None = None, stride: int | None = None) -> EvalWindows:
    """Windows of `ctx` tokens from the start of the text.

    Non-overlapping by default, every token after a window's first scored. With
    `stride` < the text tokens per window, windows start every `stride` text tokens and,
    after the first, score only their last `stride` tokens: each text token is scored
    once, with at least ctx - stride tokens of context. With `bos_id`, every window
    starts with BOS followed by ctx-1 text tokens (models such as Gemma are out of
    distribution without it). `max_tokens` caps the text tokens the windows cover
    (non-overlapping: N * ctx); None or 0 uses every full window.
    """
    if ctx < 2:
        raise CompressError(f"context length must be at least 2 tokens, got {ctx}")
    step = ctx - 1 if bos_id is not None else ctx
    if stride is not None and not stride >= 1:
        raise CompressError(f"stride must be at least 1 token, got {stride}")
    if stride is None or stride >= step:
        n = tokens.numel() // step
        if max_tokens:
            n = min(n, max(1, max_tokens // ctx))
        if n == 0:
            raise CompressError(f"the text has {tokens.numel()} tokens, fewer than one "
                                f"{ctx}-token window")
        windows = tokens[: n * step].view(n, step)
        first = torch.ones(n, dtype=torch.long)
        stride = None
    else:
        if tokens.numel() < step:
            raise CompressError(f"the text has {tokens.numel()} tokens, fewer than one "
                                f"{ctx}-token window")
        n = (tokens.numel() - step) // stride + 1
        if max_tokens:
            n = min(n, max(1, (max_tokens - step) // stride + 1))
        windows = tokens.unfold(0, step, stride)[:n]
        first = torch.full((n,), ctx - stride, dtype=torch.long)
        first[0] = 1
    if bos_id is not None:
        windows = torch.cat([torch.full((n, 1), bos_id, dtype=windows.dtype), windows], dim=1)
    return EvalWindows(windows.contiguous(), first, stride)
