"""VASP engine: inputs per charge state (no POTCARs, no VASP here), the not-configured error, and the vasprun parser.

The parser is exercised through pymatgen's real ``Vasprun`` on (a) ASE's shipped test vasprun.xml, cross-checked
against ASE's own reader, and (b) a small multi-step relaxation vasprun.xml written by the test.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from conftest import si_vacancy
from pymatgen.core import Structure
from pymatgen.io.vasp import Incar, Kpoints

from defectflow.engines import get_engine
from defectflow.engines.base import EngineError
from defectflow.engines.vasp import (
    KBAR_TO_EV_PER_A3,
    VaspEngine,
    VaspSettings,
    frames_from_task,
    to_frame,
    trajectory_from_task,
    trajectory_from_vasprun,
    zval_for,
)

# pymatgen warns whenever a charged Structure without oxidation states has its .charge read: intended here
pytestmark = pytest.mark.filterwarnings("ignore:Structure charge.*oxidation states:UserWarning")

CHARGES = (-2, -1, 0, 1)
N_NEUTRAL = 7 * 4  # 7 Si atoms, ZVAL 4 (PAW_PBE Si 05Jan2001)


@cache
def _si7() -> Structure:
    return si_vacancy()


def si7() -> Structure:
    """The 7-atom Si vacancy cell (built once: Structure.from_spacegroup takes ~1 s on a busy CPU)."""
    return _si7().copy()


@pytest.fixture(scope="module")
def relax_inputs(tmp_path_factory):
    engine = VaspEngine({})
    root = tmp_path_factory.mktemp("vasp_relax")
    return {q: engine.write_inputs(si7(), q, root / f"q{q:+d}", "relax", fmax=0.03, max_steps=77) for q in CHARGES}


@pytest.mark.parametrize("q", CHARGES)
def test_relax_inputs_per_charge(relax_inputs, q):
    d = relax_inputs[q]
    assert sorted(p.name for p in d.iterdir()) == ["INCAR", "KPOINTS", "POSCAR", "POTCAR.spec"]
    incar = Incar.from_file(d / "INCAR")
    assert incar["NELECT"] == N_NEUTRAL - q
    assert incar["ISPIN"] == 2
    assert incar["ISIF"] == 2
    assert incar["IBRION"] == 2
    assert incar["EDIFFG"] == pytest.approx(-0.03)
    assert incar["NSW"] == 77
    assert incar["ENCUT"] == 400
    assert incar["ISMEAR"] == 0 and incar["SIGMA"] == pytest.approx(0.05)
    assert str(incar["LREAL"]).lower() == "auto"
    assert str(incar["GGA"]).upper() == "PE"
    assert "LHFCALC" not in incar and "METAGGA" not in incar
    kpts = Kpoints.from_file(d / "KPOINTS")
    assert kpts.style.name == "Gamma" and tuple(kpts.kpts[0]) == (1, 1, 1)
    assert (d / "POTCAR.spec").read_text().split() == ["Si"]
    assert len((d / "POSCAR").read_text().splitlines()) == 8 + 7


def test_hse06_static_inputs(tmp_path):
    engine = VaspEngine({"xc": "HSE06"})
    for q in (-1, 1):
        vi = engine.input_set(si7(), q, kind="static")
        incar = vi["INCAR"]
        assert incar["NELECT"] == N_NEUTRAL - q
        assert incar["LHFCALC"] is True
        assert incar["HFSCREEN"] == pytest.approx(0.2)
        assert incar["AEXX"] == pytest.approx(0.25)
        assert incar["ALGO"] == "All"
        assert incar["NSW"] == 0 and "EDIFFG" not in incar
        assert incar["ISPIN"] == 2
    maker = engine.static_maker(-1)
    assert type(maker).__name__ == "HSEStaticMaker"
    assert type(engine.relax_maker(-1)).__name__ == "HSERelaxMaker"
    assert type(VaspEngine({}).static_maker(0)).__name__ == "StaticMaker"
    assert type(VaspEngine({}).relax_maker(0)).__name__ == "RelaxMaker"


def test_incar_updates_override_everything_and_kpoint_mesh():
    settings = {
        "encut": 520,
        "kpoints": (2, 2, 2),
        "spin": "off",
        "incar_updates": {"ISPIN": 2, "EDIFFG": -0.1, "NCORE": 4, "LVHAR": None, "NELECT": 30.5},
    }
    incar = VaspEngine(settings).input_set(si7(), -1, "relax", fmax=0.03)["INCAR"]
    assert incar["EDIFFG"] == pytest.approx(-0.1)  # incar_updates beat fmax
    assert incar["ISPIN"] == 2  # beat spin: off
    assert incar["NCORE"] == 4 and incar["ENCUT"] == 520
    assert "LVHAR" not in incar  # None removes a tag
    assert incar["NELECT"] == 30.5  # even NELECT
    assert "KPAR" not in incar
    vi = VaspEngine({"kpoints": (2, 2, 2), "spin": "off"}).input_set(si7(), 0)
    assert tuple(vi["KPOINTS"].kpts[0]) == (2, 2, 2) and vi["KPOINTS"].style.name == "Gamma"
    assert vi["INCAR"]["ISPIN"] == 1


@pytest.mark.filterwarnings("ignore:Overriding POTCARs:UserWarning")
def test_potcar_symbols_and_zval_from_pymatgen_data():
    assert zval_for("Si") == 4.0
    assert zval_for("Ga_d") == 13.0
    # doped's default symbol for Ga is Ga_d (doped/VASP_sets/PotcarSet.yaml), user override wins
    from pymatgen.core import Lattice

    gaas = Structure(Lattice.cubic(5.65), ["Ga", "As"], [[0, 0, 0], [0.25, 0.25, 0.25]])
    vi = VaspEngine({}).input_set(gaas, -1)
    assert vi["POTCAR.spec"].split() == ["Ga_d", "As"]
    assert vi["INCAR"]["NELECT"] == 13 + 5 + 1
    vi = VaspEngine({"user_potcar_settings": {"Ga": "Ga"}}).input_set(gaas, 0)
    assert vi["POTCAR.spec"].split() == ["Ga", "As"] and vi["INCAR"]["NELECT"] == 3 + 5
    with pytest.raises(EngineError, match="No_such"):
        zval_for("No_such")


def test_settings_digest_and_registry():
    a = VaspSettings(xc="HSE06")
    assert a.digest() == VaspSettings(xc="HSE06", command="srun vasp_std").digest()  # command is not physics
    assert a.digest() != VaspSettings(xc="PBE").digest()
    assert a.digest() != VaspSettings(xc="HSE06", encut=500).digest()
    engine = get_engine({"engine": "vasp", "xc": "PBEsol"}, fidelity="low")
    assert isinstance(engine, VaspEngine) and engine.fidelity == "low"
    with pytest.raises(ValueError):
        VaspSettings(xc="B3LYP")


def test_maker_serialises_for_a_worker():
    """A maker travels to a worker as JSON; monty must find the generator class by module + name there.

    The class is a plain module-level class of ``defectflow.engines.vasp.sets`` (no class built in a function, no
    module ``__getattr__``); that module imports atomate2, so ``defectflow.engines.vasp`` does not import it.
    """
    from monty.json import MontyDecoder

    import defectflow.engines.vasp as vasp_module
    from defectflow.engines.vasp.sets import DefectSetGenerator

    assert not hasattr(vasp_module, "__getattr__") and "DefectSetGenerator" not in vars(vasp_module)
    assert DefectSetGenerator.__qualname__ == "DefectSetGenerator"
    assert DefectSetGenerator.__module__ == "defectflow.engines.vasp.sets"
    maker = VaspEngine({"xc": "HSE06"}).relax_maker(-2, fmax=0.02, max_steps=10)
    assert type(maker.input_set_generator) is DefectSetGenerator
    blob = json.loads(json.dumps(maker.as_dict()))
    assert blob["input_set_generator"]["@module"] == "defectflow.engines.vasp.sets"
    assert blob["input_set_generator"]["@class"] == "DefectSetGenerator"
    back = MontyDecoder().process_decoded(blob)
    assert type(back).__name__ == "HSERelaxMaker"
    gen = back.input_set_generator
    assert gen.charge == -2 and gen.user_incar_settings["EDIFFG"] == -0.02 and gen.user_incar_settings["NSW"] == 10
    assert gen.get_input_set(si7(), potcar_spec=True)["INCAR"]["NELECT"] == N_NEUTRAL + 2


def test_importing_engines_does_not_import_atomate2():
    """``defectflow.engines`` is imported by every CLI call; atomate2 (seconds to import) only by the makers."""
    code = (
        "import sys, defectflow.engines, defectflow.engines.vasp\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'atomate2', 'custodian', 'emmet'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_high_fidelity_writes_single_point_inputs(tmp_path):
    """The method runs only HF single points: write_inputs for the ``high`` fidelity gives a static INCAR."""
    high = VaspEngine({"xc": "HSE06"}, fidelity="high")
    incar = Incar.from_file(high.write_inputs(si7(), 1, tmp_path / "hf") / "INCAR")
    assert incar["NSW"] == 0 and incar["IBRION"] == -1 and "EDIFFG" not in incar
    assert incar["LHFCALC"] is True and incar["NELECT"] == N_NEUTRAL - 1
    relax = Incar.from_file(high.write_inputs(si7(), 1, tmp_path / "hf_relax", "relax") / "INCAR")
    assert relax["IBRION"] == 2 and relax["NSW"] == 100  # asked for explicitly
    low = Incar.from_file(VaspEngine({}, fidelity="low").write_inputs(si7(), 0, tmp_path / "lf") / "INCAR")
    assert low["IBRION"] == 2 and low["NSW"] == 100 and low["EDIFFG"] == pytest.approx(-0.05)


def test_not_configured_raises_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no vasp_std / vasp_gam anywhere
    engine = VaspEngine({"command": "vasp_std_missing"})
    with pytest.raises(EngineError, match="VASP is not available on this machine.*defectflow submit"):
        engine.single_point(si7(), -1, tmp_path)
    with pytest.raises(EngineError, match="VASP_CMD"):
        VaspEngine({}).relax(si7(), 0, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written before the check

    # VASP found but no POTCAR library: also a set-up error, raised before anything runs
    for exe in ("vasp_std", "vasp_gam"):
        (tmp_path / exe).write_text("#!/bin/sh\nexit 1\n")
        (tmp_path / exe).chmod(0o755)
    from pymatgen.core import SETTINGS as PMG_SETTINGS

    monkeypatch.setitem(PMG_SETTINGS, "PMG_VASP_PSP_DIR", str(tmp_path / "no_potcars"))
    with pytest.raises(EngineError, match="PMG_VASP_PSP_DIR"):
        VaspEngine({"command": "vasp_std", "gamma_command": "vasp_gam"}).single_point(si7(), 0, tmp_path / "run")


# ---------------------------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------------------------
ASE_VASPRUN = None
try:
    import ase

    _p = Path(ase.__file__).parent / "test" / "testdata" / "vasp" / "vasprun_pstress.xml"
    ASE_VASPRUN = _p if _p.exists() else None
except ImportError:  # pragma: no cover
    pass


@pytest.mark.skipif(ASE_VASPRUN is None, reason="ASE test data not installed")
def test_parser_agrees_with_ase_reader():
    import ase.io

    atoms = ase.io.read(ASE_VASPRUN, format="vasp-xml")
    frame = to_frame(ASE_VASPRUN, charge=0)
    assert frame.engine == "vasp" and frame.charge == 0 and frame.structure.charge == 0
    np.testing.assert_allclose(frame.forces, atoms.get_forces(), atol=1e-8)
    np.testing.assert_allclose(frame.stress, atoms.get_stress(voigt=True), rtol=1e-6, atol=1e-10)
    assert frame.stress[0] > 0  # -166 kbar (VASP: negative = tensile) → positive in the ASE convention
    assert frame.energy == pytest.approx(-20.24010135)  # calculation-level e_0_energy, as Vasprun.final_energy


def _v(rows, fmt="{: .8f}"):
    return "".join("<v>" + " ".join(fmt.format(x) for x in row) + "</v>\n" for row in rows)


def _write_relax_vasprun(path: Path, structures, energies, forces, stresses, n_scf, nelm=40, nsw=50):
    """A small but complete relaxation vasprun.xml (the parts pymatgen's Vasprun reads)."""

    def structure_xml(s, name=None):
        attr = f' name="{name}"' if name else ""
        return (
            f"<structure{attr}><crystal><varray name=\"basis\">{_v(s.lattice.matrix)}</varray>"
            f'<i name="volume">{s.volume:.8f}</i>'
            f'<varray name="rec_basis">{_v(s.lattice.reciprocal_lattice_crystallographic.matrix)}</varray>'
            f'</crystal><varray name="positions">{_v(s.frac_coords)}</varray></structure>\n'
        )

    def energy_xml(e, tag="energy"):
        return (
            f'<{tag}><i name="e_fr_energy">{e + 0.001:.8f}</i><i name="e_wo_entrp">{e + 0.002:.8f}</i>'
            f'<i name="e_0_energy">{e:.8f}</i></{tag}>\n'
        )

    n = len(structures[0])
    calcs = []
    for s, e, f, st, nsc in zip(structures, energies, forces, stresses, n_scf, strict=True):
        scsteps = "".join(
            "<scstep>" + energy_xml(e + 0.1 * (nsc - 1 - k)) + "</scstep>\n" for k in range(nsc)
        )
        calcs.append(
            f"<calculation>{scsteps}{structure_xml(s)}<varray name=\"forces\">{_v(f)}</varray>"
            f'<varray name="stress">{_v(st)}</varray>{energy_xml(e)}</calculation>\n'
        )
    atoms_rows = "".join("<rc><c>Si</c><c>   1</c></rc>" for _ in range(n))
    xml = f"""<?xml version="1.0" encoding="ISO-8859-1"?>
<modeling>
 <generator><i name="program" type="string">vasp </i><i name="version" type="string">6.4.2  </i></generator>
 <incar><i type="int" name="ISPIN">2</i><i type="int" name="NSW">{nsw}</i><i type="int" name="IBRION">2</i>
  <i type="int" name="ISIF">2</i><i name="EDIFFG">-0.05</i><i name="NELECT">29.0</i></incar>
 <kpoints><generation param="Gamma"><v type="int" name="divisions">1 1 1</v>
  <v name="usershift">0 0 0</v></generation>
  <varray name="kpointlist"><v>0 0 0</v></varray><varray name="weights"><v>1.0</v></varray></kpoints>
 <parameters><separator name="electronic"><i type="int" name="NELM">{nelm}</i><i name="NELECT">29.0</i>
  <i type="int" name="ISPIN">2</i></separator>
  <separator name="ionic"><i type="int" name="NSW">{nsw}</i><i type="int" name="IBRION">2</i>
  <i name="EDIFFG">-0.05</i><i type="int" name="ISIF">2</i></separator></parameters>
 <atominfo><atoms>{n}</atoms><types>1</types>
  <array name="atoms"><dimension dim="1">ion</dimension><field type="string">element</field>
   <field type="int">atomtype</field><set>{atoms_rows}</set></array>
  <array name="atomtypes"><dimension dim="1">type</dimension><field type="int">atomspertype</field>
   <field type="string">element</field><field>mass</field><field>valence</field>
   <field type="string">pseudopotential</field>
   <set><rc><c>{n}</c><c>Si</c><c>28.085</c><c>4.0</c><c>  PAW_PBE Si 05Jan2001</c></rc></set></array>
 </atominfo>
 {structure_xml(structures[0], "initialpos")}
 {"".join(calcs)}
 {structure_xml(structures[-1], "finalpos")}
</modeling>
"""
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as fh:
            fh.write(xml)
    else:
        path.write_text(xml)
    return path


def _relax_data(n_steps=3):
    rng = np.random.default_rng(3)
    base = si7()
    cart0 = base.cart_coords + rng.normal(0, 0.05, (7, 3))
    s0 = Structure(base.lattice, base.species, cart0, coords_are_cartesian=True)
    structures, forces = [], []
    for k in range(n_steps):
        cart = s0.cart_coords + rng.normal(0, 0.01, (len(s0), 3))
        s = Structure(s0.lattice, s0.species, cart, coords_are_cartesian=True)
        structures.append(s)
        f = rng.normal(0, 1, (len(s), 3))
        f *= (0.5 / 3**k) / np.linalg.norm(f, axis=1).max()  # fmax 0.5, 0.167, 0.056 ... eV/Å
        forces.append(f)
    stresses = [np.diag([-10.0, 5.0, 2.0]) + k for k in range(n_steps)]
    energies = [-35.0 - 0.1 * k for k in range(n_steps)]
    return structures, energies, forces, stresses


def test_trajectory_from_vasprun_every_ionic_step(tmp_path):
    structures, energies, forces, stresses = _relax_data(4)  # last fmax = 0.5/27 = 0.0185 eV/Å
    path = _write_relax_vasprun(tmp_path / "vasprun.xml.gz", structures, energies, forces, stresses, [9, 6, 40, 4])
    traj = trajectory_from_vasprun(tmp_path, charge=-1, fmax=0.05, settings={"xc": "PBE"}, fidelity="high")
    assert traj.status == "converged" and traj.error is None
    assert traj.n_steps == 4 and traj.charge == -1 and traj.fidelity == "high" and traj.engine == "vasp"
    assert traj.settings_digest == VaspSettings().digest()
    for k, frame in enumerate(traj.frames):
        assert frame.step == k and frame.charge == -1 and frame.structure.charge == -1
        assert frame.energy == pytest.approx(energies[k])
        np.testing.assert_allclose(frame.forces, forces[k], atol=1e-7)
        np.testing.assert_allclose(frame.structure.cart_coords, structures[k].cart_coords, atol=1e-6)
        st = -stresses[k] * KBAR_TO_EV_PER_A3
        np.testing.assert_allclose(frame.stress, [st[0, 0], st[1, 1], st[2, 2], st[1, 2], st[0, 2], st[0, 1]])
    assert [f.scf_converged for f in traj.frames] == [True, True, False, True]  # 40 = NELM
    assert "NELM=40" in traj.frames[2].error
    assert traj.final.fmax == pytest.approx(0.5 / 27, rel=1e-5)

    strict = trajectory_from_vasprun(path, charge=-1, fmax=0.01)
    assert strict.status == "unconverged" and "fmax=0.01" in strict.error and strict.n_steps == 4

    frame = to_frame(path, charge=-1)  # last ionic step as a single point
    assert frame.energy == pytest.approx(energies[-1]) and frame.step == 0


def _task_doc(vasprun_path: Path, as_models: bool) -> dict:
    """A TaskDoc-shaped document (``calcs_reversed[0]``: input parameters, output ionic steps) of a vasprun.xml,
    with emmet's IonicStep models (as atomate2's TaskDoc holds them) or plain dicts (a TaskDoc from a store)."""
    from emmet.core.vasp.calculation import IonicStep
    from pymatgen.io.vasp import Vasprun

    vr = Vasprun(str(vasprun_path), parse_dos=False, parse_eigen=False, parse_potcar_file=False)
    steps = [IonicStep(**step) for step in vr.ionic_steps]
    if not as_models:
        steps = [json.loads(json.dumps(step.model_dump(), default=lambda o: o.as_dict())) for step in steps]
    return {"state": "successful",
            "calcs_reversed": [{"input": {"parameters": dict(vr.parameters)}, "output": {"ionic_steps": steps}}]}


@pytest.mark.parametrize("as_models", [True, False])
def test_trajectory_from_task_equals_vasprun(tmp_path, as_models):
    """The engine builds its documents from atomate2's TaskDoc: the same numbers as from vasprun.xml."""
    structures, energies, forces, stresses = _relax_data(4)
    path = _write_relax_vasprun(tmp_path / "vasprun.xml", structures, energies, forces, stresses, [9, 6, 40, 4])
    task = _task_doc(path, as_models)
    from_xml = trajectory_from_vasprun(path, charge=-1, fmax=0.05, settings={"xc": "PBE"}, fidelity="high")
    from_task = trajectory_from_task(task, charge=-1, fmax=0.05, settings={"xc": "PBE"}, fidelity="high")
    assert (from_task.status, from_task.error, from_task.n_steps) == (from_xml.status, from_xml.error, 4)
    for a, b in zip(from_task.frames, from_xml.frames, strict=True):
        assert a.model_dump(exclude={"wall_seconds"}) == b.model_dump(exclude={"wall_seconds"})
    assert [f.scf_converged for f in from_task.frames] == [True, True, False, True]  # NELM = 40 from the task
    assert to_frame(task, charge=-1).energy == pytest.approx(energies[-1])
    assert len(frames_from_task({"state": "successful", "output": {}}, charge=0)) == 0
    assert trajectory_from_task({"calcs_reversed": []}, charge=0).status == "failed"


def test_trajectory_missing_or_broken_output(tmp_path):
    with pytest.raises(FileNotFoundError):
        trajectory_from_vasprun(tmp_path, charge=0)
    (tmp_path / "vasprun.xml").write_text("<?xml version='1.0'?><modeling><generator>")  # crashed run
    traj = trajectory_from_vasprun(tmp_path, charge=0)
    assert traj.status == "failed" and traj.frames == []


def test_to_frame_from_task_document():
    s = si7()
    forces = np.zeros((7, 3))
    forces[0] = [0.1, 0.0, 0.0]
    doc = {
        "state": "successful",
        "output": {"structure": s.as_dict(), "energy": -36.5, "forces": forces.tolist(), "stress": np.eye(3) * -20},
    }
    frame = to_frame(doc, charge=1, settings={"xc": "HSE06"})
    assert frame.energy == -36.5 and frame.charge == 1 and frame.xc == "HSE06" and frame.scf_converged
    assert frame.fmax == pytest.approx(0.1)
    assert frame.stress[:3] == pytest.approx([20 * KBAR_TO_EV_PER_A3] * 3)
    failed = to_frame({**doc, "state": "failed"}, charge=1)
    assert not failed.scf_converged and "failed" in failed.error


FAKE_SI_POTCAR = """  PAW_PBE Si 05Jan2001
 4.00000000000000000
 parameters from PSCTR are:
   VRHFIN =Si: s2p2
   LEXCH  = PE
   TITEL  = PAW_PBE Si 05Jan2001
   POMASS =   28.085; ZVAL   =    4.000    mass and valenz
   ENMAX  =  245.345; ENMIN  =  184.009 eV
   END of PSCTR-controll parameters
 local part
  98.7 1.0 2.0 3.0
 End of Dataset
"""

FAKE_VASP = """#!/bin/sh
echo "$0" > fake_vasp_ran.txt
cp "$FAKE_VASPRUN" vasprun.xml
cp POSCAR CONTCAR
echo "   1 F= -.35000000E+02 E0= -.35000000E+02  d E =-.350000E+02  mag=     1.0000" > OSZICAR
echo " fake OUTCAR" > OUTCAR
"""


@pytest.fixture
def fake_vasp(tmp_path, monkeypatch):
    """A fake POTCAR library and fake vasp_std/vasp_gam binaries that copy a prepared vasprun.xml."""
    from pymatgen.core import SETTINGS as PMG_SETTINGS

    psp = tmp_path / "psp" / "POT_GGA_PAW_PBE_54" / "Si"
    psp.mkdir(parents=True)
    (psp / "POTCAR").write_text(FAKE_SI_POTCAR)
    monkeypatch.setitem(PMG_SETTINGS, "PMG_VASP_PSP_DIR", str(tmp_path / "psp"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for exe in ("vasp_std_fake", "vasp_gam_fake"):
        (bin_dir / exe).write_text(FAKE_VASP)
        (bin_dir / exe).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    structures, energies, forces, stresses = _relax_data(3)  # last fmax 0.056 eV/Å
    template = _write_relax_vasprun(tmp_path / "template.xml", structures, energies, forces, stresses, [5, 5, 5])
    monkeypatch.setenv("FAKE_VASPRUN", str(template))
    settings = {
        "command": "vasp_std_fake",
        "gamma_command": "vasp_gam_fake",
        "run_vasp_kwargs": {"custodian_kwargs": {"polling_time_step": 0.05, "monitor_freq": 1}},
    }
    return settings, energies


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_relax_runs_through_atomate2_and_custodian(tmp_path, fake_vasp):
    """The cluster path with a fake VASP: atomate2 writes the inputs (with a POTCAR), custodian runs the Γ-only
    binary, the trajectory is parsed from the run directory. The fake OUTCAR makes atomate2's TaskDoc step fail
    afterwards; the engine reads vasprun.xml itself, so that does not matter here."""
    settings, energies = fake_vasp
    engine = VaspEngine(settings, fidelity="high")
    traj = engine.relax(si7(), -1, tmp_path / "run", fmax=0.1, max_steps=20)
    assert traj.status == "converged" and traj.n_steps == 3 and traj.fidelity == "high"
    assert traj.final.energy == pytest.approx(energies[-1]) and traj.final.charge == -1
    run = tmp_path / "run"
    assert (run / "fake_vasp_ran.txt").read_text().strip().endswith("vasp_gam_fake")  # Γ-only → gamma binary
    incar = Incar.from_file(run / "INCAR")
    assert incar["NELECT"] == N_NEUTRAL + 1  # ZVAL read from the POTCAR file this time
    assert incar["NSW"] == 20 and incar["EDIFFG"] == pytest.approx(-0.1)
    assert "PAW_PBE Si 05Jan2001" in (run / "POTCAR").read_text()


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_single_point_runs_through_atomate2(tmp_path, fake_vasp):
    settings, energies = fake_vasp
    frame = VaspEngine({**settings, "xc": "HSE06"}).single_point(si7(), 1, tmp_path / "sp")
    assert frame.energy == pytest.approx(energies[-1]) and frame.charge == 1 and frame.xc == "HSE06"
    incar = Incar.from_file(tmp_path / "sp" / "INCAR")
    assert incar["NELECT"] == N_NEUTRAL - 1 and incar["LHFCALC"] is True and incar["NSW"] == 0


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_graph_job_keeps_its_metadata_around_the_nested_vasp_job(tmp_path, fake_vasp, monkeypatch):
    """The engine's atomate2 job runs inside the campaign's ``single_point`` job (jobflow run_locally nested in a
    running job): the outer job still records ``metadata.cache_key``/``cost`` (tracked) and returns its Frame."""
    from jobflow import JobStore, run_locally
    from maggma.stores import MemoryStore

    from defectflow.label.jobs import single_point

    settings, energies = fake_vasp
    monkeypatch.chdir(tmp_path)
    job = single_point(si7(), 1, {"engine": "vasp", **settings}, "high", tag="sp")
    store = JobStore(MemoryStore())
    responses = run_locally(job, store=store, create_folders=False, root_dir=tmp_path, log=False,
                            ensure_success=True)
    frame = responses[job.uuid][1].output
    assert frame.energy == pytest.approx(energies[-1]) and frame.charge == 1 and frame.fidelity == "high"
    doc = store.query_one({"uuid": job.uuid})
    assert doc["metadata"]["cache_key"] and doc["metadata"]["cost"]["wall_s"] > 0
    assert Incar.from_file(tmp_path / "sp" / "INCAR")["NSW"] == 0
