"""Batched surrogate relaxations: every start of one (defect, q) relaxed together with torch-sim's FIRE.

torch-sim (PyPI ``torch-sim-atomistic``) runs one FIRE optimisation over a batch of structures: one MACE call per
step evaluates every structure still moving (converged ones leave the batch). Its ``ase_fire`` flavour is ASE's
FIRE (same dt, maxstep, α schedule), so a batched search follows the path the one-at-a-time ASE loop follows, up to
floating-point summation order. Measured speed-ups: ``benchmarks/speed.py`` and docs/benchmarks.md.

A trained surrogate's prediction for one head is a sum of MACE components (one, or LF + Δ for Δ-learning) plus a
per-(fidelity, q) reference constant (:class:`~defectflow.train.surrogate.ReferencedCalculator`); the constant does
not move atoms and is added to the final energies only.

torch-sim 0.3.0's ``MaceModel`` builds mace's input dictionary without ``total_charge`` and ``head``: a charge-
embedded model would fail on the missing key, and a multi-head model would silently use head 0 (the LF head of
our models). :class:`_ChargedHead` adds both to the dictionary; it is the one place that works around it.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["BatchRelaxation", "batched_relax", "batched_model"]


@dataclass
class BatchRelaxation:
    """Final state of one structure of a batched relaxation."""

    energy: float  # eV, with the model's reference constant
    structure: object  # pymatgen Structure (charge set)
    fmax: float  # largest force at the end, eV/Å
    converged: bool
    path: list = field(default_factory=list)  # (FIRE step, pymatgen Structure) every ``path_every`` steps


def _charged_head(model, charge: int, head_index: int):
    import torch

    class _ChargedHead(torch.nn.Module):
        """mace model + the per-graph ``total_charge`` and ``head`` that torch-sim's MaceModel does not pass."""

        def __init__(self):
            super().__init__()
            self.model = model
            self.r_max = model.r_max
            self.atomic_numbers = model.atomic_numbers

        def forward(self, data, **kwargs):
            n = data["ptr"].numel() - 1
            device = data["positions"].device
            data = dict(data, total_charge=torch.full((n,), float(charge), dtype=data["positions"].dtype,
                                                     device=device),
                        head=torch.full((n,), head_index, dtype=torch.long, device=device))
            return self.model(data, **kwargs)

    return _ChargedHead()


def batched_model(trained, head: str, charge: int, dtype: str = "float64", device: str = "cpu"):
    """A torch-sim model for one head of a trained surrogate at total charge ``charge`` (e): the sum of its MACE
    components (Δ-learning: LF + Δ), without the reference constant. ``dtype``: float64 or float32."""
    import torch
    from torch_sim.models.interface import ModelInterface
    from torch_sim.models.mace import MaceModel

    from defectflow.train.surrogate import _default_head_map, model_path, resolve_device

    torch_dtype = {"float64": torch.float64, "float32": torch.float32}[dtype]
    device = torch.device(resolve_device(device))
    parts = []
    for component, mace_head in (trained.head_map or _default_head_map(trained.kind))[head]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = torch.load(str(model_path(trained, component)), map_location=device, weights_only=False)
        heads = list(getattr(net, "heads", None) or ["Default"])
        index = heads.index(mace_head) if mace_head in heads else 0
        parts.append(MaceModel(_charged_head(net, charge, index), device=device, dtype=torch_dtype,
                               compute_forces=True, compute_stress=False))
    if len(parts) == 1:
        return parts[0]

    class _Sum(ModelInterface):
        """Σ of the components' energies and forces (Δ-learning)."""

        def __init__(self):
            super().__init__()
            self.parts = torch.nn.ModuleList(parts)
            self._device, self._dtype = device, torch_dtype
            self._compute_forces, self._compute_stress = True, False
            self._memory_scales_with = "n_atoms_x_density"

        def forward(self, state, **kwargs):
            outs = [p(state, **kwargs) for p in self.parts]
            return {k: sum(o[k] for o in outs) for k in ("energy", "forces")}

    return _Sum()


def batched_relax(trained, head: str, structures: list, charge: int, fmax: float = 0.02, max_steps: int = 300,
                  dtype: str = "float64", device: str = "cpu", path_every: int = 0) -> list[BatchRelaxation]:
    """Relax ``structures`` (pymatgen, fixed cell) together at charge ``charge`` with one head of a trained surrogate
    until every max |F| < ``fmax`` (eV/Å) or ``max_steps`` FIRE steps (torch-sim, ASE's FIRE flavour).

    ``path_every`` > 0 also keeps every ``path_every``-th structure of each path (torch-sim's trajectory reporter,
    positions stored in float32) in :attr:`BatchRelaxation.path`: the candidates of the active-learning top-up."""
    import tempfile

    import torch_sim as ts
    from ase import Atoms

    from defectflow.train.data import CHARGE_KEY, EnergyReferences

    if not structures:
        return []
    model = batched_model(trained, head, charge, dtype, device)
    refs = trained.references.get(head)
    t0 = time.perf_counter()
    with warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="defectflow-paths-") as tmp:
        warnings.simplefilter("ignore")  # torch-sim warns once the step limit is reached; reported per structure
        files = [Path(tmp) / f"path{i}.h5" for i in range(len(structures))]
        # mode "a": torch-sim reopens the files of the systems still moving each time one converges; its default
        # "w" would truncate their paths so far
        reporter = (ts.TrajectoryReporter(files, state_frequency=path_every, trajectory_kwargs={"mode": "a"})
                    if path_every > 0 else None)
        state = ts.optimize(system=list(structures), model=model, optimizer=ts.optimizers.fire,
                            convergence_fn=ts.generate_force_convergence_fn(fmax, include_cell_forces=False),
                            max_steps=max_steps, autobatcher=False, md_flavor="ase_fire",
                            trajectory_reporter=reporter)
        out = model(state)
        paths = [_read_path(f, st, charge) for f, st in zip(files, structures, strict=True)] if reporter else None
    energies = out["energy"].detach().cpu().numpy().astype(float)
    forces = out["forces"].detach().cpu().numpy().astype(float)
    finals = state.to_structures()
    index = state.system_idx.cpu().numpy()
    results = []
    for i, (st, e) in enumerate(zip(finals, energies, strict=True)):
        st = st.copy()
        st._charge = charge  # pymatgen Structure: the charge torch-sim's conversion drops
        f = float(np.linalg.norm(forces[index == i], axis=1).max()) if len(st) else 0.0
        if refs:
            e += EnergyReferences(refs).energy(Atoms(numbers=st.atomic_numbers, info={CHARGE_KEY: charge}))
        results.append(BatchRelaxation(energy=float(e), structure=st, fmax=f, converged=f < fmax,
                                       path=paths[i] if paths else []))
    logger.debug("batched relaxation of %d structures (q=%+d, %s): %.2f s", len(structures), charge, dtype,
                 time.perf_counter() - t0)
    return results


def _read_path(path: Path, start, charge: int) -> list:
    """(step, Structure at ``charge``) of every frame torch-sim's reporter wrote for one structure (fixed cell: the
    start's)."""
    from pymatgen.core import Structure
    from torch_sim.trajectory import TorchSimTrajectory

    if not path.is_file():
        return []
    with TorchSimTrajectory(path, mode="r") as traj:
        if "positions" not in traj.array_registry:  # converged before its first path frame
            return []
        positions = traj.get_array("positions")
        steps = traj.get_steps("positions")
    return [(int(k), Structure(start.lattice, start.species, np.asarray(x, dtype=float), coords_are_cartesian=True,
                                charge=charge)) for k, x in zip(steps, positions, strict=True)]
