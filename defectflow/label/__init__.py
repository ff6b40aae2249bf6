"""Step 3b: high-fidelity labels for the selected frames, and the bulk reference.

* :func:`label_selected` — a dynamic job: once the selection is known it replaces itself by one HF single-point job
  per selected frame (so FireWorks / jobflow-remote spread them) plus :func:`collect_labels`.
* :func:`collect_labels` — HF frames → extxyz for the HF head, carrying the LF labels of the same geometry
  (``LF_energy``, ``LF_forces``) for Δ-learning; failed HF calculations are listed, not fatal.
* :func:`bulk_reference` — pristine-supercell energies and band edges for the levels step.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from jobflow import Flow, Response, job

from defectflow.label.jobs import single_point
from defectflow.schemas import BulkReference, Frame, LabelledSet, Selection, group_key
from defectflow.steps import name_job
from defectflow.store.tracking import tracked
from defectflow.train.data import hf_extxyz

logger = logging.getLogger(__name__)

__all__ = ["LabelledSet", "BulkReference", "label_selected", "collect_labels", "bulk_reference"]


@job(data=["frames", "extxyz"])
@tracked("collect_hf", cache=False)
def collect_labels(hf_frames: list[Frame], selection: Selection) -> LabelledSet:
    """Pair every HF single point with its selected LF frame; record failures."""
    chosen = selection.chosen
    pairs, failed, per_group, seconds = [], [], {}, 0.0
    good = []
    for hf, sel in zip(hf_frames, chosen, strict=True):
        lf = sel.frame
        meta = {"defect": sel.defect, "distortion": sel.distortion, "step": sel.step}
        seconds += hf.wall_seconds
        if hf.energy is None or not hf.scf_converged or hf.forces is None or not np.all(np.isfinite(hf.forces_array)):
            failed.append({**meta, "charge": hf.charge, "error": hf.error or "SCF not converged"})
            continue
        pairs.append((hf, lf, meta))
        good.append(hf)
        key = group_key(sel.defect, hf.charge)
        per_group[key] = per_group.get(key, 0) + 1
    if failed:
        logger.warning("%d of %d HF single points failed", len(failed), len(chosen))
    return LabelledSet(n_requested=len(chosen), n_labelled=len(pairs), failed=failed, per_group=per_group,
                       hf_seconds=seconds, frames=good, extxyz=hf_extxyz(pairs))


@job
@tracked("label_hf", cache=False)
def label_selected(selection: Selection, settings: dict[str, Any], fidelity: str = "high") -> Response:
    """Replace this job by one HF single point per selected frame plus :func:`collect_labels`."""
    jobs = []
    for sel in selection.chosen:
        frame = sel.frame
        tag = f"{sel.defect}_{frame.charge:+d}_{sel.distortion}_step{sel.step}"
        j = single_point(frame.structure.to_json(), frame.charge, settings, fidelity, tag=tag)
        name_job(j, "single_hf", tag, defect=sel.defect, charge=frame.charge, distortion=sel.distortion)
        jobs.append(j)
    collect = collect_labels([j.output for j in jobs], selection)
    name_job(collect, "collect_hf")
    return Response(replace=Flow([*jobs, collect], output=collect.output, name="single_hf"))


@job
@tracked("bulk_reference", cache=False)
def bulk_reference(lf: Frame, hf: Frame) -> BulkReference:
    """Collect the bulk LF/HF single points into one reference document."""
    errors = [f"{name}: {f.error}" for name, f in (("low", lf), ("high", hf)) if f.error]
    return BulkReference(natoms=len(hf.structure), energy_lf=lf.energy, energy_hf=hf.energy, vbm=hf.vbm,
                         cbm=hf.cbm, band_gap=hf.band_gap, vbm_lf=lf.vbm, band_gap_lf=lf.band_gap,
                         hf_seconds=hf.wall_seconds or 0.0, errors=errors)
