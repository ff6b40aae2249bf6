"""The documents every step shares: structures, frames, trajectories, the settings digest and the group key.

Units follow ASE: energies in eV, forces in eV/Å, stress in eV/Å³ (Voigt order xx, yy, zz, yz, xz, xy,
ASE sign convention: positive = tensile), lengths in Å, times in seconds of wall clock.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, BeforeValidator, Field, PlainSerializer
from pymatgen.core import Structure as _Structure

__all__ = [
    "ElectrostaticPotential", "MSONDict", "Frame", "RelaxTrajectory", "Structure", "as_structure", "group_key",
    "settings_digest",
]


def _as_structure(v: Any) -> Any:
    return _Structure.from_dict(v) if isinstance(v, dict) else v


#: A pymatgen Structure field that validates from a dict and serialises to JSON as ``Structure.as_dict()``.
Structure = Annotated[
    _Structure,
    BeforeValidator(_as_structure),
    PlainSerializer(lambda s: s.as_dict(), return_type=dict, when_used="json"),
]


def _mson_as_dict(v: Any) -> Any:
    return v.as_dict() if hasattr(v, "as_dict") else v


#: An MSONable object kept as its ``as_dict()`` (a doped DefectEntry, ...): jobflow decodes such dicts back into
#: objects when it hands them to a job, so the field accepts the object too.
MSONDict = Annotated[dict[str, Any], BeforeValidator(_mson_as_dict)]


def settings_digest(settings: dict[str, Any]) -> str:
    """Stable 12-hex-digit digest of a settings dictionary (key order does not matter)."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def group_key(defect: str, charge: int) -> str:
    """The '(defect, q)' key used everywhere a result is kept per group: ``'v_Si +1'``, ``'v_Si +0'``."""
    return f"{defect} {int(charge):+d}"


def as_structure(value: Any) -> _Structure:
    """A Structure from a Structure, its ``as_dict()`` or its JSON string (how jobs receive structures)."""
    if isinstance(value, _Structure):
        return value
    if isinstance(value, str):
        return _Structure.from_dict(json.loads(value))
    if isinstance(value, dict):
        return _Structure.from_dict(value)
    raise TypeError(f"expected a pymatgen Structure (or its dict/JSON), got {type(value).__name__}")


class ElectrostaticPotential(BaseModel):
    """What the finite-size corrections of a charged defect (doped's FNV and eFNV) need from one calculation: its
    electrostatic potential (local ionic + Hartree), reduced to planar averages and per-site values, in doped's own
    conventions, so the levels step needs neither the engine's files nor its work folder."""

    planar_averages: list[list[float]] | None = Field(
        None,
        description="Planar averages along the lattice vectors a, b, c (three lists, one value per grid plane, "
        "plane i at i/n of the vector) in eV: the potential energy of an electron, as VASP's LOCPOT holds it and "
        "doped's FNV (Freysoldt) reads it",
    )
    site_potentials: list[float] | None = Field(
        None,
        description="Electrostatic potential at each site, in structure order, in V, in doped's eFNV (Kumagai) "
        "convention: −1 × VASP OUTCAR's 'average (electrostatic) potential at core'; QE: minus the potential "
        "energy of an electron averaged with a Gaussian test charge of width `site_sigma`",
    )
    site_sigma: float | None = Field(
        None, description="Width (standard deviation) of the Gaussian test charge of `site_potentials`, in Å "
        "(None: the engine's own definition, e.g. VASP's test-charge spheres)"
    )
    grid: list[int] | None = Field(None, description="Real-space grid (n_a, n_b, n_c) of the full potential")
    source: str = Field(description="Where the numbers come from, e.g. 'qe pp.x plot_num=11'")
    file: str | None = Field(
        None, description="The full 3-D potential on disk, when kept (QE: gzipped Gaussian cube, Ry and bohr)"
    )


