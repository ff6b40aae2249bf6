"""The campaign: everything a user decides, from YAML or Python, validated with field-named errors.

A campaign says which host and defects to study, how to distort them (ShakeNBreak), which levels of theory are
"low" (cheap, e.g. PBE) and "high" (e.g. HSE06), how many high-fidelity calculations may be spent, how to train
the MACE surrogate, and where to store results.

>>> from defectflow.campaign import Campaign
>>> c = Campaign.from_yaml("workflows/quickstart.yaml")          # doctest: +SKIP
>>> c.fidelities.high.engine                                      # doctest: +SKIP
'qe'

Every invalid input raises :class:`CampaignError` whose message is one line per problem, naming the field
(dotted path, e.g. ``fidelities.low.ecutwfc``) and what was expected.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)
from pymatgen.core import Structure

from defectflow.engines import SETTINGS, AseSettings, CP2KSettings, QESettings, VaspSettings
from defectflow.steps import RESOURCE_STEPS

__all__ = [
    "Campaign",
    "CampaignError",
    "HostSpec",
    "SupercellSpec",
    "DefectsSpec",
    "DistortionsSpec",
    "FidelitiesSpec",
    "RelaxSpec",
    "SelectionSpec",
    "MlipSpec",
    "SearchSpec",
    "VerifySpec",
    "LevelsSpec",
    "ExecutionSpec",
    "ResourceSpec",
    "DEFECT_KINDS",
]

#: Defect kinds accepted in ``defects.include`` besides explicit doped names.
DEFECT_KINDS = ("vacancies", "antisites", "substitutions", "interstitials", "all")
#: Charge states must fit the MACE categorical charge embedding (21 classes, offset 10).
MAX_ABS_CHARGE = 10

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# doped names: v_Si, Si_i, Se_Sb, Sb_i_C2v, v_Se_1, Cu_Zn_Cs1.90 ...
_DEFECT_NAME_RE = re.compile(r"^(v_[A-Z][a-z]?|[A-Z][a-z]?_(i|[A-Z][a-z]?))([_.][A-Za-z0-9_.\-]+)?$")


class CampaignError(ValueError):
    """An invalid campaign. ``problems`` holds one ``"field.path: what was expected"`` string per problem."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__("\n".join(prefix + p for p in problems))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, arbitrary_types_allowed=True)


# ---------------------------------------------------------------------------------------------------------------
# host and defects
# ---------------------------------------------------------------------------------------------------------------
class SupercellSpec(_Section):
    """How doped builds the defect supercell (``DefectsGenerator(supercell_gen_kwargs=...)``)."""

    min_image_distance: float = Field(10.0, gt=0, description="Minimum distance between periodic images of a defect in Å")
    min_atoms: int = Field(50, ge=1, description="Minimum number of atoms in the supercell")
    force_diagonal: bool = Field(False, description="Only diagonal expansions of the primitive/conventional cell")
    matrix: list[list[int]] | None = Field(
        None, description="Explicit 3×3 supercell matrix of the input cell (overrides the two criteria above)"
    )

    @field_validator("matrix")
    @classmethod
    def _is_3x3(cls, v):
        if v is not None and (len(v) != 3 or any(len(r) != 3 for r in v)):
            raise ValueError("expected a 3×3 integer matrix, e.g. [[2,0,0],[0,2,0],[0,0,2]]")
        return v


class HostSpec(_Section):
    """The pristine host crystal."""

    structure: Any = Field(
        ..., description="Structure file (POSCAR, CIF, extxyz...; relative to the campaign file) or a pymatgen Structure"
    )
    supercell: SupercellSpec = Field(default_factory=SupercellSpec, description="Defect supercell options")
    oxidation_states: dict[str, int] | None = Field(
        None, description="Oxidation states for charge guessing and distorted-neighbour counts, e.g. {Sb: 3, Se: -2}"
    )

    @field_validator("structure")
    @classmethod
    def _structure_kind(cls, v):
        if isinstance(v, Structure):
            return v
        if isinstance(v, dict) and v.get("@class") == "Structure":
            return Structure.from_dict(v)
        if isinstance(v, (str, Path)):
            if not str(v).strip():
                raise ValueError("expected a path to a structure file, got an empty string")
            return str(v)
        raise ValueError(f"expected a path to a structure file or a pymatgen Structure, got {type(v).__name__}")

    @field_serializer("structure")
    def _serialise_structure(self, v):
        return v.as_dict() if isinstance(v, Structure) else v


