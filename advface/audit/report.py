"""The audit report: ``report.json`` (every number) and ``report.html``, a self-contained page (plots and image grids
inline as base64 PNG, no external resources) that opens in any browser.

Plots: ROC and DET of verification (raw / protected / protected + key), score histograms (verification and
cross-database linkage), D(s) curves, the GAN-prior search progress, and the image grid (original chips, then each
attacker's reconstruction from the raw and from the protected template).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from advface.audit.metrics import Linkage, Verification, roc_points
from advface.audit.results import (
    TEMPLATE_KINDS,
    AttackResult,
    AuditResult,
    EncryptedMatchingResult,
    JudgedTemplates,
    LayersResult,
    ReconstructionResult,
    ScenariosResult,
    ThiefScanResult,
    UtilityResult,
    VerdictResult,
)

#: Photos (columns) of the image grid.
GRID_COLUMNS = 6


@dataclass
class ReportArtifacts:
    """What the plots are drawn from (not written to JSON)."""

    verifications: dict[str, Verification] = field(default_factory=dict)
    linkages: dict[str, Linkage] = field(default_factory=dict)
    grid_originals: np.ndarray | None = None
    grid_rows: list[tuple[str, np.ndarray]] = field(default_factory=list)
    gan_history: list[float] = field(default_factory=list)


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc_det(verifications: dict[str, Verification]) -> str:
    """ROC (TAR vs FAR, log FAR) and DET (FRR vs FAR, log-log) curves side by side."""
    plt = _plt()
    fig, (roc, det) = plt.subplots(1, 2, figsize=(9, 3.6))
    for name, v in verifications.items():
        far, tar = roc_points(v)
        keep = far > 0
        roc.plot(far[keep], tar[keep], label=name)
        det.plot(far[keep], np.maximum(1 - tar[keep], 1e-4), label=name)
    roc.set(xscale="log", xlabel="FAR", ylabel="TAR", title="ROC")
    det.set(xscale="log", yscale="log", xlabel="FAR", ylabel="FRR", title="DET")
    for ax in (roc, det):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def plot_histograms(verifications: dict[str, Verification], linkages: dict[str, Linkage]) -> str:
    """Mated vs non-mated score histograms: verification settings, then cross-database linkage settings."""
    plt = _plt()
    panels = [(f"verification: {k}", v.scores[v.same], v.scores[~v.same]) for k, v in verifications.items()]
    panels += [(f"linkage: {k}", lk.mated, lk.nonmated) for k, lk in linkages.items()]
    cols = min(3, max(len(panels), 1))
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False)
    for ax, (title, mated, nonmated) in zip(axes.ravel(), panels):
        bins = np.linspace(min(mated.min(), nonmated.min()), max(mated.max(), nonmated.max()), 40)
        ax.hist(nonmated, bins=bins, density=True, alpha=0.5, label="non-mated")
        ax.hist(mated, bins=bins, density=True, alpha=0.5, label="mated")
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    for ax in axes.ravel()[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def plot_d_curves(linkages: dict[str, Linkage]) -> str:
    """D(s) of each linkage setting, with its D_sys in the legend."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for name, lk in linkages.items():
        ax.plot(lk.curve.centers, lk.curve.d, label=f"{name}: D_sys={lk.metrics.d_sys:.3f}")
    ax.set(xlabel="score s", ylabel="D(s)", ylim=(-0.02, 1.02), title="Local linkability D(s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def plot_gan_history(history: list[float]) -> str:
    """Mean best similarity of the GAN-prior search per step."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(range(len(history)), history, "o-", ms=3)
    ax.set(xlabel="step", ylabel="mean similarity to template", title="GAN-prior latent search")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def plot_grid(originals: np.ndarray, rows: list[tuple[str, np.ndarray]]) -> str:
    """Image grid: the original chips, then one row per (attacker, raw / protected) reconstruction."""
    plt = _plt()
    all_rows = [("original", originals), *rows]
    n = len(originals)
    fig, axes = plt.subplots(len(all_rows), n, figsize=(n * 1.0 + 1.6, len(all_rows) * 1.0), squeeze=False)
    for r, (label, faces) in enumerate(all_rows):
        for c in range(n):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(faces):
                ax.imshow(faces[c])
        axes[r, 0].text(-0.1, 0.5, label, transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=7)
    fig.subplots_adjust(left=0.22, right=0.99, top=0.99, bottom=0.01, wspace=0.05, hspace=0.08)
    return _png(fig)


def _fmt(value: Any, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "&ndash;"
    if isinstance(value, float):
        return f"{100 * value:.1f}%" if pct else f"{value:.3f}"
    return html.escape(str(value))


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _attack_rows(attacks: dict[str, AttackResult], transfer: bool = False) -> list[list[str]]:
    """One row per attacker and template kind; with ``transfer`` the transfer judge's Type I / II at FMR 0.1%."""
    rows = []
    for name, attack in attacks.items():
        for kind in TEMPLATE_KINDS:
            r = attack.by_templates.get(kind)
            if r is None:
                continue
            strict, loose = r.at_fmr["1e-3"], r.at_fmr["1e-2"]
            rows.append(
                [
                    html.escape(name),
                    kind,
                    _fmt(strict.type1_success, True),
                    _fmt(strict.type2_success, True),
                    _fmt(loose.type1_success, True),
                    _fmt(loose.type2_success, True),
                    *(_transfer_cells(r) if transfer else []),
                    _fmt(r.ssim),
                    f"{r.psnr:.2f}",
                    str(r.n),
                ]
            )
    return rows


def _transfer_cells(r: ReconstructionResult) -> list[str]:
    """The transfer judge's Type I / Type II at FMR 0.1% (dashes where it did not judge)."""
    if r.transfer is None:
        return ["&ndash;", "&ndash;"]
    strict = r.transfer.at_fmr["1e-3"]
    return [_fmt(strict.type1_success, True), _fmt(strict.type2_success, True)]


def _thief_html(thief: ThiefScanResult) -> str:
    """The database thief without keys: vectors recovered from the rows, and from the raw bytes of the files."""
    enc = "encrypted at rest" if thief.encrypted_at_rest else "NOT encrypted at rest"
    out = (
        f"<p class='thief'><b>Database thief without keys</b> (store {enc}): "
        f"<b>vectors recovered without keys: {thief.vectors_recovered} of {thief.rows} rows</b>. "
        f"Read: {html.escape(str(thief.read))}; every byte offset decoded as float32 / "
        "float64; a row counts when a decoding matches a victim photo at FMR 0.1% or equals a stored "
        "template.</p>"
    )
    fb = thief.file_bytes
    if fb:
        out += (
            f"<p>Raw bytes of {html.escape(', '.join(fb.get('files', [])))} "
            f"({fb['bytes_scanned']} bytes{', truncated' if fb.get('truncated') else ''}): "
            f"{fb['audited_templates_found']} of {fb['audited_templates']} audited templates found, "
            f"{fb['windows_matching_a_victim']} windows matching a victim photo.</p>"
        )
    return out


def _layers_html(thief: ThiefScanResult | None, layers: LayersResult | None) -> str:
    """The layered-secrets section: the thief without keys, then each attacker against the layer meant to stop it."""
    parts = ["<h2 id='layers'>Layered secrets: each attacker against each layer</h2>"]
    if thief is not None:
        parts.append(_thief_html(thief))
    rows = []
    for layer in layers.layers if layers is not None else []:
        best = layer.best
        if layer.thief is not None:
            result = f"{layer.thief.vectors_recovered} of {layer.thief.rows} rows recovered"
        elif layer.api is not None:
            leaks = layer.api_stored_vector_rpcs
            result = (
                f"RPCs returning stored templates: {html.escape(', '.join(leaks)) if leaks else 'none'}; "
                "score-search bound, best Type I @FMR 0.1%: "
                f"{_fmt(best.type1_success_max if best else None, True)}"
            )
        elif best is not None:
            result = f"best Type I @FMR 0.1%: {_fmt(best.type1_success_max, True)}"
        else:
            result = "&ndash;"
        rows.append(
            [
                html.escape(layer.attacker),
                html.escape(layer.holds),
                html.escape(layer.layer),
                html.escape(best.templates) if best is not None and best.templates else "&ndash;",
                result,
                html.escape(layer.note or ""),
            ]
        )
    if rows:
        parts.append(_table(["attacker", "holds", "layer that should stop it", "templates", "result", "note"], rows))
    return "".join(parts)


def _verdict_html(verdict: VerdictResult) -> str:
    """The first table of the page: one row per attacker of the threat model, with a met / not met mark."""
    marks = {True: ("met", "met"), False: ("not met", "notmet"), None: ("not measured", "unmeasured")}
    rows = []
    for row in verdict.rows:
        text, css = marks[row.met]
        rows.append(
            [
                f"<b>{html.escape(row.attacker)}</b>",
                html.escape(row.holds),
                html.escape(row.recovers),
                html.escape(row.target),
                f"<span class='{css}'>{text}</span>",
            ]
        )
    return (
        "<h2 id='verdict'>Verdict</h2>"
        + _table(["attacker", "holds", "recovers", "target", "verdict"], rows)
        + "<p class='note'>Recovered faces are judged by the system encoder (would the system accept them?) and by "
        "the transfer judge (another face matcher); the details follow below.</p>"
    )


def _judged_cells(j: JudgedTemplates) -> list[str]:
    return [
        _fmt(j.template_match_rate, True),
        _fmt(j.type1_success, True),
        _fmt(j.type2_success, True),
        _fmt(j.transfer_type1_success, True),
    ]


_JUDGED_HEADER = ["estimate matches raw", "faces Type I @FMR 0.1%", "faces Type II", "faces Type I (transfer judge)"]


def _scenarios_html(sc: ScenariosResult) -> str:
    """The scenarios on the protected templates, then on those under the keyed transform."""
    parts = ["<h2 id='scenarios'>Scenarios</h2>", _scenario_run_html(sc)]
    if sc.keyed is not None:
        parts.append("<h2 id='scenarios-keyed'>Scenarios under the keyed transform</h2>")
        parts.append(_scenario_run_html(sc.keyed))
    return "".join(parts)


def _scenario_run_html(sc: ScenariosResult) -> str:
    """One section per scenario: full disclosure, known pairs (the curve over k), score exposure."""
    parts = [f"<p class='note'>On the {html.escape(sc.templates)} templates. {html.escape(sc.protocol)}.</p>"]
    full = sc.full_disclosure
    if full is not None:
        parts.append(
            "<h3>Full disclosure: the attacker holds every key</h3>"
            f"<p>{html.escape(full.holds)}. Best of the audit's attackers: "
            f"{html.escape(full.direct_attacker or 'none ran')} (Type I {_fmt(full.direct_type1_success, True)}); "
            f"inverse map learned from {full.pairs} pairs made with the key, decoded by "
            f"{html.escape(full.inverse.decoder or 'no decoder')}:</p>"
            + _table(_JUDGED_HEADER, [_judged_cells(full.inverse)])
            + f"<p>Scenario: Type I {_fmt(full.type1_success, True)}, Type II {_fmt(full.type2_success, True)} "
            "(the better route).</p>"
        )
    if sc.known_pairs:
        parts.append(
            f"<h3>Known pairs: an insider with k leaked (raw, {html.escape(sc.templates)}) pairs</h3>"
            + _table(
                ["k", *_JUDGED_HEADER, "relative error"],
                [[str(p.k), *_judged_cells(p.judged), _fmt(p.relative_error)] for p in sc.known_pairs],
            )
        )
    exp = sc.score_exposure
    if exp is not None:
        rows = []
        for label, run in (("scores", exp.with_scores), ("decisions only", exp.decisions_only)):
            median = run.median_queries
            rows.append(
                [
                    label,
                    f"{sum(run.accepted)} of {exp.victims}",
                    "&ndash;" if median is None else f"{median:.0f}",
                    str(exp.budget),
                ]
            )
        parts.append(
            "<h3>Score exposure: a template rebuilt from the system's answers</h3>"
            + _table(["answers", "accepted within the cap", "median queries (accepted)", "query cap"], rows)
            + "<p>Faces from the templates rebuilt with scores:</p>"
            + _table(_JUDGED_HEADER, [_judged_cells(exp.faces)])
            + f"<p class='note'>{html.escape(exp.method)}; threshold {exp.threshold:.4f}.</p>"
        )
    return "".join(parts)


def _encrypted_matching_html(enc: EncryptedMatchingResult) -> str:
    """The encrypted-matching scenario: what the thief with the database and the sidecar's memory recovered."""
    parts = ["<h2 id='encrypted-matching'>Scenario: encrypted matching, the database and the sidecar's memory</h2>"]
    if not enc.measured:
        parts.append(f"<p><b>Not measured</b>: {html.escape(str(enc.reason))}.</p>")
    else:
        c = enc.counts

        def cell(key: str) -> str:
            return f"{c[key]['half']} ({c[key]['full']})" if key in c else "&ndash;"

        parts.append(
            f"<p><b>{html.escape(enc.summary)}</b>.</p>"
            + _table(
                ["what the thief reads", "templates (full)", "template plaintexts (full)", "probes (full)"],
                [
                    [
                        f"memory dump ({enc.memory_mb} MB)",
                        cell("memory_templates"),
                        cell("memory_plaintexts"),
                        cell("memory_probes"),
                    ],
                    [
                        f"database files ({html.escape(', '.join(enc.database_files))}; {enc.database_mb} MB)",
                        cell("database_templates"),
                        cell("database_plaintexts"),
                        "&ndash;",
                    ],
                ],
            )
            + f"<p>{html.escape(enc.attacks)}.</p>"
        )
        judged = [(w, j) for w, j in (("templates", enc.judged_templates), ("probes", enc.judged_probes)) if j]
        if judged:
            parts.append(
                _table(["recovered", *_JUDGED_HEADER], [[f"recovered {w}", *_judged_cells(j)] for w, j in judged])
            )
    parts.append(f"<p class='note'>{html.escape(enc.setup)}. Not covered: {html.escape(enc.not_covered)}.</p>")
    return "".join(parts)


def _utility_html(utility: UtilityResult) -> str:
    """FNMR at FMR 0.1% / 0.01% per kind of enrolled template, with the comparisons and 95% intervals."""
    rows = []
    for label, kinds in utility.by_fmr.items():
        for kind, m in kinds.items():
            lo, hi = m.fnmr_ci95
            rows.append(
                [
                    html.escape(kind),
                    f"FMR {html.escape(label)}",
                    _fmt(m.fnmr, True),
                    f"{100 * lo:.1f}&ndash;{100 * hi:.1f}%",
                    str(m.genuine_comparisons),
                    str(m.impostor_comparisons) + ("" if m.impostors_sufficient else " (too few)"),
                    f"{100 * m.fmr_achieved:.3f}%",
                ]
            )
    return (
        "<h3>FNMR at fixed FMR</h3>"
        + _table(
            ["enrolled templates", "at", "FNMR", "95% interval", "genuine", "impostor", "FMR achieved"],
            rows,
        )
        + f"<p class='note'>{html.escape(utility.protocol)}. {html.escape(utility.interval)}.</p>"
    )


_CSS = """body{font-family:sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f0f0f0}.missing{background:#fff3cd;border:1px solid #e0c060;padding:0.5em 1em}
img{max-width:100%}code{background:#f4f4f4;padding:0 3px}.note{color:#555;font-size:13px}
.met{color:#1a7f37;font-weight:bold}.notmet{color:#c62828;font-weight:bold}.unmeasured{color:#777}
@media print{body{margin:0;max-width:none}img{page-break-inside:avoid}}"""


def _figure(figures: dict[str, str], name: str, alt: str, heading: str = "") -> str:
    """The ``<img>`` of figure ``name`` (after ``heading``), empty when the figure was not drawn."""
    if name not in figures:
        return ""
    return f"{heading}<img alt='{alt}' src='data:image/png;base64,{figures[name]}'>"


def _key_value_table(header: str, section: dict[str, Any], nested: bool = True) -> str:
    """A two-column table of a report section's entries (``nested`` False: scalar entries only)."""
    return _table(
        [header, "value"],
        [[html.escape(k), _fmt(v)] for k, v in section.items() if nested or not isinstance(v, (dict, list))],
    )


def render_html(result: AuditResult, figures: dict[str, str]) -> str:
    """The report page for ``result`` with ``figures`` (name -> base64 PNG)."""
    r = result
    parts = [
        (
            f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>advface audit</title><style>{_CSS}</style>"
            "</head><body><h1>advface audit report</h1>"
        )
    ]
    if r.verdict is not None:
        parts.append(_verdict_html(r.verdict))
    parts.append(
        "<p>"
        + ", ".join(f"{html.escape(str(k))}: <code>{html.escape(str(v))}</code>" for k, v in r.config.items())
        + "</p>"
    )
    if r.missing:
        items = "".join(f"<li><b>{html.escape(m.stage)}</b>: {html.escape(m.reason)}</li>" for m in r.missing)
        parts.append(f"<div class='missing'><b>Partial report</b>, missing:<ul>{items}</ul></div>")
    if r.data is not None:
        parts.append("<h2>Data</h2>" + _key_value_table("item", r.data.to_json(), nested=False))
        if r.data.database is not None:
            parts.append(_key_value_table("database", r.data.database.to_json()))
    if r.thresholds:
        parts.append(
            "<p>Decision thresholds on the encoder's score, fixed on non-mated pairs of the dataset's clean "
            "embeddings: "
            + ", ".join(f"FMR {html.escape(k)}: <code>{v:.4f}</code>" for k, v in r.thresholds.items())
            + "</p>"
        )
    if r.protection is not None:
        centre = r.protection.protector.centre
        parts.append(
            f"<p>Protection under audit: <b>{html.escape(r.protection_label)}</b> "
            f"({html.escape(r.protection.protector.source)})" + (f"; {html.escape(centre)}" if centre else "") + ".</p>"
        )
    if r.transfer is not None:
        parts.append(
            f"<p>Transfer judge <code>{html.escape(r.transfer.encoder)}</code> (its own detection and alignment, "
            f"{r.transfer.photos} photos): thresholds "
            + ", ".join(f"FMR {html.escape(k)}: <code>{v:.4f}</code>" for k, v in r.transfer.thresholds.items())
            + "</p>"
        )
    if r.attacks:
        parts.append(
            "<h2>Irreversibility: identity inference from reconstructions</h2>"
            "<p>Type I: reconstruction vs the template's own photo; Type II: vs another photo of the same "
            "person (people with a single photo are skipped and counted). Thresholds fixed on clean data at "
            "the given false-match rate.</p>"
        )
        system = html.escape(str(r.config.get("encoder", "")))
        judge = r.transfer
        if judge is not None:
            parts.append(
                f"<p>Judged by the system encoder <code>{system}</code> (impersonation: would the system accept "
                f"the reconstruction?) and by the transfer judge <code>{html.escape(judge.encoder)}</code>, an "
                "encoder neither the attacker nor the protection touched (visual identity leakage: does the "
                "reconstruction look like the person to another face matcher?). The transfer judge's columns "
                "use its own thresholds; reconstructions are mapped into its chip frame first.</p>"
            )
        else:
            parts.append(f"<p>Judged by the system encoder <code>{system}</code> only (no transfer judge).</p>")
        transfer_header = (
            [f"Type I @FMR 0.1% ({judge.encoder})", f"Type II @FMR 0.1% ({judge.encoder})"] if judge else []
        )
        parts.append(
            _table(
                [
                    "attacker",
                    "templates",
                    "Type I @FMR 0.1%",
                    "Type II @FMR 0.1%",
                    "Type I @FMR 1%",
                    "Type II @FMR 1%",
                    *transfer_header,
                    "SSIM",
                    "PSNR (dB)",
                    "n",
                ],
                _attack_rows(r.attacks, judge is not None),
            )
        )
    if (r.layers is not None and r.layers.layers) or r.thief_without_keys is not None:
        parts.append(_layers_html(r.thief_without_keys, r.layers))
    if r.scenarios is not None:
        parts.append(_scenarios_html(r.scenarios))
    if r.encrypted_matching is not None:
        parts.append(_encrypted_matching_html(r.encrypted_matching))
    parts.append(_figure(figures, "grid", "image grid", "<h3>Reconstructions</h3>"))
    parts.append(_figure(figures, "gan", "GAN prior progress"))
    if r.verification is not None:
        parts.append("<h2>Performance preservation: verification</h2>")
        rows = [
            [
                html.escape(k),
                _fmt(v.accuracy_mean, True),
                _fmt(v.tar_at_far_1e_2, True),
                _fmt(v.tar_at_far_1e_3, True),
                str(v.mated_pairs),
                str(v.nonmated_pairs),
            ]
            for k, v in r.verification.by_templates.items()
        ]
        parts.append(
            _table(
                ["enrolled templates (probe: raw)", "accuracy", "TAR@FAR 1e-2", "TAR@FAR 1e-3", "mated", "non-mated"],
                rows,
            )
        )
    if r.utility is not None:
        parts.append(_utility_html(r.utility))
    parts.append(_figure(figures, "roc", "ROC and DET"))
    unl = r.unlinkability
    if unl is not None:
        parts.append(
            "<h2>Unlinkability and renewability</h2><p>D_sys (Gomez-Barrero et al.): 0 = unlinkable, "
            "1 = fully linkable; the noise floor is what histogram noise alone gives for these counts.</p>"
        )
        renewal = r.renewability.details if r.renewability is not None else {}
        settings = [(html.escape(k), v) for k, v in unl.details.items()]
        settings += [(f"renewability: {html.escape(k)}", v) for k, v in renewal.items()]
        rows = [
            [
                name,
                _fmt(v.d_sys),
                _fmt(v.noise_floor),
                str(v.n_mated),
                str(v.n_nonmated),
                str(v.bins) if v.bins is not None else "&ndash;",
                f"{v.score_range[0]:.3f} to {v.score_range[1]:.3f}" if v.score_range is not None else "&ndash;",
            ]
            for name, v in settings
        ]
        parts.append(_table(["databases", "D_sys", "noise floor", "people", "non-mated", "bins", "score range"], rows))
        across = unl.across_keys
        verdict = "meets" if unl.key_meets_target else "does not meet"
        parts.append(
            f"<p>AdvFace + key over {across.key_pairs} pairs of tenant keys: D_sys mean "
            f"{_fmt(across.mean)}, worst {_fmt(across.worst)} (noise floor "
            f"{_fmt(across.noise_floor_mean)}); the worst {verdict} the target "
            f"D_sys &le; {_fmt(unl.target_d_sys_max)}. {across.above_noise_p95} of "
            f"{across.key_pairs} read above the 95th percentile of D_sys for unlinkable scores "
            "at these counts (one in 20 would by chance).</p>"
        )
    renew = r.renewability
    sets = renew.largest_nonmatching_set if renew is not None else None
    if renew is not None and sets:
        parts.append(
            "<h3>Renewability (BTPBench): largest set of mutually non-matching templates</h3>"
            + _table(
                ["templates", "keys per person", "people", "worst person", "mean", "all keys non-matching"],
                [
                    [
                        html.escape(k),
                        str(m.keys),
                        str(m.people),
                        str(m.min),
                        f"{m.mean:.2f}",
                        _fmt(m.all_keys_fraction, True),
                    ]
                    for k, m in sets.items()
                ],
            )
            + f"<p class='note'>{html.escape(renew.largest_nonmatching_set_protocol or '')}</p>"
        )
    parts.append(_figure(figures, "d_curve", "D(s)"))
    parts.append(_figure(figures, "hist", "histograms", "<h3>Score histograms</h3>"))
    parts.append(
        f"<p style='color:#777;font-size:12px'>generated {html.escape(str(r.date or ''))} in "
        f"{_fmt(r.seconds)} s</p></body></html>"
    )
    return "".join(parts)


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def write_report(result: AuditResult, artifacts: ReportArtifacts, out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.json`` (``result.to_json()``) and ``report.html`` into ``out_dir``; a plot that fails is
    listed as missing."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, str] = {}
    originals = artifacts.grid_originals
    jobs = [
        ("roc", lambda: plot_roc_det(artifacts.verifications), bool(artifacts.verifications)),
        (
            "hist",
            lambda: plot_histograms(artifacts.verifications, artifacts.linkages),
            bool(artifacts.verifications or artifacts.linkages),
        ),
        ("d_curve", lambda: plot_d_curves(artifacts.linkages), bool(artifacts.linkages)),
        ("gan", lambda: plot_gan_history(artifacts.gan_history), bool(artifacts.gan_history)),
        (
            "grid",
            lambda: plot_grid(originals, artifacts.grid_rows) if originals is not None else "",
            originals is not None and bool(artifacts.grid_rows),
        ),
    ]
    for name, make, wanted in jobs:
        if not wanted:
            continue
        try:
            figures[name] = make()
        except Exception as exc:  # noqa: BLE001 - a plot must not lose the report
            result.add_missing(f"plot {name}", f"{type(exc).__name__}: {exc}")
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(result.to_json(), indent=2, default=_json_default, allow_nan=True) + "\n")
    html_path = out_dir / "report.html"
    html_path.write_text(render_html(result, figures), encoding="utf-8")
    return html_path, json_path
