"""The ``vasp`` engine: atomate2 VASP makers run inside the engine call (see the package docstring,
:mod:`defectflow.engines.vasp`, for why they are not jobs of the campaign graph)."""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import time
from pathlib import Path
from typing import Literal

from pymatgen.core import Structure

from defectflow.engines.base import Engine, EngineError
from defectflow.engines.vasp.inputs import _charged, _quiet_pymatgen, relax_maker, static_maker
from defectflow.engines.vasp.outputs import (
    frames_from_task,
    potential_from_directory,
    potential_from_task,
    to_frame,
    trajectory_from_task,
    trajectory_from_vasprun,
)
from defectflow.engines.vasp.settings import VaspSettings

logger = logging.getLogger(__name__)

__all__ = ["VaspEngine"]


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

    def default_kind(self) -> Literal["relax", "static"]:
        """What this engine's calculations are by default: ``static`` (single point) for the high fidelity, which
        the method only uses for single points (bulk, labels, verification), ``relax`` otherwise."""
        return "static" if self.fidelity == "high" else "relax"

    def input_set(
        self,
        structure: Structure,
        charge: int,
        kind: Literal["relax", "static"] | None = None,
        fmax: float = 0.05,
        max_steps: int = 100,
    ):
        """pymatgen ``VaspInput`` (INCAR, KPOINTS, POSCAR, POTCAR.spec) for ``structure`` at charge ``charge`` (e).

        ``kind``: ``relax`` (IBRION 2, ISIF 2, EDIFFG = −``fmax`` eV/Å, NSW = ``max_steps``) or ``static``
        (IBRION −1, NSW 0); None: :meth:`default_kind` (static for the ``high`` fidelity)."""
        kind = kind or self.default_kind()
        maker = self.relax_maker(charge, fmax, max_steps) if kind == "relax" else self.static_maker(charge)
        with _quiet_pymatgen():
            return maker.input_set_generator.get_input_set(_charged(structure, charge), potcar_spec=True)

    def write_inputs(
        self,
        structure: Structure,
        charge: int,
        directory: str | Path,
        kind: Literal["relax", "static"] | None = None,
        fmax: float = 0.05,
        max_steps: int = 100,
    ) -> Path:
        """Write INCAR, KPOINTS, POSCAR and POTCAR.spec (no POTCAR files needed) to ``directory``; return it.

        ``kind`` as in :meth:`input_set`: by default a single-point (static) INCAR for the ``high`` fidelity, a
        relaxation INCAR otherwise."""
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
        """Run one atomate2 VASP job in ``workdir`` (custodian, then atomate2's TaskDoc parsing) with an in-memory
        JobStore; return its TaskDoc (also written to ``workdir/taskdoc.json.gz``), or None when the job failed.

        ``stop_children_kwargs={"handle_unsuccessful": False}``: an unconverged run still returns its TaskDoc (the
        engine records non-convergence in the Frame/RelaxTrajectory; the nested job has no children). The caller's
        jobflow state (``CURRENT_JOB``: the running ``single_point``/relaxation job and its store, to which
        :func:`defectflow.store.tracking.tracked` writes ``metadata.step``/``cost``/``cache_key`` when the call
        returns) is restored afterwards: jobflow's ``Job.run`` resets it to None when the nested job finishes.
        """
        import dataclasses

        from jobflow import CURRENT_JOB, JobStore, run_locally
        from maggma.stores import MemoryStore
        from monty.serialization import dumpfn

        maker = dataclasses.replace(maker, stop_children_kwargs={"handle_unsuccessful": False})
        job = maker.make(_charged(structure, charge))
        outer_job, outer_store = CURRENT_JOB.job, CURRENT_JOB.store
        try:
            with _quiet_pymatgen():
                responses = run_locally(
                    job, store=JobStore(MemoryStore()), create_folders=False, root_dir=workdir, log=False
                )
        finally:
            CURRENT_JOB.job, CURRENT_JOB.store = outer_job, outer_store
        response = responses.get(job.uuid, {}).get(1)
        task = None if response is None else response.output
        if task is not None:
            try:
                dumpfn(task, workdir / "taskdoc.json.gz")
            except Exception as exc:  # noqa: BLE001 - a copy for people; the results do not depend on it
                logger.warning("could not write %s: %s", workdir / "taskdoc.json.gz", exc)
        return task

    def single_point(self, structure, charge, workdir="."):
        """One VASP single point (atomate2 ``StaticMaker``/``HSEStaticMaker``) in ``workdir``; the Frame comes from
        the run's TaskDoc, or from ``vasprun.xml`` when atomate2 could not build one. ``Frame.potential`` holds the
        LOCPOT planar averages and OUTCAR core potentials (doped's FNV/eFNV inputs) from the TaskDoc, or from the
        files when the TaskDoc lacks them."""
        workdir = Path(workdir)
        self.check(structure)
        workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        task = self._run(self.static_maker(charge), structure, charge, workdir)
        frames = frames_from_task(task, charge, self.settings, self.fidelity) if task is not None else []
        if frames:
            frame = frames[-1].model_copy(update={"step": 0})
        else:
            try:
                frame = to_frame(workdir, charge, self.settings, self.fidelity)
            except (FileNotFoundError, EngineError) as exc:
                detail = "atomate2 job failed (see custodian.json / OUTCAR)" if task is None else str(exc)
                return self.failed_frame(
                    structure, charge, f"VASP single point: {detail}", time.perf_counter() - t0
                )
        potential = (potential_from_task(task) if task is not None else None) or potential_from_directory(workdir)
        return frame.model_copy(update={"wall_seconds": time.perf_counter() - t0, "potential": potential})

    def relax(self, structure, charge, workdir=".", fmax=0.05, max_steps=100):
        """One VASP relaxation (atomate2 ``RelaxMaker``/``HSERelaxMaker``, fixed cell) in ``workdir``; every ionic
        step from the run's TaskDoc, or from ``vasprun.xml`` when atomate2 could not build one."""
        workdir = Path(workdir)
        self.check(structure)
        workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        task = self._run(self.relax_maker(charge, fmax, max_steps), structure, charge, workdir)
        traj = trajectory_from_task(task, charge, fmax, self.settings, self.fidelity) if task is not None else None
        if traj is None or not traj.frames:
            try:
                traj = trajectory_from_vasprun(workdir, charge, fmax, self.settings, self.fidelity)
            except FileNotFoundError as exc:
                return self.make_trajectory(
                    [], "failed", charge, fmax, time.perf_counter() - t0,
                    f"VASP relaxation produced no output: {exc}",
                )
        return traj.model_copy(update={"wall_seconds": time.perf_counter() - t0})
