"""Quantum ESPRESSO engine: input generation and pseudopotential choice (no pw.x), the child-process module
(:mod:`defectflow.engines.process`), and real pw.x runs (dft).

The pw.x runs use the 7-atom Si vacancy cell at ecutwfc = 20 Ry, Γ only, Fermi–Dirac 0.002 Ry: a test setting
that converges for q = 0 and q = -1 (PBE) and for HSE06 in a few seconds on 2 cores. The interrupt test runs the
benchmark reference's setting (15-atom cell, 2×2×2 k-points, 18 Ry) and kills it after a few seconds.
"""

from __future__ import annotations

import functools
import io
import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from ase.io.espresso import read_fortran_namelist
from conftest import descendants, have, proc_table, si_conventional, si_vac15, si_vacancy
from pymatgen.core import Lattice, Structure

from defectflow.engines.base import EngineError
from defectflow.engines.qe import (
    RY_IN_EV,
    RY_PER_BOHR_IN_EV_PER_ANG,
    QEEngine,
    QESettings,
    UPFInfo,
    make_pw_input,
    n_bands,
    parse_band_edges,
    parse_pw_output,
    read_upf_header,
    select_pseudopotentials,
    suspect_forces,
)

DEBIAN_PSEUDO = Path("/usr/share/espresso/pseudo")

needs_debian_pseudo = pytest.mark.skipif(
    not (DEBIAN_PSEUDO / "Si.pbe-rrkj.UPF").is_file(), reason="Debian quantum-espresso-data not installed"
)
needs_pw = pytest.mark.skipif(not have("pw.x"), reason="pw.x not installed (Debian: quantum-espresso)")

FAST = {"ecutwfc": 20.0, "pseudo_dir": str(DEBIAN_PSEUDO)}


def _fake_upf(
    path: Path, element: str, ptype: str, functional: str, zval: float, has_so: bool = False
) -> None:
    path.write_text(
        '<UPF version="2.0.1">\n<PP_INFO>fake</PP_INFO>\n'
        f'<PP_HEADER generated="test" element="{element}" pseudo_type="{ptype}" functional="{functional}"\n'
        f'   z_valence="{zval:.12e}" has_so="{"T" if has_so else "F"}" is_ultrasoft="F" is_paw="F"/>\n'
        "<PP_MESH/>\n</UPF>\n"
    )


@functools.cache
def _si7_cached() -> Structure:
    return si_vacancy()


def _si7() -> Structure:
    """The 7-atom Si vacancy cell (built once: Structure.from_spacegroup takes ~0.5 s)."""
    return _si7_cached().copy()


def _si_pseudos() -> dict[str, UPFInfo]:
    return {
        "Si": UPFInfo(
            path=Path("Si.pbe-rrkj.UPF"), element="Si", pseudo_type="NC", functional="PBE", z_valence=4.0
        )
    }


def _namelist_value(text: str, key: str) -> str | None:
    m = re.search(rf"^\s*{re.escape(key)}\s*=\s*(.+)$", text, re.MULTILINE)
    return m.group(1).strip() if m else None


def _read_pw_input(text: str) -> tuple[dict[str, dict], dict]:
    """(namelists as read by ASE's Fortran-namelist reader, the cards: species, cell Å, positions Å, k-points)."""
    namelists, card_lines = read_fortran_namelist(io.StringIO(text))
    cards: dict = {"species": [], "cell": [], "positions": [], "symbols": [], "k_points": None, "units": {}}
    card = None
    for line in card_lines:
        tokens = line.split()
        if tokens[0].upper() in ("ATOMIC_SPECIES", "CELL_PARAMETERS", "ATOMIC_POSITIONS", "K_POINTS"):
            card = tokens[0].upper()
            cards["units"][card] = tokens[1].lower() if len(tokens) > 1 else None
            if card == "K_POINTS":
                cards["k_points"] = [cards["units"][card]]
        elif card == "ATOMIC_SPECIES":
            cards["species"].append((tokens[0], float(tokens[1]), tokens[2]))
        elif card == "CELL_PARAMETERS":
            cards["cell"].append([float(x) for x in tokens])
        elif card == "ATOMIC_POSITIONS":
            cards["symbols"].append(tokens[0])
            cards["positions"].append([float(x) for x in tokens[1:4]])
        elif card == "K_POINTS":
            cards["k_points"] += [int(x) for x in tokens]
    return {name: dict(entries) for name, entries in namelists.items()}, cards


