"""Where a model argument points: a bundled model, a local directory, or a Hub id; and
what its config.json says, checked without torch (so bad input fails at once)."""

from __future__ import annotations

import json
from pathlib import Path

from compress import assets
from compress.errors import CompressError
from compress.models.arch import Architecture, architecture_for


def resolve(name_or_path: str | Path | None) -> tuple[Path, str]:
    """Directory and display name for a model argument (None: the bundled default)."""
    if name_or_path is None or str(name_or_path) in assets.BUNDLED_MODELS:
        name = assets.DEFAULT_MODEL if name_or_path is None else str(name_or_path)
        return assets.bundled_model_dir(name), name
    path = Path(name_or_path).expanduser()
    from compress import hub  # only when a Hub id is given does the client load

    if not path.exists() and hub.is_repo_id(str(name_or_path)):
        return hub.download(str(name_or_path)), str(name_or_path).split("/")[-1]
    if not path.exists():
        raise CompressError(
            f"model {str(name_or_path)!r} is neither a directory nor a bundled model "
            f"(bundled: {', '.join(assets.BUNDLED_MODELS)})"
        )
    if not path.is_dir():
        raise CompressError(f"{path} is a file; pass the model's directory")
    return path, path.resolve().name


def read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CompressError(f"{path} has no config.json; is it a Hugging Face model directory?")
    try:
        config = json.loads(config_file.read_text())
    except (ValueError, RecursionError) as e:
        raise CompressError(f"{config_file} is not valid JSON ({e}); re-download the model or "
                            "re-quantise it") from None
    if not isinstance(config, dict):
        raise CompressError(f"{config_file} does not hold a JSON object")
    return config


def identify(name_or_path: str | Path | None) -> tuple[Path, str, dict, Architecture]:
    """Directory, display name, config and family of a model argument: what opening it
    checks first (a supported architecture, positive sizes), before any weights."""
    path, name = resolve(name_or_path)
    config = read_config(path)
    arch = architecture_for(config.get("model_type"))
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size"):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CompressError(f"{path / 'config.json'} lacks a positive integer {key!r} (it "
                                f"has {value!r}); re-download the model or re-quantise it")
    return path, name, config, arch
