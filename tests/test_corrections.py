"""Finite-size corrections of charged defects: doped's eFNV (Kumagai) and FNV (Freysoldt) from the engines'
electrostatic potentials, and how ``levels.correction`` chooses.

* VASP (no VASP here): a LOCPOT + OUTCAR pair built by the test for a vacancy in a 10 Å simple-cubic cell, where
  the defect's potential is the bulk's plus the screened, periodic potential of a Gaussian charge q (the model
  FNV itself uses) plus a constant c. Both corrections must then be the point-charge lattice energy (= the
  Makov–Payne image-charge term of a cubic cell, ∝ q²/ε) plus an alignment of exactly −q·c, and equal to doped
  called directly on the same files. The potentials reach the levels step through ``Frame.potential`` from the run
  directory, from atomate2's TaskDoc, and from ``VaspEngine.single_point`` with a fake VASP binary.
* QE (real pw.x + pp.x, ``dft``): the 8-atom bulk and the 7-atom vacancy (q = +1) at 20 Ry, Γ: the potential the
  engine records feeds doped's FNV and eFNV.
* Choosing: auto → eFNV / FNV / image_charge by what the calculations carry, with the reason; a bad value is one
  line naming ``levels.correction``.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import have, si_conventional, si_vacancy
from pymatgen.core import Lattice, Structure
from pymatgen.entries.computed_entries import ComputedStructureEntry

from defectflow.engines.qe import QEEngine, QESettings, read_potential_cube
from defectflow.engines.vasp import VaspEngine, potential_from_directory, potential_from_task
from defectflow.levels import (
    LevelEntry,
    compute_levels,
    correction_name,
    image_charge_correction,
    with_potentials,
)
from defectflow.schemas.core import ElectrostaticPotential

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_vasp import FAKE_SI_POTCAR, _relax_data, _write_relax_vasprun  # noqa: E402

COULOMB = 14.399645  # e/(4πε0) in V·Å
BOHR = 0.529177210903  # Å: the width of pymatgen's default FNV model charge (QModel beta = 1 bohr)
L, N_SC, GRID = 10.0, 4, 40  # cubic cell (Å), sites per edge, grid points per edge
OFFSET = 0.1  # c: constant shift of the defect's electrostatic potential far from the defect, V


# ------------------------------------------------------------------------------------------------------------
# a VASP-format defect/bulk pair with a known answer
# ------------------------------------------------------------------------------------------------------------
def _bulk() -> Structure:
    return Structure(Lattice.cubic(L), ["Si"] * N_SC**3,
                     [[i / N_SC, j / N_SC, k / N_SC] for i in range(N_SC) for j in range(N_SC) for k in range(N_SC)])


def _vacancy(bulk: Structure) -> Structure:
    s = bulk.copy()
    s.remove_sites([0])  # the vacancy at the origin
    return s


def _defect_entry(bulk: Structure, defect: Structure, q: int) -> dict:
    """doped's DefectEntry (as_dict) of the vacancy at bulk site 0, as the generation step makes one."""
    from doped.core import DefectEntry, Vacancy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DefectEntry(defect=Vacancy(bulk, bulk[0]), charge_state=q, sc_entry=ComputedStructureEntry(defect, 0.0),
                           sc_defect_frac_coords=bulk[0].frac_coords, defect_supercell_site=bulk[0],
                           defect_supercell=defect, bulk_supercell=bulk).as_dict()


def _fourier(shape, lattice):
    """Integer Miller indices and |G|² (Å⁻²) of a grid."""
    hkl = np.stack(np.meshgrid(*(np.fft.fftfreq(n, 1.0 / n) for n in shape), indexing="ij"))
    g = np.einsum("i...,ij->...j", hkl, lattice.reciprocal_lattice.matrix)
    return hkl, np.einsum("...j,...j->...", g, g)