class DefectsSpec(_Section):
    """Which defects doped generates. ``include`` takes doped names (v_Si, Si_i, Se_Sb...) and/or kinds."""

    include: list[str] = Field(
        default_factory=lambda: ["vacancies"],
        description="doped defect names (e.g. v_Sb, Sb_Se) and/or kinds: " + ", ".join(DEFECT_KINDS),
    )
    extrinsic: list[str] = Field(default_factory=list, description="Extrinsic elements for substitutions/interstitials")
    interstitials: bool = Field(
        False, description="Generate interstitial sites (Voronoi; slow and many) when kinds include them"
    )
    charge_padding: int = Field(1, ge=0, le=4, description="doped charge-state guessing padding around the ionic charge")

    @field_validator("include")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("expected at least one defect name or kind")
        bad = [n for n in v if n not in DEFECT_KINDS and not _DEFECT_NAME_RE.match(n)]
        if bad:
            raise ValueError(
                f"{bad[0]!r} is neither a doped defect name (like v_Si, Si_i, Se_Sb) nor a kind "
                f"({', '.join(DEFECT_KINDS)})"
            )
        return v

    @field_validator("extrinsic")
    @classmethod
    def _elements(cls, v: list[str]) -> list[str]:
        from pymatgen.core.periodic_table import Element

        for el in v:
            if not Element.is_valid_symbol(el):
                raise ValueError(f"{el!r} is not a chemical element symbol")
        return v


ChargeList = list[int]


class DistortionsSpec(_Section):
    """ShakeNBreak options (``Distortions(...)``). Bond distortions are fractions: -0.3 = 30 % compression."""

    distortion_increment: float = Field(
        0.1, gt=0, le=0.6, description="Step of the default bond-distortion grid −0.6…+0.6 (fraction)"
    )
    bond_distortions: list[float] | None = Field(
        None, description="Explicit bond distortions as fractions (e.g. [-0.3, 0.0, 0.3]); replaces the grid"
    )
    dimer: bool = Field(True, description="Add ShakeNBreak's Dimer distortion for vacancies")
    rattle_stdev: float | None = Field(
        None, gt=0, le=1.0, description="Rattle standard deviation in Å (default: ShakeNBreak, 10 % of the bulk bond length)"
    )
    d_min: float | None = Field(None, gt=0, description="Minimum interatomic distance for rattling in Å (default: ShakeNBreak)")
    local_rattle: bool = Field(False, description="Rattle amplitude decaying away from the defect")
    seed: int = Field(42, description="Rattle random seed (ShakeNBreak adds the distortion to it)")
    max_structures: int | None = Field(
        None, ge=1, description="Keep at most this many distortions per (defect, q), evenly spread (quick runs)"
    )
    options: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments for ShakeNBreak Distortions")

    @field_validator("bond_distortions")
    @classmethod
    def _fractions(cls, v):
        if v is None:
            return v
        if not v:
            raise ValueError("expected at least one bond distortion, or null for the default grid")
        bad = [x for x in v if not -1.0 < x <= 1.0]
        if bad:
            raise ValueError(
                f"expected fractions between -1 and 1 (e.g. -0.3 for -30 %), got {bad[0]}"
            )
        return v


FidelitySpec = Annotated[
    Union[QESettings, CP2KSettings, VaspSettings, AseSettings],
    Field(discriminator="engine"),
]


class FidelitiesSpec(_Section):
    """Levels of theory. ``low`` relaxes every distortion (training data); ``high`` labels a selected few."""

    low: FidelitySpec = Field(
        default_factory=lambda: CP2KSettings(xc="PBE"), description="Low fidelity (default: CP2K PBE)"
    )
    high: FidelitySpec = Field(
        default_factory=lambda: QESettings(xc="HSE06"), description="High fidelity (default: QE HSE06)"
    )


# ---------------------------------------------------------------------------------------------------------------
# steps
# ---------------------------------------------------------------------------------------------------------------
class RelaxSpec(_Section):
    """Low-fidelity relaxation of every distorted structure (fixed cell)."""

    fmax: float = Field(0.05, gt=0, description="Force convergence threshold in eV/Å")
    max_steps: int = Field(100, ge=1, description="Maximum ionic steps per relaxation")
    keep_every: int = Field(1, ge=1, description="Keep every n-th ionic step as training data (first and last always)")


