"""pw.x inputs: pseudopotential choice from the UPF headers, and the input file, written by ASE's
:func:`ase.io.espresso.write_espresso_in` from the namelists :func:`pw_namelists` builds."""

from __future__ import annotations

import io
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pymatgen.core import Structure

from defectflow.engines.base import EngineError
from defectflow.engines.qe.settings import (
    DEFAULT_PSEUDO_DIR,
    HYBRID_DFT,
    RY_PER_BOHR_IN_EV_PER_ANG,
    QESettings,
)

logger = logging.getLogger(__name__)

__all__ = [
    "UPFInfo",
    "default_pseudo_dir",
    "make_pp_input",
    "make_pw_input",
    "n_bands",
    "n_valence_electrons",
    "pw_namelists",
    "read_upf_header",
    "select_pseudopotentials",
    "unique_elements",
]


# ------------------------------------------------------------------------------------------------------------
# Pseudopotentials
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UPFInfo:
    """What the engine needs from a UPF header."""

    path: Path
    element: str | None
    pseudo_type: str  # NC, SL (semi-local NC), US/USPP, PAW
    functional: str
    z_valence: float
    has_so: bool = False

    @property
    def norm_conserving(self) -> bool:
        return self.pseudo_type.upper() in ("NC", "SL")

    @property
    def is_pbe(self) -> bool:
        tokens = self.functional.upper().replace("-", " ").split()
        if any(t in ("PSX", "PSC", "PBESOL", "PBSX", "PBSC") for t in tokens):
            return False
        return "PBE" in tokens or ("PBX" in tokens and "PBC" in tokens)

    @property
    def is_lda(self) -> bool:
        """Perdew-Zunger LDA (``SLA PZ NOGX NOGC``, or ``PZ``), no gradient correction."""
        tokens = self.functional.upper().replace("-", " ").split()
        gga = {"PBE", "PBX", "PBC", "B88", "BLYP", "PW91", "PBESOL", "PSX", "PSC", "GGX", "GGC", "TPSS"}
        return ("PZ" in tokens or tokens == ["LDA"]) and not gga.intersection(tokens)


_ATTR = re.compile(r'([A-Za-z_]+)\s*=\s*"([^"]*)"')


def read_upf_header(path: str | Path) -> UPFInfo:
    """Parse the ``PP_HEADER`` of a UPF v1 or v2 file. Raises ``ValueError`` when the file is not UPF."""
    path = Path(path)
    with open(path, errors="replace") as fh:
        text = ""
        while "<PP_HEADER" not in text or not re.search(r"<PP_HEADER(.*?)(/>|</PP_HEADER>)", text, re.DOTALL):
            chunk = fh.read(65536)
            if not chunk or len(text) > 4_000_000:
                raise ValueError(f"{path.name}: no PP_HEADER (not a UPF file)")
            text += chunk
    body = re.search(r"<PP_HEADER(.*?)(/>|</PP_HEADER>)", text, re.DOTALL).group(1)
    attrs = {k.lower(): v.strip() for k, v in _ATTR.findall(body)}
    if "z_valence" in attrs:  # UPF v2
        ptype = attrs.get("pseudo_type", "")
        if not ptype:
            ptype = (
                "PAW"
                if attrs.get("is_paw", "").lower() in ("t", "true", ".true.")
                else ("US" if attrs.get("is_ultrasoft", "").lower() in ("t", "true", ".true.") else "NC")
            )
        return UPFInfo(
            path=path,
            element=attrs.get("element") or None,
            pseudo_type=ptype,
            functional=attrs.get("functional", ""),
            z_valence=float(attrs["z_valence"].lower().replace("d", "e")),
            has_so=attrs.get("has_so", "").lower() in ("t", "true", ".true."),
        )
    # UPF v1: one value per line, followed by a label
    lines = [ln.strip() for ln in body.strip(">\n ").splitlines() if ln.strip()]
    element, ptype, functional, zval = None, "", "", None
    for ln in lines:
        low = ln.lower()
        if low.endswith("element"):
            element = ln.split()[0]
        elif "pseudopotential" in low and ("conserving" in low or "ultrasoft" in low or "paw" in low):
            ptype = ln.split()[0]
        elif "exchange-correlation" in low:
            functional = ln[: low.index("exchange-correlation")]
        elif low.endswith("z valence"):
            zval = float(ln.split()[0].lower().replace("d", "e"))
    if zval is None:
        raise ValueError(f"{path.name}: PP_HEADER without z_valence")
    return UPFInfo(
        path=path, element=element, pseudo_type=ptype or "NC", functional=functional, z_valence=zval
    )


