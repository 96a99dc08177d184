"""Reports: the verdict first, readable at 100 classes, class names the plot font lacks, the alignment caveat,
and a record of another key refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from radioactive.detection import DetectionResult
from radioactive.detection.audit import AuditResult, holm
from radioactive.detection.result import GradientDetails, WhiteBoxDetails
from radioactive.errors import RadioactiveError
from radioactive.report import LABELLED_CLASSES, audit_html, cosine_figure, drawable_label, html_report


def _result(k: int, names=None, details=None, method="gradient", lp=-3.0) -> DetectionResult:
    rng = np.random.default_rng(0)
    cos = rng.uniform(-0.1, 0.3, k)
    return DetectionResult(method=method, validity="exact", log10_pvalue=lp, alpha=1e-3,
                           classes=names or [f"class{i}" for i in range(k)], class_log10_pvalues=[-0.5] * k,
                           cosines=cos.tolist(), dim=512, key_fingerprint="abc",
                           details=details or GradientDetails(temperature=2.0))


class TestLabels:
    def test_latin_names_are_kept(self):
        assert drawable_label("airplane", 3) == "airplane"

    def test_names_without_glyphs_fall_back_to_the_index(self):
        assert drawable_label("飞机", 0) == "#0"  # the default font has no CJK glyphs: no boxes on the plot

    def test_at_100_classes_only_the_strongest_are_named(self):
        res = _result(100)
        fig = cosine_figure(res)
        texts = [t.get_text() for t in fig.axes[0].texts]
        named = [t for t in texts if t.startswith("class")]
        assert len(named) == LABELLED_CLASSES < 100
        top = {res.classes[i] for i in np.argsort(-np.asarray(res.cosines))[:LABELLED_CLASSES]}
        assert set(named) == top

    def test_non_latin_names_in_the_html_table(self, tmp_path):
        names = ["飞机", "Автомобиль"] + [f"c{i}" for i in range(8)]
        path = html_report(_result(10, names), tmp_path / "r.html")
        text = path.read_text(encoding="utf-8")
        assert "飞机" in text and "Автомобиль" in text and "charset='utf-8'" in text


class TestHtml:
    def test_verdict_comes_first(self, tmp_path):
        text = html_report(_result(10), tmp_path / "r.html").read_text()
        body = text[text.index("<body>"):]
        assert body.index("class='verdict'") < body.index("<ul>") < body.index("<img")

    def test_alignment_caveat_shown(self, tmp_path):
        weak = WhiteBoxDetails(alignment_r2=0.9, alignment_r2_heldout=0.3, num_alignment_images=2000,
                               alignment_caveat="the alignment explains only 0.30")
        text = html_report(_result(10, details=weak, method="white-box"), tmp_path / "r.html").read_text()
        assert "Caveat" in text and "0.30" in text and "0.300 on held-out images" in text
        strong = WhiteBoxDetails(alignment_r2=0.99, alignment_r2_heldout=0.98, num_alignment_images=2000)
        assert "Caveat" not in html_report(_result(10, details=strong, method="white-box"),
                                          tmp_path / "s.html").read_text()

    def test_record_of_another_key_refused(self, tmp_path):
        record = tmp_path / "record.jsonl"
        record.write_text(json.dumps({"kind": "radioactive-record", "schema": 1, "source": str(tmp_path),
                                      "output": str(tmp_path), "key_fingerprint": "another"}) + "\n")
        with pytest.raises(RadioactiveError, match="another"):
            html_report(_result(10), tmp_path / "r.html", record)
        assert not (tmp_path / "r.html").exists()

    def test_audit_page_verdict_table_and_not_run(self, tmp_path):
        tests = [_result(10, lp=-5.0), _result(10, method="white-box", lp=-1.0, details=WhiteBoxDetails())]
        adjusted = holm([t.log10_pvalue for t in tests])
        audit = AuditResult(alpha=1e-3, log10_pvalue=float(adjusted.min()), tests=tests,
                            adjusted_log10_pvalues={t.method: float(a) for t, a in zip(tests, adjusted)},
                            not_run={"black-box": "the record has no holdout images"}, access="weights")
        text = audit_html(audit, tmp_path / "a.html").read_text()
        body = text[text.index("<body>"):]
        assert body.index("DETECTED") < body.index("<table>")
        assert "Holm" in text and "the record has no holdout images" in text
        assert audit.detected and audit.log10_pvalue == pytest.approx(-5.0 + np.log10(2))
