"""Output helpers shared by the commands: JSON on stdout, the merge method table."""

from __future__ import annotations

import sys

__all__ = ["print_json", "print_methods"]


def print_json(obj: object) -> None:
    """``obj`` as indented JSON on stdout (the ``--json`` output of every command)."""
    import json

    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def print_methods(table: list[dict]) -> None:
    """One rich table per merge method: its kind, reference and parameters (``--list``)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for row in table:
        kind = row["kind"] + (f", {row['data']} data" if row.get("data", "none") != "none" else "")
        t = Table(
            title=f"[bold]{row['name']}[/] ({kind}) — {row['pretty_name']}",
            caption=row["reference"],
            title_justify="left",
            caption_justify="left",
        )
        for col in ("parameter", "scope", "default", "description"):
            t.add_column(col)
        for p in row["params"]:
            default = "required" if p["required"] else repr(p["default"])
            t.add_row(p["name"], p["scope"], default, p["description"])
        console.print(t)
