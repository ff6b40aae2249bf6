"""One self-contained HTML page of a campaign run (``defectflow report``; ``defectflow run`` writes it at its end).

The page needs no network: figures are PNGs embedded as base64 ``data:`` URIs, the style sheet is inline, and there
is no JavaScript and no web font. It holds, in this order (:data:`SECTIONS`):

* ground states per (defect, q): the ShakeNBreak start they came from, HF and surrogate energies (eV), the
  verification error (meV/atom), the number of distinct minima, RMSDs (Å);
* charge-transition levels (eV above the VBM), formation energies at E_F = VBM and finite-size corrections (eV),
  doped's formation-energy diagram;
* energy-vs-distortion landscapes: the LF ShakeNBreak relaxations and the surrogate search (and the foundation-model
  baseline when it ran);
* the surrogate's held-out errors and those of its ablations (meV/atom, meV/Å), parity and descriptor-PCA plots;
* the verification rounds: |E_HF − E_MLIP| per (defect, q) and round (meV/atom), top-up retraining;
* cost per step: jobs, reused jobs, wall and CPU seconds, HF calls;
* the campaign file.

Everything is read through :class:`defectflow.results.Results`. Figures are the PNG files the run wrote; where a
file is gone (a run on FireWorks / jobflow-remote workers, or deleted), the LF, landscape and formation-energy
figures are drawn again from the store with :func:`defectflow.replot.replot`. Parity and PCA plots need the model
evaluated again (torch), so a missing one is named instead. A section a run does not have yet (an LF-only or
unfinished run has no levels, model or verification) says so in one line.

>>> from defectflow.results import Results
>>> from defectflow.report import write_report
>>> r = Results.for_campaign("workflows/quickstart.yaml")                                      # doctest: +SKIP
>>> write_report(r, open("workflows/quickstart.yaml").read(), "report.html")                  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from defectflow.results import Results

__all__ = ["SECTIONS", "write_report"]

#: (anchor, heading) of every section of the page, in order
SECTIONS: tuple[tuple[str, str], ...] = (
    ("ground-states", "Ground states"),
    ("levels", "Charge-transition levels and formation energies"),
    ("landscapes", "Energy-vs-distortion landscapes"),
    ("model", "Surrogate model"),
    ("verification", "Verification rounds"),
    ("cost", "Cost per step"),
    ("campaign", "Campaign file"),
)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; color: #1d1d1f;
       max-width: 1150px; margin: 0 auto; padding: 1.5em 2em 4em; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { border-bottom: 2px solid #d0d7de; padding-bottom: 0.2em; margin-top: 2em; }
h3 { margin-top: 1.4em; }
.meta { color: #57606a; margin: 0.2em 0; }
.note { background: #fff8c5; border-left: 4px solid #d4a72c; padding: 0.4em 0.8em; }
.absent { color: #57606a; font-style: italic; }
nav ol { columns: 2; }
table { border-collapse: collapse; margin: 0.6em 0 1em; font-size: 0.92em; }
th, td { border: 1px solid #d0d7de; padding: 0.25em 0.6em; text-align: right; }
th { background: #f6f8fa; }
td:first-child, th:first-child { text-align: left; }
tr.total td { font-weight: bold; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; border: 1px solid #d0d7de; padding: 0.5em; background: #fff; }
figure img { max-width: 100%; height: auto; display: block; }
figure.narrow img { max-width: 520px; }
figcaption { font-size: 0.9em; color: #57606a; margin-top: 0.3em; }
pre { background: #f6f8fa; border: 1px solid #d0d7de; padding: 0.8em; overflow-x: auto; font-size: 0.88em; }
"""


