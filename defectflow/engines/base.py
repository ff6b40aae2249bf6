"""The engine interface: one charge-aware API over QE, CP2K, VASP and any ASE calculator.

An engine does two things, both for a structure at total charge q (in e; q = -1 means one extra electron):

* ``single_point(structure, charge, workdir) -> Frame``: energy, forces (stress when the code gives it);
* ``relax(structure, charge, workdir, fmax, max_steps) -> RelaxTrajectory``: every ionic step kept.

Engines never raise for a physics failure (unconverged SCF, step limit): they record it in the returned document
(``Frame.scf_converged``/``error``, ``RelaxTrajectory.status``) so a campaign goes on. They raise
:class:`EngineError` only for set-up problems the user must fix (missing executable, missing pseudopotential).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from pymatgen.core import Structure

from defectflow.schemas import Frame, RelaxTrajectory, settings_digest

logger = logging.getLogger(__name__)

__all__ = [
    "AseDrivenEngine",
    "Engine",
    "EngineError",
    "EngineSettings",
    "atoms_to_structure",
    "mpi_prefix",
    "safe_name",
    "structure_to_atoms",
]


class EngineError(RuntimeError):
    """A set-up problem the user must fix (missing executable, pseudopotential, ...)."""


class EngineSettings(BaseModel):
    """Settings shared by every engine. Each engine subclasses this with its own fields and ``engine`` tag."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    engine: str
    xc: str = Field("PBE", description="Exchange-correlation functional (PBE, HSE06, ...) or method label")
    spin: Literal["auto", "on", "off"] = Field(
        "auto", description="Spin polarisation: auto = on when the cell has an odd number of electrons"
    )

    def digest(self) -> str:
        """Digest of the settings that change results (not of parallelisation)."""
        data = self.model_dump(mode="json", exclude=set(self._digest_exclude))
        return settings_digest(data)

    _digest_exclude: ClassVar[tuple[str, ...]] = ("mpi_procs", "command", "omp_threads")


