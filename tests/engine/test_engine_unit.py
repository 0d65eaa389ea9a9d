"""The engine layer without a vLLM server: flag refusals, URL parsing, the sync registry, rank 0's outcome on
every rank, errors that name the URL, the server's refusals, versions and staleness of the engine source
(driven by a stand-in HTTP server of the stdlib that answers like vLLM's completions endpoint)."""

from __future__ import annotations

import json
import pathlib
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from megatron_rl_agg.engine.client import EngineClient, EngineError, parse_urls  # noqa: E402
from megatron_rl_agg.engine.server import VLLMServer, free_port, running_servers, server_command  # noqa: E402
from megatron_rl_agg.engine.sync import SYNC_STRATEGIES, WeightSync, get_sync_strategy, rank0_call  # noqa: E402
from megatron_rl_agg.trainer.cli.arguments import parse_args  # noqa: E402
from megatron_rl_agg.trainer.cli.validation import TrainerArgsError  # noqa: E402

PROMPTS = HERE.parents[1] / "examples" / "gsm8k_mini.jsonl"


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    from engine_models import save_engine_model

    root = tmp_path_factory.mktemp("engine_models")
    untied = save_engine_model(str(root / "untied"), "qwen2", seed=1)
    tied = root / "tied"
    save_engine_model(str(tied), "qwen2", seed=1)
    cfg = json.loads((tied / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (tied / "config.json").write_text(json.dumps(cfg))
    return {"untied": untied, "tied": str(tied)}


def _argv(model, *extra):
    return ["--hf-checkpoint", model, "--prompt-data", str(PROMPTS), "--seq-length", "96", "--max-new-tokens",
            "16", "--global-batch-size", "8", "--num-samples-per-prompt", "4", "--micro-batch-size", "2", *extra]


@pytest.mark.parametrize("extra, message", [
    (["--vllm-url", "http://a:1"], "--vllm-url need --rollout-engine vllm"),
    (["--async-rollouts", "1"], "--async-rollouts need --rollout-engine vllm"),
    (["--rollout-engine", "vllm", "--vllm-url", "ftp://x"], "bad entries ['ftp://x']"),
    (["--rollout-engine", "vllm", "--vllm-url", "http://a:1", "--vllm-python", "/bin/true"], "give one"),
    (["--rollout-engine", "vllm", "--vllm-timeout", "0"], "--vllm-timeout must be > 0 seconds, got 0.0"),
    (["--rollout-engine", "vllm", "--vllm-url", "http://a:1", "--temperature", "0.7"],
     "unless the server runs with --logprobs-mode processed_logprobs"),
    (["--rollout-engine", "vllm", "--temperature", "0.7", "--vllm-args", "--logprobs-mode raw_logprobs"],
     "--vllm-args sets --logprobs-mode raw_logprobs"),
    (["--rollout-engine", "vllm", "--vllm-processed-logprobs"], "--vllm-processed-logprobs describes --vllm-url"),
    (["--vllm-processed-logprobs"], "--vllm-processed-logprobs need --rollout-engine vllm"),
    (["--rollout-engine", "vllm", "--vllm-timeout", "60", "--distributed-timeout-minutes", "1"],
     "--vllm-timeout 60 s must be below --distributed-timeout-minutes 1 (= 60 s)"),
    (["--rollout-engine", "vllm", "--verify-sync-tol", "-1"], "--verify-sync-tol must be > 0, got -1.0"),
])
def test_engine_flags_refused_up_front(hf_dirs, extra, message):
    with pytest.raises(TrainerArgsError) as err:
        parse_args(_argv(hf_dirs["untied"], *extra))
    assert message in str(err.value)


def test_engine_needs_an_hf_checkpoint_and_prompts():
    with pytest.raises(TrainerArgsError, match="--rollout-engine vllm needs --hf-checkpoint"):
        parse_args(["--rollout-engine", "vllm"])
    with pytest.raises(SystemExit):
        parse_args(["--rollout-engine", "sglang"])        # argparse lists the choices


def test_tied_embeddings_refused_for_vllm_only(hf_dirs):
    with pytest.raises(TrainerArgsError, match="ties its input and output embeddings"):
        parse_args(_argv(hf_dirs["tied"], "--rollout-engine", "vllm"))
    parse_args(_argv(hf_dirs["tied"]))                   # the Megatron generator is fine with it
    args = parse_args(_argv(hf_dirs["untied"], "--rollout-engine", "vllm", "--async-rollouts", "1"))
    # the engine's rows carry versions: --max-staleness applies to them as to a rollout file's
    assert parse_args(_argv(hf_dirs["untied"], "--rollout-engine", "vllm", "--max-staleness", "0")).max_staleness == 0
    with pytest.raises(TrainerArgsError, match="or --rollout-engine vllm"):
        parse_args(_argv(hf_dirs["untied"], "--max-staleness", "0"))
    # T != 1: a launched server reports log-probs after temperature scaling; attached ones must say so
    assert parse_args(_argv(hf_dirs["untied"], "--rollout-engine", "vllm", "--temperature", "0.7")).temperature == 0.7
    parse_args(_argv(hf_dirs["untied"], "--rollout-engine", "vllm", "--temperature", "0.7", "--vllm-url",
                     "http://a:1", "--vllm-processed-logprobs"))
    assert args.rollout_engine == "vllm" and args.async_rollouts == 1


def test_parse_urls_and_sync_registry():
    assert parse_urls(" http://a:1/, http://b:2 ") == ["http://a:1", "http://b:2"]
    with pytest.raises(EngineError, match="expected http://host:port"):
        parse_urls(",")
    assert get_sync_strategy("directory") is SYNC_STRATEGIES["directory"]
    with pytest.raises(ValueError, match=r"'nccl'; valid: \['directory'\]"):
        get_sync_strategy("nccl")


def test_rank0_call_reraises_any_error_as_engine_error():
    assert rank0_call(lambda: 7, is_rank0=True) == 7

    def boom():
        raise KeyError("x")

    with pytest.raises(EngineError, match="KeyError: 'x'"):
        rank0_call(boom, is_rank0=True)


def test_dead_url_error_names_it_within_the_timeout():
    url = f"http://127.0.0.1:{free_port()}"
    client = EngineClient([url], timeout=2)
    start = time.monotonic()
    with pytest.raises(EngineError, match=f"vLLM server {url}: GET /v1/models failed within 2 s"):
        client.generate([[1, 2]], n=1, temperature=1.0, max_tokens=1, stop_token_ids=[0], seeds=[0])
    assert time.monotonic() - start < 5
    assert not client.healthy(url, timeout=1)


def test_server_refuses_a_missing_python(tmp_path):
    with pytest.raises(EngineError, match="scripts/setup_vllm.sh"):
        VLLMServer(str(tmp_path / "nope" / "python"), str(tmp_path), str(tmp_path / "log"))
    cmd = server_command("py", "M", 8000, dtype="float32", max_model_len=97, seed=3, extra_args=["--x", "1"])
    assert cmd[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"] and cmd[-2:] == ["--x", "1"]
    assert cmd[cmd.index("--max-model-len") + 1] == "97" and cmd[cmd.index("--seed") + 1] == "3"
    assert cmd[cmd.index("--logprobs-mode") + 1] == "processed_logprobs"     # log-probs at the temperature


def test_running_servers_stops_every_server_and_raises_the_first_start_error(tmp_path):
    """Two "servers" that never become healthy (one exits with status 3 at once, one hangs past its 2 s
    health timeout): the block is never entered, the start error is raised and no process is left."""
    exits, hangs = tmp_path / "exits.sh", tmp_path / "hangs.sh"
    exits.write_text("#!/bin/sh\nexit 3\n")
    hangs.write_text("#!/bin/sh\nsleep 60\n")
    for script in (exits, hangs):
        script.chmod(0o755)
    servers = [VLLMServer(str(exits), str(tmp_path), str(tmp_path / "a.log"), timeout=2.0),
               VLLMServer(str(hangs), str(tmp_path), str(tmp_path / "b.log"), timeout=2.0)]
    entered = False
    with pytest.raises(EngineError, match="exited with status 3|not healthy within"):
        with running_servers(servers):
            entered = True
    assert not entered and not any(s.alive() for s in servers)


# ------------------------------------------------------------------------------------------------------
# A stand-in for vLLM's completions endpoint: answers each prompt with n responses [seed % 50 + i, ...]
# and log-prob -0.5 - (reloads so far) per token, 0.3 s after the request (so the log-probs tell which
# weights sampled), and records the order of requests and reloads.
# ------------------------------------------------------------------------------------------------------

class _Fake(BaseHTTPRequestHandler):
    log: list = []

    def log_message(self, *a):
        pass

    def _send(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send({"data": [{"id": "policy"}]} if self.path == "/v1/models" else {})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        _Fake.log.append((self.path, body.get("prompt"), body.get("kwargs")))
        if self.path != "/v1/completions":
            return self._send({})
        n, seed, length = body["n"], body["seed"], body["max_tokens"]
        time.sleep(0.3)        # the weights that answer are those loaded when the answer is computed
        served = sum(p == "/collective_rpc" for p, _, _ in _Fake.log)
        choices = [{"index": i, "token_ids": [(seed + i) % 50 + 3] * length,
                    "logprobs": {"token_logprobs": [-0.5 - served] * length}, "finish_reason": "length"}
                   for i in range(n)]
        self._send({"choices": choices})


@pytest.fixture
def fake_url():
    _Fake.log = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class _Task:
    """Prompts ``[[p, p + 1]]``; reward = first response token / 100; no EOS."""

    eos_ids = (0,)

    def step_prompts(self, num, step):
        return [[10 * step + p, 10 * step + p + 1] for p in range(num)]

    def reward(self, prompt, response):
        return response[0] / 100


class _CountingSync(WeightSync):
    def sync(self, export, version):
        export("dir")
        self.client.reload_weights("dir")
        self.version = version
        return version


def _staleness_metrics(samples, step, max_staleness=None):
    """The trainer's staleness metrics of one DP rank's rows (train.py's path: rows, then the filter)."""
    from megatron_rl_agg.trainer.step import batching, staleness

    rows = batching.build_rows(samples, 16, list(range(len(samples))))
    mask, _, counts = staleness.apply_max_staleness(rows.versions, rows.loss_mask, torch.ones(len(samples)),
                                                    step, max_staleness, "drop")
    return mask, staleness.combine_staleness([counts])


@pytest.mark.parametrize("async_rollouts, versions", [(0, [0, 1, 2]), (1, [0, 0, 1])])
def test_engine_source_versions_and_staleness(fake_url, async_rollouts, versions):
    from megatron_rl_agg.trainer.rollout.engine_source import EngineSource, prompt_seeds
    from megatron_rl_agg.trainer.rollout.generation import RolloutSpec

    spec = RolloutSpec(task=_Task(), num_prompts=2, samples_per_prompt=2, max_new_tokens=3, temperature=1.0,
                       failure_prob=0.0, vocab_size=100, seed=5)
    client = EngineClient([fake_url], timeout=10)
    exports = []
    source = EngineSource(spec, client, _CountingSync(client, is_rank0=True), is_rank0=True, train_iters=3,
                          async_rollouts=async_rollouts, seq_length=16)
    seen = []
    for step in (1, 2, 3):
        rows = source.local_rows(step, 0, dp_size=2, dp_rank=1)       # the second half: prompt 1's rows
        assert [s.prompt for s in rows.samples] == [(10 * step + 1, 10 * step + 2)] * 2
        seed = prompt_seeds(5, step, 2)[1]
        assert [s.response for s in rows.samples] == [((seed + i) % 50 + 3,) * 3 for i in range(2)]
        # the version recorded is the one whose weights sampled (the fake's log-probs carry it)
        assert all(s.logprobs == (-0.5 - versions[step - 1],) * 3 for s in rows.samples)
        assert all(s.reward == s.response[0] / 100 for s in rows.samples)
        seen.append(rows.samples[0].versions)
        assert source.has_versions          # the trainer's staleness metrics and --max-staleness read them
        mask, stale = _staleness_metrics(rows.samples, step)
        expect = step - 1 - versions[step - 1]          # async 1: 0, 1, 1; synchronous: 0, 0, 0
        assert stale["staleness_max"] == expect and stale["staleness_mean"] == expect, stale
        assert stale["staleness_frac_1"] == float(expect == 1) and stale["num_stale_tokens"] == 0
        mask0, limited = _staleness_metrics(rows.samples, step, max_staleness=0)   # --max-staleness 0
        assert limited["num_stale_tokens"] == (6 if expect else 0)
        assert int(mask0.sum()) == (0 if expect else int(mask.sum())) and int(mask.sum()) == 6
        metrics = source.after_step(step, [], exports.append)
        assert metrics["rollout_version"] == versions[step - 1] and "rollout_staleness" not in metrics
        if step < 3:
            assert metrics["engine_version"] == step and metrics["engine_wait_s"] >= 0
    source.close()
    assert seen == [(v,) * 3 for v in versions]
    assert exports == ["dir", "dir"]                              # no sync after the last step
    order = [p for p, prompt, _ in _Fake.log if p != "/v1/completions" or prompt[0] % 10 == 0]
    # completions of each step's prompt 0, and the reloads between them
    expect = {0: ["/v1/completions", "/collective_rpc", "/v1/completions", "/collective_rpc", "/v1/completions"],
              1: ["/v1/completions", "/v1/completions", "/collective_rpc", "/v1/completions", "/collective_rpc"]}
    assert [p for p in order if p in ("/v1/completions", "/collective_rpc")] == expect[async_rollouts]
