"""Any ASE calculator as an engine: tblite GFN1/GFN2-xTB, a MACE model file, CHGNet, EMT, ...

The total charge is always written to ``atoms.info["charge"]`` (what MACE reads) and, when the calculator takes a
charge keyword (tblite: ``charge``), passed there too. Relaxations are driven by an ASE optimizer and every ionic
step is recorded.

Example (campaign YAML)::

    low:
      engine: ase
      calculator: tblite.ase.TBLite
      kwargs: {method: GFN1-xTB, accuracy: 1.0}
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator

from defectflow.engines.base import AseDrivenEngine, EngineError, EngineSettings
from defectflow.engines.outputs import band_edges

# Calculators we know how to hand a total charge and spin to.  name → (charge kwarg, multiplicity kwarg)
KNOWN_CHARGE_KWARGS: dict[str, tuple[str | None, str | None]] = {
    "tblite.ase.TBLite": ("charge", "multiplicity"),
    "xtb.ase.calculator.XTB": ("charge", "uhf"),
    "mace.calculators.MACECalculator": (None, None),  # reads atoms.info["charge"]
    "mace.calculators.mace.MACECalculator": (None, None),
}


class AseSettings(EngineSettings):
    """An ASE calculator given by import path and keyword arguments."""

    engine: Literal["ase"] = "ase"
    xc: str = Field("ase", description="Method label stored with each frame (e.g. GFN1-xTB, MACE)")
    calculator: str = Field(
        ..., description="Import path of the ASE calculator class or factory, e.g. tblite.ase.TBLite"
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the calculator")
    charge_kwarg: str | None = Field(
        "auto",
        description="Keyword that receives the total charge q (auto: known calculators, else 'charge' if the "
        "calculator accepts it; null: only atoms.info['charge'] is set)",
    )
    spin_kwarg: str | None = Field(
        "auto", description="Keyword that receives the spin (multiplicity for tblite, uhf for xtb); auto as above"
    )
    optimizer: Literal["BFGS", "LBFGS", "FIRE", "BFGSLineSearch"] = Field("BFGS", description="ASE optimizer")

    @field_validator("calculator")
    @classmethod
    def _looks_like_import_path(cls, v: str) -> str:
        if "." not in v.strip("."):
            raise ValueError(f"expected an import path like 'tblite.ase.TBLite', got {v!r}")
        return v

    _digest_exclude: ClassVar[tuple[str, ...]] = ("optimizer",)


def load_calculator_class(path: str):
    """Import ``package.module.Name`` (or ``package.module:Name``) and return the object."""
    module_name, _, attr = path.replace(":", ".").rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EngineError(f"calculator: cannot import module {module_name!r} ({exc})") from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise EngineError(f"calculator: module {module_name!r} has no {attr!r}") from exc


def _accepts(obj, name: str) -> bool:
    """True when ``obj``'s signature names the parameter ``name`` explicitly (a bare ``**kwargs`` does not count)."""
    try:
        return name in inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return False


class AseEngine(AseDrivenEngine):
    """Engine around an arbitrary ASE calculator (tblite xTB for tests and demos, MACE, CHGNet...)."""

    name = "ase"
    settings_class = AseSettings

    @property
    def optimizer(self) -> str:  # type: ignore[override]
        return self.settings.optimizer

    def _kwarg_names(self, factory) -> tuple[str | None, str | None]:
        known = KNOWN_CHARGE_KWARGS.get(self.settings.calculator, (None, None))
        charge_kw = self.settings.charge_kwarg
        spin_kw = self.settings.spin_kwarg
        if charge_kw == "auto":
            if self.settings.calculator in KNOWN_CHARGE_KWARGS:
                charge_kw = known[0]
            else:
                charge_kw = "charge" if _accepts(factory, "charge") else None
        if spin_kw == "auto":
            spin_kw = known[1] if self.settings.calculator in KNOWN_CHARGE_KWARGS else None
        return charge_kw, spin_kw

    def check(self, structure) -> None:
        load_calculator_class(self.settings.calculator)

    def band_edges(self, calc):
        """Band edges from tblite's orbital energies, or from ASE's get_eigenvalues/get_occupation_numbers."""
        from ase.units import Hartree

        res = getattr(calc, "_res", None)  # tblite keeps its tblite.interface.Result here
        if res is not None and hasattr(res, "get"):
            eps = np.asarray(res.get("orbital-energies")) * Hartree
            occ = np.asarray(res.get("orbital-occupations"))
            vbm, cbm = band_edges(eps, occ, 2.0 if eps.ndim == 1 else 1.0)
            return vbm, cbm, None
        if hasattr(calc, "get_eigenvalues") and hasattr(calc, "get_occupation_numbers"):
            nspin = calc.get_number_of_spins() if hasattr(calc, "get_number_of_spins") else 1
            nk = len(calc.get_ibz_k_points()) if hasattr(calc, "get_ibz_k_points") else 1
            eps, occ = [], []
            for k in range(nk):
                for sp in range(nspin):
                    eps.append(calc.get_eigenvalues(kpt=k, spin=sp))
                    w = calc.get_k_point_weights()[k] if hasattr(calc, "get_k_point_weights") else 1.0
                    occ.append(np.asarray(calc.get_occupation_numbers(kpt=k, spin=sp)) / (w or 1.0))
            ef = calc.get_fermi_level() if hasattr(calc, "get_fermi_level") else None
            vbm, cbm = band_edges(eps, occ, 2.0 / nspin)
            return vbm, cbm, ef
        return None, None, None

    def make_calculator(self, atoms, charge: int, workdir: Path):
        factory = load_calculator_class(self.settings.calculator)
        kwargs = dict(self.settings.kwargs)
        charge_kw, spin_kw = self._kwarg_names(factory)
        if charge_kw:
            kwargs.setdefault(charge_kw, int(charge))
        if spin_kw and self.settings.spin != "off":
            n_electrons = sum(atoms.numbers) - int(charge)  # all-electron count: parity equals valence parity
            odd = n_electrons % 2 == 1
            if spin_kw == "multiplicity":
                kwargs.setdefault(spin_kw, 2 if odd else 1)
            elif spin_kw == "uhf":
                kwargs.setdefault(spin_kw, 1 if odd else 0)
        if _accepts(factory, "directory") and "directory" not in kwargs:
            kwargs["directory"] = str(workdir)
        try:
            return factory(**kwargs)
        except TypeError as exc:
            raise EngineError(f"kwargs: {self.settings.calculator} rejected {sorted(kwargs)}: {exc}") from exc


class CalculatorEngine(AseEngine):
    """The ``ase`` engine around a calculator object that is already built (a loaded MACE surrogate, CHGNet): the
    surrogate search and the benchmarks relax through the same driver as every other engine
    (:meth:`AseDrivenEngine.relax`). ``xc`` labels the frames (e.g. ``mace:hf``); the charge reaches the
    calculator through ``atoms.info["charge"]`` only."""

    def __init__(self, calculator, xc: str = "surrogate", optimizer: str = "FIRE", fidelity: str | None = None):
        path = f"{type(calculator).__module__}.{type(calculator).__qualname__}"
        super().__init__(AseSettings(calculator=path, xc=xc, optimizer=optimizer, charge_kwarg=None,
                                     spin_kwarg=None), fidelity=fidelity)
        self.calculator = calculator

    def check(self, structure) -> None:
        """Nothing to import: the calculator exists."""

    def make_calculator(self, atoms, charge: int, workdir: Path | None):
        return self.calculator


__all__ = ["AseEngine", "AseSettings", "CalculatorEngine", "load_calculator_class"]
