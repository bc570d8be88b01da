"""The README's layout section names every module of the four packages, and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mailroom", "web", "worker", "shared")


def _layout_section() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("Layout, top layer first")
    return readme[start : readme.index("- `tests/`", start)]


def test_the_layout_section_names_every_module_of_each_package() -> None:
    section = _layout_section()
    for package in PACKAGES:
        entry = re.search(rf"^- `{package}/`:(.*?)(?=^- `|\Z)", section, re.M | re.S)
        assert entry is not None, f"no entry for {package}/"
        named = set(re.findall(r"`([\w/]+\.py)`", entry.group(1)))
        modules = {
            path.relative_to(ROOT / package).as_posix()
            for path in (ROOT / package).rglob("*.py")
            if path.name != "__init__.py"
        }
        # A module in a sub-package may be named without its folder, within that folder's list.
        unnamed = {m for m in modules if m not in named and m.rsplit("/", 1)[-1] not in named}
        assert not unnamed, f"README's layout does not name {sorted(unnamed)} in {package}/"
        stale = {n for n in named if not any(m == n or m.endswith("/" + n) for m in modules)}
        assert not stale, f"README's layout names {sorted(stale)}, not in {package}/"
