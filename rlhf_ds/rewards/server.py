"""The HTTP server of `rlhf-ds serve-reward`: one scoring function behind the JSON schema of
``rewards.schema`` (docs/rewards.md#the-server).

Endpoints: ``POST /score`` (a request of the schema -> its scores) and ``GET /health``
(``{"status": "ok", "version": 1}``). Answers other than 200, each with ``{"error": "..."}``:

- 401: the server has a token and the request does not carry ``Authorization: Bearer <token>``;
- 413: a request body over the size limit (checked on Content-Length before reading, and while reading);
- 400: a body that is not JSON or does not follow the schema (the message names the field);
- 500: the scoring function failed (a rule function raised, timed out or broke its contract; a reward
  model produced a non-finite score). The client retries a 5xx, then counts the request as failed.

It binds where it is told (`serve-reward` defaults to 127.0.0.1). The token keeps other users of a
shared host or network out; it is no sandbox: a reward file runs with the server's rights.
"""
# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations (``Request``) at
# run time, and those name classes imported inside build_app.
import hmac
import json
import logging
import math
from typing import Any, Callable

from rlhf_ds.rewards.functions import RewardFunctionError
from rlhf_ds.rewards.runner import RewardRunner
from rlhf_ds.rewards.schema import SCHEMA_VERSION, answer_body, parse_request

logger = logging.getLogger(__name__)

# (prompts, responses, answers, finished) -> one finite score per sample
Scorer = Callable[[list[str], list[str], list[str], list[bool]], list[float]]
DEFAULT_MAX_REQUEST_MB = 16.0


class RuleScorer:
    """A RewardRunner of one function as a Scorer that never hides a failure: a call in which the
    function raised or timed out on any sample raises, so the server answers 500 instead of sending
    ``failure_value`` as if it were a score (the client then counts the request as failed)."""

    def __init__(self, runner: RewardRunner):
        self.runner = runner

    def __call__(self, prompts: list[str], responses: list[str], answers: list[str], finished: list[bool]
                 ) -> list[float]:
        scores, stats = self.runner(prompts, responses, answers, finished)
        if stats["failures"] or stats["timeouts"]:
            raise RewardFunctionError(
                f"reward function {self.runner.functions[0]!r}: {stats['failures']:g} call(s) raised or crashed "
                f"and {stats['timeouts']:g} timed out on this request (the server's log has the first error)")
        return scores


def checked(scores: list[float], expected: int) -> list[float]:
    """``scores`` when they are ``expected`` finite numbers; else ValueError (the server answers 500)."""
    if len(scores) != expected:
        raise ValueError(f"the scorer returned {len(scores)} scores for {expected} samples")
    bad = [k for k, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        raise ValueError(f"the scorer returned the non-finite score {scores[bad[0]]} for sample {bad[0]}")
    return scores


def _error(status: int, message: str, **headers: str) -> Any:
    # fastapi: imported only where the server runs
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def authorised(header: str, token: str) -> bool:
    """Whether an Authorization header carries ``token`` (compared in constant time)."""
    return hmac.compare_digest(header.encode(), f"Bearer {token}".encode())


async def _read_body(request: Any, limit: int) -> bytes | None:
    """The request body, or None when it is over ``limit`` bytes (declared or sent)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def build_app(score: Scorer, *, token: str = "", max_request_bytes: int = int(DEFAULT_MAX_REQUEST_MB * 2**20)
              ) -> Any:
    """The FastAPI app serving ``score``; ``token`` '' = no authentication."""
    # fastapi: imported only where the server runs
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse

    app = FastAPI(title="rlhf_ds reward", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health", response_model=None)
    def health():
        return {"status": "ok", "version": SCHEMA_VERSION}

    @app.post("/score", response_model=None)
    async def score_request(request: Request):
        if token and not authorised(request.headers.get("authorization", ""), token):
            return _error(401, "missing or wrong bearer token", **{"WWW-Authenticate": "Bearer"})
        body = await _read_body(request, max_request_bytes)
        if body is None:
            return _error(413, f"request body over the server's limit of {max_request_bytes} bytes: send fewer "
                               "samples per request (reward.remote.batch_size)")
        try:
            samples = parse_request(json.loads(body))
        except (ValueError, RecursionError) as err:   # not UTF-8, not JSON (or nested past the parser), not the schema
            return _error(400, f"malformed request: {err} (schema version {SCHEMA_VERSION}: docs/rewards.md)")
        try:
            scores = await run_in_threadpool(score, *samples)   # the event loop keeps serving meanwhile
            return JSONResponse(answer_body(checked(scores, len(samples.prompts))))
        except Exception as err:
            logger.exception("scoring a request of %d samples failed", len(samples.prompts))
            return _error(500, f"scoring failed: {type(err).__name__}: {err}")

    return app


def serve(app: Any, host: str, port: int) -> None:
    """Serve ``app`` until SIGINT / SIGTERM."""
    # uvicorn: imported only where the server runs
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
