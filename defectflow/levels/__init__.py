"""Step 5c: formation energies and charge-transition levels with doped.

:func:`compute_levels` builds one doped ``DefectEntry`` per (defect, q) from high-fidelity energies and the bulk
reference, applies a finite-size correction and hands them to doped's ``DefectThermodynamics`` for the CTLs
(eV above the VBM, in-gap flag), formation energies and the formation-energy diagram.

Finite-size corrections (``levels.correction``, any letter case; every entry gets the same scheme):

* ``eFNV`` — Kumagai & Oba, Phys. Rev. B 89, 195205 (2014): doped's ``DefectEntry.get_kumagai_correction``
  (pydefect's anisotropic point-charge energy + alignment of the site potentials outside the defect region). Needs
  the site potentials of the bulk and of every charged defect calculation (``ElectrostaticPotential``): VASP's
  OUTCAR core potentials, or QE's pp.x potential averaged at each atom.
* ``FNV`` — Freysoldt, Neugebauer & Van de Walle, Phys. Rev. Lett. 102, 016402 (2009): doped's
  ``DefectEntry.get_freysoldt_correction`` with the planar-averaged potentials (VASP's LOCPOT, QE's pp.x).
* ``image_charge`` — first-order Makov–Payne point-charge correction, E_corr = −E_Madelung(q) / ε, with the
  Madelung energy of a lattice of point charges q in a neutralising background from pymatgen's Ewald summation.
  Needs only the dielectric constant, so it works for every engine, but has no potential alignment. (For an
  anisotropic tensor the mean of its eigenvalues is used; this is recorded.)
* ``auto`` — the best the calculations support: eFNV when every charged entry and the bulk carry site
  potentials, else FNV when they carry planar averages, else image_charge; ``LevelsResult.correction_reason``
  says why. ``none`` — no correction.

eFNV is preferred, as doped recommends: it works for anisotropic hosts and is the more robust of the two in small
supercells. Engines that give potentials: VASP always (``LVHAR`` and the OUTCAR core potentials are in doped's
defect INCAR), QE when ``electrostatic_potential`` is on (:func:`with_potentials` turns it on for the bulk and
verification single points when the correction can use it); CP2K and ASE engines give none.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from defectflow.plotting import save_figure
from defectflow.schemas import LevelEntry, LevelsResult, TransitionLevel, group_key
from defectflow.schemas.core import ElectrostaticPotential
from defectflow.schemas.levels import FiniteSizeCorrection

logger = logging.getLogger(__name__)

__all__ = [
    "CORRECTIONS",
    "FiniteSizeCorrection",
    "LevelEntry",
    "LevelsResult",
    "TransitionLevel",
    "compute_levels",
    "correction_name",
    "finite_size_correction",
    "image_charge_correction",
    "with_potentials",
]

#: ``levels.correction`` values, as stored (input is case-insensitive: ``eFNV`` = ``efnv``)
CORRECTIONS = ("auto", "efnv", "fnv", "image_charge", "none")
_LABEL = {"efnv": "eFNV (Kumagai)", "fnv": "FNV (Freysoldt)", "image_charge": "image charge (Makov-Payne)",
          "none": "none"}
#: what doped reports an error estimate above (eV); the same tolerance is used for the note
_ERROR_TOLERANCE = 0.05


def correction_name(value: str) -> str:
    """``levels.correction`` in its stored spelling (``'eFNV'`` → ``'efnv'``); ValueError naming the field."""
    name = str(value).strip().lower()
    if name not in CORRECTIONS:
        raise ValueError(
            f"levels.correction: expected one of 'auto', 'eFNV', 'FNV', 'image_charge', 'none' (any case), "
            f"got {value!r}"
        )
    return name


def with_potentials(settings: Any, correction: str) -> dict[str, Any]:
    """The HF fidelity's engine settings (model or dict) as a dict, with the electrostatic potential switched on
    where the engine writes it only on request (QE: ``electrostatic_potential``) and ``correction`` can use it
    (auto, eFNV, FNV). VASP writes it always; CP2K and ASE engines give none: their settings come back as they
    are."""
    data = settings.model_dump(mode="json") if hasattr(settings, "model_dump") else dict(settings)
    if data.get("engine") == "qe" and correction_name(correction) in ("auto", "efnv", "fnv"):
        data["electrostatic_potential"] = True
    return data


def _scalar_dielectric(dielectric) -> float:
    if dielectric is None:
        raise ValueError("levels.dielectric: needed for the image-charge correction (or set correction: none)")
    if isinstance(dielectric, (int, float)):
        return float(dielectric)
    return float(np.mean(np.linalg.eigvalsh(np.asarray(dielectric, dtype=float))))


def image_charge_correction(structure, charge: int, dielectric: float) -> float:
    """First-order Makov–Payne correction in eV: −E_Madelung(point charge q + background) / ε.

    Positive for q ≠ 0 (the spurious image interaction lowers the energy of a charged cell)."""
    from pymatgen.analysis.ewald import EwaldSummation
    from pymatgen.core import DummySpecies
    from pymatgen.core import Structure as PmgStructure

    if charge == 0:
        return 0.0
    point = PmgStructure(structure.lattice, [DummySpecies("X", oxidation_state=charge)], [[0, 0, 0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        e_madelung = EwaldSummation(point, compute_forces=False).total_energy
    return float(-e_madelung / dielectric)


def finite_size_correction(
    defect_entry,
    scheme: str,
    dielectric,
    potential: ElectrostaticPotential | None = None,
    bulk_potential: ElectrostaticPotential | None = None,
) -> FiniteSizeCorrection:
    """The finite-size correction of one doped ``DefectEntry`` (eV), applied to it (``defect_entry.corrections``).

    ``defect_entry`` must hold the calculated defect and bulk supercells (``defect_supercell``,
    ``bulk_supercell``: the structures the potentials belong to) and ``charge_state``. ``scheme``: ``efnv``
    (doped's ``get_kumagai_correction`` with the site potentials, V), ``fnv`` (doped's ``get_freysoldt_correction``
    with the planar averages, eV), ``image_charge`` (:func:`image_charge_correction`) or ``none``. ``dielectric``:
    a number or a 3×3 tensor (eFNV/FNV take the tensor; image_charge the mean of its eigenvalues). A neutral
    entry gets 0 for every scheme (both terms scale with q)."""
    q = int(defect_entry.charge_state)
    defect_entry.corrections = {}
    if scheme == "none" or q == 0:
        return FiniteSizeCorrection(scheme=scheme, energy=0.0, point_charge=0.0 if scheme != "none" else None,
                                    alignment=0.0 if scheme in ("efnv", "fnv") else None)
    if scheme == "image_charge":
        e = image_charge_correction(defect_entry.sc_entry.structure, q, _scalar_dielectric(dielectric))
        defect_entry.corrections = {"image_charge_correction": e}
        return FiniteSizeCorrection(scheme=scheme, energy=e, point_charge=e)
    if potential is None or bulk_potential is None:
        raise ValueError(f"levels.correction: {scheme!r} needs the electrostatic potential of the defect and the "
                         "bulk calculation")
    with warnings.catch_warnings():  # doped warns above 0.05 eV of estimated error: recorded in the result instead
        warnings.simplefilter("ignore")
        if scheme == "efnv":
            defect_entry.calculation_metadata["defect_site_potentials"] = np.asarray(potential.site_potentials)
            defect_entry.calculation_metadata["bulk_site_potentials"] = np.asarray(bulk_potential.site_potentials)
            result, error = defect_entry.get_kumagai_correction(dielectric=dielectric, verbose=False,
                                                                return_correction_error=True)
            efnv = result.metadata["pydefect_ExtendedFnvCorrection"]
            sampled = sum(1 for site in efnv.sites if site.distance > efnv.defect_region_radius)
            return FiniteSizeCorrection(scheme=scheme, energy=float(result.correction_energy),
                                        point_charge=float(efnv.point_charge_correction),
                                        alignment=float(efnv.alignment_correction), error=float(error),
                                        sampled_sites=sampled)
        if scheme == "fnv":
            result, error = defect_entry.get_freysoldt_correction(
                dielectric=dielectric, defect_locpot=dict(enumerate(potential.planar_averages)),
                bulk_locpot=dict(enumerate(bulk_potential.planar_averages)), verbose=False,
                return_correction_error=True)
            return FiniteSizeCorrection(scheme=scheme, energy=float(result.correction_energy),
                                        point_charge=float(result.metadata["electrostatic"]),
                                        alignment=float(result.metadata["potential"]), error=float(error))
    raise ValueError(f"levels.correction: unknown scheme {scheme!r}")


def _potential_gaps(entries: list[LevelEntry], bulk_potential: ElectrostaticPotential | None,
                    field: str) -> list[str]:
    """What lacks ``field`` (site_potentials / planar_averages): 'bulk' and the charged entries' 'defect q'."""
    missing = [] if bulk_potential is not None and getattr(bulk_potential, field) else ["bulk"]
    return missing + [group_key(e.defect, e.charge) for e in entries
                      if e.charge != 0 and (e.potential is None or not getattr(e.potential, field))]


