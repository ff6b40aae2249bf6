"""Step 3b: high-fidelity labels of the selected frames, and the bulk reference.

Units follow ASE: energies in eV, forces in eV/Å, lengths in Å, times in s of wall clock."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from defectflow.schemas.core import Frame

__all__ = ["LabelledSet", "BulkReference"]


class LabelledSet(BaseModel):
    """High-fidelity labels of the selected frames."""

    fidelity: str = "high"
    head: str = "hf"
    n_requested: int = Field(description="Frames sent to the HF engine")
    n_labelled: int = Field(description="Frames with a successful HF energy and forces")
    failed: list[dict[str, Any]] = Field(default_factory=list, description="defect, charge, distortion, step, error")
    per_group: dict[str, int] = Field(default_factory=dict, description="'defect q' → HF frames")
    hf_seconds: float = Field(0.0, description="Sum of HF wall times in s")
    cpu_seconds: float = Field(0.0, description="CPU seconds of the calculations (when measured: the top-up job)")
    frames: list[Frame] = Field(default_factory=list, description="The HF frames (data store)")
    extxyz: str = Field("", description="HF frames as extxyz: REF_* = HF labels, LF_* = LF labels (data store)")

    @property
    def hf_calls(self) -> int:
        """HF calculations made (the job's cost record)."""
        return self.n_requested


class BulkReference(BaseModel):
    """The pristine supercell at both fidelities: reference energies and (HF) band edges."""

    natoms: int
    energy_lf: float | None = Field(None, description="LF total energy of the bulk supercell in eV")
    energy_hf: float | None = Field(None, description="HF total energy of the bulk supercell in eV")
    vbm: float | None = Field(None, description="HF valence-band maximum in eV (HF engine's scale)")
    cbm: float | None = Field(None, description="HF conduction-band minimum in eV")
    band_gap: float | None = Field(None, description="HF band gap in eV (Γ-only supercell sampling unless set)")
    vbm_lf: float | None = Field(None, description="LF valence-band maximum in eV, when reported")
    band_gap_lf: float | None = Field(None, description="LF band gap in eV, when reported")
    hf_seconds: float = Field(0.0, description="Wall seconds of the bulk HF single point")
    errors: list[str] = Field(default_factory=list)