def safe_name(label: str) -> str:
    """A label made safe as a directory name (anything but letters, digits, ``_.+-`` becomes ``_``)."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", label)


def mpi_prefix(nprocs: int | None, launcher: str = "mpirun") -> list[str]:
    """Return the MPI launcher prefix for ``nprocs`` ranks (empty for 1 or None).

    As root OpenMPI refuses to start without ``--allow-run-as-root``; it is added automatically then.
    """
    if not nprocs or nprocs <= 1:
        return []
    exe = shutil.which(launcher)
    if exe is None:
        raise EngineError(f"{launcher} not found on PATH (install openmpi-bin, or set mpi_procs: 1)")
    cmd = [exe]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += ["-np", str(nprocs)]
    return cmd


def structure_to_atoms(structure: Structure, charge: int):
    """pymatgen Structure → ASE Atoms with the total charge in ``atoms.info["charge"]``.

    pymatgen's AseAtomsAdaptor does not copy a periodic Structure's charge (and MACE reads
    ``atoms.info["charge"]``), so it is set here explicitly, in one place.
    """
    from pymatgen.io.ase import AseAtomsAdaptor

    plain = Structure(structure.lattice, structure.species, structure.frac_coords)
    atoms = AseAtomsAdaptor.get_atoms(plain)
    atoms.info["charge"] = int(charge)
    atoms.pbc = True
    return atoms


def atoms_to_structure(atoms, charge: int) -> Structure:
    """ASE Atoms → pymatgen Structure carrying ``charge``."""
    s = Structure(atoms.cell.array, atoms.get_chemical_symbols(), atoms.positions, coords_are_cartesian=True)
    return Structure(s.lattice, s.species, s.frac_coords, charge=int(charge))


class Engine(ABC):
    """Base class: holds validated settings and builds :class:`Frame`/:class:`RelaxTrajectory` documents."""

    name: ClassVar[str]
    settings_class: ClassVar[type[EngineSettings]]

    def __init__(self, settings: EngineSettings | dict[str, Any] | None = None, fidelity: str | None = None):
        if settings is None:
            settings = {}
        if isinstance(settings, dict):
            settings = self.settings_class.model_validate({"engine": self.name, **settings})
        self.settings = settings
        self.fidelity = fidelity

    @property
    def digest(self) -> str:
        return self.settings.digest()

    # -- API ------------------------------------------------------------------------------------------------------
    @abstractmethod
    def single_point(self, structure: Structure, charge: int, workdir: str | Path = ".") -> Frame:
        """Energy and forces of ``structure`` at total charge ``charge`` (e)."""

    @abstractmethod
    def relax(
        self,
        structure: Structure,
        charge: int,
        workdir: str | Path = ".",
        fmax: float = 0.05,
        max_steps: int = 100,
    ) -> RelaxTrajectory:
        """Relax atomic positions (fixed cell) until max |F| < ``fmax`` (eV/Å) or ``max_steps`` ionic steps."""

    def check(self, structure: Structure) -> None:
        """Raise :class:`EngineError` if this engine cannot run ``structure`` here (executable, data files)."""

    # -- helpers for subclasses -----------------------------------------------------------------------------------
    def make_frame(
        self,
        structure: Structure,
        charge: int,
        energy: float | None,
        forces: Any = None,
        stress: Any = None,
        wall_seconds: float = 0.0,
        step: int = 0,
        scf_converged: bool = True,
        magnetization: float | None = None,
        error: str | None = None,
        vbm: float | None = None,
        cbm: float | None = None,
        fermi_level: float | None = None,
    ) -> Frame:
        s = Structure(structure.lattice, structure.species, structure.frac_coords, charge=int(charge))
        return Frame(
            structure=s,
            energy=None if energy is None else float(energy),
            forces=None if forces is None else np.asarray(forces, dtype=float).tolist(),
            stress=None if stress is None else np.asarray(stress, dtype=float).reshape(-1).tolist(),
            charge=int(charge),
            engine=self.name,
            xc=self.settings.xc,
            fidelity=self.fidelity,
            settings_digest=self.digest,
            wall_seconds=float(wall_seconds),
            step=step,
            scf_converged=scf_converged,
            magnetization=magnetization,
            error=error,
            vbm=vbm,
            cbm=cbm,
            fermi_level=fermi_level,
        )

    def failed_frame(self, structure: Structure, charge: int, error: str, wall_seconds: float = 0.0) -> Frame:
        return self.make_frame(structure, charge, None, wall_seconds=wall_seconds, scf_converged=False, error=error)

    def make_trajectory(self, frames, status, charge, fmax, wall_seconds, error=None) -> RelaxTrajectory:
        return RelaxTrajectory(
            frames=frames,
            status=status,
            error=error,
            charge=int(charge),
            engine=self.name,
            fidelity=self.fidelity,
            settings_digest=self.digest,
            fmax_target=fmax,
            wall_seconds=wall_seconds,
        )


class AseDrivenEngine(Engine):
    """An engine whose single points come from an ASE calculator and whose relaxations are driven by an ASE
    optimizer (BFGS by default), recording every ionic step. Subclasses implement :meth:`make_calculator`.

    Keep the calculator alive across the steps of one relaxation (e.g. ``cp2k_shell`` reuses the wavefunction).
    """

    optimizer: ClassVar[str] = "BFGS"

    @abstractmethod
    def make_calculator(self, atoms, charge: int, workdir: Path):
        """Return an ASE calculator for ``atoms`` at total charge ``charge`` running in ``workdir``."""

    def close_calculator(self, calc) -> None:  # an optional hook: does nothing by default
        """Release resources (e.g. a ``cp2k_shell`` process). Called in a ``finally`` block, also when the call is
        interrupted: it must end every process the calculator started."""

    def band_edges(self, calc) -> tuple[float | None, float | None, float | None]:
        """(vbm, cbm, fermi_level) in eV from the calculator, or Nones. Subclasses override for their codes."""
        return None, None, None

    def _frame_from_atoms(self, atoms, charge, t0, step) -> Frame:
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces()
        stress = None
        try:
            if "stress" in getattr(atoms.calc, "implemented_properties", []):
                stress = atoms.get_stress(voigt=True)
        except Exception:  # stress is optional
            stress = None
        mag = None
        try:
            if "magmom" in atoms.calc.results:
                mag = float(atoms.calc.results["magmom"])
        except Exception:
            mag = None
        try:
            vbm, cbm, ef = self.band_edges(atoms.calc)
        except Exception:  # band edges are optional information
            vbm = cbm = ef = None
        return self.make_frame(
            atoms_to_structure(atoms, charge),
            charge,
            energy,
            forces,
            stress,
            wall_seconds=time.perf_counter() - t0,
            step=step,
            magnetization=mag,
            vbm=vbm,
            cbm=cbm,
            fermi_level=ef,
        )

    def single_point(self, structure, charge, workdir="."):
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.check(structure)
        atoms = structure_to_atoms(structure, charge)
        t0 = time.perf_counter()
        calc = self.make_calculator(atoms, charge, workdir)
        try:  # close_calculator runs whatever happens, KeyboardInterrupt and SystemExit included
            atoms.calc = calc
            return self._frame_from_atoms(atoms, charge, t0, 0)
        except EngineError:
            raise
        except Exception as exc:  # SCF failure etc.: recorded, not raised
            logger.warning("%s single point failed (q=%+d): %s", self.name, charge, exc)
            return self.failed_frame(structure, charge, f"{type(exc).__name__}: {exc}", time.perf_counter() - t0)
        finally:
            self.close_calculator(calc)

    def relax(self, structure, charge, workdir=".", fmax=0.05, max_steps=100,
              keep: Literal["all", "last"] | int = "all"):
        """Relax with the ASE optimizer :attr:`optimizer`; ``keep='last'`` records only the final frame (the
        surrogate search, where the path is not training data), ``keep=n`` every n-th step and the final one (the
        surrogate search's top-up candidates; ``Frame.step`` is the optimizer step); ``workdir=None`` writes no
        optimizer log."""
        from ase import optimize

        if workdir is not None:
            workdir = Path(workdir)
            workdir.mkdir(parents=True, exist_ok=True)
        self.check(structure)
        atoms = structure_to_atoms(structure, charge)
        t_start = time.perf_counter()
        frames: list[Frame] = []
        clock = {"t": time.perf_counter(), "steps": 0}

        def record():
            frames.append(self._frame_from_atoms(atoms, charge, clock["t"], len(frames)))
            clock["t"] = time.perf_counter()

        opt_cls = getattr(optimize, self.optimizer)
        status, error = "unconverged", None
        calc = self.make_calculator(atoms, charge, workdir)
        try:  # close_calculator runs whatever happens, KeyboardInterrupt and SystemExit included
            atoms.calc = calc
            opt = opt_cls(atoms, logfile=None if workdir is None else str(workdir / "opt.log"))
            every = keep if isinstance(keep, int) and not isinstance(keep, bool) else None

            def record_step():
                record()
                frames[-1].step = opt.nsteps

            if keep == "all":
                opt.attach(record, interval=1)
            elif every:
                opt.attach(record_step, interval=every)
            converged = opt.run(fmax=fmax, steps=max_steps)
            if keep == "last" or (every and (not frames or frames[-1].step != opt.nsteps)):
                record_step()
            status = "converged" if converged else "unconverged"
            if not converged:
                error = f"not converged to fmax={fmax} eV/Å within {max_steps} steps"
        except EngineError:
            raise
        except Exception as exc:
            status, error = "failed", f"{type(exc).__name__}: {exc}"
            logger.warning("%s relaxation failed (q=%+d) after %d steps: %s", self.name, charge, len(frames), exc)
        finally:
            self.close_calculator(calc)
        return self.make_trajectory(frames, status, charge, fmax, time.perf_counter() - t_start, error)
