"""pw.x outputs: energies, forces, stress, magnetisation, band edges and errors of every ionic step in ``pw.out``
(ASE's ``espresso-out`` reader for positions, forces and stress; the rest read here)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from defectflow.engines.outputs import band_edges
from defectflow.engines.qe.settings import RY_IN_EV
from defectflow.schemas.core import ElectrostaticPotential

__all__ = ["PwResult", "parse_band_edges", "parse_pw_output", "read_potential_cube", "suspect_forces"]


@dataclass
class PwResult:
    """What :func:`parse_pw_output` reads from ``pw.out``: one entry per completed ionic step."""

    atoms: list  # ASE Atoms with a SinglePointCalculator, one per completed ionic step
    energies: list[float | None]  # eV, per step (the `!!` line for hybrids)
    magnetizations: list[float | None]  # μB, per step
    cpu_marks: list[float | None]  # QE's "total cpu time spent up to now" at the end of each step, s
    scf_failed: bool
    error: str | None
    last_atoms: Any  # last configuration printed (with or without results)
    n_electrons: float | None
    bfgs_converged: bool
    bfgs_message: str | None
    band_edges: list[tuple[float | None, float | None, float | None]] = None  # (vbm, cbm, E_F) eV, per step
    # per step: whether pw.x's lsda check had restarted the SCF without electronic history before it ("a final
    # configuration with zero absolute magnetization has been found"; see Frame.forces_suspect)
    lsda_restarted: list[bool] = None
    potential: ElectrostaticPotential | None = None  # pp.x's, when the engine ran it after a single point


def _qe_error_block(text: str) -> str | None:
    """The message inside QE's %%%% error block, if any."""
    m = re.search(r"%{20,}\n(.*?)\n\s*%{20,}", text, re.DOTALL)
    if not m:
        return None
    return " ".join(ln.strip() for ln in m.group(1).splitlines() if ln.strip())


_NUMBER = re.compile(r"-?\d+\.\d+")


def parse_band_edges(lines: list[str]) -> tuple[float | None, float | None, float | None]:
    """(VBM, CBM, Fermi level) in eV from the last Kohn-Sham eigenvalue printout in ``lines`` (one SCF).

    VBM = highest eigenvalue whose occupation is > 0.5, CBM = lowest whose occupation is < 0.5, over all
    k-points and both spins, decided by :func:`defectflow.engines.outputs.band_edges` as for every engine (QE
    prints occupations normalised to 1 per band and spin; they need ``verbosity='high'``). Without printed occupations an eigenvalue counts as occupied when it lies below the
    Fermi level (the same thing for fd/gaussian/mp smearing, where f(E_F) = 1/2), or below the "highest
    occupied level" QE prints for fixed occupations. With smearing a partially filled (defect) level therefore
    counts as VBM or CBM by its occupation: the definition is meant for gapped cells (the bulk reference).
    Returns Nones for what is not in the output (no bands printed, no empty bands).
    """
    start = None
    for i, ln in enumerate(lines):
        if "End of self-consistent calculation" in ln or "End of band structure calculation" in ln:
            start = i
    if start is None:
        return None, None, None
    eigs: list[float] = []
    occs: list[float] = []
    fermi = homo = lumo = None
    mode = None  # "e" while reading eigenvalues, "o" while reading occupations
    block_e: list[float] = []
    block_o: list[float] = []

    def flush():
        if block_o and len(block_o) != len(block_e):  # truncated: ignore the occupations of this k-point
            block_o.clear()
        eigs.extend(block_e)
        occs.extend(block_o if block_o else [math.nan] * len(block_e))
        block_e.clear()
        block_o.clear()

    for ln in lines[start + 1 :]:
        s = ln.strip()
        if "bands (ev)" in s:
            flush()
            mode = "e"
            continue
        if s.startswith("occupation numbers"):
            mode = "o"
            continue
        if s.startswith("the Fermi energy is"):
            fermi = float(_NUMBER.findall(s)[0])
            mode = None
            continue
        if s.startswith("highest occupied, lowest unoccupied level"):
            homo, lumo = (float(x) for x in _NUMBER.findall(s.split(":")[1])[:2])
            mode = None
            continue
        if s.startswith("highest occupied level"):
            homo = float(_NUMBER.findall(s.split(":")[1])[0])
            mode = None
            continue
        if s.startswith("!") or s.startswith("total energy") or s.startswith("Writing"):
            break
        if not s or s.startswith("---"):  # blank lines and "------ SPIN UP/DOWN ------" headers
            continue
        if mode == "e":
            block_e.extend(float(x) for x in _NUMBER.findall(s))
        elif mode == "o":
            block_o.extend(float(x) for x in _NUMBER.findall(s))
    flush()
    if not eigs:
        return homo, lumo, fermi
    # occupations normalised to 1 per band and spin; unprinted ones (NaN) from the Fermi level or QE's HOMO
    vbm, cbm = band_edges(eigs, occs, 1.0, reference=fermi if fermi is not None else homo)
    return vbm, cbm, fermi