# ------------------------------------------------------------------------------------------------------------
# Input generation (no pw.x)
# ------------------------------------------------------------------------------------------------------------
def test_input_charge_and_spin_auto():
    s = _si7()  # 7 Si: 28 valence electrons
    neutral = make_pw_input(s, 0, QESettings(**FAST), _si_pseudos())
    anion = make_pw_input(s, -1, QESettings(**FAST), _si_pseudos())
    cation2 = make_pw_input(s, 2, QESettings(**FAST), _si_pseudos())
    assert float(_namelist_value(neutral, "tot_charge")) == 0.0
    assert float(_namelist_value(anion, "tot_charge")) == -1.0  # QE: tot_charge = -1 is one extra electron
    assert float(_namelist_value(cation2, "tot_charge")) == 2.0
    assert _namelist_value(neutral, "nspin") is None  # 28 electrons: even
    assert _namelist_value(cation2, "nspin") is None  # 26
    assert _namelist_value(anion, "nspin") == "2"  # 29: odd
    # default guess: 1 μB for the cell = 1/29 of the valence charge on every species
    assert float(_namelist_value(anion, "starting_magnetization(1)")) == pytest.approx(1 / 29, abs=1e-6)
    for text in (neutral, anion):
        assert _namelist_value(text, "calculation") == "'scf'"
        assert _namelist_value(text, "tprnfor") == ".true."
        assert _namelist_value(text, "tstress") == ".true."
        assert _namelist_value(text, "occupations") == "'smearing'"
        assert _namelist_value(text, "smearing") == "'fd'"
        assert _namelist_value(text, "input_dft") is None
        cards = _read_pw_input(text)[1]
        assert cards["k_points"] == ["gamma"]
        assert cards["species"] == [("Si", 28.0855, "Si.pbe-rrkj.UPF")]  # amu


def test_input_spin_forced():
    s = _si7()
    on = make_pw_input(s, 0, QESettings(spin="on", **FAST), _si_pseudos())
    off = make_pw_input(s, -1, QESettings(spin="off", **FAST), _si_pseudos())
    assert _namelist_value(on, "nspin") == "2"
    assert _namelist_value(off, "nspin") is None


@pytest.mark.parametrize("xc,dft", [("HSE06", "'hse'"), ("PBE0", "'pbe0'")])
def test_input_hybrid(xc, dft):
    text = make_pw_input(_si7(), 0, QESettings(xc=xc, **FAST), _si_pseudos())
    assert _namelist_value(text, "input_dft") == dft
    for k in ("nqx1", "nqx2", "nqx3"):
        assert _namelist_value(text, k) == "1"
    assert _namelist_value(text, "exxdiv_treatment") == "'gygi-baldereschi'"
    assert _namelist_value(text, "x_gamma_extrapolation") == ".true."
    assert float(_namelist_value(text, "ecutfock")) == 40.0  # 2 × ecutwfc
    explicit = make_pw_input(_si7(), 0, QESettings(xc=xc, ecutfock=55, **FAST), _si_pseudos())
    assert float(_namelist_value(explicit, "ecutfock")) == 55.0


def test_input_relax_thresholds_and_extras():
    settings = QESettings(
        kpts=(2, 2, 2), input_data={"SYSTEM": {"nbnd": 40}, "electrons": {"mixing_beta": 0.2}}, **FAST
    )
    text = make_pw_input(_si7(), 0, settings, _si_pseudos(), "relax", fmax=0.05, max_steps=7)
    assert _namelist_value(text, "calculation") == "'relax'"
    assert _namelist_value(text, "nstep") == "7"
    # fmax bounds the force norm; QE's threshold is per component: fmax/√3, in Ry/bohr
    thr = float(_namelist_value(text, "forc_conv_thr"))
    assert thr == pytest.approx(0.05 / math.sqrt(3) / RY_PER_BOHR_IN_EV_PER_ANG)
    assert thr == pytest.approx(0.05 / math.sqrt(3) / 25.71104, rel=1e-5)
    assert _namelist_value(text, "ion_dynamics") == "'bfgs'"
    assert _namelist_value(text, "wfc_extrapolation") == "'second_order'"
    assert _namelist_value(text, "nbnd") == "40"
    assert _namelist_value(text, "mixing_beta") == "0.2"
    assert _read_pw_input(text)[1]["k_points"] == ["automatic", 2, 2, 2, 0, 0, 0]
    with pytest.raises(EngineError, match="unknown namelist"):
        make_pw_input(_si7(), 0, QESettings(input_data={"cell": {}}, **FAST), _si_pseudos())


def test_empty_bands_set_nbnd():
    assert n_bands(28) == 14 + 4  # max(4, 10 % of 14 occupied)
    assert n_bands(29) == 15 + 4  # odd count: the half-filled band is occupied
    assert n_bands(252) == 126 + 13  # 63-atom Si cell: 10 % of 126, rounded up
    assert n_bands(28, 1) == 15 and n_bands(28, 10) == 24
    s = _si7()  # 28 electrons
    text = make_pw_input(s, 0, QESettings(**FAST), _si_pseudos())
    assert _namelist_value(text, "nbnd") == "18"
    assert _namelist_value(text, "verbosity") == "'high'"  # QE prints occupations only then
    anion = make_pw_input(s, -1, QESettings(empty_bands=7, **FAST), _si_pseudos())
    assert _namelist_value(anion, "nbnd") == "22"


