"""``metactl_state.json``: the meta-policy state saved into, validated and loaded from every TRL
checkpoint of ``MetaGRPOTrainer`` (:class:`MetaCheckpointMixin`, inherited by the trainer).

On a resume the file is read and validated before TRL loads the model, optimizer or anything
else; a missing or corrupt file is an error naming it, and a rejected state changes nothing.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import tempfile
from typing import TYPE_CHECKING, Any, cast

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

if TYPE_CHECKING:
    from trl import GRPOTrainer as _TrainerBase

    import metactl

    from .knobs import PolicyKnobs
else:
    _TrainerBase = object

__all__ = ["META_STATE_NAME", "MetaCheckpointMixin"]

# the trainer's logger (not this module's): users and tests filter on it
logger = logging.getLogger("metactl.adapters.trl.trainer")

#: File written into every TRL checkpoint directory.
META_STATE_NAME = "metactl_state.json"
_STATE_FORMAT = 1


class MetaCheckpointMixin(_TrainerBase):
    """The checkpoint methods of ``MetaGRPOTrainer`` (they use its ``meta_policy``,
    ``allow_missing_meta_state``, ``_meta_*`` state and ``set_sampling``)."""

    if TYPE_CHECKING:  # set and defined by MetaGRPOTrainer (see its __init__)
        meta_policy: metactl.MetaPolicy
        meta_knobs: PolicyKnobs
        likelihood: str
        eval_temperature: float
        allow_missing_meta_state: bool
        _meta_train_setting: dict[str, Any] | None
        _meta_pending: tuple[str, dict[str, Any] | None] | None

        def set_sampling(self, setting: dict[str, Any]) -> None: ...

    def meta_state_dict(self) -> dict[str, Any]:
        """What ``metactl_state.json`` holds: the policy state and the current sampler setting
        (``train_setting``, ``{knob: value}``; ``train_temperature`` repeats its temperature for
        a temperature policy)."""
        setting = self._meta_train_setting
        temperature_only = self.meta_knobs.knobs == ("temperature",)
        return {
            "format": _STATE_FORMAT,
            "policy": self.meta_policy.state_dict(),
            "train_temperature": (
                setting["temperature"] if setting is not None and temperature_only else None
            ),
            "train_setting": None if setting is None else dict(setting),
            "eval_temperature": self.eval_temperature,
            "likelihood": self.likelihood,
        }

    def load_meta_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`meta_state_dict` (the policy continues bit-identically).

        The policy state and the sampler setting are both validated before either is applied:
        a rejected state (``ValueError``/``TypeError``) changes nothing.
        """
        policy_state, setting = self._check_meta_state(state)
        self.meta_policy.load_state_dict(policy_state)  # validated above: cannot fail now
        if setting is not None:
            self._meta_train_setting = setting
            self.set_sampling(setting)

    def _check_setting(self, setting: Any, name: str) -> dict[str, Any]:
        """A saved sampler setting: the policy's knobs, each inside its candidates' range."""
        if not isinstance(setting, dict):
            raise TypeError(f"{name} must be an object or null, got {type(setting).__name__}")
        knobs = self.meta_knobs
        if set(setting) != set(knobs.knobs):
            raise ValueError(f"{name} sets {sorted(setting)}, the policy sets {list(knobs.knobs)}")
        for knob, value in setting.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name}[{knob!r}] must be a number, got {type(value).__name__}")
            values = [float(s[knob]) for s in knobs.settings]
            low, high = min(values), max(values)
            if not (math.isfinite(value) and low <= value <= high):
                raise ValueError(
                    f"{name}[{knob!r}] must be a finite {knob} inside the candidate range "
                    f"[{low}, {high}], got {value!r}"
                )
        return knobs.setting(setting)

    def _check_meta_state(self, state: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Validate a :meth:`meta_state_dict` without applying it."""
        if not isinstance(state, dict):
            raise TypeError(f"a {META_STATE_NAME} holds a JSON object, got {type(state).__name__}")
        if state.get("format") != _STATE_FORMAT or isinstance(state.get("format"), bool):
            raise ValueError(
                f"format is {state.get('format')!r}; this metactl reads format {_STATE_FORMAT}"
            )
        if "policy" not in state:
            raise ValueError("the 'policy' entry is missing")
        temperature = state.get("train_temperature")
        setting: dict[str, Any] | None = None
        if temperature is not None:
            if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
                raise TypeError(
                    f"train_temperature must be a number or null, got {type(temperature).__name__}"
                )
            if self.meta_knobs.knobs != ("temperature",):
                raise ValueError(
                    f"train_temperature is {temperature!r}, but the policy sets "
                    f"{list(self.meta_knobs.knobs)} (its setting is train_setting)"
                )
            setting = self._check_setting({"temperature": temperature}, "train_temperature")
        saved = state.get("train_setting")
        if saved is not None:
            checked = self._check_setting(saved, "train_setting")
            if setting is not None and checked != setting:
                raise ValueError(
                    f"train_setting {saved!r} disagrees with train_temperature {temperature!r}"
                )
            setting = checked
        # the policy's own load validates everything before assigning; run it on a copy so
        # that nothing is applied until the setting has passed as well
        copy.deepcopy(self.meta_policy).load_state_dict(state["policy"])
        return state["policy"], setting

    def _read_meta_state(self, checkpoint: str) -> dict[str, Any] | None:
        """Read and validate ``<checkpoint>/metactl_state.json``: one ``ValueError`` naming the
        file for any corruption; None when it is missing and ``allow_missing_meta_state``."""
        path = os.path.join(checkpoint, META_STATE_NAME)
        if not os.path.exists(path):
            if self.allow_missing_meta_state:
                logger.warning(
                    "metactl: %s has no %s; the meta-policy keeps its current state "
                    "(allow_missing_meta_state=True)",
                    checkpoint,
                    META_STATE_NAME,
                )
                return None
            raise FileNotFoundError(
                f"{path} is missing: the checkpoint has no meta-policy state, so resuming would "
                "restart the meta-policy while the model resumes. Resume from a checkpoint "
                "written by MetaGRPOTrainer, or pass allow_missing_meta_state=True to continue "
                "with the meta-policy's current state"
            )
        try:
            with open(path, "rb") as f:
                state = json.loads(f.read().decode("utf-8"))
            self._check_meta_state(state)
        except (UnicodeDecodeError, json.JSONDecodeError, ValueError, TypeError) as exc:
            raise ValueError(
                f"{path} is corrupt or not a {META_STATE_NAME} of this run ({exc}); nothing "
                "was loaded. Resume from another checkpoint (or restore this file)"
            ) from exc
        return cast(dict[str, Any], state)

    def train(
        self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        """``GRPOTrainer.train``; on a resume, ``metactl_state.json`` is read and validated
        before TRL loads the model, optimizer or anything else from the checkpoint."""
        checkpoint: Any = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)  # None: TRL raises below
        self._meta_pending = None
        if isinstance(checkpoint, (str, os.PathLike)):
            folder = os.fspath(checkpoint)
            self._meta_pending = (folder, self._read_meta_state(folder))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        out_dir = os.path.join(self._get_output_dir(trial=trial), folder)
        os.makedirs(out_dir, exist_ok=True)
        # a unique temporary name in the same folder, then an atomic rename into place
        fd, tmp = tempfile.mkstemp(prefix=META_STATE_NAME + ".", suffix=".tmp", dir=out_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.meta_state_dict(), f, allow_nan=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(out_dir, META_STATE_NAME))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        pending, self._meta_pending = self._meta_pending, None
        if pending is not None and os.path.realpath(pending[0]) == os.path.realpath(checkpoint):
            state = pending[1]  # read and validated by train() before anything was loaded
        else:
            state = self._read_meta_state(checkpoint)
        if state is not None:
            self.load_meta_state_dict(state)