# ---------------------------------------------------------------------------------------------------------------
# the page
# ---------------------------------------------------------------------------------------------------------------
def write_report(results: Results, campaign_text: str | None, path: str | Path, store_label: str | None = None,
                 note: str | None = None) -> Path:
    """Write one run's report as a self-contained HTML page and return its path.

    Parameters
    ----------
    results
        The run to report (``results.run``; raises LookupError when the store holds no run).
    campaign_text
        The campaign file as given (YAML text), shown verbatim; None: the section says it was not given (the
        store does not keep the file).
    path
        The HTML file to write (parent folders are created).
    store_label
        Where the store is (a path or a masked MongoDB URI), shown in the header.
    note
        One line on the run's state (unfinished, running, a newer run exists), shown in the header.
    """
    final = results.result()
    figures = _Figures(results)
    body = [
        _ground_states(results, final),
        _levels(results, final, figures),
        _landscapes(results, final, figures),
        _model(results, final, figures),
        _verification(final),
        _cost(results),
        _campaign(campaign_text),
    ]
    figures.resolve()
    page_title = f"defectflow report: {results.campaign or '?'}"
    sections = "\n".join(f'<section id="{anchor}">\n<h2>{_e(title)}</h2>\n{figures.fill(content)}\n</section>'
                         for (anchor, title), content in zip(SECTIONS, body, strict=True))
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{_e(page_title)}</title>
<style>{_STYLE}</style>
</head>
<body>
{_header(results, final, page_title, store_label, note)}
<nav><ol>
{"".join(f'<li><a href="#{anchor}">{_e(title)}</a></li>' for anchor, title in SECTIONS)}
</ol></nav>
{sections}
</body>
</html>
"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def _header(results: Results, final: dict | None, title: str, store_label: str | None, note: str | None) -> str:
    from defectflow import __version__

    started = next((r["started"][:19].replace("T", " ") for r in results.runs() if r["run"] == results.run), None)
    state = ("final result (surrogate search, HF-verified ground states, levels)" if final else
             "no final result (an LF-only or unfinished run): ground states are the LF ShakeNBreak ones")
    lines = [f"<h1>{_e(title)}</h1>",
             f'<p class="meta">run {_e(results.run)}' + (f", started {_e(started)}" if started else "")
             + f"; {_e(state)}</p>"]
    if store_label:
        lines.append(f'<p class="meta">store: {_e(store_label)}</p>')
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines.append(f'<p class="meta">written {_e(now)} by defectflow {_e(__version__)}</p>')
    if note:
        lines.append(f'<p class="note">{_e(note)}</p>')
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------------------------
def _ground_states(results: Results, final: dict | None) -> str:
    rows = results.ground_states()
    if not rows:
        return _absent("No ground states yet: no (defect, q) has finished its LF relaxations in this run.")
    if rows[0]["source"] == "lf":
        return ("<p>No final result in this run: the lowest-energy LF ShakeNBreak distortion per (defect, q).</p>"
                + _table(["defect", "q", "ground state (LF ShakeNBreak)", "E_LF (eV)", "ΔE vs Unperturbed (eV)"],
                         [[r["defect"], f"{r['charge']:+d}", _label(r.get("ground_state_label")),
                           _num(r.get("lf_energy"), ".4f"), _num(r.get("energy_lowering"), "+.3f")] for r in rows]))
    rounds = {(g["defect"], g["charge"]): g.get("round") for g in final["ground_states"]}
    table = _table(
        ["defect", "q", "from start", "E_HF (eV)", "E_surrogate (eV)", "|E_HF − E_MLIP| (meV/atom)", "minima",
         "round", "HF max force (eV/Å)", "RMSD to HF-relaxed/refined (Å)", "baseline RMSD (Å)"],
        [[r["defect"], f"{r['charge']:+d}", _label(r.get("ground_state_label")), _num(r.get("hf_energy"), ".4f"),
          _num(r.get("surrogate_energy"), ".4f"), _num(r.get("verification_error_mev_per_atom"), ".1f"),
          str(r.get("n_minima", "–")), _num(rounds.get((r["defect"], r["charge"])), "d"),
          _num(r.get("hf_max_force"), ".3f"), _num(r.get("rmsd_to_hf_relaxed"), ".3f"),
          _num(r.get("baseline_rmsd"), ".3f")] for r in rows])
    return ("<p>Per (defect, q): the verified surrogate minimum with the lowest HF energy of any search round, "
            "and the ShakeNBreak start that relaxed into it.</p>" + table)