class SelectionSpec(_Section):
    """Choice of frames for high-fidelity single points."""

    strategy: Literal["minima", "fps", "stratified"] = Field(
        "minima",
        description="minima: lowest distinct LF minima per (defect, q); fps: farthest-point sampling in descriptor "
        "space; stratified: energy-stratified along trajectories",
    )
    budget: int = Field(40, ge=1, description="Total number of high-fidelity single points")
    per_group_min: int = Field(1, ge=1, description="At least this many HF frames per (defect, q)")
    per_group_max: int | None = Field(None, ge=1, description="At most this many HF frames per (defect, q)")
    max_energy_above_min: float | None = Field(
        None, gt=0, description="Frames more than this above the lowest frame of their (defect, q) are not "
        "candidates, eV/atom (the harvest's filter is 1.0: HF labels then fall where the LF training frames are); "
        "None: every frame"
    )
    max_force: float | None = Field(
        None, gt=0, description="Frames with an atomic force above this are not candidates, eV/Å (the harvest's "
        "filter is 20); None: every frame"
    )
    seed: int = Field(0, description="Random seed (selection is deterministic for a seed)")
    # -- minima ---------------------------------------------------------------------------------------------------
    energy_tolerance: float = Field(
        0.01, ge=0,
        description="minima: two relaxation end points are the same minimum when their LF energies differ by at most "
        "this (eV, total energy of the cell) AND pymatgen's StructureMatcher matches them",
    )
    match_ltol: float = Field(
        0.2, gt=0, description="minima: StructureMatcher fractional length tolerance ltol (pymatgen default 0.2)"
    )
    match_stol: float = Field(
        0.1, gt=0,
        description="minima: StructureMatcher site tolerance stol, a fraction of (V/N)^(1/3): 0.1 lets no atom "
        "differ by more than ≈ 0.28 Å in Si (pymatgen's default 0.3, ≈ 0.8 Å, merges distinct reconstructions)",
    )
    match_angle_tol: float = Field(
        5.0, gt=0, description="minima: StructureMatcher angle tolerance in degrees (pymatgen default 5°)"
    )
    # -- fps ------------------------------------------------------------------------------------------------------
    soap_r_cut: float = Field(5.0, gt=0, description="fps: SOAP cutoff radius in Å (dscribe r_cut)")
    soap_n_max: int = Field(6, ge=1, description="fps: SOAP number of radial basis functions (dscribe n_max)")
    soap_l_max: int = Field(4, ge=0, description="fps: SOAP maximum spherical-harmonic degree (dscribe l_max)")
    soap_sigma: float = Field(0.5, gt=0, description="fps: SOAP Gaussian width of the atomic densities in Å")
    fps_within_group: bool = Field(
        True,
        description="fps: measure the distance of a candidate to the frames already chosen for its own (defect, q) "
        "only (True: the same geometry at another charge is new information) or to all chosen frames (False)",
    )
    # -- stratified -----------------------------------------------------------------------------------------------
    strata: int | None = Field(
        None, ge=1,
        description="stratified: number of equal-width energy bins between a group's lowest and highest candidate "
        "energy (None: as many bins as frames the group receives)",
    )


