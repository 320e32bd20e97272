"""`dropcli inspect`: the layers (or nodes) of a model, its dropout, and its candidate sites."""

from __future__ import annotations

from typing import List, Optional

import typer

from dropcli.cli.common import Arch, Imports, InputShape, Json, ModelArg, TrustPickle, handle_errors, out, print_json


def register(app: typer.Typer) -> None:
    @app.command("inspect", help="""Show a model's layers: name, kind, output shape, parameters, dropout and candidate sites.

Examples:

  dropcli inspect examples/digits_mlp.pt

  dropcli inspect examples/digits_mlp.onnx --json | jq '.layers[] | select(.dropout)'
""")
    @handle_errors
    def inspect_cmd(
        model_path: str = ModelArg,
        json_out: bool = Json,
        trust_pickle: bool = TrustPickle,
        imports: Optional[List[str]] = Imports,
        arch: Optional[str] = Arch,
        input_shape: Optional[str] = InputShape,
    ) -> None:
        from dropcli.api.models import inspect

        info = inspect(model_path, trust_pickle=trust_pickle, imports=imports, arch=arch, input_shape=input_shape)
        if json_out:
            print_json(info)
            return
        from rich.table import Table

        facts = "".join(f", {k} {v:.6g}" if isinstance(v, float) else f", {k} {v}" for k, v in info["model_meta"].items())
        t = Table(title=f"{model_path}  ({info['backend']}, {info['format']}, {info['parameters']:,} parameters{facts})")
        for col in ("name", "kind", "op", "output shape", "params", "dropout", "sites"):
            t.add_column(col, justify="right" if col == "params" else "left")
        for l in info["layers"]:
            shape = "" if l["shape"] is None else "[" + ", ".join("N" if d is None else str(d) for d in l["shape"]) + "]"
            drop = "" if not l["dropout"] else (l["dropout"]["variant"] or "dropcli") + (
                "" if l["dropout"]["p"] is None else f" p={l['dropout']['p']:.4g}")
            if l.get("convention") in ("inverted", "vanilla"):
                drop += f" ({l['convention']})"
            sites = ",".join(l["sites"]) + (" (output)" if l["is_output"] else "")
            t.add_row(l["name"], l["kind"], l["op"], shape, f"{l['params']:,}" if l["params"] else "", drop, sites)
        out.print(t)
