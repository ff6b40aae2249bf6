"""VASP through atomate2's VASP makers, with doped/ShakeNBreak-style defect settings (for cluster users).

VASP cannot run on every machine (licence, POTCARs), so this engine has two halves:

* **inputs** — :func:`relax_maker` / :func:`static_maker` return atomate2 makers (``RelaxMaker``, ``StaticMaker``,
  ``HSERelaxMaker``, ``HSEStaticMaker``) whose input-set generator writes a fixed-cell, spin-polarised defect
  INCAR with ``NELECT`` set for the total charge q. :meth:`VaspEngine.write_inputs` writes INCAR/KPOINTS/POSCAR and
  ``POTCAR.spec`` (the POTCAR symbols) for any q **without** POTCAR files, so the inputs can be inspected anywhere;
* **outputs** — :func:`to_frame` and :func:`trajectory_from_vasprun` turn a ``vasprun.xml`` (or an atomate2/emmet
  ``TaskDoc``) into :class:`~defectflow.schemas.Frame` / :class:`~defectflow.schemas.RelaxTrajectory` documents
  (every ionic step: energy, forces, stress). This is how the jobflow graph consumes VASP results.

:meth:`VaspEngine.single_point` and :meth:`VaspEngine.relax` run VASP through atomate2's job machinery (custodian)
only when a VASP executable is configured; otherwise they raise :class:`~defectflow.engines.base.EngineError`.

Example (campaign YAML)::

    fidelities:
      high:
        engine: vasp
        xc: HSE06                 # PBE | PBEsol | HSE06 (AEXX 0.25, HFSCREEN 0.2 Å⁻¹)
        encut: 450                # eV
        kpoints: [1, 1, 1]        # Γ only (default); e.g. [2, 2, 2] for a Γ-centred mesh
        incar_updates:            # override any default (null removes a tag)
          NCORE: 8
          KPAR: 1
          ALGO: Damped
        user_potcar_settings: {Ga: Ga_d}

Cluster set-up: atomate2 reads ``~/.atomate2.yaml`` (or ``ATOMATE2_CONFIG_FILE``)::

    VASP_CMD: srun vasp_std
    VASP_GAMMA_CMD: srun vasp_gam     # used by custodian for Γ-only KPOINTS
    # and pymatgen's ~/.config/.pmgrc.yaml: PMG_VASP_PSP_DIR: /path/to/potcars

then run the campaign with ``defectflow submit`` (FireWorks / jobflow-remote). ``command`` / ``gamma_command`` in
the engine settings override ``VASP_CMD`` / ``VASP_GAMMA_CMD`` for one fidelity.

Charge convention: q is the total charge of the cell in e, so ``NELECT = sum(ZVAL) - q`` (q = -1: one extra
electron). The ZVALs come from the POTCAR files when pymatgen can find them; otherwise from pymatgen's bundled
POTCAR summary data (``pymatgen/io/vasp/potcar-summary-stats.json.bz2``), which records ZVAL per POTCAR symbol and
functional — so NELECT is exact even without POTCARs on disk.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import time
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field
from pymatgen.core import Structure

from defectflow.engines.base import Engine, EngineError, EngineSettings
from defectflow.schemas import Frame, RelaxTrajectory

logger = logging.getLogger(__name__)

__all__ = [
    "VaspEngine",
    "VaspSettings",
    "defect_incar",
    "relax_maker",
    "static_maker",
    "to_frame",
    "trajectory_from_vasprun",
    "zval_for",
]

#: 1 kbar in eV/Å³ (VASP writes stress in kbar).
KBAR_TO_EV_PER_A3 = 0.1 / 160.21766208


class VaspSettings(EngineSettings):
    """VASP settings on top of doped/ShakeNBreak-style defect defaults (see :func:`defect_incar`)."""

    engine: Literal["vasp"] = "vasp"
    xc: Literal["PBE", "HSE06", "PBEsol"] = Field(
        "PBE", description="PBE or PBEsol (GGA), or HSE06 (LHFCALC, AEXX 0.25, HFSCREEN 0.2 Å⁻¹, on top of PBE)"
    )
    encut: float = Field(400.0, gt=0, description="Plane-wave cutoff ENCUT in eV (converge it for your system)")
    incar_updates: dict[str, Any] = Field(
        default_factory=dict, description="INCAR tags overriding every default (a null value removes the tag)"
    )
    kpoints: tuple[int, int, int] = Field((1, 1, 1), description="Γ-centred mesh; (1, 1, 1) = Γ only")
    potcar_functional: str = Field("PBE_54", description="pymatgen POTCAR functional label (PBE_54, PBE_64, ...)")
    user_potcar_settings: dict[str, str] = Field(
        default_factory=dict,
        description="Element → POTCAR symbol, on top of doped's defaults (doped/VASP_sets/PotcarSet.yaml)",
    )
    command: str | None = Field(
        None, description="VASP command (e.g. 'srun vasp_std'); default: atomate2's VASP_CMD (~/.atomate2.yaml)"
    )
    gamma_command: str | None = Field(
        None, description="Γ-only VASP command (e.g. 'srun vasp_gam'); default: atomate2's VASP_GAMMA_CMD"
    )

    run_vasp_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Passed to atomate2's run_vasp: max_errors, handlers, job_type, custodian_kwargs, ...",
    )

    _digest_exclude: ClassVar[tuple[str, ...]] = (
        "command",
        "gamma_command",
        "run_vasp_kwargs",
        "mpi_procs",
        "omp_threads",
    )


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


# ---------------------------------------------------------------------------------------------------------------
# The input-set generator (atomate2 VaspInputGenerator + total charge). Built lazily: importing atomate2.vasp takes
# seconds and `defectflow.engines` is imported by every CLI call. Module __getattr__ makes the class importable as
# `defectflow.engines.vasp.DefectSetGenerator`, which is what monty needs to deserialise a maker on a worker.
# ---------------------------------------------------------------------------------------------------------------
@cache
def _generator_class():
    from dataclasses import dataclass, field

    from atomate2.vasp.sets.base import _BASE_VASP_SET, VaspInputGenerator
    from pymatgen.io.vasp.inputs import Kpoints

    def _config() -> dict:
        import copy

        config = copy.deepcopy(_BASE_VASP_SET)
        config["POTCAR"].update(_doped_potcar_symbols())
        return config

    @dataclass
    class DefectSetGenerator(VaspInputGenerator):
        """atomate2 input-set generator for a defect supercell at total charge ``charge`` (e).

        ``NELECT = sum(ZVAL) - charge`` whatever ``structure.charge`` is (a structure handed over from a previous
        job has lost its charge). ZVALs come from the POTCARs when pymatgen finds them, else from pymatgen's
        bundled POTCAR data. ``user_incar_settings`` hold the full defect INCAR (:func:`defect_incar`), so the
        parent set's ``incar_updates`` and pymatgen's auto-smearing never override them.
        """

        charge: int = 0
        config_dict: dict = field(default_factory=_config)
        use_structure_charge: bool = True  # makes pymatgen write NELECT (from `nelect` below)
        force_gamma: bool = True
        auto_ismear: bool = False
        user_kpoints_settings: Any = field(default_factory=lambda: Kpoints.gamma_automatic((1, 1, 1)))

        @property
        def incar_updates(self) -> dict:
            return {}

        @property
        def nelect(self) -> float:
            if self.structure is None:
                raise RuntimeError("No structure is associated with the input set!")
            try:
                by_element = {p.element: p.nelectrons for p in self.potcar}
            except Exception as exc:  # POTCARs not installed here (PmgVaspPspDirError, FileNotFoundError, ...)
                logger.debug("POTCARs unavailable (%s): ZVALs from pymatgen's POTCAR summary data", exc)
                symbols = self.potcar_symbols
                functional = self.user_potcar_functional or self._config_dict.get("POTCAR_FUNCTIONAL", "PBE_54")
                by_element = {
                    el: zval_for(sym, functional) for el, sym in zip(self.poscar.site_symbols, symbols, strict=True)
                }
            neutral = sum(n * by_element[el.symbol] for el, n in self.structure.composition.items())
            if self.structure.charge and int(round(self.structure.charge)) != self.charge:
                logger.warning(
                    "structure.charge = %s differs from the generator's charge %+d; NELECT uses %+d",
                    self.structure.charge,
                    self.charge,
                    self.charge,
                )
            return float(neutral - self.charge)

    DefectSetGenerator.__module__ = __name__
    DefectSetGenerator.__qualname__ = "DefectSetGenerator"
    return DefectSetGenerator


def __getattr__(name: str):
    if name == "DefectSetGenerator":
        return _generator_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _input_set_generator(settings: VaspSettings, charge: int, incar: dict[str, Any]):
    from pymatgen.io.vasp.inputs import Kpoints

    return _generator_class()(
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


# ---------------------------------------------------------------------------------------------------------------
# Parsing vasprun.xml / TaskDoc → Frame, RelaxTrajectory
# ---------------------------------------------------------------------------------------------------------------
def _find_vasprun(path: str | Path) -> Path:
    path = Path(str(path).split(":", 1)[1] if ":" in str(path) and not Path(path).exists() else path)  # host:/dir
    if path.is_dir():
        candidates = sorted(path.glob("vasprun.xml*"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise FileNotFoundError(f"no vasprun.xml[.gz] in {path}")
        return candidates[-1]
    if not path.exists():
        raise FileNotFoundError(path)
    return path


def _read_vasprun(path: str | Path):
    from pymatgen.io.vasp import Vasprun

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Vasprun(
            str(_find_vasprun(path)),
            parse_dos=False,
            parse_eigen=False,
            parse_projected_eigen=False,
            parse_potcar_file=False,
            exception_on_bad_xml=False,
        )


def _step_energy(step: Mapping[str, Any]) -> float:
    """Energy (σ→0, eV) of one ionic step, with pymatgen's ``Vasprun.final_energy`` fix for VASP's vasprun.xml
    e_0_energy bug (https://www.vasp.at/forum/viewtopic.php?f=3&t=16942), applied to every step."""
    energy = float(step["e_0_energy"])
    electronic = step.get("electronic_steps") or []
    if electronic and "e_0_energy" in electronic[-1] and "e_fr_energy" in electronic[-1]:
        fixed = round(electronic[-1]["e_0_energy"] - electronic[-1]["e_fr_energy"] + step["e_fr_energy"], 8)
        if abs(energy - fixed) > 1e-7:
            return float(fixed)
    return energy


def vasp_stress_to_ase(stress_kbar: Any) -> list[float]:
    """3×3 VASP stress (kbar, positive = compressive) → Voigt eV/Å³, ASE sign and order (xx yy zz yz xz xy)."""
    s = -np.asarray(stress_kbar, dtype=float).reshape(3, 3) * KBAR_TO_EV_PER_A3
    return [s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]]