class MlipSpec(_Section):
    """The MACE surrogate (mace-torch).

    The defaults are the recipe issue #13's training study chose by measurement on the frozen benchmark
    (``benchmarks/training.py``, docs/benchmarks.md "Training study"): ``finetune`` (an LF model, then fine-tuned on
    the HF frames, per-(fidelity, q) references removed), ``32x0e + 32x1o``, 2 interactions, correlation 2,
    r_max 4.5 Å, float32, batch 8, lr 0.01, EMA 0.99, ReduceLROnPlateau patience 5, energy and force weights 100,
    30 epochs (LF model and fine-tuning each). Sized for 2 CPU cores; give a production campaign on a GPU a larger
    model and more epochs."""

    multi_fidelity: Literal["multihead", "delta", "finetune", "replay"] = Field(
        "finetune", description="multihead: shared body, LF and HF heads, trained together from scratch; delta: an "
        "LF model plus a model of HF − LF; finetune: an LF model, then fine-tuned on the HF frames (mace "
        "--foundation_model, naive); replay: the same with the LF frames replayed as a second head (mace multi-head "
        "fine-tuning)"
    )
    hf_weight: float = Field(
        1.0, gt=0, description="Loss weight of each HF frame relative to an LF frame (mace config_weight: energy and "
        "forces). mace pools every head's frames into one shuffled set, so a few HF frames among hundreds of LF ones "
        "are otherwise a small part of the loss (multihead and replay)"
    )
    charge_references: bool = Field(
        False, description="Subtract per-(fidelity, q) reference energies (least squares E ≈ Σ n_Z e0(Z) + c(q)) "
        "before training and add them back at prediction, so the model learns only what LF and HF share. Always on "
        "for finetune and replay (see defectflow.train.surrogate)"
    )
    energy_weight_scale: float | None = Field(
        None, gt=0, description="Frame weights max(floor, exp(−ΔE/scale)), ΔE = energy above the lowest frame of "
        "the same fidelity and q, in eV/atom; None: uniform weights"
    )
    energy_weight_floor: float = Field(0.1, gt=0, le=1, description="Lowest frame weight with energy_weight_scale")
    ema_decay: float | None = Field(
        0.99, gt=0, lt=1, description="Exponential moving average of the weights (mace --ema); None: off"
    )
    scheduler_patience: int = Field(
        5, ge=1, description="Epochs without validation improvement before the learning rate is multiplied by 0.8 "
        "(mace ReduceLROnPlateau)"
    )
    patience: int | None = Field(
        None, ge=1, description="Stop training after this many epochs without improvement of the validation loss "
        "(the last head's: hf), max_epochs (finetune_epochs) being the cap; None: train every epoch. The model kept "
        "is the best-validation checkpoint either way"
    )
    default_dtype: Literal["float64", "float32"] = Field(
        "float32", description="Floating-point precision of training and of the trained model (mace --default_dtype)"
    )
    finetune_lr: float = Field(1e-3, gt=0, description="Learning rate of the HF fine-tuning (finetune, replay)")
    finetune_epochs: int = Field(30, ge=1, description="Epochs of the HF fine-tuning (finetune, replay)")
    finetune_min_frames: int = Field(
        128, ge=1, description="finetune: the HF training frames are repeated up to at least this many per epoch, "
        "so that a handful of frames still gets enough optimiser steps (mace replay duplicates them likewise)"
    )
    charge_embedding: bool = Field(True, description="Condition on the total charge q (embedding_specs total_charge)")
    embedding_readout: bool = Field(
        True, description="Add the charge-dependent energy readout (use_embedding_readout): charged cells differ by "
        "eV per q, which a charge-dependent readout captures directly"
    )
    r_max: float = Field(4.5, gt=0, description="Cutoff radius in Å")
    pair_repulsion: bool = Field(
        True, description="Add MACE's ZBL pair repulsion (mace_run_train --pair_repulsion) so that atoms the "
        "training data never brought close cannot collapse onto each other in the surrogate search"
    )
    hidden_irreps: str = Field("32x0e + 32x1o", description="MACE hidden irreps (model size)")
    num_interactions: int = Field(2, ge=1)
    correlation: int = Field(2, ge=1)
    max_L: int = Field(1, ge=0)
    max_epochs: int = Field(30, ge=1, description="Training epochs")
    batch_size: int = Field(8, ge=1)
    lr: float = Field(0.01, gt=0, description="Learning rate")
    hf_test_fraction: float = Field(0.2, ge=0, lt=1, description="Fraction of HF frames held out for testing")
    seed: int = Field(1)
    device: Literal["cpu", "cuda", "auto"] = Field("auto", description="Training device (auto: cuda when available)")
    committee: int = Field(
        3, ge=1, description="Models trained (the main one + committee − 1 with other seeds and splits): their "
        "spread is the uncertainty that drives verification and top-up (1: no uncertainty)")
    ablations: list[Literal["no_charge", "hf_only", "lf_only"]] = Field(
        default_factory=list, description="Extra models trained side by side for comparison"
    )
    valid_fraction: float = Field(
        0.1, gt=0, lt=1, description="Fraction of the LF frames and of the non-test HF frames used for validation "
        "(at least 1 frame each)"
    )
    energy_weight: float = Field(100.0, ge=0, description="Weight of the energy term of the loss (mace energy_weight)")
    forces_weight: float = Field(100.0, ge=0, description="Weight of the force term of the loss (mace forces_weight)")
    num_threads: int | None = Field(
        None, ge=1, description="CPU threads of the training process (OMP_NUM_THREADS); None: the environment's "
        "OMP_NUM_THREADS, or 1 when unset and training on cpu (small models train ~50x faster than with 2 "
        "contended threads)"
    )
    parallel: int | None = Field(
        None, ge=1, description="Models trained at once (the committee members and, in round 0, the ablations), "
        "each in its own mace_run_train process (None: on cpu as many as the CPU cores hold at num_threads each, at "
        "most the models to train; on a GPU 1)"
    )
    extra_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra mace_run_train options, e.g. {ema: null, ema_decay: 0.995}; a null value passes a bare "
        "flag (store_true options)",
    )


