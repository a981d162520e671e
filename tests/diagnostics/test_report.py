import re

import pytest

from imbssl.diagnostics.plots import make_plots
from imbssl.diagnostics.report import build_report, report_main

EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//"""
                      r"""|url\(\s*["']?(?:https?:)?//|@import""", re.IGNORECASE)


def _check_html(path):
    text = path.read_text(encoding="utf-8")
    assert "<img" in text or "<svg" in text
    assert not EXTERNAL.search(text), "external resource in the report"
    return text


def _check_md(path):
    text = path.read_text(encoding="utf-8")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links and all((path.parent / link).is_file() for link in links)
    assert not any(link.startswith("/") for link in links)
    return text


def test_report_one_run(tmp_path, make_run):
    run = make_run("a", pseudo="daso")
    html_path, md_path = build_report([run], tmp_path / "out" / "report")
    assert html_path == tmp_path / "out" / "report.html" and md_path.suffix == ".md"
    html = _check_html(html_path)
    assert "fixmatch" in html and "airplane" in html
    # 10 evaluations: the table names the median's k and shows why it has no value
    assert "median_last20" in html and "(10 &lt; 20)" in html
    md = _check_md(md_path)
    assert "| class | labeled |" in md and "## Result" in md


def test_report_several_runs_with_one_stopped_early(tmp_path, make_run):
    runs = [make_run("a"), make_run("b", pseudo="daso"),
            make_run("c", pseudo="daso", seed=1, stop_at=200)]
    html_path, md_path = build_report(runs, tmp_path / "cmp.html")
    html = _check_html(html_path)
    assert html_path.name == "cmp.html"
    assert html.count("<h2>Run: ") == 3
    assert "incomplete" in html and "finished" in html
    assert "fixmatch+DASO seed 1" in html
    _check_md(md_path)


def test_report_stopped_run_alone(tmp_path, make_run):
    run = make_run("s", stop_at=100)
    (run / "confusion_test.npy").unlink()
    html_path, md_path = build_report([run], tmp_path / "r")
    assert "no summary.json" in _check_html(html_path)
    _check_md(md_path)


def test_report_run_with_config_only(tmp_path, make_run):
    run = make_run("empty", stop_at=0)
    for name in ("metrics.jsonl", "per_class.csv", "confusion_test.npy"):
        (run / name).unlink(missing_ok=True)
    html_path, _ = build_report([run], tmp_path / "r")
    assert "No per-class rows yet." in html_path.read_text()


def test_report_cli(tmp_path, make_run, capsys, monkeypatch):
    run = make_run("a")
    assert report_main([str(run)]) == 0
    out = capsys.readouterr().out.split()
    assert out == [str(run / "report.html"), str(run / "report.md"), str(run / "report_files")]
    monkeypatch.chdir(tmp_path)
    assert report_main([str(tmp_path / "missing"), str(run)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not a run folder" in err
    assert not (tmp_path / "report.html").exists()
    with pytest.raises(ValueError):
        build_report([tmp_path], tmp_path / "x")


def test_make_plots_write_png_and_svg(tmp_path, make_run):
    runs = [make_run("a"), make_run("b", pseudo="daso", stop_at=300)]
    files = make_plots(runs, tmp_path / "plots")
    names = {f.name for f in files}
    for stem in ("accuracy", "per_class_test", "per_class_pseudo",
                 "run0_pseudo_recall_heatmap", "run1_confusion_test"):
        assert {f"{stem}.png", f"{stem}.svg"} <= names
    assert all(f.is_file() and f.stat().st_size > 0 for f in files)
    assert (tmp_path / "plots" / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
