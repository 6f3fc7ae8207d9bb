"""``metactl_state.json`` travels with every TRL checkpoint; resuming gives the same choices."""

from __future__ import annotations

import json
import logging
import re
import shutil

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
    # the history saved at step 3 comes back, then the 3 batches the resumed run made
    assert len(resumed.meta_history) == 6
    assert resumed.meta_history[:3] == states[3]["history"] == full.meta_history[:3]
    assert resumed.meta_history[3]["policy_step"] == 3
    new = resumed.meta_history[3:]
    assert [h["value"] for h in new] == [h["value"] for h in full.meta_history[3:]]
    assert resumed.meta_policy.state_dict() == full.meta_policy.state_dict()

    # Without the restore, the fresh policy would have started from step 0 (uniform).
    fresh = _trainer(tmp_path / "fresh", max_steps=6)
    assert fresh.meta_policy.state_dict() != states[3]["policy"]


# ------------------------------------------------------------------ corrupt or missing files


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory, one_thread):
    """A real checkpoint written by the trainer (policy at step 3)."""
    out = tmp_path_factory.mktemp("trl_saved")
    trainer = _trainer(out / "run", max_steps=3)
    trainer.train()
    folder = out / "run" / "checkpoint-3"
    assert not list(folder.glob("*.tmp"))  # written under a temporary name, renamed into place
    json.loads((folder / META_STATE_NAME).read_text(), parse_constant=_no_constants)
    return folder


@pytest.fixture(scope="module")
def fresh_trainer(tmp_path_factory, one_thread):
    return _trainer(tmp_path_factory.mktemp("trl_fresh") / "run", max_steps=6)


def _no_constants(name: str) -> None:
    raise AssertionError(f"{META_STATE_NAME} holds {name}")


def _replace_in_json(**changes):
    def corrupt(data: bytes) -> bytes:
        state = json.loads(data)
        for key, value in changes.items():
            if value is _DELETE:
                del state[key]
            else:
                state[key] = value
        return json.dumps(state).encode()

    return corrupt


_DELETE = object()


def _garble_policy(data: bytes) -> bytes:
    state = json.loads(data)
    state["policy"]["rule_state"]["ema"][2] = "garbled"
    return json.dumps(state).encode()


CORRUPTIONS = {
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "non-utf8": lambda data: data[:40] + b"\xff\xfe\xfa" + data[43:],
    "no-policy": _replace_in_json(policy=_DELETE),
    "nan-temperature": _replace_in_json(train_temperature=float("nan")),
    "negative-temperature": _replace_in_json(train_temperature=-1.0),
    "temperature-off-grid": _replace_in_json(train_temperature=40.0),
    "string-temperature": _replace_in_json(train_temperature="hot"),
    "setting-off-grid": _replace_in_json(train_setting={"temperature": 40.0}),
    # inside the candidates' range, but TAMPO samples only at its candidates
    "setting-between-candidates": _replace_in_json(
        train_temperature=0.85, train_setting={"temperature": 0.85}
    ),
    "history-not-a-list": _replace_in_json(history={"policy_step": 0}),
    "setting-wrong-knob": _replace_in_json(train_setting={"top_p": 0.9}),
    "bad-format": _replace_in_json(format=2),
    "garbled-policy": _garble_policy,
    "not-an-object": lambda data: b"[1, 2, 3]",
}


def _model_fingerprint(trainer) -> list[float]:
    return [float(p.detach().double().sum()) for p in trainer.model.parameters()]


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_corrupt_meta_state_is_one_clear_error_before_anything_loads(
    case, saved_checkpoint, fresh_trainer, tmp_path
):
    folder = tmp_path / "checkpoint-3"
    shutil.copytree(saved_checkpoint, folder)
    path = folder / META_STATE_NAME
    path.write_bytes(CORRUPTIONS[case](path.read_bytes()))
    policy_before = fresh_trainer.meta_policy.state_dict()
    model_before = _model_fingerprint(fresh_trainer)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        fresh_trainer.train(resume_from_checkpoint=str(folder))
    # nothing was loaded: neither the policy (no partial load) nor the model
    assert fresh_trainer.meta_policy.state_dict() == policy_before
    assert fresh_trainer.meta_policy.step == 0
    assert _model_fingerprint(fresh_trainer) == model_before
    assert fresh_trainer.state.global_step == 0


def test_load_meta_state_dict_validates_policy_and_temperature_together(
    saved_checkpoint, fresh_trainer
):
    state = json.loads((saved_checkpoint / META_STATE_NAME).read_text())
    before = fresh_trainer.meta_policy.state_dict()
    with pytest.raises(ValueError, match="train_temperature"):
        fresh_trainer.load_meta_state_dict({**state, "train_temperature": float("nan")})
    assert fresh_trainer.meta_policy.state_dict() == before  # the valid policy was not applied


def test_a_missing_meta_state_on_resume_is_an_error_unless_allowed(
    saved_checkpoint, fresh_trainer, tmp_path, caplog
):
    folder = tmp_path / "checkpoint-3"
    shutil.copytree(saved_checkpoint, folder)
    (folder / META_STATE_NAME).unlink()
    model_before = _model_fingerprint(fresh_trainer)
    with pytest.raises(FileNotFoundError, match="allow_missing_meta_state"):
        fresh_trainer.train(resume_from_checkpoint=str(folder))
    assert _model_fingerprint(fresh_trainer) == model_before

    allowing = MetaGRPOTrainer(
        model=str(tiny_model_dir()),
        reward_funcs=digit_count_reward,
        args=tiny_grpo_config(tmp_path / "allowing", max_steps=3, save_strategy="no"),
        train_dataset=addition_dataset(64, seed=7),
        meta_policy=metactl.tampo(seed=11),
        allow_missing_meta_state=True,
    )
    with caplog.at_level(logging.WARNING, logger="metactl.adapters.trl.trainer"):
        allowing.train(resume_from_checkpoint=str(folder))  # the model resumes at step 3
    assert allowing.state.global_step >= 3  # the model and trainer state resumed
    # the meta-policy kept its own (fresh) state, as asked: its first batch was at step 0
    assert [h["policy_step"] for h in allowing.meta_history] == list(
        range(len(allowing.meta_history))
    )
    assert META_STATE_NAME in caplog.text
    with pytest.raises(TypeError, match="allow_missing_meta_state"):
        MetaGRPOTrainer(model=str(tiny_model_dir()), allow_missing_meta_state="yes")


