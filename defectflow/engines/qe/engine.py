"""The ``qe`` engine: runs pw.x (``mpirun -np N pw.x -in pw.in``) and turns ``pw.out`` into Frames and
RelaxTrajectories (see the package docstring, :mod:`defectflow.engines.qe`)."""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
from pymatgen.core import Structure

from defectflow.engines.base import Engine, EngineError, mpi_prefix
from defectflow.engines.outputs import potential_from_grid
from defectflow.engines.process import run_process
from defectflow.engines.qe.inputs import (
    UPFInfo,
    default_pseudo_dir,
    make_pp_input,
    make_pw_input,
    n_valence_electrons,
    select_pseudopotentials,
    unique_elements,
)
from defectflow.engines.qe.outputs import PwResult, parse_pw_output, read_potential_cube, suspect_forces
from defectflow.engines.qe.settings import HYBRID_DFT, QESettings
from defectflow.schemas import Frame, RelaxTrajectory
from defectflow.schemas.core import ElectrostaticPotential

logger = logging.getLogger(__name__)

__all__ = ["QEEngine"]


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class QEEngine(Engine):
    """Quantum ESPRESSO ``pw.x``: PBE and HSE06/PBE0 single points and native BFGS relaxations at charge q."""

    name = "qe"
    settings_class = QESettings

    # -- set-up checks ---------------------------------------------------------------------------------------
    @property
    def pseudo_dir(self) -> Path:
        return Path(self.settings.pseudo_dir) if self.settings.pseudo_dir else default_pseudo_dir()

    @property
    def hybrid(self) -> bool:
        return self.settings.xc in HYBRID_DFT

    @staticmethod
    def _which(exe: str, how_to_get_it: str) -> str:
        found = shutil.which(exe)
        if found is None:
            raise EngineError(f"QE: {exe!r} not found on PATH{how_to_get_it}")
        return found

    def executable(self) -> str:
        return self._which(self.settings.command or "pw.x",
                           ". Install Quantum ESPRESSO (Debian/Ubuntu: `apt-get install quantum-espresso "
                           "quantum-espresso-data`) or set `command:` to pw.x's path.")

    def pseudopotentials(self, structure: Structure) -> dict[str, UPFInfo]:
        return select_pseudopotentials(
            unique_elements(structure), self.pseudo_dir, self.settings.pseudopotentials, hybrid=self.hybrid,
            lda=self.settings.xc == "LDA",
        )

    def pp_executable(self) -> str:
        return self._which(self.settings.pp_command or "pp.x",
                           " (needed by electrostatic_potential: true, which levels.correction auto/eFNV/FNV turns "
                           "on for the bulk and verification single points). Install Quantum ESPRESSO's "
                           "post-processing tools (Debian/Ubuntu: `apt-get install quantum-espresso`), set "
                           "`pp_command:` to pp.x's path, or use levels.correction: image_charge.")

    def check(self, structure: Structure) -> None:
        """Raise :class:`EngineError` if pw.x (pp.x when ``electrostatic_potential`` is on) or a pseudopotential
        for ``structure`` is missing."""
        self.pseudopotentials(structure)
        self.executable()
        if self.settings.electrostatic_potential:
            self.pp_executable()

    def command(self) -> list[str]:
        return mpi_prefix(self.settings.mpi_procs or _usable_cores()) + [self.executable()]

    # -- running ---------------------------------------------------------------------------------------------
    def _run(self, structure, charge, workdir: Path, calculation, fmax=None, max_steps=None, potential=False):
        workdir.mkdir(parents=True, exist_ok=True)
        pseudos = self.pseudopotentials(structure)
        cmd = self.command() + ["-in", "pw.in"]
        text = make_pw_input(
            structure, charge, self.settings, pseudos, calculation, self.pseudo_dir, "./out", fmax, max_steps
        )
        (workdir / "pw.in").write_text(text)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        logger.info("QE %s q=%+d in %s: %s", calculation, charge, workdir, " ".join(cmd))
        t0 = time.perf_counter()
        run_error = None
        # own session; SIGTERM (mpirun forwards it to the ranks), SIGKILL after 10 s, on timeout or interrupt
        run = run_process(
            cmd, cwd=workdir, timeout=self.settings.timeout_s, env=env,
            stdout=workdir / "pw.out", stderr=workdir / "pw.err", grace=10.0,
        )
        rc = run.returncode
        if run.timed_out:
            rc, run_error = -1, f"pw.x killed after timeout_s={self.settings.timeout_s} s"
        wall = time.perf_counter() - t0
        result = parse_pw_output(workdir / "pw.out", self.hybrid)
        # pw.x exit status 3 = "nstep reached" in a relaxation: not a crash (the trajectory says unconverged)
        max_steps_reached = rc == 3 and "maximum number of steps has been reached" in (
            result.bfgs_message or ""
        )
        if rc != 0 and result.error is None and not max_steps_reached:
            tail = (workdir / "pw.err").read_text(errors="replace").strip().splitlines()[-3:]
            result.error = run_error or f"pw.x exited with code {rc}: {' | '.join(tail) or 'see pw.out'}"
        elif run_error:
            result.error = run_error
        zval = {el: info.z_valence for el, info in pseudos.items()}
        expected = n_valence_electrons(structure, charge, zval)
        if result.n_electrons is not None and abs(result.n_electrons - expected) > 1e-6:
            logger.warning(
                "QE printed %s electrons, expected %s for q=%+d", result.n_electrons, expected, charge
            )
        if potential and rc == 0 and result.error is None and not result.scf_failed:
            result.potential = self._write_potential(structure, workdir)
            wall = time.perf_counter() - t0
        if not self.settings.keep_outdir:
            shutil.rmtree(workdir / "out", ignore_errors=True)
        return result, wall, rc

    def _write_potential(self, structure: Structure, workdir: Path) -> ElectrostaticPotential | None:
        """pp.x on the finished pw.x run in ``workdir``: the electrostatic potential (``plot_num = 11``) →
        ``potential.cube.gz`` (Ry, bohr; the intermediate file removed) and its planar averages and site potentials
        (:func:`~defectflow.engines.outputs.potential_from_grid`). pp.x reads only the charge density, so it runs as
        one process (~0.5 s at 7 atoms). A pp.x failure is logged and gives None: the energy stands without it."""
        (workdir / "pp.in").write_text(make_pp_input())
        run = run_process(
            [self.pp_executable(), "-in", "pp.in"], cwd=workdir, timeout=self.settings.timeout_s,
            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=workdir / "pp.out", stderr=workdir / "pp.err",
            grace=10.0,
        )
        (workdir / "potential.pp").unlink(missing_ok=True)
        cube = workdir / "potential.cube"
        if run.returncode != 0 or run.timed_out or not cube.is_file():
            logger.warning("pp.x failed in %s (exit code %s%s): no electrostatic potential on the Frame (see pp.out)",
                           workdir, run.returncode, ", timed out" if run.timed_out else "")
            return None
        grid = read_potential_cube(cube)
        packed = workdir / "potential.cube.gz"
        with open(cube, "rb") as src, gzip.open(packed, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst)
        cube.unlink()
        return potential_from_grid(grid, structure, source="qe pp.x plot_num=11", file=str(packed.resolve()))

    @staticmethod
    def _structure(start: Structure, atoms, charge: int) -> Structure:
        """Positions from pw.out on the input lattice and species (fixed cell; QE prints the cell rounded)."""
        return Structure(
            start.lattice, start.species, atoms.positions, coords_are_cartesian=True, charge=int(charge)
        )

    def _frame(
        self, start: Structure, result: PwResult, k: int, charge: int, wall: float, step: int
    ) -> Frame:
        atoms = result.atoms[k]
        res = atoms.calc.results
        energy = result.energies[k] if k < len(result.energies) else None
        if energy is None and not self.hybrid:
            energy = res.get("energy")
        stress = res.get("stress")
        vbm, cbm, fermi = result.band_edges[k] if k < len(result.band_edges) else (None, None, None)
        return self.make_frame(
            start if step == 0 else self._structure(start, atoms, charge),
            charge,
            energy,
            res.get("forces"),
            stress,
            wall_seconds=wall,
            step=step,
            scf_converged=energy is not None,
            magnetization=result.magnetizations[k] if k < len(result.magnetizations) else None,
            error=None if energy is not None else "no final energy in pw.out",
            vbm=vbm,
            cbm=cbm,
            fermi_level=fermi,
        )

    def single_point(self, structure: Structure, charge: int, workdir: str | Path = ".") -> Frame:
        """pw.x SCF of ``structure`` at charge ``charge``; with ``electrostatic_potential`` on, pp.x then writes the
        potential and the Frame carries it (``Frame.potential``)."""
        result, wall, rc = self._run(
            structure, charge, Path(workdir), "scf", potential=self.settings.electrostatic_potential
        )
        if result.scf_failed or rc != 0 or not result.atoms:
            error = result.error or "pw.x produced no forces (see pw.out)"
            logger.warning("QE single point failed (q=%+d): %s", charge, error)
            return self.failed_frame(structure, charge, error, wall)
        frame = self._frame(structure, result, len(result.atoms) - 1, charge, wall, 0)
        return frame.model_copy(update={"potential": result.potential}) if result.potential else frame

    def relax(
        self,
        structure: Structure,
        charge: int,
        workdir: str | Path = ".",
        fmax: float = 0.05,
        max_steps: int = 100,
    ) -> RelaxTrajectory:
        """Native pw.x BFGS relaxation (fixed cell); :func:`make_pw_input` says how ``fmax`` maps onto QE."""
        result, wall, rc = self._run(
            structure, charge, Path(workdir), "relax", fmax=fmax, max_steps=max_steps
        )
        n = len(result.atoms)
        # Per-step wall time: pw.x reports only the cumulative CPU time of rank 0 ("total cpu time spent up to
        # now"), so each step gets its share of that clock, rescaled so the steps add up to the measured wall
        # time (start-up and I/O spread proportionally): an estimate. Without usable marks: total / nsteps.
        marks = result.cpu_marks[:n]
        deltas = np.diff([0.0] + marks) if n and all(c is not None for c in marks) else np.zeros(0)
        if n and len(deltas) == n and (deltas > 0).all():
            walls = list(deltas / marks[-1] * wall)
        else:
            walls = [wall / max(n, 1)] * n
        frames = [self._frame(structure, result, k, charge, walls[k], k) for k in range(n)]

        error = result.error
        if error:  # SCF failure, pw.x crash or timeout: keep what was done
            status = "failed"
            if result.scf_failed:
                # record the configuration whose SCF failed (the input, or the last one BFGS printed)
                s_fail = (
                    self._structure(structure, result.last_atoms, charge)
                    if n and result.last_atoms
                    else structure
                )
                failed = self.failed_frame(s_fail, charge, error, max(wall - sum(walls), 0.0))
                frames.append(failed.model_copy(update={"step": n}))
            logger.warning("QE relaxation failed (q=%+d) after %d steps: %s", charge, n, error)
        elif not frames:
            status, error = "failed", f"pw.x produced no ionic step (exit code {rc}, see pw.out)"
        elif result.bfgs_converged or (frames[-1].fmax is not None and frames[-1].fmax <= fmax):
            status = "converged"
        elif result.bfgs_message and ("bfgs failed" in result.bfgs_message or "reset" in result.bfgs_message):
            status, error = "failed", f"pw.x BFGS: {result.bfgs_message}"
        else:
            status = "unconverged"
            error = f"not converged to fmax={fmax} eV/Å within {max_steps} steps"
        for k, bad in enumerate(suspect_forces(result, len(frames), status == "converged")):
            if bad:
                frames[k] = frames[k].model_copy(update={"forces_suspect": True})
        return self.make_trajectory(frames, status, charge, fmax, wall, error)
