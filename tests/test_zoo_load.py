"""Getting the zoo's torch files in (issue 14, items 1, 2, 3, 5, 7, 8b): keyword-input and
ModelOutput ``.pt2`` programs, TorchScript traces of token models, pickles and state_dicts that
symbolic tracing cannot read, and outputs that run at another batch size than the export's.

Every check runs the written file with torch's own loader at batch 3 (the zoo exports at 2):
inference mode equals the original model, and MC mode samples (two passes differ).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dropcli
from dropcli.api.models import inject_sites
from tests import zoo
from tests.helpers import cli_err

pytest.importorskip("transformers")

ZOO_PY = str(Path(zoo.__file__))
N = 3  # a batch size other than the export's (zoo.BATCH)
assert N != zoo.BATCH


def leaf(out):
    """The first tensor of a model output (a ModelOutput, tuple, or the dict a strict=False trace returns)."""
    if isinstance(out, dict):
        return next(iter(out.values()))
    return zoo.first_output(out)


def mc_buffers(m: torch.nn.Module) -> list[torch.Tensor]:
    return [b for n, b in m.named_buffers() if n.endswith("dropcli_mc")]


def check_output(name: str, m: torch.nn.Module, call) -> None:
    """Inference mode equals the original at batch N; MC mode samples."""
    ref = zoo.reference(zoo.ZOO[name], N)
    with torch.no_grad():
        y = leaf(call(m))
        assert y.shape == ref.shape
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        bufs = mc_buffers(m)
        assert bufs, "no MC switch in the written model"
        for b in bufs:
            b.fill_(True)
        a, b2 = leaf(call(m)), leaf(call(m))
        for b in bufs:
            b.fill_(False)
    # p = 0.5 on every site: two MC passes agreeing everywhere would mean the masks do not act
    assert (a - b2).abs().max() > 1e-4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo_load")
    out = {}
    for name, fmt in [("vit", "pt2kw"), ("resnet", "pt2"), ("distilbert", "ts"), ("encoder", "ts"), ("encoder", "pickle"),
                      ("distilbert", "state_dict")]:
        out[name, fmt] = zoo.save(zoo.ZOO[name], fmt, d)
    out["bert_npz"] = zoo.save_inputs(zoo.ZOO["bert"], 4, d / "bert.npz")
    out["dir"] = d
    return out


def test_pt2_keyword_inputs_and_model_output_round_trip(files):
    """A transformers ViT exported with keyword inputs (ModelOutput out): inject and write .pt2;
    the program still takes pixel_values= and returns the ModelOutput."""
    m = dropcli.inject(str(files["vit", "pt2kw"]), after="linear")
    assert len(m.site_modules()) >= 4  # in the body (attention and MLP linears), not only the head
    out = files["dir"] / "vit_out.pt2"
    dropcli.save(m, out)
    ep = torch.export.load(str(out))
    spec = ep.module_call_graph[0].signature.in_spec
    assert spec.child(0).num_children == 0 and list(spec.child(1).context) == ["pixel_values"]
    x = zoo.ZOO["vit"].inputs(N)
    mod = ep.module()
    assert type(mod(**x)).__name__ == "ImageClassifierOutput"
    check_output("vit", mod, lambda mm: mm(**x))


def test_pt2_model_output_loads_without_transformers_imported(files):
    """torch hides the cause (an unregistered pytree type) of a failed load: dropcli registers
    transformers' output classes itself, in a process that has not imported transformers."""
    code = (f"import dropcli, sys; m = dropcli.load({str(files['resnet', 'pt2'])!r}); "
            "print(sum(l.kind == 'conv' for l in m.layers()), 'transformers' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=str(Path(ZOO_PY).parent.parent))
    assert res.returncode == 0, res.stderr
    convs, imported = res.stdout.split()
    assert int(convs) >= 4 and imported == "True"


def test_pt2_unknown_pytree_type_is_named(tmp_path):
    """A program that names a type nobody registered: the message names it and says what to do."""
    from dropcli.backends.torch.load import register_types
    from dropcli.errors import DropcliError

    with pytest.raises(DropcliError, match=r"mypkg\.Out.*not registered") as e:
        register_types(["mypkg.Out"], tmp_path / "m.pt2")
    assert "--import mypkg" in e.value.hint


def test_torchscript_token_model_takes_ids_from_embedding(files):
    """A traced DistilBERT (input_ids, attention_mask): the example is two int64 inputs (from its
    Embedding and forward schema; one float input made traced BERTs fail with an INTERNAL ASSERT),
    the conversion carries it, and the TorchScript written back (its mask slices bounded by
    sizes) runs at batch N."""
    m = dropcli.load(str(files["distilbert", "ts"]))
    assert [t.dtype for t in m.example_inputs] == [torch.int64, torch.int64]
    rows = inject_sites(m, after="linear")
    assert len(rows) >= 4
    out = files["dir"] / "distilbert_out.pt"
    dropcli.save(m, out)
    ts = torch.jit.load(str(out))
    x = tuple(zoo.ZOO["distilbert"].inputs(N).values())
    check_output("distilbert", ts, lambda mm: mm(*x))


def test_example_from_the_verbs_data(files):
    """A state_dict DistilBERT: the example input comes from the data file's first rows (dtype
    and shape), not a guess."""
    from dropcli.backends.torch.model import TorchModel
    from dropcli.model import formats

    m = TorchModel.load(files["distilbert", "state_dict"], formats.STATE_DICT, arch=f"{ZOO_PY}:build_distilbert",
                        example_data=str(files["bert_npz"]))
    data = np.load(files["bert_npz"])
    assert [tuple(t.shape) for t in m.example_inputs] == [(2, zoo.SEQ), (2, zoo.SEQ)]
    assert torch.equal(m.example_inputs[0], torch.from_numpy(data["input_ids"][:2]).long())
    # transformers models defeat symbolic tracing: captured with torch.export, every layer visible
    assert sum(l.kind == "linear" for l in m.layers()) >= 8


def test_torchscript_encoder_output_runs_at_other_batch_sizes(files):
    """nn.TransformerEncoder traced: the trace computes batch x heads from the batch size
    (prim::NumToTensor, aten::mul, aten::Int). dropcli reads that as live size arithmetic, so
    the rewritten model written as TorchScript runs at batch N, not only at the traced 2; .pt2
    too."""
    m = dropcli.inject(str(files["encoder", "ts"]), after="linear")
    x = tuple(zoo.ZOO["encoder"].inputs(N).values())
    out = files["dir"] / "enc_out.pt"
    assert dropcli.save(m, out) == "torchscript"
    check_output("encoder", torch.jit.load(str(out)), lambda mm: mm(*x))
    out = files["dir"] / "enc_out.pt2"
    dropcli.save(m, out, format="export")
    check_output("encoder", torch.export.load(str(out)).module(), lambda mm: mm(*x))


def test_pickled_transformer_encoder_is_traced_through(files):
    """A pickled nn.TransformerEncoder is not one opaque layer: its linear layers are sites."""
    m = dropcli.load(str(files["encoder", "pickle"]), trust_pickle=True, imports=[ZOO_PY])
    linears = [l.name for l in m.layers() if l.kind == "linear"]
    assert sum("encoder" in n for n in linears) >= 4, linears
    assert not any(l.kind == "transformerencoder" for l in m.layers())
    inject_sites(m, after="linear")
    out = files["dir"] / "enc_pickle_out.pt"
    # a graph torch.export captured is written as .pt2 by default (torch cannot pickle them all)
    assert dropcli.save(m, out) == "export"
    x = tuple(zoo.ZOO["encoder"].inputs(N).values())
    check_output("encoder", torch.export.load(str(out)).module(), lambda mm: mm(*x))


def test_torchscript_wrong_width_names_the_expected_shape(tmp_path):
    """Item 8b: data of the wrong width is refused with the shape the model expects."""
    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)).eval()
    torch.jit.trace(m, torch.zeros(2, 6)).save(str(tmp_path / "mlp.pt"))
    np.save(tmp_path / "bad.npy", np.zeros((4, 7), np.float32))
    cli_err("uncertainty", tmp_path / "mlp.pt", "-i", tmp_path / "bad.npy", "--inject", "standard", "-T", "2",
            contains=("shape [4, 7]", "expects [N, 6]"))


def test_input_shape_takes_a_dtype():
    from dropcli.backends.torch.load import parse_inputs
    from dropcli.errors import UsageError

    assert parse_inputs("1x8:int64;1x8:long") == [((1, 8), torch.int64), ((1, 8), torch.int64)]
    assert parse_inputs("2x3") == [((2, 3), torch.float32)]
    with pytest.raises(UsageError, match="unknown dtype"):
        parse_inputs("1x8:int7")
