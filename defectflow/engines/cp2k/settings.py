"""CP2K settings of the ``cp2k`` engine."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from defectflow.engines.base import EngineSettings

__all__ = ["DEFAULT_DATA_DIR", "CP2KSettings"]

DEFAULT_DATA_DIR = "/usr/share/cp2k"


class CP2KSettings(EngineSettings):
    """CP2K Quickstep settings (GPW). Cutoffs in Ry as in CP2K's input; the engine reports eV, eV/Å, eV/Å³."""

    engine: Literal["cp2k"] = "cp2k"
    xc: Literal["PBE", "HSE06"] = Field(
        "PBE", description="PBE, or HSE06 with ADMM (slow: ~12 min per SCF for 7 Si atoms on 2 cores)"
    )
    cutoff: float = Field(400.0, gt=0, description="Plane-wave cutoff of the finest density grid in Ry")
    rel_cutoff: float = Field(50.0, gt=0, description="Relative cutoff (Gaussian → grid mapping) in Ry")
    basis_set: str = Field("DZVP-MOLOPT-SR-GTH", description="Basis set name (looked up in basis_set_file)")
    basis_set_file: str = Field("BASIS_MOLOPT", description="Basis set file (name in data_dir or a path)")
    potential: str = Field("GTH-PBE", description="Pseudopotential name (looked up in potential_file)")
    potential_file: str = Field(
        "GTH_POTENTIALS", description="Pseudopotential file (name in data_dir or a path)"
    )
    aux_basis_set: str = Field(
        "cFIT3",
        description="ADMM auxiliary basis for HSE06 (BASIS_ADMM has cFIT3 only for H-Cl; e.g. admm-dzp in "
        "BASIS_ADMM_MOLOPT for heavier elements)",
    )
    aux_basis_set_file: str = Field("BASIS_ADMM", description="File holding the ADMM auxiliary basis sets")
    scf: Literal["smear", "ot"] = Field(
        "smear",
        description="SCF algorithm for PBE: smear = diagonalisation + Fermi-Dirac smearing + Broyden mixing; "
        "ot = orbital transformation (HSE06 always uses OT)",
    )
    smearing_temperature: float = Field(
        300.0, gt=0, description="Electronic temperature of the Fermi-Dirac smearing in K (scf: smear)"
    )
    added_mos: int = Field(20, ge=0, description="Extra unoccupied orbitals per spin for smearing")
    max_scf: int = Field(100, gt=0, description="Maximum SCF iterations per ionic step")
    eps_scf: float = Field(1e-6, gt=0, description="SCF convergence threshold (Hartree)")
    stress: bool = Field(True, description="Compute the analytical stress tensor (eV/Å³ on the frame)")
    hf_eps_schwarz: float = Field(
        1e-6, gt=0, description="HSE06: Schwarz screening threshold of the HF integrals (dimensionless)"
    )
    hf_max_memory: int = Field(1000, gt=0, description="HSE06: memory per MPI rank for HF integrals in MiB")
    data_dir: str | None = Field(
        None, description="CP2K data directory (default $CP2K_DATA_DIR or /usr/share/cp2k)"
    )
    mpi_procs: int | None = Field(None, ge=1, description="MPI ranks (default: all cores; 1 = no mpirun)")
    command: str | None = Field(
        None, description="cp2k_shell executable (default: cp2k_shell.psmp, then cp2k_shell, on PATH)"
    )
    inp: str = Field(
        "", description="Extra CP2K input (sections) merged over the generated input; it wins on clashes"
    )