def _frames_from_vasprun(vasprun, charge: int, engine: Engine) -> list[Frame]:
    nelm = int(vasprun.parameters.get("NELM", 60))
    frames = []
    for i, step in enumerate(vasprun.ionic_steps):
        n_scf = len(step.get("electronic_steps") or [])
        converged = n_scf < nelm
        stress = step.get("stress")
        frames.append(
            engine.make_frame(
                step["structure"],
                charge,
                _step_energy(step),
                step.get("forces"),
                None if stress is None else vasp_stress_to_ase(stress),
                step=i,
                scf_converged=converged,
                error=None if converged else f"SCF not converged in NELM={nelm} steps",
            )
        )
    return frames


def _engine_for(settings: VaspSettings | dict | None, fidelity: str | None = None) -> VaspEngine:
    return VaspEngine(settings, fidelity=fidelity)


def trajectory_from_vasprun(
    path: str | Path,
    charge: int,
    fmax: float = 0.05,
    settings: VaspSettings | dict | None = None,
    fidelity: str | None = None,
) -> RelaxTrajectory:
    """Every ionic step of a VASP relaxation (``vasprun.xml``, ``.gz`` or its directory) as a RelaxTrajectory.

    Energies: σ→0 energy in eV; forces eV/Å; stress eV/Å³ (ASE sign and Voigt order). ``status`` is
    ``converged`` when the last step's largest force is below ``fmax`` (eV/Å) and its SCF converged, else
    ``unconverged`` (``failed`` when the file has no ionic step).
    """
    engine = _engine_for(settings, fidelity)
    t0 = time.perf_counter()
    try:
        vasprun = _read_vasprun(path)
    except FileNotFoundError:
        raise
    except Exception as exc:  # truncated/corrupt output from a crashed run: a physics-side failure
        return engine.make_trajectory([], "failed", charge, fmax, 0.0, f"cannot parse {path}: {exc}")
    frames = _frames_from_vasprun(vasprun, charge, engine)
    if not frames:
        return engine.make_trajectory([], "failed", charge, fmax, 0.0, f"no ionic step in {path}")
    last = frames[-1]
    # VASP's EDIFFG < 0 criterion is the same as ours (every atomic force norm below |EDIFFG|)
    ok = last.scf_converged and last.fmax is not None and last.fmax <= fmax + 1e-6
    status, error = ("converged", None) if ok else ("unconverged", None)
    if not ok:
        error = (
            f"SCF not converged at the last step ({last.error})"
            if not last.scf_converged
            else f"max force {last.fmax:.4f} eV/Å > fmax={fmax} after {len(frames)} ionic steps"
        )
    return engine.make_trajectory(frames, status, charge, fmax, time.perf_counter() - t0, error)


