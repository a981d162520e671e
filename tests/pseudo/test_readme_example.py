"""Run the README's DASO plug-in example (section "## DASO in your own training loop")."""
from __future__ import annotations

import re
from pathlib import Path

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
