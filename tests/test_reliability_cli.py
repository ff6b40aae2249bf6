"""Reliability of the command line (issue: Ctrl-C, unreachable stores, bad paths, concurrent runs, preflight).

Everything runs the installed ``defectflow`` entry point as a user would. The only real computation is one small
GFN1-xTB run (v_Si, 16-site cell, q = 0, +1) that is interrupted while it relaxes; every other check fails before
anything is computed, in seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import GFN1, GFN2, si_vacancy_campaign

ROOT = Path(__file__).resolve().parents[1]
EXE = shutil.which("defectflow", path=str(Path(sys.executable).parent)) or "defectflow"
UNREACHABLE = "mongodb://alice:s3cret@127.0.0.1:1/defects"
MASKED = "mongodb://alice:***@127.0.0.1:1/defects"


def cli(*args, cwd, timeout=120, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", **(env or {})}
    return subprocess.run([EXE, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


def write_campaign(path: Path, **sections) -> Path:
    data = si_vacancy_campaign("rel", path.parent / "work", **sections)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip()]


# ---------------------------------------------------------------------------------------------------------------
# 1, 6, 7, 9: one real run, interrupted; a second run of the same work directory meanwhile; reads afterwards
# ---------------------------------------------------------------------------------------------------------------
class _Reader(threading.Thread):
    """Collects a pipe's lines while the process runs."""

    def __init__(self, pipe):
        super().__init__(daemon=True)
        self.pipe, self.lines = pipe, []

    def run(self):
        for line in self.pipe:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)


