"""Training-set files for mace-torch: reading extxyz text, the deterministic split, Δ targets.

Key names (extxyz ``info`` / ``arrays``), shared with :func:`defectflow.relax.frames_to_extxyz`:

==================  ========  ====================================================================================
key                 where     meaning
==================  ========  ====================================================================================
``REF_energy``      info      total energy of the frame's own fidelity, eV
``REF_forces``      arrays    forces of the frame's own fidelity, eV/Å
``total_charge``    info      total charge q of the cell, e (MACE's charge embedding reads it at training time)
``head``            info      MACE head (lf / hf); rewritten here per training file
``LF_energy``       info      HF frames only, for ``multi_fidelity='delta'``: LF total energy at the same geometry, eV
``LF_forces``       arrays    HF frames only, for ``multi_fidelity='delta'``: LF forces at the same geometry, eV/Å
``REF_stress``      info      stress of the frame's own fidelity (Voigt, ASE sign), eV/Å³, when the engine gives it
``fidelity``        info      the frame's fidelity name (low / high)
``defect``          info      defect name (v_Si)
``distortion``      info      ShakeNBreak start the frame's relaxation began from
``step``            info      ionic step of that relaxation (0: the start)
``split``           info      written here: train / valid / test
``source_index``    info      written here: index of the frame in the extxyz it came from
``config_weight``   info      written here: the frame's weight in mace's loss (energy and forces), see
                              :func:`frame_weights`
==================  ========  ====================================================================================

HF frames are single points on geometries of the LF relaxations, so the pipeline knows their LF labels; when it
only has the two extxyz texts, :func:`attach_lf_labels` copies them over by matching geometry and charge.
Every extxyz defectflow writes or reads goes through this module (:func:`frame_to_atoms`, :func:`frames_to_extxyz`,
:func:`hf_extxyz`, :func:`frames_to_text`, :func:`read_frames`): the keys above are spelled nowhere else.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from defectflow.engines.base import structure_to_atoms
from defectflow.schemas import Frame

logger = logging.getLogger(__name__)

__all__ = [
    "ENERGY_KEY",
    "FORCES_KEY",
    "CHARGE_KEY",
    "LF_ENERGY_KEY",
    "LF_FORCES_KEY",
    "STRESS_KEY",
    "frame_to_atoms",
    "frames_to_extxyz",
    "hf_extxyz",
    "Split",
    "read_frames",
    "write_frames",
    "frames_to_text",
    "split_frames",
    "attach_lf_labels",
    "delta_frames",
    "charge_of",
    "charge_label",
    "WEIGHT_KEY",
    "EnergyReferences",
    "fit_references",
    "fill_references",
    "subtract_references",
    "frame_weights",
]

ENERGY_KEY = "REF_energy"
FORCES_KEY = "REF_forces"
STRESS_KEY = "REF_stress"
CHARGE_KEY = "total_charge"
LF_ENERGY_KEY = "LF_energy"
LF_FORCES_KEY = "LF_forces"
WEIGHT_KEY = "config_weight"  # mace-torch's per-frame loss weight (mace/data/utils.py: energy and forces)


def frame_to_atoms(frame: Frame, head: str, meta: dict[str, Any], fidelity: str | None = None,
                   stress: bool = True) -> Atoms:
    """One frame as ASE Atoms with MACE's keys (module docstring): energy, forces, (stress), total charge, head,
    fidelity and step, plus ``meta`` (defect, distortion, ...) in ``info``."""
    atoms = structure_to_atoms(frame.structure, frame.charge)
    atoms.info.pop("charge", None)  # extxyz would clash with ASE's own "charge" handling
    atoms.info.update({ENERGY_KEY: frame.energy, CHARGE_KEY: frame.charge, "head": head,
                       "fidelity": fidelity or frame.fidelity or head, "step": frame.step, **meta})
    atoms.arrays[FORCES_KEY] = frame.forces_array
    if stress and frame.stress is not None:
        atoms.info[STRESS_KEY] = np.asarray(frame.stress, dtype=float)
    return atoms


def frames_to_extxyz(frames: Sequence[tuple[Frame, dict[str, Any]]], head: str) -> str:
    """(frame, meta) pairs → extxyz text with MACE's keys (:func:`frame_to_atoms`)."""
    return frames_to_text([frame_to_atoms(frame, head, meta) for frame, meta in frames])


