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
* ``finetune`` — an LF model, then fine-tuned on the HF frames alone (``--foundation_model`` = our LF model,
  ``--multiheads_finetuning False``): mace takes the architecture, the charge embedding and the weights from it.
* ``replay`` — the same with mace's multi-head fine-tuning: the LF frames are replayed as a second head
  (``--pt_train_file``; mace names it ``pt_head``, forces its Huber "universal" loss) while the ``hf`` head learns.
* ``hf_only`` / ``lf_only`` — single-head ablations (HF training frames only / LF frames only). ``lf_only``
  predicts HF with its LF head: the "no HF data" baseline.

Recipe options (:class:`~defectflow.campaign.MlipSpec`): ``charge_references`` subtracts least-squares
per-(fidelity, q) reference energies E ≈ Σ_Z n_Z e0(Z) + c(q) before training and adds them back at prediction
(:class:`ReferencedCalculator`; the fine-tuning kinds always do, see :func:`train_kind`); ``hf_weight`` and
``energy_weight_scale`` set per-frame loss weights (mace ``config_weight``). A multi-head mace model checkpoints on
the validation loss of its *last* head only (mace/tools/train.py), so ``hf`` is always the last head. The
"Skipping evaluation for heads: ['pt_head']" line of from-scratch logs is only the default of mace's
``--skip_evaluate_heads``: no such head exists there and it costs nothing. mace's ``--patience`` does not stop a
single-process run in 0.3.16 (ACEsuit/mace#1384); ``patience`` works around it
(:mod:`defectflow.train.mace_patience`). The saved model is the best-validation checkpoint either way.

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
    LF_ENERGY_KEY,
    WEIGHT_KEY,
    EnergyReferences,
    Split,
    attach_lf_labels,
    delta_frames,
    fill_references,
    fit_references,
    frame_weights,
    frames_to_text,
    read_frames,
    split_frames,
    subtract_references,
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
    "train_warm",
    "load_calculator",
    "DeltaCalculator",
    "ReferencedCalculator",
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
              n_valid: dict[str, int], finetune: list[str] | None = None,
              e0s: str = "average") -> tuple[ComponentRun, bytes]:
    """Run mace_run_train for one model file; raises TrainingError with the log tail on failure.

    ``finetune``: extra options of a fine-tuning run (``--foundation_model`` ...); the architecture then comes from
    the foundation model, and the fine-tuning learning rate and epochs replace the spec's."""
    total_train = sum(n_train.values())
    batch = max(1, min(spec.batch_size, total_train))
    if batch < spec.batch_size:
        logger.warning("%s: batch size %d capped at %d (number of training frames)", name, spec.batch_size, batch)
    heads_arg = json.dumps(heads)  # mace parses it with ast.literal_eval: string values only here
    args = [
        "--name", name,
        "--model", "MACE",
        "--heads", heads_arg,
        "--E0s", e0s,
        "--energy_key", ENERGY_KEY,
        "--forces_key", FORCES_KEY,
        "--hidden_irreps", spec.hidden_irreps,
        "--r_max", str(spec.r_max),
        "--num_interactions", str(spec.num_interactions),
        "--correlation", str(spec.correlation),
        "--max_num_epochs", str(spec.finetune_epochs if finetune else spec.max_epochs),
        "--batch_size", str(batch),
        "--valid_batch_size", str(batch),
        "--lr", str(spec.finetune_lr if finetune else spec.lr),
        "--scheduler_patience", str(spec.scheduler_patience),
        "--energy_weight", str(spec.energy_weight),
        "--forces_weight", str(spec.forces_weight),
        "--device", device,
        "--default_dtype", spec.default_dtype,
        "--seed", str(spec.seed),
        "--work_dir", ".",
        "--plot", "False",
        "--save_cpu",
    ]
    launcher = _mace_run_train()
    if spec.patience is not None:
        args += ["--patience", str(spec.patience)]
        if "distributed" not in spec.extra_args:
            # mace-torch 0.3.16 ignores --patience in a single process (ACEsuit/mace#1384): run it through our
            # wrapper, which stops there and lets mace save its best-validation model as after a last epoch (a
            # distributed run stops by itself, and the wrapper would leave the other ranks waiting)
            launcher = [sys.executable, "-m", "defectflow.train.mace_patience"]
    cmd = launcher + args
    if spec.ema_decay is not None:
        cmd += ["--ema", "--ema_decay", str(spec.ema_decay)]
    if finetune:  # architecture, charge embedding and readout come from the foundation model
        cmd += ["--total_charge_key", CHARGE_KEY] + finetune
    else:
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
def _e0_string(refs: dict[str, Any] | None) -> str:
    """mace's dict-string form of E0s: '{14: 0.0}' (a string inside --heads; a dict there is refused)."""
    return "{" + ", ".join(f"{z}: {v!r}" for z, v in sorted((int(z), float(v)) for z, v in refs.items())) + "}"


