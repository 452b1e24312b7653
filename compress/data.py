"""Text -> token tensors: held-out evaluation windows and seeded calibration samples."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from compress import assets
from compress.errors import CompressError


def load_tokenizer(path: Path):
    """The model's tokenizer, from local files only (never remote code)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CompressError(f"cannot load a tokenizer from {path} ({str(e).splitlines()[0]}); "
                            "copy the tokenizer files into the model directory") from None


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
    """Tokens of a user text file, or of a bundled text split."""
    if path is None:
        text = assets.bundled_text(split)
        return TokenizedText(tokenize(tokenizer, text.text), text.sha256, text.description)
    path = Path(path)
    if not path.is_file():
        raise CompressError(f"text file {path} does not exist")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CompressError(f"{path} is not UTF-8 text") from None
    import hashlib

    return TokenizedText(tokenize(tokenizer, content),
                         hashlib.sha256(content.encode()).hexdigest(), str(path))


def eval_windows(tokens: torch.Tensor, ctx: int, max_tokens: int | None,
                 bos_id: int | None = None) -> torch.Tensor:
    """Non-overlapping windows (N, ctx) from the start of the text.

    With `bos_id`, every window starts with BOS followed by ctx-1 text tokens (models
    such as Gemma are out of distribution without it). `max_tokens` caps N * ctx;
    None or 0 uses every full window.
    """
    if ctx < 2:
        raise CompressError(f"context length must be at least 2 tokens, got {ctx}")
    step = ctx - 1 if bos_id is not None else ctx
    n = tokens.numel() // step
    if max_tokens:
        n = min(n, max(1, max_tokens // ctx))
    if n == 0:
        raise CompressError(f"the text has {tokens.numel()} tokens, fewer than one "
                            f"{ctx}-token window")
    windows = tokens[: n * step].view(n, step)
    if bos_id is not None:
        windows = torch.cat([torch.full((n, 1), bos_id, dtype=windows.dtype), windows], dim=1)
    return windows