def hf_extxyz(pairs: Sequence[tuple[Frame, Frame | None, dict[str, Any]]], head: str = "hf") -> str:
    """(HF frame, LF frame at the same geometry, meta) → extxyz of the HF frames with the LF labels
    (``LF_energy``/``LF_forces``) attached where the LF frame has them (Δ-learning needs them)."""
    images = []
    for hf, lf, meta in pairs:
        atoms = frame_to_atoms(hf, head, meta, fidelity="high", stress=False)
        if lf is not None and lf.energy is not None:
            atoms.info[LF_ENERGY_KEY] = lf.energy
            atoms.arrays[LF_FORCES_KEY] = lf.forces_array
        images.append(atoms)
    return frames_to_text(images)


def read_frames(extxyz: str | Path | None) -> list[Atoms]:
    """Frames from extxyz *text* (or a path to an extxyz file). Empty text → []."""
    from ase.io import read

    if extxyz is None:
        return []
    if isinstance(extxyz, Path) or (isinstance(extxyz, str) and "\n" not in extxyz and Path(extxyz).is_file()):
        text = Path(extxyz).read_text()
    else:
        text = str(extxyz)
    if not text.strip():
        return []
    frames = read(io.StringIO(text), index=":", format="extxyz")
    for i, atoms in enumerate(frames):
        if ENERGY_KEY not in atoms.info or FORCES_KEY not in atoms.arrays:
            raise ValueError(f"frame {i}: extxyz lacks {ENERGY_KEY!r} (info) or {FORCES_KEY!r} (arrays)")
        if CHARGE_KEY not in atoms.info:
            raise ValueError(f"frame {i}: extxyz lacks the total charge {CHARGE_KEY!r} (info): expected the cell's "
                             "charge q in e (mace-torch would train the frame as q = 0)")
    return frames


def frames_to_text(frames: Sequence[Atoms]) -> str:
    """Frames → extxyz text (info and arrays kept)."""
    from ase.io import write

    buf = io.StringIO()
    if frames:
        write(buf, list(frames), format="extxyz")
    return buf.getvalue()


def write_frames(path: str | Path, frames: Sequence[Atoms], head: str | None = None) -> Path:
    """Write frames to an extxyz file for mace_run_train (``head`` rewritten when given)."""
    path = Path(path)
    out = []
    for atoms in frames:
        a = atoms.copy()
        if head is not None:
            a.info["head"] = head
        out.append(a)
    path.write_text(frames_to_text(out))
    return path


def charge_of(atoms: Atoms) -> int:
    """Total charge q (e) of a frame: ``total_charge`` (training files) or ``charge`` (ASE/MACE convention)."""
    if CHARGE_KEY in atoms.info:
        return int(round(float(atoms.info[CHARGE_KEY])))
    return int(round(float(atoms.info.get("charge", 0))))


def charge_label(q: int) -> str:
    """Stable dictionary key for a charge state: '-1', '0', '+1' (no dots: safe for MongoDB and MontyStore)."""
    return f"+{q}" if q > 0 else str(q)


class Split:
    """Index sets into the LF and HF frame lists (see :func:`split_frames`)."""

    def __init__(self, lf_train, lf_valid, hf_train, hf_valid, hf_test):
        self.lf_train, self.lf_valid = list(lf_train), list(lf_valid)
        self.hf_train, self.hf_valid, self.hf_test = list(hf_train), list(hf_valid), list(hf_test)

    def as_dict(self) -> dict[str, list[int]]:
        return {k: getattr(self, k) for k in ("lf_train", "lf_valid", "hf_train", "hf_valid", "hf_test")}