class SearchSpec(_Section):
    """Surrogate ground-state search."""

    extra_starts: int = Field(
        3, ge=0, description="Extra rattled starts per ShakeNBreak distortion (total starts = (1 + n) × DFT set)"
    )
    rattle_stdev: float = Field(0.15, gt=0, description="Rattle of the extra starts in Å")
    fmax: float = Field(0.02, gt=0, description="Surrogate relaxation force threshold in eV/Å")
    max_steps: int = Field(300, ge=1)
    energy_tolerance: float = Field(
        0.01, ge=0, description="Minima within this energy (eV) and matching structures are grouped"
    )
    min_distance_factor: float = Field(
        0.6, ge=0, lt=1, description="Reject a surrogate minimum as unphysical when two atoms are closer than this "
        "× the sum of their covalent radii (Si–Si: 0.6 × 2.22 Å = 1.33 Å); it is listed in the search result's "
        "'rejected' and never becomes the ground state. 0 disables the check"
    )
    batched: bool | Literal["auto"] = Field(
        "auto", description="true: relax all starts of one (defect, q) together (torch-sim's batched FIRE, ASE's "
        "FIRE flavour), one model call per step for the whole batch; false: one start at a time with ASE's FIRE; "
        "auto: batched on a GPU, one at a time on CPU (benchmarks/speed.py, 2 CPU cores, one torch thread: batched "
        "1.1x faster than one at a time at 15 atoms, 2.8x slower at 63 atoms)"
    )
    precision: Literal["float64", "float32"] = Field(
        "float64", description="Floating-point precision of the surrogate search (training keeps mlip.default_dtype). "
        "float32 is 2x faster on CPU but moved minima by up to 0.36 eV on the speed benchmark: float64 by default"
    )
    device: Literal["cpu", "cuda", "auto"] = Field("auto", description="Search device (auto: cuda when available)")
    path_every: int = Field(
        10, ge=0, description="Keep every n-th structure of each surrogate relaxation path as a top-up candidate "
        "(0: none)")
    candidates: int = Field(
        8, ge=0, description="Most uncertain path frames kept per (defect, q) (at most one per start)")
    foundation_baseline: Literal["chgnet", "chgnet-r2scan"] | None = Field(
        None, description="Also relax the distortions with a foundation model and report its ground-state RMSD: "
        "chgnet (CHGNet 0.3.0, PBE/MPtrj) or chgnet-r2scan (CHGNet's r2SCAN model); both ship in the chgnet package "
        "(no download at run time); neither takes the charge (docs/foundation-baselines.md: what else was checked)"
    )


class VerifySpec(_Section):
    """High-fidelity check of the surrogate minima and the active-learning top-up rounds.

    Each round verifies, per (defect, q), the ``top_k`` lowest distinct surrogate minima plus the most uncertain
    minimum within ``uncertain_window`` of the lowest; the ground state is the lowest in HF energy among them and
    every other structure of that (defect, q) whose HF energy is known. Then, unless the campaign stops, it adds HF
    single points (``round_budget`` per round) at the frames along the surrogate relaxation paths where the
    committee's forces disagree most, plus the verified minima whose error exceeds ``energy_threshold``, and
    fine-tunes the committee from its previous weights. It stops when every ground state is unchanged from the
    previous round, every verified error is below ``energy_threshold`` and no HF single point of the round failed;
    after ``max_rounds`` top-ups; when ``max_hf_calls`` would be exceeded; or when there is nothing to add."""

    mode: Literal["single_point", "relax", "refine"] = Field(
        "single_point", description="single_point: HF single points at the verified minima, the lowest is the "
        "ground state; relax: then an HF relaxation from it (the HF engine's optimizer); refine: then HF single "
        "points along the surrogate relaxation corrected by the HF forces of the best point so far, until the HF "
        "max force is ≤ fmax (defectflow.search.refine: a few single points instead of an HF relaxation's 11–17 "
        "steps)")
    fmax: float = Field(
        0.05, gt=0, description="refine and relax: HF max-force threshold of the ground state, eV/Å (the direct-HF "
        "reference relaxes to 0.05)")
    refine_points: int = Field(
        6, ge=1, description="refine: HF single points per (defect, q) at most (each one HF call)")
    refine_trust: float = Field(
        0.2, gt=0, description="refine: largest atomic move per step, Å (the force correction is linear: it holds "
        "near the last point only); a step that raises the HF energy is rejected and the next one halved")
    refine_secant: bool = Field(
        False, description="refine: also learn the HF − surrogate curvature from the steps (secant updates): faster "
        "near a minimum, but measured to lose a saddle escape on the benchmark (defectflow.search.refine)")
    refine_descent: bool = Field(
        False, description="refine: after a rejected step, step along the HF force (its length from the corrected "
        "surrogate along that line, within the halved trust radius) instead of shortening the rejected step, which "
        "need not go downhill in HF (defectflow.search.refine)")
    refine_leftover: bool = Field(
        False, description="refine, with verify.max_hf_calls: once every (defect, q) has verified and refined "
        "within its equal share of the HF calls, go on refining those that ran out of calls with the HF max force "
        "above fmax, with the calls the others left (one 'refine' job per round, largest force first)")
    energy_threshold: float = Field(
        5.0, gt=0, description="|E_HF − E_surrogate| at a verified minimum above which it is added to the training "
        "set and the round is not converged, in meV/atom")
    max_rounds: int = Field(3, ge=0, description="Top-up rounds at most (0: verify once, never retrain)")
    top_k: int = Field(3, ge=1, description="Distinct surrogate minima verified per (defect, q), lowest first")
    uncertain_window: float = Field(
        0.5, ge=0, description="Also verify the minimum with the largest committee energy spread (relative to "
        "the other minima) among those within this many eV of the lowest (0: no extra minimum)")
    round_budget: int = Field(
        4, ge=0, description="HF single points per top-up round at the path frames of largest committee force "
        "spread (all (defect, q) together; the verified minima above the threshold are added on top, at no extra "
        "HF call)")
    max_hf_calls: int | None = Field(
        None, ge=1, description="Cap on the campaign's HF calculations (bulk + selection + verifications + top-ups); "
        "a round that would exceed it is not started. None: no cap beyond max_rounds")
    rmsd_threshold: float = Field(0.1, gt=0, description="Success criterion for surrogate vs HF-relaxed RMSD in Å")