def parse_pw_output(path: Path, hybrid: bool) -> PwResult:
    from ase.io import read

    text = path.read_text(errors="replace") if path.exists() else ""
    lines = text.splitlines()
    try:
        images = read(str(path), index=":", format="espresso-out")
    except Exception:  # truncated output: no complete step
        images = []
    try:
        last = read(str(path), index=-1, format="espresso-out", results_required=False)
    except Exception:
        last = None
    images = [a for a in images if a.calc is not None and a.calc.results.get("forces") is not None]

    force_idx = [i for i, ln in enumerate(lines) if "Forces acting on atoms" in ln]
    energy_tag = "!!" if hybrid else "!"
    energies, mags, cpus, edges, resets = [], [], [], [], []
    prev, restarted = 0, False
    for fi in force_idx:
        e = m = c = None
        for ln in lines[prev:fi]:
            s = ln.lstrip()
            if s.startswith("by performing a new scf iteration without any"):
                restarted = True
            elif s.startswith(energy_tag) and "total energy" in s and (hybrid or not s.startswith("!!")):
                e = float(s.split("=")[1].split()[0]) * RY_IN_EV
            elif s.startswith("total magnetization"):
                m = float(s.split("=")[1].split()[0])
            elif s.startswith("total cpu time spent up to now is"):
                c = float(s.split()[-2])
        energies.append(e)
        mags.append(m)
        cpus.append(c)
        edges.append(parse_band_edges(lines[prev:fi]))
        resets.append(restarted)
        prev = fi
    nel = re.findall(r"number of electrons\s*=\s*([-\d.]+)", text)
    error = None
    scf_failed = "convergence NOT achieved" in text
    if scf_failed:
        m = re.search(r"convergence NOT achieved[^\n]*", text)
        error = "SCF " + m.group(0).strip()
    block = _qe_error_block(text)
    if block:
        error = f"{error}; {block}" if error else f"pw.x error: {block}"
    bfgs_msg = None
    for pat in (
        r"bfgs converged[^\n]*",
        r"bfgs failed[^\n]*",
        r"The maximum number of steps has been reached\.",
        r"history already reset[^\n]*",
    ):
        m = re.search(pat, text)
        if m:
            bfgs_msg = m.group(0).strip()
            break
    return PwResult(
        atoms=images,
        energies=energies,
        magnetizations=mags,
        cpu_marks=cpus,
        scf_failed=scf_failed,
        error=error,
        last_atoms=last,
        n_electrons=float(nel[0]) if nel else None,
        bfgs_converged="bfgs converged" in text,
        bfgs_message=bfgs_msg,
        band_edges=edges,
        lsda_restarted=resets,
    )


def suspect_forces(result: PwResult, n_steps: int, converged: bool) -> list[bool]:
    """Per ionic step: are its forces suspect (:attr:`defectflow.schemas.Frame.forces_suspect`)?

    Yes for every step after pw.x's lsda check restarted the SCF without electronic history ("a final
    configuration with zero absolute magnetization has been found"), unless that step ended a converged
    relaxation (the restart confirmed the minimum). Measured on the frozen reference (V_Si⁺, docs/benchmarks.md):
    after a second restart the forces jumped to 3.8 eV/Å at an unchanged energy, halved from one restart to the next,
    and a fresh single point did not reproduce them; BFGS then reset its history 11 times and never converged.
    """
    restarted = list(result.lsda_restarted or [])[:n_steps]
    restarted += [False] * (n_steps - len(restarted))
    return [r and not (k == n_steps - 1 and converged) for k, r in enumerate(restarted)]


def read_potential_cube(path: str | Path) -> np.ndarray:
    """The potential grid of a pp.x Gaussian cube (``path``, plain or ``.gz``) in eV: pp.x writes Ry (for
    ``plot_num = 11`` the potential energy of an electron), on the grid points i/n along each lattice vector."""
    import gzip

    from ase.io.cube import read_cube

    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        data = read_cube(fh, read_data=True)["data"]
    return np.asarray(data, dtype=float) * RY_IN_EV
