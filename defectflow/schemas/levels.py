"""Step 5c: formation energies and charge-transition levels.

Units follow ASE: energies in eV, forces in eV/Å, lengths in Å, times in s of wall clock."""

from __future__ import annotations

from pydantic import BaseModel, Field

from defectflow.schemas.core import MSONDict, Structure

__all__ = ["LevelEntry", "TransitionLevel", "LevelsResult"]


class LevelEntry(BaseModel):
    """Input for one (defect, q): the high-fidelity total energy of its ground state."""

    defect: str
    charge: int
    energy: float = Field(description="High-fidelity total energy of the defect supercell in eV")
    structure: Structure = Field(description="Ground-state structure")
    defect_entry: MSONDict = Field(
        description="doped DefectEntry (or its as_dict) from the generation step"
    )


class TransitionLevel(BaseModel):
    """One CTL. doped reports levels with the Fermi level in [VBM − 1 eV, CBM + 1 eV]."""

    defect: str
    q_from: int = Field(description="Charge state stable below the level (Fermi level lower)")
    q_to: int = Field(description="Charge state stable above the level")
    level: float = Field(description="ε(q_from/q_to) in eV above the VBM")
    in_gap: bool


class LevelsResult(BaseModel):
    """Formation energies and charge-transition levels."""

    vbm: float = Field(description="VBM used as the Fermi-level zero, eV (HF engine scale)")
    band_gap: float = Field(description="Band gap in eV")
    correction_scheme: str = Field(description="Finite-size correction actually applied")
    dielectric: float | None = Field(None, description="Scalar dielectric constant used for the correction")
    corrections: dict[str, float] = Field(default_factory=dict, description="'defect q' → correction in eV")
    transition_levels: list[TransitionLevel] = Field(default_factory=list)
    formation_energies_vbm: dict[str, float] = Field(
        default_factory=dict,
        description="'defect q' → formation energy in eV at E_F = VBM (μ: user values, or the bulk energy per "
        "atom for an elemental host; omitted otherwise, see notes)",
    )
    chemical_potentials: dict[str, float] | None = None
    plot: str | None = Field(None, description="Formation-energy diagram PNG")
    notes: list[str] = Field(default_factory=list)
