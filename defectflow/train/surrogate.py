"""Training the charge-conditioned, multi-fidelity MACE surrogate with mace-torch's CLI (``mace_run_train``).

Why a subprocess: ``import mace`` sets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` for the whole process and training
changes torch's default dtype; the CLI is mace-torch's stable public interface, its log is complete, and a job
that only shells out can run on a GPU worker unchanged. The exact command line is kept in the output document.

Model kinds (``TrainedModel.kind``):

* ``multihead`` — one MACE with a shared body and two heads: ``lf`` fitted to every LF frame, ``hf`` to the HF
  training frames. E0s: ``'average'`` *per head* (least-squares per-element reference energies fitted to that
  head's own training frames). LF and HF levels of theory differ by a large, method-dependent constant (GFN1 vs
  GFN2: ≈ 3 eV/atom; PBE vs HSE06 likewise several 0.1 eV/atom): per-head E0s absorb it, so the shared body and
  the small per-head readouts learn only the interaction energy, whose shape is what LF teaches HF. Fitting E0s
  from LF for both heads would leave the HF readout to learn that whole offset from a handful of frames.
* ``delta`` — an LF model (single ``lf`` head, all LF frames) plus a Δ model (single ``delta`` head) fitted to
  E_HF − E_LF and F_HF − F_LF on the HF training frames (the HF extxyz must carry ``LF_energy``/``LF_forces``,
  see :mod:`defectflow.train.data`). Prediction = LF + Δ (:class:`DeltaCalculator`). E0s ``'average'`` for both.
* ``hf_only`` / ``lf_only`` — single-head ablations (HF training frames only / LF frames only). ``lf_only``
  predicts HF with its LF head: the "no HF data" baseline.

Charge: with ``charge_embedding`` the model gets mace's categorical graph embedding of ``total_charge`` (21
classes, offset 10: q ∈ [−10, 10]) added to the node features; ``embedding_readout`` adds a per-atom,
charge-dependent energy term. At prediction time MACECalculator reads q from ``atoms.info["charge"]``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from defectflow.campaign import MlipSpec
from defectflow.engines.process import run_process
from defectflow.schemas import ComponentRun, TrainedModel
from defectflow.schemas.train import Kind
from defectflow.train.data import (
    CHARGE_KEY,
    ENERGY_KEY,
    FORCES_KEY,
    attach_lf_labels,
    delta_frames,
    frames_to_text,
    read_frames,
    split_frames,
    tagged,
    write_frames,
)

logger = logging.getLogger(__name__)

__all__ = [
    "TrainingError",
    "TrainedModel",
    "ComponentRun",
    "train_surrogate",
    "train_kind",
    "load_calculator",
    "DeltaCalculator",
    "resolve_device",
    "CHARGE_EMBEDDING_SPECS",
]

#: mace-torch embedding of the total charge: categorical, per graph, q ∈ [−10, 10] (campaign.MAX_ABS_CHARGE).
CHARGE_EMBEDDING_SPECS = json.dumps(
    {CHARGE_KEY: {"type": "categorical", "per": "graph", "num_classes": 21, "emb_dim": 8, "offset": 10}}
)


class TrainingError(RuntimeError):
    """mace_run_train failed; the message holds the command line and the tail of its log."""


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def resolve_device(device: str) -> str:
    """'auto' → 'cuda' when torch sees a GPU, else 'cpu'."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _mace_version() -> str:
    from importlib.metadata import version

    try:
        return version("mace-torch")
    except Exception:  # noqa: BLE001
        return "unknown"


def _mace_run_train() -> list[str]:
    """The mace_run_train console script of *this* interpreter's environment (PATH as a fallback)."""
    exe = Path(sys.executable).parent / "mace_run_train"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("mace_run_train")
    if found:
        return [found]
    return [sys.executable, "-m", "mace.cli.run_train"]