def default_pseudo_dir() -> Path:
    return Path(os.environ.get("ESPRESSO_PSEUDO") or DEFAULT_PSEUDO_DIR)


def _candidates(element: str, pseudo_dir: Path) -> list[UPFInfo]:
    out = []
    if not pseudo_dir.is_dir():
        return out
    for p in sorted(pseudo_dir.iterdir()):
        if not p.is_file() or not p.name.lower().startswith(element.lower()):
            continue
        try:
            info = read_upf_header(p)
        except (ValueError, OSError):
            continue
        if info.element is None:  # old converted files: trust a name like "Si.pbe-rrkj.UPF"
            m = re.match(r"([A-Z][a-z]?)(?![a-z])", p.name)
            if not m or m.group(1) != element:
                continue
        elif info.element.strip().capitalize() != element:
            continue
        out.append(info)
    return out


def _missing_message(element: str, pseudo_dir: Path, hybrid: bool, found: list[UPFInfo], lda: bool = False) -> str:
    want = "LDA" if lda else ("PBE norm-conserving" if hybrid else "PBE")
    seen = ", ".join(f"{i.path.name} ({i.pseudo_type}, {i.functional.strip() or '?'})" for i in found)
    return (
        f"QE: no {want} pseudopotential for element {element} in {pseudo_dir}"
        + (f" (found only: {seen})" if seen else "")
        + f". Fix: put a UPF file for {element} there, or set `pseudo_dir:` to a directory that has one, "
        f"or name the file with `pseudopotentials: {{{element}: <file>.UPF}}`."
    )


def select_pseudopotentials(
    elements: list[str], pseudo_dir: str | Path, overrides: dict[str, str] | None = None, hybrid: bool = False,
    lda: bool = False,
) -> dict[str, UPFInfo]:
    """Choose one UPF per element (see the module docstring for the order). Raises :class:`EngineError`."""
    pseudo_dir = Path(pseudo_dir)
    overrides = overrides or {}
    chosen: dict[str, UPFInfo] = {}
    missing: list[str] = []
    for el in elements:
        if el in overrides:
            path = pseudo_dir / overrides[el]
            if not path.is_file():
                raise EngineError(
                    f"QE: pseudopotential file {overrides[el]!r} for element {el} not found in {pseudo_dir}. "
                    f"Fix `pseudopotentials:` or `pseudo_dir:`."
                )
            try:
                chosen[el] = read_upf_header(path)
            except ValueError as exc:
                raise EngineError(f"QE: cannot read pseudopotential for element {el}: {exc}") from exc
            if hybrid and not chosen[el].norm_conserving:
                logger.warning("QE: hybrid functional with non-norm-conserving %s for %s", path.name, el)
            continue
        found = _candidates(el, pseudo_dir)
        ranked = sorted(
            (i for i in found if (i.is_lda if lda else i.is_pbe) and (i.norm_conserving or not hybrid)),
            key=lambda i: (not i.norm_conserving, i.has_so, i.path.name),
        )
        if not ranked:
            missing.append(_missing_message(el, pseudo_dir, hybrid, found, lda))
            continue
        chosen[el] = ranked[0]
    if missing:
        raise EngineError(" ".join(missing))
    return chosen




# ------------------------------------------------------------------------------------------------------------
# Input
# ------------------------------------------------------------------------------------------------------------
NAMELISTS = ("control", "system", "electrons", "ions")
_STARTING_MAG = re.compile(r"starting_magnetization\((\d+)\)$", re.IGNORECASE)


def unique_elements(structure: Structure) -> list[str]:
    """Element symbols in order of first appearance (QE's species order, 1-based in ``starting_magnetization``)."""
    return list(dict.fromkeys(site.specie.symbol for site in structure))



def n_valence_electrons(structure: Structure, charge: int, zval: dict[str, float]) -> float:
    """Σ z_valence − q (e)."""
    return sum(zval[site.specie.symbol] for site in structure) - int(charge)