def _start_run(tmp_path: Path, *extra):
    c = write_campaign(tmp_path / "c.yaml", relax={"fmax": 0.01, "max_steps": 30})
    proc = subprocess.Popen([EXE, "run", c.name, "--lf-only", *extra], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"})
    out, err = _Reader(proc.stdout), _Reader(proc.stderr)
    out.start(), err.start()
    deadline = time.monotonic() + 240
    while "step relax_lf" not in err.text():  # the plain progress line (stdout is a pipe) of the first relaxation
        assert proc.poll() is None, err.text()[-3000:]
        assert time.monotonic() < deadline, "no relaxation started within 240 s:\n" + err.text()[-3000:]
        time.sleep(0.2)
    return c, proc, out, err


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_interrupted_run_says_what_finished_and_how_to_resume(tmp_path, sig, code):
    c, proc, out, err = _start_run(tmp_path)
    work = tmp_path / "work"
    assert (work / "run.lock").is_file()
    lock = json.loads((work / "run.lock").read_text())
    assert lock["pid"] == proc.pid

    if sig == signal.SIGINT:
        # item 6: a second run of the same work directory exits at once, naming the running one
        t0 = time.monotonic()
        second = cli("run", c.name, "--lf-only", cwd=tmp_path)
        assert time.monotonic() - t0 < 30
        assert second.returncode == 2
        assert errors(second.stderr) == [
            f"error: {work} is in use by another run (PID {proc.pid}, started {lock['started']}): wait for it to "
            "end or stop it"]

    proc.send_signal(sig)
    rc = proc.wait(timeout=120)
    out.join(5), err.join(5)
    text = out.text() + err.text()
    assert rc == code, text[-3000:]
    assert "Traceback" not in text
    name = "SIGINT" if sig == signal.SIGINT else "SIGTERM"
    stops = [ln for ln in err.text().splitlines() if ln.startswith("interrupted")]
    assert len(stops) == 1, err.text()[-3000:]
    assert stops[0].startswith(f"interrupted ({name}): ") and "jobs finished" in stops[0]
    assert stops[0].endswith(f"resume with: defectflow run {c.name} --lf-only")
    assert not (work / "run.lock").exists()  # released
    # item 9: plain progress lines (stdout is not a terminal), one at each step change
    progress = [ln for ln in err.text().splitlines() if ln.startswith("progress: ")]
    assert any(" jobs done, step bulk_lf" in ln for ln in progress) and any("step relax_lf" in ln for ln in progress)
    assert all("elapsed " in ln for ln in progress)

    if sig == signal.SIGINT:
        # item 7: reads of an unfinished run say so, create nothing, take --work-dir / --store
        res = cli("results", c.name, "--show", "ground-states", cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert "unfinished" in res.stdout and f"defectflow run {c.name}" in res.stdout
        js = cli("results", "--work-dir", str(work), "--json", cwd=tmp_path)
        assert js.returncode == 0 and json.loads(js.stdout)["state"] == "unfinished"
        st = cli("status", "--store", str(work), "--json", cwd=tmp_path)
        assert st.returncode == 0, st.stderr
        assert json.loads(st.stdout)["running"] is None and json.loads(st.stdout)["finished"]["bulk_lf"] == 1


def test_interrupt_ends_engine_processes(tmp_path, monkeypatch, capsys):
    """Ctrl-C in a run: terminate_all() of defectflow.engines.process ends the engines' process groups."""
    pytest.importorskip("defectflow.engines.process")
    import defectflow.engines.process as process
    import defectflow.generate
    import defectflow.submit
    from defectflow.cli import main as cli_main

    calls = []
    monkeypatch.setattr(process, "terminate_all", lambda *a, **k: calls.append(1) or 0)
    monkeypatch.setattr(defectflow.generate, "generate", lambda campaign: _Gen())

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(defectflow.submit, "run_campaign", interrupted)
    c = write_campaign(tmp_path / "c.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["defectflow", "run", "c.yaml", "-q"])
    assert cli_main.main(["run", "c.yaml", "-q"]) == 130
    assert calls == [1]
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "interrupted (SIGINT): 0 of ? jobs finished, kept in the store; " \
                                           f"resume with: defectflow run {c.name} -q"


class _Gen:
    distortion_sets: list = []


# ---------------------------------------------------------------------------------------------------------------
# 2: an unreachable MongoDB is one line, in seconds, with the password masked
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [["run"], ["submit", "--manager", "fireworks"], ["results"], ["query"],
                                     ["status", "--no-plan"], ["plot"], ["validate", "--fast"]],
                         ids=lambda c: c[0])
def test_unreachable_mongodb_fails_fast_with_one_masked_line(tmp_path, command):
    c = write_campaign(tmp_path / "c.yaml", execution={"store": UNREACHABLE, "work_dir": str(tmp_path / "work")})
    t0 = time.monotonic()
    r = cli(command[0], c.name, *command[1:], cwd=tmp_path, timeout=60)
    wall = time.monotonic() - t0
    assert r.returncode == 2, r.stderr
    lines = errors(r.stderr)
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and lines[0].endswith(
        f"execution.store: cannot reach MongoDB at {MASKED} within 3 s (is the server running and reachable from "
        "here?)")
    assert "s3cret" not in r.stderr + r.stdout
    assert wall < 10, wall
    assert not (tmp_path / "work").exists()


# ---------------------------------------------------------------------------------------------------------------
# 3, 4: one clear line instead of a traceback
# ---------------------------------------------------------------------------------------------------------------
def test_mongodb_without_uri_is_one_line(tmp_path):
    c = write_campaign(tmp_path / "c.yaml", execution={"store": "mongodb", "work_dir": str(tmp_path / "work")})
    env = {"DEFECTFLOW_MONGODB_URI": "", "DEFECTFLOW_CONFIG": str(tmp_path / "absent.yaml")}
    for cmd in ("run", "results", "status"):
        r = cli(cmd, c.name, cwd=tmp_path, env=env)
        assert r.returncode == 2, r.stderr
        assert len(errors(r.stderr)) == 1 and errors(r.stderr)[0].endswith(
            f"execution.store: 'mongodb' needs a URI in $DEFECTFLOW_MONGODB_URI or as mongodb_uri: in "
            f"{tmp_path / 'absent.yaml'}"), r.stderr
        assert "Traceback" not in r.stderr


def test_work_dir_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    c = write_campaign(tmp_path / "c.yaml", execution={"work_dir": str(tmp_path / "afile" / "sub")})
    r = cli("run", c.name, cwd=tmp_path)
    assert r.returncode == 2
    assert errors(r.stderr) == [f"error: {c.name}: execution.work_dir: cannot create {tmp_path / 'afile' / 'sub'}: "
                                f"{tmp_path / 'afile'} is a file"]
    r = cli("run", c.name, "--work-dir", "afile", cwd=tmp_path)
    assert r.returncode == 2
    assert errors(r.stderr) == [f"error: {c.name}: --work-dir: {tmp_path / 'afile'} is a file, not a directory"]


def test_charges_for_a_defect_not_in_the_campaign_names_the_key(tmp_path):
    c = write_campaign(tmp_path / "c.yaml", charges={"v_Ga": [0]})
    for cmd in ("validate", "run"):
        r = cli(cmd, c.name, cwd=tmp_path)
        assert r.returncode == 2
        assert errors(r.stderr) == [f"error: {c.name}: charges.v_Ga: no defect 'v_Ga' in defects.include (v_Si)"]
    # with a kind (no names to compare with): checked against the host
    c = write_campaign(tmp_path / "c.yaml", charges={"v_Ga": [0]}, defects={"include": ["vacancies"]})
    for cmd in ("validate", "run"):
        r = cli(cmd, c.name, cwd=tmp_path)
        assert r.returncode == 2
        assert errors(r.stderr) == [f"error: {c.name}: charges.v_Ga: no such defect: the host (Si) has no Ga to "
                                    "remove"]
    assert not (tmp_path / "work").exists()


# ---------------------------------------------------------------------------------------------------------------
# 5: validate runs run's preflight
# ---------------------------------------------------------------------------------------------------------------
def test_validate_checks_defect_names_against_the_host(tmp_path):
    for name, why in (("v_Xx", "'Xx' is not a chemical element"), ("v_Ga", "the host (Si) has no Ga to remove"),
                      ("Ga_Si", "Ga is neither in the host (Si) nor in defects.extrinsic")):
        c = write_campaign(tmp_path / "c.yaml", defects={"include": [name]})
        r = cli("validate", "--fast", c.name, cwd=tmp_path)
        assert r.returncode == 2
        assert errors(r.stderr) == [f"error: {c.name}: defects.include: {name!r}: {why}"]


def test_validate_checks_calculators_and_engine_set_up(tmp_path):
    bad_module = {**GFN1, "calculator": "nosuchpackage.Calc"}
    bad_attr = {**GFN2, "calculator": "tblite.ase.NoSuchCalculator"}
    c = write_campaign(tmp_path / "c.yaml", fidelities={"low": bad_module, "high": bad_attr})
    r = cli("validate", "--fast", c.name, cwd=tmp_path)
    assert r.returncode == 2
    assert errors(r.stderr) == [
        f"error: {c.name}: fidelities.low: calculator: cannot import module 'nosuchpackage' "
        "(No module named 'nosuchpackage')",
        f"error: {c.name}: fidelities.high: calculator: module 'tblite.ase' has no 'NoSuchCalculator'"]
    # QE: Debian's pseudopotentials have no Ga (and only an LDA As): named before anything runs
    from pymatgen.core import Lattice, Structure

    Structure.from_spacegroup("F-43m", Lattice.cubic(5.653), ["Ga", "As"], [[0, 0, 0], [0.25] * 3]).to(
        filename=str(tmp_path / "GaAs.POSCAR"), fmt="poscar")
    c = write_campaign(tmp_path / "c.yaml", host={"structure": "GaAs.POSCAR"}, defects={"include": ["v_Ga"]},
                       fidelities={"low": GFN1, "high": {"engine": "qe", "xc": "PBE", "ecutwfc": 20,
                                                         "pseudo_dir": str(tmp_path)}})
    r = cli("validate", "--fast", c.name, cwd=tmp_path)
    assert r.returncode == 2
    lines = errors(r.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"error: {c.name}: fidelities.high: ")
    assert "Ga" in lines[0] and "As" in lines[0] and "pseudopotential" in lines[0]


def test_validate_without_fast_runs_doped(tmp_path):
    c = write_campaign(tmp_path / "c.yaml", defects={"include": ["vacancies"]}, charges={"v_Si_9": [0]})
    fast = cli("validate", "--fast", c.name, cwd=tmp_path)
    assert fast.returncode == 0, fast.stderr
    assert "doped generation skipped" in fast.stdout
    full = cli("validate", c.name, cwd=tmp_path)
    assert full.returncode == 2
    assert errors(full.stderr) == [f"error: {c.name}: charges.v_Si_9: doped generated no defect 'v_Si_9' in this "
                                   "campaign (it has v_Si)"]


# ---------------------------------------------------------------------------------------------------------------
# 7: reads create nothing
# ---------------------------------------------------------------------------------------------------------------
def test_reads_of_a_campaign_that_never_ran_create_nothing(tmp_path):
    c = write_campaign(tmp_path / "c.yaml")
    st = cli("status", c.name, "--no-plan", cwd=tmp_path)
    assert st.returncode == 0, st.stderr
    assert "no run yet" in st.stdout
    for cmd in ("results", "query", "plot"):
        r = cli(cmd, c.name, cwd=tmp_path)
        assert r.returncode == 2
        assert errors(r.stderr) == [f"error: no run yet: the work directory {tmp_path / 'work'} does not exist"]
    r = cli("results", "--work-dir", "elsewhere", cwd=tmp_path)
    assert r.returncode == 2 and "no run yet" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


# ---------------------------------------------------------------------------------------------------------------
# 8: smaller messages
# ---------------------------------------------------------------------------------------------------------------
def test_directories_are_reported_as_directories(tmp_path):
    (tmp_path / "adir").mkdir()
    r = cli("validate", "adir", cwd=tmp_path)
    assert errors(r.stderr) == ["error: campaign file expected, got a directory: adir"]
    c = write_campaign(tmp_path / "c.yaml", host={"structure": "adir"})
    r = cli("validate", c.name, cwd=tmp_path)
    assert r.returncode == 2
    assert errors(r.stderr) == [f"error: {c.name}: host.structure: expected a structure file, got a directory: adir"]


def test_garbage_cif_is_one_line_without_warnings(tmp_path):
    (tmp_path / "bad.cif").write_text("data_x\n_cell_length_a 5\n_cell_length_b 5\nloop_\n_atom_site_label\nSi1\n")
    c = write_campaign(tmp_path / "c.yaml", host={"structure": "bad.cif"})
    r = cli("validate", c.name, cwd=tmp_path)
    assert r.returncode == 2
    assert errors(r.stderr) == [f"error: {c.name}: host.structure: cannot read bad.cif as a structure (Invalid CIF "
                                "file with no structures!)"]
    assert r.stdout == ""


def test_fractional_charge_message(tmp_path):
    c = write_campaign(tmp_path / "c.yaml", charges=[0.5])
    r = cli("validate", c.name, cwd=tmp_path)
    assert errors(r.stderr) == [f"error: {c.name}: charges.0: expected an integer, got 0.5 (a number with a "
                                "fractional part)"]


def test_submit_checks_the_launchpad_before_building_anything(tmp_path):
    # a campaign whose preflight would fail too: the launchpad is checked first, in a blink
    c = write_campaign(tmp_path / "c.yaml", defects={"include": ["v_Ga"]})
    r = cli("submit", c.name, "--manager", "fireworks", "--launchpad", "missing.yaml", cwd=tmp_path)
    assert r.returncode == 2
    assert errors(r.stderr) == [f"error: launchpad: file not found: {tmp_path / 'missing.yaml'}"]
    (tmp_path / "lpdir").mkdir()
    r = cli("submit", c.name, "--manager", "fireworks", "--launchpad", "lpdir", cwd=tmp_path)
    assert errors(r.stderr) == [f"error: launchpad: expected a LaunchPad YAML file, got a directory: "
                                f"{tmp_path / 'lpdir'}"]


@pytest.mark.skipif(not (shutil.which("cp2k_shell.psmp") or shutil.which("cp2k_shell")), reason="CP2K not installed")
def test_validate_checks_cp2k_basis_sets(tmp_path):
    from pymatgen.core import Lattice, Structure

    Structure.from_spacegroup("Fm-3m", Lattice.cubic(6.8), ["Fr", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]).to(
        filename=str(tmp_path / "FrCl.POSCAR"), fmt="poscar")
    c = write_campaign(tmp_path / "c.yaml", host={"structure": "FrCl.POSCAR"}, defects={"include": ["v_Cl"]},
                       fidelities={"low": {"engine": "cp2k", "xc": "PBE"}, "high": GFN2})
    r = cli("validate", "--fast", c.name, cwd=tmp_path)
    assert r.returncode == 2
    lines = errors(r.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"error: {c.name}: fidelities.low: CP2K: no basis set ")
    assert "for element Fr" in lines[0]
