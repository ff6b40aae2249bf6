"""VASP inputs: the defect INCAR (doped/ShakeNBreak defaults), POTCAR symbols and ZVALs, and the atomate2 makers
whose input-set generator (:class:`defectflow.engines.vasp.sets.DefectSetGenerator`) writes them for a charge q.

atomate2 is imported inside the functions that need it: importing it takes seconds and ``defectflow.engines`` is
imported by every CLI call.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any, Literal

from pymatgen.core import Structure

from defectflow.engines.base import EngineError
from defectflow.engines.vasp.settings import VaspSettings

logger = logging.getLogger(__name__)

__all__ = ["defect_incar", "relax_maker", "static_maker", "zval_for"]


# ---------------------------------------------------------------------------------------------------------------
# INCAR defaults
# ---------------------------------------------------------------------------------------------------------------
# Where each default comes from (doped 3.2.1 / ShakeNBreak 3.4.4 installed sources):
#   doped/VASP_sets/RelaxSet.yaml   ALGO Normal, ISMEAR 0, SIGMA 0.05, LASPH, PREC Accurate, IBRION 2, LORBIT 11
#   doped/VASP_sets/DefectSet.yaml  EDIFF 1e-5, ISIF 2 (fixed cell), ISPIN 2, ISYM 0, LVHAR (FNV), ICORELEVEL 0 (eFNV)
#   doped/VASP_sets/HSESet.yaml     LHFCALC, AEXX 0.25, PRECFOCK Fast, GGA PE
#   shakenbreak/SnB_input_files/incar.yaml   LREAL Auto, LCHARG/LWAVE False, NELM 40 (relaxations only)
#   doped (vasp.py)                 KPAR 1 for Γ-only k-points
# Deliberate differences:
#   ENCUT 400 eV (doped: 300; a `encut` setting), EDIFFG = -fmax and NSW = max_steps from the caller;
#   HFSCREEN 0.2 Å⁻¹ (atomate2/MP and the VASP wiki's HSE06; doped uses 0.208). 0.2 Å⁻¹ = 0.106 bohr⁻¹ is also
#   what QE's 'hse' uses, so a campaign mixing QE and VASP HSE06 fidelities uses one functional;
#   ALGO All for hybrids (atomate2's HSEChargeStateStaticSetGenerator; doped suggests it when Normal struggles).
# Tags of atomate2's r2SCAN-derived base set that a defect run should not inherit are removed (None).
_COMMON_INCAR: dict[str, Any] = {
    "ALGO": "Normal",
    "EDIFF": 1e-5,
    "ISMEAR": 0,
    "SIGMA": 0.05,
    "ISPIN": 2,
    "ISYM": 0,
    "LASPH": True,
    "PREC": "Accurate",
    "LREAL": "Auto",
    "LCHARG": False,
    "LWAVE": False,
    "LVHAR": True,
    "ICORELEVEL": 0,
    "LORBIT": 11,
    # atomate2 base-set tags removed:
    "LAECHG": None,
    "LVTOT": None,
    "LELF": None,
    "LMIXTAU": None,
    "METAGGA": None,
}
_GGA_TAG = {"PBE": "PE", "PBEsol": "PS", "HSE06": "PE"}
_HSE06_INCAR: dict[str, Any] = {"LHFCALC": True, "AEXX": 0.25, "HFSCREEN": 0.2, "PRECFOCK": "Fast", "ALGO": "All"}


def defect_incar(
    settings: VaspSettings,
    kind: Literal["relax", "static"],
    fmax: float = 0.05,
    max_steps: int = 100,
) -> dict[str, Any]:
    """The INCAR tags defectflow sets for a defect calculation (``settings.incar_updates`` applied last).

    ``kind='relax'``: ISIF 2 (atoms only), IBRION 2, ``EDIFFG = -fmax`` (forces, eV/Å), ``NSW = max_steps``.
    ``kind='static'``: NSW 0, IBRION -1. A value of ``None`` removes the tag from the INCAR.
    NELECT is not here: it depends on the structure and is set by the input-set generator.
    """
    incar: dict[str, Any] = dict(_COMMON_INCAR)
    incar["ENCUT"] = float(settings.encut)
    incar["GGA"] = _GGA_TAG[settings.xc]
    if settings.spin == "off":
        incar["ISPIN"] = 1
    if tuple(settings.kpoints) == (1, 1, 1):
        incar["KPAR"] = 1
    if settings.xc == "HSE06":
        incar.update(_HSE06_INCAR)
    if kind == "relax":
        if fmax <= 0:
            raise ValueError(f"fmax must be positive (eV/Å), got {fmax}")
        incar.update({"IBRION": 2, "ISIF": 2, "EDIFFG": -abs(float(fmax)), "NSW": int(max_steps), "NELM": 40})
    elif kind == "static":
        incar.update({"IBRION": -1, "NSW": 0, "EDIFFG": None, "ISIF": 2})
    else:
        raise ValueError(f"kind must be 'relax' or 'static', got {kind!r}")
    incar.update(settings.incar_updates)
    return incar


# ---------------------------------------------------------------------------------------------------------------
# POTCAR symbols and ZVALs
# ---------------------------------------------------------------------------------------------------------------
@cache
def _doped_potcar_symbols() -> dict[str, str]:
    """doped's default POTCAR symbols (doped/VASP_sets/PotcarSet.yaml), read without importing doped."""
    import importlib.util

    from monty.serialization import loadfn

    spec = importlib.util.find_spec("doped")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(next(iter(spec.submodule_search_locations))) / "VASP_sets" / "PotcarSet.yaml"
    return dict(loadfn(path)["POTCAR"]) if path.exists() else {}