def to_frame(
    source: Any,
    charge: int,
    settings: VaspSettings | dict | None = None,
    fidelity: str | None = None,
) -> Frame:
    """The final configuration of a VASP run as a Frame.

    ``source``: a ``vasprun.xml`` path (or ``.gz``, or the run directory), or an atomate2/emmet ``TaskDoc``
    (object or dict): its ``output`` (energy eV, forces eV/Å, stress kbar → eV/Å³ ASE convention, structure).
    """
    engine = _engine_for(settings, fidelity)
    if isinstance(source, str | Path | os.PathLike):
        try:
            vasprun = _read_vasprun(source)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise EngineError(f"cannot parse VASP output {source}: {exc}") from exc
        frames = _frames_from_vasprun(vasprun, charge, engine)
        if not frames:
            raise EngineError(f"no ionic step in {source}")
        frame = frames[-1]
        return frame.model_copy(update={"step": 0})
    doc = source.model_dump() if hasattr(source, "model_dump") else dict(source)
    out = doc.get("output") or {}
    if hasattr(out, "model_dump"):
        out = out.model_dump()
    structure = out.get("structure")
    if isinstance(structure, dict):
        structure = Structure.from_dict(structure)
    if structure is None:
        raise EngineError("task document has no output.structure")
    state = str(doc.get("state") or "successful").lower()
    ok = state.endswith("successful") and out.get("energy") is not None
    stress = out.get("stress")
    return engine.make_frame(
        structure,
        charge,
        out.get("energy"),
        out.get("forces"),
        None if stress is None else vasp_stress_to_ase(stress),
        scf_converged=ok,
        error=None if ok else f"VASP task state: {state}",
    )


