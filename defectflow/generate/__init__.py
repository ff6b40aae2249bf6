"""Step 1: defects, supercell and charge states from doped; distorted structures from ShakeNBreak.

:func:`generate` is a plain function (used at graph-construction time by :class:`~defectflow.flows.DefectCampaignMaker`
and usable on its own); its output is a :class:`GenerationResult` with one :class:`DistortionSet` per (defect, q).
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from typing import Any

import numpy as np
from monty.json import jsanitize
from pymatgen.core import Structure as PmgStructure

from defectflow.campaign import Campaign, CampaignError
from defectflow.schemas import DistortedStructure, DistortionSet, GenerationResult

logger = logging.getLogger(__name__)

__all__ = ["DistortedStructure", "DistortionSet", "GenerationResult", "generate", "bond_distortion_grid"]


def bond_distortion_grid(increment: float, maximum: float = 0.6) -> list[float]:
    """ShakeNBreak's default grid −max…+max in steps of ``increment`` (fractions), 0 included once."""
    pos = list(np.around(np.arange(0, maximum + 1e-3, increment), decimals=3))
    neg = [-x for x in reversed(pos[1:])]
    return [float(x) for x in neg + pos]


def _thin(items: list, n: int | None) -> list:
    """Keep ``n`` items evenly spread (always the first and last), or all."""
    if n is None or len(items) <= n:
        return items
    idx = sorted({int(round(i)) for i in np.linspace(0, len(items) - 1, n)})
    return [items[i] for i in idx]


def _select_entries(dg, include: list[str]) -> dict[str, list]:
    """Group doped DefectEntries by defect name, keeping those matching ``include`` (names or kinds)."""
    kinds = {"vacancies": "vacancy", "antisites": "antisite", "substitutions": "substitution",
             "interstitials": "interstitial"}
    groups: dict[str, list] = {}
    for entry in dg.defect_entries.values():
        name = entry.name.rsplit("_", 1)[0]  # strip the charge: v_Si_-1 -> v_Si
        dtype = _defect_type(entry)
        wanted = "all" in include or name in include or any(
            k in include and (dtype == v or (k == "substitutions" and dtype == "antisite")) for k, v in kinds.items()
        ) or any(name.startswith(n + "_") for n in include if n not in kinds and n != "all")
        if wanted:
            groups.setdefault(name, []).append(entry)
    return groups


def _defect_type(entry) -> str:
    t = entry.defect.defect_type.name.lower()  # vacancy / substitution / interstitial
    if t == "substitution" and entry.defect.site.specie.symbol in entry.defect.structure.composition:
        return "antisite"
    return t