def _levels(results: Results, final: dict | None, figures: _Figures) -> str:
    if final is None:
        return _absent("No levels yet: they are computed at the end of a full run.")
    lv = results.levels()
    if not lv:
        return _absent(f"Levels not computed: {final.get('levels_error') or 'no reason recorded'}.")
    eps = f", ε = {lv['dielectric']:g}" if lv.get("dielectric") is not None else ""
    out = [(f"<p>VBM {lv['vbm']:.3f} eV (HF engine scale; the Fermi-level zero), band gap {lv['band_gap']:.3f} eV, "
            f"finite-size correction: {_e(lv['correction_scheme'])}{_e(eps)}.</p>")]
    ctls = results.transition_levels()
    if ctls:
        out.append(_table(["defect", "level", "ε (eV above VBM)", "in gap"],
                          [[t["defect"], f"ε({t['q_from']:+d}/{t['q_to']:+d})", f"{t['level']:.3f}",
                            "yes" if t["in_gap"] else "no"] for t in ctls]))
    else:
        out.append(_absent("No transition level within [VBM − 1 eV, CBM + 1 eV]."))
    keys = sorted(set(lv.get("formation_energies_vbm") or {}) | set(lv.get("corrections") or {}))
    if keys:
        out.append(_table(["defect q", "formation energy at E_F = VBM (eV)", "correction (eV)"],
                          [[k, _num((lv.get("formation_energies_vbm") or {}).get(k), ".3f"),
                            _num((lv.get("corrections") or {}).get(k), "+.3f")] for k in keys]))
    if lv.get("chemical_potentials"):
        out.append("<p>Chemical potentials (eV): " + _e(", ".join(f"μ({k}) = {v:.4f}" for k, v in
                                                                 lv["chemical_potentials"].items())) + "</p>")
    out += [f'<p class="meta">{_e(n)}</p>' for n in lv.get("notes") or []]
    out.append(figures.block([_Fig("Formation energy vs Fermi level (doped)", lv.get("plot"), "levels")]))
    return "\n".join(out)


def _landscapes(results: Results, final: dict | None, figures: _Figures) -> str:
    out = ["<h3>Low fidelity: ShakeNBreak relaxations</h3>"]
    summaries = sorted(results.lf_summaries(), key=lambda s: (s["defect"], s["charge"]))
    if summaries:
        out.append(_table(
            ["defect", "q", "ground state", "ΔE vs Unperturbed (eV)", "lowering found", "converged", "failed"],
            [[s["defect"], f"{s['charge']:+d}", _label(s.get("ground_state")), _num(s.get("energy_lowering"), "+.3f"),
              "yes" if s.get("energy_lowering_found") else "no", f"{s['n_converged']}/{len(s['status'])}",
              str(s["n_failed"])] for s in summaries]))
        out.append(figures.block([_Fig(f"{s['defect']} q = {s['charge']:+d}: LF energy vs bond distortion",
                                       s.get("plot"), "lf") for s in summaries]))
    else:
        out.append(_absent("No LF summaries yet: no (defect, q) has finished its LF relaxations in this run."))
    out.append("<h3>Surrogate search</h3>")
    if final is None:
        out.append(_absent("No surrogate search yet: it runs after training (a full run)."))
        return "\n".join(out)
    gs = sorted(final["ground_states"], key=lambda g: (g["defect"], g["charge"]))
    out.append(_table(["defect", "q", "round", "starts", "distinct minima", "lowest E_surrogate (eV)"],
                      [[g["defect"], f"{g['charge']:+d}", _num(g.get("round"), "d"), str(len(g.get("landscape") or {})),
                        str(g.get("n_minima", "–")),
                        _num(min(g["landscape"].values()) if g.get("landscape") else None, ".4f")] for g in gs]))
    # one landscape file per round (…_round<N>.png, with that round's HF-verified minima): the ground state's own
    out.append(figures.block([_Fig(f"{g['defect']} q = {g['charge']:+d}: surrogate (HF head) energy vs starting "
                                   f"distortion, round {g.get('round')}", g.get("landscape_plot"), "landscapes")
                              for g in gs if g.get("landscape")]))
    baselines = [d["output"] for d in results.query(step="baseline", properties=[
        "output.defect", "output.charge", "output.model", "output.plot", "completed_at"])]
    if baselines:
        out.append("<h3>Foundation-model baseline</h3>")
        out.append(figures.block([_Fig(f"{b['defect']} q = {b['charge']:+d}: {b['model']} energy vs starting "
                                       "distortion", b.get("plot"), "landscapes") for b in baselines]))
    return "\n".join(out)


