"""Step 2: low-fidelity relaxation of every distorted structure, the per-(defect, q) energy-vs-distortion summary
(ShakeNBreak's criteria and plot) and the harvest of every ionic step into a MACE training set.

Jobs (jobflow):

* :func:`relax_structure` — one relaxation; output :class:`RelaxRecord` (trajectory in the ``data`` store).
  Any failure is recorded in the record (``status='failed'``, ``error``); the job itself succeeds so the campaign
  goes on.
* :func:`summarize_distortions` — ShakeNBreak's ground-state distortion and energy lowering for one (defect, q),
  with an ``snb-plot``-style PNG.
* :func:`harvest_training_set` — all frames → extxyz (``REF_energy``, ``REF_forces``, ``REF_stress``,
  ``total_charge``, ``head``, ``defect``, ``distortion``, ``step``), with a sanity filter and near-duplicate removal.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
from jobflow import job
from pydantic import BaseModel, Field

from defectflow.engines import get_engine
from defectflow.engines.base import safe_name
from defectflow.plotting import save_figure
from defectflow.schemas import (
    DistortionSummary,
    Frame,
    RelaxRecord,
    TrainingSet,
    as_structure,
    group_key,
)
from defectflow.store.tracking import tracked
from defectflow.train.data import frames_to_extxyz

logger = logging.getLogger(__name__)

__all__ = [
    "RelaxRecord",
    "DistortionSummary",
    "HarvestFilter",
    "TrainingSet",
    "relax_structure",
    "summarize_distortions",
    "plot_distortions",
    "snb_energies",
    "harvest_training_set",
]


@job(data="trajectory")
@tracked("relax_lf", engines=("settings",))
def relax_structure(
    structure,
    charge: int,
    settings: dict[str, Any],
    fidelity: str = "low",
    defect: str = "",
    distortion: str = "",
    bond_distortion: float | None = None,
    fmax: float = 0.05,
    max_steps: int = 100,
) -> RelaxRecord:
    """Relax one structure at charge ``charge`` with the engine ``settings`` describe (``fidelity``: its name, low / high).

    ``structure`` may be a Structure, its dict or its JSON string (graphs pass JSON: jobflow then skips scanning
    it, which keeps building a 4000-job graph to seconds). Never raises: engine set-up errors and crashes are
    recorded with ``status='failed'``.
    """
    structure = as_structure(structure)
    engine = get_engine(settings, fidelity=fidelity)
    workdir = Path.cwd() / safe_name(f"{defect}_{charge:+d}_{distortion}")
    t0 = time.perf_counter()
    try:
        traj = engine.relax(structure, charge, workdir=workdir, fmax=fmax, max_steps=max_steps)
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, the campaign goes on
        logger.warning("relaxation %s q=%+d %s failed: %s", defect, charge, distortion, exc)
        traj = engine.make_trajectory([], "failed", charge, fmax, time.perf_counter() - t0,
                                      f"{type(exc).__name__}: {exc}")
        logger.debug(traceback.format_exc())
    traj.label = f"{defect}_{charge:+d}/{distortion}"
    final = traj.final
    return RelaxRecord(
        defect=defect,
        charge=charge,
        distortion=distortion,
        bond_distortion=bond_distortion,
        status=traj.status,
        error=traj.error,
        n_steps=traj.n_steps,
        energy=None if final is None else final.energy,
        fmax=None if final is None else final.fmax,
        wall_seconds=traj.wall_seconds,
        engine=engine.name,
        fidelity=fidelity,
        settings_digest=engine.digest,
        final_structure=None if final is None else final.structure,
        trajectory=traj,
    )


# ---------------------------------------------------------------------------------------------------------------
# per-(defect, q) summary
# ---------------------------------------------------------------------------------------------------------------


def _snb_key(label: str, bond_distortion: float | None):
    if label == "Unperturbed":
        return "Unperturbed"
    return bond_distortion if bond_distortion is not None else label


def snb_energies(rows) -> dict[str, Any]:
    """ShakeNBreak's energies dict ``{"Unperturbed": E, "distortions": {bond distortion or label: E}}`` (eV) from
    (label, bond distortion, final energy) of successful relaxations, as ``get_gs_distortion`` and
    ``plot_defect`` take it."""
    snb: dict[str, Any] = {"distortions": {}}
    for label, bond_distortion, energy in rows:
        key = _snb_key(label, bond_distortion)
        if key == "Unperturbed":
            snb["Unperturbed"] = energy
        else:
            snb["distortions"][key] = energy
    return snb


@job
@tracked("summary", cache=False)
def summarize_distortions(
    records: list[RelaxRecord],
    defect: str,
    charge: int,
    num_nearest_neighbours: int | None = None,
    neighbour_atom: str | None = None,
    plot_dir: str | None = None,
    min_e_diff: float = 0.05,
) -> DistortionSummary:
    """ShakeNBreak's ground-state distortion and energy-vs-distortion plot for one (defect, q)."""
    from shakenbreak.analysis import get_gs_distortion

    energies = {r.distortion: r.energy for r in records if r.energy is not None and r.status != "failed"}
    status = {r.distortion: r.status for r in records}
    errors = {r.distortion: r.error for r in records if r.status == "failed" and r.error}
    snb = snb_energies((r.distortion, r.bond_distortion, r.energy) for r in records if r.distortion in energies)
    gs_label, lowering = None, None
    if energies:
        lowering, gs_key = get_gs_distortion(snb)
        gs_label = next(
            (r.distortion for r in records if r.distortion in energies and _snb_key(r.distortion, r.bond_distortion) == gs_key),
            None,
        )
    ref = energies.get("Unperturbed")
    rel = {k: v - ref for k, v in energies.items()} if ref is not None else {}
    plot = None
    if plot_dir and "Unperturbed" in snb and snb["distortions"]:
        plot = plot_distortions(snb, defect, charge, plot_dir, num_nearest_neighbours, neighbour_atom)
    return DistortionSummary(
        defect=defect,
        charge=charge,
        energies=energies,
        relative_energies=rel,
        status=status,
        errors=errors,
        ground_state=gs_label,
        energy_lowering=lowering,
        energy_lowering_found=bool(lowering is not None and lowering < -min_e_diff),
        min_e_diff=min_e_diff,
        n_converged=sum(s == "converged" for s in status.values()),
        n_failed=sum(s == "failed" for s in status.values()),
        plot=plot,
    )


