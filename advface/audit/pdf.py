"""A printable ``report.pdf`` of an audit (``advface audit --pdf``), drawn with the optional PDF library fpdf2 (the
``pdf`` extra): the verdict table first, then the scenarios, the attack table, utility and unlinkability; the
figures and the image grid stay in report.html."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from advface.audit.results import AuditResult, ScenariosResult
from advface.errors import ConfigError

#: Page width usable for tables (A4 landscape minus margins), in mm.
_WIDTH = 277.0


def require_fpdf() -> Any:
    """The ``fpdf`` module, or a ConfigError saying how to install it."""
    try:
        import fpdf
    except ImportError as exc:
        raise ConfigError("--pdf needs the PDF library fpdf2: pip install 'advface[pdf]'") from exc
    return fpdf


def _text(value: Any) -> str:
    """``value`` as text in the core fonts' Latin-1 (other characters replaced)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        value = f"{value:.3f}"
    return str(value).replace("\u2013", "-").replace("\u2264", "<=").encode("latin-1", "replace").decode("latin-1")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _table(pdf: Any, header: list[str], rows: list[list[str]], widths: list[float]) -> None:
    """A table with a bold header row; cells wrap."""
    scale = _WIDTH / sum(widths)
    with pdf.table(col_widths=tuple(w * scale for w in widths), text_align="LEFT", line_height=4.5) as table:
        head = table.row()
        for cell in header:
            head.cell(_text(cell))
        for row in rows:
            line = table.row()
            for cell in row:
                line.cell(_text(cell))
    pdf.ln(3)


def _heading(pdf: Any, text: str, size: int = 13) -> None:
    pdf.set_font("Helvetica", "B", size)
    pdf.cell(0, 8, _text(text), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", "", 8)


def _paragraph(pdf: Any, text: str) -> None:
    pdf.multi_cell(0, 4.5, _text(text), new_x="LMARGIN", new_y="NEXT")
    pdf.ln(2)


def _scenario_rows(sc: ScenariosResult) -> list[list[str]]:
    """The PDF's rows of one run of the scenarios (its templates named after each scenario)."""
    on = f" ({sc.templates})"
    rows = []
    if sc.full_disclosure is not None:
        f = sc.full_disclosure
        rows.append(
            [
                "full disclosure" + on,
                f"{f.pairs} pairs made with the key",
                _pct(f.inverse.template_match_rate),
                _pct(f.type1_success),
                _pct(f.inverse.transfer_type1_success),
            ]
        )
    for p in sc.known_pairs:
        rows.append(
            [
                "known pairs" + on,
                f"k = {p.k}",
                _pct(p.judged.template_match_rate),
                _pct(p.judged.type1_success),
                _pct(p.judged.transfer_type1_success),
            ]
        )
    e = sc.score_exposure
    if e is not None:
        for label, run in (("scores", e.with_scores), ("decisions only", e.decisions_only)):
            median = run.median_queries
            rows.append(
                [
                    f"score exposure ({label}){on}",
                    f"{sum(run.accepted)} of {e.victims} accepted, median "
                    + ("-" if median is None else f"{median:.0f}")
                    + f" queries (cap {e.budget})",
                    "",
                    _pct(e.faces.type1_success) if label == "scores" else "",
                    _pct(e.faces.transfer_type1_success) if label == "scores" else "",
                ]
            )
    return rows


def render_pdf(result: AuditResult) -> bytes:
    """The report of ``result`` as PDF bytes."""
    fpdf = require_fpdf()
    r = result
    pdf = fpdf.FPDF(orientation="L", format="A4")
    pdf.set_auto_page_break(True, margin=10)
    pdf.set_margins(10, 10, 10)
    pdf.add_page()
    _heading(pdf, "advface audit report", 16)
    _paragraph(pdf, f"generated {r.date or ''}; protection: {r.protection.method if r.protection else '-'}")
    if r.verdict is not None:
        _heading(pdf, "Verdict")
        marks = {True: "met", False: "NOT MET", None: "not measured"}
        _table(
            pdf,
            ["attacker", "holds", "recovers", "target", "verdict"],
            [[row.attacker, row.holds, row.recovers, row.target, marks[row.met]] for row in r.verdict.rows],
            [14, 30, 60, 30, 10],
        )
    if r.missing:
        _paragraph(pdf, "Partial report, missing: " + "; ".join(f"{m.stage}: {m.reason}" for m in r.missing))
    if r.scenarios is not None:
        _heading(pdf, "Scenarios")
        rows = [row for sc in r.scenarios.runs() for row in _scenario_rows(sc)]
        _table(
            pdf,
            ["scenario", "setting", "estimate matches raw", "faces Type I (system)", "faces Type I (transfer)"],
            rows,
            [20, 30, 15, 15, 15],
        )
        for sc in r.scenarios.runs():
            _paragraph(pdf, f"{sc.templates}: {sc.protocol}")
    if r.attacks:
        _heading(pdf, "Irreversibility: Type I / Type II at FMR 0.1%")
        rows = []
        for name, attack in r.attacks.items():
            for kind, rec in attack.by_templates.items():
                judged = rec.transfer.at_fmr["1e-3"].type1_success if rec.transfer is not None else None
                rows.append([name, kind, _pct(rec.type1_success), _pct(rec.type2_success), _pct(judged)])
        header = ["attacker", "templates", "Type I", "Type II", "Type I (transfer judge)"]
        _table(pdf, header, rows, [20, 15, 10, 10, 15])
    if r.utility is not None:
        _heading(pdf, "Utility: FNMR at fixed FMR")
        rows = [
            [kind, f"FMR {label}", _pct(m.fnmr), f"{_pct(m.fnmr_ci95[0])} - {_pct(m.fnmr_ci95[1])}"]
            + [str(m.genuine_comparisons), str(m.impostor_comparisons)]
            for label, kinds in r.utility.by_fmr.items()
            for kind, m in kinds.items()
        ]
        _table(pdf, ["templates", "at", "FNMR", "95% interval", "genuine", "impostor"], rows, [15, 10, 10, 15, 10, 10])
    if r.unlinkability is not None:
        _heading(pdf, "Unlinkability and renewability (D_sys)")
        renew = r.renewability.d_sys if r.renewability is not None else {}
        rows = [[k, f"{v:.3f}"] for k, v in r.unlinkability.d_sys.items()]
        rows += [[f"renewability: {k}", f"{v:.3f}"] for k, v in renew.items()]
        _table(pdf, ["databases", "D_sys"], rows, [30, 10])
    _paragraph(pdf, "Figures, the image grid and every number: report.html and report.json beside this file.")
    return bytes(pdf.output())


def write_pdf(result: AuditResult, path: Path) -> Path:
    """Write :func:`render_pdf` of ``result`` to ``path``."""
    path.write_bytes(render_pdf(result))
    return path
