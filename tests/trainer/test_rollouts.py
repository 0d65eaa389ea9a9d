"""Offline rollout reader: accepted format, line-numbered errors, group contiguity, mini-batch plan."""

import json

import pytest

from megatron_rl_agg.trainer.rollout import rollouts
from megatron_rl_agg.trainer.rollout.rollouts import RolloutFormatError


def _row(pid="a", prompt=(1, 2), response=(3, 4), reward=1.0, finish="stop", **extra):
    return {"prompt_id": pid, "prompt": list(prompt), "response": list(response), "reward": reward,
            "finish_reason": finish, **extra}


def _write(tmp_path, rows, raw_lines=()):
    path = tmp_path / "r.jsonl"
    lines = [json.dumps(r) for r in rows] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_reads_rows_groups_and_logprobs(tmp_path):
    path = _write(tmp_path, [_row("a"), _row("a", finish="length"), _row(7, logprobs=[-0.5, 0.0]),
                             _row("b", response=())])
    samples = rollouts.read_rollouts(path, vocab_size=8)
    assert [s.prompt_id for s in samples] == ["a", "a", 7, "b"]
    assert [s.truncated for s in samples] == [False, True, False, False]
    assert samples[2].logprobs == (-0.5, 0.0) and samples[0].logprobs is None
    assert samples[3].response == ()
    assert samples[1].source.endswith("r.jsonl:2")
    assert rollouts.group_spans(samples) == [(0, 2), (2, 3), (3, 4)]


@pytest.mark.parametrize("bad, message", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"prompt_id": "a"}), "missing keys"),
    (json.dumps(_row(respone=[1])), r"unknown keys \['respone'\]"),
    (json.dumps(_row(pid=True)), "'prompt_id' must be a str or an int"),
    (json.dumps(_row(prompt=[])), "'prompt' must not be empty"),
    (json.dumps(_row(response=[1, "x"])), "'response' must be a list of ints"),
    (json.dumps(_row(response=[1, 9])), r"outside \[0, 8\)"),
    (json.dumps(_row(reward="1")), "'reward' must be a finite number"),
    ('{"prompt_id": "a", "prompt": [1], "response": [2], "reward": NaN, "finish_reason": "stop"}',
     "'reward' must be a finite number"),
    (json.dumps(_row(finish="eos")), "'finish_reason' must be one of"),
    (json.dumps(_row(logprobs=[-0.1])), "'logprobs' has 1 entries for 2 response tokens"),
    (json.dumps(_row(logprobs=[-0.1, 0.3])), "'logprobs' must be a list of finite numbers <= 0"),
])
def test_bad_line_names_file_and_line(tmp_path, bad, message):
    path = _write(tmp_path, [_row(), _row()], raw_lines=["", bad])
    with pytest.raises(RolloutFormatError, match=message) as info:
        rollouts.read_rollouts(path, vocab_size=8)
    assert "r.jsonl:4:" in str(info.value)          # line 4: two rows, a blank line, then the bad one


def test_python_literals_are_not_evaluated(tmp_path):
    # json only: a pickle/eval payload is just an invalid line, never executed.
    path = _write(tmp_path, [], raw_lines=["__import__('os').system('echo pwned')"])
    with pytest.raises(RolloutFormatError, match="r.jsonl:1: invalid JSON"):
        rollouts.read_rollouts(path)


def test_group_must_be_contiguous(tmp_path):
    path = _write(tmp_path, [_row("a"), _row("b"), _row("a")])
    expected = r"r.jsonl:3: prompt_id 'a' reappears after another group \(first group at .*r.jsonl:1\)"
    with pytest.raises(RolloutFormatError, match=expected):
        rollouts.read_rollouts(path)


def test_empty_file(tmp_path):
    path = _write(tmp_path, [], raw_lines=["", "  "])
    with pytest.raises(RolloutFormatError, match="no samples"):
        rollouts.read_rollouts(path)