def generate(campaign: Campaign, processes: int = 1) -> GenerationResult:
    """Run doped (defects, supercell, charges) and ShakeNBreak (distortions) for ``campaign``.

    Charge states: the campaign's explicit lists where given, doped's guesses (with
    ``defects.charge_padding``) otherwise; doped's guessing information is kept in the result.
    """
    from doped.generation import DefectsGenerator
    from shakenbreak.input import Distortions

    t0 = time.perf_counter()
    host = campaign.host_structure()
    sc = campaign.host.supercell
    kinds = set(campaign.defects.include)
    want_interstitials = campaign.defects.interstitials or "interstitials" in kinds or any(
        n.endswith("_i") or "_i_" in n for n in kinds
    )
    supercell_kwargs: dict[str, Any] = {
        "min_image_distance": sc.min_image_distance,
        "min_atoms": sc.min_atoms,
        "force_diagonal": sc.force_diagonal,
    }
    gen_kwargs: dict[str, Any] = {
        "extrinsic": campaign.defects.extrinsic or None,
        "interstitial_gen_kwargs": None if want_interstitials else False,
        "charge_state_gen_kwargs": {"padding": campaign.defects.charge_padding},
        "processes": processes,
    }
    if sc.matrix is not None:
        host = host.copy()
        host.make_supercell(sc.matrix)
        gen_kwargs["generate_supercell"] = False
    else:
        gen_kwargs["supercell_gen_kwargs"] = supercell_kwargs
    # doped prints a table and a tqdm bar; keep them out of the terminal (the table goes to the log)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()) as doped_out, \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        dg = DefectsGenerator(host, **gen_kwargs)
    logger.info("doped: %s", doped_out.getvalue().strip().replace("\n", " | ")[:500])

    groups = _select_entries(dg, campaign.defects.include)
    missing = [n for n in campaign.defects.include if n not in ("all", "vacancies", "antisites", "substitutions",
                                                              "interstitials") and not any(
        g == n or g.startswith(n + "_") for g in groups)]
    if missing:
        available = sorted({e.name.rsplit("_", 1)[0] for e in dg.defect_entries.values()})
        raise CampaignError([f"defects.include: doped generated no defect named {missing[0]!r}; "
                             f"available: {', '.join(available)}"])

    charges: dict[str, list[int]] = {}
    source: dict[str, str] = {}
    glog: dict[str, Any] = {}
    entries_by_q: dict[tuple[str, int], Any] = {}
    for name, entries in sorted(groups.items()):
        template = entries[0]
        guessed = sorted(e.charge_state for e in entries)
        glog[name] = {"guessed": guessed,
                      "probabilities": getattr(template, "charge_state_guessing_log", None)}
        explicit = campaign.charges_for(name)
        qs = sorted(explicit) if explicit is not None else guessed
        charges[name], source[name] = qs, ("campaign" if explicit is not None else "doped")
        by_q = {e.charge_state: e for e in entries}
        for q in qs:
            entry = by_q.get(q)
            if entry is None:  # a charge doped did not guess: same defect, new charge state
                entry = template.__class__.from_dict(template.as_dict())
                entry.charge_state = q
                entry.name = f"{name}_{q:+d}" if q else f"{name}_0"
            entries_by_q[(name, q)] = entry

    dist = campaign.distortions
    base_grid = dist.bond_distortions or bond_distortion_grid(dist.distortion_increment)
    sets: list[DistortionSet] = []
    for name in sorted(groups):
        entries = {f"{name}_{q:+d}" if q else f"{name}_0": entries_by_q[(name, q)] for q in charges[name]}
        dtype = _defect_type(next(iter(entries.values())))
        grid: list[Any] = list(base_grid)
        if dist.dimer and dtype == "vacancy":
            grid.append("Dimer")
        mc_kwargs: dict[str, Any] = {"seed": dist.seed}
        if dist.rattle_stdev is not None:
            mc_kwargs["stdev"] = dist.rattle_stdev
        if dist.d_min is not None:
            mc_kwargs["d_min"] = dist.d_min
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            snb = Distortions(
                entries,
                oxidation_states=campaign.host.oxidation_states,
                bond_distortions=grid,
                local_rattle=dist.local_rattle,
                **{**dist.options, **mc_kwargs},
            )
            structures, metadata = snb.apply_distortions(verbose=False)
        (snb_name, data), = structures.items()
        meta = metadata["defects"][snb_name]["charges"]
        stdev = metadata.get("distortion_parameters", {}).get("mc_rattle_parameters", {}).get("stdev")
        for q in charges[name]:
            block = data["charges"][q]["structures"]
            starts = [DistortedStructure(label="Unperturbed", structure=_charged(block["Unperturbed"], q))]
            distorted = []
            for label, s in block["distortions"].items():
                frac = _fraction(label)
                distorted.append(DistortedStructure(label=label, bond_distortion=frac, structure=_charged(s, q)))
            starts += _thin(distorted, dist.max_structures - 1 if dist.max_structures else None)
            qmeta = meta.get(str(q), meta.get(q, {}))
            sets.append(DistortionSet(
                defect=name,
                charge=q,
                defect_type=dtype,
                num_distorted_neighbours=int(qmeta.get("num_nearest_neighbours", 0)),
                distorted_atoms=[int(a[0]) for a in qmeta.get("distorted_atoms") or []],
                rattle_stdev=stdev,
                structures=starts,
                defect_entry=jsanitize(entries_by_q[(name, q)].as_dict(), strict=True, allow_bson=False),
            ))
    result = GenerationResult(
        campaign=campaign.name,
        host_formula=host.composition.reduced_formula,
        bulk_supercell=dg.bulk_supercell,
        supercell_matrix=np.asarray(dg.supercell_matrix).tolist() if getattr(dg, "supercell_matrix", None) is not None else None,
        min_image_distance=float(dg.min_image_distance) if getattr(dg, "min_image_distance", None) else None,
        charges=charges,
        charge_source=source,
        charge_guessing_log=jsanitize(glog, strict=True),
        distortion_sets=sets,
        wall_seconds=time.perf_counter() - t0,
    )
    logger.info("generated %d (defect, q) sets, %d structures in %.1f s", len(sets), result.n_structures,
                result.wall_seconds)
    return result


def _charged(s: PmgStructure, q: int) -> PmgStructure:
    return PmgStructure(s.lattice, s.species, s.frac_coords, charge=q)


def _fraction(label: str) -> float | None:
    if label.startswith("Bond_Distortion_"):
        return round(float(label.removeprefix("Bond_Distortion_").rstrip("%")) / 100, 4)
    return None
