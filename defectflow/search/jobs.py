"""Jobs of step 5: surrogate search, foundation-model baseline, HF verification, top-up retraining and levels.

``finalize`` is dynamic: when a verified HF energy disagrees with the surrogate by more than
``verify.energy_threshold`` (meV/atom) and top-up rounds remain, it replaces itself by: retrain with the
disagreeing frames added → search → verify → finalize (next round). Otherwise it computes the levels and the
campaign result. What happened in each round is recorded in :class:`CampaignResult`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from jobflow import Flow, Response, job

from defectflow.engines import get_engine
from defectflow.label import hf_extxyz
from defectflow.levels import LevelEntry, compute_levels
from defectflow.relax import frames_to_extxyz
from defectflow.schemas import (
    CampaignResult,
    GroundStateRecord,
    Verification,
    as_model,
    as_structure,
    get_field,
)
from defectflow.search import SearchResult, SearchStart, rattled_starts, rmsd, search_ground_state
from defectflow.steps import name_job
from defectflow.store.tracking import tracked

logger = logging.getLogger(__name__)

__all__ = [
    "Verification",
    "GroundStateRecord",
    "CampaignResult",
    "surrogate_search",
    "baseline_search",
    "verify_ground_state",
    "finalize",
    "start_search",
    "build_search_round",
    "starts_payload",
]


def starts_payload(distortion_set) -> list[dict[str, Any]]:
    """ShakeNBreak starts of one (defect, q) as light dicts (structure as JSON) for job arguments."""
    return [{"label": s.label, "bond_distortion": s.bond_distortion, "structure": s.structure.to_json()}
            for s in distortion_set.structures]


def _starts(payload: list[dict[str, Any]], search_spec: dict[str, Any], seed: int) -> list[SearchStart]:
    base = [SearchStart(label=p["label"], bond_distortion=p["bond_distortion"], structure=as_structure(p["structure"]))
            for p in payload]
    return base + rattled_starts(base, int(search_spec.get("extra_starts", 0)),
                                 float(search_spec.get("rattle_stdev", 0.15)), seed)


def _model(training) -> Any:
    models = training["models"] if isinstance(training, dict) else training.models
    return models["main"]


@job(data=["minima", "landscape"])
@tracked("search", ignore=("plot_dir",))
def surrogate_search(training, defect: str, charge: int, starts: list[dict[str, Any]], search_spec: dict[str, Any],
                     plot_dir: str | None = None, seed: int = 0) -> SearchResult:
    """Relax every ShakeNBreak start (+ rattled copies) with the trained surrogate's HF head at charge q."""
    from defectflow.train.surrogate import load_calculator

    model = _model(training)
    return search_ground_state(
        defect, charge, _starts(starts, search_spec, seed), lambda: load_calculator(model, head="hf"),
        model="mace:hf", fmax=search_spec.get("fmax", 0.02), max_steps=search_spec.get("max_steps", 300),
        energy_tolerance=search_spec.get("energy_tolerance", 0.01), plot_dir=plot_dir,
        min_distance_factor=search_spec.get("min_distance_factor", 0.6),
    )


@job(data=["minima", "landscape"])
@tracked("baseline", ignore=("plot_dir",))
def baseline_search(defect: str, charge: int, starts: list[dict[str, Any]], search_spec: dict[str, Any],
                    model: str = "chgnet", plot_dir: str | None = None) -> SearchResult:
    """The same ShakeNBreak starts relaxed with a foundation model (CHGNet: no charge input, weights ship
    with the package) for the baseline ground-state RMSD."""
    if model != "chgnet":
        raise ValueError(f"search.foundation_baseline: expected 'chgnet', got {model!r}")

    def factory():
        from chgnet.model.dynamics import CHGNetCalculator

        return CHGNetCalculator(use_device="cpu")

    return search_ground_state(defect, charge, _starts(starts, {"extra_starts": 0}, 0), factory, model="chgnet",
                               fmax=search_spec.get("fmax", 0.02), max_steps=search_spec.get("max_steps", 300),
                               energy_tolerance=search_spec.get("energy_tolerance", 0.01), plot_dir=plot_dir,
                               min_distance_factor=search_spec.get("min_distance_factor", 0.6))


