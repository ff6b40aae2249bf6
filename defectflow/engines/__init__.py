"""Charge-aware engines: ``qe`` (Quantum ESPRESSO), ``cp2k``, ``vasp`` (atomate2 makers) and ``ase`` (any ASE
calculator: tblite xTB, a MACE model, CHGNet, EMT...).

Layout (one package per code, as in atomate2): ``engines/<code>/`` with ``settings.py`` (the pydantic settings),
``inputs.py`` (input writers: ASE's pw.x writer, the CP2K template, atomate2 VASP makers), ``outputs.py`` (parsers
→ Frames), ``engine.py`` (the :class:`~defectflow.engines.base.Engine`); ``ase.py`` for any ASE calculator.
Shared: :mod:`~defectflow.engines.base` (the interface), :mod:`~defectflow.engines.outputs` (band edges),
:mod:`~defectflow.engines.process` (child processes: own session, ended on timeout or interrupt;
``terminate_all()`` for a top-level signal handler).

>>> from defectflow.engines import get_engine
>>> engine = get_engine({"engine": "ase", "calculator": "tblite.ase.TBLite", "kwargs": {"method": "GFN1-xTB"}})
>>> frame = engine.single_point(structure, charge=-1)          # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from defectflow.engines.ase import AseEngine, AseSettings, CalculatorEngine
from defectflow.engines.base import Engine, EngineError, EngineSettings
from defectflow.engines.cp2k import CP2KEngine, CP2KSettings
from defectflow.engines.qe import QEEngine, QESettings
from defectflow.engines.vasp import VaspEngine, VaspSettings

ENGINES: dict[str, type[Engine]] = {
    "qe": QEEngine,
    "cp2k": CP2KEngine,
    "vasp": VaspEngine,
    "ase": AseEngine,
}

SETTINGS: dict[str, type[EngineSettings]] = {name: cls.settings_class for name, cls in ENGINES.items()}


def get_engine(settings: EngineSettings | dict[str, Any], fidelity: str | None = None) -> Engine:
    """Build an engine from validated settings or a plain dict with an ``engine`` key."""
    if isinstance(settings, dict):
        name = settings.get("engine")
        if name not in ENGINES:
            raise EngineError(f"engine: expected one of {', '.join(map(repr, ENGINES))}, got {name!r}")
        return ENGINES[name](settings, fidelity=fidelity)
    return ENGINES[settings.engine](settings, fidelity=fidelity)


__all__ = [
    "ENGINES",
    "SETTINGS",
    "AseEngine",
    "AseSettings",
    "CalculatorEngine",
    "CP2KEngine",
    "CP2KSettings",
    "Engine",
    "EngineError",
    "EngineSettings",
    "QEEngine",
    "QESettings",
    "VaspEngine",
    "VaspSettings",
    "get_engine",
]
