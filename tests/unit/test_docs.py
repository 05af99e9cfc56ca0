"""The README stays a front page: about 150 lines, the two commands first, and a layout that
names every module of the package, each layer's modules in its row (a new module without
a mention there fails here)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_readme_starts_with_the_two_commands() -> None:
    commands = re.findall(r"(?m)^    make (\w+)", README[:600])
    assert commands == ["nightly", "test"]


def test_readme_is_a_front_page() -> None:
    assert len(README.splitlines()) <= 170


def test_layout_names_every_module() -> None:
    layout = README[README.index("## Layout"):]
    layout = layout[:layout.index("\n## ", 1)]
    missing = []
    for path in sorted((ROOT / "harness").rglob("*.py")):
        rel = path.relative_to(ROOT)
        if path.name in ("__init__.py", "__main__.py") or "_shipped" in rel.parts:
            continue
        if len(rel.parts) > 2:  # a layer's module (or sub-package): named in its layer's row
            layer = f"`harness/{rel.parts[1]}/`"
            part = f"`{path.stem}`" if len(rel.parts) == 3 else f"`{rel.parts[2]}/`"
            rows = [line for line in layout.splitlines() if layer in line]
            if not any(part in row for row in rows) and f"`{rel.parent}/`" not in layout:
                missing.append(str(rel))
            continue
        if f"`{rel}`" not in layout:
            missing.append(str(rel))
    assert missing == [], f"README's layout does not name {missing}"


def test_docs_links_resolve() -> None:
    for text, base in [(README, ROOT)] + [(p.read_text(), p.parent) for p in (ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            assert (base / target).exists(), f"broken link {target}"
