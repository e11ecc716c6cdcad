"""The docs stay navigable: a short README, links and code paths that exist, every page in the nav.

`.ci/run` builds the site with `mkdocs build --strict` (broken links and anchors inside docs/
fail there); these checks cover what that build does not see (the README, paths named in
backticks) and run in a fraction of a second with the rest of the suite.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tasks.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
MAX_README_LINES = 300
TEST_COMMAND = "python3 -m pytest -q -n 3 --dist worksteal"  # what .ci/run runs, as the README says

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
# A repository path named in prose or code: starts at a top-level folder, not inside another path
# or URL (`.bench/x`, `acme/tasks.py`, `https://host/schemas/x` are not the repository's).
TOP_FOLDERS = "schemas|tasks|worker|tests|bench|examples|deploy|requirements|docs"
CODE_PATH = re.compile(rf"(?<![\w/.~$-])((?:{TOP_FOLDERS})/[\w./*-]*[\w/*])")


def pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def nav_pages(node: Any) -> list[str]:
    """Every page file the nav of mkdocs.yml names, however deep its sections."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [page for item in node for page in nav_pages(item)]
    if isinstance(node, dict):
        return [page for value in node.values() for page in nav_pages(value)]
    return []


def relative_links(text: str) -> list[str]:
    """The targets of markdown links outside code blocks that point into this repository."""
    prose = FENCE.sub("", text)
    prose = re.sub(r"`[^`\n]*`", "", prose)
    targets = [match.group(1) for match in LINK.finditer(prose)]
    return [t for t in targets if not re.match(r"^([a-z][a-z0-9+.-]*:|#|/)", t, re.IGNORECASE)]


def load_hook(name: str = "settings_table") -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, DOCS / "hooks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_is_short_and_names_the_test_command_ci_runs() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines: move detail into docs/"
    assert TEST_COMMAND in lines, f"README.md must show CI's test command on its own line: {TEST_COMMAND}"
    assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


@pytest.mark.parametrize("doc", [README, *pages()], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_files_that_exist(doc: Path) -> None:
    broken = []
    for target in relative_links(doc.read_text(encoding="utf-8")):
        path = target.split("#", 1)[0]
        if path and not (doc.parent / path).exists():
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)} links to missing files: {broken}"


@pytest.mark.parametrize("doc", [README, *pages()], ids=lambda p: str(p.relative_to(ROOT)))
def test_repository_paths_named_exist(doc: Path) -> None:
    named = set(CODE_PATH.findall(doc.read_text(encoding="utf-8")))
    missing = sorted(p for p in named if not any(ROOT.glob(p.rstrip("/"))))  # a glob names one at least
    assert not missing, f"{doc.relative_to(ROOT)} names paths that do not exist: {missing}"


def test_every_page_is_in_the_nav_and_every_nav_entry_is_a_page() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    in_nav = nav_pages(config["nav"])
    on_disk = {str(p.relative_to(DOCS)) for p in pages()}
    assert sorted(on_disk - set(in_nav)) == [], "pages missing from mkdocs.yml's nav"
    assert sorted(set(in_nav) - on_disk) == [], "nav entries with no page under docs/"
    assert len(in_nav) == len(set(in_nav)), "a page listed twice in the nav"


def test_the_settings_table_lists_every_setting_with_its_docstring() -> None:
    hook = load_hook()
    table = hook.settings_table()
    rows = {line.split("|")[1].strip(" `"): line for line in table.splitlines()[2:]}
    expected = {f"MODELQ_{name.upper()}" for name in Settings.model_fields}
    assert set(rows) == expected
    assert "How long a finished job's record and events stay readable." in rows["MODELQ_RECORD_TTL_SECONDS"]
    assert "`604800` (1 week)" in rows["MODELQ_RECORD_TTL_SECONDS"]
    assert all(line.count("|") == 5 for line in rows.values()), "a docstring broke a table row"


def test_the_settings_page_keeps_the_marker_the_hook_replaces() -> None:
    hook = load_hook()
    markdown = (DOCS / "settings.md").read_text(encoding="utf-8")

    class Page:
        class file:  # noqa: N801 - the shape of mkdocs' Page.file
            src_uri = "settings.md"

    built = hook.on_page_markdown(markdown, Page(), None, None)
    assert hook.MARKER not in built
    assert "| `MODELQ_REDIS_URL` |" in built


def test_the_cli_reference_has_every_command_with_its_flags() -> None:
    import click

    from tasks.cli.main import main

    hook = load_hook("cli_reference")
    reference = hook.cli_reference()
    names = main.list_commands(click.Context(main))
    assert {"load", "run", "status", "worker"} <= set(names)
    for name in names:
        assert f"### `modelq {name}`" in reference
    assert "--max-memory DEV=SIZE" in reference and "--task-timeout FLOAT" in reference
    assert hook.MARKER in (DOCS / "cli.md").read_text(encoding="utf-8")
