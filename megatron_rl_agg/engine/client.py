"""HTTP client of vLLM's OpenAI-compatible server (stdlib ``urllib``; every call has a timeout).

Requests go by token ids, never by text (the trainer's tokenizer applies the chat template, as for the
Megatron generator), to ``POST /v1/completions``::

    {"model": M, "prompt": [ids], "n": n, "temperature": T, "max_tokens": N, "stop_token_ids": eos,
     "seed": s, "logprobs": 0, "return_token_ids": true}

and each choice gives the sampled ``token_ids``, their log-probs (``logprobs.token_logprobs``: the
engine's behaviour log-probs, ``log_softmax(z / T)`` when the server runs with ``--logprobs-mode
processed_logprobs``, as a launched one does; vLLM's default reports ``log_softmax(z)`` at any ``T``) and
the ``finish_reason`` (``stop`` / ``length``). Scoring a given sequence
(``--verify-sync``) asks for ``prompt_logprobs: 0`` with ``max_tokens: 1``: the log-prob of every token
given its prefix (``None`` for the first).

Several servers (``--vllm-url A,B``) split the prompts: prompt ``i`` of ``P`` goes to server
``i * len(urls) // P`` (contiguous blocks), all in flight at once. A server that refuses the connection,
answers with an error status or does not answer within ``timeout`` seconds raises :class:`EngineError`
naming its URL and the endpoint, never a hang. The weight-sync endpoints (vLLM's development mode,
``VLLM_SERVER_DEV_MODE=1``): ``/pause?mode=wait``, ``/collective_rpc`` (``reload_weights`` from a
directory), ``/reset_prefix_cache``, ``/resume``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

__all__ = ["EngineError", "Completion", "EngineClient", "parse_urls"]


class EngineError(RuntimeError):
    """The inference engine failed, died or did not answer in time (the message names the URL)."""


@dataclass(frozen=True)
class Completion:
    """One sampled response: ``token_ids`` ``[n_tokens]`` (EOS included when it stopped there), the
    behaviour log-prob of each (``log pi_engine(token | prefix)``), ``finish_reason`` ``stop`` / ``length``."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: str


def parse_urls(text: str) -> list[str]:
    """``"http://a:8000,http://b:8000/"`` -> ``["http://a:8000", "http://b:8000"]``.

    Raises:
        EngineError: an empty list or an entry that is not ``http(s)://host:port``.
    """
    urls = [u.strip().rstrip("/") for u in str(text).split(",") if u.strip()]
    bad = [u for u in urls if not u.startswith(("http://", "https://")) or "//" not in u or
           not u.split("//", 1)[1]]
    if not urls or bad:
        raise EngineError(f"--vllm-url {text!r}: expected http://host:port[,http://host:port...], "
                          f"bad entries {bad or [text]}")
    return urls


