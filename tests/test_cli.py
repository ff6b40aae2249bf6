"""The command line, run as a user would (a subprocess of the installed entry point)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXE = shutil.which("defectflow", path=str(Path(sys.executable).parent)) or "defectflow"


def run(*args, cwd=ROOT):
    return subprocess.run([EXE, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_help_lists_planned_subcommands():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("run", "submit", "status", "results", "query", "plot", "benchmark", "validate", "engines"):
        assert f"  {cmd} " in r.stdout or f"    {cmd}" in r.stdout, cmd
    assert "not built yet" in r.stdout


def test_unbuilt_subcommand_says_so_and_fails():
    r = run("submit", "workflows/quickstart.yaml")
    assert r.returncode == 3
    assert "not built yet" in r.stderr and "nothing was run" in r.stderr


def test_validate_ok():
    r = run("validate", "workflows/quickstart.yaml")
    assert r.returncode == 0, r.stderr
    assert "is valid" in r.stdout and "v_Si" in r.stdout


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
