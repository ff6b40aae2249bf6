"""Step 4: trained surrogates, their accuracy and the side-by-side comparison of ablations.

Units follow ASE: energies in eV, forces in eV/Å, lengths in Å, times in s of wall clock."""

from __future__ import annotations

import base64
from typing import Any, Literal

from pydantic import BaseModel, Field

__all__ = ["Kind", "ComponentRun", "TrainedModel", "ErrorStats", "SetMetrics", "PCAResult", "Metrics", "ComparisonRow", "TrainingResult"]


Kind = Literal["multihead", "delta", "finetune", "replay", "hf_only", "lf_only"]


class ComponentRun(BaseModel):
    """One ``mace_run_train`` run (one model file)."""

    name: str = Field(description="Component name: main (multihead / single-head models), lf or delta (delta mode)")
    heads: list[str] = Field(description="MACE heads of this model file")
    command: str = Field(description="Exact command line (shell-quoted), run in `workdir`")
    workdir: str = Field(description="Directory the command ran in (training files, logs, checkpoints)")
    log_file: str = Field(description="Captured stdout+stderr of the command")
    wall_seconds: float = Field(description="Wall time of the command in s (includes start-up and final evaluation)")
    epochs: int = Field(description="Epochs run")
    first_epoch_seconds: float | None = Field(
        None, description="Wall time from training start to the end of epoch 0 in s (includes torch warm-up)")
    seconds_per_epoch: float | None = Field(None, description="Median wall time per epoch after the first, in s")
    n_train: dict[str, int] = Field(description="Head → training frames")
    n_valid: dict[str, int] = Field(description="Head → validation frames")
    batch_size: int = Field(description="Batch size used (the spec's, capped at the number of training frames)")
    e0s: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="Head → {atomic number: E0 in eV} as fitted by mace ('average')")
    model_sha256: str = Field(description="SHA-256 of the model file")


class TrainedModel(BaseModel):
    """A trained surrogate: its model file(s) as base64 text (kept in the jobflow ``data`` store) and provenance."""

    label: str = Field(description="Name of this model: main, no_charge, hf_only or lf_only")
    kind: Kind = Field(description="multihead | delta | finetune | replay | hf_only | lf_only "
                       "(defectflow.train.surrogate)")
    heads: list[str] = Field(description="Heads load_calculator accepts: lf, hf")
    prediction_head: str = Field(description="Head that predicts the high fidelity (hf; lf for lf_only)")
    charge_embedding: bool = Field(description="Conditioned on the total charge q")
    embedding_readout: bool = Field(description="Charge-dependent energy readout used")
    model_files: dict[str, str] = Field(
        description="Component → mace model file (torch.save of the whole model, CPU tensors, float64), base64")
    components: list[ComponentRun] = Field(description="The mace_run_train runs that produced the model files")
    device: str = Field(description="Device trained on: cpu or cuda")
    default_dtype: str = Field("float64", description="Floating-point precision of the model")
    r_max: float = Field(description="Cutoff radius in Å")
    split: dict[str, list[int]] = Field(
        description="Indices into the input extxyz files: lf_train, lf_valid, hf_train, hf_valid, hf_test")
    hf_test_extxyz: str = Field("", description="Held-out HF frames (extxyz text; REF_energy eV, REF_forces eV/Å)")
    lf_valid_extxyz: str = Field("", description="LF validation frames (extxyz text)")
    references: dict[str, dict[str, dict[str, float]]] = Field(
        default_factory=dict,
        description="Head → per-(fidelity, q) reference energies subtracted before training and added back at "
        "prediction: {'e0': {Z: eV}, 'charge': {q: eV}} (empty: mace's own E0s only)")
    head_map: dict[str, list[list[str]]] = Field(
        default_factory=dict,
        description="Head → the [component, mace head] pairs whose predictions are summed (e.g. delta 'hf' = "
        "[['lf', 'lf'], ['delta', 'delta']]); empty: derived from the kind")
    spec: dict[str, Any] = Field(description="The MlipSpec used (as a dict)")
    mace_version: str = Field(description="mace-torch version")
    wall_seconds: float = Field(description="Total training wall time in s")
    warm_started_from: str | None = Field(
        None, description="SHA-256 of the model file this one was fine-tuned from (a top-up round's warm start)")

    @property
    def commands(self) -> list[str]:
        return [c.command for c in self.components]

    def model_sha256(self, component: str = "main") -> str:
        """SHA-256 of one component's model file."""
        import hashlib

        return hashlib.sha256(self.model_bytes(component)).hexdigest()

    def model_bytes(self, component: str = "main") -> bytes:
        """The model file of one component as bytes."""
        if component not in self.model_files:
            raise KeyError(f"no model component {component!r}; available: {', '.join(self.model_files)}")
        return base64.b64decode(self.model_files[component])


