"""The JSON schema of a remote reward, version 1: what the client (``rewards.remote``) sends and what a
server (``rewards.server``, `rlhf-ds serve-reward`) answers. docs/rewards.md#the-json-schema shows it.

Request (POST, ``Content-Type: application/json``)::

    {"version": 1,
     "samples": [{"prompt": str, "response": str, "answer": str, "finished": bool, "metadata": {...}}, ...]}

Answer (200)::

    {"version": 1, "scores": [float, ...]}      # one finite number per sample, in order

``response`` is the generated text without special tokens; ``finished`` is true when it ended on eos;
``metadata`` is an object the server may ignore (rlhf_ds sends ``{"index": i}``, the sample's position in
the step's batch). An empty ``samples`` list is valid (the client's start-up probe sends one) and is
answered with an empty ``scores`` list. Any other version is refused: a new version is a new number.

Standard library only: the client, the server and the tests share these checks.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

SCHEMA_VERSION = 1
# The shared secret's environment variable, read by the client when reward.remote.token is '' and by
# `rlhf-ds serve-reward` without --token: a token there stays out of config files and process lists.
TOKEN_ENV = "RLHF_DS_REWARD_TOKEN"
SAMPLE_FIELDS = {"prompt": str, "response": str, "answer": str, "finished": bool}


class SchemaError(ValueError):
    """A request or an answer that does not follow the schema; the message names the field."""


class Samples(NamedTuple):
    """The reward contract's four columns (``rewards.functions``), in sample order."""
    prompts: list[str]
    responses: list[str]
    answers: list[str]
    finished: list[bool]


def request_body(prompts: Sequence[str], responses: Sequence[str], answers: Sequence[str],
                 finished: Sequence[bool], indices: Sequence[int]) -> dict[str, Any]:
    """The request for these samples; ``indices``: each one's position in the step's batch (metadata)."""
    samples = [{"prompt": p, "response": r, "answer": a, "finished": bool(f), "metadata": {"index": i}}
               for p, r, a, f, i in zip(prompts, responses, answers, finished, indices, strict=True)]
    return {"version": SCHEMA_VERSION, "samples": samples}


def _check_version(body: Any, what: str) -> None:
    if not isinstance(body, dict):
        raise SchemaError(f"the {what} must be a JSON object, got {type(body).__name__}")
    if body.get("version") != SCHEMA_VERSION:
        raise SchemaError(f'the {what} has "version": {body.get("version")!r}; this side speaks version '
                          f"{SCHEMA_VERSION}")


def parse_request(body: Any) -> Samples:
    """The samples of a request; SchemaError naming the first field that is wrong."""
    _check_version(body, "request")
    samples = body.get("samples")
    if not isinstance(samples, list):
        raise SchemaError(f'"samples" must be a list, got {type(samples).__name__}')
    out = Samples([], [], [], [])
    for k, sample in enumerate(samples):
        if not isinstance(sample, dict):
            raise SchemaError(f"samples[{k}] must be an object, got {type(sample).__name__}")
        for name, kind in SAMPLE_FIELDS.items():
            if not isinstance(sample.get(name), kind):
                raise SchemaError(f'samples[{k}]["{name}"] must be a {kind.__name__}, got '
                                  f"{type(sample.get(name)).__name__}")
        if not isinstance(sample.get("metadata", {}), dict):
            raise SchemaError(f'samples[{k}]["metadata"] must be an object')
        out.prompts.append(sample["prompt"])
        out.responses.append(sample["response"])
        out.answers.append(sample["answer"])
        out.finished.append(sample["finished"])
    return out


def parse_scores(body: Any, expected: int) -> list[float]:
    """The scores of an answer to a request of ``expected`` samples; SchemaError saying what is wrong."""
    _check_version(body, "answer")
    scores = body.get("scores")
    if not isinstance(scores, list):
        raise SchemaError(f'"scores" must be a list, got {type(scores).__name__}')
    if len(scores) != expected:
        raise SchemaError(f"{len(scores)} scores for a request of {expected} samples")
    for k, score in enumerate(scores):
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise SchemaError(f"scores[{k}] = {score!r} is not a finite number")
    return [float(s) for s in scores]


def answer_body(scores: Sequence[float]) -> dict[str, Any]:
    return {"version": SCHEMA_VERSION, "scores": [float(s) for s in scores]}
