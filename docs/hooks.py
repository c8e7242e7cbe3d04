"""MkDocs hooks (registered in mkdocs.yml): the command pages' flag tables, built from prodfuse's own argparse
parsers at build time, so a page cannot list a flag the code lacks or miss one it has.

In a page, ``<!-- flags: train -->`` becomes the table of every flag of ``prodfuse train`` (grouped as its
``--help`` groups them), and ``<!-- include: CHANGELOG.md -->`` the text of that file (relative to the repository
root). tests/test_docs.py uses the same functions to check every command's page.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAGS_MARKER = re.compile(r"<!-- flags: ([a-z_]+) -->")
INCLUDE_MARKER = re.compile(r"<!-- include: ([\w./-]+) -->")


@functools.cache
def command_parsers() -> dict[str, argparse.ArgumentParser]:
    """{command: its argparse parser}, from this checkout's prodfuse.cli (building it loads no TensorFlow)."""
    src = str(ROOT / "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    from prodfuse.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def documented_actions(parser: argparse.ArgumentParser) -> list[tuple[str, list[argparse.Action]]]:
    """[(group title, its flags)] in --help's order, without -h/--help and empty groups."""
    out = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
        if actions:
            out.append((group.title, actions))
    return out


def _escape(text: str) -> str:
    return text.replace("|", r"\|").replace("<", "&lt;").replace(">", "&gt;")


def _flag_cell(action: argparse.Action) -> str:
    takes_value = action.nargs != 0
    if not takes_value:
        return ", ".join(f"`{s}`" for s in action.option_strings)
    metavar = action.metavar or action.dest.upper()
    if action.choices:
        metavar = "{" + ",".join(str(c) for c in action.choices) + "}"
    return ", ".join(f"`{s} {metavar}`" for s in action.option_strings)


def _help_cell(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    text = parser._get_formatter()._expand_help(action) if action.help else ""
    extra = []
    if action.required:
        extra.append("required")
    default = action.default
    shown = default not in (None, False, True, argparse.SUPPRESS) and not isinstance(default, list)
    if shown and "default" not in text.lower():
        extra.append(f"default `{default}`")
    cell = _escape(text)
    if extra:
        said = "; ".join(extra)
        cell = f"{cell} ({said})" if cell else said[:1].upper() + said[1:]
    return cell or " "


def flag_table(command: str) -> str:
    """The markdown tables of one command's flags."""
    parsers = command_parsers()
    if command not in parsers:
        raise ValueError(f"<!-- flags: {command} -->: no such prodfuse command; commands are {sorted(parsers)}")
    parser = parsers[command]
    parts = []
    for title, actions in documented_actions(parser):
        rows = [f"| {_flag_cell(a)} | {_help_cell(parser, a)} |" for a in actions]
        table = "| flag | what it does |\n|---|---|\n" + "\n".join(rows)
        # The command's own flags come first, under the page's heading; other groups get theirs (e.g. "Output").
        parts.append(table if title == "options" else f"**{_escape(title[:1].upper() + title[1:])}**\n\n{table}")
    # Mutually exclusive groups (e.g. predict's --catalog | --embeddings) are said once, below the tables.
    for group in parser._mutually_exclusive_groups:
        flags = " or ".join(f"`{a.option_strings[0]}`" for a in group._group_actions)
        parts.append(f"{'Exactly' if group.required else 'At most'} one of {flags}.")
    return "\n\n".join(parts)


def render(markdown: str) -> str:
    """A page's markdown with its markers replaced."""
    markdown = FLAGS_MARKER.sub(lambda m: flag_table(m.group(1)), markdown)
    return INCLUDE_MARKER.sub(lambda m: (ROOT / m.group(1)).read_text(encoding="utf-8"), markdown)


def on_page_markdown(markdown, page, config, files, **kwargs):
    return render(markdown)


SUSPECT_PHOTO = re.compile(r'<img src="label-audit/(\d+)\.jpg"')
FASHION_IMAGES = ROOT.parent / "shared" / "data" / "fashion" / "images"


def on_post_build(config, **kwargs):
    """The label-audit report's thumbnails, drawn from ../shared at build time: the photos stay out of the project."""
    page = (ROOT / "docs" / "reports" / "label-audit.md").read_text(encoding="utf-8")
    out = Path(config["site_dir"]) / "reports" / "label-audit"
    for product_id in SUSPECT_PHOTO.findall(page):
        source = FASHION_IMAGES / f"{product_id}.jpg"
        if source.is_file():
            out.mkdir(parents=True, exist_ok=True)
            (out / source.name).write_bytes(source.read_bytes())
