"""CP2K inputs: basis-set and potential files, valence electrons and spin, and the input template handed to ASE's
CP2K calculator (ASE adds cell, coordinates, charge, UKS, cutoff, basis and potential names)."""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

from defectflow.engines.base import EngineError
from defectflow.engines.cp2k.settings import DEFAULT_DATA_DIR, CP2KSettings

__all__ = [
    "MO_PRINT",
    "data_dir",
    "find_basis",
    "find_potential",
    "hse06_xc",
    "input_template",
    "merge_inputs",
    "scf_section",
    "spin_state",
    "valence_electrons",
]


def data_dir(settings: CP2KSettings) -> Path:
    return Path(settings.data_dir or os.environ.get("CP2K_DATA_DIR") or DEFAULT_DATA_DIR)


def _resolve(name: str, ddir: Path) -> Path:
    """A file name in the data directory, or a path (absolute: cp2k_shell runs in the work directory)."""
    p = Path(name)
    return p.resolve() if p.is_absolute() or p.exists() else ddir / name


@lru_cache(maxsize=32)
def _entries(path: str) -> dict[tuple[str, str], int]:
    """Header lines of a CP2K basis/potential file: (element, NAME upper) → line index (aliases included)."""
    out: dict[tuple[str, str], int] = {}
    with open(path, errors="replace") as fh:
        for i, line in enumerate(fh):
            tok = line.split("#", 1)[0].split()
            if len(tok) >= 2 and tok[0][0].isalpha() and len(tok[0]) <= 3 and not tok[1][0].isdigit():
                for name in tok[1:]:
                    out.setdefault((tok[0].capitalize(), name.upper()), i)
    return out


def _lookup(path: Path, element: str, name: str, what: str) -> int:
    if not path.is_file():
        raise EngineError(f"CP2K {what} file {path} not found (install cp2k-data, or set data_dir)")
    idx = _entries(str(path)).get((element, name.upper()))
    if idx is None:
        raise EngineError(f"CP2K: no {what} {name!r} for element {element} in {path}")
    return idx


def find_basis(element: str, settings: CP2KSettings, aux: bool = False) -> Path:
    """The basis file holding ``element``'s basis set (or ADMM auxiliary basis); EngineError if absent."""
    ddir = data_dir(settings)
    fname, name = (settings.aux_basis_set_file, settings.aux_basis_set) if aux else (
        settings.basis_set_file, settings.basis_set)
    path = _resolve(fname, ddir)
    _lookup(path, element, name, "ADMM auxiliary basis set" if aux else "basis set")
    return path


def find_potential(element: str, settings: CP2KSettings) -> tuple[Path, int]:
    """Return (potential file, line index of ``element``'s header); EngineError if absent."""
    path = _resolve(settings.potential_file, data_dir(settings))
    return path, _lookup(path, element, settings.potential, "pseudopotential")


def valence_electrons(element: str, settings: CP2KSettings) -> int:
    """Valence electrons of ``element`` with the chosen GTH potential (its ``-qN`` alias, else the file's
    electron-count line)."""
    path, idx = find_potential(element, settings)
    with open(path, errors="replace") as fh:
        lines = fh.readlines()
    header = lines[idx].split("#", 1)[0].split()
    for name in header[1:]:
        m = re.search(r"-q(\d+)$", name)
        if m:
            return int(m.group(1))
    return sum(int(x) for x in lines[idx + 1].split())  # "n_s n_p n_d ..." electron counts


def spin_state(n_electrons: int, spin: str) -> tuple[bool, int | None]:
    """(UKS?, multiplicity) for ``n_electrons`` valence electrons and spin setting auto/on/off."""
    odd = n_electrons % 2 == 1
    if spin == "off":
        return False, None
    if spin == "on" or odd:
        return True, 2 if odd else 1
    return False, None


# -- input templates -----------------------------------------------------------------------------------------
def merge_inputs(base: str, extra: str) -> str:
    """Merge CP2K input text ``extra`` over ``base``: sections with the same name and parameter are merged,
    keywords in ``extra`` replace those of the same name."""
    from ase.calculators.cp2k import parse_input

    root = parse_input(base)

    def merge(dst, src):
        for kw in src.keywords:
            key = kw.split()[0].upper()
            dst.keywords = [k for k in dst.keywords if k.split()[0].upper() != key]
            dst.keywords.append(kw)
        for sub in src.subsections:
            match = [
                s for s in dst.subsections
                if s.name == sub.name and (s.params or "").upper() == (sub.params or "").upper()
            ]
            if match:
                merge(match[0], sub)
            else:
                dst.subsections.append(sub)

    merge(root, parse_input(extra))
    return "\n".join(root.write())