def _squeezable_e0s(path: Path) -> None:
    """Work around mace-torch 0.3.16's multi-head fine-tuning from a single-element, single-head model: it reads
    the foundation's E0s with ``atomic_energies.squeeze()`` (mace/cli/run_train.py, pt_head E0s), which turns the
    [1 head, 1 element] buffer into a 0-d tensor and fails with "invalid index of a 0-dim tensor". The foundation
    file handed to mace gets the same E0s as a 1-d [elements] buffer (only read there, never run). In a subprocess:
    loading a mace model imports mace, which changes torch defaults for the whole process."""
    code = ("import sys, torch; p = sys.argv[1]; m = torch.load(p, map_location='cpu', weights_only=False); "
            "ae = m.atomic_energies_fn.atomic_energies; "
            "m.atomic_energies_fn.atomic_energies = ae.reshape(-1) if ae.ndim == 2 and ae.shape[0] == 1 else ae; "
            "torch.save(m, p)")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise TrainingError(f"could not prepare the foundation model {path} for replay fine-tuning:\n"
                            f"{proc.stderr[-2000:]}")


def _default_head_map(kind: str) -> dict[str, list[list[str]]]:
    """Head → summed [component, mace head] pairs, for model documents written before ``head_map`` existed."""
    return {"multihead": {"lf": [["main", "lf"]], "hf": [["main", "hf"]]},
            "hf_only": {"hf": [["main", "hf"]]},
            "lf_only": {"lf": [["main", "lf"]]},
            "delta": {"lf": [["lf", "lf"]], "hf": [["lf", "lf"], ["delta", "delta"]]},
            "finetune": {"lf": [["lf", "lf"]], "hf": [["main", "hf"]]},
            "replay": {"lf": [["main", "pt_head"]], "hf": [["main", "hf"]]}}[kind]


