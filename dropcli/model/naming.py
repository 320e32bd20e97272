"""The names dropcli writes into models, built and parsed in one place.

Every site is called ``dropcli_site_N`` (N counts from 0 in model order). In torch it is a
submodule of that name holding a bool buffer ``dropcli_mc`` (``dropcli_site_N.dropcli_mc``);
saved as TorchScript/.pt2, its ops read that buffer. In ONNX the site's nodes are named
``dropcli_site_N/...``, the last one (per output) a ``Where`` named ``dropcli_site_N/select``
(``.../select_K`` for output K > 0) whose doc string records ``variant=... p=...``, and every
site reads the one bool graph input ``dropcli_mc`` (default: an initializer False). Records of
the sites and of the whole model go to the ONNX metadata keys :data:`SITES_META` /
:data:`MODEL_META`, and to the files :data:`SITES_FILE` / :data:`MODEL_FILE` stored beside a
torch graph. These names are a file format: changing one breaks models already written.
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterable, Sequence

SITE_PREFIX = "dropcli_site_"
MC_NAME = "dropcli_mc"  # torch: each site's bool buffer; ONNX: the one bool graph input
MC_INPUT = MC_NAME

SITES_META = "dropcli.sites"  # ONNX metadata_props key: JSON records of the sites that replaced layers
MODEL_META = "dropcli.model"  # ONNX metadata_props key: JSON facts about the whole model (regression tau)

# files dropcli stores beside a torch graph (TorchScript extra files, torch.export extra files)
EXAMPLE_FILE = "dropcli_example_inputs.json"
SITES_FILE = "dropcli_sites.json"
MODEL_FILE = "dropcli_model.json"  # facts about the whole model (regression tau from finetune)
MODEL_ATTR = "dropcli_model_json"  # pickle: the MODEL_FILE record, as an attribute of the pickled module
PROGRAM_FILE = "dropcli_program.pt2"  # a torch.export program of the same model (only where the trace holds a loop)

DET_SUFFIX = "__dropcli_det"  # ONNX: a rewritten recurrent node's own outputs, renamed (the inference branch)
PASS_MARK = "dropcli_weightdrop_pass"  # torch buffer / ONNX node-name part marking weightdrop --mask-per pass

_SELECT = "select"
_SITE_RE = re.compile(re.escape(SITE_PREFIX) + r"(\d+)")


# ------------------------------------------------------------------------------ site names


def site_name(index: int) -> str:
    """``dropcli_site_<index>``."""
    return f"{SITE_PREFIX}{index}"


def short_name(name: str) -> str:
    """``3`` for ``dropcli_site_3`` (progress lines); any other name as it is."""
    return name.removeprefix(SITE_PREFIX)


def site_index(name: str | None) -> int | None:
    """N for a name that is exactly ``dropcli_site_N``, else None."""
    m = _SITE_RE.fullmatch(name or "")
    return int(m.group(1)) if m else None


def next_site_index(names: Iterable[str | None]) -> int:
    """One past the highest N among names ``dropcli_site_N`` (0 when there is none)."""
    nums = [i for i in map(site_index, names) if i is not None]
    return max(nums, default=-1) + 1


# ------------------------------------------------------------------------------ ONNX node names


def scoped(site: str, name: str) -> str:
    """The name of a node inside ``site``: ``dropcli_site_N/<name>``."""
    return f"{site}/{name}"


def site_scope(site: str) -> str:
    """The prefix every node name of ``site`` starts with: ``dropcli_site_N/``."""
    return site + "/"


def node_site(node_name: str) -> str | None:
    """The site a node of dropcli's belongs to (``dropcli_site_3/select`` -> ``dropcli_site_3``), else None."""
    return node_name.split("/")[0] if node_name.startswith(SITE_PREFIX) else None


def node_sites(node_names: Iterable[str]) -> list[str]:
    """The sites named by scoped node names ``dropcli_site_N/...`` (for numbering new sites)."""
    return [nm.split("/")[0] for nm in node_names if "/" in nm]


def select_name(site: str, output: int = 0) -> str:
    """The name of the ``Where`` that gives output ``output`` of ``site``."""
    return scoped(site, _SELECT) + (f"_{output}" if output else "")


def is_select(node_name: str, any_output: bool = False) -> bool:
    """Whether a node name is a site's select (its first output's; with ``any_output`` any output's)."""
    if not node_name.startswith(SITE_PREFIX):
        return False
    return "/" + _SELECT in node_name if any_output else node_name.endswith("/" + _SELECT)


def select_doc(variant: str | None, p: object) -> str:
    """The doc string of a site's select node: its variant and drop probability."""
    return f"dropcli variant={variant} p={p}"


def doc_p(doc: str) -> float | None:
    """The drop probability a select node's doc string records (None: none, or not a number)."""
    for part in doc.split():
        if part.startswith("p="):
            with contextlib.suppress(ValueError):
                return float(part[2:])
    return None


def doc_variant(doc: str) -> str | None:
    """The variant a select node's doc string records."""
    for part in doc.split():
        if part.startswith("variant="):
            return part[8:]
    return None


def join_scopes(parts: Sequence[str]) -> str:
    """Exporter scopes to a module path: ``features/features.0`` -> ``features.0`` (a scope may
    already be qualified by its parent), ``layer1/layer1.0/conv1`` -> ``layer1.0.conv1``."""
    path = ""
    for part in parts:
        path = part if not path or part.startswith(path + ".") else f"{path}.{part}"
    return path


# ------------------------------------------------------------------------------ torch buffers


def is_mc_buffer(name: str) -> bool:
    """Whether a (dotted) buffer name is a site's MC switch: its last part is ``dropcli_mc``."""
    return name.split(".")[-1] == MC_NAME


def reads_mc(target: object) -> bool:
    """Whether a graph reference (a ``get_attr`` target, an initializer name) is a site's MC switch."""
    return str(target).endswith(MC_NAME)


def mc_owner(target: object) -> str:
    """The site whose MC switch ``target`` (``dropcli_site_N.dropcli_mc``) is."""
    return str(target).rsplit(".", 1)[0]
