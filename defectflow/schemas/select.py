"""Step 3a: the frames chosen for high-fidelity single points.

Units follow ASE: energies in eV, forces in eV/Å, lengths in Å, times in s of wall clock."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from defectflow.schemas.core import Frame, group_key

__all__ = ["SelectedFrame", "Selection"]


class SelectedFrame(BaseModel):
    """One low-fidelity frame chosen for a high-fidelity single point, with why it was chosen.

    ``frame`` keeps the LF structure, energy and forces, so the HF job and Δ-learning later have LF labels at
    exactly the same geometry.
    """

    defect: str = Field(description="Defect name without charge (v_Si)")
    charge: int = Field(description="Charge state q in e")
    distortion: str = Field(description="ShakeNBreak label of the relaxation the frame comes from")
    bond_distortion: float | None = Field(None, description="Bond distortion fraction of that relaxation, if any")
    relax_status: str = Field(description="Outcome of that relaxation: converged | unconverged | failed")
    step: int = Field(description="Ionic step index of the frame within its relaxation (0 = starting structure)")
    is_final: bool = Field(description="Whether the frame is the last successful step of its relaxation")
    frame: Frame = Field(description="The LF frame: structure (Å), LF energy (eV) and forces (eV/Å)")
    reason: str = Field(description="Why this frame was chosen, in words")
    order: int = Field(description="Position in the order of choice (0 = chosen first)")

    @property
    def group(self) -> str:
        return group_key(self.defect, self.charge)

    @property
    def lf_energy(self) -> float:
        """LF total energy in eV."""
        return float(self.frame.energy)


class Selection(BaseModel):
    """Frames chosen for high-fidelity single points within ``budget``, covering every (defect, q)."""

    strategy: str = Field(description="Name of the strategy that chose the frames (minima, fps, stratified, ...)")
    seed: int = Field(description="Random seed used")
    budget: int = Field(description="Maximum number of frames (HF single points) allowed")
    n_candidates: int = Field(description="Successful LF frames (energy present, SCF converged) considered")
    n_chosen: int = Field(description="Number of frames chosen (≤ budget)")
    per_group: dict[str, int] = Field(description="'defect q' (e.g. 'v_Si +1') → frames chosen")
    per_group_candidates: dict[str, int] = Field(description="'defect q' → candidate frames available")
    warnings: list[str] = Field(
        default_factory=list,
        description="Groups below per_group_min (too few candidates), records skipped, budget left unused ...",
    )
    settings: dict[str, Any] = Field(default_factory=dict, description="The SelectionSpec used, as a dict")
    chosen: list[SelectedFrame] = Field(
        description="The chosen frames in order of choice (stored in the data store)"
    )

    def keys(self) -> list[tuple[str, int, str, int]]:
        """(defect, q, distortion, step) of every chosen frame: a compact identity for comparisons."""
        return [(c.defect, c.charge, c.distortion, c.step) for c in self.chosen]