@job(data=["hf_frame", "lf_frame"])
@tracked("verify", engines=("high", "low"))
def verify_ground_state(search, high: dict[str, Any], low: dict[str, Any], verify_spec: dict[str, Any]) -> Verification:
    """HF single point (or HF relaxation) on the surrogate ground state; LF single point too when it disagrees."""
    search = as_model(SearchResult, search)
    mode = verify_spec.get("mode", "single_point")
    v = Verification(defect=search.defect, charge=search.charge, mode=mode,
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
    v.agrees = v.error_mev_per_atom <= verify_spec.get("energy_threshold", 5.0)
    if mode == "relax":
        traj = engine.relax(gs, search.charge, workdir=Path.cwd() / (tag + "_relax"))
        final = traj.final
        if final is not None:
            v.structure, v.hf_energy = final.structure, final.energy
            v.rmsd_to_hf_relaxed = rmsd(gs, final.structure)
            v.rmsd_success = v.rmsd_to_hf_relaxed <= verify_spec.get("rmsd_threshold", 0.1)
        else:
            v.error = f"HF relaxation failed: {traj.error}"
    v.hf_seconds = time.perf_counter() - t0
    if not v.agrees:
        v.lf_frame = get_engine(low, fidelity="low").single_point(gs, search.charge, workdir=Path.cwd() / (tag + "_lf"))
    return v


@job
@tracked("finalize", cache=False)
def finalize(verifications: list, searches: list, baselines: list, training, context: dict[str, Any]) -> Response:
    """Top up and retrain when verification disagrees (rounds permitting), else compute levels and the result."""
    verifications = [as_model(Verification, v) for v in verifications]
    searches = [as_model(SearchResult, s) for s in searches]
    round_no = context["round"]
    spec = context["campaign"]
    disagree = [v for v in verifications if v.hf_energy is not None and not v.agrees and v.lf_frame is not None
                and v.lf_frame.energy is not None]
    history = [*context.get("history", []), {
        "round": round_no,
        "errors_mev_per_atom": {f"{v.defect} {v.charge:+d}": v.error_mev_per_atom for v in verifications},
        "disagreeing": [f"{v.defect} {v.charge:+d}" for v in disagree],
        "retrained": bool(disagree) and round_no < spec["verify"]["max_rounds"],
    }]
    hf_calls = context["hf_calls"] + len(verifications)
    hf_seconds = context["hf_seconds"] + sum(v.hf_seconds for v in verifications)
    best = best_verified(context.get("best_verified", {}), verifications, searches, round_no)
    if disagree and round_no < spec["verify"]["max_rounds"]:
        meta = [{"defect": v.defect, "distortion": f"verify_round{round_no}", "step": 0} for v in disagree]
        lf_xyz = context["lf_extxyz"] + frames_to_extxyz([(v.lf_frame, m) for v, m in zip(disagree, meta)], "lf")
        hf_xyz = context["hf_extxyz"] + hf_extxyz([(v.hf_frame, v.lf_frame, m) for v, m in zip(disagree, meta)])
        new_context = {**context, "round": round_no + 1, "lf_extxyz": lf_xyz, "hf_extxyz": hf_xyz,
                       "history": history, "hf_calls": hf_calls, "hf_seconds": hf_seconds, "best_verified": best}
        flow = build_search_round(lf_xyz, hf_xyz, new_context, baselines)
        return Response(replace=flow)

    # levels from the verified HF energies
    entries_by_group = context["defect_entries"]
    records, level_entries = [], []
    baseline_by = {(get_field(b, "defect"), get_field(b, "charge")): b for b in baselines if b is not None}
    for v in verifications:
        kept = best[f"{v.defect} {v.charge:+d}"]
        v = Verification.model_validate(kept["verification"])
        rec = GroundStateRecord(defect=v.defect, charge=v.charge, ground_state_label=v.ground_state_label,
                                structure=v.structure, surrogate_energy=v.surrogate_energy, hf_energy=v.hf_energy,
                                verification_error_mev_per_atom=v.error_mev_per_atom,
                                rmsd_to_hf_relaxed=v.rmsd_to_hf_relaxed, n_minima=kept["n_minima"],
                                landscape=kept["landscape"], landscape_plot=kept["plot"], round=kept["round"])
        b = baseline_by.get((v.defect, v.charge))
        if b is not None:
            b = as_model(SearchResult, b)
            if b.ground_state is not None and v.structure is not None:
                rec.baseline_rmsd = rmsd(v.structure, b.ground_state.structure)
                rec.baseline_label = b.ground_state_label
        records.append(rec)
        if v.hf_energy is not None and v.structure is not None:
            level_entries.append(LevelEntry(defect=v.defect, charge=v.charge, energy=v.hf_energy,
                                            structure=v.structure,
                                            defect_entry=entries_by_group[f"{v.defect} {v.charge:+d}"]))
    bulk = context["bulk"]
    levels, levels_error = None, None
    lv = spec["levels"]
    gap = lv.get("band_gap") if lv.get("band_gap") is not None else get_field(bulk, "band_gap")
    vbm = get_field(bulk, "vbm")
    try:
        if get_field(bulk, "energy_hf") is None:
            raise ValueError("bulk HF energy missing (the bulk HF single point failed)")
        if vbm is None or gap is None:
            raise ValueError("the HF engine reported no band edges for the bulk: set levels.band_gap and use an "
                             "engine that reports eigenvalues (qe, cp2k with smearing)")
        levels = compute_levels(level_entries, as_structure(context["bulk_structure"]), get_field(bulk, "energy_hf"),
                                vbm, gap, correction=lv.get("correction", "auto"), dielectric=lv.get("dielectric"),
                                chemical_potentials=lv.get("chemical_potentials"), plot_dir=context["plot_dir"])
    except ValueError as exc:
        levels_error = str(exc)
        logger.warning("levels not computed: %s", exc)
    comparison = [r if isinstance(r, dict) else r.model_dump() for r in get_field(training, "comparison", [])]
    plots = {f"landscape {r.defect} {r.charge:+d}": r.landscape_plot for r in records if r.landscape_plot}
    if levels and levels.plot:
        plots["formation_energies"] = levels.plot
    result = CampaignResult(campaign=spec["name"], ground_states=records, levels=levels, levels_error=levels_error,
                            rounds=history, model_comparison=comparison, hf_calls=hf_calls, hf_seconds=hf_seconds,
                            n_hf_selected=context.get("n_hf_selected", 0),
                            plots={**plots, **(get_field(training, "plots", {}) or {})})
    return Response(output=result)


def best_verified(previous: dict[str, Any], verifications: list[Verification], searches: list[SearchResult],
                  round_no: int) -> dict[str, Any]:
    """Per 'defect q': the verified surrogate minimum with the lowest HF energy over the rounds so far (a failed
    verification counts as +∞), with its round and its search's landscape. JSON-ready (it travels in the
    context of the next round); the HF/LF frames are left out (they are in the verify job's document)."""
    best = dict(previous)
    for v, s in zip(verifications, searches, strict=True):
        key = f"{v.defect} {v.charge:+d}"
        old = best.get(key)
        old_e = old["verification"].get("hf_energy") if old else None
        if old is None or (v.hf_energy is not None and (old_e is None or v.hf_energy < old_e)):
            best[key] = {"round": round_no, "n_minima": len(s.minima), "landscape": s.landscape, "plot": s.plot,
                         "verification": v.model_dump(mode="json", exclude={"hf_frame", "lf_frame"})}
    return best


def build_search_round(lf_xyz: str, hf_xyz: str, context: dict[str, Any], baselines: list | None,
                       training=None) -> Flow:
    """train (unless ``training`` given) → one search + verify per (defect, q) → finalize."""
    from defectflow.train.jobs import train_job

    spec = context["campaign"]
    jobs = []
    if training is None:
        t = train_job(lf_xyz, hf_xyz, spec["mlip"], context.get("model_plot_dir", context["plot_dir"]))
        name_job(t, "train", "round", context["round"])
        jobs.append(t)
        training = t.output
    searches, verifies = [], []
    for group, starts in context["starts"].items():
        defect, q = group.rsplit(" ", 1)
        s = surrogate_search(training, defect, int(q), starts, spec["search"], context["plot_dir"],
                             seed=spec["distortions"]["seed"])
        name_job(s, "search", group, "round", context["round"], defect=defect, charge=int(q), round=context["round"])
        v = verify_ground_state(s.output, spec["fidelities"]["high"], spec["fidelities"]["low"], spec["verify"])
        name_job(v, "verify", group, "round", context["round"], defect=defect, charge=int(q), round=context["round"])
        jobs += [s, v]
        searches.append(s.output)
        verifies.append(v.output)
    f = finalize(verifies, searches, baselines or [], training, context)
    name_job(f, "finalize", "round", context["round"])
    jobs.append(f)
    return Flow(jobs, output=f.output, name=f"search round {context['round']}")


@job
@tracked("start_search", cache=False)
def start_search(training, labelled, lf_training_set, bulk, baselines: list, context_json: str) -> Response:
    """Join point after training: fill the runtime context (LF/HF data, bulk reference) and start round 0."""
    context = json.loads(context_json)
    context.update({"lf_extxyz": get_field(lf_training_set, "extxyz", ""), "hf_extxyz": get_field(labelled, "extxyz", ""),
                    "bulk": bulk if isinstance(bulk, dict) else bulk.model_dump(),
                    "hf_calls": context["hf_calls"] + int(get_field(labelled, "n_requested", 0)),
                    "n_hf_selected": int(get_field(labelled, "n_requested", 0)),
                    "hf_seconds": float(get_field(labelled, "hf_seconds", 0.0))
                    + float(get_field(bulk, "hf_seconds", 0.0) or 0.0)})  # same calls as hf_calls: bulk included
    flow = build_search_round(context["lf_extxyz"], context["hf_extxyz"], context, baselines, training=training)
    return Response(replace=flow)