def _model(results: Results, final: dict | None, figures: _Figures) -> str:
    metrics = results.model_metrics()
    if not metrics:
        return _absent("No surrogate yet: it is trained after the HF single points (a full run).")
    out = [_table(["model", "kind", "charge embedding", "HF test E RMSE (meV/atom)", "HF test E MAE (meV/atom)",
                   "HF test F RMSE (meV/Å)", "LF valid E RMSE (meV/atom)", "LF valid F RMSE (meV/Å)",
                   "PCA separation/spread", "training (s)"],
                  [[m["model"], m["kind"], "yes" if m["charge_embedding"] else "no",
                    _num(m.get("hf_test_energy_rmse"), ".1f"), _num(m.get("hf_test_energy_mae"), ".1f"),
                    _num(m.get("hf_test_force_rmse"), ".0f"), _num(m.get("lf_valid_energy_rmse"), ".1f"),
                    _num(m.get("lf_valid_force_rmse"), ".0f"),
                    ", ".join(f"{k}: {v:.2f}" for k, v in (m.get("pca_separation_ratio") or {}).items()) or "–",
                    _num(m.get("wall_seconds"), ".0f")] for m in metrics]),
           ('<p class="meta">Held-out HF frames (HF head) and LF validation frames (LF head) of the last training '
            "round. PCA separation/spread: distance between the per-q centroids of the per-atom descriptors over "
            "their RMS spread (≫ 1: the charge states form separate clusters).</p>")]
    if final is not None:
        plots = final.get("plots") or {}
    else:
        train = results.query(step="train", properties=["output.plots", "completed_at"])
        plots = (train[-1].get("output") or {}).get("plots") or {}
    model_plots = sorted((k, v) for k, v in plots.items() if k.startswith(("parity_", "pca_")))
    if model_plots:
        # parity plots (two panels per set) and the side-by-side PCA at full width, one-panel PCAs side by side
        wide = [k.startswith("parity_") or k == "pca_charge_embedding" for k, _ in model_plots]
        for narrow in (False, True):
            figs = [_Fig(_model_caption(k), v, None) for (k, v), w in zip(model_plots, wide, strict=True)
                    if w != narrow]
            if figs:
                out.append(figures.block(figs, narrow=narrow))
    else:
        out.append(_absent("No parity or PCA plot recorded for this training."))
    return "\n".join(out)


def _model_caption(key: str) -> str:
    if key == "pca_charge_embedding":
        return "Descriptor PCA, charge-embedded vs not (coloured by q)"
    kind, _, model = key.partition("_")
    return (f"{model}: energy (eV/atom) and force (eV/Å) parity, coloured by q" if kind == "parity" else
            f"{model}: PCA of the per-atom descriptors, coloured by q")


