"""`dropcli convert`: vanilla <-> inverted dropout, moving q into the next layer's weights."""

from __future__ import annotations

from typing import List, Optional

import typer

from dropcli.model import formats
from dropcli.cli.common import (Arch, Exclude, Imports, InputShape, Json, Layers, ModelArg, TrustPickle, handle_errors, log,
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
        from dropcli.api.models import check_convert_args, convert_sites, load, save

        check_convert_args(to, out_format)
        model_output(output, [model_path], force=force, json_out=json_out)
        model = load(model_path, trust_pickle=trust_pickle, imports=imports, arch=arch, input_shape=input_shape)
        rows = convert_sites(model, to, layers=layers, exclude=exclude, name=model_path)
        if not rows:
            log(f"every selected site already uses the {to} convention; writing an unchanged copy")
        written = save(model, output, out_format)
        if json_out:
            print_json({"input": model_path, "output": output, "format": written, "backend": model.backend, "converted": rows})
            return
        from rich.table import Table

        t = Table(title=f"convert to {to}: {len(rows)} site(s) -> {shown(output)} ({written})")
        for c in ("site", "weight", "p", "from", "to", "weight x"):
            t.add_column(c)
        for r in rows:
            t.add_row(r["site"], r["weight"], f"{r['p']:.4g}", r["from"], r["to"], f"{r['weight_factor']:.6g}")
        out.print(t)