def n_bands(n_electrons: float, empty_bands: int | None = None) -> int:
    """pw.x ``nbnd`` (per spin): occupied bands ceil(N/2) + ``empty_bands`` (None: max(4, ceil(10 %)))."""
    occupied = math.ceil(n_electrons / 2 - 1e-9)
    empty = empty_bands if empty_bands is not None else max(4, math.ceil(0.1 * occupied))
    return max(occupied + empty, 1)


def _plain(value: Any) -> Any:
    """A namelist value as the plain Python type ASE's writer formats (numpy scalars → int/float; quotes of a
    user string are stripped: ASE adds them)."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value)
    if isinstance(value, str | os.PathLike):
        return str(value).strip("'")
    return value


def pw_namelists(
    structure: Structure,
    charge: int,
    settings: QESettings,
    pseudos: dict[str, UPFInfo],
    calculation: Literal["scf", "relax"] = "scf",
    pseudo_dir: str | Path | None = None,
    outdir: str = "./out",
    fmax: float | None = None,
    max_steps: int | None = None,
) -> dict[str, dict[str, Any]]:
    """The pw.x namelists (``control``, ``system``, ``electrons``, ``ions``; QE units: Ry, bohr) for ``structure``
    at total charge ``charge`` (e), ``settings.input_data`` merged last. ``fmax`` in eV/Å (force norm) and
    ``max_steps`` for ``relax`` only. ``ibrav``/``nat``/``ntyp`` are added by the writer."""
    elements = unique_elements(structure)
    zval = {el: pseudos[el].z_valence for el in elements}
    nelec = n_valence_electrons(structure, charge, zval)
    odd = round(nelec) % 2 == 1
    spin = settings.spin == "on" or (settings.spin == "auto" and odd)

    control: dict[str, Any] = {
        "calculation": calculation,
        "prefix": "pwscf",
        "outdir": outdir,
        "pseudo_dir": str(pseudo_dir or settings.pseudo_dir or default_pseudo_dir()),
        "tprnfor": True,
        "tstress": True,
        "verbosity": "high",  # prints the occupation numbers (and the bands for >= 100 k-points)
    }
    if calculation == "relax":
        if fmax is None or max_steps is None:
            raise ValueError("relax needs fmax and max_steps")
        # QE stops when EVERY force component is below forc_conv_thr (and the energy change is below
        # etot_conv_thr); our fmax bounds the force NORM. |F| ≤ √3 max|F_i|, so thr = fmax/√3 guarantees
        # max|F| < fmax when QE declares convergence (conservative by up to √3 for forces along one axis).
        control["forc_conv_thr"] = fmax / math.sqrt(3) / RY_PER_BOHR_IN_EV_PER_ANG
        control["etot_conv_thr"] = settings.etot_conv_thr
        control["nstep"] = int(max_steps)
    system: dict[str, Any] = {"ecutwfc": settings.ecutwfc}
    if settings.ecutrho is not None:
        system["ecutrho"] = settings.ecutrho
    system["tot_charge"] = float(charge)
    system["nbnd"] = n_bands(nelec, settings.empty_bands)
    system["occupations"] = "smearing"
    system["smearing"] = settings.smearing
    system["degauss"] = settings.degauss
    if spin:
        system["nspin"] = 2
        mag = settings.starting_magnetization
        if mag is None:
            mag = min(1.0, 1.0 / max(nelec, 1.0))
        for i in range(len(elements)):
            system[f"starting_magnetization({i + 1})"] = round(mag, 6)
    if settings.xc == "LDA":
        system["input_dft"] = "pz"
    if settings.xc in HYBRID_DFT:
        system["input_dft"] = HYBRID_DFT[settings.xc]
        system["nqx1"] = system["nqx2"] = system["nqx3"] = 1
        system["exxdiv_treatment"] = "gygi-baldereschi"
        system["x_gamma_extrapolation"] = True
        system["ecutfock"] = settings.ecutfock if settings.ecutfock is not None else 2 * settings.ecutwfc
    electrons: dict[str, Any] = {
        "conv_thr": settings.conv_thr,
        "mixing_beta": settings.mixing_beta,
        "electron_maxstep": settings.electron_maxstep,
    }
    ions: dict[str, Any] = {}
    if calculation == "relax":
        ions = {
            "ion_dynamics": "bfgs",
            "wfc_extrapolation": "second_order",
            "pot_extrapolation": "second_order",
        }

    namelists = {"control": control, "system": system, "electrons": electrons, "ions": ions}
    for name, extra in settings.input_data.items():
        key = name.lower()
        if key not in namelists:
            raise EngineError(f"QE input_data: unknown namelist {name!r} (control, system, electrons, ions)")
        namelists[key].update(extra)
    return {name: {k: _plain(v) for k, v in entries.items()} for name, entries in namelists.items()}


def make_pw_input(structure: Structure, charge: int, settings: QESettings, pseudos: dict[str, UPFInfo],
                  *options, **kw_options) -> str:
    """The pw.x input file text (no pw.x needed) for the namelists :func:`pw_namelists` makes from the same
    arguments (``calculation``, ``pseudo_dir``, ``outdir``, ``fmax`` in eV/Å for ``relax``, ``max_steps``).

    Written by ASE's :func:`~ase.io.espresso.write_espresso_in` from :func:`pw_namelists`: cell and Cartesian
    positions in Å (``CELL_PARAMETERS``/``ATOMIC_POSITIONS angstrom``, positions to 1e-10 Å), species masses from
    pymatgen (amu), ``K_POINTS gamma`` for ``kpts = (1, 1, 1)`` (QE's Γ tricks) else an unshifted
    ``K_POINTS automatic`` mesh. The initial spin moment goes through ASE's magnetic moments, which its writer
    turns into ``starting_magnetization(i)`` (a fraction of species i's valence charge) when ``nspin = 2``; empty
    namelists are left out, as pw.x expects for an ``scf`` run.
    """
    from ase import Atoms
    from ase.io.espresso import write_espresso_in
    from pymatgen.core.periodic_table import Element

    elements = unique_elements(structure)
    namelists = pw_namelists(structure, charge, settings, pseudos, *options, **kw_options)
    symbols = [site.specie.symbol for site in structure]
    atoms = Atoms(symbols, positions=structure.cart_coords, cell=structure.lattice.matrix, pbc=True)
    atoms.set_masses([float(Element(el).atomic_mass) for el in symbols])
    system = namelists["system"]
    if system.get("nspin") == 2 or system.get("noncolin"):
        # ASE's writer replaces starting_magnetization(i) by the species' initial moments (÷ rescale_magmom_fac,
        # 1 by default), one species per (element, moment): hand it the fraction we chose, per element
        mags = dict.fromkeys(elements, 0.0)
        for key in list(system):
            m = _STARTING_MAG.match(key)
            if m and 1 <= int(m.group(1)) <= len(elements):
                mags[elements[int(m.group(1)) - 1]] = float(system.pop(key))
        atoms.set_initial_magnetic_moments([mags[el] for el in symbols])
    kpts = None if tuple(settings.kpts) == (1, 1, 1) else tuple(int(k) for k in settings.kpts)
    buffer = io.StringIO()
    write_espresso_in(
        buffer,
        atoms,
        input_data={name: dict(entries) for name, entries in namelists.items()},
        pseudopotentials={el: pseudos[el].path.name for el in elements},
        kpts=kpts,
    )
    # pw.x reads the namelists in this order and only those it needs: ASE writes every pw.x namelist, empty ones
    # (&IONS for scf, &CELL, &FCP, &RISM) included; pw.x would report those as unknown cards
    return re.sub(r"^&\w+\n/\n", "", buffer.getvalue(), flags=re.MULTILINE)


def make_pp_input(outdir: str = "./out", cube: str = "potential.cube", filplot: str = "potential.pp") -> str:
    """The pp.x input that writes the electrostatic potential of the pw.x run in ``outdir`` (prefix ``pwscf``):
    ``plot_num = 11`` (the bare local ionic potential + the Hartree potential, in Ry: the potential energy of an
    electron, as pw.x adds it to the Kohn-Sham Hamiltonian, its G = 0 term included) on pw.x's dense FFT grid,
    as a Gaussian cube (``output_format = 6``: bohr, Ry) named ``cube``; ``filplot`` is pp.x's intermediate file."""
    return (
        "&INPUTPP\n"
        "  prefix = 'pwscf'\n"
        f"  outdir = '{outdir}'\n"
        f"  filplot = '{filplot}'\n"
        "  plot_num = 11\n"
        "/\n"
        "&PLOT\n"
        "  iflag = 3\n"
        "  output_format = 6\n"
        f"  fileout = '{cube}'\n"
        "/\n"
    )
