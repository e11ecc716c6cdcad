"""An mkdocs hook: docs/settings.md's table of settings, generated from `tasks.settings.Settings`.

The page holds a marker, `<!-- settings-table -->`; at build time it is replaced by one row per
field of `Settings`: its environment variable, type, default and the field's docstring. So the
table lists exactly what the code reads and cannot drift from it. A settings page without the
marker fails the build. tests/test_docs.py calls `settings_table` directly.
"""

from __future__ import annotations

import ast
import inspect
import sys
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin

MARKER = "<!-- settings-table -->"
PAGE = "settings.md"
ROOT = Path(__file__).resolve().parents[2]  # docs/hooks/ -> the repository root


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """mkdocs calls this for every page; only the settings page changes."""
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"docs/{PAGE} has lost its {MARKER} marker: the settings table goes there")
    return markdown.replace(MARKER, settings_table())


def settings_table() -> str:
    """The markdown table of every `Settings` field, in the order the class declares them."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tasks.settings import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    docs = field_docstrings(Settings)
    rows = ["| variable | type | default | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias if isinstance(field.validation_alias, str) else field.alias
        env = (alias or f"{prefix}{name}").upper()
        meaning = docs.get(name) or field.description or ""
        cells = (f"`{env}`", type_text(field), default_text(field), meaning)
        rows.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(rows)


def field_docstrings(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal right below it in the class body), as one line."""
    source = Path(inspect.getsourcefile(cls) or "").read_text(encoding="utf-8")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            body = node.body
            break
    else:
        return {}
    found: dict[str, str] = {}
    for statement, following in zip(body, body[1:], strict=False):
        if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            found[statement.target.id] = " ".join(inspect.cleandoc(following.value.value).split())
    return found


def type_text(field: Any) -> str:
    """The field's type as a reader of the environment sees it, with its bounds."""
    text = _type_name(field.annotation)
    bounds = []
    for item in field.metadata:
        for attribute, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            value = getattr(item, attribute, None)
            if value is not None:
                bounds.append(f"{sign} {value:,}" if isinstance(value, int) else f"{sign} {value}")
    return f"{text} ({', '.join(bounds)})" if bounds else text


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        kept = [arg for arg in get_args(annotation) if arg is not type(None)]
        return " or ".join(_type_name(arg) for arg in kept) + (", optional" if len(kept) < len(
            get_args(annotation)) else "")
    if origin in (tuple, list):
        return f"list of {_type_name(get_args(annotation)[0])}s"
    names = {"str": "string", "int": "integer", "float": "number", "bool": "boolean",
             "Path": "path", "SecretStr": "secret string"}
    name = getattr(annotation, "__name__", str(annotation))
    return names.get(name, name)


def default_text(field: Any) -> str:
    """The default as it would be written in the environment; a computed one by what computes it."""
    if field.default_factory is not None:
        doc = inspect.getdoc(field.default_factory) or ""
        return doc.split("\n\n")[0].replace("\n", " ").rstrip(".") or "computed at start"
    value = field.default
    if value is None or value == "" or value == ():
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int) and value >= 10_000:
        return f"`{value}` ({_readable(value)})"
    return f"`{value}`"


def _readable(value: int) -> str:
    for unit, size in (("week", 7 * 86400), ("day", 86400)):
        if value % size == 0 and value // size <= 4:
            count = value // size
            return f"{count} {unit}" + ("s" if count > 1 else "")
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if value >= 1 << shift:
            return f"{value / (1 << shift):g} {unit}"
    return f"{value:,}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