_BANDS_NSPIN2 = """
     End of self-consistent calculation

 ------ SPIN UP ------------


          k = 0.0000 0.0000 0.0000 (  1743 PWs)   bands (ev):

    -5.7072  -1.6365   3.2624   6.0647   6.4000

     occupation numbers 
     1.0000   1.0000   1.0000   1.0000   0.6000

 ------ SPIN DOWN ----------


          k = 0.0000 0.0000 0.0000 (  1743 PWs)   bands (ev):

    -5.6000  -1.6000   3.3000   6.1000   6.5000

     occupation numbers 
     1.0000   1.0000   1.0000   0.9000   0.0100

     the Fermi energy is     6.4379 ev

!    total energy              =     -62.90407522 Ry
"""


def test_parse_band_edges_occupations_and_fallback():
    # VBM: highest level with occupation > 0.5 (spin up 6.40 at 0.6), CBM: lowest < 0.5 (spin down 6.50)
    assert parse_band_edges(_BANDS_NSPIN2.splitlines()) == (6.4, 6.5, 6.4379)
    # without printed occupations (verbosity low) the Fermi level splits occupied from empty
    no_occ = re.sub(r"occupation numbers \n.*?\n", "", _BANDS_NSPIN2)
    assert "occupation" not in no_occ
    assert parse_band_edges(no_occ.splitlines()) == (6.4, 6.5, 6.4379)
    # an earlier SCF's table (e.g. the first EXX loop) is ignored: only the last one counts
    earlier = _BANDS_NSPIN2.replace("6.4000", "9.9000").replace("6.5000", "9.9500")
    assert parse_band_edges((earlier + _BANDS_NSPIN2).splitlines())[:2] == (6.4, 6.5)
    # fixed occupations, no table printed: QE's own line
    fixed = (
        "     End of self-consistent calculation\n"
        "     highest occupied, lowest unoccupied level (ev):     6.0647    6.8190\n"
    )
    assert parse_band_edges(fixed.splitlines()) == (6.0647, 6.819, None)
    assert parse_band_edges(["nothing here"]) == (None, None, None)


def test_digest_ignores_parallelisation():
    a = QESettings(mpi_procs=1, **FAST).digest()
    assert a == QESettings(mpi_procs=4, timeout_s=10, keep_outdir=True, **FAST).digest()
    assert a != QESettings(xc="HSE06", **FAST).digest()


# ------------------------------------------------------------------------------------------------------------
# Pseudopotentials (no pw.x)
# ------------------------------------------------------------------------------------------------------------
def test_pseudo_ranking_fake_dir(tmp_path):
    _fake_upf(tmp_path / "Si.pz-vbc.UPF", "Si", "NC", "SLA PZ NOGX NOGC", 4)
    _fake_upf(tmp_path / "Si.pbe-us.UPF", "Si", "USPP", "PBE", 4)
    _fake_upf(tmp_path / "Si.rel-pbe-nc.UPF", "Si", "NC", "SLA PW PBE PBE", 4, has_so=True)
    _fake_upf(tmp_path / "Si.pbe-nc.UPF", "Si", "NC", " SLA  PW   PBE  PBE", 4)
    _fake_upf(tmp_path / "S.pbe-nc.UPF", "S", "NC", "PBE", 6)
    _fake_upf(tmp_path / "Ge.pbe-us.UPF", "Ge", "USPP", "PBE", 14)
    _fake_upf(tmp_path / "C.pbesol-nc.UPF", "C", "NC", "PBESOL", 4)
    chosen = select_pseudopotentials(["Si", "S"], tmp_path)
    assert chosen["Si"].path.name == "Si.pbe-nc.UPF"  # PBE NC scalar-relativistic first
    assert chosen["S"].path.name == "S.pbe-nc.UPF"  # "Si..." files are not S
    assert chosen["S"].z_valence == 6
    # semi-local: a PBE ultrasoft file is acceptable; hybrids need norm-conserving
    assert select_pseudopotentials(["Ge"], tmp_path)["Ge"].path.name == "Ge.pbe-us.UPF"
    with pytest.raises(EngineError, match=r"no PBE norm-conserving pseudopotential for element Ge"):
        select_pseudopotentials(["Ge"], tmp_path, hybrid=True)
    with pytest.raises(EngineError, match=r"element C .*found only: C.pbesol-nc.UPF"):
        select_pseudopotentials(["C"], tmp_path)
    # an explicit choice wins
    assert select_pseudopotentials(["Si"], tmp_path, {"Si": "Si.pbe-us.UPF"})["Si"].pseudo_type == "USPP"
    with pytest.raises(EngineError, match="Si.nope.UPF"):
        select_pseudopotentials(["Si"], tmp_path, {"Si": "Si.nope.UPF"})


