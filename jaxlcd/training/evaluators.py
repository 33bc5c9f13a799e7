"""Evaluators: built from the config, run by the training loop on a schedule (big_vision's ``config.evals``).

    config.evals.grids = dict(type="lcm_grids", every=1000, steps=(1, 2, 4), prompts=(...))

``type`` is a short name of `EVALUATORS` or ``"package.module:factory"``; the factory is called as
``factory(name, eval_config, context)`` and returns an `Evaluator`. ``context`` is what the job offers its
evaluators (its models, pipeline, workdir, ...). An evaluator runs every ``every`` steps (0: never mid-run) and at
the run's last step; what it returns joins that step's metrics. Raising `StopRun` ends the run early, in order.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

from jaxlcd.errors import InputError, JaxlcdError

EVALUATORS = {"lcm_grids": "jaxlcd.distill.grids:make_grid_evaluator",
              "lcm_metrics": "jaxlcd.distill.quality:make_metrics_evaluator",
              "reward_hacking": "jaxlcd.distill.quality:make_hacking_monitor"}


class StopRun(JaxlcdError):
    """Raised by an evaluator (on every process) to end the run in order: the loop logs ``metrics``, saves a
    checkpoint and returns, and the message is logged as a warning."""

    def __init__(self, message: str, metrics: dict | None = None):
        super().__init__(message)
        self.metrics = metrics or {}


@dataclasses.dataclass
class Evaluator:
    """``run(state, step, final) -> dict of floats`` (may be empty; files it writes are its own business)."""
    name: str
    every: int
    run: Callable[[Any, int, bool], dict]

    def due(self, step: int, final: bool) -> bool:
        return final or bool(self.every and step % self.every == 0)


def resolve(type_name: str) -> Callable:
    """The factory named by ``type_name`` (a key of EVALUATORS or "module:function")."""
    target = EVALUATORS.get(type_name, type_name)
    module, _, function = target.partition(":")
    if not function:
        raise InputError(f"evaluator type {type_name!r} is unknown; use one of {', '.join(EVALUATORS)} or "
                         "'package.module:factory'")
    try:
        return getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as e:
        raise InputError(f"evaluator type {type_name!r}: cannot import {target!r} ({e})") from None


def from_config(evals, context: dict) -> list[Evaluator]:
    """One `Evaluator` per entry of ``evals`` (a ConfigDict name -> {type, every, ...}; None or empty: none)."""
    out = []
    for name, ecfg in (evals or {}).items():
        if "type" not in ecfg:
            raise InputError(f"config.evals.{name} has no 'type'")
        evaluator = resolve(ecfg["type"])(name, ecfg, context)
        if evaluator is not None:
            out.append(evaluator)
    return out
