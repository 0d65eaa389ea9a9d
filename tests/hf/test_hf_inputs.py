"""Single-process checks of the Hugging Face glue: mapping arithmetic, config parsing (v4 and v5 rope
layouts, refusals), bad checkpoints, tokenizer / prompt-file / reward errors, prompt order, atomic export."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest
import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from hf_models import prompt_texts, save_hf_model, train_tokenizer  # noqa: E402

from megatron_rl_agg.hf import mapping  # noqa: E402
from megatron_rl_agg.hf.config import HFConfigError, arch_from_config  # noqa: E402
from megatron_rl_agg.hf.load import HFCheckpoint, HFCheckpointError  # noqa: E402

PROMPTS = HERE.parents[1] / "examples" / "gsm8k_mini.jsonl"
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def _cfg(**kw):
    base = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 8, "intermediate_size": 12,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 10}
    base.update(kw)
    return base


def test_qkv_rows_by_query_group():
    # G = 2 groups, Q = 2 query heads per group, head width D = 1: rows are q0 q1 k0 v0 | q2 q3 k1 v1
    arch = arch_from_config(_cfg(hidden_size=4, num_attention_heads=4, num_key_value_heads=2, head_dim=1))
    q = torch.tensor([[10.0], [11.0], [12.0], [13.0]])
    k, v = torch.tensor([[20.0], [21.0]]), torch.tensor([[30.0], [31.0]])
    blocks = mapping.megatron_blocks(arch, mapping.QKV_W, 0, 10)
    names = {"model.layers.0.self_attn.q_proj.weight": q, "model.layers.0.self_attn.k_proj.weight": k,
             "model.layers.0.self_attn.v_proj.weight": v}
    fused = torch.cat([names[b.name][b.start:b.stop] for b in blocks])
    assert fused.flatten().tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
    back = mapping.split_megatron(arch, mapping.QKV_W, 0, fused, 10)
    assert all(torch.equal(back[n], t) for n, t in names.items())
    plain = mapping.megatron_blocks(arch, mapping.QKV_W, 0, 10, qkv_layout="plain")
    assert torch.cat([names[b.name][b.start:b.stop] for b in plain]).flatten().tolist() == \
        [10, 11, 12, 13, 20, 21, 30, 31]


def test_fc1_is_gate_then_up_and_vocab_padding():
    arch = arch_from_config(_cfg())
    fc1 = mapping.megatron_blocks(arch, mapping.FC1, 1, 10)
    assert [(b.name, b.start, b.stop) for b in fc1] == [("model.layers.1.mlp.gate_proj.weight", 0, 12),
                                                         ("model.layers.1.mlp.up_proj.weight", 0, 12)]
    emb = mapping.megatron_blocks(arch, mapping.EMBED, None, 16)
    assert [(b.name, b.rows) for b in emb] == [("model.embed_tokens.weight", 10), (None, 6)]
    padded = torch.arange(16.0).view(16, 1)
    assert mapping.split_megatron(arch, mapping.EMBED, None, padded, 16)["model.embed_tokens.weight"].shape == (10, 1)


def test_rope_layouts_v4_and_v5():
    v4 = arch_from_config(_cfg(rope_theta=500000.0, rope_scaling=LLAMA3))
    v5 = arch_from_config(_cfg(rope_parameters={"rope_theta": 500000.0, **LLAMA3}))
    assert v4 == v5 and v4.rope_theta == 500000.0 and v4.rope_scaling_factor == 8.0
    plain = arch_from_config(_cfg(model_type="qwen3", rope_parameters={"rope_theta": 1e6, "rope_type": "default"},
                                  head_dim=6))
    assert plain.rope_scaling_factor is None and plain.qk_norm and plain.kv_channels == 6 and not plain.qkv_bias
    assert arch_from_config(_cfg(model_type="qwen2")).qkv_bias


@pytest.mark.parametrize("cfg,message", [
    (_cfg(model_type="gpt2"), "model_type 'gpt2' is not supported; supported: ['llama', 'mistral', 'qwen2', 'qwen3']"),
    (_cfg(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope type 'yarn' is not supported; supported: "
                                                              "['default', 'llama3']"),
    (_cfg(rope_scaling={**LLAMA3, "low_freq_factor": 2.0}), "low_freq_factor=2.0"),
    (_cfg(rope_scaling={**LLAMA3, "original_max_position_embeddings": 4096}), "original_max_position_embeddings"),
    (_cfg(hidden_act="gelu"), "hidden_act 'gelu'"),
    (_cfg(mlp_bias=True), "mlp_bias=True"),
    (_cfg(model_type="mistral", sliding_window=4096), "sliding-window"),
    (_cfg(num_key_value_heads=3), "not a multiple of num_key_value_heads=3"),
])
def test_config_refusals(cfg, message):
    with pytest.raises(HFConfigError, match=None) as err:
        arch_from_config(cfg, "some/config.json")
    assert message in str(err.value) and "some/config.json" in str(err.value)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "m"
    save_hf_model("llama", str(path))
    return path


def _copy(src: pathlib.Path, dst: pathlib.Path, tensors=None, config=None) -> pathlib.Path:
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    state = load_file(str(src / "model.safetensors"))
    save_file(tensors(state) if tensors else state, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config(cfg) if config else cfg))
    return dst


def test_bad_checkpoints(llama_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFCheckpoint(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        HFCheckpoint(str(tmp_path / "empty"))
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((llama_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="holds no weights: neither model.safetensors"):
        HFCheckpoint(str(tmp_path / "noweights"))
    missing = _copy(llama_dir, tmp_path / "missing",
                    tensors=lambda s: {k: v for k, v in s.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(HFCheckpointError, match=r"missing .*model\.layers\.1\.mlp\.up_proj\.weight"):
        HFCheckpoint(str(missing))
    extra = _copy(llama_dir, tmp_path / "extra", tensors=lambda s: {**s, "model.layers.0.extra.weight": torch.zeros(2)})
    with pytest.raises(HFCheckpointError, match=r"unexpected .*model\.layers\.0\.extra\.weight"):
        HFCheckpoint(str(extra))
    shape = _copy(llama_dir, tmp_path / "shape", config=lambda c: {**c, "intermediate_size": 40})
    with pytest.raises(HFCheckpointError, match=r"gate_proj.weight' has shape \[48, 32\] but config.json implies "
                                                r"\[40, 32\]"):
        HFCheckpoint(str(shape))


def test_prompt_file_errors_and_order(tmp_path):
    from megatron_rl_agg.hf.prompts import PromptFileError, TextTask, extract_answer, load_tokenizer
    from megatron_rl_agg.hf.reward_pool import RewardPool

    train_tokenizer(str(tmp_path / "tok"), prompt_texts(str(PROMPTS)))
    tok = load_tokenizer(str(tmp_path / "tok"))
    scorer = RewardPool("exact_match")
    assert extract_answer("3 + 4 = 7 apples.\n#### 1,007") == "1007"
    with pytest.raises(PromptFileError, match="the tokenizer has 320 tokens but the model's vocabulary is 300"):
        TextTask.from_file(str(PROMPTS), tok, scorer, vocab_size=300)
    with pytest.raises(PromptFileError, match=r"gsm8k_mini.jsonl:1: no key\(s\) \['problem'\]; the record has "
                                              r"\['answer', 'question'\]"):
        TextTask.from_file(str(PROMPTS), tok, scorer, prompt_key="problem")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"q": ["Ana has 2 apples. How many?"], "a": ["#### 2"]}), str(tmp_path / "p.parquet"))
    with pytest.raises(PromptFileError, match=r"no column\(s\) \['question', 'answer'\]; columns: \['q', 'a'\]"):
        TextTask.from_file(str(tmp_path / "p.parquet"), tok, scorer)
    parquet = TextTask.from_file(str(tmp_path / "p.parquet"), tok, scorer, prompt_key="q", answer_key="a")
    assert parquet.prompts[0].answer == "2"
    with pytest.raises(PromptFileError, match="prompt 0 has .* tokens, more than the 8 that fit"):
        TextTask.from_file(str(PROMPTS), tok, scorer, max_prompt_tokens=8)
    task = TextTask.from_file(str(PROMPTS), tok, scorer, seed=3, eos_ids=(tok.eos_token_id,))
    # chat template on by default: the user turn, then the generation prompt
    assert tok.decode(list(task.prompts[0])).startswith("<|user|>Ana has 7 apples")
    assert tok.decode(list(task.prompts[0])).endswith("<|assistant|>")
    no_template = TextTask.from_file(str(PROMPTS), tok, scorer, apply_chat_template=False)
    assert tok.decode(list(no_template.prompts[0])) == task.prompts[0].text
    # 24 prompts, 8 a step: steps 1-3 are one epoch (each prompt once), step 4 starts a new order
    epoch = [p.index for step in (1, 2, 3) for p in task.step_prompts(8, step)]
    assert sorted(epoch) == list(range(24)) and epoch != list(range(24))
    assert [p.index for p in task.step_prompts(8, 2)] == epoch[8:16]            # a function of (seed, step)
    assert [p.index for p in task.step_prompts(8, 4)] != epoch[:8]
    answer = tok.encode(" so the answer is 11") + [tok.eos_token_id]
    try:
        got = task.rewards([task.prompts[0]] * 2, [answer, answer[:-2]])
    finally:
        task.close()
    assert [r.value for r in got] == [1.0, 0.0]


def test_rewards():
    from megatron_rl_agg.hf.rewards import RewardError, get_reward

    math_verify = get_reward("math_verify")
    assert math_verify("q", "We add them: 3 + 4 = 7, so the answer is $7$.", "7") == 1.0
    assert math_verify("q", "The answer is \\boxed{8}.", "7") == 0.0
    assert get_reward("exact_match")("q", "3 + 4 = 7", "7") == 1.0
    assert get_reward("json:dumps") is json.dumps
    with pytest.raises(RewardError, match=r"unknown --reward 'math'; valid: \['exact_match', 'math_verify'\] or "
                                          r"'module:function'"):
        get_reward("math")
    with pytest.raises(RewardError, match="module 'no_such_module_xyz' does not import: ModuleNotFoundError"):
        get_reward("no_such_module_xyz:score")
    with pytest.raises(RewardError, match="has no callable 'nope'"):
        get_reward("json:nope")



@pytest.mark.parametrize("response,answer,score", [
    ("so 12345678901234567891", "12345678901234567890", 0.0),    # equal as floats, not as integers
    ("so 12345678901234567890", "12345678901234567890", 1.0),
    ("it costs 0.30000000000000001", "0.3", 0.0),                 # equal as floats, not as decimals
    ("it costs 7.50", "7.5", 1.0), ("-3", "-3.0", 1.0), ("1,234 apples", "1234", 1.0),
    ("3 then 4", "3", 0.0), ("no number", "7", 0.0), ("Paris", "Paris", 1.0)])
def test_exact_match_compares_numbers_exactly(response, answer, score):
    from megatron_rl_agg.hf.rewards import exact_match_reward

    assert exact_match_reward("q", response, answer) == score


def test_export_never_replaces_foreign_data(tmp_path):
    from megatron_rl_agg.hf.export import EXPORT_MARKER, HFExportError, write_hf_dir

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(HFExportError, match="exists and was not written by an export"):
        write_hf_dir(str(foreign), {"w": torch.zeros(2)}, {"model_type": "llama"})
    assert (foreign / "notes.txt").read_text() == "keep"
    out = tmp_path / "export"
    write_hf_dir(str(out), {"w": torch.zeros(2)}, {"model_type": "llama"}, max_shard_bytes=4)
    write_hf_dir(str(out), {"w": torch.ones(2), "v": torch.ones(3)}, {"model_type": "llama"}, max_shard_bytes=4)
    files = sorted(p.name for p in out.iterdir())
    assert EXPORT_MARKER in files and "model.safetensors.index.json" in files
    assert sorted(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == ["v", "w"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("source_dtype,export_dtype", [("bfloat16", "float32"), ("float32", "bfloat16")])
def test_export_config_has_one_dtype_and_loads_in_it(tmp_path, source_dtype, export_dtype):
    """A transformers-5 source (``dtype`` key) exported in another dtype: config.json's ``dtype`` and
    ``torch_dtype`` both name the weights' dtype, and ``from_pretrained(dtype="auto")`` loads in it."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megatron_rl_agg.hf.config import config_dtype
    from megatron_rl_agg.hf.export import _config_json, write_hf_dir

    src = tmp_path / "src"
    save_hf_model("qwen2", str(src))
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = source_dtype                      # as transformers 5 writes it
    arch = arch_from_config(cfg)
    assert arch.torch_dtype == source_dtype == config_dtype(cfg)
    assert config_dtype({"dtype": "bfloat16", "torch_dtype": "float32"}) == "bfloat16"   # transformers 5's rule
    dtype = getattr(torch, export_dtype)
    tensors = {k: v.to(dtype) for k, v in load_file(str(src / "model.safetensors")).items()}
    out = tmp_path / "out"
    write_hf_dir(str(out), tensors, _config_json(arch, cfg, export_dtype))
    written = json.loads((out / "config.json").read_text())
    assert written["dtype"] == written["torch_dtype"] == export_dtype
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype="auto")
    assert model.dtype == dtype
    assert all(torch.equal(model.state_dict()[k], v) for k, v in tensors.items())