@needs_debian_pseudo
def test_debian_pseudo_headers():
    v2 = read_upf_header(DEBIAN_PSEUDO / "Si.pbe-rrkj.UPF")
    assert (v2.element, v2.pseudo_type, v2.z_valence, v2.is_pbe, v2.norm_conserving) == (
        "Si",
        "NC",
        4.0,
        True,
        True,
    )
    us = read_upf_header(DEBIAN_PSEUDO / "Si.pbe-nl-rrkjus_psl.1.0.0.UPF")
    assert (us.pseudo_type, us.is_pbe, us.norm_conserving) == ("USPP", True, False)
    v1 = read_upf_header(DEBIAN_PSEUDO / "C.UPF")  # UPF v1, LDA
    assert (v1.element, v1.pseudo_type, v1.z_valence, v1.is_pbe) == ("C", "NC", 4.0, False)
    for xc in ("PBE", "HSE06"):
        chosen = QEEngine({"xc": xc, **FAST}).pseudopotentials(_si7())
        assert chosen["Si"].path.name == "Si.pbe-rrkj.UPF"
    # LDA (the benchmark's `functional` preset) takes the Perdew-Zunger file and never a PBE one
    lda = read_upf_header(DEBIAN_PSEUDO / "Si.pz-vbc.UPF")
    assert (lda.is_lda, lda.is_pbe, v2.is_lda) == (True, False, False)
    assert QEEngine({"xc": "LDA", **FAST}).pseudopotentials(_si7())["Si"].path.name == "Si.pz-vbc.UPF"


def test_input_lda():
    text = make_pw_input(_si7(), 0, QESettings(xc="LDA", **FAST), _si_pseudos())
    assert _namelist_value(text, "input_dft") == "'pz'"
    assert _namelist_value(text, "exxdiv_treatment") is None


# The frozen DFT reference (benchmarks/reference.py, benchmarks/presets/reference.yaml) was computed with the
# hand-written namelist writer that ASE's writer replaced. These are the namelists that writer produced for the
# reference's settings (read back with ASE's Fortran-namelist reader): the pw.x input must stay physically the same.
REFERENCE = {"engine": "qe", "xc": "PBE", "ecutwfc": 18.0, "kpts": [2, 2, 2], "conv_thr": 1e-6, "mpi_procs": 2}
_PSEUDO_DIR = "/usr/share/espresso/pseudo"
_CONTROL_RELAX = {
    "calculation": "relax", "prefix": "pwscf", "outdir": "./out", "pseudo_dir": _PSEUDO_DIR,
    "tprnfor": True, "tstress": True, "verbosity": "high",
    "forc_conv_thr": 0.0011227676078560645,  # 0.05 eV/Å / √3 in Ry/bohr
    "etot_conv_thr": 1e-4, "nstep": 100,
}
_SYSTEM_Q1 = {  # 15 Si × 4 − 1 = 59 valence electrons: odd → nspin 2, 1 μB start (1/59), nbnd 30 + 4
    "ibrav": 0, "nat": 15, "ntyp": 1, "ecutwfc": 18.0, "tot_charge": 1.0, "nbnd": 34,
    "occupations": "smearing", "smearing": "fd", "degauss": 0.002,
    "nspin": 2, "starting_magnetization(1)": 0.016949,
}
_ELECTRONS = {"conv_thr": 1e-6, "mixing_beta": 0.4, "electron_maxstep": 100}
_IONS = {"ion_dynamics": "bfgs", "wfc_extrapolation": "second_order", "pot_extrapolation": "second_order"}
_HYBRID = {"input_dft": "hse", "nqx1": 1, "nqx2": 1, "nqx3": 1, "exxdiv_treatment": "gygi-baldereschi",
           "x_gamma_extrapolation": True, "ecutfock": 36.0}
FROZEN_INPUTS = {
    # (xc, calculation, UPF file): namelists
    "a: reference PBE relax": ("PBE", "relax", "Si.pbe-rrkj.UPF",
                               {"control": _CONTROL_RELAX, "system": _SYSTEM_Q1, "electrons": _ELECTRONS,
                                "ions": _IONS}),
    "b: LDA relax": ("LDA", "relax", "Si.pz-vbc.UPF",
                     {"control": _CONTROL_RELAX, "system": {**_SYSTEM_Q1, "input_dft": "pz"},
                      "electrons": _ELECTRONS, "ions": _IONS}),
    "c: HSE06 single point": ("HSE06", "scf", "Si.pbe-rrkj.UPF",
                              {"control": {k: v for k, v in _CONTROL_RELAX.items()
                                           if k not in ("forc_conv_thr", "etot_conv_thr", "nstep")}
                               | {"calculation": "scf"},
                               "system": {**_SYSTEM_Q1, **_HYBRID}, "electrons": _ELECTRONS}),
}