def _irreps_lmax(irreps: str) -> int:
    ls = [int(m) for m in re.findall(r"(\d+)[eo]", irreps)]  # '32x0e + 32x1o' -> [0, 1]
    return max(ls) if ls else 0


def _check_spec(spec: MlipSpec) -> None:
    lmax = _irreps_lmax(spec.hidden_irreps)
    if lmax != spec.max_L:
        raise ValueError(
            f"mlip.max_L: {spec.max_L} does not match mlip.hidden_irreps {spec.hidden_irreps!r} (L = {lmax}); "
            "mace derives max_L from hidden_irreps, so set both consistently"
        )


_TS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) INFO: (.*)$")


def _parse_log(text: str) -> dict[str, Any]:
    """Epoch timings and E0s from a mace_run_train log."""
    epochs: dict[int, datetime] = {}
    start = None
    e0s: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        m = _TS.match(line)
        if not m:
            continue
        ts, msg = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f"), m.group(2)
        if msg.startswith("Started training"):
            start = ts
        em = re.match(r"Epoch (\d+):", msg)
        if em:
            epochs.setdefault(int(em.group(1)), ts)
        am = re.match(r"Atomic Energies used \(z: eV\) for head (\S+): \{(.*)\}", msg)
        if am:
            pairs = re.findall(r"(\d+):\s*([-+0-9.eE]+)", am.group(2))
            e0s[am.group(1)] = {z: float(v) for z, v in pairs}
    times = [epochs[k] for k in sorted(epochs)]
    diffs = [(b - a).total_seconds() for a, b in zip(times, times[1:])]
    return {
        "epochs": len(times),
        "first_epoch_seconds": (times[0] - start).total_seconds() if times and start else None,
        "seconds_per_epoch": statistics.median(diffs) if diffs else None,
        "e0s": e0s,
    }