class LevelsSpec(_Section):
    """Formation energies and charge-transition levels (doped DefectThermodynamics)."""

    dielectric: float | list[list[float]] | None = Field(
        None, description="Total (ionic + electronic) dielectric constant, scalar or 3×3; needed for corrections"
    )
    correction: Literal["auto", "efnv", "fnv", "image_charge", "none"] = Field(
        "auto",
        description="Finite-size correction (any letter case: eFNV = efnv): efnv (Kumagai, doped; site potentials), "
        "fnv (Freysoldt, doped; planar-averaged potentials), image_charge (Makov–Payne point charge, no alignment), "
        "none; auto = eFNV when the HF engine gives the potentials (VASP; QE, which then runs pp.x after the bulk "
        "and verification single points), else image_charge. The result says which was used and why",
    )
    chemical_potentials: dict[str, float] | None = Field(
        None, description="Absolute elemental chemical potentials in eV/atom, on the HF engine's energy scale "
        "(optional; default for an elemental host: its bulk energy per atom; CTLs never need them)"
    )
    band_gap: float | None = Field(None, ge=0, description="Override the band gap in eV (default: bulk HF calculation)")

    @field_validator("correction", mode="before")
    @classmethod
    def _correction(cls, v):
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("dielectric")
    @classmethod
    def _dielectric(cls, v):
        if isinstance(v, list) and (len(v) != 3 or any(len(r) != 3 for r in v)):
            raise ValueError("expected a number or a 3×3 matrix")
        if isinstance(v, (int, float)) and v <= 0:
            raise ValueError(f"expected a positive dielectric constant, got {v}")
        return v


class ResourceSpec(_Section):
    """Resources for one step when submitted to a cluster."""

    cores: int = Field(1, ge=1, description="Cores (MPI ranks) per job")
    walltime: int = Field(60, ge=1, description="Wall time per job in minutes")
    gpu: bool = Field(False, description="Request a GPU (training)")
    worker: str | None = Field(None, description="jobflow-remote worker name / FireWorks _category of this step's "
                               "jobs (default: the manager's default)")
    queue: str | None = Field(None, description="Scheduler queue / partition")


class ExecutionSpec(_Section):
    """Where results go and how jobs run."""

    store: str = Field(
        "embedded",
        description="'embedded' (persistent, serverless, inside work_dir), 'mongodb' (URI from $DEFECTFLOW_MONGODB_URI "
        "or mongodb_uri: in ~/.config/defectflow/config.yaml) or a MongoDB URI mongodb://host:port/db",
    )
    work_dir: str = Field(
        "runs/{name}", description="Work directory (relative paths: from where defectflow runs); {name} = campaign name"
    )
    resources: dict[Literal[RESOURCE_STEPS], ResourceSpec] = Field(
        default_factory=dict, description=f"Per-step resources for submit ({', '.join(RESOURCE_STEPS)})"
    )

    @field_validator("store")
    @classmethod
    def _store(cls, v: str) -> str:
        if v not in ("embedded", "mongodb") and not v.startswith(("mongodb://", "mongodb+srv://")):
            raise ValueError(f"expected 'embedded', 'mongodb' or a MongoDB URI starting with mongodb://, got {v!r}")
        return v