def _n_test(n: int, fraction: float) -> int:
    if n < 3 or fraction <= 0:
        return 0
    return int(min(max(1, round(fraction * n)), n - 2))  # always keep ≥ 2 frames for train + valid


def _n_valid(n: int, fraction: float) -> int:
    if n < 2:
        return 0  # the one frame trains and validates (see split_frames)
    return int(min(max(1, round(fraction * n)), n - 1))


def _charge_balanced(indices: list[int], charges: list[int], n: int) -> list[int]:
    """Take ``n`` of ``indices`` (already shuffled) round-robin over charge states, so every q is represented."""
    by_q: dict[int, list[int]] = {}
    for i in indices:
        by_q.setdefault(charges[i], []).append(i)
    picked: list[int] = []
    queues = [by_q[q] for q in sorted(by_q)]
    while len(picked) < n:
        for qu in queues:
            if qu and len(picked) < n:
                picked.append(qu.pop(0))
    return picked


def split_frames(lf: Sequence[Atoms], hf: Sequence[Atoms], test_fraction: float, valid_fraction: float,
                 seed: int) -> Split:
    """Deterministic split for a seed.

    * HF: ``round(test_fraction × n_HF)`` frames (at least 1 when n_HF ≥ 3 and test_fraction > 0; at most n_HF − 2)
      are held out as the test set, chosen round-robin over charge states so every q is tested when possible; of
      the rest, ``round(valid_fraction × n)`` (at least 1) validate and the others train.
    * LF: ``valid_fraction`` (at least 1 frame) validates, the rest trains; no LF test set (the LF head is checked
      on its validation frames).
    * A set with a single frame trains *and* validates on it (mace-torch needs a non-empty validation set).
    """
    rng = np.random.default_rng(seed)
    hf_q = [charge_of(a) for a in hf]
    lf_q = [charge_of(a) for a in lf]
    hf_perm = [int(i) for i in rng.permutation(len(hf))]
    test = sorted(_charge_balanced(hf_perm, hf_q, _n_test(len(hf), test_fraction)))
    rest = [i for i in hf_perm if i not in set(test)]
    hf_valid = sorted(_charge_balanced(rest, hf_q, _n_valid(len(rest), valid_fraction)))
    hf_train = sorted(i for i in rest if i not in set(hf_valid))
    if len(rest) == 1:
        hf_train = hf_valid = list(rest)
    lf_perm = [int(i) for i in rng.permutation(len(lf))]
    lf_valid = sorted(_charge_balanced(lf_perm, lf_q, _n_valid(len(lf), valid_fraction)))
    lf_train = sorted(i for i in lf_perm if i not in set(lf_valid))
    if len(lf) == 1:
        lf_train = lf_valid = [0]
    return Split(lf_train, lf_valid, hf_train, hf_valid, test)


def tagged(frames: Sequence[Atoms], indices: Sequence[int], split: str) -> list[Atoms]:
    """Copies of ``frames[indices]`` with ``info['split']`` and ``info['source_index']``."""
    out = []
    for i in indices:
        a = frames[i].copy()
        a.info["split"] = split
        a.info["source_index"] = int(i)
        out.append(a)
    return out


