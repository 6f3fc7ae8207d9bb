"""Helpers shared by the core tests."""

from __future__ import annotations

import json

from metactl import MetaPolicy


def snapshot(policy: MetaPolicy) -> str:
    """The policy's whole state as canonical JSON: equal before and after a refused call when the
    call changed nothing."""
    return json.dumps(policy.state_dict(), sort_keys=True)
