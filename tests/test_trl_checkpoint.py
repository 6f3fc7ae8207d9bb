"""``metactl_state.json`` travels with every TRL checkpoint; resuming gives the same choices."""

from __future__ import annotations

import json

import pytest
from metactl.adapters.trl import META_STATE_NAME, MetaGRPOTrainer
from metactl.adapters.trl.testing import (
    addition_dataset,
    digit_count_reward,
    tiny_grpo_config,
    tiny_model_dir,
)

import metactl

pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(output_dir, max_steps: int) -> MetaGRPOTrainer:
    return MetaGRPOTrainer(
        model=str(tiny_model_dir()),
        reward_funcs=digit_count_reward,
        args=tiny_grpo_config(
            output_dir, max_steps=max_steps, save_strategy="steps", save_steps=3, learning_rate=3e-3
        ),
        train_dataset=addition_dataset(64, seed=7),
        meta_policy=metactl.tampo(seed=11),
    )


def test_checkpoint_round_trip_gives_the_same_future_choices(tmp_path):
    full = _trainer(tmp_path / "full", max_steps=6)
    full.train()
    states = {}
    for step in (3, 6):
        path = tmp_path / "full" / f"checkpoint-{step}" / META_STATE_NAME
        states[step] = json.loads(path.read_text())
        assert states[step]["policy"]["step"] == step  # one policy step per generation batch
    assert states[6]["policy"] == full.meta_policy.state_dict()
    assert states[6]["train_temperature"] == full.meta_history[-1]["value"]

    # A fresh trainer (and fresh policy with the same seed) resumed from checkpoint-3.
    resumed = _trainer(tmp_path / "resumed", max_steps=6)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert len(resumed.meta_history) == 3
    assert resumed.meta_history[0]["policy_step"] == 3
    assert [h["value"] for h in resumed.meta_history] == [h["value"] for h in full.meta_history[3:]]
    assert resumed.meta_policy.state_dict() == full.meta_policy.state_dict()

    # Without the restore, the fresh policy would have started from step 0 (uniform).
    fresh = _trainer(tmp_path / "fresh", max_steps=6)
    assert fresh.meta_policy.state_dict() != states[3]["policy"]
