"""Committee uncertainty of the surrogate: how far its prediction at a structure can be trusted.

A committee is the main surrogate plus ``mlip.committee − 1`` members trained the same way with other seeds and
data splits (:func:`defectflow.train.jobs.train_models`). At a structure, the spread of their predictions is the
uncertainty: the standard deviation of the total energy (eV) over the members, and the largest over atoms of the
standard deviation of the force vector (eV/Å, ``sqrt(mean_m |F_m,i − F̄_i|²)``). The search uses the energy spread
relative to the other structures of the same search (``relative_energy_std``: a member's constant offset removed)
and ranks top-up candidates by the force spread, which carries no offset (benchmarks/uncertainty.py: on the frozen
direct-HF frames the force spread ranks the true errors with Spearman 0.75, the energy spread with 0.50). All
members are evaluated on all structures in one batched model call each (torch-sim, the search's own model
wrapper).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

__all__ = ["CommitteePrediction", "committee_predict"]


@dataclass
class CommitteePrediction:
    """Predictions of every member at every structure (energies with the models' reference constants)."""

    energies: np.ndarray  # [members, structures], eV
    forces: list[np.ndarray]  # per structure: [members, atoms, 3], eV/Å

    @property
    def energy(self) -> np.ndarray:
        """Committee mean energy per structure, eV."""
        return self.energies.mean(axis=0)

    @property
    def energy_std(self) -> np.ndarray:
        """Standard deviation of the total energy over the members, per structure, eV (0 for one member)."""
        return self.energies.std(axis=0)

    @property
    def relative_energy_std(self) -> np.ndarray:
        """Standard deviation over the members of each structure's energy relative to the others passed together
        (each member's mean over them removed), eV. A constant offset of one member, as members trained on other
        splits of few HF frames carry per charge state, changes no energy difference and so no ranking: this is
        the spread that ranking feels. Meaningful for structures of one charge state."""
        e = self.energies - self.energies.mean(axis=1, keepdims=True)
        return e.std(axis=0)

    @property
    def force_std(self) -> np.ndarray:
        """Largest per-atom standard deviation of the force vector over the members, per structure, eV/Å."""
        return np.array([float(np.sqrt(((f - f.mean(axis=0)) ** 2).sum(axis=2).mean(axis=0)).max()) if f.size else 0.0
                         for f in self.forces])


def committee_predict(models: list, head: str, structures: list, charge: int, dtype: str = "float64",
                      device: str = "cpu", chunk: int = 64) -> CommitteePrediction:
    """Energies and forces of every committee member (TrainedModel, head ``head``) at every structure (pymatgen,
    charge ``charge``): batched evaluations of ``chunk`` structures per member."""
    import torch_sim as ts
    from ase import Atoms

    from defectflow.search.batched import batched_model
    from defectflow.train.data import CHARGE_KEY, EnergyReferences

    if not models:
        raise ValueError("committee_predict: no models")
    n = len(structures)
    energies = np.zeros((len(models), n))
    forces = [np.zeros((len(models), len(s), 3)) for s in structures]
    if n == 0:
        return CommitteePrediction(energies, forces)
    for m, trained in enumerate(models):
        model = batched_model(trained, head, charge, dtype, device)
        refs = trained.references.get(head)
        for lo in range(0, n, chunk):  # bounded memory: a search's path frames can be thousands of structures
            part = list(structures[lo:lo + chunk])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = ts.initialize_state(part, model.device, model.dtype)
                out = model(state)
            e = out["energy"].detach().cpu().numpy().astype(float)
            f = out["forces"].detach().cpu().numpy().astype(float)
            idx = state.system_idx.cpu().numpy()
            for j, st in enumerate(part):
                energies[m, lo + j] = e[j] + (EnergyReferences(refs).energy(
                    Atoms(numbers=st.atomic_numbers, info={CHARGE_KEY: charge})) if refs else 0.0)
                forces[lo + j][m] = f[idx == j]
    return CommitteePrediction(energies, forces)
