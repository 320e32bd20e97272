"""The shared helpers of the backends and the model layer (the import rules: test_layering.py).

* dropcli.model.naming: the one owner of the names dropcli writes into models (a file format:
  the literals below are what models already written contain);
* dropcli.model.residual: the residual-add rule both backends use;
* dropcli.backends.torch.fx: the torch fx helpers;
"""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from dropcli.backends.torch.fx import aten_name, fetch_attr, fname, is_linear, linear_input, set_module
from dropcli.model import naming, residual

# ---------------------------------------------------------------------------------- naming


def test_names_are_the_saved_format():
    assert naming.SITE_PREFIX == "dropcli_site_"
    assert naming.MC_NAME == naming.MC_INPUT == "dropcli_mc"
    assert (naming.SITES_META, naming.MODEL_META) == ("dropcli.sites", "dropcli.model")
    assert (naming.EXAMPLE_FILE, naming.SITES_FILE, naming.MODEL_FILE, naming.PROGRAM_FILE) == (
        "dropcli_example_inputs.json", "dropcli_sites.json", "dropcli_model.json", "dropcli_program.pt2")
    assert naming.DET_SUFFIX == "__dropcli_det"
    assert naming.PASS_MARK == "dropcli_weightdrop_pass"
    assert naming.site_name(3) == "dropcli_site_3"
    assert naming.select_name("dropcli_site_3") == "dropcli_site_3/select"
    assert naming.select_name("dropcli_site_3", 2) == "dropcli_site_3/select_2"
    assert naming.scoped("dropcli_site_3", "Mul_0") == "dropcli_site_3/Mul_0"
    assert naming.site_scope("dropcli_site_3") == "dropcli_site_3/"
    assert naming.select_doc("standard", 0.25) == "dropcli variant=standard p=0.25"
    assert naming.select_doc("gaussian", None) == "dropcli variant=gaussian p=None"


def test_site_numbers():
    assert naming.site_index("dropcli_site_12") == 12
    for name in ("dropcli_site_", "dropcli_site_1a", "xdropcli_site_1", "dropcli_site_1/select", None, ""):
        assert naming.site_index(name) is None
    assert naming.next_site_index([]) == 0
    assert naming.next_site_index(["fc1", "dropcli_site_0", "dropcli_site_4", "dropcli_site_x", None]) == 5
    # ONNX numbers sites by their scoped node names; a bare name without '/' is not a site node
    names = ["dropcli_site_2/select", "dropcli_site_7/Mul_0", "dropcli_site_9", "/fc1/Gemm"]
    assert naming.next_site_index(naming.node_sites(names)) == 8


def test_select_nodes_and_docs():
    assert naming.node_site("dropcli_site_3/select") == "dropcli_site_3"
    assert naming.node_site("/fc1/Gemm") is None
    assert naming.is_select("dropcli_site_3/select")
    assert not naming.is_select("dropcli_site_3/select_1")
    assert naming.is_select("dropcli_site_3/select_1", any_output=True)
    assert not naming.is_select("other/select")
    doc = naming.select_doc("spatial", 0.3)
    assert (naming.doc_variant(doc), naming.doc_p(doc)) == ("spatial", 0.3)
    assert naming.doc_p(naming.select_doc("gaussian", None)) is None
    assert naming.doc_variant("") is None


def test_mc_buffer_names():
    assert naming.is_mc_buffer("dropcli_site_0.dropcli_mc")
    assert naming.is_mc_buffer("dropcli_mc")
    assert not naming.is_mc_buffer("dropcli_site_0.x_dropcli_mc")
    assert naming.reads_mc("dropcli_site_0.dropcli_mc") and naming.reads_mc("dropcli_site_0_dropcli_mc")
    assert naming.mc_owner("dropcli_site_0.dropcli_mc") == "dropcli_site_0"


@pytest.mark.parametrize("parts, path", [
    (["features", "features.0"], "features.0"),
    (["layer1", "layer1.0", "conv1"], "layer1.0.conv1"),
    (["fc1"], "fc1"),
    ([], ""),
])
def test_join_scopes(parts, path):
    assert naming.join_scopes(parts) == path


# ---------------------------------------------------------------------------------- residual


def _graph(edges: dict[str, list[str]]):
    """Nodes in insertion (topological) order, edges node -> its inputs."""
    return residual.ancestors(list(edges), lambda n: edges[n])


def test_identity_skip():
    g = {"x": [], "f1": ["x"], "f2": ["f1"], "add": ["x", "f2"]}
    anc = _graph(g)
    assert residual.residual_branch("x", "f2", anc, lambda n: n.startswith("f")) == 1
    assert residual.residual_branch("f2", "x", anc, lambda n: n.startswith("f")) == 0


def test_projection_skip_and_tie():
    g = {"x": [], "stem": ["x"], "proj": ["stem"], "a": ["stem"], "b": ["a"]}
    anc = _graph(g)
    weighted = {"stem", "proj", "a", "b"}.__contains__
    assert residual.residual_branch("proj", "b", anc, weighted) == 1  # two layers beat one
    g2 = {"x": [], "stem": ["x"], "a": ["stem"], "b": ["stem"]}
    assert residual.residual_branch("a", "b", _graph(g2), {"stem", "a", "b"}.__contains__) is None  # a tie
    assert residual.residual_branch("a", "a", _graph(g2), {"a"}.__contains__) is None


def test_fork_at_a_source_counts_only_when_not_a_source():
    # x -> l1 ; x -> l2 -> l3 ; l1 + l3: torch (placeholders are ordinary nodes) says residual,
    # ONNX (graph inputs are sources) does not
    g = {"x": [], "l1": ["x"], "l2": ["x"], "l3": ["l2"]}
    anc = _graph(g)
    weighted = {"l1", "l2", "l3"}.__contains__
    assert residual.residual_branch("l1", "l3", anc, weighted) == 1
    assert residual.residual_branch("l1", "l3", anc, weighted, is_source=lambda n: n == "x") is None
    # an operand that is itself a source read by the other side is an identity skip either way
    assert residual.residual_branch("x", "l3", anc, weighted, is_source=lambda n: n == "x") == 1


# ---------------------------------------------------------------------------------- torch fx


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.w = nn.Parameter(torch.ones(4, 4))

    def forward(self, x):
        return torch.nn.functional.linear(self.body(x), self.w) + torch.addmm(x, x, self.w)


def test_fx_helpers():
    net = _Net()
    gm = fx.symbolic_trace(net)
    assert fetch_attr(gm, "body.0.weight") is net.body[0].weight
    assert aten_name(torch.ops.aten.linear.default) == "linear"
    assert aten_name(torch.relu) is None
    modules = dict(gm.named_modules())
    nodes = {n.name: n for n in gm.graph.nodes}
    assert is_linear(nodes["body_0"], modules) and not is_linear(nodes["body_1"], modules)
    assert fname(nodes["linear"]) == "linear" and is_linear(nodes["linear"], modules)
    assert fname(nodes["addmm"]) == "addmm" and linear_input(nodes["addmm"]) is nodes["x"]
    set_module(gm, "new.deep.layer", nn.Identity())
    assert isinstance(gm.get_submodule("new.deep.layer"), nn.Identity)
    set_module(gm, "w", nn.Identity())  # replaces a parameter of the same name
    assert "w" not in dict(gm.named_parameters()) and isinstance(gm.w, nn.Identity)