def test_trainer_flag_errors(llama_dir):
    from megatron_rl_agg.trainer.cli.arguments import parse_args
    from megatron_rl_agg.trainer.cli.validation import TrainerArgsError

    with pytest.raises(TrainerArgsError, match="--save-hf needs --hf-checkpoint"):
        parse_args(["--save-hf", "out"])
    with pytest.raises(TrainerArgsError, match=r"unknown --reward 'nope'; valid: \['exact_match', 'math_verify'\]"):
        parse_args(["--hf-checkpoint", str(llama_dir), "--prompt-data", str(PROMPTS), "--reward", "nope"])
    with pytest.raises(TrainerArgsError, match="module 'no_such_module_xyz' does not import"):
        parse_args(["--hf-checkpoint", str(llama_dir), "--prompt-data", str(PROMPTS), "--reward",
                    "no_such_module_xyz:f"])
    with pytest.raises(TrainerArgsError, match="--hf-checkpoint: .*has no config.json"):
        parse_args(["--hf-checkpoint", str(PROMPTS.parent)])
    with pytest.raises(TrainerArgsError, match="--train-iters must be a positive integer"):
        parse_args(["--train-iters", "0"])
    args = parse_args(["--hf-checkpoint", str(llama_dir), "--train-iters", "0", "--save-hf", "out",
                       "--tensor-model-parallel-size", "2"])
    assert (args.num_layers, args.hidden_size, args.vocab_size) == (4, 32, 90)
    with pytest.raises(TrainerArgsError, match="vocabulary 90 is not a multiple of --tensor-model-parallel-size 4"):
        parse_args(["--hf-checkpoint", str(llama_dir), "--tensor-model-parallel-size", "4"])


