"""Machinery shared by the selection strategies: candidates, groups, budget checks, coverage-then-fill.

A strategy is any callable ``(records: list[RelaxRecord], spec: SelectionSpec) -> Selection``. Most strategies
subclass :class:`GreedyStrategy` and only say which frame comes next:

* ``coverage_pick(group, state)`` — the next frame for one (defect, q) while it has fewer than
  ``spec.per_group_min`` frames (coverage comes first, group by group, in turn);
* ``fill_pick(open_groups, state)`` — the next frame anywhere, while the budget lasts (groups at
  ``spec.per_group_max`` or out of candidates are not open).

Strategies that plan a whole group at once (e.g. stratified) override :meth:`SelectionStrategy.choose` instead; the
budget, coverage and cap rules are then checked again by :meth:`SelectionStrategy.__call__` whatever they return.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from defectflow.campaign import SelectionSpec
from defectflow.relax import RelaxRecord
from defectflow.schemas import Frame, SelectedFrame, Selection, group_key

logger = logging.getLogger(__name__)

__all__ = [
    "Candidate",
    "SelectionState",
    "SelectionStrategy",
    "GreedyStrategy",
    "collect_candidates",
    "group_candidates",
    "group_caps",
    "check_budget",
]


@dataclass(frozen=True)
class Candidate:
    """One successful LF frame (energy present, SCF converged) and where it comes from."""

    index: int  # position in the canonical candidate order (deterministic, independent of input order)
    defect: str
    charge: int
    distortion: str
    bond_distortion: float | None
    relax_status: str
    step: int
    is_final: bool
    frame: Frame = field(repr=False, compare=False)

    @property
    def group(self) -> str:
        return group_key(self.defect, self.charge)

    @property
    def energy(self) -> float:
        return float(self.frame.energy)


def _is_candidate(f: Frame) -> bool:
    return f.energy is not None and math.isfinite(f.energy) and f.scf_converged and f.error is None


def collect_candidates(records: list[RelaxRecord | dict], max_energy_above_min: float | None = None,
                       max_force: float | None = None) -> tuple[list[Candidate], list[str]]:
    """Every successful frame of every trajectory, in a canonical order: (defect, q, distortion, step).

    Records come from jobflow as documents or dicts; records without a trajectory (not loaded from the data store)
    are skipped with a warning. ``max_energy_above_min`` (eV/atom) drops frames further above the lowest frame of
    their (defect, q); ``max_force`` (eV/Å) frames with a larger atomic force — the harvest's filters, so that HF
    labels fall where the LF training frames are. Returns the candidates and the warnings.
    """
    warnings: list[str] = []
    recs = list(records)
    # canonical order: the selection must not depend on the order in which jobs finished
    order = sorted(range(len(recs)), key=lambda i: (recs[i].defect, recs[i].charge, recs[i].distortion, i))
    out: list[Candidate] = []
    for i in order:
        r = recs[i]
        if r.trajectory is None:
            if r.status != "failed":
                warnings.append(f"{group_key(r.defect, r.charge)} {r.distortion}: no trajectory loaded, skipped")
            continue
        good = [f for f in r.trajectory.frames if _is_candidate(f)]
        if not good:
            continue
        last = good[-1]
        for f in good:
            out.append(Candidate(index=len(out), defect=r.defect, charge=r.charge, distortion=r.distortion,
                                 bond_distortion=r.bond_distortion, relax_status=r.status, step=f.step,
                                 is_final=f is last, frame=f))
    if max_energy_above_min is None and max_force is None:
        return out, warnings
    lowest: dict[str, float] = {}
    for c in out:
        lowest[c.group] = min(lowest.get(c.group, math.inf), c.energy / len(c.frame.structure))
    kept = [c for c in out
            if (max_energy_above_min is None or c.energy / len(c.frame.structure) - lowest[c.group]
                <= max_energy_above_min)
            and (max_force is None or c.frame.fmax is None or c.frame.fmax <= max_force)]
    if len(kept) < len(out):
        warnings.append(f"{len(out) - len(kept)} of {len(out)} frames outside selection.max_energy_above_min / "
                        "selection.max_force: not candidates")
    return [dataclasses.replace(c, index=i) for i, c in enumerate(kept)], warnings


def group_candidates(cands: list[Candidate]) -> dict[str, list[Candidate]]:
    """'defect q' → its candidates (canonical order). Groups are sorted by defect, then charge."""
    groups: dict[str, list[Candidate]] = {}
    for c in sorted(cands, key=lambda c: (c.defect, c.charge, c.index)):
        groups.setdefault(c.group, []).append(c)
    return groups


def group_caps(groups: dict[str, list[Candidate]], spec: SelectionSpec) -> dict[str, int]:
    """Most frames each group may receive: min(per_group_max, its number of candidates)."""
    cap = spec.per_group_max if spec.per_group_max is not None else math.inf
    return {k: int(min(cap, len(v))) for k, v in groups.items()}


def check_budget(groups: dict[str, list[Candidate]], spec: SelectionSpec) -> int:
    """The minimum number of frames coverage needs; ValueError when ``spec.budget`` is below it."""
    if spec.per_group_max is not None and spec.per_group_max < spec.per_group_min:
        raise ValueError(f"selection.per_group_max = {spec.per_group_max} is below selection.per_group_min = "
                         f"{spec.per_group_min}")
    need = sum(min(spec.per_group_min, len(v)) for v in groups.values())
    if spec.budget < need:
        raise ValueError(
            f"selection.budget = {spec.budget} is too small: {len(groups)} (defect, q) groups with "
            f"selection.per_group_min = {spec.per_group_min} need at least {need} high-fidelity single points; "
            f"raise selection.budget to ≥ {need} or lower selection.per_group_min"
        )
    return need


@dataclass
class SelectionState:
    """What a greedy strategy sees while choosing."""

    spec: Any
    candidates: list[Candidate]
    groups: dict[str, list[Candidate]]
    caps: dict[str, int]
    chosen: list[tuple[Candidate, str]] = field(default_factory=list)
    taken: set[int] = field(default_factory=set)
    per_group: dict[str, int] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)  # strategy scratch space

    def add(self, cand: Candidate, reason: str) -> None:
        if cand.index in self.taken:
            raise RuntimeError(f"strategy chose candidate {cand.index} twice")
        self.chosen.append((cand, reason))
        self.taken.add(cand.index)
        self.per_group[cand.group] = self.per_group.get(cand.group, 0) + 1

    def count(self, group: str) -> int:
        return self.per_group.get(group, 0)

    def free(self, group: str) -> list[Candidate]:
        """Candidates of ``group`` not chosen yet."""
        return [c for c in self.groups[group] if c.index not in self.taken]

    def chosen_in(self, group: str) -> list[Candidate]:
        return [c for c, _ in self.chosen if c.group == group]


class SelectionStrategy:
    """Base class: candidates → groups → budget check → :meth:`choose` → rules checked → :class:`Selection`."""

    name: ClassVar[str] = "base"

    def __call__(self, records: list[RelaxRecord], spec: SelectionSpec) -> Selection:
        cands, warnings = collect_candidates(records, spec.max_energy_above_min, spec.max_force)
        groups = group_candidates(cands)
        check_budget(groups, spec)
        state = SelectionState(spec=spec, candidates=cands, groups=groups, caps=group_caps(groups, spec))
        if groups:
            self.choose(state)
        self._check_rules(state)
        for g, v in groups.items():
            if state.count(g) < spec.per_group_min:
                warnings.append(f"{g}: only {state.count(g)} frame(s) chosen (< selection.per_group_min = "
                                f"{spec.per_group_min}): {len(v)} candidate(s)")
        if len(state.chosen) < spec.budget:
            warnings.append(f"{spec.budget - len(state.chosen)} of selection.budget = {spec.budget} left unused "
                            f"(strategy {self.name} found no further frames)")
        for w in warnings:
            logger.info("selection: %s", w)
        chosen = [
            SelectedFrame(defect=c.defect, charge=c.charge, distortion=c.distortion,
                          bond_distortion=c.bond_distortion,
                          relax_status=c.relax_status, step=c.step, is_final=c.is_final, frame=c.frame, reason=r,
                          order=i)
            for i, (c, r) in enumerate(state.chosen)
        ]
        return Selection(
            strategy=self.name, seed=spec.seed, budget=spec.budget, n_candidates=len(cands), n_chosen=len(chosen),
            per_group={g: state.count(g) for g in groups},
            per_group_candidates={g: len(v) for g, v in groups.items()},
            warnings=warnings, settings=spec.model_dump(mode="json"), chosen=chosen,
        )

    def choose(self, state: SelectionState) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_rules(self, state: SelectionState) -> None:
        spec = state.spec
        if len(state.chosen) > spec.budget:
            raise RuntimeError(f"strategy {self.name} chose {len(state.chosen)} frames, "
                               f"over the budget {spec.budget}")
        for g, n in state.per_group.items():
            if n > state.caps[g]:
                raise RuntimeError(f"strategy {self.name} chose {n} frames for {g}, over its cap {state.caps[g]}")
        for g, v in state.groups.items():
            if state.count(g) < min(spec.per_group_min, len(v)) and self.strict_coverage:
                raise RuntimeError(f"strategy {self.name} left {g} below selection.per_group_min")

    #: whether a group with enough candidates must reach per_group_min (True for the built-in strategies)
    strict_coverage: ClassVar[bool] = True


class GreedyStrategy(SelectionStrategy):
    """Coverage first (each group in turn up to per_group_min), then the budget by :meth:`fill_pick`."""

    def prepare(self, state: SelectionState) -> None:
        """Precompute whatever the picks need (descriptors, minima ...)."""

    def coverage_pick(self, group: str, state: SelectionState) -> tuple[Candidate, str] | None:
        raise NotImplementedError

    def fill_pick(self, open_groups: list[str], state: SelectionState) -> tuple[Candidate, str] | None:
        raise NotImplementedError

    def choose(self, state: SelectionState) -> None:
        spec = state.spec
        self.prepare(state)
        # coverage: round robin so that a tight budget spreads over all groups first
        target = {g: min(spec.per_group_min, state.caps[g]) for g in state.groups}
        progress = True
        while progress:
            progress = False
            for g in state.groups:
                if state.count(g) < target[g]:
                    pick = self.coverage_pick(g, state)
                    if pick is not None:
                        state.add(*pick)
                        progress = True
        # fill: the remaining budget by the strategy's own criterion
        while len(state.chosen) < spec.budget:
            open_groups = [g for g in state.groups if state.count(g) < state.caps[g]]
            if not open_groups:
                break
            pick = self.fill_pick(open_groups, state)
            if pick is None:
                break
            state.add(*pick)