def _verification(final: dict | None) -> str:
    if final is None:
        return _absent("No verification yet: the HF engine verifies the surrogate's ground states in a full run.")
    rounds = final.get("rounds") or []
    out = [(f"<p>{final.get('hf_calls', 0)} HF calculations in all (bulk, {final.get('n_hf_selected', 0)} selected "
            f"single points, verifications, top-ups), {final.get('hf_seconds', 0.0):.0f} s of wall time; "
            f"verifications and top-ups {final.get('hf_cpu_seconds', 0.0):.0f} CPU-s.</p>")]
    if not rounds:
        out.append(_absent("No verification round recorded."))
        return "\n".join(out)
    rows = []
    for rec in rounds:
        gs = rec.get("ground_states") or {}
        for group, checks in sorted((rec.get("verified") or {}).items()):
            for c in checks:
                std = c.get("energy_std")
                is_gs = gs.get(group, {}).get("label") == c.get("label") and c.get("hf_energy") == gs.get(
                    group, {}).get("hf_energy")
                rows.append([str(rec["round"]), group, _label(c.get("label")), c.get("role") or "–",
                             _num(c.get("surrogate_energy"), ".4f"), _num(c.get("hf_energy"), ".4f"),
                             _num(c.get("error_mev_per_atom"), ".1f"), _num(None if std is None else 1000 * std, ".1f"),
                             _num(c.get("force_std"), ".3f"), "✓" if is_gs else ""])
    out.append(_table(["round", "defect q", "minimum (from start)", "why verified", "E_surrogate (eV)", "E_HF (eV)",
                       "|E_HF − E_MLIP| (meV/atom)", "committee σ_E (meV)", "committee σ_F (eV/Å)", "ground state"],
                      rows))
    summary = []
    for rec in rounds:
        added = rec.get("added") or []
        reasons: dict[str, int] = {}
        for a in added:
            reasons[a["reason"]] = reasons.get(a["reason"], 0) + 1
        summary.append([str(rec["round"]), ", ".join(rec.get("changed") or []) or "none",
                        "; ".join(f"{n} × {k}" for k, n in sorted(reasons.items())) or "–",
                        str(rec.get("hf_calls", "–")), _num(rec.get("hf_cpu_seconds"), ".0f"),
                        rec.get("stop_reason") or "next round"])
    out.append(_table(["round", "ground state changed", "frames added before it", "HF calls", "HF CPU (s)",
                       "after it"], summary))
    out.append('<p class="meta">Each round verifies the lowest distinct surrogate minima of every (defect, q) plus '
               "the most uncertain low-energy one (committee spread) with HF single points; the ground state is the "
               "lowest in HF energy among them and every structure whose HF energy was already known. A further round "
               "adds HF single points at the most uncertain structures along the surrogate relaxation paths and at "
               "the verified minima above verify.energy_threshold, and fine-tunes the committee from its previous "
               "weights.</p>")
    return "\n".join(out)


def _cost(results: Results) -> str:
    rows = results.cost()
    if not rows:
        return _absent("No finished job in this run yet.")
    total = {k: sum(r[k] for r in rows) for k in ("jobs", "reused", "wall_s", "cpu_s", "hf_calls")}
    body = [[r["step"], str(r["jobs"]), str(r["reused"]), f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}",
             str(r["hf_calls"] or "–")] for r in rows]
    table = _table(["step", "jobs", "reused", "wall (s)", "CPU (s)", "HF calls"], body,
                   total=["total", str(total["jobs"]), str(total["reused"]), f"{total['wall_s']:.1f}",
                          f"{total['cpu_s']:.1f}", str(total["hf_calls"])])
    return (table + '<p class="meta">CPU seconds: the job\'s own process (all threads) plus its finished child '
            "processes (e.g. mpirun pw.x). HF calls: HF jobs computed in this run (reused ones are not counted).</p>")


def _campaign(text: str | None) -> str:
    if text is None:
        return _absent("Campaign file not given (report made from a store alone; the store does not keep it).")
    return f"<pre>{_e(text)}</pre>"


# ---------------------------------------------------------------------------------------------------------------
# figures: the run's PNG files, embedded; missing ones drawn again from the store
# ---------------------------------------------------------------------------------------------------------------
class _Fig(NamedTuple):
    """One figure a section asks for."""

    caption: str
    path: str | None  # the PNG the run wrote (None: the run drew none)
    kind: str | None  # the replot kind that draws it again from the store (lf, landscapes, levels), or None
    redraw: bool = False  # the file may show something else (a later round's search): draw it again