def scf_section(settings: CP2KSettings, hybrid: bool) -> str:
    if settings.scf == "ot" or hybrid:
        return f"""
&SCF
  EPS_SCF {settings.eps_scf:g}
  SCF_GUESS ATOMIC
  &OT
    MINIMIZER DIIS
    PRECONDITIONER FULL_SINGLE_INVERSE
  &END OT
  &OUTER_SCF
    EPS_SCF {settings.eps_scf:g}
    MAX_SCF {max(1, settings.max_scf // 20)}
  &END OUTER_SCF
&END SCF"""
    return f"""
&SCF
  EPS_SCF {settings.eps_scf:g}
  SCF_GUESS ATOMIC
  ADDED_MOS {settings.added_mos}
  &DIAGONALIZATION
    ALGORITHM STANDARD
  &END DIAGONALIZATION
  &SMEAR ON
    METHOD FERMI_DIRAC
    ELECTRONIC_TEMPERATURE [K] {settings.smearing_temperature:g}
  &END SMEAR
  &MIXING
    METHOD BROYDEN_MIXING
    ALPHA 0.2
    NBROYDEN 8
  &END MIXING
&END SCF"""


def hse06_xc(settings: CP2KSettings) -> str:
    """HSE06: PBE correlation, 0.75 × short-range ωPBE exchange, 25 % short-range HF, ω = 0.11 bohr⁻¹."""
    return f"""
&XC
  &XC_FUNCTIONAL
    &PBE
      SCALE_X 0.0
      SCALE_C 1.0
    &END PBE
    &XWPBE
      SCALE_X -0.25
      SCALE_X0 1.0
      OMEGA 0.11
    &END XWPBE
  &END XC_FUNCTIONAL
  &HF
    FRACTION 0.25
    &SCREENING
      EPS_SCHWARZ {settings.hf_eps_schwarz:g}
      SCREEN_ON_INITIAL_P FALSE
    &END SCREENING
    &INTERACTION_POTENTIAL
      POTENTIAL_TYPE SHORTRANGE
      OMEGA 0.11
    &END INTERACTION_POTENTIAL
    &MEMORY
      MAX_MEMORY {settings.hf_max_memory}
    &END MEMORY
  &END HF
&END XC
&AUXILIARY_DENSITY_MATRIX_METHOD
  METHOD BASIS_PROJECTION
  ADMM_PURIFICATION_METHOD MO_DIAG
&END AUXILIARY_DENSITY_MATRIX_METHOD"""


# Kohn-Sham eigenvalues and occupations of all MOs (occupied + ADDED_MOS), once per energy/force evaluation
# (after the last SCF step), into the main output: the source of Frame.vbm/cbm/fermi_level. Diagonalisation
# only: with OT, CP2K 2023.1 printed the unoccupied eigenvalues under the occupied indices (measured on bulk
# Si), and computing LUMOs there costs an extra eigensolver run.
MO_PRINT = """
&PRINT
  &MO ON
    ENERGIES TRUE
    OCCUPATION_NUMBERS TRUE
    NDIGITS 8
    MO_INDEX_RANGE 1 -1
    ADD_LAST NUMERIC
    &EACH
      QS_SCF 0
    &END EACH
  &END MO
&END PRINT"""


def input_template(settings: CP2KSettings, elements: list[str]) -> str:
    """The CP2K input template handed to ASE (ASE adds cell, coordinates, charge, UKS, cutoff, basis and
    potential names)."""
    hybrid = settings.xc == "HSE06"
    ddir = data_dir(settings)
    files = [f"BASIS_SET_FILE_NAME {_resolve(settings.basis_set_file, ddir)}"]
    if hybrid:
        files.append(f"BASIS_SET_FILE_NAME {_resolve(settings.aux_basis_set_file, ddir)}")
    dft = "\n".join(files) + f"""
POTENTIAL_FILE_NAME {_resolve(settings.potential_file, ddir)}
&MGRID
  REL_CUTOFF [Ry] {settings.rel_cutoff:g}
  NGRIDS 4
&END MGRID
&QS
  EXTRAPOLATION ASPC
&END QS""" + scf_section(settings, hybrid) + (hse06_xc(settings) if hybrid else "")
    if settings.scf == "smear" and not hybrid:
        dft += MO_PRINT
    kinds = ""
    if hybrid:
        aux = settings.aux_basis_set
        kinds = "".join(f"&KIND {el}\n  BASIS_SET AUX_FIT {aux}\n&END KIND\n" for el in elements)
    def indent(text: str, n: int) -> str:
        return "\n".join(" " * n + ln for ln in text.strip("\n").splitlines())

    return f"""&FORCE_EVAL
  &DFT
{indent(dft, 4)}
  &END DFT
  &SUBSYS
{indent(kinds, 4) if kinds else ''}
  &END SUBSYS
&END FORCE_EVAL
"""
