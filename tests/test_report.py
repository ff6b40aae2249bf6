"""`defectflow report`: one self-contained HTML page of a finished run, rendered in headless Chromium.

The run is test_pipeline.py's campaign (GFN1-xTB → GFN2-xTB, tiny MACE, one top-up round), reused through its
fixture. Chromium is Debian's ``chromium`` (scripts/setup.sh installs it)."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from defectflow.report import SECTIONS, write_report
from defectflow.results import Results

EXE = shutil.which("defectflow", path=str(Path(sys.executable).parent)) or "defectflow"
PNG = b"\x89PNG\r\n\x1a\n"


class _Page(HTMLParser):
    """Every tag's attributes, the h2 headings, figure captions and the <pre> text of an HTML page."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.h2: list[str] = []
        self.captions: list[str] = []
        self.pre = ""
        self._in: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag in ("h2", "figcaption", "pre"):
            self._in = tag
            if tag == "h2":
                self.h2.append("")
            elif tag == "figcaption":
                self.captions.append("")

    def handle_endtag(self, tag):
        if tag == self._in:
            self._in = None

    def handle_data(self, data):
        if self._in == "h2":
            self.h2[-1] += data
        elif self._in == "figcaption":
            self.captions[-1] += data
        elif self._in == "pre":
            self.pre += data

    def images(self) -> list[str]:
        return [a.get("src") or "" for t, a in self.tags if t == "img"]


def _png_of(src: str) -> Image.Image:
    """The PNG of a ``data:image/png;base64,`` URI, checked by PIL."""
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:60]
    data = base64.b64decode(src[len(prefix):], validate=True)
    assert data.startswith(PNG)
    Image.open(io.BytesIO(data)).verify()
    return Image.open(io.BytesIO(data))


def _model_plot_keys(results: Results) -> list[str]:
    return [k for k in results.result()["plots"] if k.startswith(("parity_", "pca_"))]


@pytest.fixture(scope="module")
def run(pipeline_run):
    """The finished campaign of test_pipeline.py (conftest's session fixture: run once per session)."""
    return pipeline_run


@pytest.fixture(scope="module")
def page(run, tmp_path_factory):
    campaign, _ = run
    results = Results.for_campaign(campaign)
    text = campaign.to_yaml()
    path = write_report(results, text, tmp_path_factory.mktemp("report") / "report.html", store_label="test store")
    return path, path.read_text(encoding="utf-8"), results, text


def test_page_holds_every_section_with_the_runs_numbers(page):
    _, text, results, campaign_text = page
    doc = _Page(text)
    assert doc.h2 == [title for _, title in SECTIONS]
    assert [a["id"] for t, a in doc.tags if t == "section"] == [anchor for anchor, _ in SECTIONS]
    for g in results.ground_states():  # ground states: the HF energies of the store, to 4 decimals
        assert f"<td>{g['hf_energy']:.4f}</td>" in text
    for t in results.transition_levels():
        assert f"<td>{t['level']:.3f}</td>" in text
    assert "(meV/atom)</th>" in text and "(meV/Å)</th>" in text and "CPU (s)</th>" in text
    total_hf = sum(r["hf_calls"] for r in results.cost())
    assert re.search(rf'<tr class="total"><td>total</td>.*<td>{total_hf}</td></tr>', text)
    assert "<td>1</td><td>v_Si +0</td>" in text  # verification round 1 (the forced top-up) is listed
    assert html.unescape(doc.pre) == campaign_text  # the campaign file, verbatim


def test_page_is_self_contained(page):
    _, text, _, _ = page
    doc = _Page(text)
    refs = [(t, k, v or "") for t, a in doc.tags for k, v in a.items() if k in ("src", "href")]
    assert refs
    for tag, attr, value in refs:
        assert not value.startswith(("http://", "https://", "//", "file:")), (tag, attr, value[:80])
        assert value.startswith("#") if attr == "href" else value.startswith("data:image/png;base64,"), value[:80]
    assert not [t for t, _ in doc.tags if t in ("link", "script", "iframe", "object")]
    assert "url(" not in text and "@import" not in text


