"""The client of a remote reward: batched JSON POSTs (``rewards.schema``) to one URL, a bounded number in
flight, each with a deadline, retried on connection errors and 5xx answers, and every failure accounted
like a failing rule function (docs/rewards.md#the-client).

- A request that fails for good (connection errors or 5xx answers on every try, a 4xx or 3xx answer, no
  answer within ``timeout_s``) scores each of its samples ``failure_value`` and is counted
  (``remote_failures``, or ``remote_timeouts`` for the deadline). Nothing else ever stands in for a score.
- More than ``max_failure_fraction`` of a call's samples failing is a :class:`RewardFunctionError` naming
  the URL and the last error: an endpoint that is down stops the run instead of paying ``failure_value``.
- A 200 answer that breaks the schema (not JSON, wrong version, the wrong number of scores, a score that
  is no finite number) is a server bug, not a bad sample: :class:`RewardFunctionError` at once, as for a
  rule function returning the wrong number of values.

Retries: a try that ends in a connection error or a 5xx answer is repeated up to ``retries`` times, after
``backoff_s``, then twice that, and so on. A 4xx answer is never retried (the same request would get the
same answer) and neither is a request past its deadline (the server may still be working on it). So one
request takes at most ``(retries + 1) * timeout_s`` plus the back-off waits.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Coroutine, NamedTuple, Sequence

from rlhf_ds.rewards.functions import RewardFunctionError
from rlhf_ds.rewards.schema import TOKEN_ENV, SchemaError, parse_scores, request_body

logger = logging.getLogger(__name__)

# An answer carries a few bytes per sample; one far larger is a broken server, not a score list.
MAX_ANSWER_BYTES = 16 * 2**20
_BODY_SHOWN = 300   # characters of an error answer quoted in messages


class Outcome(NamedTuple):
    """How one request ended. kind: ok | failed | timeout | bad_answer."""
    kind: str
    scores: list[float]
    error: str            # what went wrong on the last try ('' when ok)
    tries: int
    latency_s: float      # of the last try
    ended: float          # time.monotonic() when it ended: the last error is the latest one


class _AnswerTooLarge(Exception):
    pass


def _hint(status: int) -> str:
    if status in (401, 403):
        return " (set reward.remote.token, or RLHF_DS_REWARD_TOKEN, to the server's token)"
    if status == 413:
        return " (lower reward.remote.batch_size, or raise the server's request size limit)"
    return ""


def parse_headers(headers: Sequence[str]) -> dict[str, str]:
    """``["Name: value", ...]`` -> ``{"Name": "value"}`` (config_rules checked the form)."""
    out = {}
    for header in headers:
        name, _, value = header.partition(":")
        out[name.strip()] = value.strip()
    return out


def run_coroutine(make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run the coroutine ``make()`` to its end from synchronous code, even where this thread already
    runs an event loop (a notebook): then on a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


class RemoteReward:
    """Score samples at ``url`` (schema ``rewards.schema``), ``batch_size`` samples per POST and up to
    ``concurrency`` POSTs in flight; called like a RewardRunner:
    (prompts, responses, answers, finished) -> (scores, stats). Safe to call from any thread."""

    def __init__(self, url: str, *, batch_size: int = 64, concurrency: int = 4, timeout_s: float = 30.0,
                 retries: int = 3, backoff_s: float = 0.5, headers: Sequence[str] = (), token: str = "",
                 failure_value: float = 0.0, max_failure_fraction: float = 0.5):
        if batch_size < 1 or concurrency < 1 or retries < 0 or not timeout_s > 0 or not backoff_s >= 0:
            raise ValueError(f"remote reward {url}: batch_size and concurrency must be >= 1, retries >= 0, "
                             f"timeout_s > 0 and backoff_s >= 0; got {batch_size}, {concurrency}, {retries}, "
                             f"{timeout_s}, {backoff_s}")
        if not 0.0 <= max_failure_fraction <= 1.0 or not math.isfinite(failure_value):
            raise ValueError(f"remote reward {url}: max_failure_fraction must be in [0, 1] and failure_value "
                             f"finite; got {max_failure_fraction}, {failure_value}")
        self.url, self.batch_size, self.concurrency = url, batch_size, concurrency
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), retries, float(backoff_s)
        self.failure_value, self.max_failure_fraction = float(failure_value), float(max_failure_fraction)
        self.headers = {"Content-Type": "application/json", **parse_headers(headers)}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"

    # ------------------------------------------------------------------ the calls
    def check(self) -> None:
        """The start-up probe: an empty batch must get an empty, valid answer. RewardFunctionError naming
        the URL and what to do when it does not (server down, wrong token, another schema)."""
        outcome = run_coroutine(lambda: self._post_all([(self._encode([], [], [], [], []), 0)]))[0]
        if outcome.kind == "ok":
            return
        todo = ("is the server running and listening there? `rlhf-ds serve-reward SPEC --port PORT` serves one"
                if outcome.error.startswith("connection error") else "see docs/rewards.md#the-client")
        raise RewardFunctionError(f"reward.remote.url={self.url}: the start-up probe (an empty batch) got no "
                                  f"valid answer (tries: {outcome.tries}): {outcome.error}; {todo}")

    def __call__(self, prompts: list[str], responses: list[str], answers: list[str], finished: list[bool]
                 ) -> tuple[list[float], dict[str, float]]:
        """Scores [B] and stats: ``remote_mean``, ``remote_failures`` / ``remote_timeouts`` (requests),
        ``remote_retries`` (tries after the first), ``remote_latency_s`` / ``remote_latency_max_s`` (of
        the answered tries)."""
        n = len(prompts)
        if not len(responses) == len(answers) == len(finished) == n:
            raise ValueError(f"reward inputs differ in length: {n} prompts, {len(responses)} responses, "
                             f"{len(answers)} answers, {len(finished)} finished flags")
        batches = [range(start, min(start + self.batch_size, n)) for start in range(0, n, self.batch_size)]
        bodies = [(self._encode([prompts[i] for i in rows], [responses[i] for i in rows],
                                [answers[i] for i in rows], [finished[i] for i in rows], rows), len(rows))
                  for rows in batches]
        outcomes = run_coroutine(lambda: self._post_all(bodies)) if bodies else []
        return self._combine(n, batches, outcomes)

    def close(self) -> None:
        """Nothing to stop: each call opens its connections and closes them before it returns."""

    # ------------------------------------------------------------------ results
    def _combine(self, n: int, batches: list[range], outcomes: list[Outcome]
                 ) -> tuple[list[float], dict[str, float]]:
        scores = [self.failure_value] * n
        failed = [(rows, o) for rows, o in zip(batches, outcomes, strict=True) if o.kind != "ok"]
        for rows, o in zip(batches, outcomes, strict=True):
            if o.kind == "bad_answer":
                raise RewardFunctionError(
                    f"reward.remote.url={self.url} answered a request of {len(rows)} samples with {o.error}: "
                    f"the server breaks the schema (docs/rewards.md#the-json-schema), no score of it is used")
            if o.kind == "ok":
                for i, score in zip(rows, o.scores, strict=True):
                    scores[i] = score
        answered = [o.latency_s for o in outcomes if o.kind == "ok"]
        stats = {"remote_failures": float(sum(o.kind == "failed" for _, o in failed)),
                 "remote_timeouts": float(sum(o.kind == "timeout" for _, o in failed)),
                 "remote_retries": float(sum(o.tries - 1 for o in outcomes)),
                 "remote_latency_s": sum(answered) / len(answered) if answered else 0.0,
                 "remote_latency_max_s": max(answered, default=0.0)}
        if n:
            stats["remote_mean"] = sum(scores) / n
        if failed:
            self._report_failures(n, failed, stats)
        return scores, stats

    def _report_failures(self, n: int, failed: list[tuple[range, Outcome]], stats: dict[str, float]) -> None:
        samples = sum(len(rows) for rows, _ in failed)
        last = max((o for _, o in failed), key=lambda o: o.ended)
        if samples / n > self.max_failure_fraction:
            raise RewardFunctionError(
                f"reward.remote.url={self.url}: {samples} of {n} samples ({samples / n:.0%}) failed or timed out "
                f"in one step, more than max_failure_fraction={self.max_failure_fraction} "
                f"(reward.max_failure_fraction); last error ({last.kind}, tries: {last.tries}): {last.error}")
        logger.warning("reward.remote.url=%s: %d request(s) failed and %d timed out this batch, their %d samples "
                       "scored %s; last error (%s, tries: %d): %s", self.url, stats["remote_failures"],
                       stats["remote_timeouts"], samples, self.failure_value, last.kind, last.tries, last.error)

    # ------------------------------------------------------------------ HTTP
    @staticmethod
    def _encode(prompts, responses, answers, finished, indices) -> bytes:
        return json.dumps(request_body(prompts, responses, answers, finished, list(indices))).encode()

    async def _post_all(self, bodies: list[tuple[bytes, int]]) -> list[Outcome]:
        # httpx: imported where a remote reward is used; the config tools and the trainer start without it
        import httpx

        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        gate = asyncio.Semaphore(self.concurrency)
        # no httpx timeout: the deadline of a try is asyncio's (connection, upload and answer together)
        async with httpx.AsyncClient(headers=self.headers, limits=limits, timeout=None) as client:
            async def one(body: bytes, expected: int) -> Outcome:
                async with gate:
                    return await self._post(client, body, expected)

            return list(await asyncio.gather(*(one(body, expected) for body, expected in bodies)))

    async def _post(self, client: Any, body: bytes, expected: int) -> Outcome:
        """One request, with its retries."""
        # httpx: see _post_all
        import httpx

        error, latency = "", 0.0
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            started = time.monotonic()
            try:
                status, text = await asyncio.wait_for(self._send(client, body), self.timeout_s)
            except TimeoutError:
                return Outcome("timeout", [], f"no answer within reward.remote.timeout_s={self.timeout_s} s",
                               attempt + 1, self.timeout_s, time.monotonic())
            except httpx.TransportError as err:   # refused, reset, closed mid-answer: worth another try
                error = f"connection error: {type(err).__name__}: {err or 'no detail'}"
                continue
            except (httpx.HTTPError, _AnswerTooLarge) as err:
                return Outcome("bad_answer", [], f"an unreadable answer ({type(err).__name__}: {err})",
                               attempt + 1, time.monotonic() - started, time.monotonic())
            latency = time.monotonic() - started
            if status >= 500:
                error = f"HTTP {status}: {text[:_BODY_SHOWN]}"
                continue
            if status != 200:   # 4xx (and 3xx, 1xx): the same request would get the same answer
                return Outcome("failed", [], f"HTTP {status}: {text[:_BODY_SHOWN]}{_hint(status)}", attempt + 1,
                               latency, time.monotonic())
            try:
                return Outcome("ok", parse_scores(json.loads(text), expected), "", attempt + 1, latency,
                               time.monotonic())
            except ValueError as err:   # json's and the schema's errors
                kind = "schema" if isinstance(err, SchemaError) else "not JSON"
                return Outcome("bad_answer", [], f"an answer that is not a valid score list ({kind}: {err}; "
                                                 f"the answer began {text[:_BODY_SHOWN]!r})",
                               attempt + 1, latency, time.monotonic())
        return Outcome("failed", [], error, self.retries + 1, latency, time.monotonic())

    async def _send(self, client: Any, body: bytes) -> tuple[int, str]:
        """Status and text of the answer to one POST, read up to MAX_ANSWER_BYTES."""
        async with client.stream("POST", self.url, content=body) as answer:
            data = bytearray()
            async for chunk in answer.aiter_bytes():
                data += chunk
                if len(data) > MAX_ANSWER_BYTES:
                    raise _AnswerTooLarge(f"more than {MAX_ANSWER_BYTES} bytes")
            return answer.status_code, data.decode("utf-8", errors="replace")


def remote_from_config(reward) -> RemoteReward | None:
    """The remote reward of a run's ``reward`` section (``reward.remote``); None when its url is ''."""
    remote = reward.remote
    if not remote.url:
        return None
    # the token from the environment keeps it out of config.yaml and the checkpoints' copies of it
    token = remote.token or os.environ.get(TOKEN_ENV, "")
    return RemoteReward(remote.url, batch_size=remote.batch_size, concurrency=remote.concurrency,
                        timeout_s=remote.timeout_s, retries=remote.retries, backoff_s=remote.backoff_s,
                        headers=remote.headers, token=token, failure_value=reward.failure_value,
                        max_failure_fraction=reward.max_failure_fraction)
