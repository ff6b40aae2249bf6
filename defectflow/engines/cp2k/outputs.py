"""CP2K outputs: SCF convergence and band edges from the part of ``cp2k.out`` written during one evaluation."""

from __future__ import annotations

import re

from defectflow.engines.outputs import band_edges

__all__ = ["parse_band_edges", "parse_scf"]


_CONV = re.compile(r"SCF run converged in\s+(\d+)\s+steps")
_NOTCONV = re.compile(r"SCF run NOT converged")


def parse_scf(text: str) -> tuple[bool, int | None]:
    """(converged, SCF iterations) from the CP2K output written during one energy/force evaluation."""
    if _NOTCONV.search(text):
        return False, None
    steps = [int(m) for m in _CONV.findall(text)]
    if steps:
        return True, steps[-1]
    return True, None  # nothing printed (e.g. PRINT_LEVEL SILENT): assume converged


_MO_ROW = re.compile(r"^\s*MO\|\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s*$")
_MO_FERMI = re.compile(r"MO\|\s*E\(Fermi\):.*?(\S+)\s+eV")


def parse_band_edges(text: str) -> tuple[float | None, float | None, float | None]:
    """(VBM, CBM, Fermi level) in eV from the ``MO|`` eigenvalue tables of one evaluation (see ``MO_PRINT``).

    VBM = highest eigenvalue with occupation > half the maximum (2 restricted, 1 per spin channel
    unrestricted), CBM = lowest one below half, over both spins (:func:`defectflow.engines.outputs.band_edges`,
    as for every engine); the Fermi level is CP2K's ``E(Fermi)`` (with
    smearing). Only the last table per spin channel counts. Nones when CP2K printed no table.
    """
    tables: dict[str, list[tuple[float, float]]] = {}
    fermi = None
    label = None
    for ln in text.splitlines():
        if "EIGENVALUES AND OCCUPATION NUMBERS" in ln and ln.lstrip().startswith("MO|"):
            label = "beta" if "BETA" in ln else ("alpha" if "ALPHA" in ln else "restricted")
            tables[label] = []
            continue
        if label is None:
            continue
        m = _MO_ROW.match(ln)
        if m:
            try:
                tables[label].append((float(m.group(3)), float(m.group(4))))
            except ValueError:  # "****" overflow
                pass
            continue
        m = _MO_FERMI.search(ln)
        if m:
            try:
                fermi = float(m.group(1))
            except ValueError:
                pass
    if not tables:
        return None, None, None
    levels = [(e, o, 2.0 if name == "restricted" else 1.0) for name, rows in tables.items() for e, o in rows]
    eigenvalues, occupations, full = zip(*levels, strict=True) if levels else ((), (), ())
    vbm, cbm = band_edges(eigenvalues, occupations, full or 1.0)
    return vbm, cbm, fermi