@pytest.mark.parametrize("case", sorted(FROZEN_INPUTS))
def test_reference_inputs_unchanged(case):
    """q = +1, 15-atom Si vacancy cell, the reference's settings (relax: fmax 0.05 eV/Å, 100 steps): every
    namelist key and value as the frozen reference's pw.x inputs had them, and the same cards."""
    xc, calculation, upf, expected = FROZEN_INPUTS[case]
    s = si_vac15()
    pseudos = {"Si": UPFInfo(path=Path(upf), element="Si", pseudo_type="NC", functional=xc, z_valence=4.0)}
    settings = QESettings(**{**REFERENCE, "xc": xc})
    text = make_pw_input(s, 1, settings, pseudos, calculation, _PSEUDO_DIR, "./out", fmax=0.05, max_steps=100)
    namelists, cards = _read_pw_input(text)
    assert namelists == expected
    assert namelists["control"].get("forc_conv_thr", 0.0011227676078560645) == pytest.approx(
        0.05 / math.sqrt(3) / RY_PER_BOHR_IN_EV_PER_ANG, rel=1e-15
    )
    assert cards["species"] == [("Si", 28.0855, upf)]  # amu (pymatgen's mass, as before)
    assert cards["units"]["CELL_PARAMETERS"] == cards["units"]["ATOMIC_POSITIONS"] == "angstrom"
    assert cards["symbols"] == ["Si"] * 15
    np.testing.assert_allclose(cards["cell"], s.lattice.matrix, rtol=0, atol=1e-9)  # Å
    np.testing.assert_allclose(cards["positions"], s.cart_coords, rtol=0, atol=1e-9)  # Å
    assert cards["k_points"] == ["automatic", 2, 2, 2, 0, 0, 0]


def test_input_user_magnetization_and_two_species():
    """Two species, spin on: one starting_magnetization per species (QE's 1-based species order), an
    input_data override of one of them kept, and no spin keys at all without nspin = 2."""
    s = _si7()
    s.replace(3, "C")
    pseudos = {**_si_pseudos(), "C": UPFInfo(path=Path("C.pbe-mt_gipaw.UPF"), element="C", pseudo_type="NC",
                                              functional="PBE", z_valence=4.0)}
    nl, cards = _read_pw_input(make_pw_input(s, 0, QESettings(spin="on", starting_magnetization=0.2, **FAST),
                                             pseudos))
    assert (nl["system"]["nspin"], nl["system"]["ntyp"]) == (2, 2)
    assert nl["system"]["starting_magnetization(1)"] == nl["system"]["starting_magnetization(2)"] == 0.2
    assert [sp[0] for sp in cards["species"]] == ["Si", "C"]
    nl = _read_pw_input(make_pw_input(
        s, 0, QESettings(spin="on", input_data={"system": {"starting_magnetization(2)": -0.5}}, **FAST), pseudos
    ))[0]
    assert nl["system"]["starting_magnetization(1)"] == pytest.approx(1 / 28, abs=1e-6)
    assert nl["system"]["starting_magnetization(2)"] == -0.5
    nl = _read_pw_input(make_pw_input(s, 0, QESettings(spin="off", **FAST), pseudos))[0]
    assert not any(k.startswith(("nspin", "starting_magnetization")) for k in nl["system"])
    assert set(nl) == {"control", "system", "electrons"}  # no empty &IONS (or &CELL) for an scf run


