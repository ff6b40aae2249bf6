"""Pure helpers shared by the benchmark scripts (and tested by tests/test_benchmarks.py).

Nothing here runs an engine: structure and level comparisons, ratios, goal verdicts and plain-text tables. (Cost per
step comes from :meth:`defectflow.results.Results.cost`, not from a meter of the benchmarks' own.)
Heavy imports (pymatgen, defectflow) happen inside functions.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Iterable, Sequence
from itertools import pairwise
from typing import Any

# ---------------------------------------------------------------------------------------------------------------
# comparisons
# ---------------------------------------------------------------------------------------------------------------
def cpu_seconds() -> float:
    """CPU-s of this process and its reaped children (user + system): how both benchmark sides count cost."""
    import resource

    me, ch = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + ch.ru_utime + ch.ru_stime


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is not positive."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


#: An MPI engine's ranks each keep a core busy while the machine is theirs: CPU-s ≈ wall-s × ranks (the benchmark's
#: clean QE single points: 0.91–0.95). Below this share the HF jobs shared the cores with other work, and their
#: CPU-seconds are not the clean figure a cost ratio needs: MPI ranks spin while they wait. Measured (session 11): the
#: `far` selection single points of session 9 ran at 0.68 of their cores and cost 2–3× their clean CPU-s.
CLEAN_CORE_SHARE = 0.8


def core_share(cpu_s: float | None, wall_s: float | None, procs: int) -> float | None:
    """CPU-s / (wall-s × procs): the share of its cores a job had (≈ 1 on a quiet machine); None without wall time."""
    if cpu_s is None or not wall_s or wall_s <= 0 or procs < 1:
        return None
    return cpu_s / (wall_s * procs)


def contended_steps(rows: Iterable[dict[str, Any]], steps: Iterable[str], procs: int,
                    min_wall_s: float = 5.0) -> dict[str, float]:
    """Step → core share, for the rows of ``steps`` (cost rows of ``Results.cost``: step, cpu_s, wall_s) that ran
    below :data:`CLEAN_CORE_SHARE` for at least ``min_wall_s`` seconds of wall time."""
    wanted = set(steps)
    out = {}
    for r in rows:
        share = core_share(r.get("cpu_s"), r.get("wall_s"), procs)
        if r.get("step") in wanted and share is not None and (r.get("wall_s") or 0) >= min_wall_s \
                and share < CLEAN_CORE_SHARE:
            out[r["step"]] = round(share, 3)
    return out


def aligned_rmsd(reference, other) -> dict[str, float | None]:
    """Ground-state RMSD in Å, two ways.

    ``same_order``: :func:`defectflow.search.rmsd` (same atom order, minimum image — the structures all start
    from the same ShakeNBreak cells, so the order is shared). ``aligned``: ``other`` first mapped onto
    ``reference`` with pymatgen's StructureMatcher (ltol 0.2, stol 0.3, no scaling/supercells: undoes a rigid
    shift or a symmetry-equivalent relabelling), then the same RMSD; None when the matcher finds no mapping.
    ``rmsd`` (the figure reported) is the smaller of the two (both are legitimate atom mappings).
    """
    import warnings

    from pymatgen.analysis.structure_matcher import StructureMatcher

    from defectflow.search import rmsd

    plain = rmsd(reference, other)
    aligned = None
    sm = StructureMatcher(ltol=0.2, stol=0.3, angle_tol=5, primitive_cell=False, scale=False,
                          attempt_supercell=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            mapped = sm.get_s2_like_s1(reference, other)
        except Exception:  # noqa: BLE001 - the matcher can fail on odd cells; fall back to the plain RMSD
            mapped = None
    if mapped is not None and len(mapped) == len(reference):
        aligned = rmsd(reference, mapped)
    best = plain if aligned is None else min(plain, aligned)
    return {"rmsd": best, "same_order": plain, "aligned": aligned}


def pair_level(formation_vbm: dict[str, float], defect: str, q1: int, q2: int) -> float | None:
    """ε(q1/q2) in eV above the VBM from formation energies at E_F = VBM (keys 'defect q', e.g. 'v_Si +1'):
    E_f(q, E_F) = E_f(q, 0) + q·E_F, so the crossing is at (E_f(q2) − E_f(q1)) / (q1 − q2)."""
    from defectflow.schemas import group_key

    k1, k2 = group_key(defect, q1), group_key(defect, q2)
    if k1 not in formation_vbm or k2 not in formation_vbm or q1 == q2:
        return None
    return (formation_vbm[k2] - formation_vbm[k1]) / (q1 - q2)


def adjacent_levels(formation_vbm: dict[str, float]) -> dict[tuple[str, int, int], float]:
    """ε(q/q−1) for every pair of consecutive computed charge states of every defect, from formation energies at
    E_F = VBM ('defect q' keys). These are the thermodynamic transition levels whether or not they fall in the
    gap, and whether or not the middle charge state is ever stable (doped lists only stable ones in range)."""
    by_defect: dict[str, list[int]] = {}
    for key in formation_vbm:
        defect, q = key.rsplit(" ", 1)
        by_defect.setdefault(defect, []).append(int(q))
    out = {}
    for defect, qs in by_defect.items():
        qs = sorted(qs, reverse=True)
        for q1, q2 in pairwise(qs):
            out[(defect, q1, q2)] = pair_level(formation_vbm, defect, q1, q2)
    return out


def level_errors(reference_formation_vbm: dict[str, float],
                 other_formation_vbm: dict[str, float] | None) -> list[dict[str, Any]]:
    """Per consecutive charge pair of the reference: ε(q/q−1) of the reference and of the other method (both from
    doped formation energies at E_F = VBM, see :func:`adjacent_levels`) and the error in eV (None when the other
    method lacks one of the two charge states)."""
    other = other_formation_vbm or {}
    out = []
    for (defect, q1, q2), ref in adjacent_levels(reference_formation_vbm).items():
        level = pair_level(other, defect, q1, q2)
        out.append({"defect": defect, "q_from": q1, "q_to": q2, "reference": ref, "level": level,
                    "error": None if level is None or ref is None else level - ref})
    return out


def max_abs(values: Iterable[float | None]) -> float | None:
    """Largest |v| over the values that are not None (None when there are none)."""
    vals = [abs(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return max(vals) if vals else None


def verdict(value: float | None, goal: float, higher_is_better: bool = False) -> str:
    """'met' / 'MISSED' against a goal ('n/a' without a value)."""
    if value is None:
        return "n/a"
    ok = value >= goal if higher_is_better else value <= goal
    return "met" if ok else "MISSED"


# ---------------------------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------------------------
def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: floats with ``digits`` decimals, None as '—'."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    """A GitHub-markdown table (also readable as plain text)."""
    headers = [h.replace("|", "\\|") for h in headers]  # a '|' inside a cell would split the markdown column
    cells = [[fmt(c, digits).replace("|", "\\|") for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join([line, sep, *body])


def machine() -> dict[str, Any]:
    """CPU model, core count, load average, platform (for the JSON)."""
    import os

    model = None
    try:
        with open("/proc/cpuinfo") as fh:
            for ln in fh:
                if ln.startswith("model name"):
                    model = ln.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpu_model": model, "cores": os.cpu_count(), "load_average_at_end": load,
            "python": platform.python_version(), "platform": platform.platform(), "gpu": None}


def rounded(obj: Any, digits: int = 4) -> Any:
    """Round floats recursively (keeps the JSON small and diffable)."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj
