"""No silent skips in CI: with CI=true a test skipped for a missing engine or package fails the run (the hooks in
tests/conftest.py); without CI it is an ordinary skip. Checked by running pytest on a small generated suite that uses
this suite's own conftest.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

CASES = textwrap.dedent("""
    import pytest

    def test_passes():
        assert True

    def test_importorskip_in_body():
        pytest.importorskip("no_such_engine_package_xyz")

    @pytest.mark.skipif(True, reason="pw.x not installed (Debian: quantum-espresso)")
    def test_skipif_missing_engine():
        pass

    def test_intentional_skip():
        pytest.skip("documented: only meaningful on a GPU worker")

    @pytest.mark.xfail(reason="known bug", strict=True)
    def test_expected_failure():
        assert False
""")

MODULE_SKIP = textwrap.dedent("""
    import pytest

    pytest.importorskip("another_missing_package_xyz")

    def test_never_collected():
        pass
""")


def _suite(tmp_path: Path, with_module_skip: bool) -> Path:
    suite = tmp_path / "suite"
    suite.mkdir()
    conftest = (TESTS / "conftest.py").read_text()
    # the one documented intentional skip of this generated suite, listed the way tests/conftest.py asks
    conftest += '\nINTENTIONAL_SKIPS = ((r"^documented: ", "needs hardware the CI runners do not have"),)\n'
    (suite / "conftest.py").write_text(conftest)
    (suite / "test_cases.py").write_text(CASES)
    if with_module_skip:
        (suite / "test_module_skip.py").write_text(MODULE_SKIP)
    return suite


def _pytest(suite: Path, ci: str | None) -> tuple[int, dict[str, str], str]:
    """Run pytest on ``suite`` with CI=``ci`` (unset when None): exit code, test name → outcome, output."""
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    junit = suite / f"junit-{ci}.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "--rootdir", str(suite),
         f"--junitxml={junit}", str(suite)],
        capture_output=True, text=True, env=env, cwd=suite, timeout=300, check=False,
    )
    outcomes = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcome = kinds[0] if kinds else "passed"
        if outcome == "skipped" and any("xfail" in (c.get("type") or "") for c in case):
            outcome = "xfailed"
        outcomes[case.get("name")] = outcome
    return proc.returncode, outcomes, proc.stdout + proc.stderr


@pytest.mark.parametrize("ci", ["true", "1"])
def test_ci_turns_missing_software_skips_into_failures(tmp_path, ci):
    code, outcomes, out = _pytest(_suite(tmp_path, with_module_skip=False), ci)
    assert code == 1, out
    assert outcomes["test_passes"] == "passed"
    assert outcomes["test_importorskip_in_body"] == "failure", out  # skipped while running: a failed test
    assert outcomes["test_skipif_missing_engine"] == "error", out  # skipped in set-up: a set-up error
    assert outcomes["test_intentional_skip"] == "skipped"  # listed in INTENTIONAL_SKIPS
    assert outcomes["test_expected_failure"] == "xfailed"  # xfail is not a skip
    assert "CI=true: this test was skipped (could not import 'no_such_engine_package_xyz'" in out
    assert "CI=true: this test was skipped (pw.x not installed (Debian: quantum-espresso))" in out


def test_ci_fails_the_run_for_a_module_skipped_at_import(tmp_path):
    code, outcomes, out = _pytest(_suite(tmp_path, with_module_skip=True), "true")
    assert code == 1, out
    assert "test_never_collected" not in outcomes and outcomes["test_module_skip"] == "skipped"
    assert outcomes["test_passes"] == "passed"  # the rest of the suite still ran
    assert re.search(r"SKIPPED MODULE test_module_skip\.py: could not import 'another_missing_package_xyz'", out), out


@pytest.mark.parametrize("ci", [None, "false"])
def test_without_ci_skips_stay_skips(tmp_path, ci):
    code, outcomes, out = _pytest(_suite(tmp_path, with_module_skip=True), ci)
    assert code == 0, out
    assert outcomes == {"test_passes": "passed", "test_importorskip_in_body": "skipped",
                        "test_skipif_missing_engine": "skipped", "test_intentional_skip": "skipped",
                        "test_expected_failure": "xfailed", "test_module_skip": "skipped"}  # the module's skip
    assert "SKIPPED MODULE" not in out


def test_ci_entry_point_runs_the_suite_with_ci_set():
    """.ci/run (what CI calls) exports CI=true when the CI service did not, before running scripts/test.sh, so the
    hook is on whoever runs it."""
    script = (ROOT / ".ci" / "run").read_text()
    lines = [ln.strip() for ln in script.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    export = next(i for i, ln in enumerate(lines) if re.fullmatch(r'export CI="\$\{CI:-true\}"', ln))
    run = next(i for i, ln in enumerate(lines) if ln == "bash scripts/test.sh")
    assert export < run
    if shutil.which("bash"):  # the export line itself, in bash, with and without CI already set
        for preset, want in ((None, "true"), ("1", "1")):
            env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": preset} if preset else {})
            out = subprocess.run(["bash", "-c", lines[export] + '; echo "$CI"'], capture_output=True, text=True,
                                 env=env, check=True).stdout.strip()
            assert out == want
