"""The fields of compress_manifest.json that we read back, checked in one place.

The manifest is the one file no hash protects (it holds the others' hashes), and its
readers (verify, the model card, `compress eval`'s baseline, the report's cache, hub push)
index into it freely. So the structure they rely on is checked when it is read, and
anything else is one clean error instead of a KeyError in whichever reader came first.
Fields nobody reads (`created`) are not checked, and `schemes` may be absent (older
manifests lack it): an old or hand-edited manifest stays readable where it does no harm.
"""

from __future__ import annotations

from compress.errors import CompressError
from compress.recipe import Recipe

FORMAT = "compress-checkpoint"
FORMAT_VERSION = 1  # the newest layout this library reads and writes
# base_model and calibration: the keys their readers index, all strings or all integers
_BASE_STRINGS = ("name", "path", "config_sha256")
_CALIBRATION_STRINGS = ("source", "tokens_sha256", "text_sha256")
_CALIBRATION_INTS = ("samples", "seqlen")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check(manifest: object, where: str) -> dict:
    """`manifest` (parsed JSON) if it has the structure readers rely on, with its recipe in
    the expanded form `Recipe.to_dict` gives; else a CompressError naming `where`."""
    problem = _files_problem(manifest) or _header_problem(manifest)
    if problem is None:
        version = manifest["format_version"]
        if version > FORMAT_VERSION:  # a layout we cannot know: upgrading is the fix
            raise CompressError(f"{where} has format_version {version}, newer than this "
                                f"compress reads ({FORMAT_VERSION}); upgrade compress "
                                "(pip install -U compress)")
        problem = (_base_problem(manifest.get("base_model"))
                   or _calibration_problem(manifest.get("calibration"))
                   or _schemes_problem(manifest.get("schemes")))
    if problem is None:
        recipe, problem = _recipe(manifest.get("recipe"))
        manifest = {**manifest, "recipe": recipe}
    if problem is not None:
        raise CompressError(f"{where} is malformed ({problem}); the checkpoint is corrupt: "
                            "re-run compress quantize")
    return manifest


def _recipe(raw: object) -> tuple[dict | None, str | None]:
    """The recipe expanded (`Recipe.to_dict`: every section the model card reads is there),
    or why it is not one. The method and the scheme's bits and group size must be stated:
    filled in from defaults, they would describe another checkpoint."""
    try:
        recipe = Recipe.from_dict(raw, "recipe").to_dict()
    except CompressError as e:
        return None, str(e)
    scheme = raw.get("scheme")
    if "method" not in raw or not isinstance(scheme, dict) or not {"bits", "group_size"} <= set(
            scheme):
        return None, "recipe lacks its method, or its scheme's bits or group_size"
    return recipe, None


def _files_problem(manifest: object) -> str | None:
    """{"files": {name: {"bytes": int, "sha256": str}}}: what `verify` walks."""
    if not isinstance(manifest, dict):
        return "not a JSON object"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return "'files' is not a mapping of file name to size and sha256"
    for name, entry in files.items():
        size = entry.get("bytes") if isinstance(entry, dict) else None
        if not _is_int(size) or not isinstance(entry.get("sha256"), str):
            return f"the entry of {name!r} lacks an integer 'bytes' or a string 'sha256'"
    return None


def _header_problem(manifest: dict) -> str | None:
    if manifest.get("format") != FORMAT:
        return f"'format' is {manifest.get('format')!r:.60}, not {FORMAT!r}"
    version = manifest.get("format_version")
    if not _is_int(version) or version < 1:
        return f"'format_version' is {version!r:.60}, not a positive integer"
    library = manifest.get("library")
    if not isinstance(library, dict) or not isinstance(library.get("compress"), str):
        return "'library' lacks the compress version string"
    return None


def _base_problem(base: object) -> str | None:
    if base is None:  # a checkpoint without a recorded base model: nothing to compare to
        return None
    if not isinstance(base, dict) or not all(isinstance(base.get(k), str)
                                             for k in _BASE_STRINGS):
        return f"'base_model' lacks string {', '.join(_BASE_STRINGS)}"
    source = base.get("source")
    if source is not None and not (isinstance(source, dict) and isinstance(
            source.get("license"), str | None)):
        return "'base_model.source' is not a mapping with a string license"
    return None


def _calibration_problem(calibration: object) -> str | None:
    if calibration is None:  # round-to-nearest: no data
        return None
    if (not isinstance(calibration, dict)
            or not all(isinstance(calibration.get(k), str) for k in _CALIBRATION_STRINGS)
            or not all(_is_int(calibration.get(k)) for k in _CALIBRATION_INTS)):
        return ("'calibration' lacks string " + ", ".join(_CALIBRATION_STRINGS)
                + " or integer " + ", ".join(_CALIBRATION_INTS))
    return None


def _schemes_problem(schemes: object) -> str | None:
    """{"w4g128-sym": [module, ...]}: what the model card counts."""
    if schemes is None:  # written before the manifest recorded them
        return None
    if not isinstance(schemes, dict) or not all(
            isinstance(modules, list) and all(isinstance(m, str) for m in modules)
            for modules in schemes.values()):
        return "'schemes' is not a mapping of scheme label to a list of module names"
    return None
