"""`dropcli inject`: insert dropout variants after chosen layers, or swap/remove existing dropout."""

from __future__ import annotations

from typing import List, Optional

import typer

from dropcli.model import formats
from dropcli.cli.common import (
    After, AllowOutput, Arch, Exclude, Imports, InputShape, Json, Layers, ModelArg, TrustPickle,
    handle_errors, log, model_output, out, print_json, shown,
)

HELP = """Insert a dropout variant after chosen layers, or --replace / --remove the dropout already there.

p is the DROP probability (keep q = 1 - p). The output keeps the input's format unless --format
says otherwise, and behaves exactly like the original until MC mode is switched on: in torch
outputs set the `dropcli_mc` buffers to True; in ONNX outputs feed the bool input `dropcli_mc`.

Examples:

  dropcli inject model.pt --variant standard --p 0.2 --after relu -o model_mc.pt

  dropcli inject model.onnx --variant spatial --p 0.1 --after conv --exclude 'head.*' -o out.onnx

  dropcli inject model.pt2 --variant gaussian --p 0.3 --replace -o out.pt2

  dropcli inject model.pt --remove -o no_dropout.pt

  dropcli inject resnet.pt2 --variant droppath --p 0.1 -o out.pt2      (finds the residual adds)

  dropcli inject convnet.onnx --variant cutout --hole-size 8 -o out.onnx   (input level)
"""


def register(app: typer.Typer) -> None:
    @app.command("inject", help=HELP)
    @handle_errors
    def inject_cmd(
        model_path: str = ModelArg,
        output: str = typer.Option(..., "-o", "--output", help="Output model path (written atomically; - = stdout)."),
        variant: str = typer.Option("standard", "--variant", "-v", help="Variant name (see `dropcli variants`)."),
        p: Optional[float] = typer.Option(None, "--p", help="Drop probability in [0, 1)."),
        block_size: Optional[int] = typer.Option(None, "--block-size", help="dropblock: block side b (default 7)."),
        hole_size: Optional[int] = typer.Option(None, "--hole-size", help="cutout: hole side L in pixels (default 16)."),
        holes: Optional[int] = typer.Option(None, "--holes", help="cutout: number of holes (default 1)."),
        mask_per: Optional[str] = typer.Option(None, "--mask-per", help="recurrent: a new candidate mask every 'step' (default) or one per 'sequence'; weightdrop: a weight mask per batch 'row' (default) or one per forward 'pass'."),
        weight: Optional[str] = typer.Option(None, "--weight", help="weightdrop: the weight to mask: 'hh' (W_hh, default), 'ih' or 'both'."),
        tie: Optional[str] = typer.Option(None, "--tie", help="variational: one mask for all gates ('tied', default) or one per gate ('untied')."),
        p_input: Optional[float] = typer.Option(None, "--p-input", help="variational: drop probability of x_t (default: --p)."),
        p_hidden: Optional[float] = typer.Option(None, "--p-hidden", help="variational: drop probability of h_{t-1} (default: --p)."),
        threshold: Optional[float] = typer.Option(None, "--threshold", help="sparse-vd: test-time log alpha threshold (default 3)."),
        log_sigma2: Optional[float] = typer.Option(None, "--log-sigma2", help="sparse-vd: initial log sigma^2 (default -10)."),
        samples_z: Optional[int] = typer.Option(None, "--samples-z", help="dropconnect: Gaussian draws Z averaged by the test rule (default 64)."),
        mc_form: Optional[str] = typer.Option(None, "--mc-form", help="dropconnect MC mode: 'gaussian' (default) or 'mask' (exact per-example masks)."),
        alpha: Optional[float] = typer.Option(None, "--alpha", help="standout: belief network pi = alpha*W + beta (default 1)."),
        beta: Optional[float] = typer.Option(None, "--beta", help="standout: belief network pi = alpha*W + beta (default 0)."),
        after: Optional[List[str]] = After,
        layers: Optional[List[str]] = Layers,
        exclude: Optional[List[str]] = Exclude,
        allow_output: bool = AllowOutput,
        replace: bool = typer.Option(False, "--replace", help="Swap the model's existing dropout for --variant (each keeps its p unless --p is given)."),
        remove: bool = typer.Option(False, "--remove", help="Strip the model's existing dropout."),
        out_format: Optional[str] = typer.Option(None, "--format", help=f"Output format: {', '.join(formats.ALL)} (default: the input's)."),
        force: bool = typer.Option(False, "--force", help="Allow -o to be the input path (overwrites it)."),
        json_out: bool = Json,
        trust_pickle: bool = TrustPickle,
        imports: Optional[List[str]] = Imports,
        arch: Optional[str] = Arch,
        input_shape: Optional[str] = InputShape,
    ) -> None:
        from dropcli.api.models import check_inject_args, inject_sites, load, save

        given = {"block_size": block_size, "hole_size": hole_size, "holes": holes, "mask_per": mask_per, "weight": weight,
                 "tie": tie, "p_input": p_input, "p_hidden": p_hidden, "threshold": threshold, "log_sigma2": log_sigma2,
                 "samples_z": samples_z, "mc_form": mc_form, "alpha": alpha, "beta": beta}
        edit = dict(p=p, replace=replace, remove=remove, **given)
        check_inject_args(variant, format=out_format, **edit)
        model_output(output, [model_path], force=force, json_out=json_out)
        model = load(model_path, trust_pickle=trust_pickle, imports=imports, arch=arch, input_shape=input_shape)
        notes: list[str] = []
        done = inject_sites(model, variant, after=after, layers=layers, exclude=exclude, allow_output=allow_output,
                            notes=notes, **edit)
        for note in notes:
            log(f"note: {note}")
        written = save(model, output, out_format)
        result = {"input": model_path, "output": output, "format": written, "backend": model.backend,
                  "action": "remove" if remove else "replace" if replace else "inject", "sites": done}
        if json_out:
            print_json(result)
            return
        from rich.table import Table

        t = Table(title=f"{result['action']}: {len(done)} site(s) -> {shown(output)} ({written})")
        t.add_column("site")
        t.add_column("at")
        t.add_column("variant")
        t.add_column("parameters")
        for d in done:
            extra = ", ".join(f"{k}={v}" for k, v in d.items() if k not in ("site", "at", "variant", "kind"))
            t.add_row(str(d["site"]), d["at"], str(d["variant"] or "(removed)"), extra)
        out.print(t)
        if written == formats.ONNX and not remove:
            log("MC mode: feed the bool input 'dropcli_mc' = True (default False = inference).")
        elif not remove:
            log("MC mode: set the model's '*.dropcli_mc' buffers to True (default False = inference).")
