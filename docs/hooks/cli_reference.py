"""An mkdocs hook: docs/cli.md's flag reference, generated from the `modelq` click commands.

The page holds a marker, `<!-- cli-reference -->`; at build time it is replaced by each
command's `--help` as click prints it, so every flag, default and choice on the page is the
command line's own. The worker side's commands (`modelq worker`, `modelq demo`) come from the
`modelq.commands` entry points of the installed project (`pip install -e .`); a build without
them lists the others. A CLI page without the marker fails the build.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

MARKER = "<!-- cli-reference -->"
PAGE = "cli.md"
ROOT = Path(__file__).resolve().parents[2]  # docs/hooks/ -> the repository root
WIDTH = 100


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """mkdocs calls this for every page; only the CLI page changes."""
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"docs/{PAGE} has lost its {MARKER} marker: the flag reference goes there")
    return markdown.replace(MARKER, cli_reference())


def cli_reference() -> str:
    """One section per command, `modelq NAME`, holding its help text."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import click

    from tasks.cli.main import main

    root = click.Context(main, info_name="modelq", terminal_width=WIDTH, max_content_width=WIDTH)
    sections = []
    for name in main.list_commands(root):
        command = main.get_command(root, name)
        if command is None or command.hidden:
            continue
        context = click.Context(command, info_name=name, parent=root, terminal_width=WIDTH,
                                max_content_width=WIDTH)
        sections.append(f"### `modelq {name}`\n\n```text\n{command.get_help(context).rstrip()}\n```\n")
    return "\n".join(sections)
