"""KL coefficient controllers: fixed, or adaptive toward a target KL (Ziegler et al. 2019, arXiv:1909.08593).

Both expose ``value`` (the current coefficient), ``update(current_kl, n_steps)`` and
``state_dict`` / ``load_state_dict`` so that a resumed run continues with the coefficient it had.
A non-finite KL (or checkpointed coefficient) is refused with a ValueError rather than stored: one NaN
in an adaptive coefficient would stay NaN for the rest of the run. The trainer checks the KL first.
"""
from __future__ import annotations

import math
from typing import Union


class FixedKLController:
    """A constant coefficient. Its value comes from the config, so loading a checkpoint keeps it."""

    kind = "fixed"

    def __init__(self, coef: float):
        if coef < 0:
            raise ValueError(f"algo.kl_coef must be >= 0, got {coef}")
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        _check_finite_kl(current_kl)  # the same contract as the adaptive controller
        del n_steps  # nothing adapts

    def state_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        _check_kind(state, self.kind)


class AdaptiveKLController:
    """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon).

    ``n_steps`` is the number of samples (or steps) since the last update, ``horizon`` the number
    over which the error is corrected; the clip keeps one noisy KL estimate from swinging beta.
    """

    kind = "adaptive"

    def __init__(self, init_coef: float, target: float, horizon: int):
        if init_coef < 0:
            raise ValueError(f"algo.kl_coef must be >= 0, got {init_coef}")
        if target <= 0:
            raise ValueError(f"algo.kl_target must be > 0 for adaptive KL, got {target}")
        if horizon <= 0:
            raise ValueError(f"algo.kl_horizon must be > 0 for adaptive KL, got {horizon}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(_check_finite_kl(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        _check_kind(state, self.kind)
        value = float(state["value"])
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"KL controller checkpoint holds coefficient {value!r}; a coefficient must be "
                             f"finite and >= 0")
        self.value = value


KLController = Union[FixedKLController, AdaptiveKLController]


def _check_finite_kl(current_kl: float) -> float:
    value = float(current_kl)
    if not math.isfinite(value):
        raise ValueError(f"KL controller update: current_kl must be a finite number, got {value!r}; the "
                         f"coefficient was left at its previous value")
    return value


def _check_kind(state: dict, expected: str) -> None:
    if state.get("kind") != expected:
        raise ValueError(
            f"KL controller checkpoint holds kind {state.get('kind')!r} but the config asks for {expected!r} "
            f"(algo.adaptive_kl changed since the checkpoint was written)"
        )


def make_kl_controller(coef: float, *, adaptive: bool, target: float = 0.0, horizon: int = 0) -> KLController:
    """The controller selected by ``algo.adaptive_kl`` (with ``algo.kl_target`` / ``algo.kl_horizon``)."""
    if adaptive:
        return AdaptiveKLController(coef, target, horizon)
    return FixedKLController(coef)
