"""The record every prompt source produces: a prompt, its reference answer, and where it came from."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PromptRecord:
    """One prompt with its reference answer; ``meta`` holds where it came from."""

    prompt: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
