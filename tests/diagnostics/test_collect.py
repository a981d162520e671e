import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from imbssl.diagnostics.aggregate import (
    aggregate,
    collect_main,
    collect_runs,
    find_run_dirs,
    paper_table,
    to_latex,
    write_results,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def multirun(tmp_path, minimal_run):
    """Hydra-like multirun folder: 2 methods x 2 gammas, stored and computed summaries."""
    root = tmp_path / "multirun" / "2024-01-01" / "12-00-00"
    jobs = [  # (algorithm, pseudo, gamma_l, seed, median_last20 or None)
        ("fixmatch", "none", 100, 0, 0.70), ("fixmatch", "none", 100, 1, 0.72),
        ("fixmatch", "none", 100, 2, 0.77), ("fixmatch", "daso", 100, 0, 0.80),
        ("fixmatch", "daso", 100, 1, 0.84), ("fixmatch", "none", 50, 0, 0.81),
        ("fixmatch", "daso", 50, 0, None)]
    for i, (algo, pseudo, gamma, seed, median) in enumerate(jobs):
        # 25 evaluations each (the median of the last 20 exists); the run without a summary:
        # median of the last 20 of 0.01..0.25 (0.06..0.25)
        top1 = [k / 100 for k in range(1, 26)] if median is None else [0.1] * 5 + [median] * 20
        minimal_run(root / str(i), algorithm=algo, pseudo=pseudo, gamma_l=gamma,
                    seed=seed, test_top1=top1, median_top1=median)
    (root / ".hydra").mkdir()
    (root / ".hydra" / "config.yaml").write_text("a: 1\n")
    (root / "multirun.yaml").write_text("a: 1\n")
    return root.parents[1]


def test_find_run_dirs(multirun):
    found = find_run_dirs([multirun])
    assert [p.name for p in found] == [str(i) for i in range(7)]
    assert find_run_dirs([found[0], found[1]]) == found[:2]
    with pytest.raises(FileNotFoundError):
        find_run_dirs([multirun / "nope"])


def test_mean_std_hand_computed(multirun):
    records = collect_runs([multirun])
    assert sorted(set(records["method"])) == ["fixmatch", "fixmatch+DASO"]
    stats = aggregate(records).set_index(["method", "gamma_l"])
    cell = stats.loc[("fixmatch", 100)]
    assert cell["mean"] == pytest.approx(73.0) and cell["n"] == 3
    assert cell["std"] == pytest.approx(math.sqrt((9 + 1 + 16) / 2))  # ddof=1: sqrt(13)
    daso = stats.loc[("fixmatch+DASO", 100)]
    assert daso["mean"] == pytest.approx(82.0) and daso["std"] == pytest.approx(2 * 2 ** 0.5)
    single = stats.loc[("fixmatch", 50)]
    assert single["mean"] == pytest.approx(81.0) and single["std"] == 0.0 and single["n"] == 1
    computed = stats.loc[("fixmatch+DASO", 50)]
    assert computed["mean"] == pytest.approx(15.5)  # median of 6..25 %, from metrics.jsonl


def test_paper_table_layout(multirun):
    stats = aggregate(collect_runs([multirun]))
    table = paper_table(stats)
    assert list(table.index) == ["fixmatch", "fixmatch+DASO"]
    assert list(table.columns) == ["gamma=50", "gamma=100"]  # gamma_u = gamma_l here
    assert table.loc["fixmatch", "gamma=100"] == "73.00 \u00b1 3.61 (n=3)"
    assert table.loc["fixmatch", "gamma=50"] == "81.00 \u00b1 0.00 (n=1)"
    tex = to_latex(stats, "cap_tion 100%")
    assert r"\textbf{82.00$\pm$2.83 (n=2)}" in tex and r"cap\_tion 100\%" in tex
    assert r"$\gamma{=}100$" in tex and tex.count(r"\\") == 3


def test_write_results_files(multirun, tmp_path):
    files = write_results([multirun], tmp_path / "res")
    names = {f.name for f in files}
    assert {"runs.csv", "table.csv", "table.md", "table.tex", "accuracy_vs_gamma.png",
            "accuracy_vs_gamma.svg"} <= names
    assert all(f.stat().st_size > 0 for f in files)
    md = (tmp_path / "res" / "table.md").read_text()
    assert "ddof=1" in md and "| fixmatch | " in md and "**82.00 \u00b1 2.83 (n=2)**" in md
    table = pd.read_csv(tmp_path / "res" / "table.csv")
    assert table["n"].sum() == 7
    assert len(pd.read_csv(tmp_path / "res" / "runs.csv")) == 7


def test_collect_cli(multirun, tmp_path, capsys):
    assert collect_main([str(multirun), "--out", str(tmp_path / "o")]) == 0
    assert "73.00" in capsys.readouterr().out
    assert collect_main([str(tmp_path / "o")]) == 2  # no runs below
    assert collect_main([str(multirun), "--out", str(tmp_path / "f"), "--stat", "final"]) == 0


def test_collect_script(multirun, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "analysis" / "collect_results.py"),
                           str(multirun), "--out", str(tmp_path / "s")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "s" / "table.tex").is_file()