# ---------------------------------------------------------------------------------------------------------------
# the campaign
# ---------------------------------------------------------------------------------------------------------------
class Campaign(_Section):
    """A defect campaign: host, defects, charge states, distortions, fidelities and every step's options."""

    name: str = Field(..., description="Campaign name (letters, digits, _ . -); used in job names and the work dir")
    description: str = Field("", description="Free text")
    host: HostSpec
    defects: DefectsSpec = Field(default_factory=DefectsSpec)
    charges: Literal["auto"] | ChargeList | dict[str, Literal["auto"] | ChargeList] = Field(
        "auto",
        description="auto (doped's guesses), a list for every defect, or {defect name: list or auto}",
    )
    distortions: DistortionsSpec = Field(default_factory=DistortionsSpec)
    fidelities: FidelitiesSpec = Field(default_factory=FidelitiesSpec)
    relax: RelaxSpec = Field(default_factory=RelaxSpec)
    selection: SelectionSpec = Field(default_factory=SelectionSpec)
    mlip: MlipSpec = Field(default_factory=MlipSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    verify: VerifySpec = Field(default_factory=VerifySpec)
    levels: LevelsSpec = Field(default_factory=LevelsSpec)
    execution: ExecutionSpec = Field(default_factory=ExecutionSpec)

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _source: str | None = PrivateAttr(default=None)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"expected letters, digits, '_', '.' or '-' (no spaces), got {v!r}")
        return v

    @field_validator("charges")
    @classmethod
    def _charges(cls, v):
        lists = [v] if isinstance(v, list) else [x for x in v.values() if isinstance(x, list)] if isinstance(v, dict) else []
        for lst in lists:
            if not lst:
                raise ValueError("expected at least one charge state")
            bad = [q for q in lst if abs(q) > MAX_ABS_CHARGE]
            if bad:
                raise ValueError(f"charge {bad[0]} outside ±{MAX_ABS_CHARGE} (the range the MACE charge embedding covers)")
            if len(set(lst)) != len(lst):
                raise ValueError(f"duplicate charge states in {lst}")
        if isinstance(v, dict):
            bad_names = [n for n in v if not _DEFECT_NAME_RE.match(n)]
            if bad_names:
                raise ValueError(f"{bad_names[0]!r} is not a doped defect name (like v_Si, Si_i, Se_Sb)")
        return v

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.selection.per_group_max is not None and self.selection.per_group_max < self.selection.per_group_min:
            raise ValueError(
                "selection.per_group_max: must be ≥ selection.per_group_min "
                f"({self.selection.per_group_max} < {self.selection.per_group_min})"
            )
        # charges given per defect must name a defect of the campaign (checked here when defects.include lists
        # names only; with kinds such as 'vacancies' the preflight checks them against the host / doped's names)
        names = self.defects.include
        if isinstance(self.charges, dict) and not any(n in DEFECT_KINDS for n in names):
            for key in self.charges:
                if not any(_same_defect(key, n) for n in names):
                    raise ValueError(f"charges.{key}: no defect {key!r} in defects.include ({', '.join(names)})")
        return self

    # -- constructors -------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: str | Path | None = None, source: str | None = None) -> Campaign:
        """Validate a plain dict (as from YAML). Relative paths resolve against ``base_dir``."""
        if not isinstance(data, dict):
            raise CampaignError([f"expected a mapping of campaign sections, got {type(data).__name__}"], source)
        try:
            campaign = cls.model_validate(data)
        except ValidationError as exc:
            raise CampaignError(format_validation_error(exc), source) from None
        campaign._base_dir = Path(base_dir) if base_dir else Path.cwd()
        campaign._source = source
        return campaign

    @classmethod
    def from_yaml(cls, path: str | Path) -> Campaign:
        """Read and validate a campaign YAML file."""
        path = Path(path)
        if path.is_dir():
            raise CampaignError([f"campaign file expected, got a directory: {path}"])
        if not path.is_file():
            raise CampaignError([f"campaign file not found: {path}"])
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError) as exc:
            raise CampaignError([f"cannot read the campaign file ({exc})"], str(path)) from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise CampaignError([f"{where}YAML syntax error: {problem}"], str(path)) from None
        if data is None:
            raise CampaignError(["the file is empty; expected a campaign with at least name and host"], str(path))
        return cls.from_dict(data, base_dir=path.parent, source=str(path))

    def to_yaml(self) -> str:
        """Serialise back to YAML (round-trips through :meth:`from_dict`)."""
        data = self.model_dump(mode="json")
        return yaml.safe_dump(data, sort_keys=False)

    # -- helpers ------------------------------------------------------------------------------------------------
    @property
    def base_dir(self) -> Path:
        return self._base_dir

    @property
    def source(self) -> str | None:
        """The campaign file this campaign was read from (prefix of its error messages), or None."""
        return self._source

    def host_structure(self) -> Structure:
        """The host as a pymatgen Structure (reads the file on demand). Errors are :class:`CampaignError` naming
        ``host.structure`` with the campaign file as prefix, like every other campaign error."""
        import warnings

        s = self.host.structure
        if isinstance(s, Structure):
            return s
        path = Path(s)
        if not path.is_absolute():
            path = self._base_dir / path
        if path.is_dir():
            raise CampaignError([f"host.structure: expected a structure file, got a directory: {path}"], self._source)
        if not path.is_file():
            raise CampaignError([f"host.structure: file not found: {path}"], self._source)
        try:
            # pymatgen warns (several lines each) about every oddity of a broken CIF before it fails: the one-line
            # error below says it all
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                structure = Structure.from_file(path)
        except Exception as exc:  # pymatgen raises many kinds
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CampaignError([f"host.structure: cannot read {path} as a structure ({why})"], self._source) from None
        if len(structure) == 0:
            raise CampaignError([f"host.structure: {path} holds no atoms"], self._source)
        return structure

    def work_dir(self) -> Path:
        """The campaign's work directory (absolute; relative settings resolve against the current directory)."""
        return Path(self.execution.work_dir.format(name=self.name)).resolve()

    def charges_for(self, defect_name: str) -> list[int] | None:
        """Explicit charge states for a defect, or None for doped's guesses."""
        v = self.charges
        if v == "auto":
            return None
        if isinstance(v, list):
            return list(v)
        if defect_name in v:
            return None if v[defect_name] == "auto" else list(v[defect_name])
        # doped names carry site suffixes (v_Se_1): match on the prefix too
        for key, val in v.items():
            if defect_name.startswith(key + "_"):
                return None if val == "auto" else list(val)
        return None


