"""The training step as one plain function and one jobflow job: the surrogate, its ablations, metrics and plots."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from jobflow import job

from defectflow.campaign import MlipSpec
from defectflow.schemas import ComparisonRow, TrainingResult
from defectflow.store.tracking import tracked
from defectflow.train.data import read_frames
from defectflow.train.metrics import evaluate, plot_pca
from defectflow.train.surrogate import TrainedModel, resolve_device, train_kind, train_warm

logger = logging.getLogger(__name__)

__all__ = ["ComparisonRow", "TrainingResult", "train_models", "train_job", "committee_names", "parallel_members"]


_ABLATION_KIND = {"hf_only": "hf_only", "lf_only": "lf_only"}


def _lf_view(model: TrainedModel, name: str) -> TrainedModel:
    """The LF component of a delta/finetune/replay model as an lf_only model (reused, not retrained)."""
    return model.model_copy(update={
        "label": name, "kind": "lf_only", "heads": ["lf"], "prediction_head": "lf",
        "model_files": {"main": model.model_files["lf"]}, "head_map": {"lf": [["main", "lf"]]},
        "references": {k: v for k, v in model.references.items() if k == "lf"},
        "components": [c.model_copy(update={"name": "main"}) for c in model.components if c.name == "lf"],
        "wall_seconds": sum(c.wall_seconds for c in model.components if c.name == "lf"),
    })


def committee_names(spec: MlipSpec) -> list[str]:
    """Model keys of the committee: 'main', then 'committee1' … 'committee<n−1>'."""
    return ["main"] + [f"committee{k}" for k in range(1, spec.committee)]


def parallel_members(spec: MlipSpec, n_models: int | None = None) -> int:
    """How many models train at once: ``spec.parallel``, else on cpu the cores over the threads each training
    process uses, else 1; never more than ``n_models`` (default: the committee)."""
    n_models = spec.committee if n_models is None else n_models
    if spec.parallel is not None:
        return max(1, min(spec.parallel, n_models))
    if resolve_device(spec.device) == "cpu":
        threads = spec.num_threads or int(os.environ.get("OMP_NUM_THREADS", "1") or 1)
        return max(1, min(n_models, (os.cpu_count() or 1) // max(threads, 1)))
    return 1


def train_models(lf_extxyz: str, hf_extxyz: str, spec: MlipSpec, workdir: str | Path,
                 plot_dir: str | Path | None = None, previous: TrainingResult | None = None) -> TrainingResult:
    """Train the surrogate (``spec.multi_fidelity``), its committee and each of ``spec.ablations``; evaluate all.

    Committee (``spec.committee`` models): 'main' and 'committee1' … , the same recipe with seed (and so data
    split) ``spec.seed + k``; with delta, finetune or replay they share main's LF model, so only their HF part is
    trained again. Members and ablations train side by side, :func:`parallel_members` at once. ``previous`` (a
    top-up round): every committee member is fine-tuned from its own previous weights on the HF frames so far
    (:func:`~defectflow.train.surrogate.train_warm`); the ablations are not retrained (their models and metrics
    are carried over).

    Ablations: ``no_charge`` = the same model without charge embedding; ``hf_only`` = single HF head on the HF
    training frames; ``lf_only`` = single LF head on the LF frames, predicting HF with its LF head (with
    ``multi_fidelity`` delta, finetune or replay this is the LF component of the main model, reused rather than
    retrained).
    Plots (``plot_dir``): ``parity_<model>.png``, ``pca_<model>.png`` and, with ``no_charge``,
    ``pca_charge_embedding.png`` (charge-embedded vs not, side by side: the paper's Fig. 3a).
    """
    t0 = time.perf_counter()
    workdir = Path(workdir)
    names = committee_names(spec)
    models: dict[str, TrainedModel] = {}

    def member(k: int, name: str) -> TrainedModel:
        m_spec = spec if k == 0 else spec.model_copy(update={"seed": spec.seed + k})
        if previous is not None and name in previous.models:
            return train_warm(previous.models[name], lf_extxyz, hf_extxyz, m_spec, workdir / name, name)
        shared = (_lf_view(models["main"], "lf") if k > 0 and spec.multi_fidelity in ("delta", "finetune", "replay")
                  else None)
        return train_kind(lf_extxyz, hf_extxyz, m_spec, workdir / name, kind=spec.multi_fidelity, label=name,
                          lf_model=shared)

    def ablation(name: str) -> TrainedModel:
        if name == "no_charge":
            return train_kind(lf_extxyz, hf_extxyz, spec, workdir / name, kind=spec.multi_fidelity, label=name,
                              charge_embedding=False)
        return train_kind(lf_extxyz, hf_extxyz, spec, workdir / name, kind=_ABLATION_KIND[name], label=name)

    # Members and ablations are independent mace_run_train processes: several run at once where cores allow, the
    # committee first (the ablations are comparisons, not needed by the search). With a shared LF model (delta,
    # finetune, replay, from scratch) main is trained first, the others then start from its LF part.
    order = list(enumerate(names))
    if (previous is None and spec.multi_fidelity in ("delta", "finetune", "replay")
            and (len(order) > 1 or "lf_only" in spec.ablations)):
        models["main"] = member(0, "main")
        order = order[1:]
    tasks = {name: (lambda k=k, name=name: member(k, name)) for k, name in order}
    if previous is None:
        for name in spec.ablations:
            if name == "lf_only" and spec.multi_fidelity in ("delta", "finetune", "replay"):
                models[name] = _lf_view(models["main"], name)  # its LF component: reused, not retrained
            else:
                tasks[name] = lambda name=name: ablation(name)
    with ThreadPoolExecutor(max_workers=parallel_members(spec, len(tasks))) as pool:
        futures = {name: pool.submit(task) for name, task in tasks.items()}
        for name, fut in futures.items():
            models[name] = fut.result()
    models = {name: models[name] for name in names + [a for a in spec.ablations if a in models]}
    if previous is not None:
        carried = {n: m for n, m in previous.models.items() if n in spec.ablations}
        models.update(carried)
    pcas: dict[str, Any] = {}
    evaluated = {n: m for n, m in models.items() if n == "main" or n in spec.ablations}  # members: not compared
    metrics = {name: (previous.metrics[name] if previous is not None and name in spec.ablations
                      and name in previous.metrics
                      else evaluate(m, plot_dir=plot_dir, descriptor_extxyz=lf_extxyz, _keep_pca=pcas))
               for name, m in evaluated.items()}
    plots = {f"{k}_{name}": v for name, mt in metrics.items() for k, v in mt.plots.items()}
    if plot_dir is not None and "no_charge" in pcas and "main" in pcas:
        plots["pca_charge_embedding"] = plot_pca(
            {"charge-embedded": pcas["main"], "no charge embedding": pcas["no_charge"]},
            Path(plot_dir) / "pca_charge_embedding.png")
    rows = []
    for name, mt in metrics.items():
        rows.append(ComparisonRow(
            model=name, kind=mt.kind, charge_embedding=mt.charge_embedding,
            hf_test_energy_rmse=mt.hf_test.overall.energy_rmse if mt.hf_test else None,
            hf_test_energy_mae=mt.hf_test.overall.energy_mae if mt.hf_test else None,
            hf_test_force_rmse=mt.hf_test.overall.force_rmse if mt.hf_test else None,
            hf_test_force_mae=mt.hf_test.overall.force_mae if mt.hf_test else None,
            lf_valid_energy_rmse=mt.lf_valid.overall.energy_rmse if mt.lf_valid else None,
            lf_valid_force_rmse=mt.lf_valid.overall.force_rmse if mt.lf_valid else None,
            pca_separation_ratio=mt.pca.separation_ratio if mt.pca else {},
            wall_seconds=models[name].wall_seconds,
        ))
    return TrainingResult(
        spec=spec.model_dump(mode="json"), models=models, metrics=metrics, comparison=rows, plots=plots,
        committee=names, warm_started=previous is not None,
        n_lf_frames=len(read_frames(lf_extxyz)), n_hf_frames=len(read_frames(hf_extxyz)),
        wall_seconds=time.perf_counter() - t0,
    )


@job(data=["model_files", "hf_test_extxyz", "lf_valid_extxyz"])
@tracked("train", ignore=("plot_dir",))
def train_job(lf_extxyz: str, hf_extxyz: str, spec: MlipSpec, plot_dir: str | None = None,
              previous: TrainingResult | None = None) -> TrainingResult:
    """Train the surrogate and ablations in the job's directory; model bytes and extxyz go to the ``data`` store.

    ``lf_extxyz``/``hf_extxyz``: the LF and HF training frames as extxyz text (the harvest's and the HF labels'
    ``extxyz`` fields); for delta learning the HF frames need ``LF_energy``/``LF_forces`` or matching LF frames.
    ``plot_dir``: where PNGs go (default: ``plots`` in the job directory). ``previous``: the last round's
    training, to warm-start from (top-up rounds).
    """
    plot_dir = plot_dir or str(Path.cwd() / "plots")
    return train_models(lf_extxyz, hf_extxyz, spec, Path.cwd() / "train", plot_dir=plot_dir, previous=previous)
