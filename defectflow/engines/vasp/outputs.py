"""VASP outputs → Frames and RelaxTrajectories: from ``vasprun.xml`` (or its ``.gz``, or the run directory) or from
the atomate2/emmet ``TaskDoc`` of the run (its ``calcs_reversed[*].output.ionic_steps``: the same numbers
pymatgen's ``Vasprun`` reads, so both give the same documents). Energies in eV (σ→0), forces eV/Å, stress eV/Å³
(Voigt, ASE sign; VASP writes kbar, positive = compressive).

The electrostatic potential for doped's finite-size corrections (``Frame.potential``; doped's defect INCAR sets
``LVHAR``, and every OUTCAR prints the core potentials) comes from what atomate2 already parsed into the TaskDoc
(``output.locpot``: LOCPOT planar averages; ``output.outcar['electrostatic_potential']``: the core potentials), or
from ``LOCPOT``/``OUTCAR`` in the run directory read with doped's own readers (:func:`potential_from_task`,
:func:`potential_from_directory`)."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pymatgen.core import Structure

from defectflow.engines.base import Engine, EngineError
from defectflow.engines.vasp.settings import VaspSettings
from defectflow.schemas import Frame, RelaxTrajectory
from defectflow.schemas.core import ElectrostaticPotential

if TYPE_CHECKING:
    from defectflow.engines.vasp.engine import VaspEngine

__all__ = [
    "KBAR_TO_EV_PER_A3",
    "frames_from_task",
    "potential_from_directory",
    "potential_from_task",
    "to_frame",
    "trajectory_from_task",
    "trajectory_from_vasprun",
    "vasp_stress_to_ase",
]

#: 1 kbar in eV/Å³ (VASP writes stress in kbar).
KBAR_TO_EV_PER_A3 = 0.1 / 160.21766208


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


def _as_mapping(obj: Any) -> Mapping[str, Any]:
    """A pydantic model (emmet document) or a mapping as a mapping, without converting nested objects."""
    if isinstance(obj, Mapping):
        return obj
    if hasattr(obj, "model_fields"):
        return {k: getattr(obj, k) for k in type(obj).model_fields}
    return dict(obj)


def _as_structure(obj: Any) -> Structure:
    return obj if isinstance(obj, Structure) else Structure.from_dict(obj)


def _frames_from_steps(steps, nelm: int, charge: int, engine: Engine, first_step: int = 0) -> list[Frame]:
    """Frames from ionic-step records (``Vasprun.ionic_steps`` dicts or emmet ``IonicStep`` documents): energy via
    :func:`_step_energy`, SCF converged when fewer than ``nelm`` electronic steps ran."""
    frames = []
    for i, raw in enumerate(steps):
        step = dict(_as_mapping(raw))
        step["electronic_steps"] = [dict(_as_mapping(e)) for e in (step.get("electronic_steps") or [])]
        n_scf = len(step["electronic_steps"])
        converged = n_scf < nelm
        stress = step.get("stress")
        frames.append(
            engine.make_frame(
                _as_structure(step["structure"]),
                charge,
                _step_energy(step),
                step.get("forces"),
                None if stress is None else vasp_stress_to_ase(stress),
                step=first_step + i,
                scf_converged=converged,
                error=None if converged else f"SCF not converged in NELM={nelm} steps",
            )
        )
    return frames


def _frames_from_vasprun(vasprun, charge: int, engine: Engine) -> list[Frame]:
    return _frames_from_steps(vasprun.ionic_steps, int(vasprun.parameters.get("NELM", 60)), charge, engine)


def frames_from_task(
    task: Any,
    charge: int,
    settings: VaspSettings | dict | None = None,
    fidelity: str | None = None,
) -> list[Frame]:
    """Every ionic step of an atomate2/emmet ``TaskDoc`` (object or dict) as Frames, oldest calculation first
    (``calcs_reversed`` reversed), numbered from 0. Empty when the document holds no ionic steps (e.g. it was
    parsed with ``store_trajectory`` other than ``no``)."""
    engine = _engine_for(settings, fidelity)
    doc = _as_mapping(task)
    frames: list[Frame] = []
    for calc in reversed(list(doc.get("calcs_reversed") or [])):
        calc = _as_mapping(calc)
        inputs, output = _as_mapping(calc.get("input") or {}), _as_mapping(calc.get("output") or {})
        nelm = int((inputs.get("parameters") or {}).get("NELM", 60))
        frames += _frames_from_steps(output.get("ionic_steps") or [], nelm, charge, engine, len(frames))
    return frames


def _engine_for(settings: VaspSettings | dict | None, fidelity: str | None = None) -> VaspEngine:
    from defectflow.engines.vasp.engine import VaspEngine

    return VaspEngine(settings, fidelity=fidelity)


def _trajectory(engine: Engine, frames: list[Frame], charge: int, fmax: float, t0: float, source) -> RelaxTrajectory:
    if not frames:
        return engine.make_trajectory([], "failed", charge, fmax, 0.0, f"no ionic step in {source}")
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
    return _trajectory(engine, _frames_from_vasprun(vasprun, charge, engine), charge, fmax, t0, path)


def trajectory_from_task(
    task: Any,
    charge: int,
    fmax: float = 0.05,
    settings: VaspSettings | dict | None = None,
    fidelity: str | None = None,
) -> RelaxTrajectory:
    """Every ionic step of an atomate2/emmet ``TaskDoc`` (object or dict) as a RelaxTrajectory; the same rules as
    :func:`trajectory_from_vasprun` (``failed`` when the document holds no ionic step)."""
    engine = _engine_for(settings, fidelity)
    t0 = time.perf_counter()
    return _trajectory(engine, frames_from_task(task, charge, settings, fidelity), charge, fmax, t0, "the TaskDoc")


def to_frame(
    source: Any,
    charge: int,
    settings: VaspSettings | dict | None = None,
    fidelity: str | None = None,
) -> Frame:
    """The final configuration of a VASP run as a Frame.

    ``source``: a ``vasprun.xml`` path (or ``.gz``, or the run directory), or an atomate2/emmet ``TaskDoc``
    (object or dict): its last ionic step when it holds them (the same Frame as from its ``vasprun.xml``), else its
    ``output`` (energy eV, forces eV/Å, stress kbar → eV/Å³ ASE convention, structure; SCF converged when the
    task's ``state`` is successful).
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
        return frames[-1].model_copy(update={"step": 0})
    frames = frames_from_task(source, charge, settings, fidelity)
    if frames:
        return frames[-1].model_copy(update={"step": 0})
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


def _potential(planar: list[list[float]] | None, sites: Any, grid: list[int] | None, source: str,
               file: str | None = None) -> ElectrostaticPotential | None:
    """ElectrostaticPotential from LOCPOT planar averages (eV, as VASP writes them) and site potentials (V, doped's
    eFNV sign: −1 × OUTCAR's core potentials); None when there is neither."""
    if not planar and (sites is None or len(sites) == 0):
        return None
    return ElectrostaticPotential(
        planar_averages=planar or None, site_potentials=None if sites is None or len(sites) == 0 else
        np.asarray(sites, dtype=float).tolist(), grid=grid, source=source, file=file)


def potential_from_task(task: Any) -> ElectrostaticPotential | None:
    """The electrostatic potential of the last calculation of an atomate2/emmet ``TaskDoc`` (object or dict):
    ``output.locpot`` (LOCPOT planar averages along a, b, c, eV; atomate2 stores them when a LOCPOT exists) and
    ``output.outcar['electrostatic_potential']`` (OUTCAR's 'average (electrostatic) potential at core', its sign
    flipped to doped's eFNV convention, V). None when the document holds neither."""
    calcs = list(_as_mapping(task).get("calcs_reversed") or [])
    if not calcs:
        return None
    output = _as_mapping(_as_mapping(calcs[0]).get("output") or {})
    locpot = {int(k): v for k, v in (output.get("locpot") or {}).items()}  # keys "0", "1", "2" (str in JSON)
    planar = [list(map(float, locpot[i])) for i in range(3)] if set(locpot) >= {0, 1, 2} else None
    outcar = output.get("outcar") or {}
    core = outcar.get("electrostatic_potential") if isinstance(outcar, Mapping) else None
    return _potential(planar, None if core is None else -np.asarray(core, dtype=float),
                      [len(p) for p in planar] if planar else None, "vasp LOCPOT + OUTCAR (atomate2 TaskDoc)")


def potential_from_directory(path: str | Path) -> ElectrostaticPotential | None:
    """The electrostatic potential of a VASP run directory, read with doped's readers: ``LOCPOT`` (or ``.gz``, ...)
    → planar averages (eV), ``OUTCAR`` → core potentials of the last ionic step (doped's eFNV sign, V). None when
    neither file has them (LVHAR off, or a crashed run)."""
    import warnings

    from doped.utils.parsing import find_archived_fname, get_core_potentials_from_outcar, get_locpot

    path = Path(path)
    planar, grid, file, sites = None, None, None, None
    locpot_file = find_archived_fname(str(path / "LOCPOT"), raise_error=False)
    if locpot_file:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            locpot = get_locpot(locpot_file)
        planar = [locpot.get_average_along_axis(i).tolist() for i in range(3)]
        grid, file = list(locpot.dim), str(Path(locpot_file).resolve())
    if find_archived_fname(str(path / "OUTCAR"), raise_error=False):
        try:
            sites = get_core_potentials_from_outcar(path / "OUTCAR")
        except ValueError:  # no core potentials in this OUTCAR (a crashed run)
            sites = None
    return _potential(planar, sites, grid, "vasp LOCPOT + OUTCAR", file)