def _check_grids(entries: list[LevelEntry], bulk_potential: ElectrostaticPotential, bulk_structure,
                 scheme: str) -> None:
    """The potentials must describe the structures they come with (eFNV) and share the bulk's grid (FNV)."""
    for e in entries:
        if e.charge == 0:
            continue
        key = group_key(e.defect, e.charge)
        if scheme == "efnv" and len(e.potential.site_potentials) != len(e.structure):
            raise ValueError(f"levels.correction: eFNV: {key} has {len(e.potential.site_potentials)} site "
                             f"potentials for {len(e.structure)} sites")
        if scheme == "fnv" and [len(p) for p in e.potential.planar_averages] != [
                len(p) for p in bulk_potential.planar_averages]:
            raise ValueError(f"levels.correction: FNV: the potential of {key} is on another grid than the bulk's "
                             f"({e.potential.grid} vs {bulk_potential.grid}); use the same cell and cutoff")
    if scheme == "efnv" and len(bulk_potential.site_potentials) != len(bulk_structure):
        raise ValueError(f"levels.correction: eFNV: the bulk has {len(bulk_potential.site_potentials)} site "
                         f"potentials for {len(bulk_structure)} sites")


def _choose_scheme(correction: str, entries: list[LevelEntry], bulk_potential: ElectrostaticPotential | None,
                   dielectric) -> tuple[str, str]:
    """(scheme, why) for ``levels.correction`` = ``correction`` (stored spelling)."""
    if correction == "none":
        return "none", "levels.correction: none"
    if dielectric is None:
        if correction in ("efnv", "fnv"):
            raise ValueError(f"levels.dielectric: needed for the {_LABEL[correction]} correction "
                             "(or set levels.correction: none)")
        return "none", f"levels.correction: {correction}, but no levels.dielectric: no finite-size correction applied"
    if correction == "image_charge":
        return "image_charge", "levels.correction: image_charge"
    sites = _potential_gaps(entries, bulk_potential, "site_potentials")
    planes = _potential_gaps(entries, bulk_potential, "planar_averages")
    if correction in ("efnv", "fnv"):
        missing = sites if correction == "efnv" else planes
        if missing:
            what = "site potentials" if correction == "efnv" else "planar-averaged potentials"
            raise ValueError(
                f"levels.correction: {correction!r} needs the {what} of the bulk and of every charged defect "
                f"calculation; missing for: {', '.join(missing)}. They come from the HF engine: VASP always, QE "
                "with electrostatic_potential: true (a campaign sets it); CP2K and ASE engines give none. "
                "Use 'auto' or 'image_charge'")
        return correction, f"levels.correction: {correction}"
    source = bulk_potential.source if bulk_potential is not None else ""
    if not sites:
        return "efnv", f"auto → eFNV: site potentials of the bulk and of every charged defect ({source})"
    if not planes:
        return "fnv", (f"auto → FNV: planar-averaged potentials of the bulk and of every charged defect ({source}), "
                       f"site potentials missing for {', '.join(sites)}")
    return "image_charge", (
        f"auto → image_charge: no electrostatic potential for {', '.join(planes)} (the HF engine gives none: "
        "VASP does, QE with electrostatic_potential: true; CP2K and ASE engines do not)")


