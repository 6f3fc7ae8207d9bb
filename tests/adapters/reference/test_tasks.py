"""Reference adapter: tokenizer, task generators, verifiers, controllers, configs (fast)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import itertools

from metactl.adapters.char_tokenizer import build_char_tokenizer
from metactl.adapters.lab.controllers import PAPER_ARMS, make_policy
from metactl.adapters.reference.evaluate import pass_at_k
from metactl.adapters.reference.tasks import (
    ALPHABET,
    HELDOUT_PER_BENCHMARK,
    ChainTask,
    chain_reward,
    heldout_prompts,
)
from metactl.adapters.reference.trainer import (
    GRPOConfig,
    cosine_with_floor,
    group_advantages,
)


def test_char_tokenizer_round_trip_and_special_ids(tmp_path):
    tok = build_char_tokenizer(ALPHABET)
    text = "3+5*8-6......="
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    assert tok.decode([*ids, tok.eos_token_id], skip_special_tokens=True) == text
    assert tok.padding_side == "left"
    batch = tok(["1+2", "3"], padding=True, add_special_tokens=False)
    assert batch.input_ids[1][:2] == [0, 0] and batch.attention_mask[1] == [0, 0, 1]
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False).input_ids == ids


def test_char_tokenizer_rejects_bad_alphabets():
    with pytest.raises(ValueError, match="repeated"):
        build_char_tokenizer("aa")
    with pytest.raises(ValueError, match="non-empty"):
        build_char_tokenizer("")


def test_chain_problem_format_and_solution():
    task = ChainTask()
    p = task.make_problem([3, 5, 8, 6], ["+", "*", "-"])
    assert p.prompt == "3+5*8-6......=" and len(p.prompt) == task.width
    assert p.answer == "8" and task.solution(p) == "3,8,4,8"
    assert chain_reward(task.solution(p), p.answer) == 1.0


def test_sampler_lengths_are_uniform_and_exclusion_holds():
    task = ChainTask()
    rng = np.random.default_rng(0)
    held = heldout_prompts(task)
    assert len(held) == HELDOUT_PER_BENCHMARK * len(task.benchmark_lengths)
    small = ChainTask(ops=("+",), max_len=2, benchmark_lengths=(1, 2))
    assert heldout_prompts(small) >= {p.prompt for p in small.benchmark(1, 25)}
    ps = task.sample(rng, 3000, exclude=held)
    lengths = np.bincount([p.length for p in ps], minlength=task.max_len + 1)[1:]
    assert lengths.min() > 350  # 500 expected per length
    assert not any(p.prompt in held for p in ps)
    assert all(len(p.prompt) == task.width for p in ps)


def test_traps_make_the_teacher_biased_at_the_expected_rate():
    task = ChainTask(trap_fraction=0.25, trap_bias=0.9)
    assert len(task.traps) == 75  # 25% of 3 ops x 100 facts
    assert all(w != task.make_problem([x, b], [op]).answer and 0 <= w <= 9
               for (op, x, b), w in task.traps.items())
    (op, x, b), wrong = next(iter(task.traps.items()))
    p = task.make_problem([x, b], [op])
    rng = np.random.default_rng(1)
    demos = [task.demonstration(p, rng) for _ in range(2000)]
    frac_wrong = np.mean([d == f"{x},{wrong}" for d in demos])
    assert 0.87 < frac_wrong < 0.93
    assert all(d in (f"{x},{wrong}", task.solution(p)) for d in demos)
    # a trap-free problem is always demonstrated correctly
    free = next(q for q in task.sample(rng, 200) if task.n_traps(q) == 0)
    assert all(task.demonstration(free, rng) == task.solution(free) for _ in range(50))


def test_trap_share_sets_the_greedy_ceiling_of_a_biased_model():
    # the expected greedy accuracy of a model that copies the teacher's mode is the share of
    # trap-free problems; it must be inside the 10-60% window the task design needs
    task = ChainTask()
    ps = task.sample(np.random.default_rng(2), 5000)
    share = np.mean([task.n_traps(p) == 0 for p in ps])
    assert 0.10 < share < 0.60


def test_benchmarks_are_graded_prefix_stable_and_disjoint_from_training():
    task = ChainTask()
    small, large = task.benchmarks(20), task.benchmarks(40)
    assert list(small) == [f"chain-{n}" for n in task.benchmark_lengths]
    for name in small:
        assert [p.prompt for p in small[name]] == [p.prompt for p in large[name][:20]]
        assert len({p.prompt for p in large[name]}) == 40
    trap_free = [np.mean([task.n_traps(p) == 0 for p in v]) for v in task.benchmarks(300).values()]
    assert trap_free[0] > trap_free[-1]  # longer chains meet more traps: graded difficulty


def test_chain_reward_checks_only_the_final_value():
    assert chain_reward("3,8,4,8", "8") == 1.0
    assert chain_reward("3,1,1,8", "8") == 1.0
    assert chain_reward("3,8,4,7", "8") == 0.0
    assert chain_reward("", "8") == 0.0
    assert chain_reward("3,8,", "8") == 0.0


@pytest.mark.parametrize("completion", ["The answer is \\boxed{3/4}.", "\\boxed{3/4}", "0.75",
                                        "3/4", "\\boxed{\\frac{3}{4}}", "$0.75$"])
def test_math_verify_reward_accepts_equivalent_answer_formats(completion):
    pytest.importorskip("math_verify")
    from metactl.adapters.lab.reproduce.paper import math_reward

    assert math_reward(completion, "3/4") == 1.0
    assert math_reward(completion, "\\frac{3}{4}") == 1.0


@pytest.mark.parametrize("completion", ["\\boxed{4/3}", "0.7", "no answer", ""])
def test_math_verify_reward_rejects_wrong_answers(completion):
    pytest.importorskip("math_verify")
    from metactl.adapters.lab.reproduce.paper import math_reward

    assert math_reward(completion, "3/4") == 0.0


def test_group_advantages_and_lr_schedule():
    import torch

    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2)
    assert adv[0] > 0 > adv[1] and adv[2] == adv[3] == 0
    mults = [cosine_with_floor(s, 100, 10, 0.1) for s in range(101)]
    assert mults[0] == pytest.approx(0.1) and mults[9] == pytest.approx(1.0)
    assert min(mults) == pytest.approx(0.1) and mults[-1] == pytest.approx(0.1)
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(mults[9:]))  # decays after warm-up


def test_pass_at_k():
    assert pass_at_k(8, 0, 1) == 0.0 and pass_at_k(8, 8, 8) == 1.0
    assert pass_at_k(8, 2, 1) == pytest.approx(0.25)
    assert pass_at_k(10, 1, 5) == pytest.approx(0.5)


def test_grpo_config_validation_names_the_argument():
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="grad_accum_steps"):
        GRPOConfig(prompts_per_step=3, group_size=2, grad_accum_steps=4)
    with pytest.raises(ValueError, match="loss_agg"):
        GRPOConfig(loss_agg="mean")
    with pytest.raises(ValueError, match="precision"):
        GRPOConfig(precision="fp16")


def test_controllers_build_the_paper_arms():
    values = {name: make_policy(name, steps=10, seed=0).select().value for name in PAPER_ARMS}
    assert values["fixed-0.9"] == 0.9 and values["fixed-1.5"] == 1.5
    assert values["linear-0.9-1.5"] == pytest.approx(0.9)
    assert make_policy("tampo", 10, 0).requires == ("loglik", "advantages")
    assert make_policy("fixed-1.2", 10, 0).requires == ()
    with pytest.raises(ValueError, match="unknown controller"):
        make_policy("nope", 10, 0)


# ----------------------------------------------------------------------------------------------
# the chat tasks' problem lists (the smollm2 preset holds out their first problems)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task_args", [("add", 0, 19, 5), ("add", 3, 5, 5), ("next", 0, 4, 3)])
def test_a_chat_tasks_distinct_problems_are_each_problem_once_in_a_seeded_order(task_args):
    from metactl.adapters.reference.chat_tasks import ChatTask, reward

    family, low, high, max_step = task_args
    task = ChatTask(family, low=low, high=high, max_step=max_step)
    problems = task.distinct_problems(seed=0)
    assert len(problems) == task.n_distinct == len({p.question for p in problems})
    assert [p.context for p in problems] == list(range(task.n_distinct))
    drawn = task.problems(200, seed=3)  # every drawn problem is one of the list, same answer
    listed = {p.question: p.answer for p in problems}
    assert all(listed[p.question] == p.answer for p in drawn)
    for p in problems[:20]:
        numbers = [int(x) for x in p.question.replace(",", " ").replace("?", " ").split()
                   if x.isdigit()]
        expected = (numbers[0] + numbers[1] if family == "add"
                    else numbers[3] + numbers[1] - numbers[0])
        assert p.answer == str(expected) and reward(f"= {expected}", p.answer) == 1.0
    again, other = task.distinct_problems(seed=0), task.distinct_problems(seed=1)
    assert again == problems and other != problems and sorted(other, key=str) != other


def test_the_chat_tasks_draws_are_unchanged():
    from metactl.adapters.reference.chat_tasks import SMOLLM2_TASK, ChatTask

    # recorded before the problem list existed: the draws benchmarks/smollm2_start.py measured
    assert [(p.question, p.answer) for p in SMOLLM2_TASK.problems(3, seed=0)] == [
        ("What is 17 + 12? Answer with just the number.", "29"),
        ("What is 10 + 5? Answer with just the number.", "15"),
        ("What is 6 + 0? Answer with just the number.", "6"),
    ]
    assert ChatTask("next", low=0, high=20).problems(1, seed=0)[0].question == (
        "What is the next number in the sequence 17, 20, 23, 26? Answer with just the number.")
