"""Step 5: the multi-fidelity, charge-embedded MACE surrogate (Wang, Mosquera-Lois & Walsh, arXiv:2603.05238).

* :func:`train_surrogate` — LF + HF extxyz → :class:`TrainedModel` (mace-torch's ``mace_run_train`` in a
  subprocess; model bytes, exact command line, split and timings in the document).
* :func:`load_calculator` — an ASE calculator for the ``hf`` or ``lf`` head (q from ``atoms.info['charge']``).
* :func:`evaluate` — :class:`Metrics`: energy (meV/atom) and force (meV/Å) RMSE/MAE on held-out HF frames and on
  LF validation frames, overall and per charge state; parity and descriptor-PCA plots.
* :func:`train_models` / :func:`train_job` — surrogate + ablations (no_charge, hf_only, lf_only) side by side →
  :class:`TrainingResult`; the job keeps model bytes and extxyz in the jobflow ``data`` store.

Multi-fidelity modes, E0 handling and the extxyz keys are documented in :mod:`defectflow.train.surrogate` and
:mod:`defectflow.train.data`.
"""

from defectflow.train.data import LF_ENERGY_KEY, LF_FORCES_KEY, attach_lf_labels, delta_frames, split_frames
from defectflow.train.jobs import ComparisonRow, TrainingResult, train_job, train_models
from defectflow.train.metrics import ErrorStats, Metrics, PCAResult, SetMetrics, evaluate
from defectflow.train.surrogate import (
    CHARGE_EMBEDDING_SPECS,
    ComponentRun,
    DeltaCalculator,
    TrainedModel,
    TrainingError,
    load_calculator,
    predict,
    train_kind,
    train_surrogate,
)

__all__ = [
    "CHARGE_EMBEDDING_SPECS",
    "ComparisonRow",
    "ComponentRun",
    "DeltaCalculator",
    "ErrorStats",
    "LF_ENERGY_KEY",
    "LF_FORCES_KEY",
    "Metrics",
    "PCAResult",
    "SetMetrics",
    "TrainedModel",
    "TrainingError",
    "TrainingResult",
    "attach_lf_labels",
    "delta_frames",
    "evaluate",
    "load_calculator",
    "predict",
    "split_frames",
    "train_job",
    "train_kind",
    "train_models",
    "train_surrogate",
]
