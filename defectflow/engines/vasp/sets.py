"""The atomate2 input-set generator of the ``vasp`` engine: a defect supercell at total charge q.

A module of its own because it subclasses atomate2's ``VaspInputGenerator`` at import time, and importing atomate2
takes seconds: :mod:`defectflow.engines.vasp` does not import this module, :func:`~defectflow.engines.vasp.relax_maker`
and :func:`~defectflow.engines.vasp.static_maker` do. A serialised maker names this module and class
(``"@module": "defectflow.engines.vasp.sets"``), so a worker process rebuilds it with a plain import.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

from atomate2.vasp.sets.base import _BASE_VASP_SET, VaspInputGenerator
from pymatgen.io.vasp.inputs import Kpoints

from defectflow.engines.vasp.inputs import _doped_potcar_symbols, zval_for

logger = logging.getLogger(__name__)

__all__ = ["DefectSetGenerator"]


def _config() -> dict:
    """atomate2's base VASP set with doped's default POTCAR symbols (doped/VASP_sets/PotcarSet.yaml)."""
    config = copy.deepcopy(_BASE_VASP_SET)
    config["POTCAR"].update(_doped_potcar_symbols())
    return config


@dataclass
class DefectSetGenerator(VaspInputGenerator):
    """atomate2 input-set generator for a defect supercell at total charge ``charge`` (e).

    ``NELECT = sum(ZVAL) - charge`` whatever ``structure.charge`` is (a structure handed over from a previous
    job has lost its charge). ZVALs come from the POTCARs when pymatgen finds them, else from pymatgen's
    bundled POTCAR data. ``user_incar_settings`` hold the full defect INCAR
    (:func:`~defectflow.engines.vasp.inputs.defect_incar`), so the parent set's ``incar_updates`` and pymatgen's
    auto-smearing never override them.
    """

    charge: int = 0
    config_dict: dict = field(default_factory=_config)
    use_structure_charge: bool = True  # makes pymatgen write NELECT (from `nelect` below)
    force_gamma: bool = True
    auto_ismear: bool = False
    user_kpoints_settings: Any = field(default_factory=lambda: Kpoints.gamma_automatic((1, 1, 1)))

    @property
    def incar_updates(self) -> dict:
        return {}

    @property
    def nelect(self) -> float:
        if self.structure is None:
            raise RuntimeError("No structure is associated with the input set!")
        try:
            by_element = {p.element: p.nelectrons for p in self.potcar}
        except Exception as exc:  # POTCARs not installed here (PmgVaspPspDirError, FileNotFoundError, ...)
            logger.debug("POTCARs unavailable (%s): ZVALs from pymatgen's POTCAR summary data", exc)
            symbols = self.potcar_symbols
            functional = self.user_potcar_functional or self._config_dict.get("POTCAR_FUNCTIONAL", "PBE_54")
            by_element = {
                el: zval_for(sym, functional) for el, sym in zip(self.poscar.site_symbols, symbols, strict=True)
            }
        neutral = sum(n * by_element[el.symbol] for el, n in self.structure.composition.items())
        if self.structure.charge and int(round(self.structure.charge)) != self.charge:
            logger.warning(
                "structure.charge = %s differs from the generator's charge %+d; NELECT uses %+d",
                self.structure.charge,
                self.charge,
                self.charge,
            )
        return float(neutral - self.charge)
