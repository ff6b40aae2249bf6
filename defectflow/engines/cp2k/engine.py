"""The ``cp2k`` engine: ASE's CP2K calculator with a persistent ``cp2k_shell`` (see the package docstring,
:mod:`defectflow.engines.cp2k`)."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
import warnings
from pathlib import Path

from ase.calculators.calculator import all_changes
from ase.calculators.cp2k import CP2K

import defectflow.engines.process as process
from defectflow.engines.base import AseDrivenEngine, EngineError, mpi_prefix, structure_to_atoms
from defectflow.engines.cp2k.inputs import (
    data_dir,
    find_basis,
    find_potential,
    input_template,
    merge_inputs,
    spin_state,
    valence_electrons,
)
from defectflow.engines.cp2k.outputs import parse_band_edges, parse_scf
from defectflow.engines.cp2k.settings import CP2KSettings

logger = logging.getLogger(__name__)

__all__ = ["CP2KEngine", "RecordingCP2K", "ScfNotConverged"]

#: written by the shell line in the work directory: the pid (= session id) of the cp2k_shell launcher
PID_FILE = "cp2k_shell.pid"


class RecordingCP2K(CP2K):
    """ASE's CP2K calculator that, after each evaluation, reads the new part of the CP2K output file and
    records SCF convergence and iteration count in ``results`` (``scf_converged``, ``scf_steps``) and the band
    edges (``vbm``, ``cbm``, ``fermi_level``, eV)."""

    scf_log: list

    def calculate(self, atoms=None, properties=None, system_changes=None):
        if getattr(self, "scf_log", None) and not self.scf_log[-1][0]:
            raise ScfNotConverged("stopped: the previous ionic step's SCF did not converge")
        out = Path(getattr(self, "out_path", self.label + ".out"))
        start = out.stat().st_size if out.exists() else 0
        changes = system_changes if system_changes is not None else all_changes
        super().calculate(atoms, properties, changes)
        text = ""
        if out.exists():
            with open(out, errors="replace") as fh:
                fh.seek(start)
                text = fh.read()
        converged, steps = parse_scf(text)
        self.results["scf_converged"] = converged
        self.results["scf_steps"] = steps
        self.results["vbm"], self.results["cbm"], self.results["fermi_level"] = parse_band_edges(text)
        if not hasattr(self, "scf_log"):
            self.scf_log = []
        self.scf_log.append((converged, steps))


def _end_shell_from_pid_file(pid_file: Path) -> None:
    """End the session of a cp2k_shell whose start-up failed or was interrupted (its pid from ``pid_file``)."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    if process.session_members(pid) == []:  # no session of its own (no setsid here): the launcher alone
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
        return
    process.terminate_session(pid, grace=10.0)


class ScfNotConverged(RuntimeError):
    """Raised to stop a relaxation after an unconverged SCF (caught by the base class → status failed)."""


