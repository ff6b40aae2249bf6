"""Jobs of step 5: surrogate search, foundation-model baseline, HF verification, top-up retraining and levels.

Step 5 carries one typed document from round to round, :class:`SearchContext` (the campaign's search, verify,
mlip and levels sections as their models, the starts, the bulk reference, the training data so far, the HF cost so
far and every round's record). ``finalize`` is dynamic: when a verified HF energy disagrees with the surrogate by
more than ``verify.energy_threshold`` (meV/atom) and top-up rounds remain, it replaces itself by: retrain with the
disagreeing frames added → search → verify → finalize (next round). Otherwise it computes the levels and the
campaign result. What happened in each round is recorded in :class:`~defectflow.schemas.CampaignResult`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from jobflow import Flow, OutputReference, Response, job
from pydantic import BaseModel, Field

from defectflow.campaign import FidelitiesSpec, LevelsSpec, MlipSpec, SearchSpec, VerifySpec
from defectflow.engines import get_engine
from defectflow.levels import LevelEntry, compute_levels, with_potentials
from defectflow.relax import HarvestFilter
from defectflow.schemas import (
    BulkReference,
    CampaignResult,
    DistortionSet,
    Frame,
    GroundStateRecord,
    GroupVerification,
    KeptGroundState,
    LabelledSet,
    MSONDict,
    PathFrame,
    RefineLeftover,
    RoundRecord,
    SearchResult,
    SearchStart,
    Structure,
    TopUpFrame,
    TrainedModel,
    TrainingResult,
    Verification,
    group_key,
)
from defectflow.schemas.core import ElectrostaticPotential
from defectflow.search import plot_landscape, rattled_starts, rmsd, search_ground_state
from defectflow.search.batched import batched_relax
from defectflow.search.uncertainty import committee_predict
from defectflow.steps import name_job
from defectflow.store.tracking import tracked
from defectflow.train.data import hf_extxyz
from defectflow.train.jobs import committee_names, train_job
from defectflow.train.surrogate import load_calculator, resolve_device, torch_threads

logger = logging.getLogger(__name__)

__all__ = [
    "SearchContext",
    "SearchGroup",
    "shakenbreak_starts",
    "search_starts",
    "surrogate_search",
    "baseline_search",
    "verify_minima",
    "refine_leftover",
    "minima_to_verify",
    "known_hf_lowest",
    "best_verified",
    "round_record",
    "plan_topup",
    "label_topup",
    "plot_verified",
    "finalize",
    "start_search",
    "build_search_round",
    # documents, re-exported from defectflow.schemas
    "Verification",
    "GroupVerification",
    "GroundStateRecord",
    "CampaignResult",
]


class SearchGroup(BaseModel):
    """One (defect, q) of the search: its ShakeNBreak starts and its doped entry (for the levels)."""

    defect: str
    charge: int
    starts: list[SearchStart] = Field(description="ShakeNBreak starts (the rattled extra starts are added per round)")
    defect_entry: MSONDict | None = Field(None, description="doped DefectEntry (as_dict), for the levels")

    @property
    def key(self) -> str:
        return group_key(self.defect, self.charge)


class SearchContext(BaseModel):
    """Everything step 5 needs, carried from one search round to the next."""

    campaign: str = Field(description="Campaign name")
    round: int = Field(0, description="Search round (0: the first model; n: after n top-ups)")
    search: SearchSpec
    verify: VerifySpec
    mlip: MlipSpec
    levels: LevelsSpec
    fidelities: FidelitiesSpec
    seed: int = Field(description="Random seed of the extra rattled starts (the campaign's distortions.seed)")
    groups: list[SearchGroup] = Field(description="Every (defect, q) searched")
    bulk_structure: Structure = Field(description="Pristine supercell")
    plot_dir: str = Field(description="Folder of the search landscapes and the formation-energy diagram")
    model_plot_dir: str = Field(description="Folder of the model plots (parity, PCA)")
    bulk: BulkReference | None = Field(None, description="Bulk energies and HF band edges (set by start_search)")
    bulk_potential: ElectrostaticPotential | None = Field(
        None, description="Electrostatic potential of the bulk HF single point, for eFNV/FNV (set by start_search)")
    lf_extxyz: str = Field("", description="LF training frames so far (extxyz)")
    hf_extxyz: str = Field("", description="HF training frames so far (extxyz)")
    n_hf_selected: int = Field(0, description="Frames selected for HF single points in step 3")
    hf_calls: int = Field(0, description="HF calculations so far: bulk + selected single points + verifications")
    hf_seconds: float = Field(0.0, description="Wall seconds of those HF calculations")
    hf_cpu_seconds: float = Field(0.0, description="CPU seconds of the verification and top-up HF calculations")
    history: list[RoundRecord] = Field(default_factory=list, description="Every finished round")
    best_verified: dict[str, KeptGroundState] = Field(
        default_factory=dict, description="'defect q' → the verified minimum with the lowest HF energy so far")
    training_uuid: str | None = Field(None, description="uuid of the train job of this round (warm starts)")
    pending: list[TopUpFrame] = Field(
        default_factory=list, description="Frames the last round added to the training set (recorded in the next "
        "round's record, whose model they trained)")


def shakenbreak_starts(distortion_set: DistortionSet) -> list[SearchStart]:
    """The ShakeNBreak starts of one (defect, q) as search starts."""
    return [SearchStart(label=s.label, bond_distortion=s.bond_distortion, structure=s.structure)
            for s in distortion_set.structures]


def search_starts(starts: list[SearchStart], spec: SearchSpec, seed: int) -> list[SearchStart]:
    """The starts a surrogate search relaxes: the ShakeNBreak starts + ``spec.extra_starts`` rattled copies of each
    (Gaussian, ``spec.rattle_stdev`` Å, deterministic for ``seed``)."""
    return starts + rattled_starts(starts, spec.extra_starts, spec.rattle_stdev, seed)


@job(data=["minima", "landscape", "candidates"])
@tracked("search", ignore=("plot_dir",))
def surrogate_search(model: TrainedModel, defect: str, charge: int, starts: list[SearchStart], spec: SearchSpec,
                     plot_dir: str | None = None, seed: int = 0, committee: list[TrainedModel] | None = None,
                     plot_suffix: str = "") -> SearchResult:
    """Relax every ShakeNBreak start (+ rattled copies) with the trained surrogate's HF head at charge q: all
    together (:func:`use_batched`, torch-sim) or one at a time (ASE), in ``spec.precision``.

    ``committee`` (the main model's fellow members, main included or not): their spread gives the energy and force
    uncertainty at every minimum and picks the ``spec.candidates`` most uncertain path frames (batched search,
    every ``spec.path_every`` steps) as top-up candidates."""
    members = [model] + [m for m in (committee or []) if m.model_files != model.model_files]
    path_every = spec.path_every if len(members) > 1 else 0  # paths feed the committee's top-up candidates
    if use_batched(spec):
        def relax(structures):
            with torch_threads():
                return batched_relax(model, "hf", structures, charge, fmax=spec.fmax, max_steps=spec.max_steps,
                                     dtype=spec.precision, device=spec.device, path_every=path_every)
        engines = {"relax_batch": relax}
    else:
        engines = {"calculator_factory": lambda: load_calculator(model, head="hf", device=spec.device,
                                                                 dtype=spec.precision)}

    def spread(structures):
        with torch_threads():
            p = committee_predict(members, "hf", structures, charge, dtype=spec.precision, device=spec.device)
        return p.energies[0], p.relative_energy_std, p.force_std

    result = search_ground_state(
        defect, charge, search_starts(starts, spec, seed), model="mace:hf", fmax=spec.fmax,
        max_steps=spec.max_steps, energy_tolerance=spec.energy_tolerance, plot_dir=None,
        min_distance_factor=spec.min_distance_factor, committee=spread if len(members) > 1 else None,
        n_candidates=spec.candidates, path_every=path_every, **engines,
    )
    result.committee_size = len(members)
    if plot_dir is not None and result.landscape:
        result.plot = plot_landscape(result, search_starts(starts, spec, seed), Path(plot_dir), suffix=plot_suffix)
    return result


def use_batched(spec: SearchSpec) -> bool:
    """``search.batched``: true/false, or auto = batched when the search runs on a GPU."""
    if spec.batched != "auto":
        return bool(spec.batched)
    return resolve_device(spec.device) == "cuda"


@job(data=["minima", "landscape"])
@tracked("baseline", ignore=("plot_dir",))
def baseline_search(defect: str, charge: int, starts: list[SearchStart], spec: SearchSpec, model: str = "chgnet",
                    plot_dir: str | None = None) -> SearchResult:
    """The same ShakeNBreak starts relaxed with a foundation model (CHGNet 0.3.0 or its r2SCAN model: no charge
    input, weights ship with the package) for the baseline ground-state RMSD."""
    checkpoints = {"chgnet": "0.3.0", "chgnet-r2scan": "r2scan"}  # file names in the chgnet package
    if model not in checkpoints:
        raise ValueError(f"search.foundation_baseline: expected one of {', '.join(map(repr, checkpoints))}, "
                         f"got {model!r}")

    def factory():
        from chgnet.model import CHGNet
        from chgnet.model.dynamics import CHGNetCalculator

        return CHGNetCalculator(model=CHGNet.load(model_name=checkpoints[model], use_device="cpu", verbose=False),
                                use_device="cpu")

    return search_ground_state(defect, charge, starts, factory, model=model, fmax=spec.fmax,
                               max_steps=spec.max_steps, energy_tolerance=spec.energy_tolerance, plot_dir=plot_dir,
                               min_distance_factor=spec.min_distance_factor)


def minima_to_verify(search: SearchResult, spec: VerifySpec) -> list[tuple[int, str]]:
    """(index into ``search.minima``, role): the ``spec.top_k`` lowest distinct minima ('rank 1' …), then of the
    others within ``spec.uncertain_window`` eV of the lowest, the one with the largest committee energy spread
    ('most uncertain')."""
    chosen = [(i, f"rank {i + 1}") for i in range(min(spec.top_k, len(search.minima)))]
    if spec.uncertain_window > 0 and search.minima:
        e0 = search.minima[0].energy
        rest = [i for i in range(len(chosen), len(search.minima))
                if search.minima[i].energy - e0 <= spec.uncertain_window and search.minima[i].energy_std is not None]
        if rest:
            chosen.append((max(rest, key=lambda i: search.minima[i].energy_std), "most uncertain"))
    return chosen


#: The thresholds an HF top-up frame must pass to be trained on: the LF harvest's (one place for them). Measured
#: (session 8): a verified surrogate minimum 8.4 eV/atom above its group's lowest HF frame, added to the training
#: set, made the warm-started committee's validation error grow every epoch (339 → 961 meV/atom).
TOPUP_FILTER = HarvestFilter()


def known_lowest_per_atom(hf_extxyz: str, defect: str, charge: int) -> float | None:
    """The lowest HF energy per atom of ``defect`` at ``charge`` in an HF training set (:func:`known_hf_lowest`),
    eV/atom, or None."""
    known = known_hf_lowest(hf_extxyz, defect, charge)
    return None if known is None else known[1] / len(known[2])


def lowest_known_per_atom(hf_extxyz: str, gv: GroupVerification) -> float | None:
    """The lowest HF energy per atom known for ``gv``'s (defect, q): the HF training set's and this round's
    verifications, eV/atom."""
    known = known_lowest_per_atom(hf_extxyz, gv.defect, gv.charge)
    values = [] if known is None else [known]
    values += [c.hf_energy / len(c.hf_frame.structure) for c in gv.checks
               if c.hf_energy is not None and c.hf_frame is not None]
    return min(values) if values else None


def known_hf_lowest(hf_extxyz: str, defect: str, charge: int):
    """The HF frame of ``defect`` at ``charge`` with the lowest HF energy in an HF training set (extxyz text: the
    selection's single points and earlier rounds'), as (label, energy eV, Structure), or None."""
    from pymatgen.io.ase import AseAtomsAdaptor

    from defectflow.train.data import ENERGY_KEY, charge_of, read_frames

    frames = [a for a in read_frames(hf_extxyz) if a.info.get("defect") == defect and charge_of(a) == charge
              and ENERGY_KEY in a.info]
    if not frames:
        return None
    a = min(frames, key=lambda x: float(x.info[ENERGY_KEY]))
    structure = AseAtomsAdaptor.get_structure(a)
    structure._charge = charge  # the adaptor drops a periodic structure's charge
    label = f"{a.info.get('distortion', '?')} step {a.info.get('step', 0)}"
    return label, float(a.info[ENERGY_KEY]), structure


@job(data=["checks"])
@tracked("verify", engines=("high", "low"))
def verify_minima(search: SearchResult, high, low, spec: VerifySpec, known_extxyz: str = "", need_lf: bool = False,
                  max_calls: int | None = None, model: TrainedModel | None = None) -> GroupVerification:
    """HF single points at the surrogate minima :func:`minima_to_verify` picks; the ground state is the lowest in
    HF energy, unless a structure of this (defect, q) whose HF energy is already known (``known_extxyz``: the HF
    training frames so far) is lower: then that structure gets an HF single point of its own (the levels need the
    verify engine's outputs, e.g. its electrostatic potential) and is the ground state, and ``reason`` says why.
    ``spec.mode: relax`` relaxes the lowest verified minimum with the HF engine (one more HF call); ``refine``
    moves it to the HF minimum with a few more HF single points (:func:`defectflow.search.refine.refine_minimum`,
    with ``model``'s HF head: the search's surrogate), each one a check of its own (role ``refine <n>``). With
    ``need_lf`` (Δ-learning) an LF single point is added where a minimum disagrees (the Δ target needs it).
    ``max_calls``: HF calculations this job may make (the campaign's ``verify.max_hf_calls`` left, shared between
    the (defect, q)); at least the lowest minimum is always verified. ``high``/``low``: the fidelity settings."""
    if spec.mode == "refine" and model is None:
        raise ValueError("verify.mode refine needs the surrogate (verify_minima's model)")
    gv = GroupVerification(defect=search.defect, charge=search.charge, checks=[])
    if not search.minima:
        gv.reason = ("the surrogate search produced no physical minimum"
                     + (f" ({len(search.rejected)} rejected: atoms too close)" if search.rejected else ""))
        return gv
    engine = get_engine(high, fidelity="high")
    lf = get_engine(low, fidelity="low") if need_lf else None
    tag = f"{search.defect}_{search.charge:+d}_verify"
    limit = max(1, max_calls) if max_calls is not None else None
    for k, (i, role) in enumerate(minima_to_verify(search, spec)[:limit]):
        m = search.minima[i]
        gv.checks.append(_check(engine, lf, m.structure, search, spec, f"{tag}_{k}", role=role,
                                ground_state_label=m.labels[0], surrogate_energy=m.energy, energy_std=m.energy_std,
                                force_std=m.force_std))
    done = [c for c in gv.checks if c.hf_energy is not None]
    gv.ground_state = min(done, key=lambda c: c.hf_energy) if done else None
    known = known_hf_lowest(known_extxyz, search.defect, search.charge) if known_extxyz else None
    if known is not None and (gv.ground_state is None or known[1] < gv.ground_state.hf_energy - 1e-6):
        label, energy, structure = known
        below = ("no verified minimum has an HF energy" if gv.ground_state is None else
                 f"{1000 * (gv.ground_state.hf_energy - energy):.0f} meV below the lowest verified surrogate minimum "
                 f"({gv.ground_state.ground_state_label})")
        gv.source = "known HF frame"
        gv.reason = (f"the HF training frame {label} (a single point of the selection or of an earlier round) is "
                     f"lower in HF energy than every verified surrogate minimum: {below}")
        if limit is None or len(gv.checks) < limit:  # a fresh single point: the levels need this engine's outputs
            c = _check(engine, None, structure, search, spec, f"{tag}_known", role="known HF frame",
                       ground_state_label=label, surrogate_energy=None)
            gv.checks.append(c)
            gv.ground_state = c if c.hf_energy is not None else gv.ground_state
        else:  # no HF call left: its training-set energy (without the verify engine's extra outputs)
            gv.ground_state = Verification(defect=search.defect, charge=search.charge, mode=spec.mode,
                                           structure=structure, hf_energy=energy, ground_state_label=label,
                                           role="known HF frame")
            gv.reason += " (no HF call left under verify.max_hf_calls for a fresh single point)"
    if spec.mode == "relax" and gv.ground_state is not None and gv.ground_state.structure is not None:
        _relax_check(engine, gv.ground_state, search.charge, spec, Path.cwd() / f"{tag}_relax")
        gv.relaxations = 1
    if spec.mode == "refine" and gv.ground_state is not None and gv.ground_state.hf_frame is not None:
        left = None if limit is None else limit - len(gv.checks)
        _refine_check(engine, model, gv, spec, tag, left)
    return gv


def _add_reason(gv: GroupVerification, text: str) -> None:
    """Append ``text`` to ``gv.reason`` ('; '-separated)."""
    gv.reason = f"{gv.reason}; {text}" if gv.reason else text


def _refine_check(engine, model: TrainedModel, gv: GroupVerification, spec: VerifySpec, tag: str,
                  left: int | None) -> None:
    """verify.mode refine: HF single points from the ground state towards the HF minimum (appended to
    ``gv.checks`` as ``refine <n>``, numbered on after the refine points it already has); the ground state becomes
    the lowest in HF energy of them all. ``gv.refine_exhausted`` says whether it stopped for want of HF calls (``left`` or
    ``verify.refine_points``) with the HF max force still above ``verify.fmax``: :func:`refine_leftover` may go
    on from there."""
    from defectflow.search.refine import refine_minimum
    from defectflow.train.surrogate import load_calculator

    start = gv.ground_state
    gv.refine_exhausted = False
    first = 1 + sum(c.role.startswith("refine") for c in gv.checks)
    n_max = spec.refine_points if left is None else min(spec.refine_points, left)
    if n_max <= 0:
        _add_reason(gv, "not refined: no HF call left (verify.max_hf_calls)")
        return

    def hf_point(structure, n: int, surrogate_energy: float | None):
        k = first + n - 1
        c = _check(engine, None, structure, gv, spec, f"{tag}_refine_{k}", role=f"refine {k}",
                   ground_state_label=start.ground_state_label, surrogate_energy=surrogate_energy)
        gv.checks.append(c)
        return c.hf_frame

    made, failed = 0, False
    # a continuation (refine_leftover) goes on with the trust radius where the last refinement left it: from the
    # same best point with the full radius it would repeat the same rejected steps (measured on `close`, session 11)
    radius = gv.refine_radius if first > 1 else None
    try:
        for point in refine_minimum(start.structure, gv.charge, start.hf_frame,
                                    lambda: load_calculator(model, head="hf", device="auto"), hf_point,
                                    fmax=spec.fmax, max_points=n_max, trust=spec.refine_trust,
                                    secant=spec.refine_secant, radius=radius, descent=spec.refine_descent):
            made += 1
            gv.refine_radius = point.radius
    except Exception as exc:  # keep the HF points already paid for: the lowest of them is still the ground state
        logger.exception("refine of %s q=%+d failed", gv.defect, gv.charge)
        _add_reason(gv, f"refine stopped: {type(exc).__name__}: {exc}")
        failed = True
    refined = [c for c in gv.checks if c.role.startswith("refine")]
    # where the refinement began: the lowest verified check before any refine point (a continuation's start is a
    # refine point; its distance is still measured from the surrogate's minimum)
    origin = min((c for c in gv.checks if not c.role.startswith("refine") and c.hf_energy is not None),
                 key=lambda c: c.hf_energy, default=start)
    done = [c for c in gv.checks if c.hf_energy is not None and (c is start or c.role.startswith("refine"))]
    gv.ground_state = min(done, key=lambda c: c.hf_energy)
    if gv.ground_state is not origin:
        gv.ground_state.rmsd_to_hf_relaxed = rmsd(origin.structure, gv.ground_state.structure)
        gv.ground_state.rmsd_success = gv.ground_state.rmsd_to_hf_relaxed <= spec.rmsd_threshold
    f = gv.ground_state.hf_max_force
    if f is not None and f > spec.fmax:
        gv.refine_exhausted = made >= n_max and not failed and refined[-1].hf_energy is not None
        _add_reason(gv, f"refined with {len(refined)} HF single points, HF max force still {f:.3f} eV/Å > "
                        f"verify.fmax {spec.fmax:g}")


@job(data=["verifications"])
@tracked("refine", engines=("high",))
def refine_leftover(verifications: list[GroupVerification], high, spec: VerifySpec, model: TrainedModel,
                    hf_calls_before: int) -> RefineLeftover:
    """verify.mode refine with ``verify.refine_leftover``: after every (defect, q) has verified and refined within
    its equal share of ``verify.max_hf_calls``, go on refining the ones that ran out of HF calls
    (``refine_exhausted``) with what the others left, largest HF max force first; each gets an equal share of what
    is left at its turn (so a share one leaves unspent passes on) and at most ``verify.refine_points`` more points.
    ``hf_calls_before``: the campaign's HF calls before this round's verifications. Returns every group's
    verification, the continued ones with their new refine points, and the new HF calls."""
    out = [gv.model_copy(deep=True) for gv in verifications]
    cap = spec.max_hf_calls
    left = None if cap is None else cap - hf_calls_before - sum(gv.hf_calls for gv in out)
    todo = sorted((gv for gv in out if gv.refine_exhausted and gv.ground_state is not None
                   and gv.ground_state.hf_frame is not None),
                  key=lambda gv: -(gv.ground_state.hf_max_force or 0.0))
    engine = get_engine(high, fidelity="high") if todo else None
    new, continued = 0, []
    for i, gv in enumerate(todo):
        share = None if left is None else -(-left // (len(todo) - i))  # ceil: the first ones get the remainder
        if share is not None and share <= 0:
            break
        before = gv.hf_calls
        _refine_check(engine, model, gv, spec, f"{gv.defect}_{gv.charge:+d}_verify", share)
        used = gv.hf_calls - before
        new += used
        left = None if left is None else left - used
        continued.append(group_key(gv.defect, gv.charge))
    return RefineLeftover(verifications=out, continued=continued, hf_calls=new)


def _check(engine, lf_engine, structure, search: SearchResult | GroupVerification, spec: VerifySpec, tag: str,
           **fields) -> Verification:
    """One HF single point at ``structure`` (+ an LF one with ``lf_engine`` where it disagrees with the
    surrogate). ``hf_seconds`` and ``cpu_seconds`` are the HF calculation's alone."""
    from defectflow.store.tracking import cpu_clock

    v = Verification(defect=search.defect, charge=search.charge, mode=spec.mode, structure=structure, **fields)
    t0, c0 = time.perf_counter(), cpu_clock()
    hf = engine.single_point(structure, search.charge, workdir=Path.cwd() / tag)
    v.hf_seconds, v.cpu_seconds = time.perf_counter() - t0, cpu_clock() - c0
    v.hf_frame = hf
    if hf.energy is None:
        v.error = hf.error or "HF single point failed"
        return v
    v.hf_energy = hf.energy
    v.hf_max_force = hf.fmax
    if v.surrogate_energy is not None:
        v.error_mev_per_atom = 1000 * abs(hf.energy - v.surrogate_energy) / len(structure)
        v.agrees = v.error_mev_per_atom <= spec.energy_threshold
        if not v.agrees and lf_engine is not None:
            v.lf_frame = lf_engine.single_point(structure, search.charge, workdir=Path.cwd() / (tag + "_lf"))
    return v


def _relax_check(engine, v: Verification, charge: int, spec: VerifySpec, workdir: Path) -> None:
    """verify.mode relax: HF relaxation from the check's structure (its energy and structure become the relaxed
    ones; the RMSD to the start is recorded)."""
    from defectflow.store.tracking import cpu_clock

    t0, c0 = time.perf_counter(), cpu_clock()
    traj = engine.relax(v.structure, charge, workdir=workdir)
    final = traj.final
    if final is not None:
        v.rmsd_to_hf_relaxed = rmsd(v.structure, final.structure)
        v.rmsd_success = v.rmsd_to_hf_relaxed <= spec.rmsd_threshold
        v.structure, v.hf_energy, v.hf_max_force = final.structure, final.energy, final.fmax
    else:
        v.error = f"HF relaxation failed: {traj.error}"
    v.hf_seconds += time.perf_counter() - t0
    v.cpu_seconds += cpu_clock() - c0


def best_verified(previous: dict[str, KeptGroundState], verifications: list[GroupVerification],
                  searches: list[SearchResult], round_no: int) -> dict[str, KeptGroundState]:
    """Per 'defect q': the ground state with the lowest HF energy over the rounds so far (a group without one
    counts as +∞), with its round and its search's landscape. The HF/LF frames are left out (they are in the verify
    job's document), except for the HF frame's electrostatic potential (the levels' eFNV/FNV input), kept on an HF
    frame without forces and stress."""
    best = dict(previous)
    for gv, s in zip(verifications, searches, strict=True):
        key = group_key(gv.defect, gv.charge)
        old = best.get(key)
        old_e = old.verification.hf_energy if old else None
        v = gv.ground_state
        if v is None:
            v = gv.checks[0] if gv.checks else Verification(defect=gv.defect, charge=gv.charge, mode="single_point",
                                                            error=gv.reason or "nothing verified")
        if old is None or (v.hf_energy is not None and (old_e is None or v.hf_energy < old_e)):
            hf = v.hf_frame
            slim = hf.model_copy(update={"forces": None, "stress": None}) if hf is not None and hf.potential else None
            best[key] = KeptGroundState(round=round_no, n_minima=len(s.minima), landscape=s.landscape, plot=s.plot,
                                        verification=v.model_copy(update={"hf_frame": slim, "lf_frame": None}),
                                        source=gv.source, reason=gv.reason)
    return best


#: two ground states of one (defect, q) in consecutive rounds are the same when their HF energies differ by less
#: than this (eV): single points near one minimum differ to second order in the displacement (≲ 1 meV here),
#: distinct minima of the benchmark by ≥ 14 meV
SAME_GROUND_STATE_EV = 0.002


def round_record(round_no: int, verifications: list[GroupVerification], context: SearchContext,
                 topup: LabelledSet | None) -> RoundRecord:
    """What round ``round_no`` verified, which ground states changed, and what it cost (its verifications plus
    the top-up single points that trained its model)."""
    previous = context.history[-1].ground_states if context.history else {}
    verified, ground_states, changed = {}, {}, []
    for gv in verifications:
        key = group_key(gv.defect, gv.charge)
        verified[key] = [{"label": c.ground_state_label, "role": c.role, "surrogate_energy": c.surrogate_energy,
                          "hf_energy": c.hf_energy, "error_mev_per_atom": c.error_mev_per_atom,
                          "energy_std": c.energy_std, "force_std": c.force_std, "error": c.error} for c in gv.checks]
        gs = gv.ground_state
        if gs is not None and gs.hf_energy is not None:
            ground_states[key] = {"label": gs.ground_state_label, "hf_energy": gs.hf_energy, "source": gv.source}
        old = previous.get(key, {}).get("hf_energy")
        new = ground_states.get(key, {}).get("hf_energy")
        if old is None or new is None or abs(old - new) > SAME_GROUND_STATE_EV:
            changed.append(key)
    checks = [c for gv in verifications for c in gv.checks]
    lowest = {group_key(gv.defect, gv.charge): gv.ground_state for gv in verifications}
    n_topup = topup.n_requested if topup is not None else 0
    failed = {(f"{f['defect']} {f['charge']:+d}", f"{f['distortion']} step {f['step']}")
              for f in (topup.failed if topup is not None else [])}
    added = [t for t in context.pending if (t.group, t.label) not in failed]
    n_calls = sum(gv.hf_calls for gv in verifications)
    return RoundRecord(
        round=round_no,
        errors_mev_per_atom={k: (v.error_mev_per_atom if v is not None else None) for k, v in lowest.items()},
        disagreeing=sorted({group_key(c.defect, c.charge) for c in checks if c.hf_energy is not None
                            and c.error_mev_per_atom is not None and not c.agrees}),
        retrained=False, verified=verified, ground_states=ground_states, changed=changed, added=added,
        hf_calls=n_calls + n_topup,
        hf_seconds=sum(c.hf_seconds for c in checks) + (topup.hf_seconds if topup is not None else 0.0),
        hf_cpu_seconds=sum(c.cpu_seconds for c in checks) + (topup.cpu_seconds if topup is not None else 0.0),
        hf_calls_total=context.hf_calls + n_calls + n_topup,
    )


def plan_topup(record: RoundRecord, verifications: list[GroupVerification], searches: list[SearchResult],
               context: SearchContext) -> tuple[list[TopUpFrame], list[tuple[Verification, TopUpFrame]],
                                                list[tuple[PathFrame, TopUpFrame]], str | None]:
    """Whether another round follows and with which new training frames.

    Returns (all added frames, verified minima added (their HF single point exists), path frames to label,
    stop reason or None). Stops when every ground state is unchanged from the previous round and every verified
    error is below ``verify.energy_threshold`` (a failed HF single point is no error below it); after
    ``verify.max_rounds`` top-ups; or when the next round's HF calls (``round_budget`` top-up single points + up to
    ``top_k`` + 2 verifications per group) would exceed ``verify.max_hf_calls``."""
    spec = context.verify
    errors = [c.error_mev_per_atom for gv in verifications for c in gv.checks if c.error_mev_per_atom is not None]
    # a surrogate minimum whose HF single point failed has no error to judge: it never counts as converged
    failed = [c for gv in verifications for c in gv.checks if c.error is not None]
    converged = all(e <= spec.energy_threshold for e in errors) and not failed
    if context.round >= 1 and not record.changed and converged:
        return [], [], [], (f"converged: every ground state as in round {context.round - 1}, every verified error "
                            f"≤ {spec.energy_threshold:g} meV/atom")
    if context.round >= spec.max_rounds:
        return [], [], [], f"verify.max_rounds = {spec.max_rounds} reached"
    n_verify = len(verifications) * (spec.top_k + 2 + (spec.mode == "relax")
                                     + (spec.refine_points if spec.mode == "refine" else 0))
    room = None if spec.max_hf_calls is None else spec.max_hf_calls - record.hf_calls_total - n_verify
    if room is not None and room < 0:
        return [], [], [], (f"verify.max_hf_calls = {spec.max_hf_calls}: {record.hf_calls_total} spent, the next "
                            f"round's verifications alone may take {n_verify}")
    minima = []
    delta = context.mlip.multi_fidelity == "delta"  # its targets need the LF labels of the same geometry
    for gv in verifications:
        lowest = lowest_known_per_atom(context.hf_extxyz, gv)
        for c in gv.checks:
            if (c.hf_frame is not None and c.hf_energy is not None and not c.agrees and c.surrogate_energy is not None
                    and c.hf_frame.forces is not None
                    and (not delta or (c.lf_frame is not None and c.lf_frame.energy is not None))):
                why = TOPUP_FILTER.rejects(c.hf_frame, lowest)
                if why:  # e.g. a collapsed minimum 8 eV/atom up: trained on, it wrecked the warm start (docs)
                    record.not_trained.append({"group": group_key(c.defect, c.charge),
                                               "label": c.ground_state_label, "reason": why})
                    continue
                minima.append((c, TopUpFrame(group=group_key(c.defect, c.charge), label=c.ground_state_label or "?",
                                             reason=("refine point" if c.role.startswith("refine")
                                                     else "verified minimum") + ", |ΔE| above threshold",
                                             energy_std=c.energy_std, force_std=c.force_std,
                                             error_mev_per_atom=c.error_mev_per_atom)))
    pool = sorted(((p, group_key(s.defect, s.charge)) for s in searches for p in s.candidates),
                  key=lambda x: -x[0].force_std)
    n = spec.round_budget if room is None else max(0, min(spec.round_budget, room))
    paths = [(p, TopUpFrame(group=key, label=f"{p.label} step {p.step}", reason="uncertain path frame",
                            energy_std=p.energy_std, force_std=p.force_std)) for p, key in pool[:n]]
    if not minima and not paths:
        return [], [], [], "nothing to add: no verified minimum above the threshold and no uncertain path frame"
    return [t for _, t in minima] + [t for _, t in paths], minima, paths, None


@job
@tracked("finalize", cache=False)
def finalize(verifications: list[GroupVerification], searches: list[SearchResult], baselines: list[SearchResult],
             training: TrainingResult, context: SearchContext, topup: LabelledSet | None = None) -> Response:
    """Record the round; unless it stops (:func:`plan_topup`), add the new HF frames and start the next round
    (label top-up frames → fine-tune the committee → search → verify → finalize); else compute the levels and the
    campaign result."""
    round_no = context.round
    hf_text = topup.extxyz if topup is not None else context.hf_extxyz
    record = round_record(round_no, verifications, context, topup)
    added, minima, paths, stop = plan_topup(record, verifications, searches, context)
    record.retrained, record.stop_reason = stop is None, stop
    history = [*context.history, record]
    best = best_verified(context.best_verified, verifications, searches, round_no)
    counts = {"hf_calls": record.hf_calls_total, "hf_seconds": context.hf_seconds + record.hf_seconds,
              "hf_cpu_seconds": context.hf_cpu_seconds + record.hf_cpu_seconds}
    if stop is None:
        # step = its place in the list: refine points share their minimum's label
        meta = [{"defect": c.defect, "distortion": f"verify_round{round_no}_{c.ground_state_label}", "step": k}
                for k, (c, _) in enumerate(minima)]
        hf_text = hf_text + hf_extxyz([(c.hf_frame, c.lf_frame, m) for (c, _), m in zip(minima, meta)])
        new_context = context.model_copy(update={
            "round": round_no + 1, "hf_extxyz": hf_text, "history": history, "best_verified": best,
            "pending": added, **counts})
        label = name_job(label_topup([p for p, _ in paths], [t.group for _, t in paths], hf_text,
                                     context.fidelities.high, context.fidelities.low,
                                     need_lf=context.mlip.multi_fidelity == "delta"),
                         "topup", "round", round_no + 1)
        # the previous training as a reference, not its resolved document (every model's bytes)
        previous = OutputReference(context.training_uuid) if context.training_uuid else training
        return Response(replace=build_search_round(new_context, baselines, previous=previous, topup=label))
    context = context.model_copy(update={"history": history, **counts})
    return Response(output=campaign_result(verifications, best, baselines, training, context))


@job(data=["frames", "extxyz"])
@tracked("topup", engines=("high", "low"))
def label_topup(frames: list[PathFrame], groups: list[str], hf_extxyz_so_far: str, high, low,
                need_lf: bool = False) -> LabelledSet:
    """HF single points (and LF ones when ``need_lf``: Δ-learning's targets) at the top-up path frames; returns
    them with the HF training set so far, extended, in ``extxyz``. A frame that fails :data:`TOPUP_FILTER` (force
    or energy far above its group's lowest known HF frame) is listed in ``failed`` with the reason, not trained
    on; its HF call counts all the same."""
    from defectflow.store.tracking import cpu_clock

    engine = get_engine(high, fidelity="high")
    lf_engine = get_engine(low, fidelity="low") if need_lf else None
    wall = cpu = 0.0
    pairs, failed = [], []
    lowest: dict[str, float | None] = {}  # group → lowest HF energy per atom in the training set so far
    for k, (p, key) in enumerate(zip(frames, groups, strict=True)):
        defect, q = key.rsplit(" ", 1)
        charge = int(q)
        t0, c0 = time.perf_counter(), cpu_clock()
        hf = engine.single_point(p.structure, charge, workdir=Path.cwd() / f"topup_{k}")
        wall, cpu = wall + time.perf_counter() - t0, cpu + cpu_clock() - c0
        lf = lf_engine.single_point(p.structure, charge, workdir=Path.cwd() / f"topup_{k}_lf") \
            if lf_engine is not None and hf.energy is not None else None
        error = hf.error or "HF single point failed" if hf.energy is None else (
            (lf.error or "LF single point failed") if lf_engine is not None and (lf is None or lf.energy is None)
            else None)
        if error is None:  # the LF harvest's thresholds, against the lowest HF frame of its group known so far
            if key not in lowest:
                lowest[key] = known_lowest_per_atom(hf_extxyz_so_far, defect, charge)
            why = TOPUP_FILTER.rejects(hf, lowest[key])
            error = f"not trained on: {why}" if why else None
        if error:
            failed.append({"defect": defect, "charge": charge, "distortion": p.label, "step": p.step, "error": error})
            continue
        pairs.append((hf, lf, {"defect": defect, "distortion": f"topup_{p.label}", "step": p.step}))
    return LabelledSet(n_requested=len(frames), n_labelled=len(pairs), failed=failed, hf_seconds=wall,
                       cpu_seconds=cpu, frames=[h for h, _, _ in pairs], extxyz=hf_extxyz_so_far + hf_extxyz(pairs))


def campaign_result(verifications: list[GroupVerification], best: dict[str, KeptGroundState],
                    baselines: list[SearchResult], training: TrainingResult, context: SearchContext) -> CampaignResult:
    """The levels from the kept ground states' HF energies, and the campaign's result document."""
    records, level_entries = [], []
    entries = {g.key: g.defect_entry for g in context.groups}
    baseline_by = {(b.defect, b.charge): b for b in baselines if b is not None}
    for gv in verifications:
        kept = best[group_key(gv.defect, gv.charge)]
        v = kept.verification
        rec = GroundStateRecord(defect=v.defect, charge=v.charge, ground_state_label=v.ground_state_label,
                                structure=v.structure, surrogate_energy=v.surrogate_energy, hf_energy=v.hf_energy,
                                verification_error_mev_per_atom=v.error_mev_per_atom,
                                rmsd_to_hf_relaxed=v.rmsd_to_hf_relaxed, hf_max_force=v.hf_max_force,
                                n_minima=kept.n_minima,
                                landscape=kept.landscape, landscape_plot=kept.plot, round=kept.round,
                                source=kept.source, reason=kept.reason, energy_std=v.energy_std,
                                force_std=v.force_std)
        b = baseline_by.get((v.defect, v.charge))
        if b is not None and b.ground_state is not None and v.structure is not None:
            rec.baseline_rmsd = rmsd(v.structure, b.ground_state.structure)
            rec.baseline_label = b.ground_state_label
        records.append(rec)
        if v.hf_energy is not None and v.structure is not None:
            # the potential belongs to the single-point geometry: an HF relaxation (verify.mode relax) moved it
            potential = v.hf_frame.potential if v.hf_frame is not None and v.mode != "relax" else None
            level_entries.append(LevelEntry(defect=v.defect, charge=v.charge, energy=v.hf_energy,
                                            structure=v.structure, potential=potential,
                                            defect_entry=entries[group_key(v.defect, v.charge)]))
    bulk, lv = context.bulk, context.levels
    levels, levels_error = None, None
    gap = lv.band_gap if lv.band_gap is not None else bulk.band_gap
    try:
        if bulk.energy_hf is None:
            raise ValueError("bulk HF energy missing (the bulk HF single point failed)")
        if bulk.vbm is None or gap is None:
            raise ValueError("the HF engine reported no band edges for the bulk: set levels.band_gap and use an "
                             "engine that reports eigenvalues (qe, cp2k with smearing)")
        levels = compute_levels(level_entries, context.bulk_structure, bulk.energy_hf, bulk.vbm, gap,
                                correction=lv.correction, dielectric=lv.dielectric,
                                chemical_potentials=lv.chemical_potentials, plot_dir=context.plot_dir,
                                bulk_potential=context.bulk_potential)
    except ValueError as exc:
        levels_error = str(exc)
        logger.warning("levels not computed: %s", exc)
    plots = {f"landscape {group_key(r.defect, r.charge)}": r.landscape_plot for r in records if r.landscape_plot}
    if levels and levels.plot:
        plots["formation_energies"] = levels.plot
    return CampaignResult(campaign=context.campaign, ground_states=records, levels=levels,
                          levels_error=levels_error, rounds=context.history,
                          model_comparison=[r.model_dump() for r in training.comparison], hf_calls=context.hf_calls,
                          hf_seconds=context.hf_seconds, hf_cpu_seconds=context.hf_cpu_seconds,
                          n_hf_selected=context.n_hf_selected, plots={**plots, **training.plots})


def build_search_round(context: SearchContext, baselines: list | None, training=None, previous=None,
                       topup=None) -> Flow:
    """(top-up labels →) train (unless ``training`` given; warm-started from ``previous``) → one search + verify
    per (defect, q) → finalize. ``topup``: the label_topup job whose HF set this round trains on."""
    jobs = [] if topup is None else [topup]
    hf_text = context.hf_extxyz if topup is None else topup.output.extxyz
    if training is None:
        t = name_job(train_job(context.lf_extxyz, hf_text, context.mlip, context.model_plot_dir,
                               previous=previous), "train", "round", context.round)
        jobs.append(t)
        training = t.output
        context = context.model_copy(update={"training_uuid": t.uuid})
    cap = context.verify.max_hf_calls
    max_calls = None if cap is None else max(1, (cap - context.hf_calls) // max(1, len(context.groups)))
    need_lf = context.mlip.multi_fidelity == "delta"
    committee = [training.models[name] for name in committee_names(context.mlip)]
    searches, verifies = [], []
    high = with_potentials(context.fidelities.high, context.levels.correction)  # eFNV/FNV inputs, when usable
    for g in context.groups:
        meta = {"defect": g.defect, "charge": g.charge, "round": context.round}
        s = name_job(surrogate_search(training.models["main"], g.defect, g.charge, g.starts, context.search,
                                      None, seed=context.seed, committee=committee),
                     "search", g.key, "round", context.round, **meta)
        v = name_job(verify_minima(s.output, high, context.fidelities.low, context.verify, known_extxyz=hf_text,
                                   need_lf=need_lf, max_calls=max_calls,
                                   model=training.models["main"] if context.verify.mode == "refine" else None),
                     "verify", g.key, "round", context.round, **meta)
        p = name_job(plot_verified(s.output, v.output, g.starts, context.search, context.plot_dir, context.seed,
                                   context.round), "plot", g.key, "round", context.round, **meta)
        jobs += [s, v, p]
        searches.append(p.output)
        verifies.append(v.output)
    if context.verify.mode == "refine" and context.verify.refine_leftover and cap is not None:
        r = name_job(refine_leftover(verifies, high, context.verify, training.models["main"], context.hf_calls),
                     "refine", "round", context.round, round=context.round)
        jobs.append(r)
        verifies = r.output.verifications
    f = name_job(finalize(verifies, searches, baselines or [], training, context,
                          topup=None if topup is None else topup.output), "finalize", "round", context.round)
    jobs.append(f)
    return Flow(jobs, output=f.output, name=f"search round {context.round}")


@job(data=["minima", "landscape", "candidates"])
def plot_verified(search: SearchResult, verification: GroupVerification, starts: list[SearchStart],
                  spec: SearchSpec, plot_dir: str, seed: int, round_no: int) -> SearchResult:
    """The search's landscape drawn again with its HF-verified minima (one PNG per round); returns the search with
    ``plot`` pointing at it."""
    if not search.landscape:
        return search
    path = plot_landscape(search, search_starts(starts, spec, seed), Path(plot_dir), verification=verification,
                          suffix=f"_round{round_no}")
    return search.model_copy(update={"plot": path})


@job
@tracked("start_search", cache=False)
def start_search(training: TrainingResult, labelled: LabelledSet, lf_extxyz: str, bulk: BulkReference,
                 baselines: list[SearchResult], context: SearchContext, bulk_hf: Frame | None = None,
                 training_uuid: str | None = None) -> Response:
    """Join point after training: fill the runtime context (LF/HF data, bulk reference and, for eFNV/FNV, the
    electrostatic potential of ``bulk_hf``, the bulk HF single point) and start round 0. ``training_uuid``: the
    train job's uuid (the top-up rounds warm-start from its output by reference)."""
    context = context.model_copy(update={
        "training_uuid": training_uuid,
        "lf_extxyz": lf_extxyz, "hf_extxyz": labelled.extxyz, "bulk": bulk,
        "bulk_potential": None if bulk_hf is None else bulk_hf.potential,
        "hf_calls": context.hf_calls + labelled.n_requested, "n_hf_selected": labelled.n_requested,
        # the same calls as hf_calls: the bulk HF single point included
        "hf_seconds": labelled.hf_seconds + (bulk.hf_seconds or 0.0)})
    return Response(replace=build_search_round(context, baselines, training=training))
