"""The built-in selection strategies: ``minima``, ``fps`` and ``stratified``."""

from __future__ import annotations

import logging
import time
import zlib

import numpy as np

from defectflow.engines.base import structure_to_atoms
from defectflow.select.base import Candidate, GreedyStrategy, SelectionState, SelectionStrategy

logger = logging.getLogger(__name__)

__all__ = ["MinimaStrategy", "FPSStrategy", "StratifiedStrategy", "soap_features"]


def _energy_fallback(group: str, state: SelectionState, why: str) -> tuple[Candidate, str] | None:
    """Coverage fallback: the free frame whose energy is farthest from those already chosen in the group."""
    free = state.free(group)
    if not free:
        return None
    chosen_e = [c.energy for c in state.chosen_in(group)]
    if not chosen_e:
        best = min(free, key=lambda c: (c.energy, c.index))
        return best, f"{why}; lowest LF energy frame of {group} (E = {best.energy:.3f} eV)"
    best = max(free, key=lambda c: (min(abs(c.energy - e) for e in chosen_e), -c.energy, -c.index))
    gap = min(abs(best.energy - e) for e in chosen_e)
    return best, (f"{why}; frame with LF energy farthest from those chosen in {group} "
                  f"(ΔE = {gap:.3f} eV, {best.distortion} step {best.step})")


# ---------------------------------------------------------------------------------------------------------------
# minima
# ---------------------------------------------------------------------------------------------------------------
class MinimaStrategy(GreedyStrategy):
    """Lowest distinct LF minima per (defect, q).

    The end points of the relaxations of a group (converged first, then unconverged ones; failed relaxations are
    not minima) are grouped: two end points are the same minimum when their energies differ by at most
    ``spec.energy_tolerance`` eV and pymatgen's StructureMatcher (``match_ltol``, ``match_stol``,
    ``match_angle_tol``; no primitive reduction, no scaling) matches their structures. Each distinct minimum is
    represented by its lowest-energy member (a converged one when there is one). Coverage takes a group's minima
    lowest first; the remaining budget goes to the next-ranked minimum of any group (rank #2 of every group before
    rank #3 of any; within a rank the lowest energy above its group's minimum first). Only when a group has fewer
    distinct minima than ``per_group_min`` does coverage fall back to other frames (energy farthest from those
    chosen); the fill never does, so a selection may use less than the budget.
    """

    name = "minima"

    def prepare(self, state: SelectionState) -> None:
        from pymatgen.analysis.structure_matcher import StructureMatcher

        spec = state.spec
        matcher = StructureMatcher(ltol=spec.match_ltol, stol=spec.match_stol, angle_tol=spec.match_angle_tol,
                                   primitive_cell=False, scale=False, attempt_supercell=False)
        ranked: dict[str, list[tuple[Candidate, str]]] = {}
        for g, cands in state.groups.items():
            finals = [c for c in cands if c.is_final and c.relax_status in ("converged", "unconverged")]
            finals.sort(key=lambda c: (c.relax_status != "converged", c.energy, c.index))
            clusters: list[list[Candidate]] = []
            for c in finals:
                home = next((cl for cl in clusters if abs(cl[0].energy - c.energy) <= spec.energy_tolerance
                             and matcher.fit(cl[0].frame.structure, c.frame.structure)), None)
                if home is None:
                    clusters.append([c])
                else:
                    home.append(c)
            ranked[g] = []
            for k, cl in enumerate(clusters, start=1):
                rep = cl[0]
                same = f"; {len(cl)} relaxations end here" if len(cl) > 1 else ""
                if rep.relax_status == "converged":
                    why = f"lowest distinct LF minimum #{k} of {g} (E = {rep.energy:.3f} eV, {rep.distortion}{same})"
                else:
                    why = (f"distinct LF end point #{k} of {g} from an unconverged relaxation "
                           f"(E = {rep.energy:.3f} eV, {rep.distortion}{same})")
                ranked[g].append((rep, why))
            logger.debug("minima: %s has %d distinct minima among %d end points", g, len(clusters), len(finals))
        state.cache["ranked"] = ranked
        state.cache["emin"] = {g: min(c.energy for c in cands) for g, cands in state.groups.items()}

    def _next_minimum(self, group: str, state: SelectionState) -> tuple[int, Candidate, str] | None:
        for rank, (c, why) in enumerate(state.cache["ranked"][group]):
            if c.index not in state.taken:
                return rank, c, why
        return None

    def coverage_pick(self, group, state):
        nxt = self._next_minimum(group, state)
        if nxt is not None:
            return nxt[1], nxt[2]
        n = len(state.cache["ranked"][group])
        plural = "um" if n == 1 else "a"
        return _energy_fallback(group, state, f"coverage: {group} has only {n} distinct minim{plural}")

    def fill_pick(self, open_groups, state):
        options = []
        for g in open_groups:
            nxt = self._next_minimum(g, state)
            if nxt is not None:
                rank, c, why = nxt
                options.append(((rank, c.energy - state.cache["emin"][g], c.index), c, why))
        if not options:
            return None
        _, c, why = min(options, key=lambda o: o[0])
        return c, why