class CP2KEngine(AseDrivenEngine):
    """CP2K (Quickstep, GPW) via ASE's calculator and a persistent ``cp2k_shell`` (see module docstring)."""

    name = "cp2k"
    settings_class = CP2KSettings

    # -- set-up ----------------------------------------------------------------------------------------------
    def shell_executable(self) -> str:
        candidates = [self.settings.command] if self.settings.command else ["cp2k_shell.psmp", "cp2k_shell"]
        for exe in candidates:
            path = shutil.which(exe)
            if path:
                return path
        raise EngineError(
            f"CP2K: {' / '.join(candidates)} not found on PATH (Debian: apt install cp2k cp2k-data; "
            "or set `command:` to your cp2k_shell executable)"
        )

    def check(self, structure) -> None:
        self.shell_executable()
        elements = sorted({sp.symbol for sp in structure.composition})
        for el in elements:
            find_basis(el, self.settings)
            find_potential(el, self.settings)
            if self.settings.xc == "HSE06":
                find_basis(el, self.settings, aux=True)

    def valence_count(self, atoms, charge: int) -> int:
        counts: dict[str, int] = {}
        total = 0
        for el in atoms.get_chemical_symbols():
            if el not in counts:
                counts[el] = valence_electrons(el, self.settings)
            total += counts[el]
        return total - int(charge)

    def shell_command(self, workdir: Path) -> str:
        """The shell line ASE's calculator runs: ``cd <workdir> && echo $$ > cp2k_shell.pid && exec setsid env
        OMP_NUM_THREADS=1 mpirun -np N cp2k_shell``. ``exec`` makes the child *be* the launcher and ``setsid``
        gives it a session of its own (ASE's Popen has no ``start_new_session``), so
        :mod:`defectflow.engines.process` can end mpirun and every rank; the pid file names the session before
        the shell is ready (an interrupt during start-up)."""
        nprocs = self.settings.mpi_procs or os.cpu_count() or 1
        cmd = ["env", "OMP_NUM_THREADS=1", *mpi_prefix(nprocs), self.shell_executable()]
        setsid = shutil.which("setsid")
        if setsid:
            cmd.insert(0, setsid)
        return (
            f"cd {shlex.quote(str(workdir))} && echo $$ > {PID_FILE} && exec "
            + " ".join(shlex.quote(c) for c in cmd)
        )

    def calculator_kwargs(self, atoms, charge: int, workdir: Path) -> dict:
        """Keyword arguments for ASE's CP2K calculator (no process started); used by tests too."""
        from ase.units import Rydberg

        s = self.settings
        uks, mult = spin_state(self.valence_count(atoms, charge), s.spin)
        elements = sorted(set(atoms.get_chemical_symbols()))
        return dict(
            # relative: the shell runs in workdir (shell_command), so paths with spaces or of any length work
            label="cp2k",
            inp=merge_inputs(input_template(s, elements), s.inp) if s.inp else input_template(s, elements),
            xc="PBE" if s.xc == "PBE" else None,
            basis_set=s.basis_set,
            basis_set_file=None,  # written (with the ADMM file for HSE06) by the template
            potential_file=None,
            pseudo_potential=s.potential,
            cutoff=s.cutoff * Rydberg,
            max_scf=s.max_scf,
            charge=int(charge),
            uks=uks,
            multiplicity=mult,
            stress_tensor=s.stress and s.xc != "HSE06",  # ADMM stress not verified here
            print_level="LOW",
        )

    def render_input(self, structure, charge: int, workdir: str | Path = ".") -> str:
        """The complete CP2K input :meth:`make_calculator` would load, without starting CP2K (a dry run)."""
        from types import SimpleNamespace

        from ase.calculators.calculator import Parameters
        from ase.calculators.cp2k import CP2K

        is_atoms = hasattr(structure, "get_chemical_symbols")
        atoms = structure if is_atoms else structure_to_atoms(structure, charge)
        kwargs = self.calculator_kwargs(atoms, charge, Path(workdir))
        calc = CP2K.__new__(CP2K)  # no __init__: that would start cp2k_shell
        calc._shell = SimpleNamespace(version=5.0)  # the shell version only matters for libxc names
        calc.label = kwargs.pop("label")
        calc.parameters = Parameters({**CP2K.default_parameters, **kwargs})
        calc.atoms = atoms
        text = CP2K._generate_input(calc)
        calc._shell = None
        return text

    def make_calculator(self, atoms, charge: int, workdir: Path):
        workdir = Path(workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        kwargs = self.calculator_kwargs(atoms, charge, workdir)
        env_keys = {"CP2K_DATA_DIR": str(data_dir(self.settings)), "OMP_NUM_THREADS": "1"}
        saved = {k: os.environ.get(k) for k in env_keys}
        pid_file = workdir / PID_FILE
        pid_file.unlink(missing_ok=True)
        os.environ.update(env_keys)  # inherited by the shell started in __init__, restored right after
        try:
            calc = RecordingCP2K(command=self.shell_command(workdir), **kwargs)
        except BaseException as exc:  # a failed start-up, or an interrupt while the shell starts: end it
            _end_shell_from_pid_file(pid_file)
            if not isinstance(exc, Exception):
                raise
            raise EngineError(
                f"CP2K: could not start cp2k_shell in {workdir}: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        child = getattr(calc._shell, "_child", None)
        if child is not None:
            process.register(child)  # process.terminate_all() ends it too
        calc._defectflow_uks = (kwargs["uks"], kwargs["multiplicity"])
        calc.out_path = workdir / "cp2k.out"  # CP2K appends; RecordingCP2K reads each evaluation's new part
        return calc

    def close_calculator(self, calc) -> None:
        """Stop the cp2k_shell (EXIT when idle; else, e.g. after an interrupt, SIGTERM to its session and SIGKILL
        10 s later) and reap it: no orphaned MPI ranks. Runs in a ``finally`` block of every engine call."""
        shell = getattr(calc, "_shell", None)
        child = getattr(shell, "_child", None) if shell is not None else None
        try:
            with warnings.catch_warnings():  # "CP2K-shell not ready, sending SIGTERM": handled below
                warnings.simplefilter("ignore", RuntimeWarning)
                calc.close()
        except Exception as exc:  # a dead shell: ASE asserts on its exit code
            logger.debug("cp2k_shell close: %s", exc)
            calc._shell = None
        finally:
            if child is not None:
                process.terminate(child, grace=10.0)
            out_path = getattr(calc, "out_path", None)
            if out_path is not None:
                (Path(out_path).parent / PID_FILE).unlink(missing_ok=True)

    # -- frames ----------------------------------------------------------------------------------------------
    def _frame_from_atoms(self, atoms, charge, t0, step):
        calc = atoms.calc
        frame = super()._frame_from_atoms(atoms, charge, t0, step)
        update: dict = {
            key: calc.results[key]
            for key in ("vbm", "cbm", "fermi_level")
            if calc.results.get(key) is not None
        }
        uks, mult = getattr(calc, "_defectflow_uks", (False, None))
        if uks and mult:
            update["magnetization"] = float(mult - 1)
        if not calc.results.get("scf_converged", True):
            update["scf_converged"] = False
            update["error"] = (
                f"CP2K SCF not converged within max_scf={self.settings.max_scf} (energy/forces kept)"
            )
        return frame.model_copy(update=update) if update else frame

    def relax(self, structure, charge, workdir=".", fmax=0.05, max_steps=100):
        traj = super().relax(structure, charge, workdir, fmax, max_steps)
        bad = [f.step for f in traj.frames if not f.scf_converged]
        if bad and traj.status != "failed":
            traj = traj.model_copy(
                update={
                    "status": "failed",
                    "error": f"SCF not converged at ionic step {bad[0]}; relaxation stopped",
                }
            )
        return traj