def test_plan_minibatches_packs_whole_groups():
    # groups of 3, 2, 4, 1, 1 rows with at most 5 rows per mini-batch:
    # [3 + 2] | [4 + 1] | [1]
    spans = [(0, 3), (3, 5), (5, 9), (9, 10), (10, 11)]
    assert rollouts.plan_minibatches(spans, 5) == [(0, 5), (5, 10), (10, 11)]
    with pytest.raises(ValueError, match="group of 4 rows .* --global-batch-size 3"):
        rollouts.plan_minibatches(spans, 3)


# MoE routing replay R3: the optional per-token 'routes' key ([T][layers][top_k], T = prompt + response)
def _routed(routes, prompt=(1, 2), response=(3,)):
    return json.dumps({"prompt_id": 0, "prompt": list(prompt), "response": list(response), "reward": 1.0,
                       "finish_reason": "stop", "routes": routes})


def test_routes_parsed_and_laid_out_per_model_input():
    import torch

    from megatron_rl_agg.mcore.routing_replay import padding_routes
    from megatron_rl_agg.trainer.step.batching import build_rows, pad_rows

    routes = [[[0, 1]], [[2, 3]], [[1, 3]]]
    s = rollouts.parse_rollout_line(_routed(routes), "f:1")
    assert s.routes == (((0, 1),), ((2, 3),), ((1, 3),))
    rollouts.check_sample_routes([s], 1, 2, 4, "f")
    rows = build_rows([s], 4, [0])
    # the model's inputs are the first T - 1 tokens; later positions replay padding routes
    assert rows.routes.tolist()[0][:2] == [[[0, 1]], [[2, 3]]]
    assert torch.equal(rows.routes[0, 2:], padding_routes((2, 1), 2))
    padded, _ = pad_rows(rows, torch.zeros(1), 2, 0)
    assert torch.equal(padded.routes[1], padding_routes((4, 1), 2))


@pytest.mark.parametrize("routes, message", [
    ([[[0, 1]], [[2, 3]]], r"one \[layers\]\[top_k\] entry per token of prompt \+ response \(3 tokens\), got 2"),
    ([[[0, 1]], [[2, 3]], [[1, 3]], [[0, 2]]], r"\(3 tokens\), got 4: routes for padding tokens"),
    ([[[0, 1]], [[2, 2]], [[1, 3]]], r"'routes'\[1\]\[0\] = \[2, 2\]: expert indices must be >= 0 and distinct"),
    ([[[0, 1]], [[-1, 2]], [[1, 3]]], r"'routes'\[1\]\[0\] = \[-1, 2\]"),
    ([[[0, 1]], [[2]], [[1, 3]]], r"'routes'\[1\] is not \[1\]\[2\]"),
    ([[[0, 1.5]], [[2, 3]], [[1, 3]]], r"'routes'\[0\] must be a \[layers\]\[top_k\] list of ints"),
])
def test_bad_routes_are_clear_errors(routes, message):
    with pytest.raises(RolloutFormatError, match=message):
        rollouts.parse_rollout_line(_routed(routes), "f:1")


def test_routes_checked_against_the_model():
    s = rollouts.parse_rollout_line(_routed([[[0, 1]], [[2, 4]], [[1, 3]]]), "f:1")
    with pytest.raises(ValueError, match=r"f:1: 'routes' holds expert 4, outside \[0, 4\) \(--num-experts 4\)"):
        rollouts.check_sample_routes([s], 1, 2, 4, "f")
    with pytest.raises(ValueError, match=r"entries are \[1\]\[2\], the model needs \[2\]\[2\]"):
        rollouts.check_sample_routes([s], 2, 2, 8, "f")
    bare = rollouts.parse_rollout_line(_routed(None), "f:2")
    with pytest.raises(ValueError, match="f:2: no 'routes'"):
        rollouts.check_sample_routes([bare], 1, 2, 4, "f")
