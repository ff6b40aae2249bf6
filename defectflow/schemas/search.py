"""Step 5: surrogate searches, HF verifications and the campaign result.

Units follow ASE: energies in eV, forces in eV/Å, lengths in Å, times in s of wall clock."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from defectflow.schemas.core import Frame, Structure
from defectflow.schemas.levels import LevelsResult

__all__ = ["SearchStart", "Minimum", "PathFrame", "SearchResult", "Verification", "GroupVerification",
           "KeptGroundState", "TopUpFrame", "RoundRecord", "GroundStateRecord", "CampaignResult"]


class SearchStart(BaseModel):
    label: str = Field(description="ShakeNBreak label, or '<label>+rattle<k>' for an extra start")
    bond_distortion: float | None = None
    structure: Structure


class Minimum(BaseModel):
    """A distinct local minimum found by the surrogate."""

    energy: float = Field(description="Surrogate energy in eV")
    structure: Structure
    labels: list[str] = Field(description="Starts that relaxed into this minimum")
    relative_energy: float = Field(0.0, description="Energy above the lowest minimum in eV")
    energy_std: float | None = Field(
        None, description="Committee standard deviation of the energy here relative to the search's other minima "
        "(each member's mean over them removed: a member's constant offset changes no ranking), eV")
    force_std: float | None = Field(
        None, description="Committee uncertainty of the forces here: the largest per-atom standard deviation, eV/Å")


class PathFrame(BaseModel):
    """A structure along a surrogate relaxation path, with its committee uncertainty: a top-up candidate."""

    label: str = Field(description="Start whose relaxation passed through it")
    step: int = Field(description="FIRE step of that relaxation")
    structure: Structure
    energy: float = Field(description="Surrogate energy in eV")
    energy_std: float = Field(description="Committee standard deviation of the energy relative to the search's "
                              "other path frames (each member's mean removed), eV")
    force_std: float = Field(description="Largest per-atom committee standard deviation of the force, eV/Å: what "
                             "ranks top-up candidates")


class SearchResult(BaseModel):
    """Surrogate search outcome for one (defect, q)."""

    defect: str
    charge: int
    model: str = Field(description="What relaxed the starts (e.g. 'mace:hf', 'chgnet')")
    n_starts: int
    n_failed: int = 0
    landscape: dict[str, float] = Field(description="Start label → final surrogate energy in eV")
    unconverged: list[str] = Field(default_factory=list, description="Starts that hit the step limit")
    rejected: dict[str, float] = Field(
        default_factory=dict, description="Starts whose minimum was rejected as unphysical → its shortest "
        "interatomic distance in Å (below min_distance_factor × covalent-radius sum)"
    )
    minima: list[Minimum] = Field(description="Distinct minima, lowest first")
    ground_state: Minimum | None = None
    ground_state_label: str | None = None
    wall_seconds: float = 0.0
    structures_per_second: float = Field(0.0, description="Relaxed starts per second of wall time")
    plot: str | None = None
    committee_size: int = Field(1, description="Models whose spread gives the uncertainties (1: none)")
    landscape_std: dict[str, float] = Field(
        default_factory=dict, description="Start label → committee energy standard deviation at its minimum, eV")
    candidates: list[PathFrame] = Field(
        default_factory=list, description="The most uncertain structures along the relaxation paths (at most one "
        "per start, most uncertain first): where HF single points teach the model most")


class Verification(BaseModel):
    """High-fidelity check of one surrogate ground state."""

    defect: str
    charge: int
    mode: str = Field(description="single_point, relax or refine (VerifySpec.mode)")
    ground_state_label: str | None = Field(None, description="Start that led to the surrogate ground state")
    structure: Structure | None = Field(None, description="Verified ground-state structure (HF-relaxed in relax mode)")
    hf_max_force: float | None = Field(None, description="Largest atomic HF force at the verified structure, eV/Å "
                                       "(0 at an HF minimum; refine stops at ≤ verify.fmax)")
    surrogate_energy: float | None = Field(None, description="Surrogate (HF head) energy in eV")
    hf_energy: float | None = Field(None, description="HF energy in eV at the verified structure")
    error_mev_per_atom: float | None = Field(None, description="|E_HF − E_surrogate| in meV/atom at the surrogate minimum")
    agrees: bool = Field(False, description="error below verify.energy_threshold")
    rmsd_to_hf_relaxed: float | None = Field(None, description="RMSD surrogate minimum vs HF-relaxed (relax) or "
                                             "HF-refined (refine) ground state, Å")
    rmsd_success: bool | None = Field(None, description="rmsd_to_hf_relaxed ≤ verify.rmsd_threshold")
    hf_frame: Frame | None = Field(None, description="HF single point at the surrogate minimum")
    lf_frame: Frame | None = Field(None, description="LF single point at the same geometry (top-up data)")
    hf_seconds: float = 0.0
    error: str | None = None
    role: str = Field("lowest", description="Why this minimum was verified: 'rank <k>' (k-th lowest surrogate "
                      "minimum), 'most uncertain' (highest committee energy spread among the low-energy minima), "
                      "'lowest' (single-minimum verification), 'refine <n>' (n-th HF single point of "
                      "verify.mode refine), 'known HF frame'")
    energy_std: float | None = Field(None, description="Committee energy standard deviation at the minimum, eV")
    force_std: float | None = Field(None, description="Committee force uncertainty at the minimum, eV/Å")
    cpu_seconds: float = Field(0.0, description="CPU seconds of the HF (and LF) calculations, this process and "
                               "its engine subprocesses")


class GroupVerification(BaseModel):
    """The HF check of one (defect, q) in one round: the k lowest distinct surrogate minima plus the most
    uncertain low-energy one, and which structure is the ground state."""

    defect: str
    charge: int
    checks: list[Verification] = Field(description="One HF single point (or relaxation) per verified minimum")
    ground_state: Verification | None = Field(
        None, description="The check with the lowest HF energy, or the known HF structure that is lower still")
    source: str = Field("verified minimum", description="'verified minimum', or 'known HF frame' when a structure "
                        "whose HF energy was already known (an HF single point of the selection or of an earlier "
                        "round) is lower in HF energy than every verified minimum")
    reason: str | None = Field(None, description="Why the ground state is what it is, when not simply the "
                               "lowest verified minimum")
    relaxations: int = Field(0, description="HF relaxations made (verify.mode relax), each counted as one HF call")
    refine_exhausted: bool = Field(
        False, description="verify.mode refine: the refinement stopped for want of HF calls with the HF max force "
        "still above verify.fmax (verify.refine_leftover may go on from there)")
    refine_radius: float | None = Field(
        None, description="verify.mode refine: the trust radius (largest atomic move, Å) the refinement's next step "
        "would take; a continuation (verify.refine_leftover) starts with it, so that it does not repeat the steps "
        "already rejected")

    @property
    def hf_calls(self) -> int:
        """HF calculations made: one single point per check, plus the relaxation of verify.mode relax."""
        return len(self.checks) + self.relaxations

    @property
    def hf_seconds(self) -> float:
        return sum(c.hf_seconds for c in self.checks)

    @property
    def cpu_seconds(self) -> float:
        return sum(c.cpu_seconds for c in self.checks)


class RefineLeftover(BaseModel):
    """verify.refine_leftover: the round's verifications, where a refinement ran out of HF calls continued with the
    HF calls the other (defect, q) left unspent."""

    verifications: list[GroupVerification] = Field(description="Every (defect, q) of the round, in order")
    continued: list[str] = Field(default_factory=list, description="The (defect, q) refined further, in order")
    hf_calls: int = Field(0, description="HF single points this continuation made")


class KeptGroundState(BaseModel):
    """Per (defect, q), the verified surrogate minimum with the lowest HF energy over the rounds so far."""

    round: int = Field(description="Search round whose minimum this is")
    n_minima: int = Field(description="Distinct minima of that round's search")
    landscape: dict[str, float] = Field(description="Start label → surrogate energy of that round's search, eV")
    plot: str | None = Field(None, description="That search's landscape PNG")
    verification: Verification = Field(description="Its HF verification (without the HF/LF frames)")
    source: str = Field("verified minimum", description="'verified minimum' or 'known HF frame' (GroupVerification)")
    reason: str | None = Field(None, description="Why, when not simply the lowest verified minimum")


class TopUpFrame(BaseModel):
    """One HF-labelled frame a round added to the training set, and why."""

    group: str = Field(description="'defect q'")
    label: str = Field(description="Start (and FIRE step) it comes from")
    reason: str = Field(description="'uncertain path frame', 'verified minimum, |ΔE| above threshold' or "
                        "'refine point, |ΔE| above threshold' (verify.mode refine)")
    energy_std: float | None = Field(None, description="Committee energy standard deviation there, eV")
    force_std: float | None = Field(None, description="Committee force uncertainty there, eV/Å")
    error_mev_per_atom: float | None = Field(None, description="|E_HF − E_surrogate| there, meV/atom (when known)")


class RoundRecord(BaseModel):
    """What one search-and-verify round found, what it cost and what it added."""

    round: int
    errors_mev_per_atom: dict[str, float | None] = Field(
        description="'defect q' → |E_HF − E_surrogate| at the surrogate ground state, meV/atom")
    disagreeing: list[str] = Field(description="'defect q' groups above verify.energy_threshold (with an LF frame)")
    retrained: bool = Field(description="Whether a top-up round followed")
    verified: dict[str, list[dict[str, Any]]] = Field(
        default_factory=dict, description="'defect q' → every verified minimum: label, role, surrogate and HF "
        "energy (eV), error (meV/atom), committee energy std (eV)")
    ground_states: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="'defect q' → the round's ground state: label, HF energy (eV), source")
    changed: list[str] = Field(default_factory=list, description="'defect q' whose ground state differs from the "
                               "previous round's")
    added: list[TopUpFrame] = Field(default_factory=list, description="Frames added to the HF training set before "
                                    "this round, whose model they trained, and why (empty for round 0)")
    not_trained: list[dict[str, Any]] = Field(
        default_factory=list, description="Verified minima above the threshold that the top-up left out of training "
        "(group, label, reason: the LF harvest's force and energy thresholds)")
    hf_calls: int = Field(0, description="HF calculations of this round: verifications + top-up single points")
    hf_seconds: float = Field(0.0, description="Their wall seconds")
    hf_cpu_seconds: float = Field(0.0, description="Their CPU seconds (this process and engine subprocesses)")
    hf_calls_total: int = Field(0, description="HF calculations of the campaign so far, this round included")
    stop_reason: str | None = Field(None, description="Why no further round followed (None: one did)")


class GroundStateRecord(BaseModel):
    """Per (defect, q): what a user queries."""

    defect: str
    charge: int
    ground_state_label: str | None = Field(None, description="ShakeNBreak start that led to the ground state")
    structure: Structure | None = None
    surrogate_energy: float | None = Field(None, description="eV")
    hf_energy: float | None = Field(None, description="eV")
    verification_error_mev_per_atom: float | None = None
    rmsd_to_hf_relaxed: float | None = Field(None, description="Surrogate minimum vs HF-relaxed/refined ground "
                                             "state, Å (verify.mode relax or refine)")
    hf_max_force: float | None = Field(None, description="Largest atomic HF force at the ground state, eV/Å")
    n_minima: int = 0
    landscape: dict[str, float] = Field(default_factory=dict, description="Start label → surrogate energy, eV")
    landscape_plot: str | None = None
    round: int | None = Field(None, description="Search round whose verified minimum this is: the lowest HF energy "
                              "over all rounds is kept (a top-up round can make the surrogate worse)")
    baseline_rmsd: float | None = Field(None, description="Foundation-model ground state vs this one, Å")
    baseline_label: str | None = None
    source: str = Field("verified minimum", description="'verified minimum' or 'known HF frame' (GroupVerification)")
    reason: str | None = Field(None, description="Why, when the ground state is not the lowest verified minimum")
    energy_std: float | None = Field(None, description="Committee energy standard deviation at the ground state, eV")
    force_std: float | None = Field(None, description="Committee force uncertainty at the ground state, eV/Å")


class CampaignResult(BaseModel):
    """Everything the campaign produced, in one document."""

    campaign: str
    ground_states: list[GroundStateRecord]
    levels: LevelsResult | None = None
    levels_error: str | None = None
    rounds: list[RoundRecord] = Field(default_factory=list, description="Per verification round: disagreements")
    model_comparison: list[dict[str, Any]] = Field(default_factory=list, description="Training metrics, main first")
    hf_calls: int = Field(0, description="HF calculations: bulk + selected single points + verifications")
    n_hf_selected: int = Field(0, description="Frames selected for HF single points (step 3)")
    hf_seconds: float = Field(0.0, description="Wall seconds of the HF calculations counted in hf_calls")
    hf_cpu_seconds: float = Field(0.0, description="CPU seconds of the verification and top-up HF calculations "
                                  "(those of the bulk and the selection are in the step costs)")
    plots: dict[str, str] = Field(default_factory=dict)
