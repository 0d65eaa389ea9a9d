"""The trainer on Hugging Face models (five runs, one job of the session's 2-process launch):

* offline rollouts whose behaviour log-probs come from transformers give a step-1 ratio of 1 at TP2 and PP2
  (``ppo_kl`` ~ 0, nothing clipped with a clip band of 1e-3), with token ids or with text the trainer
  tokenizes;
* end to end: a tiny Qwen2 model + a BPE tokenizer trained here (with a chat template) + the shipped prompt
  file + ``math_verify`` run 2 on-policy GRPO steps at DP2 and TP2; ``--save-hf`` writes a directory
  transformers loads, and ``megatron-rl-agg export-hf`` of the saved trainer checkpoint gives the same
  tensors bit for bit, and so does ``--load`` of that checkpoint at its step with ``--train-iters 2
  --save-hf`` (at TP2, without training); a bf16 checkpoint converted with ``--train-iters 0`` loads in
  transformers in bf16 with the source's tensors.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys

import pytest
import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "trainer"))
sys.path.insert(0, str(HERE))

from hf_models import assert_export_equals, build_hf_model, prompt_texts, save_trainer_model, train_tokenizer  # noqa: E402,E501
from trainer_helpers import trainer_job, trainer_results  # noqa: E402

from megatron_rl_agg.hf.prompts import load_tokenizer  # noqa: E402

PROMPTS = HERE.parents[1] / "examples" / "gsm8k_mini.jsonl"
VOCAB = 384


def _offline_rollouts(model, path: pathlib.Path, tokenizer=None) -> None:
    """4 groups x 4 samples, log-probs of the responses under ``model``: random token rows, or (with a
    tokenizer) text rows, short questions and answers, that the trainer tokenizes itself."""
    g = torch.Generator().manual_seed(5)
    words = "the answer is 7 apples so 3 + 4 = 7 and each friend gets 2".split()
    lines = []
    for gid in range(4):
        prompt = torch.randint(0, VOCAB, (int(torch.randint(3, 8, (), generator=g)),), generator=g).tolist()
        if tokenizer is not None:
            prompt = f"Question {gid}: how many apples?"
        for _ in range(4):
            response = torch.randint(0, VOCAB, (int(torch.randint(2, 9, (), generator=g)),), generator=g).tolist()
            if tokenizer is not None:
                response = " " + " ".join(words[int(i)] for i in torch.randint(0, len(words), (4,), generator=g))
            ids = [tokenizer.encode(x, add_special_tokens=False) if tokenizer else x for x in (prompt, response)]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids[0] + ids[1]])).logits.double(), -1)[0]
            lp = [float(logp[len(ids[0]) - 1 + i, t]) for i, t in enumerate(ids[1])]
            lines.append({"prompt_id": gid, "prompt": prompt, "response": response,
                          "reward": float(torch.rand((), generator=g)), "finish_reason": "stop", "logprobs": lp})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


@pytest.fixture(scope="module")
def trainer_run(shared_jobs):
    return shared_jobs, trainer_results(shared_jobs, 2)


def worker_jobs(root):
    """The tokenizer, model and rollout files, then the runs as one job of the session's shared 2-process
    launch (``tests/conftest.py``)."""
    model_dir = root / "model"
    train_tokenizer(str(model_dir), prompt_texts(str(PROMPTS)))
    model = save_trainer_model(str(model_dir), vocab_size=VOCAB)
    # Loaded as the trainer loads it: with config.json present, AutoTokenizer picks the model family's
    # tokenizer class (Qwen2's splits digits), which can tokenize differently from the trained object.
    tokenizer = load_tokenizer(str(model_dir))
    build_hf_model("qwen2", seed=4).to(torch.bfloat16).save_pretrained(str(root / "model_bf16"))
    _offline_rollouts(model, root / "rollouts.jsonl")
    _offline_rollouts(model, root / "text_rollouts.jsonl", tokenizer)
    common = ["--hf-checkpoint", str(model_dir), "--no-progress-bar", "--micro-batch-size", "4", "--lr", "1e-3"]
    offline = [*common, "--rollouts", str(root / "rollouts.jsonl"), "--global-batch-size", "16",
               "--seq-length", "24", "--train-iters", "1", "--clip-eps-low", "1e-3", "--clip-eps-high", "1e-3"]
    online = [*common, "--prompt-data", str(PROMPTS), "--reward", "math_verify", "--seq-length", "96",
              "--max-new-tokens", "4", "--global-batch-size", "8", "--num-samples-per-prompt", "4",
              "--train-iters", "2"]
    text = [*offline, "--rollouts", str(root / "text_rollouts.jsonl"), "--seq-length", "48"]  # later flags win
    plan = [{"name": "offline_tp2", "argv": [*offline, "--tensor-model-parallel-size", "2"]},
            {"name": "offline_pp2", "argv": [*offline, "--pipeline-model-parallel-size", "2"]},
            {"name": "offline_text_pp2", "argv": [*text, "--pipeline-model-parallel-size", "2"]},
            {"name": "online_dp2", "argv": [*online, "--save-hf", str(root / "hf_dp2"), "--save", str(root / "ckpt")]},
            {"name": "online_tp2", "argv": [*online, "--tensor-model-parallel-size", "2",
                                            "--save-hf", str(root / "hf_tp2")]},
            # --train-iters at the saved step (2) with --save-hf: the checkpoint exported, nothing trained
            {"name": "load_export", "argv": [*online, "--load", str(root / "ckpt"),
                                             "--tensor-model-parallel-size", "2", "--save-hf", str(root / "hf_loaded")]},
            # a reward that raises on some samples: those rows are invalid, the others train
            {"name": "online_flaky", "argv": [*online, "--reward", "hf.reward_fixtures:odd_length_raises",
                                              "--max-reward-failure-frac", "1", "--train-iters", "1"]},
            # the conversion of a bf16 checkpoint (fp32 parameters, exported in the config's bf16)
            {"name": "convert_bf16", "argv": ["--hf-checkpoint", str(root / "model_bf16"), "--no-progress-bar",
                                              "--train-iters", "0", "--save-hf", str(root / "hf_bf16")]}]
    return [trainer_job(plan, 2, root, 900)]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["offline_tp2", "offline_pp2", "offline_text_pp2"])
def test_transformers_logprobs_give_ratio_one(trainer_run, name):
    _, results = trainer_run
    (step,) = results[name]
    assert step["num_tokens"] > 0
    print(name, {k: step[k] for k in ("ppo_kl", "clip_frac", "num_tokens")})
    assert abs(step["ppo_kl"]) < 1e-6, step
    assert step["clip_frac"] == 0.0, step


@pytest.mark.slow
def test_on_policy_text_prompts_and_export(trainer_run):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_rl_agg.cli import main

    root, results = trainer_run
    for name in ("online_dp2", "online_tp2"):
        steps = results[name]
        assert [s["step"] for s in steps] == [1, 2]
        for s in steps:
            assert s["num_rows"] == 8 and s["num_reward_failures"] == 0
            assert math.isfinite(s["loss"]) and 0.0 <= s["reward_mean"] <= 1.0
    # Same seed, same prompts, same sampling noise: DP2 and TP2 reach the same rows and the same rewards.
    assert [s["reward_mean"] for s in results["online_dp2"]] == [s["reward_mean"] for s in results["online_tp2"]]
    for name in ("hf_dp2", "hf_tp2"):
        out = root / name
        assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()
        model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(out))
        assert tok.chat_template and model.config.vocab_size == VOCAB
        ids = tok("Ana has 7 apples.", return_tensors="pt")["input_ids"]
        assert torch.isfinite(model(ids).logits).all()
    assert main(["export-hf", "--hf-checkpoint", str(root / "model"), "--load", str(root / "ckpt"),
                 "--out", str(root / "hf_from_ckpt")]) == 0
    a, b = load_file(str(root / "hf_dp2" / "model.safetensors")), load_file(
        str(root / "hf_from_ckpt" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_load_at_the_saved_step_exports_and_bf16_converts(trainer_run):
    from safetensors.torch import load_file

    from megatron_rl_agg.trainer.cli.arguments import parse_args
    from megatron_rl_agg.trainer.loop.checkpoint import CheckpointError
    from megatron_rl_agg.trainer.loop.train import run

    root, results = trainer_run
    assert results["load_export"] == [] and results["convert_bf16"] == []
    a, b = load_file(str(root / "hf_dp2" / "model.safetensors")), load_file(
        str(root / "hf_loaded" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert_export_equals(root / "hf_bf16", root / "model_bf16", torch.bfloat16)
    # Below the saved step there is nothing to train and nothing to export: refused before any collective.
    with pytest.raises(CheckpointError, match=r"is at step 2, past --train-iters 1: .*--train-iters 2 --save-hf"):
        run(parse_args(["--hf-checkpoint", str(root / "model"), "--load", str(root / "ckpt"), "--train-iters", "1",
                        "--save-hf", str(root / "hf_never")]))
    assert not (root / "hf_never").exists()


@pytest.mark.slow
def test_failed_rewards_are_invalid_rows(trainer_run):
    """Under torchrun (reward workers per rank): samples whose reward raised are counted and left out of
    the statistics; the step trains on the rest."""
    _, results = trainer_run
    (step,) = results["online_flaky"]
    assert 0 < step["num_reward_failures"] < step["num_rows"] == 8, step
    assert step["num_stat_rows"] <= step["num_rows"] - step["num_reward_failures"]
    assert math.isfinite(step["loss"]) and 0.0 <= step["reward_mean"] <= 1.0
