"""`dropcli variants`: the catalogue."""

from __future__ import annotations

import typer

from dropcli.cli.common import Json, handle_errors, out, print_json


def register(app: typer.Typer) -> None:
    @app.command("variants", help="""List every dropout variant: formula, test rule, where it attaches, parameters, paper.

p is the DROP probability; q = 1 - p is the keep probability.

Examples:

  dropcli variants

  dropcli variants --json | jq -r '.[].name'
""")
    @handle_errors
    def variants_cmd(json_out: bool = Json) -> None:
        from dropcli.api.models import variants

        specs = variants()
        if json_out:
            print_json(specs)
            return
        from rich.table import Table

        t = Table(title="dropcli variants (p = drop probability, q = 1 - p)", show_lines=True)
        for col in ("name", "train rule", "test rule", "attaches", "parameters", "paper"):
            t.add_column(col)
        for s in specs:
            params = ", ".join(f"{p['flag']}={p['default']}" for p in s["parameters"])
            where = s["attaches"] + (f" (rank {'/'.join(map(str, s['ranks']))})" if s["ranks"] else "")
            if s["replaces"]:
                where = f"replaces {', '.join(s['replaces'])}" + (f" (+ {', '.join(s['absorbs'])} after it)" if s["absorbs"] else "")
            t.add_row(s["name"], s["formula"], s["test_rule"], where, params, s["paper"])
        out.print(t)