class Frame(BaseModel):
    """One labelled configuration: a structure with its energy, forces (and stress) at a given total charge."""

    structure: Structure = Field(description="Configuration (Å); `structure.charge` equals `charge`")
    energy: float | None = Field(None, description="Total energy in eV (None when the calculation failed)")
    forces: list[list[float]] | None = Field(None, description="Forces in eV/Å, one row per site")
    stress: list[float] | None = Field(
        None, description="Stress in eV/Å³, Voigt order (xx, yy, zz, yz, xz, xy), ASE sign convention"
    )
    charge: int = Field(description="Total charge q of the cell in units of e (q = -1: one extra electron)")
    engine: str = Field(description="Engine name: qe, cp2k, vasp or ase")
    xc: str | None = Field(None, description="Exchange-correlation functional or method label (PBE, HSE06, GFN1-xTB)")
    fidelity: str | None = Field(None, description="Fidelity name from the campaign (low, high, ...)")
    settings_digest: str = Field(description="Digest of the engine settings that produced this frame")
    wall_seconds: float = Field(0.0, description="Wall time spent on this frame in s")
    step: int = Field(0, description="Ionic step index within its relaxation (0 for single points)")
    scf_converged: bool = Field(True, description="Whether the electronic SCF converged")
    magnetization: float | None = Field(None, description="Total magnetic moment in μB, when spin-polarised")
    vbm: float | None = Field(
        None, description="Highest occupied Kohn-Sham level in eV (engine's absolute scale), when the engine reports it"
    )
    cbm: float | None = Field(None, description="Lowest unoccupied Kohn-Sham level in eV, when reported")
    fermi_level: float | None = Field(None, description="Fermi level in eV, when reported")
    potential: ElectrostaticPotential | None = Field(
        None, description="Electrostatic potential for finite-size corrections, when the engine recorded it"
    )
    forces_suspect: bool = Field(
        False,
        description="The engine flags this step's forces as not to be trusted, though the energy is. QE: a "
        "relaxation step after pw.x's lsda check restarted the SCF without electronic history ('a final "
        "configuration with zero absolute magnetization has been found') and the relaxation went on. At a "
        "(near-)degenerate defect level these restarts returned forces up to 3.8 eV/Å at an unchanged energy, "
        "which a fresh single point does not reproduce (docs/benchmarks.md). Step 4 does not train on such steps",
    )

    @property
    def band_gap(self) -> float | None:
        """cbm − vbm in eV, or None."""
        return None if self.vbm is None or self.cbm is None else self.cbm - self.vbm
    error: str | None = Field(None, description="Why the calculation failed, if it did")

    @property
    def natoms(self) -> int:
        return len(self.structure)

    @property
    def forces_array(self) -> np.ndarray:
        return np.asarray(self.forces if self.forces is not None else [], dtype=float)

    @property
    def fmax(self) -> float | None:
        """Largest atomic force norm in eV/Å."""
        if not self.forces:
            return None
        return float(np.linalg.norm(self.forces_array, axis=1).max())


class RelaxTrajectory(BaseModel):
    """Every ionic step of one relaxation, with its outcome. A failed relaxation keeps the frames it produced."""

    frames: list[Frame] = Field(default_factory=list, description="Every ionic step, in order")
    status: Literal["converged", "unconverged", "failed"] = Field(
        description="converged: fmax below threshold; unconverged: step limit reached; failed: engine error"
    )
    error: str | None = Field(None, description="Reason for failure or non-convergence")
    charge: int = Field(description="Total charge q in e")
    engine: str
    fidelity: str | None = None
    settings_digest: str
    fmax_target: float = Field(description="Force convergence threshold in eV/Å")
    wall_seconds: float = Field(0.0, description="Total wall time of the relaxation in s")
    label: str | None = Field(None, description="Free label, e.g. 'v_Si_-1/Bond_Distortion_-30.0%'")

    @property
    def final(self) -> Frame | None:
        """Last frame with an energy, or None."""
        good = [f for f in self.frames if f.energy is not None]
        return good[-1] if good else None

    @property
    def n_steps(self) -> int:
        return len(self.frames)
