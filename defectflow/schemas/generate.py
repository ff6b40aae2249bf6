"""Step 1: the defects, charge states and ShakeNBreak starting structures of a campaign.

Units follow ASE: energies in eV, forces in eV/Å, lengths in Å, times in s of wall clock."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from defectflow.schemas.core import MSONDict, Structure

__all__ = ["DistortedStructure", "DistortionSet", "GenerationResult"]


class DistortedStructure(BaseModel):
    """One starting structure for a (defect, q)."""

    label: str = Field(description="ShakeNBreak label: Unperturbed, Bond_Distortion_-30.0%, Dimer, Rattled")
    bond_distortion: float | None = Field(None, description="Bond distortion as a fraction (None: Unperturbed/Dimer/Rattled)")
    structure: Structure = Field(description="Starting structure (Å), `charge` set to q")


class DistortionSet(BaseModel):
    """Every starting structure of one (defect, q), with the information later steps need."""

    defect: str = Field(description="doped defect name without charge, e.g. v_Si")
    charge: int = Field(description="Charge state q in e")
    defect_type: str = Field(description="vacancy, substitution, interstitial or antisite")
    num_distorted_neighbours: int = Field(description="Neighbours ShakeNBreak distorts for this q")
    distorted_atoms: list[int] = Field(default_factory=list, description="Indices of the distorted neighbours")
    rattle_stdev: float | None = Field(None, description="Rattle standard deviation used, in Å")
    structures: list[DistortedStructure]
    defect_entry: MSONDict | None = Field(
        None, description="doped DefectEntry (as_dict) for this charge state, for the levels step"
    )

    @property
    def name(self) -> str:
        """doped-style name with charge, e.g. v_Si_-1 / v_Si_+1."""
        return f"{self.defect}_{self.charge:+d}" if self.charge else f"{self.defect}_0"


class GenerationResult(BaseModel):
    """Output of step 1 for a whole campaign."""

    campaign: str
    host_formula: str
    bulk_supercell: Structure = Field(description="Pristine supercell every defect lives in")
    supercell_matrix: list[list[float]] | None = Field(None, description="Supercell matrix w.r.t. doped's primitive cell")
    min_image_distance: float | None = Field(None, description="Minimum periodic image distance of the supercell in Å")
    charges: dict[str, list[int]] = Field(description="Charge states per defect")
    charge_source: dict[str, Literal["doped", "campaign"]] = Field(description="Who chose each defect's charges")
    charge_guessing_log: dict[str, Any] = Field(
        default_factory=dict, description="doped's charge-state guessing information per defect"
    )
    distortion_sets: list[DistortionSet]
    wall_seconds: float = 0.0

    @property
    def n_structures(self) -> int:
        return sum(len(d.structures) for d in self.distortion_sets)