def test_resume_from_the_last_checkpoint_checks_its_meta_state_too(saved_checkpoint, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(saved_checkpoint, out / "checkpoint-3")
    path = out / "checkpoint-3" / META_STATE_NAME
    path.write_bytes(path.read_bytes()[:-7])  # truncated
    trainer = _trainer(out, max_steps=6)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.meta_policy.step == 0 and trainer.state.global_step == 0


# ------------------------------------------------------------------ the saved window's setting


def _top_p_trainer(tmp_path, policy) -> MetaGRPOTrainer:
    return MetaGRPOTrainer(
        model=str(tiny_model_dir()), reward_funcs=digit_count_reward,
        args=tiny_grpo_config(tmp_path), train_dataset=addition_dataset(16), meta_policy=policy,
    )  # fmt: skip


def test_a_saved_setting_the_policy_cannot_have_chosen_is_refused(tmp_path):
    grid = metactl.MetaPolicy([0.8, 0.9, 1.0], metactl.TAMPO(), seed=0, hyperparameter="top_p")
    trainer = _top_p_trainer(tmp_path, grid)
    state = trainer.meta_state_dict()
    policy_before, top_p_before = grid.state_dict(), trainer.knob_values("top_p")
    for off_grid in ({"top_p": 0.85}, {"top_p": 0.95}):
        with pytest.raises(ValueError, match=r"^train_setting \{'top_p': 0\.\d+\} is not a "
                                             r"setting the policy can choose: TAMPO samples only "
                                             r"at its candidates"):  # fmt: skip
            trainer.load_meta_state_dict({**state, "train_setting": off_grid})
    with pytest.raises(ValueError, match=r"train_setting sets \['temperature'\], the policy "
                                         r"sets \['top_p'\]"):  # fmt: skip
        trainer.load_meta_state_dict({**state, "train_setting": {"temperature": 0.9}})
    assert grid.state_dict() == policy_before  # a rejected state changes nothing
    assert trainer.knob_values("top_p") == top_p_before
    trainer.load_meta_state_dict({**state, "train_setting": {"top_p": 0.9}})
    assert set(trainer.knob_values("top_p").values()) == {0.9}


def test_a_rule_between_its_candidates_restores_its_own_value(tmp_path):
    schedule = metactl.MetaPolicy([0.6, 1.5], metactl.Schedule("linear", 0.6, 1.5, total_steps=3))
    trainer = _top_p_trainer(tmp_path, schedule)
    trainer.load_meta_state_dict({**trainer.meta_state_dict(), "train_temperature": 1.05})
    assert set(trainer.temperatures().values()) == {1.05}
    with pytest.raises(ValueError, match=r"candidate range \[0\.6, 1\.5\]"):
        trainer.load_meta_state_dict({**trainer.meta_state_dict(), "train_temperature": 1.6})


# ------------------------------------------------------------------ the history


def _bounded(output_dir, max_steps: int, size: int = 2) -> MetaGRPOTrainer:
    return MetaGRPOTrainer(
        model=str(tiny_model_dir()), reward_funcs=digit_count_reward,
        args=tiny_grpo_config(output_dir, max_steps=max_steps, save_strategy="steps",
                              save_steps=3, learning_rate=3e-3),
        train_dataset=addition_dataset(64, seed=7), meta_policy=metactl.tampo(seed=11),
        meta_history_size=size,
    )  # fmt: skip


def test_meta_history_is_bounded_and_travels_with_the_checkpoint(tmp_path):
    full = _bounded(tmp_path / "full", max_steps=4)
    full.train()
    assert [h["policy_step"] for h in full.meta_history] == [2, 3]  # the oldest were dropped
    saved = json.loads((tmp_path / "full" / "checkpoint-3" / META_STATE_NAME).read_text())
    assert [h["policy_step"] for h in saved["history"]] == [1, 2]
    # a resume holds what was held when the checkpoint was saved, then goes on
    resumed = _bounded(tmp_path / "resumed", max_steps=4)
    held: list[list[dict]] = []
    original_load = resumed._load_optimizer_and_scheduler

    def load_then_look(checkpoint) -> None:  # the meta state is restored in this call
        original_load(checkpoint)
        held.append([dict(h) for h in resumed.meta_history])

    resumed._load_optimizer_and_scheduler = load_then_look  # type: ignore[method-assign]
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert held == [saved["history"]]
    assert resumed.meta_history == full.meta_history
    # a smaller bound keeps the newest saved entries
    smaller = _bounded(tmp_path / "smaller", max_steps=3, size=1)
    smaller.load_meta_state_dict(saved)
    assert smaller.meta_history == saved["history"][-1:]


@pytest.mark.parametrize(("size", "error"), [(-1, ValueError), (2.0, TypeError), (True, TypeError)])
def test_meta_history_size_is_checked(size, error):
    with pytest.raises(error, match="meta_history_size"):
        MetaGRPOTrainer(model=str(tiny_model_dir()), meta_history_size=size)
