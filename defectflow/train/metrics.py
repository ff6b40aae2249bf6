"""Accuracy of a trained surrogate on held-out frames, per head and per charge state; parity and PCA plots.

Definitions (used everywhere in defectflow):

* energy error of a frame = (E_pred − E_ref) / N_atoms; energy RMSE/MAE over frames, in meV/atom;
* force error = every Cartesian force component of every atom; force RMSE/MAE over components, in meV/Å.

``hf_test``: the held-out HF frames predicted with the model's HF head (LF + Δ for delta; the LF head for the
``lf_only`` ablation). ``lf_valid``: the LF validation frames predicted with the LF head (absent for ``hf_only``).
Per-charge numbers are keyed '-1', '0', '+1'.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from defectflow.plotting import save_figure
from defectflow.schemas import ErrorStats, Metrics, PCAResult, SetMetrics
from defectflow.train.data import ENERGY_KEY, FORCES_KEY, charge_label, charge_of, read_frames
from defectflow.train.surrogate import TrainedModel, load_calculator, predict, torch_threads

logger = logging.getLogger(__name__)

__all__ = ["ErrorStats", "SetMetrics", "PCAResult", "Metrics", "error_stats", "evaluate", "descriptor_pca",
           "plot_parity", "plot_pca"]


def error_stats(e_pred, e_ref, n_atoms, f_pred, f_ref) -> ErrorStats:
    """Energy errors per atom (meV/atom) and force-component errors (meV/Å)."""
    n = np.asarray(n_atoms, float)
    de = (np.asarray(e_pred, float) - np.asarray(e_ref, float)) / n * 1000.0
    df = (np.concatenate([np.ravel(p) for p in f_pred]) - np.concatenate([np.ravel(r) for r in f_ref])) * 1000.0
    return ErrorStats(
        n_frames=len(de), n_atoms=int(n.sum()),
        energy_rmse=float(np.sqrt(np.mean(de**2))), energy_mae=float(np.mean(np.abs(de))),
        force_rmse=float(np.sqrt(np.mean(df**2))), force_mae=float(np.mean(np.abs(df))),
    )


def _set_metrics(calc, frames, dataset: str, head: str) -> tuple[SetMetrics, dict[str, Any]]:
    e_pred, f_pred = predict(calc, frames)
    e_ref = np.array([float(a.info[ENERGY_KEY]) for a in frames])
    f_ref = [np.asarray(a.arrays[FORCES_KEY], float) for a in frames]
    n = np.array([len(a) for a in frames])
    q = [charge_of(a) for a in frames]
    per_q = {}
    for qq in sorted(set(q)):
        idx = [i for i, x in enumerate(q) if x == qq]
        per_q[charge_label(qq)] = error_stats(e_pred[idx], e_ref[idx], n[idx], [f_pred[i] for i in idx],
                                              [f_ref[i] for i in idx])
    sm = SetMetrics(
        dataset=dataset, head=head, overall=error_stats(e_pred, e_ref, n, f_pred, f_ref), per_charge=per_q,
        charges=q, n_atoms=n.tolist(), energy_ref=(e_ref / n).tolist(), energy_pred=(e_pred / n).tolist(),
    )
    raw = {"f_pred": f_pred, "f_ref": f_ref}
    return sm, raw


def descriptor_pca(calc, frames, max_frames: int = 200, seed: int = 0) -> tuple[PCAResult, np.ndarray, np.ndarray]:
    """PCA of per-atom invariant descriptors of ``frames`` (subsampled to ``max_frames``); returns the result,
    the PC1–PC2 coordinates per atom and the q per atom."""
    frames = list(frames)
    if len(frames) > max_frames:
        keep = np.sort(np.random.default_rng(seed).choice(len(frames), max_frames, replace=False))
        frames = [frames[i] for i in keep]
    descs, qs = [], []
    for atoms in frames:
        a = atoms.copy()
        q = charge_of(atoms)
        a.info["charge"] = q
        d = np.asarray(calc.get_descriptors(a, invariants_only=True))
        descs.append(d.reshape(len(a), -1))
        qs.extend([q] * len(a))
    x = np.concatenate(descs)
    qs = np.array(qs)
    xc = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    var = s**2
    ratio = (var / var.sum()).tolist() if var.sum() > 0 else [0.0] * len(var)
    pcs = xc @ vt[:2].T if vt.shape[0] >= 2 else np.column_stack([xc @ vt[:1].T, np.zeros(len(xc))])
    labels = sorted(set(qs.tolist()))
    cent = {q: pcs[qs == q].mean(axis=0) for q in labels}
    full = {q: x[qs == q].mean(axis=0) for q in labels}
    spread = {q: float(np.mean(np.sum((pcs[qs == q] - cent[q]) ** 2, axis=1))) for q in labels}
    sep, ratio_sep, dfull = {}, {}, {}
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            key = f"{charge_label(a)}|{charge_label(b)}"
            dist = float(np.linalg.norm(cent[a] - cent[b]))
            pooled = float(np.sqrt(0.5 * (spread[a] + spread[b])))
            sep[key] = dist
            ratio_sep[key] = dist / pooled if pooled > 0 else (0.0 if dist == 0 else float("inf"))
            dfull[key] = float(np.linalg.norm(full[a] - full[b]))
    res = PCAResult(
        n_atoms=len(x), descriptor_dim=x.shape[1], explained_variance_ratio=[float(v) for v in ratio[:2]],
        centroids={charge_label(q): [float(c) for c in cent[q]] for q in labels}, centroid_separation=sep,
        separation_ratio=ratio_sep, descriptor_centroid_distance=dfull,
    )
    return res, pcs, qs


# ---------------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------------
def _style():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.labelsize": 10, "legend.fontsize": 8, "figure.dpi": 100,
                         "savefig.dpi": 300, "axes.linewidth": 0.8})
    return plt


def _colors(charges) -> dict[int, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {q: cmap(i % 10) for i, q in enumerate(sorted(set(charges)))}


def plot_parity(title: str, sets: list[tuple[SetMetrics, dict[str, Any]]], path: str | Path) -> str:
    """Energy (per atom, relative to the mean reference) and force-component parity per set, coloured by q."""
    plt = _style()
    fig, axes = plt.subplots(len(sets), 2, figsize=(7.0, 3.3 * len(sets)), squeeze=False)
    for row, (sm, raw) in enumerate(sets):
        colors = _colors(sm.charges)
        eref, epred = np.array(sm.energy_ref), np.array(sm.energy_pred)
        shift = eref.mean()
        ax = axes[row, 0]
        for q in sorted(set(sm.charges)):
            idx = [i for i, x in enumerate(sm.charges) if x == q]
            ax.scatter(eref[idx] - shift, epred[idx] - shift, s=18, color=colors[q], label=f"q = {charge_label(q)}",
                       edgecolor="k", linewidth=0.3)
        _diag(ax)
        ax.set_xlabel(r"$E_\mathrm{ref} - \langle E_\mathrm{ref}\rangle$ (eV/atom)")
        ax.set_ylabel(r"$E_\mathrm{pred} - \langle E_\mathrm{ref}\rangle$ (eV/atom)")
        ax.set_title(f"{sm.dataset} ({sm.head} head): RMSE {sm.overall.energy_rmse:.1f} meV/atom", fontsize=9)
        ax.legend(frameon=False)
        ax = axes[row, 1]
        for q in sorted(set(sm.charges)):
            idx = [i for i, x in enumerate(sm.charges) if x == q]
            fr = np.concatenate([np.ravel(raw["f_ref"][i]) for i in idx])
            fp = np.concatenate([np.ravel(raw["f_pred"][i]) for i in idx])
            ax.scatter(fr, fp, s=6, color=colors[q], label=f"q = {charge_label(q)}", alpha=0.7, linewidth=0)
        _diag(ax)
        ax.set_xlabel(r"$F_\mathrm{ref}$ (eV/Å)")
        ax.set_ylabel(r"$F_\mathrm{pred}$ (eV/Å)")
        ax.set_title(f"{sm.dataset} ({sm.head} head): RMSE {sm.overall.force_rmse:.0f} meV/Å", fontsize=9)
        ax.legend(frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _diag(ax):
    lo = min(ax.get_xlim()[0], ax.get_ylim()[0])
    hi = max(ax.get_xlim()[1], ax.get_ylim()[1])
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, zorder=0)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal", adjustable="box")


def plot_pca(panels: dict[str, tuple[PCAResult, np.ndarray, np.ndarray]], path: str | Path) -> str:
    """Side-by-side PC1–PC2 scatter of per-atom descriptors, coloured by q (one panel per model)."""
    plt = _style()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    all_q = sorted({int(q) for _, _, qs in panels.values() for q in qs})
    colors = _colors(all_q)
    for ax, (title, (res, pcs, qs)) in zip(axes[0], panels.items()):
        for q in all_q:
            m = qs == q
            ax.scatter(pcs[m, 0], pcs[m, 1], s=5, color=colors[q], alpha=0.6, linewidth=0,
                       label=f"q = {charge_label(q)}")
        evr = res.explained_variance_ratio + [0.0, 0.0]
        ax.set_xlabel(f"PC1 ({100 * evr[0]:.1f} %)")
        ax.set_ylabel(f"PC2 ({100 * evr[1]:.1f} %)")
        sep = ", ".join(f"{k}: {v:.2f}" for k, v in res.separation_ratio.items())
        ax.set_title(f"{title}\nseparation/spread {sep}", fontsize=9)
        ax.legend(frameon=False, markerscale=2)
    fig.tight_layout()
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------------------------
def evaluate(trained: TrainedModel | dict, hf_test_extxyz: str | None = None, lf_valid_extxyz: str | None = None,
             plot_dir: str | Path | None = None, descriptor_extxyz: str | None = None, device: str = "cpu",
             _keep_pca: dict | None = None) -> Metrics:
    """Errors of a trained model on held-out HF frames (and the LF head on LF validation frames), per q.

    ``hf_test_extxyz``/``lf_valid_extxyz`` default to the sets kept in ``trained``. With ``plot_dir``, writes
    ``parity_<label>.png`` and ``pca_<label>.png``. The descriptor PCA uses ``descriptor_extxyz`` (e.g. the whole
    LF training set) or, by default, the LF validation + HF test frames.
    """
    if isinstance(trained, dict):
        trained = TrainedModel.model_validate(trained)
    with torch_threads():
        return _evaluate(trained, hf_test_extxyz, lf_valid_extxyz, plot_dir, descriptor_extxyz, device, _keep_pca)


def _evaluate(trained, hf_test_extxyz, lf_valid_extxyz, plot_dir, descriptor_extxyz, device, _keep_pca) -> Metrics:
    hf = read_frames(trained.hf_test_extxyz if hf_test_extxyz is None else hf_test_extxyz)
    lf = read_frames(trained.lf_valid_extxyz if lf_valid_extxyz is None else lf_valid_extxyz)
    out = Metrics(model=trained.label, kind=trained.kind, charge_embedding=trained.charge_embedding)
    sets = []
    calc_hf = load_calculator(trained, trained.prediction_head, device=device)
    if hf:
        out.hf_test, raw = _set_metrics(calc_hf, hf, "hf_test", trained.prediction_head)
        sets.append((out.hf_test, raw))
    calc_lf = load_calculator(trained, "lf", device=device) if "lf" in trained.heads else None
    if lf and calc_lf is not None:
        out.lf_valid, raw = _set_metrics(calc_lf, lf, "lf_valid", "lf")
        sets.append((out.lf_valid, raw))
    desc_frames = read_frames(descriptor_extxyz) if descriptor_extxyz is not None else lf + hf
    if desc_frames:
        res, pcs, qs = descriptor_pca(calc_lf or calc_hf, desc_frames)
        out.pca = res
        if _keep_pca is not None:
            _keep_pca[trained.label] = (res, pcs, qs)
        if plot_dir is not None:
            title = f"{trained.label} ({'charge-embedded' if trained.charge_embedding else 'no charge embedding'})"
            out.plots["pca"] = plot_pca({title: (res, pcs, qs)}, Path(plot_dir) / f"pca_{trained.label}.png")
    if plot_dir is not None and sets:
        out.plots["parity"] = plot_parity(f"{trained.label}: {trained.kind}"
                                          f"{', charge-embedded' if trained.charge_embedding else ''}", sets,
                                          Path(plot_dir) / f"parity_{trained.label}.png")
    return out