# ---------------------------------------------------------------------------------------------------------------
# error messages
# ---------------------------------------------------------------------------------------------------------------
def _clean_loc(loc: tuple) -> tuple:
    """Drop the discriminator tag pydantic inserts for the engine union (fidelities.low.qe.x → fidelities.low.x)."""
    out = list(loc)
    if len(out) >= 3 and out[0] == "fidelities" and out[2] in SETTINGS:
        out.pop(2)
    # drop union branch labels such as 'list[int]' / "literal['auto']" / 'dict[...]'
    return tuple(p for p in out if not (isinstance(p, str) and ("[" in p or p.startswith(("function-", "lax-")))))


def format_validation_error(exc: ValidationError) -> list[str]:
    """Turn a pydantic ValidationError into ``"field.path: what was expected (got X)"`` lines."""
    problems: list[str] = []
    seen: set[str] = set()
    for err in exc.errors(include_url=False):
        raw_loc = tuple(err["loc"])
        loc = _clean_loc(raw_loc)
        where = ".".join(str(p) for p in loc) or "campaign"
        etype = err["type"]
        given = err.get("input")
        msg = err["msg"]
        if etype == "missing":
            msg = "required field is missing"
        elif etype == "extra_forbidden":
            owner = _owner_model(raw_loc)
            valid = ", ".join(owner.model_fields) if owner else ""
            msg = f"unknown field{'; expected one of: ' + valid if valid else ''}"
        elif etype == "union_tag_invalid":
            msg = f"expected one of {', '.join(map(repr, SETTINGS))}, got {err.get('ctx', {}).get('tag')!r}"
            where = where + ".engine"
        elif etype == "union_tag_not_found":
            msg = f"required field 'engine' is missing (one of {', '.join(map(repr, SETTINGS))})"
            where = where + ".engine"
        elif etype == "value_error":
            msg = msg.removeprefix("Value error, ")
            if not loc and re.match(r"^[\w.]+: ", msg):  # a cross-field check names its own field
                where, msg = msg.split(": ", 1)
        elif etype == "int_from_float":
            msg = f"expected an integer, got {given!r} (a number with a fractional part)"
        else:
            msg = msg[0].lower() + msg[1:] if msg else msg
            msg = msg.replace("input should be", "expected").replace("expected greater", "expected a value greater")
            msg = msg.replace("expected less", "expected a value less")
            if given is not None and not isinstance(given, (dict, list)):
                msg += f" ({given!r})" if ", got " in msg else f", got {given!r}"
        line = f"{where}: {msg}"
        if line not in seen:
            seen.add(line)
            problems.append(line)
    # A union of list/dict/literal (charges) reports one error per branch: keep the most specific one.
    return _collapse_union_noise(problems)


def _owner_model(raw_loc: tuple) -> type[BaseModel] | None:
    """The model owning the last element of a raw pydantic ``loc`` (to list its valid keys), or None."""
    import typing

    current: Any = Campaign
    for part in raw_loc[:-1]:
        if isinstance(part, str) and part in SETTINGS and not (
            isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields
        ):
            current = SETTINGS[part]  # discriminator tag of the engine union
            continue
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part)
            current = field.annotation if field is not None else None
        elif typing.get_origin(current) is dict:
            current = typing.get_args(current)[1]  # a dict value, e.g. execution.resources.<step>
        else:
            current = None
        if current is None:
            return None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _same_defect(key: str, name: str) -> bool:
    """A charges key and a defects.include name mean the same defect (doped site suffixes: v_Se_1 ~ v_Se)."""
    return key == name or key.startswith(name + "_") or name.startswith(key + "_")


def _collapse_union_noise(problems: list[str]) -> list[str]:
    by_field: dict[str, list[str]] = {}
    for p in problems:
        by_field.setdefault(p.split(": ", 1)[0], []).append(p)
    if any(f.startswith("charges.") for f in by_field) and "charges" in by_field:
        del by_field["charges"]  # an item of the list is wrong: that says more than "expected auto, a list or a dict"
    out = []
    for field, lines in by_field.items():
        if field.startswith("charges") and len(lines) > 1:
            custom = [ln for ln in lines if "charge" in ln.split(": ", 1)[1] or "doped" in ln]
            out.append(custom[0] if custom else f"{field}: expected 'auto', a list of integer charges, "
                       "or {defect name: list or 'auto'}")
        else:
            out.extend(lines)
    return out