class EngineClient:
    """Talks to one or several vLLM servers; ``timeout``: seconds any one HTTP call may take."""

    def __init__(self, urls: Sequence[str], timeout: float):
        if not urls:
            raise EngineError("no vLLM server URL")
        if not timeout > 0:
            raise EngineError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.urls = [u.rstrip("/") for u in urls]
        self.timeout = float(timeout)
        self._models: dict[str, str] = {}

    # ---------------------------------------------------------------------------------- transport
    def call(self, url: str, path: str, payload: Optional[dict] = None, *, method: str = "POST",
             timeout: Optional[float] = None) -> dict:
        """One HTTP call; returns the decoded JSON body ({} when empty). Raises :class:`EngineError`."""
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        wait = self.timeout if timeout is None else timeout
        try:
            with urllib.request.urlopen(req, timeout=wait) as resp:
                body = resp.read()
        except urllib.error.HTTPError as err:
            detail = err.read()[:500].decode(errors="replace")
            raise EngineError(f"vLLM server {url}: {method} {path} answered HTTP {err.code}: {detail}") from None
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            reason = getattr(err, "reason", err)
            raise EngineError(f"vLLM server {url}: {method} {path} failed within {wait:g} s (--vllm-timeout): "
                              f"{reason!r}; is the server alive?") from None
        try:
            return json.loads(body) if body.strip() else {}
        except json.JSONDecodeError:
            return {"text": body[:200].decode(errors="replace")}

    def healthy(self, url: str, timeout: float = 5.0) -> bool:
        """True when ``GET /health`` answers 200 within ``timeout`` seconds."""
        try:
            self.call(url, "/health", method="GET", timeout=timeout)
            return True
        except EngineError:
            return False

    def model(self, url: str) -> str:
        """The served model name of ``url`` (``GET /v1/models``, cached)."""
        if url not in self._models:
            data = self.call(url, "/v1/models", method="GET").get("data") or []
            if not data:
                raise EngineError(f"vLLM server {url}: /v1/models lists no model")
            self._models[url] = data[0]["id"]
        return self._models[url]

    def _split(self, num: int) -> list[str]:
        """The server of each of ``num`` prompts (contiguous blocks)."""
        return [self.urls[i * len(self.urls) // max(num, 1)] for i in range(num)]

    def _parallel(self, fn, items: list, urls: list[str]) -> list:
        with ThreadPoolExecutor(max_workers=max(1, min(len(items), 32))) as pool:
            return list(pool.map(fn, items, urls))

    # ---------------------------------------------------------------------------------- sampling
    def generate(self, prompts: Sequence[Sequence[int]], *, n: int, temperature: float, max_tokens: int,
                 stop_token_ids: Sequence[int], seeds: Sequence[int]) -> list[list[Completion]]:
        """``n`` completions of each prompt (``[P][n]``); prompt ``i`` is sampled with ``seeds[i]``."""
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts need as many seeds, got {len(seeds)}")

        def one(item, url):
            prompt, seed = item
            payload = {"model": self.model(url), "prompt": [int(t) for t in prompt], "n": int(n),
                       "temperature": float(temperature), "max_tokens": int(max_tokens),
                       "stop_token_ids": [int(t) for t in stop_token_ids], "seed": int(seed), "logprobs": 0,
                       "return_token_ids": True, "skip_special_tokens": False}
            choices = sorted(self.call(url, "/v1/completions", payload).get("choices") or [],
                             key=lambda c: c.get("index", 0))
            if len(choices) != n:
                raise EngineError(f"vLLM server {url}: asked for {n} completions, got {len(choices)}")
            return [_completion(url, c) for c in choices]

        return self._parallel(one, list(zip(prompts, seeds)), self._split(len(prompts)))

    def score(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """Log-prob of every token after the first of each sequence under the engine's weights:
        ``[S][len - 1]``, ``log pi(x_t | x_<t)`` for ``t = 1 .. len - 1`` (raw logits, temperature 1)."""

        def one(seq, url):
            payload = {"model": self.model(url), "prompt": [int(t) for t in seq], "max_tokens": 1,
                       "temperature": 0.0, "prompt_logprobs": 0}
            choices = self.call(url, "/v1/completions", payload).get("choices") or []
            if not choices or choices[0].get("prompt_logprobs") is None:
                raise EngineError(f"vLLM server {url}: no prompt_logprobs in the answer")
            per_token = choices[0]["prompt_logprobs"][1:]
            return [float(entry[str(int(tok))]["logprob"]) for entry, tok in zip(per_token, seq[1:])]

        return self._parallel(one, list(sequences), self._split(len(sequences)))

    # ---------------------------------------------------------------------------------- weights
    def reload_weights(self, directory: str) -> None:
        """Every server loads the Hugging Face directory ``directory`` without a restart: pause (after the
        requests in flight), ``reload_weights``, reset the prefix cache (cached keys are of old weights),
        resume. All servers, one after another."""
        for url in self.urls:
            self.call(url, "/pause?mode=wait")
            try:
                self.call(url, "/collective_rpc",
                          {"method": "reload_weights", "kwargs": {"weights_path": directory}})
                self.call(url, "/reset_prefix_cache")
            finally:
                self.call(url, "/resume")


def _completion(url: str, choice: dict) -> Completion:
    ids = choice.get("token_ids")
    lp = (choice.get("logprobs") or {}).get("token_logprobs")
    if ids is None or lp is None or len(ids) != len(lp):
        raise EngineError(f"vLLM server {url}: a choice without token_ids / logprobs of equal length "
                          "(the request sets return_token_ids and logprobs)")
    finish = choice.get("finish_reason")
    if finish not in ("stop", "length"):
        raise EngineError(f"vLLM server {url}: finish_reason {finish!r}; expected 'stop' or 'length'")
    return Completion(tuple(int(t) for t in ids), tuple(float(x) for x in lp), finish)
