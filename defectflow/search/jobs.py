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

from jobflow import Flow, Response, job
from pydantic import BaseModel, Field

from defectflow.campaign import FidelitiesSpec, LevelsSpec, MlipSpec, SearchSpec, VerifySpec
from defectflow.engines import get_engine
from defectflow.levels import LevelEntry, compute_levels, with_potentials
from defectflow.schemas import (
    BulkReference,
    CampaignResult,
    DistortionSet,
    Frame,
    GroundStateRecord,
    KeptGroundState,
    LabelledSet,
    MSONDict,
    RoundRecord,
    SearchResult,
    SearchStart,
    Structure,
    TrainedModel,
    TrainingResult,
    Verification,
    group_key,
)
from defectflow.schemas.core import ElectrostaticPotential
from defectflow.search import rattled_starts, rmsd, search_ground_state
from defectflow.search.batched import batched_relax
from defectflow.steps import name_job
from defectflow.store.tracking import tracked
from defectflow.train.data import frames_to_extxyz, hf_extxyz
from defectflow.train.jobs import train_job
from defectflow.train.surrogate import load_calculator, torch_threads

logger = logging.getLogger(__name__)

__all__ = [
    "SearchContext",
    "SearchGroup",
    "shakenbreak_starts",
    "search_starts",
    "surrogate_search",
    "baseline_search",
    "verify_ground_state",
    "best_verified",
    "finalize",
    "start_search",
    "build_search_round",
    # documents, re-exported from defectflow.schemas
    "Verification",
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
    history: list[RoundRecord] = Field(default_factory=list, description="Every finished round")
    best_verified: dict[str, KeptGroundState] = Field(
        default_factory=dict, description="'defect q' → the verified minimum with the lowest HF energy so far")


def shakenbreak_starts(distortion_set: DistortionSet) -> list[SearchStart]:
    """The ShakeNBreak starts of one (defect, q) as search starts."""
    return [SearchStart(label=s.label, bond_distortion=s.bond_distortion, structure=s.structure)
            for s in distortion_set.structures]


def search_starts(starts: list[SearchStart], spec: SearchSpec, seed: int) -> list[SearchStart]:
    """The starts a surrogate search relaxes: the ShakeNBreak starts + ``spec.extra_starts`` rattled copies of each
    (Gaussian, ``spec.rattle_stdev`` Å, deterministic for ``seed``)."""
    return starts + rattled_starts(starts, spec.extra_starts, spec.rattle_stdev, seed)


@job(data=["minima", "landscape"])
@tracked("search", ignore=("plot_dir",))
def surrogate_search(model: TrainedModel, defect: str, charge: int, starts: list[SearchStart], spec: SearchSpec,
                     plot_dir: str | None = None, seed: int = 0) -> SearchResult:
    """Relax every ShakeNBreak start (+ rattled copies) with the trained surrogate's HF head at charge q: all
    together (``spec.batched``, torch-sim) or one at a time (ASE), in ``spec.precision``."""
    if spec.batched:
        def relax(structures):
            with torch_threads():
                return batched_relax(model, "hf", structures, charge, fmax=spec.fmax, max_steps=spec.max_steps,
                                     dtype=spec.precision, device=spec.device)
        engines = {"relax_batch": relax}
    else:
        engines = {"calculator_factory": lambda: load_calculator(model, head="hf", device=spec.device,
                                                                 dtype=spec.precision)}
    return search_ground_state(
        defect, charge, search_starts(starts, spec, seed), model="mace:hf", fmax=spec.fmax,
        max_steps=spec.max_steps, energy_tolerance=spec.energy_tolerance, plot_dir=plot_dir,
        min_distance_factor=spec.min_distance_factor, **engines,
    )


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


@job(data=["hf_frame", "lf_frame"])
@tracked("verify", engines=("high", "low"))
def verify_ground_state(search: SearchResult, high, low, spec: VerifySpec) -> Verification:
    """HF single point (or HF relaxation) on the surrogate ground state; LF single point too when it disagrees.

    ``high``/``low``: the campaign's fidelity settings."""
    v = Verification(defect=search.defect, charge=search.charge, mode=spec.mode,
                     ground_state_label=search.ground_state_label)
    if search.ground_state is None:
        v.error = ("the surrogate search produced no physical minimum"
                   + (f" ({len(search.rejected)} rejected: atoms too close)" if search.rejected else ""))
        return v
    gs = search.ground_state.structure
    v.surrogate_energy = search.ground_state.energy
    engine = get_engine(high, fidelity="high")
    tag = f"{search.defect}_{search.charge:+d}_verify"
    t0 = time.perf_counter()
    hf = engine.single_point(gs, search.charge, workdir=Path.cwd() / tag)
    v.hf_frame = hf
    v.structure = gs
    if hf.energy is None:
        v.error = hf.error or "HF single point failed"
        v.hf_seconds = time.perf_counter() - t0
        return v
    v.hf_energy = hf.energy
    v.error_mev_per_atom = 1000 * abs(hf.energy - v.surrogate_energy) / len(gs)
    v.agrees = v.error_mev_per_atom <= spec.energy_threshold
    if spec.mode == "relax":
        traj = engine.relax(gs, search.charge, workdir=Path.cwd() / (tag + "_relax"))
        final = traj.final
        if final is not None:
            v.structure, v.hf_energy = final.structure, final.energy
            v.rmsd_to_hf_relaxed = rmsd(gs, final.structure)
            v.rmsd_success = v.rmsd_to_hf_relaxed <= spec.rmsd_threshold
        else:
            v.error = f"HF relaxation failed: {traj.error}"
    v.hf_seconds = time.perf_counter() - t0
    if not v.agrees:
        v.lf_frame = get_engine(low, fidelity="low").single_point(gs, search.charge, workdir=Path.cwd() / (tag + "_lf"))
    return v


def best_verified(previous: dict[str, KeptGroundState], verifications: list[Verification],
                  searches: list[SearchResult], round_no: int) -> dict[str, KeptGroundState]:
    """Per 'defect q': the verified surrogate minimum with the lowest HF energy over the rounds so far (a failed
    verification counts as +∞), with its round and its search's landscape. The HF/LF frames are left out (they
    are in the verify job's document), except for the HF frame's electrostatic potential (the levels' eFNV/FNV
    input), kept on an HF frame without forces and stress."""
    best = dict(previous)
    for v, s in zip(verifications, searches, strict=True):
        key = group_key(v.defect, v.charge)
        old = best.get(key)
        old_e = old.verification.hf_energy if old else None
        if old is None or (v.hf_energy is not None and (old_e is None or v.hf_energy < old_e)):
            hf = v.hf_frame
            slim = hf.model_copy(update={"forces": None, "stress": None}) if hf is not None and hf.potential else None
            best[key] = KeptGroundState(round=round_no, n_minima=len(s.minima), landscape=s.landscape, plot=s.plot,
                                        verification=v.model_copy(update={"hf_frame": slim, "lf_frame": None}))
    return best


@job
@tracked("finalize", cache=False)
def finalize(verifications: list[Verification], searches: list[SearchResult], baselines: list[SearchResult],
             training: TrainingResult, context: SearchContext) -> Response:
    """Top up and retrain when verification disagrees (rounds permitting), else compute levels and the result."""
    round_no = context.round
    disagree = [v for v in verifications if v.hf_energy is not None and not v.agrees and v.lf_frame is not None
                and v.lf_frame.energy is not None]
    retrain = bool(disagree) and round_no < context.verify.max_rounds
    history = [*context.history, RoundRecord(
        round=round_no,
        errors_mev_per_atom={group_key(v.defect, v.charge): v.error_mev_per_atom for v in verifications},
        disagreeing=[group_key(v.defect, v.charge) for v in disagree],
        retrained=retrain,
    )]
    hf_calls = context.hf_calls + len(verifications)
    hf_seconds = context.hf_seconds + sum(v.hf_seconds for v in verifications)
    best = best_verified(context.best_verified, verifications, searches, round_no)
    if retrain:
        meta = [{"defect": v.defect, "distortion": f"verify_round{round_no}", "step": 0} for v in disagree]
        lf_xyz = context.lf_extxyz + frames_to_extxyz([(v.lf_frame, m) for v, m in zip(disagree, meta)], "lf")
        hf_xyz = context.hf_extxyz + hf_extxyz([(v.hf_frame, v.lf_frame, m) for v, m in zip(disagree, meta)])
        new_context = context.model_copy(update={
            "round": round_no + 1, "lf_extxyz": lf_xyz, "hf_extxyz": hf_xyz, "history": history,
            "hf_calls": hf_calls, "hf_seconds": hf_seconds, "best_verified": best})
        return Response(replace=build_search_round(new_context, baselines))

    # levels from the verified HF energies
    records, level_entries = [], []
    entries = {g.key: g.defect_entry for g in context.groups}
    baseline_by = {(b.defect, b.charge): b for b in baselines if b is not None}
    for v in verifications:
        kept = best[group_key(v.defect, v.charge)]
        v = kept.verification
        rec = GroundStateRecord(defect=v.defect, charge=v.charge, ground_state_label=v.ground_state_label,
                                structure=v.structure, surrogate_energy=v.surrogate_energy, hf_energy=v.hf_energy,
                                verification_error_mev_per_atom=v.error_mev_per_atom,
                                rmsd_to_hf_relaxed=v.rmsd_to_hf_relaxed, n_minima=kept.n_minima,
                                landscape=kept.landscape, landscape_plot=kept.plot, round=kept.round)
        b = baseline_by.get((v.defect, v.charge))
        if b is not None and b.ground_state is not None and v.structure is not None:
            rec.baseline_rmsd = rmsd(v.structure, b.ground_state.structure)
            rec.baseline_label = b.ground_state_label
        records.append(rec)
        if v.hf_energy is not None and v.structure is not None:
            # the potential belongs to the single-point geometry: an HF relaxation (verify.mode relax) moved it
            potential = v.hf_frame.potential if v.hf_frame is not None and v.mode == "single_point" else None
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
    result = CampaignResult(campaign=context.campaign, ground_states=records, levels=levels,
                            levels_error=levels_error, rounds=history,
                            model_comparison=[r.model_dump() for r in training.comparison], hf_calls=hf_calls,
                            hf_seconds=hf_seconds, n_hf_selected=context.n_hf_selected,
                            plots={**plots, **training.plots})
    return Response(output=result)


def build_search_round(context: SearchContext, baselines: list | None, training=None) -> Flow:
    """train (unless ``training`` given) → one search + verify per (defect, q) → finalize."""
    jobs = []
    if training is None:
        t = name_job(train_job(context.lf_extxyz, context.hf_extxyz, context.mlip, context.model_plot_dir),
                     "train", "round", context.round)
        jobs.append(t)
        training = t.output
    searches, verifies = [], []
    high = with_potentials(context.fidelities.high, context.levels.correction)  # eFNV/FNV inputs, when usable
    for g in context.groups:
        meta = {"defect": g.defect, "charge": g.charge, "round": context.round}
        s = name_job(surrogate_search(training.models["main"], g.defect, g.charge, g.starts, context.search,
                                      context.plot_dir, seed=context.seed),
                     "search", g.key, "round", context.round, **meta)
        v = name_job(verify_ground_state(s.output, high, context.fidelities.low, context.verify),
                     "verify", g.key, "round", context.round, **meta)
        jobs += [s, v]
        searches.append(s.output)
        verifies.append(v.output)
    f = name_job(finalize(verifies, searches, baselines or [], training, context), "finalize", "round", context.round)
    jobs.append(f)
    return Flow(jobs, output=f.output, name=f"search round {context.round}")


@job
@tracked("start_search", cache=False)
def start_search(training: TrainingResult, labelled: LabelledSet, lf_extxyz: str, bulk: BulkReference,
                 baselines: list[SearchResult], context: SearchContext, bulk_hf: Frame | None = None) -> Response:
    """Join point after training: fill the runtime context (LF/HF data, bulk reference and, for eFNV/FNV, the
    electrostatic potential of ``bulk_hf``, the bulk HF single point) and start round 0."""
    context = context.model_copy(update={
        "lf_extxyz": lf_extxyz, "hf_extxyz": labelled.extxyz, "bulk": bulk,
        "bulk_potential": None if bulk_hf is None else bulk_hf.potential,
        "hf_calls": context.hf_calls + labelled.n_requested, "n_hf_selected": labelled.n_requested,
        # the same calls as hf_calls: the bulk HF single point included
        "hf_seconds": labelled.hf_seconds + (bulk.hf_seconds or 0.0)})
    return Response(replace=build_search_round(context, baselines, training=training))