def test_text_rollouts_need_a_tokenizer(tmp_path):
    from megatron_rl_agg.trainer.rollout.rollouts import RolloutFormatError, read_rollouts

    path = tmp_path / "text.jsonl"
    path.write_text(json.dumps({"prompt_id": 0, "prompt": "2 + 2 =", "response": " 4", "reward": 1.0,
                                "finish_reason": "stop"}) + "\n")
    with pytest.raises(RolloutFormatError, match=r"text.jsonl:1: 'prompt' is text; text rollouts need a tokenizer"):
        read_rollouts(str(path))
    (sample,) = read_rollouts(str(path), vocab_size=10, tokenize=lambda text: [len(text) % 10, 1])
    assert sample.prompt == (7, 1) and sample.response == (2, 1)


def test_core_imports_without_the_hf_extra():
    import subprocess

    code = r"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("transformers", "safetensors", "tokenizers", "math_verify", "pyarrow"):
            raise ImportError(f"blocked {name}")
sys.meta_path.insert(0, Block())
import megatron_rl_agg, megatron_rl_agg.hf
from megatron_rl_agg.trainer.cli.arguments import parse_args
args = parse_args(["--train-iters", "1"])
assert args.hf_checkpoint is None and args.reward == "math_verify"
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=str(HERE.parents[1]))
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
