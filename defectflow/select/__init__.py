"""Step 3: choose a small, informative subset of the low-fidelity frames for high-fidelity single points.

Every ionic step of every LF relaxation (:class:`~defectflow.relax.RelaxRecord` trajectories) is a candidate when
it has an energy and its SCF converged. A strategy picks at most ``selection.budget`` of them, giving every
(defect, q) with candidates at least ``per_group_min`` (coverage first), never more than ``per_group_max``; the
same input and seed give the same selection.

Built-in strategies (``selection.strategy``):

* ``minima`` — lowest distinct LF minima per (defect, q) (energy tolerance + StructureMatcher);
* ``fps`` — farthest-point sampling in standardised, structure-averaged SOAP space;
* ``stratified`` — energy-stratified sampling along the trajectories of each (defect, q).

Add your own with :func:`register_strategy`: any callable ``(records, spec) -> Selection``; subclass
:class:`GreedyStrategy` to reuse the coverage/budget rules and only say which frame comes next.

>>> from defectflow.select import select_frames
>>> sel = select_frames(records, campaign.selection)              # doctest: +SKIP
>>> [(c.defect, c.charge, c.step, c.reason) for c in sel.chosen]   # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Callable

from jobflow import job

from defectflow.campaign import SelectionSpec
from defectflow.relax import RelaxRecord
from defectflow.schemas import SelectedFrame, Selection, group_key
from defectflow.select.base import (
    Candidate,
    GreedyStrategy,
    SelectionState,
    SelectionStrategy,
    check_budget,
    collect_candidates,
    group_candidates,
)
from defectflow.select.strategies import FPSStrategy, MinimaStrategy, StratifiedStrategy, soap_features
from defectflow.store.tracking import tracked

__all__ = [
    "Selection",
    "SelectedFrame",
    "STRATEGIES",
    "register_strategy",
    "get_strategy",
    "select_frames",
    "select_job",
    "SelectionStrategy",
    "GreedyStrategy",
    "SelectionState",
    "Candidate",
    "MinimaStrategy",
    "FPSStrategy",
    "StratifiedStrategy",
    "collect_candidates",
    "group_candidates",
    "check_budget",
    "group_key",
    "soap_features",
]

StrategyFn = Callable[[list["RelaxRecord"], "SelectionSpec"], Selection]

#: name → strategy (a callable ``(records, spec) -> Selection``)
STRATEGIES: dict[str, StrategyFn] = {
    "minima": MinimaStrategy(),
    "fps": FPSStrategy(),
    "stratified": StratifiedStrategy(),
}


def register_strategy(name: str, strategy: StrategyFn | type | None = None, overwrite: bool = False):
    """Register a strategy under ``name``; usable as ``register_strategy("mine", fn)`` or as a decorator.

    A class (e.g. a :class:`GreedyStrategy` subclass) is instantiated without arguments.
    """

    def _register(obj):
        if name in STRATEGIES and not overwrite:
            raise ValueError(f"selection strategy {name!r} is already registered (pass overwrite=True)")
        inst = obj() if isinstance(obj, type) else obj
        if not callable(inst):
            raise TypeError(f"a selection strategy must be callable (records, spec) -> Selection, got {obj!r}")
        STRATEGIES[name] = inst
        return obj

    return _register if strategy is None else _register(strategy)


def get_strategy(name: str) -> StrategyFn:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"selection.strategy: unknown strategy {name!r}; registered: "
                         f"{', '.join(sorted(STRATEGIES))}") from None


def _as_spec(spec: Any) -> SelectionSpec:
    if spec is None:
        return SelectionSpec()
    if isinstance(spec, SelectionSpec):
        return spec
    return SelectionSpec.model_validate(spec)


def select_frames(records: list[RelaxRecord | dict], spec: SelectionSpec | dict | None = None,
                  strategy: str | StrategyFn | None = None) -> Selection:
    """Choose frames for high-fidelity single points.

    Args:
        records: LF relaxation records (documents or their dicts) with their trajectories loaded.
        spec: the campaign's ``selection`` section (or its dict); defaults apply when None.
        strategy: override ``spec.strategy`` with a registered name or a callable ``(records, spec) -> Selection``
            (``spec.strategy`` only accepts the built-in names).

    Raises:
        ValueError: when ``spec.budget`` is below what per-group coverage needs (the message names
            ``selection.budget`` and the minimum), or for an unknown strategy name.
    """
    spec = _as_spec(spec)
    strategy = strategy if strategy is not None else spec.strategy
    fn = get_strategy(strategy) if isinstance(strategy, str) else strategy
    return fn(records, spec)


@job(data="chosen")
@tracked("select", cache=False)
def select_job(records: list[RelaxRecord | dict], spec_dict: dict[str, Any] | None = None,
               strategy: str | None = None) -> Selection:
    """jobflow job: :func:`select_frames` on the LF records; the chosen frames go to the ``data`` store."""
    return select_frames(records, spec_dict, strategy=strategy)
