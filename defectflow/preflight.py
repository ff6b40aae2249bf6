"""Checks run before anything is computed: ``defectflow validate`` and ``defectflow run`` run the same ones.

:func:`preflight` returns one ``"field: what is wrong"`` line per problem (empty: good to go), in the order a user
would fix them:

1. the host structure file (readable, a file, atoms in it),
2. defect names against the host: elements that exist, a vacancy or antisite of an element the host has, a
   substituting element in ``defects.extrinsic`` when the host lacks it; ``charges`` keys that name such a defect,
3. the engines' set-up checks (``Engine.check``): an ASE calculator that can be imported (module and attribute),
   executables (pw.x, cp2k_shell, VASP), pseudopotentials / basis sets for every element (QE, CP2K),
4. the store: a MongoDB URI configured and a server that answers within a few seconds (:func:`check_store`), and a
   work directory that can be created (:func:`check_work_dir`),
5. unless ``fast``: doped's defect generation itself, so a defect doped does not find, or a ``charges`` key that
   matches none of doped's names, is reported (the slow part: seconds to a minute).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from defectflow.campaign import DEFECT_KINDS, Campaign, CampaignError

__all__ = ["preflight", "check_store", "check_work_dir", "check_defect_names", "check_engines", "check_generated"]


def _elements_of(name: str) -> tuple[str, str | None, str]:
    """(kind, element, site element) of a doped name: ('vacancy', 'Si', None) for v_Si, ('substitution', 'Ga',
    'As') for Ga_As, ('interstitial', 'Si', None) for Si_i (site suffixes such as _1 / _C2v ignored)."""
    parts = name.split("_")
    if parts[0] == "v":
        return "vacancy", parts[1], None
    if parts[1] == "i":
        return "interstitial", parts[0], None
    return "substitution", parts[0], parts[1]


def check_defect_names(campaign: Campaign, host_elements: set[str]) -> list[str]:
    """Defect names and ``charges`` keys against the host's elements (no doped run: milliseconds)."""
    from pymatgen.core.periodic_table import Element

    problems: list[str] = []
    extrinsic = set(campaign.defects.extrinsic)
    host = "".join(sorted(host_elements))

    def why_not(name: str) -> str | None:
        kind, el, site = _elements_of(name)
        for e in (el, site):
            if e is not None and not Element.is_valid_symbol(e):
                return f"{e!r} is not a chemical element"
        if kind == "vacancy" and el not in host_elements:
            return f"the host ({host}) has no {el} to remove"
        if kind == "substitution" and site not in host_elements:
            return f"the host ({host}) has no {site} site to substitute"
        if kind in ("substitution", "interstitial") and el not in host_elements and el not in extrinsic:
            return f"{el} is neither in the host ({host}) nor in defects.extrinsic"
        if kind == "substitution" and el == site:
            return f"{el} on its own site is not a defect"
        return None

    names = [n for n in campaign.defects.include if n not in DEFECT_KINDS]
    for n in names:
        reason = why_not(n)
        if reason:
            problems.append(f"defects.include: {n!r}: {reason}")
    if isinstance(campaign.charges, dict):
        for key in campaign.charges:
            reason = why_not(key)
            if reason:
                problems.append(f"charges.{key}: no such defect: {reason}")
    return problems


def _engine_structure(campaign: Campaign, host):
    """A structure with every element a job may see (host + extrinsic), for the engines' per-element checks."""
    from pymatgen.core import Lattice, Structure

    elements = sorted({sp.symbol for sp in host.composition} | set(campaign.defects.extrinsic))
    coords = [[(i + 0.5) / (len(elements) + 1)] * 3 for i in range(len(elements))]
    return Structure(Lattice.cubic(max(10.0, 3.0 * len(elements))), elements, coords)


def check_engines(campaign: Campaign, host) -> list[str]:
    """Each fidelity's ``Engine.check`` (executables, pseudopotentials, basis sets, importable calculator)."""
    from defectflow.engines import EngineError, get_engine

    problems: list[str] = []
    structure = _engine_structure(campaign, host)
    seen: dict[str, str] = {}
    for fid in ("low", "high"):
        spec = getattr(campaign.fidelities, fid)
        key = spec.model_dump_json()
        if key in seen:  # the same engine settings: checked once
            continue
        seen[key] = fid
        try:
            get_engine(spec, fidelity=fid).check(structure)
        except EngineError as exc:
            text = " ".join(str(exc).split())
            problems.append(f"fidelities.{fid}: {text}")
        except Exception as exc:  # noqa: BLE001 - a check that crashes is a set-up problem too
            problems.append(f"fidelities.{fid}: {spec.engine} set-up check failed ({type(exc).__name__}: {exc})")
    return problems


def check_work_dir(path: str | Path, create: bool = False) -> list[str]:
    """The work directory: not a file, and creatable (``create=True`` creates it; else only checked)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return [f"execution.work_dir: {path} is a file, not a directory"]
    if path.is_dir():
        return [] if os.access(path, os.W_OK | os.X_OK) else [f"execution.work_dir: {path} is not writable"]
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return [f"execution.work_dir: cannot create {path}: {parent} is a file"]
    if not os.access(parent, os.W_OK | os.X_OK):
        return [f"execution.work_dir: cannot create {path}: {parent} is not writable"]
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return [f"execution.work_dir: cannot create {path}: {exc.strerror or exc}"]
    return []


def check_store(store: str) -> list[str]:
    """A MongoDB store: a URI configured and a server answering (one ping, a few seconds at most)."""
    if store == "embedded":
        return []
    from defectflow.store import check_mongo, resolve_uri

    try:
        check_mongo(resolve_uri(store))
    except ValueError as exc:
        return [str(exc)]
    return []


def check_generated(campaign: Campaign, generation) -> list[str]:
    """``charges`` keys that match none of the (defect, q) sets doped generated."""
    if not isinstance(campaign.charges, dict):
        return []
    names = sorted({ds.defect for ds in generation.distortion_sets})
    return [f"charges.{key}: doped generated no defect {key!r} in this campaign (it has {', '.join(names)})"
            for key in campaign.charges
            if not any(n == key or n.startswith(key + "_") for n in names)]


def preflight(campaign: Campaign, fast: bool = False, work_dir: str | Path | None = None, create: bool = False,
              generation_out: list | None = None) -> list[str]:
    """Every check of the module docstring; returns the problems (one line each, naming the field).

    ``work_dir``: the work directory to check (default: the campaign's); ``create``: create it (``run``).
    ``generation_out``: a list that receives doped's GenerationResult when the slow check ran (``run`` reuses it
    instead of generating again)."""
    try:
        host = campaign.host_structure()
    except CampaignError as exc:
        return list(exc.problems)
    problems = check_defect_names(campaign, {sp.symbol for sp in host.composition})
    problems += check_engines(campaign, host)
    problems += check_work_dir(work_dir or campaign.work_dir())
    problems += check_store(campaign.execution.store)
    if not problems and create:  # only once everything else is fine: a failed check leaves nothing behind
        problems += check_work_dir(work_dir or campaign.work_dir(), create=True)
    if problems or fast:
        return problems
    from defectflow.generate import generate

    try:
        generation = generate(campaign)
    except CampaignError as exc:
        return [re.sub(r"^.*?: (defects\.)", r"\1", p) for p in exc.problems]
    problems += check_generated(campaign, generation)
    if generation_out is not None and not problems:
        generation_out.append(generation)
    return problems