class _Figures:
    """Collects the figures the sections ask for, then embeds them.

    :meth:`block` gives a section a placeholder per group of figures; :meth:`resolve` reads every PNG, draws the
    missing (or stale) ones that :func:`defectflow.replot.replot` can draw in one call (matched by file name, which
    replot shares with the pipeline), and :meth:`fill` puts the HTML in place of the placeholders."""

    def __init__(self, results: Results):
        self.results = results
        self.blocks: list[tuple[list[_Fig], bool]] = []
        self.html: list[str] = []

    def block(self, figs: list[_Fig], narrow: bool = True) -> str:
        """A placeholder for ``figs``; ``narrow``: at most 520 px wide (two side by side)."""
        self.blocks.append((figs, narrow))
        return f"<!--figures {len(self.blocks) - 1}-->"

    def resolve(self) -> None:
        files = {f.path: _read_png(f.path) for figs, _ in self.blocks for f in figs if f.path and not f.redraw}
        kinds = {f.kind for figs, _ in self.blocks for f in figs if f.path and f.kind and files.get(f.path) is None}
        redrawn = self._redraw(tuple(sorted(kinds))) if kinds else {}
        for figs, narrow in self.blocks:
            shown, absent = [], []
            for f in figs:
                data = files.get(f.path)
                again = redrawn.get(Path(f.path).name) if data is None and f.path and f.kind else None
                if data is None and again is None:
                    why = ("not drawn by the run" if not f.path else
                           f"{f.path} shows a later round and could not be drawn again" if f.redraw else
                           f"{f.path} is gone" if f.kind else
                           f"{f.path} is gone; only evaluating the model again draws it")
                    absent.append(_absent(f"Figure not available: {f.caption} ({why})."))
                else:
                    shown.append(_figure(f.caption + (" (drawn again from the store)" if again else ""),
                                         data or again, narrow))
            self.html.append((f'<div class="figures">{"".join(shown)}</div>' if shown else "") + "".join(absent))

    def _redraw(self, kinds: tuple[str, ...]) -> dict[str, bytes]:
        """File name → PNG bytes of the figures :func:`~defectflow.replot.replot` draws for ``kinds``."""
        from defectflow.replot import replot

        with tempfile.TemporaryDirectory(prefix="defectflow-report-") as tmp:
            written = replot(self.results, tmp, kinds)
            return {Path(p).name: data for paths in written.values() for p in paths
                    if (data := _read_png(p)) is not None}

    def fill(self, content: str) -> str:
        for i, block in enumerate(self.html):
            content = content.replace(f"<!--figures {i}-->", block)
        return content


def _read_png(path: str | None) -> bytes | None:
    """The bytes of a PNG file, or None when there is no such (readable, PNG) file."""
    if not path:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    return data if data.startswith(_PNG_SIGNATURE) else None


def _figure(caption: str, png: bytes, narrow: bool) -> str:
    src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return (f'<figure class="{"narrow" if narrow else "wide"}"><img src="{src}" alt="{_e(caption)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


# ---------------------------------------------------------------------------------------------------------------
# HTML helpers
# ---------------------------------------------------------------------------------------------------------------
def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _absent(line: str) -> str:
    return f'<p class="absent">{_e(line)}</p>'


def _num(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _label(label: str | None) -> str:
    """ShakeNBreak label without the 'Bond_Distortion_' prefix ('-30.0%', 'Dimer', 'Unperturbed')."""
    return (label or "–").replace("Bond_Distortion_", "")


def _table(headers: list[str], rows: list[list[str]], total: list[str] | None = None) -> str:
    """A plain HTML table; every cell is escaped."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    if total:
        body += '<tr class="total">' + "".join(f"<td>{_e(c)}</td>" for c in total) + "</tr>"
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