# ---------------------------------------------------------------------------------------------------------------
# Engine
# ---------------------------------------------------------------------------------------------------------------
class VaspEngine(Engine):
    """VASP via atomate2 makers. Writes inputs anywhere; runs only where VASP is configured (see module doc)."""

    name = "vasp"
    settings_class = VaspSettings

    # -- makers and inputs -----------------------------------------------------------------------------------------
    def relax_maker(self, charge: int, fmax: float = 0.05, max_steps: int = 100):
        """atomate2 ``RelaxMaker``/``HSERelaxMaker`` for total charge ``charge`` (see :func:`relax_maker`)."""
        return relax_maker(self.settings, charge, fmax, max_steps)

    def static_maker(self, charge: int):
        """atomate2 ``StaticMaker``/``HSEStaticMaker`` for total charge ``charge`` (see :func:`static_maker`)."""
        return static_maker(self.settings, charge)

    def input_set(
        self,
        structure: Structure,
        charge: int,
        kind: Literal["relax", "static"] = "relax",
        fmax: float = 0.05,
        max_steps: int = 100,
    ):
        """pymatgen ``VaspInput`` (INCAR, KPOINTS, POSCAR, POTCAR.spec) for ``structure`` at charge ``charge``."""
        maker = self.relax_maker(charge, fmax, max_steps) if kind == "relax" else self.static_maker(charge)
        with _quiet_pymatgen():
            return maker.input_set_generator.get_input_set(_charged(structure, charge), potcar_spec=True)

    def write_inputs(
        self,
        structure: Structure,
        charge: int,
        directory: str | Path,
        kind: Literal["relax", "static"] = "relax",
        fmax: float = 0.05,
        max_steps: int = 100,
    ) -> Path:
        """Write INCAR, KPOINTS, POSCAR and POTCAR.spec (no POTCAR files needed) to ``directory``; return it."""
        directory = Path(directory)
        self.input_set(structure, charge, kind, fmax, max_steps).write_input(directory, make_dir_if_not_present=True)
        return directory

    # -- running ---------------------------------------------------------------------------------------------------
    def _commands(self) -> list[str]:
        from atomate2 import SETTINGS

        cmds = [self.settings.command or SETTINGS.VASP_CMD]
        if tuple(self.settings.kpoints) == (1, 1, 1):  # custodian runs the Γ-only binary for Γ-only KPOINTS
            cmds.append(self.settings.gamma_command or SETTINGS.VASP_GAMMA_CMD)
        return cmds

    def check(self, structure: Structure | None = None) -> None:
        """Raise EngineError unless the VASP executable(s) atomate2 would call are on PATH."""
        missing = []
        for cmd in self._commands():
            tokens = shlex.split(os.path.expandvars(cmd or ""))
            exes = [t for t in tokens if "vasp" in Path(t).name.lower()] or tokens[:1]
            missing += [f"{e!r} (from {cmd!r})" for e in exes if shutil.which(e) is None]
        if missing:
            raise EngineError(
                "VASP is not available on this machine: run the campaign with `defectflow submit` on a cluster "
                "where atomate2 is configured (VASP_CMD and VASP_GAMMA_CMD in ~/.atomate2.yaml, PMG_VASP_PSP_DIR in "
                "~/.config/.pmgrc.yaml), or set `command`/`gamma_command` in the engine settings. Not found: "
                + ", ".join(missing)
                + ". Inputs can still be written with VaspEngine.write_inputs()."
            )
        from pymatgen.core import SETTINGS as PMG_SETTINGS

        psp_dir = PMG_SETTINGS.get("PMG_VASP_PSP_DIR")
        if not psp_dir or not Path(os.path.expanduser(str(psp_dir))).is_dir():
            raise EngineError(
                f"POTCARs not found: PMG_VASP_PSP_DIR is {psp_dir!r}; set it in ~/.config/.pmgrc.yaml "
                "(pmg config --add PMG_VASP_PSP_DIR /path/to/potcars) so atomate2 can write POTCAR files"
            )

    def _run(self, maker, structure: Structure, charge: int, workdir: Path):
        """Run one atomate2 VASP job in ``workdir`` with an in-memory JobStore; return the TaskDoc or None."""
        from jobflow import JobStore, run_locally
        from maggma.stores import MemoryStore

        job = maker.make(_charged(structure, charge))
        with _quiet_pymatgen():
            responses = run_locally(
                job, store=JobStore(MemoryStore()), create_folders=False, root_dir=workdir, log=False
            )
        response = responses.get(job.uuid, {}).get(1)
        return None if response is None else response.output

    def single_point(self, structure, charge, workdir="."):
        workdir = Path(workdir)
        self.check(structure)
        workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        task = self._run(self.static_maker(charge), structure, charge, workdir)
        try:
            frame = to_frame(workdir, charge, self.settings, self.fidelity)
        except (FileNotFoundError, EngineError) as exc:
            detail = "atomate2 job failed (see custodian.json / OUTCAR)" if task is None else str(exc)
            return self.failed_frame(structure, charge, f"VASP single point: {detail}", time.perf_counter() - t0)
        return frame.model_copy(update={"wall_seconds": time.perf_counter() - t0})

    def relax(self, structure, charge, workdir=".", fmax=0.05, max_steps=100):
        workdir = Path(workdir)
        self.check(structure)
        workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        self._run(self.relax_maker(charge, fmax, max_steps), structure, charge, workdir)
        try:
            traj = trajectory_from_vasprun(workdir, charge, fmax, self.settings, self.fidelity)
        except FileNotFoundError as exc:
            return self.make_trajectory(
                [], "failed", charge, fmax, time.perf_counter() - t0, f"VASP relaxation produced no output: {exc}"
            )
        return traj.model_copy(update={"wall_seconds": time.perf_counter() - t0})