def _charge_potential(q: int, eps: float, lattice, frac_points: np.ndarray | None = None):
    """Electrostatic potential (V) of a Gaussian charge q (ρ ∝ exp(−r²/β²), β = 1 bohr) at the origin, screened by
    ε, periodic, in a neutralising background (zero mean): on the grid, or at ``frac_points``."""
    hkl, g2 = _fourier((GRID,) * 3, lattice)
    with np.errstate(divide="ignore"):
        coeff = np.where(g2 > 0, 4 * np.pi * COULOMB * q / (eps * lattice.volume * g2) * np.exp(-g2 * BOHR**2 / 4), 0)
    if frac_points is None:
        return np.real(np.fft.ifftn(coeff)) * coeff.size
    return np.array([np.real(np.sum(coeff * np.exp(2j * np.pi * np.einsum("i...,i->...", hkl, f))))
                     for f in frac_points])


def _bulk_potential(frac_points: np.ndarray | None = None):
    """A bulk electrostatic potential (V) that varies along every axis (one cosine per site spacing)."""
    if frac_points is None:
        x = np.arange(GRID) / GRID
        frac_points = np.stack(np.meshgrid(x, x, x, indexing="ij"), axis=-1)
    return 0.3 * np.cos(2 * np.pi * N_SC * frac_points).sum(axis=-1) + 2.0


def _write_outcar(path: Path, phi_sites: np.ndarray, energy: float = 0.0) -> None:
    """The parts of an OUTCAR doped reads for eFNV: 'average (electrostatic) potential at core' (VASP prints
    −φ, in the fixed-width columns of 5 per line), ended by E-fermi, and the energy (eV) it checks against the
    entry's."""
    rows = [" average (electrostatic) potential at core", "  the test charge radii are     0.8059",
            "  (the norm of the test charge is              1.0000)"]
    fields = [f"{i + 1:8d}{-v:9.4f}" for i, v in enumerate(phi_sites)]
    rows += ["".join(fields[i:i + 5]) for i in range(0, len(fields), 5)]
    rows += ["", "", " E-fermi :   5.1234     XC(G=0):  -9.1234     alpha+bet : -5.1234", "",
             f"  energy  without entropy=     {energy:.8f}  energy(sigma->0) =     {energy:.8f}"]
    path.write_text("\n".join(rows) + "\n")


def _write_run(directory: Path, structure: Structure, phi_grid: np.ndarray, phi_sites: np.ndarray) -> Path:
    """LOCPOT (the potential energy of an electron, eV = −φ) and OUTCAR of one calculation."""
    from pymatgen.io.vasp.outputs import Locpot

    directory.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen's own deprecated 'total' key inside write_file
        Locpot(structure, {"total": -phi_grid}).write_file(directory / "LOCPOT")
    _write_outcar(directory / "OUTCAR", phi_sites)
    return directory


@functools.cache
def _vasp_pair(q: int, eps: float, root: str) -> tuple[Path, Path]:
    """(bulk run, defect run) directories under ``root``: φ_defect = φ_bulk + φ_q + c."""
    bulk = _bulk()
    defect = _vacancy(bulk)
    base = Path(root)
    b = _write_run(base / "bulk", bulk, _bulk_potential(), _bulk_potential(bulk.frac_coords))
    phi = _bulk_potential() + _charge_potential(q, eps, bulk.lattice) + OFFSET
    phi_sites = _bulk_potential(defect.frac_coords) + _charge_potential(q, eps, bulk.lattice, defect.frac_coords)
    d = _write_run(base / f"v_q{q}_eps{eps}", defect, phi, phi_sites + OFFSET)
    return b, d


@pytest.fixture(scope="module")
def vasp_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("vasp_pair"))


def _levels(q: int, eps: float, root: str, correction: str, **kw):
    bulk_dir, defect_dir = _vasp_pair(q, eps, root)
    bulk = _bulk()
    defect = _vacancy(bulk)
    entry = LevelEntry(defect="v_Si", charge=q, energy=-100.0, structure=defect, defect_entry=_defect_entry(bulk, defect, q),
                       potential=potential_from_directory(defect_dir))
    return compute_levels([entry], bulk, -110.0, 0.0, 1.0, correction=correction, dielectric=eps,
                          bulk_potential=potential_from_directory(bulk_dir), **kw)


