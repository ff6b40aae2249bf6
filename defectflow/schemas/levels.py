"""Step 5c: formation energies and charge-transition levels.

Units follow ASE: energies in eV, forces in eV/Å, lengths in Å, times in s of wall clock."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from defectflow.schemas.core import ElectrostaticPotential, MSONDict, Structure

__all__ = ["FiniteSizeCorrection", "LevelEntry", "TransitionLevel", "LevelsResult"]


class LevelEntry(BaseModel):
    """Input for one (defect, q): the high-fidelity total energy of its ground state."""

    defect: str
    charge: int
    energy: float = Field(description="High-fidelity total energy of the defect supercell in eV")
    structure: Structure = Field(description="Ground-state structure")
    defect_entry: MSONDict = Field(
        description="doped DefectEntry (or its as_dict) from the generation step"
    )
    potential: ElectrostaticPotential | None = Field(
        None, description="Electrostatic potential of this HF calculation (for the eFNV/FNV corrections), if recorded"
    )


class FiniteSizeCorrection(BaseModel):
    """The finite-size correction of one (defect, q) and its parts (doped's eFNV / FNV, or the image charge)."""

    scheme: Literal["efnv", "fnv", "image_charge", "none"] = Field(
        description="efnv: Kumagai–Oba (doped get_kumagai_correction); fnv: Freysoldt–Neugebauer–Van de Walle "
        "(doped get_freysoldt_correction); image_charge: first-order Makov–Payne; none"
    )
    energy: float = Field(description="Correction added to the defect's energy (and formation energy), in eV")
    point_charge: float | None = Field(
        None, description="Screened point-charge (lattice) term in eV: eFNV's 'pc term', FNV's electrostatic term, "
        "or the whole image-charge correction"
    )
    alignment: float | None = Field(
        None, description="Potential-alignment term in eV (eFNV: −q × mean site-potential difference outside the "
        "defect region; FNV: from the planar averages far from the defect)"
    )
    error: float | None = Field(
        None, description="doped's error estimate in eV: the spread of the potential difference in the sampling "
        "region × |q| (eFNV: standard error of the mean over sites; FNV: mean standard deviation over the axes)"
    )
    sampled_sites: int | None = Field(
        None, description="eFNV: sites outside the defect region (Wigner–Seitz radius) that set the alignment"
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
    correction_scheme: str = Field(description="Finite-size correction actually applied: efnv, fnv, image_charge or "
                                   "none (the same for every entry)")
    correction_reason: str = Field("", description="Why that scheme: what levels.correction asked for and, for auto, "
                                   "which potentials were (not) there")
    dielectric: float | None = Field(None, description="Scalar dielectric constant used for the correction (None when "
                                     "a 3×3 tensor went to doped's eFNV/FNV as it is)")
    corrections: dict[str, float] = Field(default_factory=dict, description="'defect q' → correction in eV")
    correction_details: dict[str, FiniteSizeCorrection] = Field(
        default_factory=dict, description="'defect q' → the correction's scheme, terms and error estimate (eV)"
    )
    transition_levels: list[TransitionLevel] = Field(default_factory=list)
    formation_energies_vbm: dict[str, float] = Field(
        default_factory=dict,
        description="'defect q' → formation energy in eV at E_F = VBM (μ: user values, or the bulk energy per "
        "atom for an elemental host; omitted otherwise, see notes)",
    )
    chemical_potentials: dict[str, float] | None = None
    plot: str | None = Field(None, description="Formation-energy diagram PNG")
    notes: list[str] = Field(default_factory=list)
