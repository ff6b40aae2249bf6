"""VASP settings of the ``vasp`` engine."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from defectflow.engines.base import EngineSettings

__all__ = ["VaspSettings"]


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
