"""gpu_validate.json and gpu_validate.md."""
from __future__ import annotations

import json

from imbssl.bench.validate.common import Context


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def write_results(ctx: Context, results: dict) -> None:
    ctx.out.mkdir(parents=True, exist_ok=True)
    (ctx.out / "gpu_validate.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (ctx.out / "gpu_validate.md").write_text(markdown(results))


def commit_line(env: dict) -> str:
    """The commit that ran: this tree's, else the one recorded when .device/ was prepared."""
    source = env if env.get("git_commit", "unknown") != "unknown" else env.get(
        "commit_at_prep", {})
    text = source.get("git_commit", "unknown")[:12] + (" + uncommitted changes" if source.get(
        "git_dirty") else "")
    return text + (" (at --prep)" if source is not env else "")


def markdown(results: dict) -> str:
    env, items = results["environment"], results["items"]
    lines = [f"# GPU validation ({results['mode']})", "",
             f"{results['started']}, device {env['device']}, torch {env['torch']} (CUDA "
             f"{env.get('cuda')}), commit {commit_line(env)}"
             + f"; {results.get('seconds', 0):.0f} s of a {results['budget_s']:.0f} s budget.",
             "", "| item | status | detail |", "|---|---|---|"]
    for name, item in items.items():
        detail = item.get("error") or item.get("reason") or ""
        lines.append(f"| {name} | {item['status']} | {str(detail).replace('|', '/')} |")
    bench = items.get("bench", {})
    for precision, table in bench.get("tables", {}).items():
        lines += ["", f"## bench, {precision}", "", table]
    if bench.get("note"):
        lines += ["", bench["note"]]
    smoke = items.get("smoke", {})
    if smoke.get("cases"):
        lines += ["", "## smoke runs", "", "| case | compile | status | s | train rows | "
                  "precision | channels_last | fused SGD | data | sync | problem |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in smoke["cases"]:
            p = c.get("paths", {})
            sync = c.get("sync", {}).get("status", "-")
            lines.append(f"| {c['case']} | {'on' if c['compile'] else 'off'} | {c['status']} | "
                         f"{c.get('run_s', 0):.1f} | {c.get('train_rows', '-')} | "
                         f"{p.get('precision', '-')} | {p.get('channels_last', '-')} | "
                         f"{p.get('fused_sgd', '-')} | {p.get('data_device', '-')} | {sync} | "
                         f"{str(c.get('error', '')).replace('|', '/')} |")
    sync = items.get("sync", {})
    if sync.get("sync_sites"):
        lines += ["", "## host syncs found", ""] + [f"- {k}: {v}" for k, v in
                                                    sync["sync_sites"].items()]
    train = items.get("train", {})
    if "curve" in train:
        lines += ["", "## training run", "",
                  f"`imbssl train {' '.join(train['overrides'])}`: {train['steps']} iterations "
                  f"in {train['wall_s']:.0f} s (startup and compilation included; the device was "
                  "shared with the smoke runs), "
                  f"stopped at the deadline: {train['stopped_at_deadline']}.", "",
                  "| step | test top-1 | test balanced acc | valid top-1 |", "|---|---|---|---|"]
        for e in train["curve"]["evaluations"]:
            lines.append(f"| {e['step']} | {_pct(e.get('test_top1'))} | "
                         f"{_pct(e.get('test_balanced_acc'))} | {_pct(e.get('valid_top1'))} |")
    aug = items.get("aug", {})
    if "strong_fraction_differing" in aug:
        lines += ["", "## augmentation, CUDA vs CPU", "",
                  f"weak bitwise equal: {aug['weak_bitwise_equal']}; strong: "
                  f"{aug['strong_pixels_differing']} pixels differ "
                  f"({aug['strong_fraction_differing']:.2e} of all, tolerance "
                  f"{aug['tolerance_fraction']:.0e}), max |diff| {aug['strong_max_abs_diff']}, "
                  f"in {aug['images_differing']} images (their ops: "
                  f"{aug['ops_in_differing_images']}); normalize max |diff| "
                  f"{aug['normalize_max_abs_diff']:.2e}."]
    if results.get("skipped"):
        lines += ["", "## skipped", ""] + [f"- {s}" for s in results["skipped"]]
    return "\n".join(lines) + "\n"