class ErrorStats(BaseModel):
    """Errors of predictions against reference labels."""

    n_frames: int = Field(description="Frames")
    n_atoms: int = Field(description="Atoms over all frames")
    energy_rmse: float = Field(description="Energy RMSE in meV/atom")
    energy_mae: float = Field(description="Energy MAE in meV/atom")
    force_rmse: float = Field(description="Force RMSE over Cartesian components in meV/Å")
    force_mae: float = Field(description="Force MAE over Cartesian components in meV/Å")


class SetMetrics(BaseModel):
    """Errors on one set of frames, with the per-frame numbers the parity plot shows."""

    dataset: str = Field(description="hf_test or lf_valid")
    head: str = Field(description="Head used for the predictions (hf / lf)")
    overall: ErrorStats
    per_charge: dict[str, ErrorStats] = Field(description="Charge state q ('-1', '0', '+1') → errors")
    charges: list[int] = Field(description="q of each frame, e")
    n_atoms: list[int] = Field(description="Atoms of each frame")
    energy_ref: list[float] = Field(description="Reference energy per frame, eV/atom")
    energy_pred: list[float] = Field(description="Predicted energy per frame, eV/atom")


class PCAResult(BaseModel):
    """PCA of per-atom invariant MACE descriptors (all layers), coloured by the frame's q."""

    n_atoms: int = Field(description="Atoms (points) in the PCA")
    descriptor_dim: int = Field(description="Descriptor length per atom")
    explained_variance_ratio: list[float] = Field(description="Fraction of the variance along PC1 and PC2")
    centroids: dict[str, list[float]] = Field(description="q → centroid (PC1, PC2) of its atoms, descriptor units")
    centroid_separation: dict[str, float] = Field(
        description="'q1|q2' → distance between the two centroids in the PC1–PC2 plane, descriptor units")
    separation_ratio: dict[str, float] = Field(
        description="'q1|q2' → centroid distance / pooled RMS spread of the atoms about their centroids in the "
        "PC1–PC2 plane (dimensionless; ≫ 1: charge states form separate clusters, ≈ 0: indistinguishable)")
    descriptor_centroid_distance: dict[str, float] = Field(
        description="'q1|q2' → distance between the per-q mean descriptors in the full descriptor space")


class Metrics(BaseModel):
    """Accuracy of one trained model (units in each field's description)."""

    model: str = Field(description="Model label: main, no_charge, hf_only, lf_only")
    kind: str = Field(description="multihead | delta | hf_only | lf_only")
    charge_embedding: bool
    hf_test: SetMetrics | None = Field(None, description="Held-out HF frames, HF prediction")
    lf_valid: SetMetrics | None = Field(None, description="LF validation frames, LF head")
    pca: PCAResult | None = Field(None, description="Descriptor PCA (paper Fig. 3a)")
    plots: dict[str, str] = Field(default_factory=dict, description="Plot name → PNG path")


class ComparisonRow(BaseModel):
    """One model's headline numbers, for the side-by-side ablation table."""

    model: str = Field(description="main, no_charge, hf_only, lf_only")
    kind: str = Field(description="multihead | delta | hf_only | lf_only")
    charge_embedding: bool
    hf_test_energy_rmse: float | None = Field(None, description="Held-out HF energy RMSE, meV/atom")
    hf_test_energy_mae: float | None = Field(None, description="Held-out HF energy MAE, meV/atom")
    hf_test_force_rmse: float | None = Field(None, description="Held-out HF force RMSE, meV/Å")
    hf_test_force_mae: float | None = Field(None, description="Held-out HF force MAE, meV/Å")
    lf_valid_energy_rmse: float | None = Field(None, description="LF validation energy RMSE (LF head), meV/atom")
    lf_valid_force_rmse: float | None = Field(None, description="LF validation force RMSE (LF head), meV/Å")
    pca_separation_ratio: dict[str, float] = Field(
        default_factory=dict, description="Descriptor-PCA charge separation / spread per q pair (dimensionless)")
    wall_seconds: float = Field(description="Training wall time, s")


class TrainingResult(BaseModel):
    """Output of the training step: the surrogate (``models['main']``), its ablations and their metrics."""

    spec: dict[str, Any] = Field(description="MlipSpec used")
    models: dict[str, TrainedModel] = Field(description="'main' and each ablation → trained model (bytes in the "
                                                        "data store)")
    metrics: dict[str, Metrics] = Field(description="Same keys → accuracy on held-out frames")
    comparison: list[ComparisonRow] = Field(description="Side-by-side headline numbers, main first")
    plots: dict[str, str] = Field(default_factory=dict, description="Plot name → PNG path")
    committee: list[str] = Field(default_factory=lambda: ["main"],
                                 description="Keys of the committee models in ``models``, main first")
    warm_started: bool = Field(False, description="Fine-tuned from the previous round's models (a top-up round)")
    n_lf_frames: int = Field(description="LF frames given")
    n_hf_frames: int = Field(description="HF frames given")
    wall_seconds: float = Field(description="Wall time of the whole step (training + evaluation), s")

    @property
    def main(self) -> TrainedModel:
        return self.models["main"]
