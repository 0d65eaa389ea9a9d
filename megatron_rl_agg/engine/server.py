"""A vLLM server the trainer launches itself (no ``--vllm-url``), and stops on every exit path.

Launch: ``<--vllm-python> -m vllm.entrypoints.openai.api_server --model DIR --host 127.0.0.1 --port P
--served-model-name policy --dtype D --max-model-len L --seed S --enforce-eager --logprobs-mode
processed_logprobs [--vllm-args ...]`` with
``VLLM_SERVER_DEV_MODE=1`` (the weight-sync endpoints), ``HF_HUB_OFFLINE=1``, and on a CPU build
``VLLM_CPU_KVCACHE_SPACE`` (GiB, default 1) and ``VLLM_CPU_OMP_THREADS_BIND=nobind`` unless already set.
stdout and stderr go to ``log_path`` (under the run directory). :meth:`VLLMServer.start` polls
``GET /health`` until it answers or ``timeout`` seconds pass; a server that exits first is an error
quoting the end of its log. ``--logprobs-mode processed_logprobs``: the sampled tokens' log-probs are
``log_softmax(z / T)`` of the logits ``z`` after temperature scaling (vLLM's default ``raw_logprobs`` is
``log_softmax(z)`` whatever the temperature), the behaviour policy the trainer's loss compares with at
``--temperature T``; at ``T = 1`` both are the same, and ``prompt_logprobs`` (``--verify-sync``) are raw
in either mode.

Stop: the server runs in its own session (process group); :meth:`VLLMServer.stop` sends SIGTERM to the
group, then SIGKILL after ``grace`` seconds, and waits, so the engine's worker processes go with it.
It runs at interpreter exit (``atexit``), from the trainer's ``finally`` (normal end, error, SIGINT /
SIGTERM, which the trainer turns into a stop after the step), and on Linux the server also gets SIGKILL
from the kernel when the launching process dies without running any of those (``PR_SET_PDEATHSIG``:
a rank killed with SIGKILL leaves no orphan server).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Iterator, Optional, Sequence

from megatron_rl_agg.engine.client import EngineClient, EngineError

__all__ = ["VLLMServer", "free_port", "running_servers", "server_command"]

SERVED_NAME = "policy"


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(python: str, model_dir: str, port: int, *, dtype: str, max_model_len: int, seed: int,
                   extra_args: Sequence[str] = ()) -> list[str]:
    """The command line of the server (``extra_args`` last, so they override the defaults)."""
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--host", "127.0.0.1",
            "--port", str(port), "--served-model-name", SERVED_NAME, "--dtype", dtype,
            "--max-model-len", str(max_model_len), "--seed", str(seed), "--enforce-eager",
            "--logprobs-mode", "processed_logprobs", *list(extra_args)]


def _die_with_parent() -> None:
    """In the child before exec: own session, and SIGKILL when the parent dies (Linux prctl)."""
    os.setsid()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
        except OSError:
            pass


class VLLMServer:
    """One vLLM server process (group) serving ``model_dir`` on a free local port."""

    def __init__(self, python: str, model_dir: str, log_path: str, *, dtype: str = "float32",
                 max_model_len: int = 256, seed: int = 0, extra_args: Sequence[str] = (),
                 timeout: float = 600.0, grace: float = 10.0):
        if not os.path.isfile(python) or not os.access(python, os.X_OK):
            raise EngineError(f"--vllm-python {python!r} is not an executable file (build one with "
                              "bash scripts/setup_vllm.sh: .venv-vllm/bin/python)")
        self.python, self.model_dir, self.log_path = python, model_dir, log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = server_command(python, model_dir, self.port, dtype=dtype, max_model_len=max_model_len,
                                      seed=seed, extra_args=extra_args)
        self.timeout, self.grace = float(timeout), float(grace)
        self.proc: Optional[subprocess.Popen] = None

    @property
    def pid(self) -> Optional[int]:
        return None if self.proc is None else self.proc.pid

    def start(self) -> str:
        """Launch and wait for health; returns the URL. Raises :class:`EngineError` (server stopped)."""
        env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", HF_HUB_OFFLINE="1")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID", "PYTHONPATH"):
            env.pop(var, None)          # the trainer's torchrun settings are not the engine's
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        atexit.register(self.stop)
        client = EngineClient([self.url], timeout=5.0)
        deadline = time.monotonic() + self.timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                self.stop()
                raise EngineError(f"vLLM server {self.url} exited with status {code} before it was healthy "
                                  f"(log {self.log_path}):\n{self.log_tail()}")
            if client.healthy(self.url, timeout=2.0):
                return self.url
            if time.monotonic() > deadline:
                self.stop()
                raise EngineError(f"vLLM server {self.url} not healthy within --vllm-timeout {self.timeout:g} s "
                                  f"(log {self.log_path}):\n{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return "".join(fh.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after ``grace`` seconds; idempotent."""
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        atexit.unregister(self.stop)
        for sig, wait in ((signal.SIGTERM, self.grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:                                   # workers left in the group after the leader exited
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@contextlib.contextmanager
def running_servers(servers: Sequence[VLLMServer]) -> Iterator[None]:
    """Start ``servers`` at once (start-up is mostly waiting: 1-3 minutes each on a small CPU machine) and
    stop every one of them when the block exits, normally or not; the first start error is raised after
    all are stopped. Each server starts from its own thread, which lives until the block exits: a launched
    server dies with the THREAD that started it (``PR_SET_PDEATHSIG`` is per thread)."""
    done, errors, ready = threading.Event(), [], threading.Semaphore(0)

    def start(server: VLLMServer) -> None:
        try:
            server.start()
        except Exception as err:                # noqa: BLE001 - raised in the caller's thread below
            errors.append(err)
        ready.release()
        done.wait()

    for server in servers:
        threading.Thread(target=start, args=(server,), daemon=True).start()
    try:
        for _ in servers:
            ready.acquire()
        if errors:
            raise errors[0]
        yield
    finally:
        for server in servers:
            server.stop()
        done.set()
