"""Run the README's DASO plug-in example (section "## DASO in your own training loop"), in one
process and in two (gloo)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[2]
HEADING = "## DASO in your own training loop"
PYTHON_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def _section(text: str, heading: str) -> str | None:
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.strip() == heading:
            body = []
            fenced = False
            for rest in lines[i + 1:]:
                if rest.startswith("```"):
                    fenced = not fenced
                if not fenced and re.match(r"^#{1,2} ", rest):  # next section of same level
                    break
                body.append(rest)
            return "".join(body)
    return None


def example_source() -> tuple[str, str]:
    readme = ROOT / "README.md"
    section = _section(readme.read_text(encoding="utf-8"), HEADING)
    assert section is not None, f"README.md has no section {HEADING!r}"
    match = PYTHON_BLOCK.search(section)
    assert match, f"README section {HEADING!r} has no ```python block"
    return match.group(1), str(readme)


def test_readme_daso_example_runs():
    source, origin = example_source()
    code = compile(source, f"<python block of {origin}>", "exec")
    exec(code, {"__name__": "__readme_example__"})


WORKER = textwrap.dedent("""
    import sys

    import torch

    from imbssl.engine.distributed import init_group, shutdown

    rank, init, source, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    init_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    namespace = {"__name__": "__readme_example__"}
    exec(compile(open(source).read(), "<README example>", "exec"), namespace)
    daso = namespace["daso"]
    torch.save({"state": daso.state_dict(), "x_lb": namespace["x_lb"],
                "model": namespace["model"].state_dict()}, out)
    shutdown()
""")


@pytest.mark.slow  # subprocess / multi-process training: `pytest -m slow`
def test_readme_daso_example_under_two_processes(tmp_path):
    """Under 2 gloo processes that draw different batches (and train models that drift apart),
    both ranks end with the same queues and m_hat: those of the global batch."""
    source, _ = example_source()
    script = tmp_path / "example.py"
    script.write_text(source)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    outs = [tmp_path / f"rank{r}.pt" for r in range(2)]
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(r), str(tmp_path / "rdv"),
                                 str(script), str(outs[r])], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for r in range(2)]
    for w in workers:
        out, _ = w.communicate(timeout=300)
        assert w.returncode == 0, out[-4000:]
    r0, r1 = (torch.load(o, weights_only=True) for o in outs)
    assert not torch.equal(r0["x_lb"], r1["x_lb"])          # each rank had its own data
    assert any(not torch.equal(r0["model"][k], r1["model"][k]) for k in r0["model"])
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), key
    # 8 steps x 16 labeled images x 2 ranks, all queued (no class reaches queue_size=256)
    assert r0["state"]["queue_len"].sum().item() == 8 * 16 * 2
    assert r0["state"]["num_observed"].item() == 8
    assert not torch.equal(r0["state"]["m_hat"], torch.full((4,), 0.25))