def test_every_image_is_an_embedded_png(page):
    _, text, results, _ = page
    srcs = _Page(text).images()
    final = results.result()
    expected = (len(results.lf_summaries()) + sum(bool(g["landscape"]) for g in final["ground_states"])
                + 1 + len(_model_plot_keys(results)))  # LF, surrogate landscapes, formation energies, model
    assert len(srcs) == expected
    for src in srcs:
        img = _png_of(src)
        assert img.width > 100 and img.height > 100
    assert "Figure not available" not in text


@pytest.fixture(scope="module")
def chromium():
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("chromium not installed (Debian: apt-get install chromium; scripts/setup.sh installs it)")
    return exe


def _chromium(exe: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}", *args],
                          check=False, capture_output=True, text=True, timeout=180)


def test_chromium_renders_the_page_and_every_image(page, chromium, tmp_path):
    path, text, _, _ = page
    n_img = len(_Page(text).images())
    # a copy with a probe that records, once the page has loaded, each image's decoded size
    probe = ('<script>window.addEventListener("load", () => document.body.setAttribute("data-probe", '
             'JSON.stringify(Array.from(document.images, i => [i.complete, i.naturalWidth, i.naturalHeight]))));'
             "</script></body>")
    probed = tmp_path / "probed.html"
    probed.write_text(text.replace("</body>", probe), encoding="utf-8")
    dom = _chromium(chromium, tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom",
                    probed.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r'data-probe="([^"]*)"', dom.stdout)
    assert found, dom.stdout[:500]
    sizes = json.loads(html.unescape(found.group(1)))
    assert len(sizes) == n_img > 0
    assert all(done and w > 0 and h > 0 for done, w, h in sizes), sizes
    assert "<h2>Campaign file</h2>" in dom.stdout

    shot = tmp_path / "shot.png"
    res = _chromium(chromium, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,3000",
                    "--hide-scrollbars", path.as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    assert shot.stat().st_size > 10_000
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 3000)
    colours = img.getcolors(maxcolors=1 << 24)
    assert len(colours) > 50  # text, tables and plots, not a blank page
    assert max(n for n, _ in colours) < 0.95 * 1200 * 3000  # the background is not everything


def test_missing_figures_are_drawn_again_from_the_store(run, tmp_path):
    """A run whose plot files are gone (e.g. written on FireWorks workers): LF, landscape and formation-energy
    figures are drawn again from the store; parity and PCA plots (they need the model evaluated) are named."""
    campaign, _ = run
    plots = campaign.work_dir() / "plots"
    away = plots.with_name("plots-away")
    plots.rename(away)
    try:
        results = Results.for_campaign(campaign)
        text = write_report(results, None, tmp_path / "r.html").read_text(encoding="utf-8")
    finally:
        away.rename(plots)
    doc = _Page(text)
    again = [c for c in doc.captions if c.endswith("(drawn again from the store)")]
    n_groups = len(results.ground_states())
    assert len(again) == n_groups + n_groups + 1  # LF, surrogate landscapes, formation energies
    assert len(doc.images()) == len(again)
    for src in doc.images():
        _png_of(src)
    missing = re.findall(r"Figure not available: [^<]*only evaluating the model again draws it", text)
    assert len(missing) == len(_model_plot_keys(results)) > 0
    assert "Campaign file not given" in text


def test_each_ground_state_shows_the_landscape_of_its_own_round(run, tmp_path):
    """Every round draws its own landscape file (…_round<N>.png, with that round's HF-verified minima): a ground
    state kept from an earlier round shows that round's, and nothing needs drawing again."""
    campaign, r = run
    results = Results.for_campaign(campaign)
    ground_states = results.result()["ground_states"]
    for g in ground_states:
        assert Path(g["landscape_plot"]).name.endswith(f"_round{g['round']}.png") and Path(g["landscape_plot"]).is_file()
    rounds = {rec.round for rec in r.result.rounds}
    files = {p.name for p in (campaign.work_dir() / "plots" / "search").glob("v_Si_*_mace-hf_round*.png")}
    assert files == {f"v_Si_{q:+d}_mace-hf_round{n}.png" for q in (0, 1) for n in rounds}
    captions = _Page(write_report(results, None, tmp_path / "r.html").read_text(encoding="utf-8")).captions
    assert not any(c.endswith("(drawn again from the store)") for c in captions)
    for g in ground_states:
        assert (f"{g['defect']} q = {g['charge']:+d}: surrogate (HF head) energy vs starting distortion, round "
                f"{g['round']}") in captions


