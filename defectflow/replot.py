"""Figures of a finished run drawn again from its store alone (``defectflow plot``): for runs whose plots were
written on another machine (FireWorks / jobflow-remote workers) or were deleted."""

from __future__ import annotations

import re
from pathlib import Path

from defectflow.levels import compute_levels
from defectflow.relax import plot_distortions, snb_energies
from defectflow.schemas import GenerationResult, GroupVerification, LevelEntry, SearchResult, as_structure
from defectflow.search import plot_landscape

__all__ = ["replot"]


def replot(results, out_dir: str | Path, what: tuple[str, ...] = ("lf", "landscapes", "levels")) -> dict[str, list[str]]:
    """Draw a finished run's figures again from its store alone, into ``out_dir``.

    For runs whose plots were written on another machine (FireWorks / jobflow-remote workers) or were deleted.
    ``results`` is a :class:`defectflow.results.Results`. ``what``:

    * ``lf`` — LF energy vs bond distortion per (defect, q), ShakeNBreak's ``plot_defect`` (from the
      ``relax_lf`` documents);
    * ``landscapes`` — surrogate energy vs starting distortion per (defect, q) of the final round, and of the
      foundation-model baseline when it ran;
    * ``levels`` — the formation-energy diagram: doped's ``DefectThermodynamics`` rebuilt from the verified HF
      energies and structures, the bulk reference and the run's own correction, dielectric constant and chemical
      potentials (as ``finalize`` computed it).

    Returns kind → written PNG paths; a kind with nothing to draw (an LF-only run has no landscapes or levels)
    gives an empty list.
    """
    out = Path(out_dir)
    written: dict[str, list[str]] = {k: [] for k in what}
    unknown = set(what) - {"lf", "landscapes", "levels"}
    if unknown:
        raise ValueError(f"plot kinds: expected lf, landscapes, levels; got {', '.join(sorted(unknown))}")
    if "lf" in what:
        written["lf"] = _replot_lf(results, out / "lf")
    final = results.result()
    if "landscapes" in what and final:
        written["landscapes"] = _replot_landscapes(results, final, out / "landscapes")
    if "levels" in what and final and final.get("levels"):
        path = _replot_levels(results, final, out)
        written["levels"] = [path] if path else []
    return written


def _replot_lf(results, out: Path) -> list[str]:
    groups: dict[tuple[str, int], list] = {}
    for d in results.query(step="relax_lf", properties=["output.distortion", "output.bond_distortion",
                                                         "output.energy", "output.status", "metadata"]):
        o, m = d.get("output") or {}, d.get("metadata") or {}
        if o.get("energy") is None or o.get("status") == "failed":
            continue
        groups.setdefault((m["defect"], int(m["charge"])), []).append(
            (o["distortion"], o.get("bond_distortion"), o["energy"]))
    paths = []
    for (defect, q), rows in sorted(groups.items()):
        snb = snb_energies(rows)
        if "Unperturbed" in snb and snb["distortions"]:
            path = plot_distortions(snb, defect, q, str(out), None, None)
            if path:
                paths.append(path)
    return paths


def _bond_distortion(label: str) -> float | None:
    """ShakeNBreak label (with an optional '+rattleK' suffix) → bond distortion fraction; None for Unperturbed,
    Dimer and other non-bond-distortion starts."""
    m = re.match(r"Bond_Distortion_(-?\d+(?:\.\d+)?)%", label)
    return float(m.group(1)) / 100 if m else None


def _replot_landscapes(results, final: dict, out: Path) -> list[str]:
    """The surrogate landscape of each (defect, q) from the round its ground state comes from, with that round's
    HF-verified minima (search and verify documents of the store), and the baseline's."""
    paths = []
    for g in final["ground_states"]:
        if not g.get("landscape"):
            continue
        rnd = g.get("round")
        search = [d for d in results.query(step="search", defect=g["defect"], charge=g["charge"], load=True,
                                           properties=["output", "metadata"])
                  if (d.get("metadata") or {}).get("round") == rnd]
        verify = [d for d in results.query(step="verify", defect=g["defect"], charge=g["charge"], load=True,
                                           properties=["output", "metadata"])
                  if (d.get("metadata") or {}).get("round") == rnd]
        if search:
            res = SearchResult.model_validate(search[-1]["output"])
        else:
            res = SearchResult(defect=g["defect"], charge=g["charge"], model="mace:hf", n_starts=len(g["landscape"]),
                               landscape=g["landscape"], minima=[])
        try:
            gv = GroupVerification.model_validate(verify[-1]["output"]) if verify else None
        except ValueError:  # a store written before issue #14 (one Verification per job): no verified markers
            gv = None
        paths.append(plot_landscape(res, {k: _bond_distortion(k) for k in res.landscape}, out, verification=gv,
                                    suffix="" if rnd is None else f"_round{rnd}"))  # the pipeline's file name
    for d in results.query(step="baseline", load=True, properties=["output"]):
        o = d.get("output") or {}
        if o.get("landscape"):
            res = SearchResult.model_validate({**o, "minima": [], "ground_state": None})
            paths.append(plot_landscape(res, {k: _bond_distortion(k) for k in res.landscape}, out))
    return paths


def _replot_levels(results, final: dict, out: Path) -> str | None:
    gen_doc = results.query(step="generation", load=True, properties=["output"])
    bulk_doc = results.query({"name": "bulk_reference"}, properties=["output"])
    if not gen_doc or not bulk_doc:
        return None
    generation = GenerationResult.model_validate(gen_doc[-1]["output"])
    bulk = bulk_doc[-1]["output"]
    entries_by = {(ds.defect, ds.charge): ds.defect_entry for ds in generation.distortion_sets}
    entries = [LevelEntry(defect=g["defect"], charge=g["charge"], energy=g["hf_energy"],
                          structure=as_structure(g["structure"]), defect_entry=entries_by[(g["defect"], g["charge"])])
               for g in final["ground_states"] if g.get("hf_energy") is not None and g.get("structure")]
    lv = final["levels"]
    # the finite-size corrections the run applied, as stored (eFNV/FNV would need the potentials again)
    res = compute_levels(entries, generation.bulk_supercell, bulk["energy_hf"], lv["vbm"], lv["band_gap"],
                         correction=lv["correction_scheme"], dielectric=lv.get("dielectric"),
                         chemical_potentials=lv.get("chemical_potentials"), plot_dir=out,
                         precomputed_corrections=lv.get("corrections") or {})
    return res.plot