def attach_lf_labels(hf: Sequence[Atoms], lf: Sequence[Atoms], tol: float = 1e-5) -> list[Atoms]:
    """Copies of the HF frames with ``LF_energy``/``LF_forces`` taken from the LF frame of identical geometry.

    Frames match when they have the same charge, species, cell and Cartesian positions within ``tol`` Å. An HF
    frame that already carries LF labels is kept as is. Raises ValueError naming the first unmatched HF frame.
    """
    index: dict[tuple, list[Atoms]] = {}
    for a in lf:
        index.setdefault((charge_of(a), len(a), tuple(a.numbers)), []).append(a)
    out = []
    for i, h in enumerate(hf):
        h = h.copy()
        if LF_ENERGY_KEY in h.info and LF_FORCES_KEY in h.arrays:
            out.append(h)
            continue
        match = None
        for cand in index.get((charge_of(h), len(h), tuple(h.numbers)), []):
            if np.allclose(cand.cell.array, h.cell.array, atol=tol) and np.allclose(cand.positions, h.positions,
                                                                                       atol=tol):
                match = cand
                break
        if match is None:
            raise ValueError(
                f"HF frame {i} (q={charge_of(h)}): no LF frame with the same geometry; delta learning needs the LF "
                f"labels of every HF frame (info {LF_ENERGY_KEY!r}, arrays {LF_FORCES_KEY!r})"
            )
        h.info[LF_ENERGY_KEY] = float(match.info[ENERGY_KEY])
        h.arrays[LF_FORCES_KEY] = np.array(match.arrays[FORCES_KEY], dtype=float)
        out.append(h)
    return out


def delta_frames(hf: Sequence[Atoms]) -> list[Atoms]:
    """Δ targets for delta learning: ``REF_energy`` = E_HF − E_LF (eV), ``REF_forces`` = F_HF − F_LF (eV/Å)."""
    out = []
    for i, h in enumerate(hf):
        if LF_ENERGY_KEY not in h.info or LF_FORCES_KEY not in h.arrays:
            raise ValueError(
                f"HF frame {i}: delta learning needs the LF labels at the same geometry in the HF extxyz "
                f"(info {LF_ENERGY_KEY!r} in eV, arrays {LF_FORCES_KEY!r} in eV/Å); see attach_lf_labels"
            )
        d = h.copy()
        d.info[ENERGY_KEY] = float(h.info[ENERGY_KEY]) - float(h.info[LF_ENERGY_KEY])
        d.arrays[FORCES_KEY] = np.asarray(h.arrays[FORCES_KEY], float) - np.asarray(h.arrays[LF_FORCES_KEY], float)
        del d.info[LF_ENERGY_KEY]
        del d.arrays[LF_FORCES_KEY]
        out.append(d)
    return out


# ---------------------------------------------------------------------------------------------------------------
# per-(fidelity, q) reference energies and frame weights
# ---------------------------------------------------------------------------------------------------------------
class EnergyReferences(dict):
    """Least-squares reference energies of one fidelity: ``E_ref = Σ_Z n_Z e0[Z] + c[q]`` (eV).

    A plain dict (JSON-ready): ``{"e0": {"14": eV}, "charge": {"0": eV, "+1": eV}}``. Charged supercells of one
    fidelity differ by eV per unit of q (the electrons' chemical potential, the compensating background): removing
    these constants before training leaves the model the interaction energy only, which LF and HF share.
    """

    def energy(self, atoms: Atoms) -> float:
        q = charge_label(charge_of(atoms))
        if q not in self["charge"]:
            raise ValueError(f"no reference energy for q = {q} (fitted for q = {', '.join(self['charge'])}); "
                             "the training frames of this fidelity must cover every charge state predicted")
        e0 = self["e0"]
        return float(sum(e0[str(z)] for z in atoms.numbers) + self["charge"][q])