def train_kind(lf_extxyz: str, hf_extxyz: str, spec: MlipSpec, workdir: str | Path, kind: Kind,
               label: str = "main", charge_embedding: bool | None = None,
               lf_model: TrainedModel | None = None) -> TrainedModel:
    """Train one model of a given kind on the deterministic split of the LF and HF frames (module docstring).

    ``lf_extxyz``/``hf_extxyz`` are extxyz text or paths. ``charge_embedding`` overrides the spec's (ablations).
    ``lf_model``: an LF model (kind ``lf_only``) already trained on the same LF frames with the same spec, reused by
    delta, finetune and replay instead of training it again (the study, top-up rounds).
    """
    _check_spec(spec)
    charge = spec.charge_embedding if charge_embedding is None else charge_embedding
    readout = spec.embedding_readout and charge
    device = resolve_device(spec.device)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    lf, hf = read_frames(lf_extxyz), read_frames(hf_extxyz)
    if kind in ("multihead", "delta", "finetune", "replay", "lf_only") and not lf:
        raise ValueError(f"{label}: {kind} training needs LF frames; the LF extxyz is empty")
    if kind in ("multihead", "delta", "finetune", "replay", "hf_only") and not hf:
        raise ValueError(f"{label}: {kind} training needs HF frames; the HF extxyz is empty")
    if kind == "delta":
        hf = attach_lf_labels(hf, lf)
    split = split_frames(lf, hf, spec.hf_test_fraction, spec.valid_fraction, spec.seed)
    lf_train, lf_valid = tagged(lf, split.lf_train, "train"), tagged(lf, split.lf_valid, "valid")
    hf_train, hf_valid = tagged(hf, split.hf_train, "train"), tagged(hf, split.hf_valid, "valid")
    hf_test = tagged(hf, split.hf_test, "test")

    # per-(fidelity, q) references: fitted on the training frames, subtracted from every set (test kept raw)
    references: dict[str, dict] = {}
    # Fine-tuning kinds always use them: mace-torch 0.3.16 copies the foundation's E0s over the fine-tuned head's
    # (mace/tools/finetuning_utils.py, the final same-name-and-shape copy), so the HF energies must share the LF
    # model's zero; the LF and HF totals of different codes differ by up to hundreds of eV per cell.
    use_refs = spec.charge_references or kind in ("finetune", "replay")
    if lf_model is not None and kind in ("delta", "finetune", "replay") and use_refs != ("lf" in lf_model.references):
        raise ValueError(f"{label}: the given lf_model was trained {'with' if lf_model.references else 'without'} "
                         f"reference energies, a {kind} model here needs one trained "
                         f"{'with' if use_refs else 'without'} (mlip.charge_references)")
    if use_refs:
        if lf_model is not None and "lf" in lf_model.references and kind in ("delta", "finetune", "replay"):
            references["lf"] = EnergyReferences(lf_model.references["lf"])  # what its LF model was trained on
        elif lf_train:
            references["lf"] = fit_references(lf_train)
        if hf_train:  # through E_HF − E_LF where the HF frames carry their LF energies (fit_references)
            references["hf"] = fit_references(hf_train, baseline=references.get("lf"))
            if "lf" in references:
                references["hf"] = fill_references(references["hf"], references["lf"])
        if kind == "delta" and "lf" in references and "hf" in references:
            for frames in (hf_train, hf_valid):  # Δ targets then come out as residual HF − residual LF
                for a in frames:
                    a.info[LF_ENERGY_KEY] = float(a.info[LF_ENERGY_KEY]) - references["lf"].energy(a)
        lf_train, lf_valid = (subtract_references(x, references["lf"]) if "lf" in references else x
                              for x in (lf_train, lf_valid))
        hf_train, hf_valid = (subtract_references(x, references["hf"]) if "hf" in references else x
                              for x in (hf_train, hf_valid))
    # loss weights (mace config_weight): energy-based, and HF frames up-weighted against LF
    hf_factor = spec.hf_weight if kind in ("multihead", "replay") else 1.0
    for frames, factor in ((lf_train, 1.0), (lf_valid, 1.0), (hf_train, hf_factor), (hf_valid, hf_factor)):
        for a, w in zip(frames, frame_weights(frames, spec.energy_weight_scale, spec.energy_weight_floor, factor)):
            a.info[WEIGHT_KEY] = w

    def files(head: str, train, valid, e0s: str = "average") -> dict[str, Any]:
        tr = write_frames(workdir / f"{head}_train.xyz", train, head)
        va = write_frames(workdir / f"{head}_valid.xyz", valid, head)
        return {"train_file": tr.name, "valid_file": va.name, "E0s": e0s}

    t0 = time.perf_counter()
    runs: list[ComponentRun] = []
    blobs: dict[str, str] = {}

    def run(name: str, heads: dict[str, dict], n_train: dict[str, int], n_valid: dict[str, int], sub: str,
            finetune: list[str] | None = None, e0s: str = "average", extra_files: tuple[str, ...] = ()):
        d = workdir / sub
        d.mkdir(parents=True, exist_ok=True)
        for f in [h[k] for h in heads.values() for k in ("train_file", "valid_file")] + list(extra_files):
            shutil.copy(workdir / f, d / f)  # training files live next to the run
        r, data = _run_mace(d, name, heads, spec, device, charge, readout, n_train, n_valid, finetune, e0s)
        runs.append(r)
        blobs[name] = base64.b64encode(data).decode()

    def lf_component() -> Path:
        """The LF model (component ``lf``): reused from ``lf_model`` or trained here; returns its file."""
        if lf_model is not None:
            if lf_model.kind != "lf_only":
                raise ValueError(f"lf_model must be an lf_only model, got {lf_model.kind!r}")
            blobs["lf"] = lf_model.model_files["main"]
            runs.extend(c.model_copy(update={"name": "lf"}) for c in lf_model.components)
        else:
            run("lf", {"lf": files("lf", lf_train, lf_valid)}, {"lf": len(lf_train)}, {"lf": len(lf_valid)}, "lf")
        path = workdir / "lf_foundation.model"
        path.write_bytes(base64.b64decode(blobs["lf"]))
        return path

    if kind == "multihead":  # hf last: mace checkpoints on the last head's validation loss (train.py)
        heads = {"lf": files("lf", lf_train, lf_valid), "hf": files("hf", hf_train, hf_valid)}
        run("main", heads, {"lf": len(lf_train), "hf": len(hf_train)}, {"lf": len(lf_valid), "hf": len(hf_valid)},
            "main")
    elif kind == "hf_only":
        run("main", {"hf": files("hf", hf_train, hf_valid)}, {"hf": len(hf_train)}, {"hf": len(hf_valid)}, "main")
    elif kind == "lf_only":
        run("main", {"lf": files("lf", lf_train, lf_valid)}, {"lf": len(lf_train)}, {"lf": len(lf_valid)}, "main")
    elif kind == "delta":
        lf_component()
        d_train, d_valid = delta_frames(hf_train), delta_frames(hf_valid)
        run("delta", {"delta": files("delta", d_train, d_valid)}, {"delta": len(d_train)},
            {"delta": len(d_valid)}, "delta")
    elif kind in ("finetune", "replay"):
        foundation = str(lf_component())
        e0 = _e0_string({z: 0.0 for z in references["hf"]["e0"]})  # residual energies: zero references
        opts = ["--foundation_model", foundation, "--foundation_head", "lf"]
        extra: tuple[str, ...] = ()
        if kind == "finetune":
            opts += ["--multiheads_finetuning", "False"]
        else:
            _squeezable_e0s(Path(foundation))
            files("pt", lf_train, lf_valid)
            opts += ["--multiheads_finetuning", "True", "--pt_train_file", "pt_train.xyz",
                     "--pt_valid_file", "pt_valid.xyz", "--force_mh_ft_lr", "True"]
            extra = ("pt_train.xyz", "pt_valid.xyz")
        train = hf_train
        if kind == "finetune" and hf_train:
            train = hf_train * -(-spec.finetune_min_frames // len(hf_train))  # ceil: whole copies of the set
        run("main", {"hf": files("hf", train, hf_valid, e0)}, {"hf": len(train)}, {"hf": len(hf_valid)},
            "main", finetune=opts, e0s=e0, extra_files=extra)
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    head_map = _default_head_map(kind)
    return TrainedModel(
        label=label, kind=kind, heads=list(head_map), prediction_head="lf" if kind == "lf_only" else "hf",
        charge_embedding=charge, embedding_readout=readout, model_files=blobs, components=runs, device=device,
        default_dtype=spec.default_dtype,
        r_max=spec.r_max, split=split.as_dict(), hf_test_extxyz=frames_to_text(hf_test),
        lf_valid_extxyz=frames_to_text(tagged(lf, split.lf_valid, "valid")),  # raw energies: evaluate() adds refs
        references={k: dict(v) for k, v in references.items()},
        head_map=head_map, spec=spec.model_dump(mode="json"), mace_version=_mace_version(),
        wall_seconds=time.perf_counter() - t0,
    )


def train_warm(previous: TrainedModel, lf_extxyz: str, hf_extxyz: str, spec: MlipSpec, workdir: str | Path,
               label: str | None = None) -> TrainedModel:
    """Continue training ``previous`` on the HF frames so far (a top-up round's warm start): mace fine-tuning of the
    component that carries its HF prediction, starting from its own weights (``--foundation_model`` = that
    component, ``--foundation_head`` = its HF head, naive fine-tuning; ``mlip.finetune_lr`` and
    ``finetune_epochs``; the HF frames repeated up to ``finetune_min_frames``).

    * multihead / finetune / replay / hf_only: the ``hf`` head is fine-tuned; a multi-head model becomes a single
      ``hf`` model (mace keeps the chosen head only), the separate LF component of finetune/replay is kept;
    * delta: the Δ model is fine-tuned on E_HF − E_LF (the HF frames must carry their LF labels, as for delta).

    The previous model's reference energies are kept (not refitted): the fine-tuned weights stay on their zero.
    ``lf_extxyz`` is needed by delta only (LF labels by geometry, when the HF frames lack them)."""
    _check_spec(spec)
    if previous.kind == "lf_only" or "hf" not in previous.heads:
        raise ValueError(f"{previous.label}: a {previous.kind} model has no HF prediction to warm-start")
    label = label or previous.label
    device = resolve_device(spec.device)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    hf = read_frames(hf_extxyz)
    if not hf:
        raise ValueError(f"{label}: warm start needs HF frames; the HF extxyz is empty")
    head_map = previous.head_map or _default_head_map(previous.kind)
    component, mace_head = head_map["hf"][-1]
    if previous.kind == "delta":
        hf = attach_lf_labels(hf, read_frames(lf_extxyz))
    # the previous split for the frames it saw (its test frames stay untrained), every new frame trains
    old = {k: list(previous.split.get(k, [])) for k in ("hf_train", "hf_valid", "hf_test")}
    n_old = len(set().union(*old.values()))  # a lone HF frame trains and validates: one frame, listed twice
    if n_old > len(hf):
        raise ValueError(f"{label}: {len(hf)} HF frames, fewer than the {n_old} the previous model was split over")
    split = Split([], [], old["hf_train"] + list(range(n_old, len(hf))), old["hf_valid"], old["hf_test"])
    hf_train, hf_valid = tagged(hf, split.hf_train, "train"), tagged(hf, split.hf_valid, "valid")
    hf_test = tagged(hf, split.hf_test, "test")
    references = {k: EnergyReferences(v) for k, v in previous.references.items()}
    if previous.kind == "delta" and "lf" in references and "hf" in references:
        for frames in (hf_train, hf_valid):
            for a in frames:
                a.info[LF_ENERGY_KEY] = float(a.info[LF_ENERGY_KEY]) - references["lf"].energy(a)
    if "hf" in references:
        hf_train, hf_valid = (subtract_references(x, references["hf"]) for x in (hf_train, hf_valid))
    if previous.kind == "delta":
        hf_train, hf_valid = delta_frames(hf_train), delta_frames(hf_valid)
    for frames in (hf_train, hf_valid):
        for a, w in zip(frames, frame_weights(frames, spec.energy_weight_scale, spec.energy_weight_floor, 1.0)):
            a.info[WEIGHT_KEY] = w
    train = hf_train * -(-spec.finetune_min_frames // len(hf_train)) if hf_train else hf_train
    foundation = workdir / "previous.model"
    foundation.write_bytes(previous.model_bytes(component))
    # residual energies (references kept): zero E0s; without references mace copies the foundation head's E0s
    e0 = _e0_string({z: 0.0 for z in references["hf"]["e0"]}) if "hf" in references else "average"
    t0 = time.perf_counter()
    d = workdir / component
    d.mkdir(parents=True, exist_ok=True)
    files = {"train_file": write_frames(d / f"{mace_head}_train.xyz", train, mace_head).name,
             "valid_file": write_frames(d / f"{mace_head}_valid.xyz", hf_valid, mace_head).name, "E0s": e0}
    opts = ["--foundation_model", str(foundation), "--foundation_head", mace_head, "--multiheads_finetuning", "False"]
    run, data = _run_mace(d, component, {mace_head: files}, spec, device, previous.charge_embedding,
                          previous.embedding_readout, {mace_head: len(train)}, {mace_head: len(hf_valid)},
                          finetune=opts, e0s=e0)
    blobs = dict(previous.model_files)
    blobs[component] = base64.b64encode(data).decode()
    if any(part[0] == component for part in head_map.get("lf", [])):
        # multihead / replay: mace kept the hf head only, the LF head of that file is gone from the warm model
        head_map = {k: v for k, v in head_map.items() if k != "lf"}
    components = [c for c in previous.components if c.name != component] + [run]
    return previous.model_copy(update={
        "label": label, "heads": list(head_map), "head_map": head_map, "model_files": blobs,
        "components": components, "split": split.as_dict(), "hf_test_extxyz": frames_to_text(hf_test),
        "spec": spec.model_dump(mode="json"), "wall_seconds": time.perf_counter() - t0,
        "warm_started_from": previous.model_sha256(component),
    })


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


def _mace_calc(path: Path, head: str, device: str, dtype: str = "float64"):
    from mace.calculators import MACECalculator

    return MACECalculator(model_paths=str(path), head=head, default_dtype=dtype, device=device)


def _infos_equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


class _InfoAware(Calculator):
    """Recomputes when ``atoms.info`` changes (a new charge at the same geometry), unlike ASE's SumCalculator."""

    def check_state(self, atoms, tol: float = 1e-15):
        state = super().check_state(atoms, tol=tol)
        if not state and self.atoms is not None and not _infos_equal(self.atoms.info, atoms.info):
            state.append("info")
        return state


class DeltaCalculator(_InfoAware):
    """Prediction = base (LF) model + Δ model, both reading q from ``atoms.info['charge']``."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, base, delta, **kwargs):
        super().__init__(**kwargs)
        self.base, self.delta = base, delta

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


class ReferencedCalculator(_InfoAware):
    """A model trained on energies minus per-(fidelity, q) references, with the reference added back (eV):
    ``E = E_model + Σ_Z n_Z e0(Z) + c(q)``; forces and stress are the model's (the reference is constant)."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, base, references: dict[str, Any], **kwargs):
        super().__init__(**kwargs)
        self.base, self.references = base, EnergyReferences(references)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        a = self.atoms.copy()
        self.base.calculate(a, list(properties), all_changes)
        self.results = dict(self.base.results)
        # the reference of the q the model saw (MACE reads info["charge"]), not of a stale training-file key
        a.info[CHARGE_KEY] = int(round(float(self.atoms.info.get("charge", 0))))
        offset = self.references.energy(a)
        for key in ("energy", "free_energy"):
            if key in self.results:
                self.results[key] = self.results[key] + offset
        if "energies" in self.results:  # per-atom energies: spread the constant evenly
            self.results["energies"] = self.results["energies"] + offset / len(self.atoms)

    def get_descriptors(self, atoms=None, invariants_only=True, num_layers=-1):
        return self.base.get_descriptors(atoms, invariants_only=invariants_only, num_layers=num_layers)


def load_calculator(trained: TrainedModel | dict, head: str = "hf", device: str = "cpu", dtype: str | None = None):
    """An ASE calculator for one head of a trained surrogate (the model bytes are written to a cache file).

    ``head``: 'hf' (HF prediction) or 'lf'; 'lf_only' models have only 'lf' and 'hf_only' only 'hf'. Delta models
    give LF + Δ for 'hf' and the LF model for 'lf'; models trained with reference energies add them back. Set the
    total charge in ``atoms.info['charge']`` (e). ``dtype``: float64 or float32 (default: the model's training
    precision). Importing mace (done here) sets torch's default dtype to float64
    and TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 in this process.
    """
    if isinstance(trained, dict):
        trained = TrainedModel.model_validate(trained)
    if head not in trained.heads:
        raise ValueError(f"model {trained.label!r} ({trained.kind}) has no head {head!r}; available: "
                         f"{', '.join(trained.heads)}")
    device = resolve_device(device)
    parts = (trained.head_map or _default_head_map(trained.kind))[head]
    calcs = [_mace_calc(model_path(trained, component), mace_head, device, dtype or trained.default_dtype)
             for component, mace_head in parts]
    calc = calcs[0] if len(calcs) == 1 else DeltaCalculator(*calcs)
    if head in trained.references:
        calc = ReferencedCalculator(calc, trained.references[head])
    return calc


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
