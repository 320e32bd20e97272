"""`dropcli convert`: vanilla <-> inverted dropout, moving q into the next layer's weights."""

from __future__ import annotations

from typing import List, Optional

import typer
from rich.table import Table

from dropcli.model import formats
from dropcli.errors import DropcliError, UsageError
from dropcli.cli.common import (Arch, Exclude, Imports, InputShape, Json, Layers, ModelArg, TrustPickle, handle_errors, load_opts, log,
                     model_output, out, print_json, shown)

HELP = """Convert dropout sites between the inverted and the vanilla convention.

inverted: y = x*m/q in training (MC), identity at test (PyTorch, Keras, ONNX).
vanilla:  y = x*m in training, y = q*x at test.
(p is the DROP probability, q = 1 - p the keep probability, m ~ Bernoulli(q).)

The keep probability q moves between the site and the weight of the Linear/Conv/Gemm/MatMul
layer after it (W/q going to vanilla, q*W going to inverted), so the deterministic output and
the MC distribution stay the same. Only reshapes and max pooling may sit between the two;
any other op (an activation, a norm) is refused and named. Works on dropcli's standard and
vanilla sites, nn.Dropout / dropout calls (torch) and ONNX Dropout nodes. `dropcli inspect`
shows each site's convention.

Examples:

  dropcli convert examples/digits_mlp.pt --to vanilla -o mlp_vanilla.pt

  dropcli convert mlp_vanilla.pt --to inverted -o mlp_inverted.pt

  dropcli convert model.onnx --to vanilla --layers 'dropout*' -o model_vanilla.onnx

Exit codes: 0 ok, 1 error (e.g. a nonlinearity after a site), 2 usage error, 130 interrupted.
"""


def register(app: typer.Typer) -> None:
    @app.command("convert", help=HELP)
    @handle_errors
    def convert_cmd(
        model_path: str = ModelArg,
        to: str = typer.Option(..., "--to", help="Target convention: inverted or vanilla."),
        output: str = typer.Option(..., "-o", "--output", help="Output model path (written atomically; - = stdout)."),
        layers: Optional[List[str]] = Layers,
        exclude: Optional[List[str]] = Exclude,
        out_format: Optional[str] = typer.Option(None, "--format", help=f"Output format: {', '.join(formats.ALL)} (default: the input's)."),
        force: bool = typer.Option(False, "--force", help="Allow -o to be the input path (overwrites it)."),
        json_out: bool = Json,
        trust_pickle: bool = TrustPickle,
        imports: Optional[List[str]] = Imports,
        arch: Optional[str] = Arch,
        input_shape: Optional[str] = InputShape,
    ) -> None:
        from dropcli.backends import load_model
        from dropcli.backends.convert import apply_onnx, apply_torch, plan_onnx, plan_torch
        from dropcli.backends.plan import plan_existing
        from dropcli.model.selection import Selection

        if to not in ("inverted", "vanilla"):
            raise UsageError(f"unknown --to {to!r}", "choose inverted or vanilla")
        if out_format is not None and out_format not in formats.ALL:
            raise UsageError(f"unknown --format {out_format!r}", f"choose one of {', '.join(formats.ALL)}")
        model_output(output, [model_path], force=force, json_out=json_out)
        model = load_model(model_path, **load_opts(trust_pickle, imports, arch, input_shape))
        sel = Selection.from_options(None, layers, exclude, True)
        try:
            drops = plan_existing(model, sel)
        except UsageError as e:
            raise DropcliError(f"{model_path} has no dropout sites to convert", "`dropcli inspect` shows what is there") from e
        if model.backend == "onnx":
            plans = plan_onnx(model, drops, to)
            done = apply_onnx(model, plans)
        else:
            plans = plan_torch(model, drops, to)
            done = apply_torch(model, plans)
        if not done:
            log(f"every selected site already uses the {to} convention; writing an unchanged copy")
        written = model.save(output, out_format)
        rows = [{"site": d.site, "weight": d.layer, "p": d.p, "from": d.frm, "to": d.to, "weight_factor": d.factor} for d in done]
        if json_out:
            print_json({"input": model_path, "output": output, "format": written, "backend": model.backend, "converted": rows})
            return
        t = Table(title=f"convert to {to}: {len(rows)} site(s) -> {shown(output)} ({written})")
        for c in ("site", "weight", "p", "from", "to", "weight x"):
            t.add_column(c)
        for r in rows:
            t.add_row(r["site"], r["weight"], f"{r['p']:.4g}", r["from"], r["to"], f"{r['weight_factor']:.6g}")
        out.print(t)