def fit_references(frames: Sequence[Atoms], baseline: EnergyReferences | None = None) -> EnergyReferences:
    """Fit :class:`EnergyReferences` to frames of one fidelity (``REF_energy``): minimum-norm least squares over
    [atom counts per element, one-hot q] — with one element and one cell size the split between e0 and c[q] is
    arbitrary, their sum (what is subtracted) is not.

    ``baseline``: the LF references. HF frames that carry their LF energy at the same geometry (``LF_energy``) are
    then fitted through the difference, E_HF − E_LF ≈ Σ n_Z Δe0(Z) + Δc(q), and the result is baseline + Δ. The
    HF − LF difference varies far less between geometries than either energy, so a few HF frames that include
    eV-high ShakeNBreak starts still give the constants of the low-energy region (a direct fit to such frames
    does not)."""
    if not frames:
        raise ValueError("fit_references: no frames")
    use_delta = baseline is not None and all(LF_ENERGY_KEY in a.info for a in frames)
    zs = sorted({int(z) for a in frames for z in a.numbers})
    qs = sorted({charge_of(a) for a in frames})
    x = np.zeros((len(frames), len(zs) + len(qs)))
    y = np.array([float(a.info[ENERGY_KEY]) - (float(a.info[LF_ENERGY_KEY]) if use_delta else 0.0)
                  for a in frames])
    for i, a in enumerate(frames):
        for j, z in enumerate(zs):
            x[i, j] = np.count_nonzero(a.numbers == z)
        x[i, len(zs) + qs.index(charge_of(a))] = 1.0
    theta = np.linalg.lstsq(x, y, rcond=None)[0]
    refs = EnergyReferences(e0={str(z): float(theta[j]) for j, z in enumerate(zs)},
                            charge={charge_label(q): float(theta[len(zs) + k]) for k, q in enumerate(qs)})
    if not use_delta:
        return refs
    missing = [q for q in refs["charge"] if q not in baseline["charge"]] + [z for z in refs["e0"]
                                                                            if z not in baseline["e0"]]
    if missing:
        raise ValueError(f"fit_references: the LF references lack {', '.join(missing)} (charge states / elements "
                         "of the HF frames); fit the LF references on frames that cover them")
    return EnergyReferences(e0={z: baseline["e0"][z] + v for z, v in refs["e0"].items()},
                            charge={q: baseline["charge"][q] + v for q, v in refs["charge"].items()})


def fill_references(refs: EnergyReferences, other: EnergyReferences) -> EnergyReferences:
    """``refs`` with the charge states it lacks taken from ``other`` (another fidelity), shifted by the mean
    difference of the charge states both have (e.g. an HF fit from a few frames that miss one q)."""
    common = [q for q in refs["charge"] if q in other["charge"]]
    missing = [q for q in other["charge"] if q not in refs["charge"]]
    if not missing or not common:
        return refs
    shift = float(np.mean([refs["charge"][q] - other["charge"][q] for q in common]))
    charge = dict(refs["charge"])
    for q in missing:
        charge[q] = other["charge"][q] + shift
    return EnergyReferences(e0=dict(refs["e0"]), charge=charge)


def subtract_references(frames: Sequence[Atoms], refs: EnergyReferences) -> list[Atoms]:
    """Copies with ``REF_energy`` (and ``LF_energy``, when present, is left alone) minus the reference energy."""
    out = []
    for a in frames:
        b = a.copy()
        b.info[ENERGY_KEY] = float(a.info[ENERGY_KEY]) - refs.energy(a)
        out.append(b)
    return out


def frame_weights(frames: Sequence[Atoms], scale: float | None, floor: float = 0.1,
                  factor: float = 1.0) -> list[float]:
    """Per-frame loss weights ``factor × max(floor, exp(−ΔE / scale))``, ΔE = energy per atom above the lowest
    frame of the same q in ``frames`` (eV/atom); ``scale=None`` → uniform ``factor``.

    The search ranks minima that differ by meV/atom while its starts lie eV above them: weights of this form spend
    the model's capacity on the low-energy region without dropping the high-energy frames the search passes
    through (a hard energy cut does: issue #13's first measurement)."""
    if scale is None:
        return [float(factor)] * len(frames)
    per_atom = [float(a.info[ENERGY_KEY]) / len(a) for a in frames]
    lowest: dict[int, float] = {}
    for a, e in zip(frames, per_atom):
        q = charge_of(a)
        lowest[q] = min(lowest.get(q, e), e)
    return [float(factor * max(floor, np.exp(-(e - lowest[charge_of(a)]) / scale))) for a, e in zip(frames, per_atom)]
