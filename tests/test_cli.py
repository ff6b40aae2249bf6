"""The command line, run as a user would (a subprocess of the installed entry point)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXE = shutil.which("defectflow", path=str(Path(sys.executable).parent)) or "defectflow"


def run(*args, cwd=ROOT, timeout=120):
    return subprocess.run([EXE, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def test_help_lists_every_subcommand():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("run", "submit", "status", "results", "query", "plot", "benchmark", "validate", "engines", "schema"):
        assert f"  {cmd} " in r.stdout or f"    {cmd}" in r.stdout, cmd
    assert "not built" not in r.stdout


def test_plot_without_a_run_is_one_clear_error(tmp_path):
    r = run("plot", "--store", str(tmp_path / "nowhere"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: --store: expected a MongoDB URI or an embedded store directory, "
                                             f"got {str(tmp_path / 'nowhere')!r}"]


def test_benchmark_show_prints_the_committed_tables():
    r = run("benchmark", "speed", "--show")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "benchmarks/speed.py" in r.stdout and "s/epoch per 1000 frames" in r.stdout


def test_validate_ok():
    r = run("validate", "workflows/quickstart.yaml", timeout=600)  # doped generation included (~15 s on 2 cores)
    assert r.returncode == 0, r.stderr
    assert "is valid" in r.stdout and "v_Si" in r.stdout
    assert "generated   3 (defect, q) sets, 15 structures in a 30-atom supercell" in r.stdout


def test_broken_campaign_exits_nonzero_with_one_line(tmp_path):
    text = (ROOT / "workflows" / "quickstart.yaml").read_text().replace("engine: qe", "engine: gaussian")
    (tmp_path / "structures").mkdir()
    shutil.copy(ROOT / "workflows" / "structures" / "Si.POSCAR", tmp_path / "structures")
    (tmp_path / "broken.yaml").write_text(text)
    r = run("validate", str(tmp_path / "broken.yaml"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0] == (f"error: {tmp_path / 'broken.yaml'}: fidelities.high.engine: "
                        "expected one of 'qe', 'cp2k', 'vasp', 'ase', got 'gaussian'")


def test_engines_lists_local_engines():
    r = run("engines", "--json")
    assert r.returncode == 0
    import json

    names = {row["engine"] for row in json.loads(r.stdout)}
    assert {"qe", "cp2k", "vasp"} <= names


SMALL = """\
name: cli-small
host:
  structure: {poscar}
  supercell: {{matrix: [[2,0,0],[0,2,0],[0,0,2]]}}
  oxidation_states: {{Si: 4}}
defects: {{include: [v_Si]}}
charges: [0, 1]
distortions: {{bond_distortions: [-0.3, 0.3], dimer: false}}
fidelities:
  low: {{engine: ase, calculator: tblite.ase.TBLite, xc: GFN1-xTB, kwargs: {{method: GFN1-xTB, verbosity: 0}}}}
  high: {{engine: ase, calculator: tblite.ase.TBLite, xc: GFN2-xTB, kwargs: {{method: GFN2-xTB, verbosity: 0}}}}
relax: {{fmax: 0.3, max_steps: 3}}
"""


def test_run_lf_only_executes_steps_1_2_and_reports(tmp_path):
    """`defectflow run --lf-only` as a user runs it (the full pipeline is tested in test_pipeline.py)."""
    (tmp_path / "c.yaml").write_text(SMALL.format(poscar=ROOT / "workflows/structures/Si.POSCAR"))
    r = subprocess.run([EXE, "run", "c.yaml", "--quiet", "--lf-only"], capture_output=True, text=True, cwd=tmp_path,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    work = tmp_path / "runs" / "cli-small"
    assert "steps: generation, bulk_lf, bulk_hf, bulk_reference, relax_lf, summary, harvest_lf\n" in r.stderr
    assert "Ground states" not in r.stdout
    rows = [ln for ln in r.stdout.splitlines() if "v_Si" in ln and "│" in ln]
    assert len(rows) == 2 and "+0" in rows[0] and "+1" in rows[1]
    assert (work / "training_lf.xyz").stat().st_size > 0
    assert (work / "store").is_dir() and any((work / "plots" / "distortions").glob("v_Si_*.png"))
    assert "jobs in" in r.stdout

    # the same run, asked for as a user would: status, results, query (embedded store, no server)
    def cli(*args):
        return subprocess.run([EXE, *args], capture_output=True, text=True, cwd=tmp_path, timeout=300)

    st = cli("status", "c.yaml", "--json")
    assert st.returncode == 0, st.stderr[-2000:]
    status = json.loads(st.stdout)
    assert status["finished"]["relax_lf"] == status["planned"]["relax_lf"] == 6
    assert status["manager"] is None  # run locally, never submitted

    res = cli("results", "c.yaml", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(res.stdout)
    assert [(g["defect"], g["charge"], g["source"]) for g in data["ground_states"]] == [("v_Si", 0, "lf"),
                                                                                       ("v_Si", 1, "lf")]
    assert {c["step"] for c in data["cost"]} >= {"relax_lf", "bulk_lf", "bulk_hf", "summary", "harvest_lf"}
    text = cli("results", "c.yaml")
    assert text.returncode == 0 and "Cost per step" in text.stdout and "LF ShakeNBreak" in text.stdout

    q = cli("query", "c.yaml", "--step", "relax_lf", "--charge", "1", "--fields", "output.status", "--json")
    assert q.returncode == 0, q.stderr[-2000:]
    docs = json.loads(q.stdout)
    assert len(docs) == 3 and all(d["metadata"]["charge"] == 1 and d["output"]["status"] for d in docs)
    q2 = cli("query", "--store", str(work), "--filter", '{"metadata.defect": "v_Si", "metadata.charge": 0}', "--json")
    assert q2.returncode == 0 and {d["metadata"]["charge"] for d in json.loads(q2.stdout)} == {0}

    pl = cli("plot", "c.yaml", "--json")
    assert pl.returncode == 0, pl.stderr[-2000:]
    plots = json.loads(pl.stdout)["plots"]
    assert plots["landscapes"] == [] and plots["levels"] == []  # LF-only: nothing after step 2 to draw
    assert sorted(Path(p).name for p in plots["lf"]) == ["v_Si_+1.png", "v_Si_0.png"]
    assert all(Path(p).read_bytes()[:4] == b"\x89PNG" and Path(p).parent == work / "plots" / "replot" / "lf"
               for p in plots["lf"])

    bad = cli("query", "c.yaml", "--filter", "{charge: 0}")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --filter: expected JSON")
    assert len(bad.stderr.strip().splitlines()) == 1


def test_submit_bad_launchpad_is_one_clear_error(tmp_path):
    (tmp_path / "c.yaml").write_text(SMALL.format(poscar=ROOT / "workflows/structures/Si.POSCAR"))
    r = subprocess.run([EXE, "submit", "c.yaml", "--manager", "fireworks", "--launchpad", "missing.yaml"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: launchpad: file not found: {tmp_path / 'missing.yaml'}"]
    assert not (tmp_path / "runs" / "cli-small" / "submission.json").exists()