class _NothingYet:
    """A run with nothing finished: what :class:`Results` answers before the first job ends."""

    campaign = "empty <campaign>"
    run = "r-0"

    def result(self):
        return None

    def levels(self):
        return None

    def _none(self, *args, **kwargs) -> list:
        return []

    ground_states = lf_summaries = transition_levels = model_metrics = cost = runs = query = _none


def test_sections_a_run_does_not_have_yet_say_so_in_one_line(tmp_path):
    text = write_report(_NothingYet(), "name: x  # <b>&</b>\n", tmp_path / "r.html").read_text(encoding="utf-8")
    doc = _Page(text)
    assert doc.h2 == [title for _, title in SECTIONS]
    for anchor, _ in SECTIONS[:-1]:
        body = text.split(f'<section id="{anchor}">', 1)[1].split("</section>", 1)[0]
        assert re.search(r'<p class="absent">[^<]+</p>', body), anchor
    assert not doc.images()
    assert "empty &lt;campaign&gt;" in text and "<campaign>" not in text
    assert "# &lt;b&gt;&amp;&lt;/b&gt;" in text and "<b>" not in text


# ---------------------------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------------------------
def cli(*args, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, *args], check=False, capture_output=True, text=True, cwd=cwd, timeout=timeout)


def test_report_command_reads_the_store_as_results_does(run, tmp_path):
    campaign, _ = run
    work = campaign.work_dir()
    (tmp_path / "c.yaml").write_text(campaign.to_yaml())

    r = cli("report", "c.yaml", "--work-dir", str(work), "-o", "with-campaign.html", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith(f"report: {tmp_path / 'with-campaign.html'} (")
    doc = _Page((tmp_path / "with-campaign.html").read_text(encoding="utf-8"))
    assert doc.h2 == [title for _, title in SECTIONS] and html.unescape(doc.pre) == campaign.to_yaml()

    r = cli("report", "--store", str(work), "-o", "from-store.html", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["state"] == "finished" and out["report"] == str(tmp_path / "from-store.html")
    assert "Campaign file not given" in (tmp_path / "from-store.html").read_text(encoding="utf-8")

    default = work / "report.html"
    default.unlink(missing_ok=True)
    r = cli("report", "--work-dir", str(work), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert default.is_file() and r.stdout.startswith(f"report: {default} (")
    assert len(_Page(default.read_text(encoding="utf-8")).images()) > 0


def test_report_command_bad_input_is_one_clear_line(tmp_path):
    r = cli("report", "nowhere.yaml", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: campaign file not found: nowhere.yaml"]
    assert not list(tmp_path.iterdir())  # nothing written

    r = cli("report", "--work-dir", str(tmp_path / "never-ran"), cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: ")


def test_run_writes_the_report_at_its_end_and_only_warns_when_it_cannot(run, tmp_path):
    """`defectflow run` again on a copy of the finished store (every job reused): the report is its last line; a
    report that cannot be written is one warning and the run still succeeds."""
    campaign, _ = run
    work = tmp_path / "work"
    shutil.copytree(campaign.work_dir() / "store", work / "store")
    (tmp_path / "c.yaml").write_text(campaign.to_yaml())

    (work / "report.html").mkdir()  # in the way: the report cannot be written
    r = cli("run", "c.yaml", "--work-dir", str(work), "--quiet", cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    warning = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warning) == 1 and warning[0].startswith("warning: could not write the HTML report (IsADirectoryError")
    assert "report: " not in r.stdout

    (work / "report.html").rmdir()
    r = cli("run", "c.yaml", "--work-dir", str(work), "--quiet", cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.rstrip().splitlines()[-1] == f"report: {work / 'report.html'}"
    doc = _Page((work / "report.html").read_text(encoding="utf-8"))
    assert doc.h2 == [title for _, title in SECTIONS]
    assert html.unescape(doc.pre) == campaign.to_yaml()
    assert all(_png_of(src) for src in doc.images())
