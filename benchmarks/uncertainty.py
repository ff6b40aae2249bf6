"""Benchmark (issue #14): does the committee's spread say where the surrogate is wrong?

    .venv/bin/python benchmarks/uncertainty.py                              # far preset, the default recipe, N = 32
    .venv/bin/python benchmarks/uncertainty.py --preset close --budget 16
    .venv/bin/python benchmarks/uncertainty.py --show

A committee of ``--members`` models is trained exactly as a campaign trains it (:func:`defectflow.train.jobs.
train_models` with ``mlip.committee``: seeds and splits ``seed + k``; delta/finetune/replay members share the LF
model), on the training study's data for one cell (``benchmarks/training.py``: the preset's frozen LF trajectories
+ N HF frames of its frozen pool, chosen by the pipeline's selection), with the study's settings and the library's
default recipe (``MlipSpec().multi_fidelity``; ``--recipe`` to change). Then, on every frame of the frozen direct-HF
search (never trained on), the true error of the main model is compared with the committee's uncertainty:

* energy: |E_main − E_HF| per atom against the committee's energy standard deviation per atom;
* forces: the largest per-atom |F_main − F_HF| against the largest per-atom force standard deviation;

as Spearman ρ (all frames, per q, and the low-energy frames within 0.1 eV/atom of each q's HF ground state) and
as the share of the 10 % largest errors found among the 10 % most uncertain frames (1.0: perfect; 0.1: chance).

Output: a table on stdout and ``benchmarks/results/uncertainty.json``; models cached in
``runs/benchmarks/uncertainty/``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import frozen  # noqa: E402
import training  # noqa: E402
from bench_utils import machine, rounded, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "uncertainty.json"
WORK = ROOT / "runs" / "benchmarks" / "uncertainty"


def capture(errors: np.ndarray, sigma: np.ndarray, top: float = 0.1) -> float | None:
    """Share of the ``top`` fraction of largest errors that are among the ``top`` fraction most uncertain."""
    n = max(1, int(round(top * len(errors))))
    if len(errors) < 10:
        return None
    worst, flagged = set(np.argsort(-errors)[:n]), set(np.argsort(-sigma)[:n])
    return len(worst & flagged) / n


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    from scipy.stats import spearmanr

    if len(x) < 3:
        return None
    rho = spearmanr(x, y).statistic
    return float(rho) if np.isfinite(rho) else None


def run(preset: str, budget: int, members: int, recipe: str | None,
        keep_every: int | None = None) -> dict[str, Any]:
    from defectflow.campaign import MlipSpec
    from defectflow.engines.base import atoms_to_structure
    from defectflow.search.uncertainty import committee_predict
    from defectflow.train.data import ENERGY_KEY, FORCES_KEY, charge_of, frames_to_text
    from defectflow.train.jobs import train_models
    from defectflow.train.surrogate import torch_threads

    recipe = recipe or MlipSpec().multi_fidelity
    spec = MlipSpec(**{**training.BASE, **training.STUDY_SPEC, "multi_fidelity": recipe, "committee": members})
    records = training.lf_records(preset)
    lf_text, harvest = training.lf_training_extxyz(preset, records, keep_every)
    hf_atoms, hf_keys = training.hf_training_frames(preset, records, budget, None)
    work = WORK / preset / (f"{recipe}_n{budget}_m{members}" + (f"_ke{keep_every}" if keep_every else ""))
    t0 = time.perf_counter()
    result = train_models(lf_text, frames_to_text(hf_atoms), spec, work / "train")
    train_seconds = time.perf_counter() - t0
    models = [result.models[n] for n in result.committee]
    test = training.TestSet()
    out: dict[str, Any] = {"preset": preset, "n_hf": budget, "recipe": recipe, "members": members,
                           "keep_every": keep_every, "n_lf_frames": harvest["n_frames"],
                           "train_seconds": train_seconds, "hf_frames": hf_keys, "groups": {}}
    t0 = time.perf_counter()
    rows = []
    for q in test.charges:
        frames = [a for a in test.frames if charge_of(a) == q]
        structures = [atoms_to_structure(a, q) for a in frames]
        with torch_threads(1):
            pred = committee_predict(models, "hf", structures, q)
        n_atoms = np.array([len(a) for a in frames])
        e_err = np.abs(pred.energies[0] - np.array([float(a.info[ENERGY_KEY]) for a in frames])) / n_atoms
        f_err = np.array([float(np.linalg.norm(f[0] - a.arrays[FORCES_KEY], axis=1).max())
                          for f, a in zip(pred.forces, frames)])
        low = np.array([test.low_energy(a) for a in frames])
        rows.append((q, e_err, pred.energy_std / n_atoms, f_err, pred.force_std, low))
    out["eval_seconds"] = time.perf_counter() - t0

    def stats(sel) -> dict[str, Any]:
        e = np.concatenate([r[1][sel(r)] for r in rows])
        se = np.concatenate([r[2][sel(r)] for r in rows])
        f = np.concatenate([r[3][sel(r)] for r in rows])
        sf = np.concatenate([r[4][sel(r)] for r in rows])
        return {"n_frames": int(len(e)), "energy_spearman": spearman(se, e), "force_spearman": spearman(sf, f),
                "energy_capture_top10": capture(e, se), "force_capture_top10": capture(f, sf),
                "median_energy_error_mev_atom": float(1000 * np.median(e)) if len(e) else None,
                "median_energy_std_mev_atom": float(1000 * np.median(se)) if len(se) else None,
                "median_force_error_ev_a": float(np.median(f)) if len(f) else None,
                "median_force_std_ev_a": float(np.median(sf)) if len(sf) else None}

    out["groups"]["all"] = stats(lambda r: slice(None))
    out["groups"]["low-energy"] = stats(lambda r: r[5])
    for q in test.charges:
        out["groups"][f"q={q:+d}"] = stats(lambda r, q=q: slice(None) if r[0] == q else np.zeros(len(r[1]), bool))
    return out


def render(data: dict[str, Any]) -> str:
    lines = []
    for rec in data["records"]:
        ke = f", every {rec['keep_every']}th LF step" if rec.get("keep_every") else ""
        lines.append(f"### {rec['preset']}: {rec['recipe']}{ke}, N = {rec['n_hf']}, committee of {rec['members']} "
                     f"(training {rec['train_seconds'] / 60:.1f} min)")
        lines.append("")
        lines.append(table(
            ["frames", "n", "ρ(σ_E, |ΔE|)", "ρ(σ_F, |ΔF|)", "top-10 % capture E", "top-10 % capture F",
             "median |ΔE| meV/atom", "median σ_E meV/atom", "median |ΔF| eV/Å", "median σ_F eV/Å"],
            [[k, g["n_frames"], g["energy_spearman"], g["force_spearman"], g["energy_capture_top10"],
              g["force_capture_top10"], g["median_energy_error_mev_atom"], g["median_energy_std_mev_atom"],
              g["median_force_error_ev_a"], g["median_force_std_ev_a"]] for k, g in rec["groups"].items()],
            digits=2))
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=frozen.LF_PRESETS, default="far")
    p.add_argument("--budget", type=int, default=32, help="HF training frames N (from the preset's frozen pool)")
    p.add_argument("--members", type=int, default=3, help="committee size (mlip.committee)")
    p.add_argument("--recipe", default=None, help="mlip.multi_fidelity (default: the library's default)")
    p.add_argument("--keep-every", type=int, default=None,
                   help="harvest every n-th LF ionic step (relax.keep_every; default: training.STUDY_KEEP_EVERY = 3)")
    p.add_argument("--json", type=Path, default=RESULTS)
    p.add_argument("--show", action="store_true", help="print the tables of the existing JSON and exit")
    a = p.parse_args(argv)
    old = json.loads(a.json.read_text()) if a.json.is_file() else {"records": []}
    if a.show:
        print(render(old))
        return old
    rec = run(a.preset, a.budget, a.members, a.recipe, a.keep_every)

    def key(r):
        return r["preset"], r["recipe"], r["n_hf"], r["members"], r.get("keep_every")

    records = [r for r in old["records"] if key(r) != key(rec)] + [rec]
    data = rounded({"benchmark": "uncertainty", "machine": machine(), "records": records}, 5)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(data, indent=1) + "\n")
    print(render(data))
    return data


if __name__ == "__main__":
    main()