@needs_debian_pseudo
def test_missing_pseudopotential_message():
    s = Structure(Lattice.cubic(6.0), ["Si", "Sb"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    engine = QEEngine({"pseudo_dir": str(DEBIAN_PSEUDO)})
    with pytest.raises(EngineError) as err:
        engine.check(s)  # fails on the pseudopotential before looking for pw.x
    msg = str(err.value)
    assert "element Sb" in msg
    assert str(DEBIAN_PSEUDO) in msg
    assert "pseudo_dir" in msg and "pseudopotentials" in msg
    assert "element Si" not in msg  # only the missing element is named
    with pytest.raises(EngineError, match="element Sb"):
        engine.single_point(s, 0)


def test_pseudo_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ESPRESSO_PSEUDO", str(tmp_path))
    with pytest.raises(EngineError, match=re.escape(str(tmp_path))):
        QEEngine().check(_si7())


def test_missing_executable_names_debian_package(tmp_path):
    _fake_upf(tmp_path / "Si.pbe-nc.UPF", "Si", "NC", "PBE", 4)
    engine = QEEngine({"pseudo_dir": str(tmp_path), "command": "pw.x-not-installed"})
    with pytest.raises(EngineError, match="quantum-espresso"):
        engine.check(_si7())


# ------------------------------------------------------------------------------------------------------------
# Real pw.x runs
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pbe_pair(tmp_path_factory):
    """PBE single points of the 7-atom Si vacancy cell at q = 0 and q = -1 (~1 s + ~2 s on 2 cores)."""
    root = tmp_path_factory.mktemp("qe_pbe")
    engine = QEEngine(FAST, fidelity="low")
    return (
        root,
        engine.single_point(_si7(), 0, root / "q0"),
        engine.single_point(_si7(), -1, root / "qm1"),
    )


def _fermi_ev(pw_out: Path) -> float:
    return float(re.findall(r"the Fermi energy is\s+([-\d.]+) ev", pw_out.read_text())[-1])


@pytest.mark.dft
@needs_pw
@needs_debian_pseudo
def test_pbe_charged_single_points(pbe_pair):
    root, f0, fm1 = pbe_pair
    for f, q in ((f0, 0), (fm1, -1)):
        assert f.scf_converged and f.error is None
        assert f.engine == "qe" and f.xc == "PBE" and f.fidelity == "low"
        assert f.charge == q
        with warnings.catch_warnings():  # pymatgen warns that q differs from the (unset) oxidation states
            warnings.simplefilter("ignore")
            assert f.structure.charge == q
        assert np.isfinite(f.energy)
        assert f.forces_array.shape == (7, 3) and np.isfinite(f.forces_array).all()
        assert len(f.stress) == 6 and np.isfinite(f.stress).all()
        assert f.wall_seconds > 0
    # QE counts the electrons we meant: 7 × 4 = 28 for q = 0, 29 (one extra) for q = -1
    out0, outm1 = (root / "q0" / "pw.out").read_text(), (root / "qm1" / "pw.out").read_text()
    assert re.search(r"number of electrons\s*=\s*28\.00", out0)
    assert re.search(r"number of electrons\s*=\s*29\.00", outm1)
    # odd electron count → spin-polarised (auto), even → not
    assert _read_pw_input((root / "qm1" / "pw.in").read_text())[0]["system"]["nspin"] == 2
    assert "nspin" not in _read_pw_input((root / "q0" / "pw.in").read_text())[0]["system"]
    assert fm1.magnetization is not None and f0.magnetization is None
    assert fm1.magnetization == pytest.approx(
        round(fm1.magnetization), abs=0.05
    )  # integer moment (1 or 3 μB)
    assert round(fm1.magnetization) % 2 == 1
    # Adding an electron costs roughly the Kohn-Sham level it goes into. QE puts the average electrostatic
    # potential at zero (compensating background), where the Si VBM/vacancy levels sit at ~6 eV; so
    # 0 < ΔE < 10 eV, and (Janak) ΔE is within ~1.5 eV of the neutral cell's Fermi level (measured:
    # ΔE = 5.48 eV, E_F(q=0) = 6.15 eV; the gap to it is the exchange energy of the spin-polarised anion).
    de = fm1.energy - f0.energy
    assert 0 < de < 10
    assert abs(de - _fermi_ev(root / "q0" / "pw.out")) < 1.5
    assert not (root / "q0" / "out").exists()  # QE scratch removed by default


@pytest.mark.dft
@needs_pw
@needs_debian_pseudo
def test_pbe_relax_records_every_step(tmp_path):
    engine = QEEngine(FAST)
    start = si_vacancy(rattle=0.05, seed=1)
    traj = engine.relax(start, 0, tmp_path, fmax=0.05, max_steps=3)
    assert traj.status == "unconverged"  # the unrelaxed vacancy has ~1 eV/Å forces: 3 steps are not enough
    assert "fmax=0.05" in traj.error
    assert traj.engine == "qe" and traj.charge == 0 and traj.fmax_target == 0.05
    assert 2 <= traj.n_steps <= 3
    assert [f.step for f in traj.frames] == list(range(traj.n_steps))
    energies = [f.energy for f in traj.frames]
    assert all(np.isfinite(energies))
    assert all(b < a for a, b in zip(energies, energies[1:]))  # BFGS goes downhill
    for f in traj.frames:
        assert f.forces_array.shape == (7, 3) and f.scf_converged and f.charge == 0
        assert f.wall_seconds > 0
        assert f.vbm is not None and f.cbm is not None and f.fermi_level is not None  # every ionic step
    assert sum(f.wall_seconds for f in traj.frames) == pytest.approx(traj.wall_seconds, rel=1e-6)
    # frame 0 is the input geometry; later frames moved
    assert np.allclose(traj.frames[0].structure.cart_coords, start.cart_coords, atol=1e-8)
    assert traj.frames[-1].structure.lattice == start.lattice
    assert not np.allclose(traj.frames[-1].structure.cart_coords, start.cart_coords, atol=1e-3)
    # no lsda restart in this closed-shell run: no step is flagged. Splice pw.x's lsda-check message in between
    # the first and the second step's forces, where pw.x prints it: every later step becomes suspect, but the
    # last one of a converged relaxation (the restart confirmed the minimum)
    assert not any(f.forces_suspect for f in traj.frames)
    lines = (tmp_path / "pw.out").read_text().splitlines(keepends=True)
    second = [i for i, ln in enumerate(lines) if "Forces acting on atoms" in ln][1]
    lines.insert(second, '     by performing a new scf iteration without any "electronic" history\n')
    spliced = tmp_path / "spliced.out"
    spliced.write_text("".join(lines))
    result = parse_pw_output(spliced, hybrid=False)
    n = len(result.atoms)
    assert n == traj.n_steps and result.lsda_restarted == [False] + [True] * (n - 1)
    assert suspect_forces(result, n, converged=False) == [False] + [True] * (n - 1)
    assert suspect_forces(result, n, converged=True) == [False] + [True] * (n - 2) + [False]


@pytest.mark.dft
@needs_pw
@needs_debian_pseudo
def test_scf_failure_is_recorded_not_raised(tmp_path):
    engine = QEEngine({**FAST, "electron_maxstep": 3})
    frame = engine.single_point(_si7(), -1, tmp_path / "sp")
    assert frame.scf_converged is False and frame.energy is None
    assert "convergence NOT achieved" in frame.error
    traj = engine.relax(si_vacancy(rattle=0.05, seed=1), 0, tmp_path / "relax", fmax=0.05, max_steps=3)
    assert traj.status == "failed" and "convergence NOT achieved" in traj.error
    assert traj.frames and traj.frames[-1].scf_converged is False  # the failing step is kept


@pytest.mark.dft
@needs_pw
@needs_debian_pseudo
def test_timeout_is_recorded(tmp_path):
    frame = QEEngine({**FAST, "timeout_s": 0.2}).single_point(_si7(), -1, tmp_path)
    assert frame.scf_converged is False and "timeout_s=0.2" in frame.error


@pytest.mark.dft
@needs_pw
@needs_debian_pseudo
def test_hse06_single_point(tmp_path, pbe_pair):
    _, f_pbe, _ = pbe_pair
    engine = QEEngine({**FAST, "xc": "HSE06", "conv_thr": 1e-6})  # 1e-6 Ry: ~25 % faster, ΔE ~ 1 meV
    f = engine.single_point(_si7(), 0, tmp_path)
    assert f.scf_converged and f.error is None
    assert f.xc == "HSE06" and f.engine == "qe" and f.charge == 0
    assert f.forces_array.shape == (7, 3) and np.isfinite(f.forces_array).all()
    text = (tmp_path / "pw.out").read_text()
    assert "EXX self-consistency reached" in text
    # the energy is the final `!!` (EXX-converged) line, not the first `!` line ASE's reader would pick
    final = float(re.findall(r"^!!\s+total energy\s*=\s*([-\d.]+) Ry", text, re.MULTILINE)[-1]) * RY_IN_EV
    assert f.energy == pytest.approx(final, abs=1e-6)
    assert f.energy != pytest.approx(f_pbe.energy, abs=0.05)
    assert abs(f.energy - f_pbe.energy) < 5  # same pseudopotential, same cell: a fraction of an eV per atom
    assert f.settings_digest != f_pbe.settings_digest
    # band edges from the EXX-converged eigenvalues (the last table, not the first EXX loop's)
    assert f.vbm is not None and f.cbm is not None and f.vbm < f.cbm
    assert f_pbe.vbm is not None and f_pbe.cbm is not None


@pytest.mark.dft
@needs_pw
@needs_debian_pseudo
def test_bulk_band_edges(tmp_path):
    """Bulk Si (8-atom conventional cell, q = 0, 2×2×2 mesh containing Γ): the bulk reference's VBM and gap.

    The 2×2×2 mesh of the conventional cell folds Γ, X and L-type points of the primitive zone, but not the
    conduction-band minimum (85 % of Γ–X), so the gap is above the converged PBE gap (~0.6 eV): measured
    0.72 eV here (VBM 6.28 eV at Γ, ecutwfc 20 Ry, a = 5.431 Å; 0.75 eV at a = 5.468 Å). 0.5-1.1 eV
    brackets it with room for cutoff and
    pseudopotential changes while excluding a metal (0) or a mis-parsed table (several eV).
    """
    engine = QEEngine({**FAST, "kpts": (2, 2, 2)})
    f = engine.single_point(si_conventional(), 0, tmp_path)
    assert f.scf_converged and f.error is None and f.charge == 0
    assert f.vbm is not None and f.cbm is not None and f.fermi_level is not None
    assert f.vbm < f.fermi_level < f.cbm
    assert 0.5 < f.band_gap < 1.1
    assert _read_pw_input((tmp_path / "pw.in").read_text())[0]["system"]["nbnd"] == 20  # 16 occupied + 4 empty
    # self-consistency with QE's own printout: the VBM is the highest occupied eigenvalue at Γ
    text = (tmp_path / "pw.out").read_text()
    gamma = re.search(
        r"k = 0\.0000 0\.0000 0\.0000 \(.*?bands \(ev\):\s*\n(.*?)occupation", text, re.DOTALL
    )
    levels = [float(x) for x in re.findall(r"-?\d+\.\d+", gamma.group(1))]
    assert f.vbm == pytest.approx(levels[15], abs=1e-4)


# ------------------------------------------------------------------------------------------------------------
# Child processes: own session, ended on timeout and on interrupt (defectflow.engines.process)
# ------------------------------------------------------------------------------------------------------------
needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
TESTS = Path(__file__).resolve().parent


def _survivors(recorded: dict[int, dict], timeout: float = 15.0) -> list[str]:
    """Processes still alive (not zombies) `timeout` s later: a recorded pid with the same start time, or any
    process in a recorded process group or session other than this test's own."""
    own = {os.getpgrp(), os.getsid(0)}
    groups = {i["pgrp"] for i in recorded.values()} - own
    sessions = {i["sid"] for i in recorded.values()} - own
    deadline = time.monotonic() + timeout
    while True:
        table = proc_table()
        left = [
            f"{pid} {info['comm']} (pgrp {info['pgrp']}, sid {info['sid']})"
            for pid, info in table.items()
            if info["state"] not in "ZX"
            and ((pid in recorded and recorded[pid]["start"] == info["start"])
                 or info["pgrp"] in groups or info["sid"] in sessions)
        ]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


_TREE = (  # a launcher with a child in a process group of its own, as OpenMPI's mpirun starts its ranks
    "import subprocess, sys, time\n"
    "child = subprocess.Popen(['sleep', '300'], process_group=0)\n"
    "open(sys.argv[1], 'w').write(str(child.pid))\n"
    "time.sleep(300)\n"
)


@needs_proc
def test_run_process_timeout_ends_the_whole_session(tmp_path):
    from defectflow.engines import process

    pid_file = tmp_path / "child.pid"
    result = process.run_process(
        [sys.executable, "-c", _TREE, str(pid_file)], cwd=tmp_path, timeout=1.5, grace=2.0,
        stdout=tmp_path / "out.txt", stderr=subprocess.STDOUT,
    )
    assert result.timed_out and result.returncode == -signal.SIGTERM and 1.5 <= result.wall_seconds < 10
    child = int(pid_file.read_text())
    info = proc_table().get(child)
    assert info is None or info["state"] in "ZX", info  # the grandchild in its own group is gone too
    assert process.live_pids() == []
    ok = process.run_process(["sh", "-c", "exit 3"], stdout=subprocess.DEVNULL)
    assert (ok.returncode, ok.timed_out) == (3, False)
    with pytest.raises(ValueError, match="file"):
        process.run_process(["true"], stdout=subprocess.PIPE)


_SIGTERM_SCRIPT = """
import sys
from defectflow.engines import process
process.install_signal_handlers(grace=2.0)
print("READY", flush=True)
process.run_process([sys.executable, "-c", {tree!r}, "child.pid"])
"""


@needs_proc
def test_sigterm_handler_ends_children(tmp_path):
    """SIGTERM to a program that installed process.install_signal_handlers(): every child session ends and the
    program exits with 128 + 15 (SystemExit, so `finally` blocks run)."""
    script = tmp_path / "run.py"
    script.write_text(_SIGTERM_SCRIPT.format(tree=_TREE))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "READY"
        deadline = time.monotonic() + 30
        while not (tmp_path / "child.pid").exists() or not (tmp_path / "child.pid").read_text():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        recorded = descendants(proc.pid, proc_table())
        assert len(recorded) == 2  # the launcher and its child
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        assert _survivors(recorded) == []
    finally:
        proc.kill()
        proc.wait()


_INTERRUPT_SCRIPT = """
import signal, sys
# a shell starts background jobs with SIGINT ignored, and Python then installs no KeyboardInterrupt handler: the
# suite run with `... &` (nohup, CI wrappers) would see the signal do nothing. Ctrl-C's default, whatever started us.
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, {tests!r})
from conftest import si_vac15
from defectflow.engines.qe import QEEngine

engine = QEEngine({settings!r})
print("READY", flush=True)
engine.relax(si_vac15(), 1, "run", fmax=0.001, max_steps=100)
print("FINISHED", flush=True)
"""


@pytest.mark.dft
@needs_proc
@needs_pw
@needs_debian_pseudo
def test_sigint_ends_mpirun_and_every_pw_x(tmp_path):
    """Ctrl-C (SIGINT) to a Python process running a QE relaxation (the benchmark reference's setting: 15 atoms,
    q = +1, 2×2×2 k-points, 18 Ry, mpirun -np 2: several seconds per ionic step): once pw.x runs, SIGINT makes the
    engine end mpirun and both pw.x ranks; nothing it started survives. Checked by the pids, process groups and
    sessions of its descendants, recorded before the signal (another pw.x on the machine does not count)."""
    settings = {**REFERENCE, "pseudo_dir": str(DEBIAN_PSEUDO)}
    script = tmp_path / "run.py"
    script.write_text(_INTERRUPT_SCRIPT.format(tests=str(TESTS), settings=settings))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(tmp_path / "script.out", "w") as out:
        proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            recorded = descendants(proc.pid, proc_table())
            if sum(info["comm"] == "pw.x" for info in recorded.values()) >= 2:
                break
            assert proc.poll() is None, (tmp_path / "script.out").read_text()
            assert time.monotonic() < deadline, "pw.x did not start"
            time.sleep(0.1)
        time.sleep(1.0)  # pw.x is computing
        recorded = descendants(proc.pid, proc_table())
        comms = sorted(info["comm"] for info in recorded.values())
        assert "mpirun" in comms or "orterun" in comms, comms
        assert {i["sid"] for i in recorded.values()} == {recorded_leader_sid(recorded, proc.pid)}
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
        text = (tmp_path / "script.out").read_text()
        assert rc != 0 and "KeyboardInterrupt" in text and "FINISHED" not in text
        assert _survivors(recorded) == []
        assert (tmp_path / "run" / "pw.out").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def recorded_leader_sid(recorded: dict[int, dict], parent: int) -> int:
    """The session of the engine's direct child (mpirun): its own pid (start_new_session), not the script's."""
    (leader,) = [pid for pid, info in recorded.items() if info["ppid"] == parent]
    assert recorded[leader]["sid"] == leader != os.getsid(parent)
    return leader
