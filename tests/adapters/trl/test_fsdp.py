"""FSDP across two CPU processes (``accelerate launch --use_fsdp``, FSDP2 on gloo).

The test launches this very file as the worker script. Each rank trains the tiny local model
with TAMPO, parameters fully sharded over the two ranks, on its own share of the prompts, with a
buffered window and a reference model (``steps_per_generation=2``, ``num_iterations=2``,
``beta=0.1``: TRL makes an old-logprob pass, whose hidden states the fast path captures). Every
rank logs, per generation batch: the chosen value, the policy state after the update, the largest
difference between the fast candidate likelihoods (hidden states times the *gathered* LM-head
shard) and the exact ones (an extra sharded forward), and, for every log-prob pass TRL made, the
error of its numbers against ``log_softmax(logits / T)`` of a plain sharded forward at the
temperature in force. The ranks must agree on every choice and state although their local
feedback differs.

DeepSpeed ZeRO is not tested: see docs/trl.md (``deepspeed`` is not installed by any
extra, and its CPU accelerator needs a C++ build of its ops at first use).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

NUM_STEPS = 8  # 2 generation batches of 4 optimisation steps


def _worker(out_dir: str, model_path: str) -> None:
    import torch
    from metactl.adapters.trl import MetaGRPOTrainer
    from metactl.adapters.trl.testing import addition_dataset, digit_count_reward, tiny_grpo_config

    import metactl

    torch.set_num_threads(1)
    _allow_fsdp_on_cpu()

    class ShardedSpy(MetaGRPOTrainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.records: list[dict[str, Any]] = []
            self.passes: list[tuple[str, float, float, float]] = []
            self.fast_vs_exact: list[tuple[str | None, float]] = []

        def _get_per_token_logps_and_entropies(  # type: ignore[no-untyped-def]
            self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
        ):
            out = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
            kind = "current" if torch.is_grad_enabled() else "old"
            if model is not self.model:
                kind = "ref"
            with torch.no_grad():  # a plain forward of the same sharded model, on both ranks
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            logits = logits[:, -(logits_to_keep + 1) : -1].float()
            tokens = input_ids[:, -logits_to_keep:]
            mask = attention_mask[:, -logits_to_keep:].bool()

            def err(t: float) -> float:
                logp = torch.log_softmax(logits / t, -1).gather(-1, tokens[..., None])[..., 0]
                return float((logp - out[0].detach()).abs()[mask].max())

            self.passes.append(
                (kind, self.temperature, err(self.temperature), err(self.temperature * 1.2))
            )
            return out

        def _score(self, decision, output, capture, path):  # type: ignore[no-untyped-def]
            result, used = super()._score(decision, output, capture, path)
            exact, _ = super()._score(decision, output, None, "exact")
            self.fast_vs_exact.append((used, float((result.loglik - exact.loglik).abs().max())))
            return result, used

        def _update_policy(self, decision, output, capture, path):  # type: ignore[no-untyped-def]
            result = super()._update_policy(decision, output, capture, path)
            self.records.append(
                {
                    "value": decision.value,
                    "state": self.meta_policy.state_dict(),
                    "local_advantages": output["advantages"].tolist(),
                }
            )
            return result

    trainer = ShardedSpy(
        model=model_path,
        reward_funcs=digit_count_reward,
        args=tiny_grpo_config(
            Path(out_dir) / "run",
            max_steps=NUM_STEPS,
            seed=0,
            per_device_train_batch_size=4,
            steps_per_generation=2,
            num_iterations=2,
            beta=0.1,
        ),
        train_dataset=addition_dataset(64, seed=5),
        meta_policy=metactl.tampo(seed=0),
    )
    trainer.train()
    accelerator = trainer.accelerator
    lm_head = trainer.model.get_output_embeddings()
    log = {
        "rank": accelerator.process_index,
        "world_size": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "fsdp_version": 2 if getattr(accelerator, "is_fsdp2", False) else 1,
        "head_is_sharded": type(lm_head.weight).__name__ == "DTensor",
        "records": trainer.records,
        "history": trainer.meta_history,
        "passes": trainer.passes,
        "fast_vs_exact": trainer.fast_vs_exact,
    }
    (Path(out_dir) / f"rank{accelerator.process_index}.json").write_text(json.dumps(log))
    # Leave without C++ static destructors: torch 2.13's undestroyed gloo group sometimes aborts
    # the rank at interpreter exit (see tests/adapters/trl/test_distributed.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _allow_fsdp_on_cpu() -> None:
    """Let accelerate shard on CPU processes: its ``AcceleratorState`` turns ``--use_fsdp`` into
    ``DistributedType.FSDP`` only for accelerator devices (``MULTI_GPU``, ``MULTI_XPU``, ...,
    accelerate 1.15 ``state.py``) and leaves ``MULTI_CPU`` runs unsharded. This applies the same
    two assignments accelerate makes there; the sharding itself is accelerate's and torch's own
    FSDP2 (``fully_shard`` over a gloo CPU mesh)."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        # every AcceleratorState() re-copies PartialState's MULTI_CPU: re-apply it each time
        plugin = fsdp_plugin if fsdp_plugin is not None else self.__dict__.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin

    AcceleratorState.__init__ = init  # type: ignore[method-assign]


def test_fsdp_two_processes_agree_and_score_at_the_sampling_temperature(tmp_path):
    from metactl.adapters.trl.testing import launch_two_processes, tiny_model_dir

    model_path = str(tiny_model_dir())  # built once here, read by both ranks
    fsdp = [
        "--use_fsdp", "--fsdp_version", "2", "--fsdp_reshard_after_forward", "true",
        "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
        "--fsdp_transformer_layer_cls_to_wrap", "Qwen2DecoderLayer",
        "--fsdp_state_dict_type", "SHARDED_STATE_DICT",
    ]  # fmt: skip
    proc = launch_two_processes(__file__, ["--worker", str(tmp_path), model_path], fsdp, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    logs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for log in logs:
        assert log["world_size"] == 2
        assert log["distributed_type"].endswith("FSDP"), log["distributed_type"]
        assert log["fsdp_version"] == 2
        assert log["head_is_sharded"], "the LM head's parameters should be DTensor shards"
    rec0, rec1 = logs[0]["records"], logs[1]["records"]
    assert len(rec0) == len(rec1) == NUM_STEPS // 4
    assert [r["value"] for r in rec0] == [r["value"] for r in rec1]
    assert [r["state"] for r in rec0] == [r["state"] for r in rec1]
    assert logs[0]["history"] == logs[1]["history"]
    assert any(
        a["local_advantages"] != b["local_advantages"] for a, b in zip(rec0, rec1, strict=True)
    )
    values = [r["value"] for r in rec0]
    for log in logs:
        # the fast path with sharded parameters equals the exact path
        assert [used for used, _ in log["fast_vs_exact"]] == ["old"] * len(values)
        assert all(diff < 1e-5 for _, diff in log["fast_vs_exact"]), log["fast_vs_exact"]
        # every log-prob pass at the temperature that sampled its window (and not 20% off)
        window = iter(values)
        current = None
        kinds: dict[str, int] = {}
        for kind, temperature, at_value, off_value in log["passes"]:
            kinds[kind] = kinds.get(kind, 0) + 1
            if kind == "old":
                current = next(window)
            assert temperature == current, (kind, temperature, current)
            assert at_value < 1e-4 and off_value > 1e-3, (kind, at_value, off_value)
        assert kinds == {"old": 2, "ref": 2, "current": NUM_STEPS}


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"usage: {sys.argv[0]} --worker OUT_DIR MODEL_PATH")