def compute_levels(
    entries: list[LevelEntry],
    bulk_structure,
    bulk_energy: float,
    vbm: float,
    band_gap: float,
    correction: str = "auto",
    dielectric=None,
    chemical_potentials: dict[str, float] | None = None,
    plot_dir: str | Path | None = None,
    bulk_potential: ElectrostaticPotential | None = None,
    precomputed_corrections: dict[str, float] | None = None,
) -> LevelsResult:
    """Charge-transition levels and formation energies from HF energies with doped's DefectThermodynamics.

    Energies in eV: ``bulk_energy`` of ``bulk_structure``, ``vbm`` (the Fermi-level zero) and ``band_gap``.
    ``correction``: ``levels.correction`` (module docstring); ``dielectric``: number or 3×3 tensor;
    ``bulk_potential``: the bulk HF calculation's electrostatic potential, with each entry's own
    (``LevelEntry.potential``), for eFNV/FNV. ``precomputed_corrections`` ('defect q' → eV, e.g. a stored
    ``LevelsResult.corrections``) are applied as they are, under the scheme ``correction`` names (figures redrawn
    without the potentials)."""
    from doped.core import DefectEntry
    from doped.thermodynamics import DefectThermodynamics
    from pymatgen.entries.computed_entries import ComputedStructureEntry

    correction = correction_name(correction)
    notes: list[str] = []
    if precomputed_corrections is not None:
        if correction == "auto":
            raise ValueError("precomputed_corrections: name the scheme they were computed with, not 'auto'")
        scheme, reason = correction, f"{correction} corrections computed before"
    else:
        scheme, reason = _choose_scheme(correction, entries, bulk_potential, dielectric)
    if scheme in ("efnv", "fnv") and precomputed_corrections is None:
        _check_grids(entries, bulk_potential, bulk_structure, scheme)
    notes.append(reason)
    tensor = dielectric is not None and not isinstance(dielectric, (int, float))
    eps = None if dielectric is None or (tensor and scheme != "image_charge") else _scalar_dielectric(dielectric)
    if tensor and scheme == "image_charge":
        notes.append(f"anisotropic dielectric tensor: the mean of its eigenvalues ({eps:.3f}) was used")
    elif tensor and scheme in ("efnv", "fnv"):
        notes.append(f"3×3 dielectric tensor passed to doped's {_LABEL[scheme]} as it is")

    bulk_entry = ComputedStructureEntry(bulk_structure, bulk_energy)
    doped_entries = []
    corrections: dict[str, float] = {}
    details: dict[str, FiniteSizeCorrection] = {}
    for e in entries:
        key = group_key(e.defect, e.charge)
        de = DefectEntry.from_dict(e.defect_entry)
        de.charge_state = e.charge
        de.sc_entry = ComputedStructureEntry(e.structure, e.energy)
        de.bulk_entry = bulk_entry
        # the calculated cells (the ones the potentials belong to), not the generated, unrelaxed one
        de.defect_supercell, de.bulk_supercell = e.structure, bulk_structure
        if precomputed_corrections is not None:
            energy = float(precomputed_corrections.get(key, 0.0))
            de.corrections = {f"{scheme}_correction": energy} if energy else {}
            details[key] = FiniteSizeCorrection(scheme=scheme, energy=energy)
        else:
            details[key] = finite_size_correction(de, scheme, dielectric, e.potential, bulk_potential)
        corrections[key] = details[key].energy
        err = details[key].error
        if err is not None and err > _ERROR_TOLERANCE:
            notes.append(f"{key}: doped estimates the {_LABEL[scheme]} correction's error at {err:.3f} eV "
                         f"(> {_ERROR_TOLERANCE} eV): the potential is not flat far from the defect (small cell?)")
        doped_entries.append(de)

    # Chemical potentials (they shift formation energies, never CTLs): user values are absolute eV/atom
    # references; an elemental host's own bulk energy per atom is the natural reference when none is given.
    elements = sorted({el.symbol for el in bulk_structure.composition})
    el_refs = None
    if chemical_potentials:
        missing = [el for el in elements if el not in chemical_potentials]
        if missing:
            raise ValueError(f"levels.chemical_potentials: missing {', '.join(missing)} (eV/atom, absolute)")
        el_refs = {el: float(mu) for el, mu in chemical_potentials.items()}
        notes.append("chemical potentials: user values (absolute, eV/atom)")
    elif len(elements) == 1:
        el_refs = {elements[0]: float(bulk_energy) / len(bulk_structure)}
        notes.append(f"elemental host: μ_{elements[0]} = bulk energy per atom ({el_refs[elements[0]]:.4f} eV)")
    else:
        notes.append("no chemical potentials: formation energies omit the μ terms (CTLs are unaffected)")
    chempots = {el: 0.0 for el in el_refs} if el_refs else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        thermo = DefectThermodynamics(doped_entries, vbm=vbm, band_gap=band_gap, check_compatibility=False,
                                      chempots=chempots, el_refs=el_refs)
        levels = []
        for defect, tls in thermo.transition_level_map.items():
            for level, (q_from, q_to) in sorted(tls.items()):
                levels.append(TransitionLevel(defect=defect, q_from=int(q_from), q_to=int(q_to), level=float(level),
                                              in_gap=bool(0.0 <= level <= band_gap)))
        ef_vbm = {}
        for e, de in zip(entries, doped_entries, strict=True):
            ef = thermo.get_formation_energy(de, fermi_level=0.0)
            ef_vbm[group_key(e.defect, e.charge)] = float(ef)
        plot = None
        if plot_dir is not None:
            plot = _plot(thermo, Path(plot_dir))
    return LevelsResult(vbm=vbm, band_gap=band_gap, correction_scheme=scheme, correction_reason=reason,
                        dielectric=eps, corrections=corrections, correction_details=details,
                        transition_levels=levels, formation_energies_vbm=ef_vbm,
                        chemical_potentials=chemical_potentials, plot=plot, notes=notes)


def _plot(thermo, plot_dir: Path) -> str | None:
    import matplotlib

    matplotlib.use("Agg")

    try:
        return save_figure(thermo.plot(), plot_dir / "formation_energies.png", dpi=150)
    except Exception as exc:  # noqa: BLE001 - a plot must not fail the campaign
        logger.warning("formation-energy plot failed: %s", exc)
        return None