def plot_distortions(snb: dict, defect: str, charge: int, plot_dir: str, nn: int | None = None,
                     atom: str | None = None) -> str | None:
    """Energy vs bond distortion with ShakeNBreak's own plot_defect (same look as ``snb-plot``): ``snb`` is
    :func:`snb_energies`' dict (eV), ``nn``/``atom`` the distorted neighbours' count and element for the legend.
    Returns the PNG path, or None when ShakeNBreak draws nothing; never raises."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    from shakenbreak.plotting import plot_defect

    species = f"{defect}_{charge:+d}" if charge else f"{defect}_0"
    out = Path(plot_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fig = plot_defect(species, snb, output_path=str(out), num_nearest_neighbours=nn, neighbour_atom=atom,
                              save_plot=False, close_figure=False, max_energy_above_unperturbed=5.0)
        if fig is None:
            return None

        return save_figure(fig, out / f"{species}.png", dpi=150)
    except Exception as exc:  # noqa: BLE001 - a plot must never fail the campaign
        logger.warning("energy-vs-distortion plot for %s failed: %s", species, exc)
        return None


# ---------------------------------------------------------------------------------------------------------------
# training-set harvesting
# ---------------------------------------------------------------------------------------------------------------
class HarvestFilter(BaseModel):
    """Documented thresholds for turning relaxation steps into training data."""

    max_force: float = Field(20.0, gt=0, description="Drop frames with any atomic force above this, eV/Å")
    max_energy_above_min: float = Field(
        1.0, gt=0, description="Drop frames more than this above the lowest frame of the same (defect, q), eV/atom"
    )
    dedup_energy: float = Field(
        1e-3, ge=0, description="A step is a near-duplicate of the last kept step of its trajectory when its energy "
        "differs by less than this (eV/atom) ..."
    )
    dedup_displacement: float = Field(0.02, ge=0, description="... and no atom moved more than this (Å)")
    keep_every: int = Field(1, ge=1, description="Keep every n-th step (first and last always kept)")

    def frame_problem(self, frame: Frame) -> tuple[str, str] | None:
        """Why one frame on its own is no training data: (the harvest's ``dropped`` key, a sentence), or None. The
        checks that need no other frame: a failed SCF, non-finite or missing values, forces the engine flagged,
        an atomic force above ``max_force``."""
        if frame.energy is None or not frame.scf_converged:
            return "failed_scf", "no energy (failed SCF)"
        if not math.isfinite(frame.energy) or frame.forces is None or not np.all(np.isfinite(frame.forces_array)):
            return "non_finite", "non-finite or missing energy or forces"
        if frame.forces_suspect:
            return "forces_suspect", "forces the engine flagged (Frame.forces_suspect)"
        if frame.fmax > self.max_force:
            return "max_force", f"an atomic force of {frame.fmax:.1f} eV/Å, above {self.max_force:g}"
        return None

    def rejects(self, frame: Frame, lowest_per_atom: float | None) -> str | None:
        """Why one labelled frame is no training data by this filter's force and energy thresholds (None: it is),
        ``lowest_per_atom`` being the lowest known energy of its (defect, q), eV/atom. For frames that arrive one
        at a time: the HF single points of an active-learning top-up."""
        problem = self.frame_problem(frame)
        if problem:
            return problem[1]
        if lowest_per_atom is not None:
            above = frame.energy / len(frame.structure) - lowest_per_atom
            if above > self.max_energy_above_min:
                return (f"{above:.2f} eV/atom above the lowest known frame of its (defect, q), above "
                        f"{self.max_energy_above_min:g}")
        return None


def _filter(records: list[RelaxRecord], flt: HarvestFilter) -> tuple[list[tuple[Frame, dict]], dict[str, int], int]:
    dropped = {"failed_scf": 0, "non_finite": 0, "forces_suspect": 0, "max_force": 0, "high_energy": 0,
               "near_duplicate": 0, "keep_every": 0}
    candidates = 0
    by_group: dict[tuple[str, int], list[tuple[Frame, dict]]] = {}
    for rec in records:
        traj = rec.trajectory
        if traj is None:
            continue
        frames = traj.frames
        candidates += len(frames)
        kept: list[Frame] = []
        for i, f in enumerate(frames):
            last_step = i == len(frames) - 1
            problem = flt.frame_problem(f)
            if problem:
                dropped[problem[0]] += 1
                continue
            if kept and not last_step:
                if flt.keep_every > 1 and i % flt.keep_every:
                    dropped["keep_every"] += 1
                    continue
                prev = kept[-1]
                de = abs(f.energy - prev.energy) / len(f.structure)
                disp = np.abs(f.structure.cart_coords - prev.structure.cart_coords).max()
                if de < flt.dedup_energy and disp < flt.dedup_displacement:
                    dropped["near_duplicate"] += 1
                    continue
            kept.append(f)
        meta = {"defect": rec.defect, "distortion": rec.distortion}
        by_group.setdefault((rec.defect, rec.charge), []).extend((f, meta) for f in kept)
    out: list[tuple[Frame, dict]] = []
    for items in by_group.values():
        if not items:
            continue
        e_min = min(f.energy / len(f.structure) for f, _ in items)
        for f, meta in items:
            if f.energy / len(f.structure) - e_min > flt.max_energy_above_min:
                dropped["high_energy"] += 1
            else:
                out.append((f, meta))
    return out, dropped, candidates


@job(data="extxyz")
@tracked("harvest_lf", cache=False)
def harvest_training_set(
    records: list[RelaxRecord],
    fidelity: str = "low",
    head: str = "lf",
    harvest_filter: dict[str, Any] | None = None,
) -> TrainingSet:
    """Every ionic step of every relaxation → one extxyz training set (filtered, near-duplicates removed)."""
    flt = HarvestFilter.model_validate(harvest_filter or {})
    kept, dropped, candidates = _filter(records, flt)
    per_group: dict[str, int] = {}
    for f, meta in kept:
        key = group_key(meta["defect"], f.charge)
        per_group[key] = per_group.get(key, 0) + 1
    logger.info("harvested %d of %d frames (%s)", len(kept), candidates, dropped)
    return TrainingSet(
        fidelity=fidelity,
        head=head,
        n_frames=len(kept),
        n_candidates=candidates,
        dropped=dropped,
        per_group=per_group,
        charges=sorted({f.charge for f, _ in kept}),
        extxyz=frames_to_extxyz(kept, head),
    )