# ---------------------------------------------------------------------------------------------------------------
# farthest-point sampling
# ---------------------------------------------------------------------------------------------------------------
def soap_features(structures, r_cut: float = 5.0, n_max: int = 6, l_max: int = 4, sigma: float = 0.5,
                  species: list[str] | None = None) -> np.ndarray:
    """Per-structure averaged SOAP (dscribe, ``average='inner'``, periodic): one row per structure."""
    from dscribe.descriptors import SOAP

    atoms = [structure_to_atoms(s, 0) for s in structures]
    if species is None:
        species = sorted({sym for a in atoms for sym in a.get_chemical_symbols()})
    soap = SOAP(species=species, r_cut=r_cut, n_max=n_max, l_max=l_max, sigma=sigma, periodic=True,
                average="inner", sparse=False)
    return np.asarray(soap.create(atoms, n_jobs=1), dtype=float).reshape(len(atoms), -1)


def standardise(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per feature; constant features dropped."""
    std = x.std(axis=0)
    keep = std > 1e-12 * max(1.0, float(np.abs(x).max(initial=0.0)))
    if not keep.any():
        return np.zeros((len(x), 1))
    return (x[:, keep] - x[:, keep].mean(axis=0)) / std[keep]


class FPSStrategy(GreedyStrategy):
    """Farthest-point sampling in a structural descriptor space.

    Every candidate frame is described by its per-structure averaged SOAP vector (dscribe; ``soap_*`` fields),
    standardised over all candidates. Distances are root-mean-square per standardised feature (Euclidean / √d), so
    1.0 means "one standard deviation per feature". Each group starts from its lowest-LF-energy frame
    (deterministic); then greedy max-min: the next frame is the free one farthest from the frames already chosen —
    for its own (defect, q) when ``fps_within_group`` (the default: SOAP cannot see the charge, and the same
    geometry at another q is new information for the HF labels), or from all chosen frames otherwise. Ties go to
    the canonical candidate order, so the result does not depend on the seed.
    """

    name = "fps"

    def prepare(self, state: SelectionState) -> None:
        spec = state.spec
        t0 = time.perf_counter()
        x = soap_features([c.frame.structure for c in state.candidates], r_cut=spec.soap_r_cut,
                          n_max=spec.soap_n_max, l_max=spec.soap_l_max, sigma=spec.soap_sigma)
        state.cache["soap_seconds"] = time.perf_counter() - t0
        z = standardise(x)
        state.cache["z"] = z / np.sqrt(z.shape[1])
        state.cache["mind"] = np.full(len(state.candidates), np.inf)
        state.cache["group_of"] = np.array([c.group for c in state.candidates])
        logger.info("fps: SOAP of %d frames (%d features) in %.2f s", len(x), x.shape[1],
                    state.cache["soap_seconds"])

    def _update(self, cand: Candidate, state: SelectionState) -> None:
        z, mind = state.cache["z"], state.cache["mind"]
        d = np.linalg.norm(z - z[cand.index], axis=1)
        if state.spec.fps_within_group:
            mask = state.cache["group_of"] == cand.group
            mind[mask] = np.minimum(mind[mask], d[mask])
        else:
            np.minimum(mind, d, out=mind)

    def _farthest(self, groups: list[str], state: SelectionState) -> Candidate | None:
        mind = state.cache["mind"]
        free = np.isin(state.cache["group_of"], groups)
        free[list(state.taken)] = False
        idx = np.flatnonzero(free)
        if not len(idx):
            return None
        return state.candidates[int(idx[np.argmax(mind[idx])])]  # argmax: ties keep the earlier candidate

    def _pick(self, groups, state):
        fresh = [g for g in groups if state.count(g) == 0]
        if fresh and (state.spec.fps_within_group or not state.chosen):
            g = fresh[0]
            c = min(state.free(g), key=lambda c: (c.energy, c.index))
            why = (f"farthest-point start: lowest LF energy frame of {g} "
                   f"(E = {c.energy:.3f} eV, {c.distortion} step {c.step})")
        else:
            c = self._farthest(groups, state)
            if c is None:
                return None
            scope = f"of {c.group}" if state.spec.fps_within_group else "(all groups)"
            why = (f"farthest point, distance {state.cache['mind'][c.index]:.2f} to the selected set {scope} "
                   f"(standardised SOAP; {c.distortion} step {c.step}, E = {c.energy:.3f} eV)")
        self._update(c, state)
        return c, why

    def coverage_pick(self, group, state):
        return self._pick([group], state)

    def fill_pick(self, open_groups, state):
        return self._pick(open_groups, state)


# ---------------------------------------------------------------------------------------------------------------
# energy-stratified
# ---------------------------------------------------------------------------------------------------------------
class StratifiedStrategy(SelectionStrategy):
    """Energy-stratified sampling along the trajectories of each (defect, q).

    First each group's share of the budget: ``per_group_min`` each (coverage), then the rest one frame per group in
    turn (groups with more candidates first) up to ``per_group_max`` / their number of candidates — an equal share,
    because every (defect, q) is a separate energy landscape for the HF head. Then, per group, its candidate
    energies are cut into ``strata`` equal-width bins between the group's lowest and highest LF energy (default: as
    many bins as frames the group receives) and one frame is drawn at random (``seed``) from each non-empty bin,
    bins spread evenly from the lowest when the group receives fewer frames than there are non-empty bins. When
    there are fewer non-empty bins than frames to draw, the extra frames come from the bins with the most frames
    left. Each group has its own random stream (seed, group name), so adding a defect does not reshuffle the others.
    """

    name = "stratified"

    def choose(self, state: SelectionState) -> None:
        spec = state.spec
        quota = {g: min(spec.per_group_min, state.caps[g]) for g in state.groups}
        left = spec.budget - sum(quota.values())
        order = sorted(state.groups, key=lambda g: (-len(state.groups[g]), g))
        while left > 0:
            grew = False
            for g in order:
                if left > 0 and quota[g] < state.caps[g]:
                    quota[g] += 1
                    left -= 1
                    grew = True
            if not grew:
                break
        for g, cands in state.groups.items():
            for c, why in self._draw(g, cands, quota[g], spec):
                state.add(c, why)

    @staticmethod
    def _draw(g: str, cands: list[Candidate], n: int, spec) -> list[tuple[Candidate, str]]:
        if n <= 0:
            return []
        rng = np.random.default_rng([int(spec.seed) & 0xFFFFFFFF, zlib.crc32(g.encode())])
        e = np.array([c.energy for c in cands])
        lo, hi = float(e.min()), float(e.max())
        nbins = spec.strata or n
        if hi - lo <= 0:
            idx = np.zeros(len(e), dtype=int)
        else:
            idx = np.minimum(((e - lo) / (hi - lo) * nbins).astype(int), nbins - 1)
        members = {b: [i for i in range(len(cands)) if idx[i] == b] for b in range(nbins)}
        nonempty = [b for b in range(nbins) if members[b]]
        width = (hi - lo) / nbins

        def label(b):
            return (f"energy stratum {b + 1}/{nbins} of {g} ({lo + b * width:.3f} … {lo + (b + 1) * width:.3f} eV), "
                    f"random within stratum (seed {spec.seed})")

        out: list[tuple[Candidate, str]] = []
        if n <= len(nonempty):
            picks = [nonempty[int(round(t))] for t in np.linspace(0, len(nonempty) - 1, n)]
        else:
            picks = list(nonempty)
        for b in picks:
            i = members[b].pop(int(rng.integers(len(members[b]))))
            out.append((cands[i], label(b)))
        while len(out) < n:
            b = max(nonempty, key=lambda b: (len(members[b]), -b))
            if not members[b]:
                break
            i = members[b].pop(int(rng.integers(len(members[b]))))
            out.append((cands[i], "extra draw (fewer non-empty strata than frames): " + label(b)))
        return out
