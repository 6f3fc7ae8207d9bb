"""Every rank makes the same choice: gathered feedback, the rank-0 check, real gloo collectives."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest

import metactl
from metactl.distributed import assert_same_choice, gather_feedback


def _simulated_ranks(local: list[dict]):
    """all_gather functions for ranks simulated in one process: rank r's call with one of its
    feedback values returns every rank's value under the same name, in rank order."""

    def make(rank: int):
        def all_gather(array: np.ndarray) -> list[np.ndarray]:
            name = next(k for k, v in local[rank].items() if np.array_equal(np.asarray(v), array))
            return [np.asarray(local[r][name], dtype=np.float64) for r in range(len(local))]

        return all_gather

    return [make(r) for r in range(len(local))]


def test_ranks_with_gathered_feedback_choose_identically() -> None:
    rng = np.random.default_rng(0)
    world = 3
    policies = [metactl.tampo(seed=11) for _ in range(world)]
    for _ in range(20):
        decisions = [p.select() for p in policies]
        assert len({d.index for d in decisions}) == 1
        local = [
            {"advantages": rng.normal(size=4), "loglik": rng.normal(-1, 0.3, (4, 10))}
            for _ in range(world)
        ]
        gathers = _simulated_ranks(local)
        for rank, policy in enumerate(policies):
            policy.update(decisions[rank], **gather_feedback(local[rank], gathers[rank]))
    states = [p.state_dict() for p in policies]
    assert states[0] == states[1] == states[2]


def test_gather_feedback_concatenates_and_weights() -> None:
    local = [
        {"advantages": np.array([1.0, -1.0, 0.0]), "reward": 0.9, "vocab_size": 7},
        {"advantages": np.array([2.0]), "reward": 0.1, "vocab_size": 7},
    ]
    out = gather_feedback(local[0], _simulated_ranks(local)[0])
    assert out["advantages"].tolist() == [1.0, -1.0, 0.0, 2.0]
    assert out["reward"] == pytest.approx((3 * 0.9 + 1 * 0.1) / 4)
    assert out["vocab_size"] == 7
    local[1]["vocab_size"] = 8
    with pytest.raises(ValueError, match="vocab_size"):
        gather_feedback(local[0], _simulated_ranks(local)[0])
    with pytest.raises(TypeError, match="logliks"):
        gather_feedback({"logliks": 1}, lambda x: [x])


def test_assert_same_choice_detects_divergence() -> None:
    decision = metactl.tampo(seed=0).select()
    assert_same_choice(decision, lambda i: i)  # rank 0 agrees
    with pytest.raises(RuntimeError, match="ranks disagree"):
        assert_same_choice(decision, lambda i: i + 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import json

    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    all_gather, broadcast = metactl.distributed.torch_collectives()
    policy = metactl.tampo(seed=5)
    rng = np.random.default_rng(100 + rank)  # every rank sees different local data
    chosen = []
    for _ in range(6):
        decision = policy.select()
        assert_same_choice(decision, broadcast)
        chosen.append(decision.value)
        local = {
            "loglik": rng.normal(-1, 0.3, (3 + rank, 10)),
            "advantages": rng.normal(size=3 + rank),
        }
        policy.update(decision, **gather_feedback(local, all_gather))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump({"chosen": chosen, "state": policy.state_dict()}, fh)
    dist.destroy_process_group()


def test_torch_gloo_ranks_agree(tmp_path) -> None:
    torch_mp = pytest.importorskip("torch.multiprocessing")
    import json

    torch_mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    logs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert logs[0] == logs[1]
    assert len(set(logs[0]["chosen"])) >= 1 and logs[0]["state"]["step"] == 6
