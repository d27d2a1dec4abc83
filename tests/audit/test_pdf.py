"""``advface audit --pdf`` (advface.audit.pdf): report.pdf opens with the verdict; needs the pdf extra (fpdf2, also in
the test extra that CI installs), so the test skips only where fpdf2 is not installed."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest

from advface.audit.config import AuditConfig
from advface.audit.results import (
    AuditResult,
    DecoderAttackResult,
    FullDisclosureResult,
    JudgedTemplates,
    KnownPairsPoint,
    ReconstructionResult,
    ScenariosResult,
    SuccessAtFmr,
)
from advface.audit.stages.verdict import build_verdict


def _attack(kind: str, protected: float) -> DecoderAttackResult:
    def rec(rate: float) -> ReconstructionResult:
        at = {label: SuccessAtFmr(rate, None, 0.5, 20.0, 0.6, 10) for label in ("1e-3", "1e-2")}
        return ReconstructionResult(10, 0, 10, 0.5, 20.0, 0.5, at)

    kinds = {"raw": rec(0.9), "protected": rec(protected), "protected+key": rec(0.0)}
    return DecoderAttackResult(kind=kind, by_templates=kinds, arch="deconv", loss="pixel", cached=False, trained_on="x")


def _page_text(pdf: bytes) -> str:
    """The text drawn on the pages (fpdf2 compresses each page's content stream with zlib)."""
    text = []
    start = 0
    while (i := pdf.find(b"stream\n", start)) >= 0:
        end = pdf.find(b"endstream", i)
        chunk = pdf[i + 7 : end]
        try:
            text.append(zlib.decompress(chunk).decode("latin-1"))
        except zlib.error:
            text.append(chunk.decode("latin-1"))
        start = end
    return "".join(text)


def test_pdf_opens_with_the_verdict(tmp_path: Path) -> None:
    pytest.importorskip("fpdf")
    from advface.audit.pdf import write_pdf

    result = AuditResult(config={"encoder": "dlib"}, date="2026-01-01 00:00 UTC")
    result.attacks = {"deconv": _attack("decoder", 0.02), "adaptive": _attack("adaptive", 0.3)}
    judged = JudgedTemplates(0.25)
    result.scenarios = ScenariosResult(
        "protected",
        "pool of 10",
        FullDisclosureResult("every key", 10, judged, "adaptive", 0.3, None),
        [KnownPairsPoint(1, JudgedTemplates(0.0), 1.0), KnownPairsPoint(4, judged, 0.5)],
        keyed=ScenariosResult("protected+key", "pool of 10, keyed", known_pairs=[KnownPairsPoint(64, judged, 0.1)]),
    )
    result.verdict = build_verdict(result, 0.05, store_audited=False)
    path = write_pdf(result, tmp_path / "report.pdf")
    data = path.read_bytes()
    assert data.startswith(b"%PDF") and data.rstrip().endswith(b"%%EOF")
    text = _page_text(data)
    assert text.index("Verdict") < text.index("Scenarios") < text.index("Irreversibility")
    assert "NOT MET" in text and "full disclosure" in text and "k = 4" in text
    # the scenarios under the keyed transform follow those on the protected templates (PDF strings escape "(")
    protected, keyed = r"known pairs \(protected\)", r"known pairs \(protected+key\)"
    assert text.index(protected) < text.index(keyed) and "k = 64" in text


def test_pdf_flag_needs_fpdf2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without fpdf2, ``--pdf`` is a clear error before the audit starts."""
    import builtins

    from advface.errors import ConfigError

    real_import = builtins.__import__

    def no_fpdf(name: str, *args: object, **kwargs: object) -> object:
        if name == "fpdf":
            raise ImportError("no fpdf")
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_fpdf)
    with pytest.raises(ConfigError, match="advface\\[pdf\\]"):
        AuditConfig(data=tmp_path, out=tmp_path / "o", pdf=True).check()