def test_vasp_files_to_potential(vasp_root):
    """LOCPOT → planar averages (eV, as written), OUTCAR → site potentials (V, doped's sign: −OUTCAR)."""
    from pymatgen.io.vasp.outputs import Locpot

    bulk_dir, defect_dir = _vasp_pair(1, 11.7, vasp_root)
    pot = potential_from_directory(defect_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        locpot = Locpot.from_file(defect_dir / "LOCPOT")
    for axis in range(3):
        assert pot.planar_averages[axis] == pytest.approx(locpot.get_average_along_axis(axis).tolist(), abs=1e-9)
    defect = _vacancy(_bulk())
    phi = _bulk_potential(defect.frac_coords) + _charge_potential(1, 11.7, defect.lattice, defect.frac_coords)
    assert pot.site_potentials == pytest.approx((phi + OFFSET).tolist(), abs=1e-4)  # OUTCAR: 4 decimals
    assert pot.grid == [GRID] * 3 and pot.file.endswith("LOCPOT") and pot.source.startswith("vasp")
    assert potential_from_directory(bulk_dir.parent / "nothing_here") is None


@pytest.mark.parametrize("q", [1, 2])
def test_fnv_and_efnv_on_vasp_files_match_the_model(vasp_root, q):
    """The lattice term is the cubic cell's point-charge (Makov–Payne) energy, ∝ q²/ε. Both schemes reference
    their model potential to a point charge's (eFNV: a point charge; FNV: the Gaussian's G = 0 term, pymatgen's
    ``rho_rec_limit0``), whose zero-mean periodic potential lies below our zero-mean Gaussian's far from the
    charge by πqβ²/(εΩ) (in e/(4πε0) units): the alignment is −q·(c + πqβ²/(εΩ))."""
    eps = 11.7
    mp = image_charge_correction(_bulk(), q, eps)
    fnv = _levels(q, eps, vasp_root, "FNV").correction_details[f"v_Si +{q}"]
    efnv = _levels(q, eps, vasp_root, "eFNV").correction_details[f"v_Si +{q}"]
    assert (fnv.scheme, efnv.scheme) == ("fnv", "efnv")
    assert efnv.point_charge == pytest.approx(mp, rel=1e-4)
    assert fnv.point_charge == pytest.approx(mp, rel=5e-3)  # Gaussian model charge: a meV from a point charge
    gaussian_shift = np.pi * q * BOHR**2 * COULOMB / (eps * L**3)  # V
    assert efnv.alignment == pytest.approx(-q * (OFFSET + gaussian_shift), abs=2e-4)
    assert fnv.alignment == pytest.approx(-q * (OFFSET + gaussian_shift), abs=1e-3)
    assert efnv.sampled_sites > 0 and efnv.error < 1e-3 and fnv.error < 1e-2
    for c in (fnv, efnv):
        assert c.energy == pytest.approx(c.point_charge + c.alignment, abs=1e-9)
    # scaling: the lattice term with q²/ε
    half = _levels(q, eps / 2, vasp_root, "eFNV").correction_details[f"v_Si +{q}"]
    assert half.point_charge == pytest.approx(2 * efnv.point_charge, rel=1e-6)


def test_equal_to_doped_called_directly(vasp_root):
    """Our path (Frame potentials → compute_levels) gives what doped gives on the files themselves: eFNV from the
    OUTCARs, FNV from the LOCPOTs' planar averages (doped's parser stores those); a pymatgen Locpot object (its own
    axis grid) agrees to a few meV."""
    from doped.core import DefectEntry
    from doped.corrections import get_freysoldt_correction, get_kumagai_correction
    from pymatgen.io.vasp.outputs import Locpot

    q, eps = 2, 11.7
    bulk_dir, defect_dir = _vasp_pair(q, eps, vasp_root)
    bulk = _bulk()
    ours = {c: _levels(q, eps, vasp_root, c).corrections["v_Si +2"] for c in ("efnv", "fnv")}
    de = DefectEntry.from_dict(_defect_entry(bulk, _vacancy(bulk), q))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        efnv = get_kumagai_correction(de, eps, defect_outcar=defect_dir / "OUTCAR", bulk_outcar=bulk_dir / "OUTCAR",
                                      verbose=False)
        locpots = [Locpot.from_file(d / "LOCPOT") for d in (defect_dir, bulk_dir)]
        planar = [{i: lp.get_average_along_axis(i) for i in range(3)} for lp in locpots]
        fnv = get_freysoldt_correction(de, eps, defect_locpot=planar[0], bulk_locpot=planar[1], verbose=False)
        fnv_grid = get_freysoldt_correction(de, eps, defect_locpot=locpots[0], bulk_locpot=locpots[1], verbose=False)
    assert ours["efnv"] == pytest.approx(efnv.correction_energy, abs=1e-9)
    assert ours["fnv"] == pytest.approx(fnv.correction_energy, abs=1e-9)
    assert ours["fnv"] == pytest.approx(fnv_grid.correction_energy, abs=0.01)


def test_taskdoc_potential_equals_the_files(vasp_root):
    """atomate2's TaskDoc already holds both (``output.locpot`` planar averages, ``output.outcar`` core
    potentials as VASP prints them): the same ElectrostaticPotential as from the files."""
    from doped.utils.parsing import get_core_potentials_from_outcar

    _, defect_dir = _vasp_pair(1, 11.7, vasp_root)
    files = potential_from_directory(defect_dir)
    core = (-get_core_potentials_from_outcar(defect_dir / "OUTCAR")).tolist()  # OUTCAR's own numbers
    task = {"calcs_reversed": [{"output": {"locpot": {str(i): p for i, p in enumerate(files.planar_averages)},
                                           "outcar": {"electrostatic_potential": core}}}]}
    doc = potential_from_task(task)
    assert doc.planar_averages == files.planar_averages and doc.site_potentials == pytest.approx(files.site_potentials)
    assert doc.source == "vasp LOCPOT + OUTCAR (atomate2 TaskDoc)"
    assert potential_from_task({"calcs_reversed": [{"output": {}}]}) is None


FAKE_VASP_WITH_POTENTIALS = """#!/bin/sh
cp "$FAKE_VASPRUN" vasprun.xml
cp POSCAR CONTCAR
echo "   1 F= -.35000000E+02 E0= -.35000000E+02  d E =-.350000E+02  mag=     1.0000" > OSZICAR
cp "$FAKE_OUTCAR" OUTCAR
cp "$FAKE_LOCPOT" LOCPOT
"""


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")
def test_vasp_single_point_records_the_potential(tmp_path, monkeypatch):
    """VaspEngine.single_point (atomate2 + custodian with a fake VASP that leaves a LOCPOT and an OUTCAR with core
    potentials) puts them on the Frame."""
    from pymatgen.core import SETTINGS as PMG_SETTINGS

    psp = tmp_path / "psp" / "POT_GGA_PAW_PBE_54" / "Si"
    psp.mkdir(parents=True)
    (psp / "POTCAR").write_text(FAKE_SI_POTCAR)
    monkeypatch.setitem(PMG_SETTINGS, "PMG_VASP_PSP_DIR", str(tmp_path / "psp"))
    (tmp_path / "bin").mkdir()
    for exe in ("vasp_std_fake", "vasp_gam_fake"):
        (tmp_path / "bin" / exe).write_text(FAKE_VASP_WITH_POTENTIALS)
        (tmp_path / "bin" / exe).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    structures, energies, forces, stresses = _relax_data(1)
    monkeypatch.setenv("FAKE_VASPRUN", str(_write_relax_vasprun(tmp_path / "t.xml", structures, energies, forces,
                                                                 stresses, [5])))
    s = structures[0]
    grid = np.random.default_rng(0).normal(size=(12, 12, 12))
    phi_sites = np.linspace(-1.0, 1.0, len(s))
    _write_run(tmp_path / "files", s, grid, phi_sites)
    monkeypatch.setenv("FAKE_OUTCAR", str(tmp_path / "files" / "OUTCAR"))
    monkeypatch.setenv("FAKE_LOCPOT", str(tmp_path / "files" / "LOCPOT"))
    settings = {"command": "vasp_std_fake", "gamma_command": "vasp_gam_fake",
                "run_vasp_kwargs": {"custodian_kwargs": {"polling_time_step": 0.05, "monitor_freq": 1}}}
    frame = VaspEngine(settings, fidelity="high").single_point(s, 1, tmp_path / "sp")
    assert frame.energy == pytest.approx(energies[-1])
    assert frame.potential is not None and frame.potential.source.startswith("vasp LOCPOT + OUTCAR")
    assert frame.potential.site_potentials == pytest.approx(phi_sites.tolist(), abs=1e-4)
    assert frame.potential.planar_averages[2] == pytest.approx((-grid).mean(axis=(0, 1)).tolist(), abs=1e-9)


# ------------------------------------------------------------------------------------------------------------
# choosing
# ------------------------------------------------------------------------------------------------------------
def _without(potential: ElectrostaticPotential, field: str) -> ElectrostaticPotential:
    return potential.model_copy(update={field: None})


def test_auto_chooses_by_what_the_calculations_carry(vasp_root):
    bulk_dir, defect_dir = _vasp_pair(1, 11.7, vasp_root)
    bulk = _bulk()
    defect = _vacancy(bulk)
    pot, bulk_pot = potential_from_directory(defect_dir), potential_from_directory(bulk_dir)

    def run(p, bp, correction="auto"):
        entries = [LevelEntry(defect="v_Si", charge=q, energy=-100.0 - q, structure=defect,
                              defect_entry=_defect_entry(bulk, defect, q), potential=p if q else None)
                   for q in (0, 1)]  # the neutral entry needs no potential
        return compute_levels(entries, bulk, -110.0, 0.0, 1.0, correction=correction, dielectric=11.7,
                              bulk_potential=bp)

    both = run(pot, bulk_pot)
    assert both.correction_scheme == "efnv" and both.correction_reason.startswith("auto → eFNV: site potentials")
    assert {d.scheme for d in both.correction_details.values()} == {"efnv"}
    assert both.corrections["v_Si +0"] == 0.0 and both.correction_reason in both.notes
    planes = run(_without(pot, "site_potentials"), bulk_pot)
    assert planes.correction_scheme == "fnv" and "site potentials missing for v_Si +1" in planes.correction_reason
    none = run(None, bulk_pot)
    assert none.correction_scheme == "image_charge"
    assert none.correction_reason.startswith("auto → image_charge: no electrostatic potential for v_Si +1")
    assert none.corrections["v_Si +1"] == pytest.approx(image_charge_correction(defect, 1, 11.7))
    # asked for explicitly: used when possible, a clear error when not
    assert run(pot, bulk_pot, "FNV").correction_scheme == "fnv"
    with pytest.raises(ValueError, match=r"levels.correction: 'efnv' needs the site potentials .* missing for: bulk"):
        run(pot, _without(bulk_pot, "site_potentials"), "eFNV")
    with pytest.raises(ValueError, match=r"levels.dielectric: needed for the FNV"):
        compute_levels([], bulk, -110.0, 0.0, 1.0, correction="fnv")
    # stored corrections, applied as they are (figures redrawn without the potentials)
    again = compute_levels(
        [LevelEntry(defect="v_Si", charge=q, energy=-100.0 - q, structure=defect,
                    defect_entry=_defect_entry(bulk, defect, q)) for q in (0, 1)],
        bulk, -110.0, 0.0, 1.0, correction="efnv", precomputed_corrections=both.corrections)
    assert again.corrections == both.corrections
    assert [t.level for t in again.transition_levels] == pytest.approx([t.level for t in both.transition_levels])


def test_bad_correction_is_one_line_naming_the_field():
    from defectflow.campaign import Campaign, CampaignError, LevelsSpec

    assert LevelsSpec(correction="eFNV").correction == "efnv" and LevelsSpec(correction="Image_Charge").correction \
        == "image_charge"
    with pytest.raises(CampaignError) as err:
        Campaign.from_dict({"name": "x", "host": {"structure": "Si.POSCAR"}, "levels": {"correction": "fvn"}})
    expected = "levels.correction: expected 'auto', 'efnv', 'fnv', 'image_charge' or 'none', got 'fvn'"
    assert err.value.problems == [expected]
    assert correction_name("FNV") == "fnv"
    with pytest.raises(ValueError, match=r"^levels.correction: expected one of .* got 'kumagai'$"):
        correction_name("kumagai")


def test_engines_switch_the_potential_on_only_where_needed():
    qe = {"engine": "qe", "xc": "PBE"}
    assert with_potentials(qe, "auto")["electrostatic_potential"] is True
    assert with_potentials(QESettings(), "eFNV")["electrostatic_potential"] is True
    assert "electrostatic_potential" not in with_potentials(qe, "image_charge")
    vasp = {"engine": "vasp", "xc": "HSE06"}
    assert with_potentials(vasp, "auto") == vasp  # LVHAR + OUTCAR: always there
    # the QE digest counts the potential only when on: frozen benchmark digests stay valid
    frozen = {"engine": "qe", "xc": "PBE", "ecutwfc": 18.0, "kpts": [2, 2, 2], "conv_thr": 1e-6, "mpi_procs": 2}
    assert QEEngine(frozen).digest == "323982b99151"
    assert QEEngine({**frozen, "electrostatic_potential": True}).digest != "323982b99151"


# ------------------------------------------------------------------------------------------------------------
# QE: pw.x + pp.x
# ------------------------------------------------------------------------------------------------------------
DEBIAN_PSEUDO = Path("/usr/share/espresso/pseudo")
QE_FAST = {"ecutwfc": 20.0, "pseudo_dir": str(DEBIAN_PSEUDO), "electrostatic_potential": True}


@pytest.mark.dft
@pytest.mark.slow
@pytest.mark.skipif(not (have("pw.x") and have("pp.x")), reason="pw.x/pp.x not installed (Debian: quantum-espresso)")
@pytest.mark.skipif(not (DEBIAN_PSEUDO / "Si.pbe-rrkj.UPF").is_file(), reason="Debian quantum-espresso-data missing")
def test_qe_potential_feeds_fnv_and_efnv(tmp_path):
    """Bulk Si (8 atoms) and its vacancy at q = +1 (7 atoms), PBE 20 Ry, Γ (pw.x + pp.x ~3 s on 2 cores, ~17 s
    with the imports and three levels calls): pp.x's potential is on the Frame and in potential.cube.gz; doped's
    FNV and eFNV take it. In this cubic cell both lattice terms equal the image-charge term; the alignments are
    large here (a 5.4 Å cell holds no region far from the vacancy), but have the same sign in both schemes."""
    engine = QEEngine(QE_FAST, fidelity="high")
    bulk_s, defect_s = si_conventional(), si_vacancy()
    bulk = engine.single_point(bulk_s, 0, tmp_path / "bulk")
    defect = engine.single_point(defect_s, 1, tmp_path / "v_q1")
    for f in (bulk, defect):
        assert f.scf_converged and f.potential is not None
        pot = f.potential
        assert Path(pot.file).name == "potential.cube.gz" and not (Path(pot.file).parent / "potential.pp").exists()
        grid = read_potential_cube(pot.file)
        assert pot.grid == list(grid.shape) and len(pot.site_potentials) == len(f.structure)
        assert pot.planar_averages[0] == pytest.approx(grid.mean(axis=(1, 2)).tolist(), abs=1e-9)
        assert not (Path(pot.file).parent / "out").exists()  # QE's scratch still removed after pp.x
    # bulk: every site of the diamond lattice is equivalent
    assert np.ptp(bulk.potential.site_potentials) < 1e-3
    entry = LevelEntry(defect="v_Si", charge=1, energy=defect.energy, structure=defect.structure,
                       defect_entry=_defect_entry(bulk_s, defect_s, 1), potential=defect.potential)
    res = {c: compute_levels([entry], bulk_s, bulk.energy, bulk.vbm or 0.0, 0.7, correction=c, dielectric=11.7,
                             bulk_potential=bulk.potential).correction_details["v_Si +1"]
           for c in ("auto", "fnv", "image_charge")}
    assert res["auto"].scheme == "efnv"
    mp = res["image_charge"].energy
    assert res["auto"].point_charge == pytest.approx(mp, rel=1e-3)
    assert res["fnv"].point_charge == pytest.approx(mp, rel=1e-2)
    assert np.sign(res["auto"].alignment) == np.sign(res["fnv"].alignment) != 0
