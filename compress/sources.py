"""Where a model argument points: a bundled model, a local directory, or a Hub id."""

from __future__ import annotations

from pathlib import Path

from compress import assets
from compress.errors import CompressError


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