@cache
def zval_for(symbol: str, functional: str = "PBE_54") -> float:
    """Valence charge ZVAL of POTCAR ``symbol`` (e.g. 'Si', 'Ga_d') in pymatgen functional set ``functional``.

    Read from pymatgen's bundled POTCAR summary data (``potcar-summary-stats.json.bz2``, no POTCAR files needed).
    """
    from pymatgen.io.vasp.inputs import _load_potcar_summary_stats  # private, but it is pymatgen's own data

    stats = _load_potcar_summary_stats()
    if functional not in stats:
        raise EngineError(f"potcar_functional: unknown {functional!r} (known: {', '.join(sorted(stats))})")
    zvals = {
        float(entry["ZVAL"])
        for variants in stats[functional].values()
        for entry in variants
        if entry.get("symbol") == symbol
    }
    if len(zvals) != 1:
        found = "no entry" if not zvals else f"conflicting ZVALs {sorted(zvals)}"
        raise EngineError(
            f"POTCAR {symbol!r} ({functional}): {found} in pymatgen's POTCAR data; set PMG_VASP_PSP_DIR so NELECT "
            "can be read from the POTCAR files"
        )
    return zvals.pop()


def _charged(structure: Structure, charge: int) -> Structure:
    with warnings.catch_warnings():  # "charge is not equal to the sum of oxidation states": intended here
        warnings.simplefilter("ignore")
        return Structure(
            structure.lattice,
            structure.species,
            structure.frac_coords,
            charge=int(charge),
            site_properties=structure.site_properties,
        )


def _input_set_generator(settings: VaspSettings, charge: int, incar: dict[str, Any]):
    from pymatgen.io.vasp.inputs import Kpoints

    # imports atomate2 (seconds): only when a maker is needed
    from defectflow.engines.vasp.sets import DefectSetGenerator

    return DefectSetGenerator(
        charge=int(charge),
        user_incar_settings=incar,
        user_kpoints_settings=Kpoints.gamma_automatic(tuple(int(k) for k in settings.kpoints)),
        user_potcar_functional=settings.potcar_functional,
        user_potcar_settings=dict(settings.user_potcar_settings),
    )


def _run_vasp_kwargs(settings: VaspSettings) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(settings.run_vasp_kwargs)
    if settings.command:
        kwargs["vasp_cmd"] = settings.command
    if settings.gamma_command:
        kwargs["vasp_gamma_cmd"] = settings.gamma_command
    return kwargs


@contextmanager
def _quiet_pymatgen():
    """Silence pymatgen's input-set chatter that is expected here (a charged structure without oxidation states,
    LASPH/hybrid reminders already satisfied); real problems still raise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*charge.*oxidation states.*")
        yield


def relax_maker(settings: VaspSettings | dict, charge: int, fmax: float = 0.05, max_steps: int = 100):
    """atomate2 maker relaxing atomic positions (fixed cell) at total charge ``charge`` (e).

    ``RelaxMaker`` for PBE/PBEsol, ``HSERelaxMaker`` for HSE06; stops when every force is below ``fmax`` (eV/Å,
    EDIFFG < 0) or after ``max_steps`` ionic steps (NSW). ``maker.make(structure)`` gives the job.
    """
    from atomate2.vasp.jobs.core import HSERelaxMaker, RelaxMaker

    settings = _as_settings(settings)
    cls = HSERelaxMaker if settings.xc == "HSE06" else RelaxMaker
    gen = _input_set_generator(settings, charge, defect_incar(settings, "relax", fmax, max_steps))
    return cls(name=f"defectflow {settings.xc} relax q={int(charge):+d}", input_set_generator=gen,
               run_vasp_kwargs=_run_vasp_kwargs(settings))


def static_maker(settings: VaspSettings | dict, charge: int):
    """atomate2 maker for a single point at total charge ``charge`` (e): ``StaticMaker`` or ``HSEStaticMaker``."""
    from atomate2.vasp.jobs.core import HSEStaticMaker, StaticMaker

    settings = _as_settings(settings)
    cls = HSEStaticMaker if settings.xc == "HSE06" else StaticMaker
    gen = _input_set_generator(settings, charge, defect_incar(settings, "static"))
    return cls(name=f"defectflow {settings.xc} static q={int(charge):+d}", input_set_generator=gen,
               run_vasp_kwargs=_run_vasp_kwargs(settings))


def _as_settings(settings: VaspSettings | dict) -> VaspSettings:
    if isinstance(settings, VaspSettings):
        return settings
    return VaspSettings.model_validate({"engine": "vasp", **dict(settings)})