def _run_mace(workdir: Path, name: str, heads: dict[str, dict[str, Any]], spec: MlipSpec, device: str,
              charge_embedding: bool, embedding_readout: bool, n_train: dict[str, int],
              n_valid: dict[str, int]) -> tuple[ComponentRun, bytes]:
    """Run mace_run_train for one model file; raises TrainingError with the log tail on failure."""
    total_train = sum(n_train.values())
    batch = max(1, min(spec.batch_size, total_train))
    if batch < spec.batch_size:
        logger.warning("%s: batch size %d capped at %d (number of training frames)", name, spec.batch_size, batch)
    heads_arg = json.dumps(heads)  # mace parses it with ast.literal_eval: string values only here
    cmd = _mace_run_train() + [
        "--name", name,
        "--model", "MACE",
        "--heads", heads_arg,
        "--E0s", "average",
        "--energy_key", ENERGY_KEY,
        "--forces_key", FORCES_KEY,
        "--hidden_irreps", spec.hidden_irreps,
        "--r_max", str(spec.r_max),
        "--num_interactions", str(spec.num_interactions),
        "--correlation", str(spec.correlation),
        "--max_num_epochs", str(spec.max_epochs),
        "--batch_size", str(batch),
        "--valid_batch_size", str(batch),
        "--lr", str(spec.lr),
        "--energy_weight", str(spec.energy_weight),
        "--forces_weight", str(spec.forces_weight),
        "--device", device,
        "--default_dtype", "float64",
        "--seed", str(spec.seed),
        "--work_dir", ".",
        "--plot", "False",
        "--save_cpu",
    ]
    if charge_embedding:
        cmd += ["--total_charge_key", CHARGE_KEY, "--embedding_specs", CHARGE_EMBEDDING_SPECS]
        if embedding_readout:
            cmd += ["--use_embedding_readout", "True"]
    if spec.pair_repulsion:
        cmd += ["--pair_repulsion"]
    for key, value in spec.extra_args.items():
        cmd += [f"--{key}"] + ([] if value is None else [str(value)])
    command = shlex.join(cmd)
    if spec.num_threads is not None or (device == "cpu" and "OMP_NUM_THREADS" not in os.environ):
        command = f"OMP_NUM_THREADS={spec.num_threads or 1} " + command
    log_file = workdir / f"{name}.log"
    logger.info("training %s in %s: %s", name, workdir, command)
    t0 = time.perf_counter()
    env = dict(os.environ)
    if spec.num_threads is not None:
        env["OMP_NUM_THREADS"] = str(spec.num_threads)
    elif device == "cpu" and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = "1"  # measured: 0.4 s/epoch vs 25-35 s/epoch with 2 threads on a busy 2-core host
    # in its own session, ended with this call on an interrupt: no orphaned mace_run_train after Ctrl-C
    proc = run_process(cmd, cwd=workdir, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    text = log_file.read_text(errors="replace")
    model_path = workdir / f"{name}.model"
    if proc.returncode != 0 or not model_path.is_file():
        tail = "\n".join(text.splitlines()[-40:])
        why = f"exit status {proc.returncode}" if proc.returncode else f"no model file {model_path.name} written"
        raise TrainingError(f"mace_run_train failed ({why}) in {workdir}\ncommand: {command}\n--- log tail ---\n{tail}")
    data = model_path.read_bytes()
    parsed = _parse_log(text)
    run = ComponentRun(
        name=name, heads=list(heads), command=command, workdir=str(workdir), log_file=str(log_file),
        wall_seconds=wall, epochs=parsed["epochs"], first_epoch_seconds=parsed["first_epoch_seconds"],
        seconds_per_epoch=parsed["seconds_per_epoch"], n_train=n_train, n_valid=n_valid, batch_size=batch,
        e0s=parsed["e0s"], model_sha256=hashlib.sha256(data).hexdigest(),
    )
    logger.info("%s trained in %.1f s (%d epochs, %.2f s/epoch after the first)", name, wall, run.epochs,
                run.seconds_per_epoch or float("nan"))
    return run, data


# ---------------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------------
def train_kind(lf_extxyz: str, hf_extxyz: str, spec: MlipSpec, workdir: str | Path, kind: Kind,
               label: str = "main", charge_embedding: bool | None = None) -> TrainedModel:
    """Train one model of a given kind on the deterministic split of the LF and HF frames (see module docstring).

    ``lf_extxyz``/``hf_extxyz`` are extxyz text or paths. ``charge_embedding`` overrides the spec's (ablations).
    """
    _check_spec(spec)
    charge = spec.charge_embedding if charge_embedding is None else charge_embedding
    readout = spec.embedding_readout and charge
    device = resolve_device(spec.device)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    lf, hf = read_frames(lf_extxyz), read_frames(hf_extxyz)
    if kind in ("multihead", "delta", "lf_only") and not lf:
        raise ValueError(f"{label}: {kind} training needs LF frames; the LF extxyz is empty")
    if kind in ("multihead", "delta", "hf_only") and not hf:
        raise ValueError(f"{label}: {kind} training needs HF frames; the HF extxyz is empty")
    if kind == "delta":
        hf = attach_lf_labels(hf, lf)
    split = split_frames(lf, hf, spec.hf_test_fraction, spec.valid_fraction, spec.seed)
    lf_train, lf_valid = tagged(lf, split.lf_train, "train"), tagged(lf, split.lf_valid, "valid")
    hf_train, hf_valid = tagged(hf, split.hf_train, "train"), tagged(hf, split.hf_valid, "valid")
    hf_test = tagged(hf, split.hf_test, "test")

    def files(head: str, train, valid) -> dict[str, Any]:
        tr = write_frames(workdir / f"{head}_train.xyz", train, head)
        va = write_frames(workdir / f"{head}_valid.xyz", valid, head)
        return {"train_file": tr.name, "valid_file": va.name, "E0s": "average"}

    t0 = time.perf_counter()
    runs: list[ComponentRun] = []
    blobs: dict[str, str] = {}

    def run(name: str, heads: dict[str, dict], n_train: dict[str, int], n_valid: dict[str, int], sub: str):
        d = workdir / sub
        d.mkdir(parents=True, exist_ok=True)
        for h in heads.values():  # training files live next to the run
            for key in ("train_file", "valid_file"):
                shutil.copy(workdir / h[key], d / h[key])
        r, data = _run_mace(d, name, heads, spec, device, charge, readout, n_train, n_valid)
        runs.append(r)
        blobs[name] = base64.b64encode(data).decode()

    if kind == "multihead":
        heads = {"lf": files("lf", lf_train, lf_valid), "hf": files("hf", hf_train, hf_valid)}
        run("main", heads, {"lf": len(lf_train), "hf": len(hf_train)}, {"lf": len(lf_valid), "hf": len(hf_valid)},
            "main")
        model_heads, prediction_head = ["lf", "hf"], "hf"
    elif kind == "hf_only":
        run("main", {"hf": files("hf", hf_train, hf_valid)}, {"hf": len(hf_train)}, {"hf": len(hf_valid)}, "main")
        model_heads, prediction_head = ["hf"], "hf"
    elif kind == "lf_only":
        run("main", {"lf": files("lf", lf_train, lf_valid)}, {"lf": len(lf_train)}, {"lf": len(lf_valid)}, "main")
        model_heads, prediction_head = ["lf"], "lf"
    elif kind == "delta":
        run("lf", {"lf": files("lf", lf_train, lf_valid)}, {"lf": len(lf_train)}, {"lf": len(lf_valid)}, "lf")
        d_train, d_valid = delta_frames(hf_train), delta_frames(hf_valid)
        run("delta", {"delta": files("delta", d_train, d_valid)}, {"delta": len(d_train)},
            {"delta": len(d_valid)}, "delta")
        model_heads, prediction_head = ["lf", "hf"], "hf"
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    return TrainedModel(
        label=label, kind=kind, heads=model_heads, prediction_head=prediction_head, charge_embedding=charge,
        embedding_readout=readout, model_files=blobs, components=runs, device=device, r_max=spec.r_max,
        split=split.as_dict(), hf_test_extxyz=frames_to_text(hf_test), lf_valid_extxyz=frames_to_text(lf_valid),
        spec=spec.model_dump(mode="json"), mace_version=_mace_version(), wall_seconds=time.perf_counter() - t0,
    )


def train_surrogate(lf_extxyz: str, hf_extxyz: str, spec: MlipSpec, workdir: str | Path) -> TrainedModel:
    """Train the surrogate the spec asks for (``spec.multi_fidelity``: multihead or delta), without ablations.

    Parameters
    ----------
    lf_extxyz, hf_extxyz
        Extended-XYZ text (or file paths) with ``REF_energy`` (eV), ``REF_forces`` (eV/Å) and ``total_charge``
        (e), as written by :func:`defectflow.relax.frames_to_extxyz`. For delta learning, the HF frames also need
        the LF labels at the same geometry (``LF_energy``, ``LF_forces``) or matching LF frames in ``lf_extxyz``.
    spec
        :class:`defectflow.campaign.MlipSpec`.
    workdir
        Where training files, logs and checkpoints go (kept for inspection).

    Returns a :class:`TrainedModel` with the model bytes, the exact mace_run_train command line(s) and the split.
    """
    return train_kind(lf_extxyz, hf_extxyz, spec, workdir, kind=spec.multi_fidelity, label="main")


# ---------------------------------------------------------------------------------------------------------------
# prediction
# ---------------------------------------------------------------------------------------------------------------
def _cache_dir() -> Path:
    """Where model files are written to be loaded (named by their SHA-256, so sharing is safe):
    ``$DEFECTFLOW_MODEL_CACHE``, else the user's cache folder (``$XDG_CACHE_HOME`` or ``~/.cache``)/defectflow/models."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "defectflow" / "models"
    d = Path(os.environ.get("DEFECTFLOW_MODEL_CACHE") or default)
    d.mkdir(parents=True, exist_ok=True)
    return d


def model_path(trained: TrainedModel, component: str = "main") -> Path:
    """Write one component's model file to the cache (named by its SHA-256) and return the path."""
    data = trained.model_bytes(component)
    digest = hashlib.sha256(data).hexdigest()
    path = _cache_dir() / f"{digest}.model"
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    return path


def _mace_calc(path: Path, head: str, device: str):
    from mace.calculators import MACECalculator

    return MACECalculator(model_paths=str(path), head=head, default_dtype="float64", device=device)


def _infos_equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


class DeltaCalculator(Calculator):
    """Prediction = base (LF) model + Δ model, both reading q from ``atoms.info['charge']``.

    Unlike ASE's SumCalculator it recomputes when ``atoms.info`` changes (a new charge at the same geometry).
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, base, delta, **kwargs):
        super().__init__(**kwargs)
        self.base, self.delta = base, delta

    def check_state(self, atoms, tol: float = 1e-15):
        state = super().check_state(atoms, tol=tol)
        if not state and self.atoms is not None and not _infos_equal(self.atoms.info, atoms.info):
            state.append("info")
        return state

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.results = {}
        parts = []
        for calc in (self.base, self.delta):
            a = self.atoms.copy()
            calc.calculate(a, list(properties), all_changes)
            parts.append(calc.results)
        for key in self.implemented_properties:
            if all(key in p for p in parts):
                self.results[key] = parts[0][key] + parts[1][key]

    def get_descriptors(self, atoms=None, invariants_only=True, num_layers=-1):
        """Descriptors of the base (LF) model, which carries the charge embedding of the body."""
        return self.base.get_descriptors(atoms, invariants_only=invariants_only, num_layers=num_layers)


def load_calculator(trained: TrainedModel | dict, head: str = "hf", device: str = "cpu"):
    """An ASE calculator for one head of a trained surrogate (the model bytes are written to a cache file).

    ``head``: 'hf' (HF prediction) or 'lf'; 'lf_only' models have only 'lf' and 'hf_only' only 'hf'. Delta models
    give LF + Δ for 'hf' and the LF model for 'lf'. Set the total charge in ``atoms.info['charge']`` (e). Importing
    mace (done here) sets torch's default dtype to float64 and TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 in this process.
    """
    if isinstance(trained, dict):
        trained = TrainedModel.model_validate(trained)
    if head not in trained.heads:
        raise ValueError(f"model {trained.label!r} ({trained.kind}) has no head {head!r}; available: "
                         f"{', '.join(trained.heads)}")
    device = resolve_device(device)
    if trained.kind == "delta":
        base = _mace_calc(model_path(trained, "lf"), "lf", device)
        if head == "lf":
            return base
        return DeltaCalculator(base, _mace_calc(model_path(trained, "delta"), "delta", device))
    return _mace_calc(model_path(trained, "main"), head, device)


@contextmanager
def torch_threads(n: int | None = None):
    """Limit torch's intra-op threads while predicting (default: OMP_NUM_THREADS, else 1; restored afterwards)."""
    import torch

    n = n or int(os.environ.get("OMP_NUM_THREADS", "1") or 1)
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def predict(calc, frames, charge_key: str = CHARGE_KEY) -> tuple[np.ndarray, list[np.ndarray]]:
    """Energies (eV) and forces (eV/Å) of frames, with q taken from ``info[charge_key]`` into ``info['charge']``."""
    energies, forces = [], []
    for atoms in frames:
        a = atoms.copy()
        a.info["charge"] = int(round(float(atoms.info.get(charge_key, atoms.info.get("charge", 0)))))
        a.calc = calc
        energies.append(float(a.get_potential_energy()))
        forces.append(np.array(a.get_forces()))
    return np.array(energies), forces
