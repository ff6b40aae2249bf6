"""Step 5c: formation energies and charge-transition levels with doped.

:func:`compute_levels` builds one doped ``DefectEntry`` per (defect, q) from high-fidelity energies and the bulk
reference, applies a finite-size correction and hands them to doped's ``DefectThermodynamics`` for the CTLs
(eV above the VBM, in-gap flag), formation energies and the formation-energy diagram.

Finite-size corrections (``levels.correction``):

* ``image_charge`` — first-order Makov–Payne point-charge correction, E_corr = −E_Madelung(q) / ε, with the
  Madelung energy of a lattice of point charges q in a neutralising background from pymatgen's Ewald summation.
  Needs only the dielectric constant, so it works for every engine. (For an anisotropic tensor the mean of its
  eigenvalues is used; this is recorded.)
* ``efnv`` / ``fnv`` — doped's Kumagai / Freysoldt corrections need the engine's electrostatic potentials (VASP
  OUTCAR / LOCPOT). They are not wired into the graph yet; asking for them raises a clear error.
* ``auto`` — ``image_charge`` (recorded as such in the output), ``none`` — no correction.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

from defectflow.plotting import save_figure
from defectflow.schemas import LevelEntry, LevelsResult, TransitionLevel, group_key

logger = logging.getLogger(__name__)

__all__ = ["LevelEntry", "TransitionLevel", "LevelsResult", "compute_levels", "image_charge_correction"]


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
) -> LevelsResult:
    """Charge-transition levels and formation energies from HF energies with doped's DefectThermodynamics."""
    from doped.core import DefectEntry
    from doped.thermodynamics import DefectThermodynamics
    from pymatgen.entries.computed_entries import ComputedStructureEntry

    notes: list[str] = []
    if correction in ("efnv", "fnv"):
        raise ValueError(
            f"levels.correction: {correction!r} needs the engine's electrostatic potentials (VASP OUTCAR/LOCPOT), "
            "which defectflow does not collect yet; use 'image_charge' or 'auto'"
        )
    scheme = "image_charge" if correction == "auto" else correction
    eps = None
    if scheme == "image_charge":
        if dielectric is None:
            notes.append("no dielectric constant given: no finite-size correction applied")
            scheme = "none"
        else:
            eps = _scalar_dielectric(dielectric)
            if not isinstance(dielectric, (int, float)):
                notes.append(f"anisotropic dielectric tensor: the mean of its eigenvalues ({eps:.3f}) was used")
    if correction == "auto":
        notes.append(f"correction 'auto' resolved to '{scheme}'")

    bulk_entry = ComputedStructureEntry(bulk_structure, bulk_energy)
    doped_entries = []
    corrections: dict[str, float] = {}
    for e in entries:
        de = DefectEntry.from_dict(e.defect_entry)
        de.charge_state = e.charge
        de.sc_entry = ComputedStructureEntry(e.structure, e.energy)
        de.bulk_entry = bulk_entry
        corr = image_charge_correction(e.structure, e.charge, eps) if scheme == "image_charge" else 0.0
        de.corrections = {"image_charge_correction": corr} if corr else {}
        corrections[group_key(e.defect, e.charge)] = corr
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
    return LevelsResult(vbm=vbm, band_gap=band_gap, correction_scheme=scheme, dielectric=eps,
                        corrections=corrections, transition_levels=levels, formation_energies_vbm=ef_vbm,
                        chemical_potentials=chemical_potentials, plot=plot, notes=notes)


def _plot(thermo, plot_dir: Path) -> str | None:
    import matplotlib

    matplotlib.use("Agg")

    try:
        return save_figure(thermo.plot(), plot_dir / "formation_energies.png", dpi=150)
    except Exception as exc:  # noqa: BLE001 - a plot must not fail the campaign
        logger.warning("formation-energy plot failed: %s", exc)
        return None
