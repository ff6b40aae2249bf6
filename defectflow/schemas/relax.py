"""Step 2: one low-fidelity relaxation, the energy-vs-distortion summary of a (defect, q), the harvested training set.

Units follow ASE: energies in eV, forces in eV/Å, lengths in Å, times in s of wall clock."""

from __future__ import annotations

from pydantic import BaseModel, Field

from defectflow.schemas.core import RelaxTrajectory, Structure

__all__ = ["RelaxRecord", "DistortionSummary", "TrainingSet"]


class RelaxRecord(BaseModel):
    """Outcome of one relaxation of one distorted structure."""

    defect: str = Field(description="Defect name without charge (v_Si), or 'bulk'")
    charge: int = Field(description="Charge state q in e")
    distortion: str = Field(description="ShakeNBreak label: Unperturbed, Bond_Distortion_-30.0%, Dimer, ...")
    bond_distortion: float | None = Field(None, description="Bond distortion fraction, if any")
    status: str = Field(description="converged | unconverged | failed")
    error: str | None = None
    n_steps: int = 0
    energy: float | None = Field(None, description="Final energy in eV")
    fmax: float | None = Field(None, description="Final max force in eV/Å")
    wall_seconds: float = Field(0.0, description="Wall time in s")
    engine: str
    fidelity: str
    settings_digest: str
    final_structure: Structure | None = None
    trajectory: RelaxTrajectory | None = Field(None, description="Every ionic step (stored in the data store)")


class DistortionSummary(BaseModel):
    """Energy vs distortion for one (defect, q), ShakeNBreak style."""

    defect: str
    charge: int
    energies: dict[str, float] = Field(description="Distortion label → final energy in eV (successful runs only)")
    relative_energies: dict[str, float] = Field(description="Distortion label → energy relative to Unperturbed, eV")
    status: dict[str, str] = Field(description="Distortion label → converged / unconverged / failed")
    errors: dict[str, str] = Field(default_factory=dict, description="Distortion label → failure reason")
    ground_state: str | None = Field(None, description="Lowest-energy distortion label (ShakeNBreak get_gs_distortion)")
    energy_lowering: float | None = Field(None, description="E(ground state) − E(Unperturbed) in eV (≤ 0)")
    energy_lowering_found: bool = Field(
        False, description="True when a distortion lowers the energy by more than min_e_diff (ShakeNBreak: 0.05 eV)"
    )
    min_e_diff: float = 0.05
    n_converged: int = 0
    n_failed: int = 0
    plot: str | None = Field(None, description="Path of the energy-vs-distortion PNG")


class TrainingSet(BaseModel):
    """Harvested frames of one fidelity, ready for mace-torch."""

    fidelity: str
    head: str = Field(description="MACE head name for these frames (lf / hf)")
    n_frames: int
    n_candidates: int = Field(description="Frames before filtering")
    dropped: dict[str, int] = Field(description="Reason → number of frames dropped")
    per_group: dict[str, int] = Field(description="'defect q' → frames kept")
    charges: list[int]
    extxyz: str = Field(description="The frames as extended XYZ text (stored in the data store)")
