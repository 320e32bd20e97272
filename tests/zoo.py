"""The zoo: small versions of the architectures users hold, saved the ways users save them.

Each entry builds a tiny model (transformers models from small configs: nothing is downloaded)
and example inputs; :func:`save` writes it in one format. The zoo test tier
(``tests/test_zoo_text.py``, ``tests/test_zoo_vision.py``) and the README table generator (``scripts/zoo_table.py``) share it.

Formats (cell names):

* ``onnx17``: ``torch.onnx.export(dynamo=False, opset_version=17)``, dynamic batch (and sequence);
* ``onnx18``: ``torch.onnx.export(dynamo=True, opset_version=18)``, dynamic batch;
* ``pt2kw``: ``torch.export.export(m, (), kwargs=inputs)``, dynamic batch;
* ``pt2``: ``torch.export.export(m, args)``, dynamic batch;
* ``ts``: ``torch.jit.trace`` (transformers models with ``torchscript=True``, as its docs say);
* ``pickle``: ``torch.save(model)``; ``state_dict``: ``torch.save(model.state_dict())`` plus
  ``--arch tests.zoo:build_NAME``.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

FORMATS = ("onnx17", "onnx18", "pt2kw", "pt2", "ts", "pickle", "state_dict")
SUFFIX = {"onnx17": ".onnx", "onnx18": ".onnx", "pt2kw": ".pt2", "pt2": ".pt2", "ts": ".pt",
          "pickle": ".pt", "state_dict": ".pt"}
BATCH = 2  # the batch size every file is exported at; checks run at another one
SEQ = 8
VOCAB = 100
CLASSES = 3


@dataclass
class Entry:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], dict[str, torch.Tensor]]  # batch size -> keyword inputs, in forward order
    output: str  # "class" (one row of logits), "token" ([N, S, V] logits), "embedding", "regression"
    formats: tuple[str, ...] = FORMATS
    why_not: dict[str, str] = field(default_factory=dict)  # format -> reason the cell cannot work
    hf: bool = False


def _tokens(n: int, seq: int = SEQ) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    return torch.randint(1, VOCAB, (n, seq), generator=g)


def _image(n: int, c: int = 3, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    return torch.randn(n, c, size, size, generator=g)


def _seeded(fn: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return fn().eval()


# ---------------------------------------------------------------- transformers (tiny configs)

def _bert_cfg(**kw):
    from transformers import BertConfig

    return BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, num_labels=CLASSES, **kw)


def build_bert(torchscript: bool = False) -> nn.Module:
    from transformers import BertForSequenceClassification

    return _seeded(lambda: BertForSequenceClassification(_bert_cfg(torchscript=torchscript, return_dict=not torchscript)))


def build_distilbert(torchscript: bool = False) -> nn.Module:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    cfg = DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                           max_position_embeddings=64, num_labels=CLASSES, torchscript=torchscript, return_dict=not torchscript)
    return _seeded(lambda: DistilBertForSequenceClassification(cfg))


def build_gpt2(torchscript: bool = False) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                     use_cache=False, torchscript=False)
    return _seeded(lambda: GPT2LMHeadModel(cfg))


def build_vit(torchscript: bool = False) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=64, num_labels=CLASSES, torchscript=False)
    return _seeded(lambda: ViTForImageClassification(cfg))


def build_resnet(torchscript: bool = False) -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                       layer_type="basic", num_labels=CLASSES, torchscript=torchscript, return_dict=not torchscript)
    return _seeded(lambda: ResNetForImageClassification(cfg))


def build_convnext(torchscript: bool = False) -> nn.Module:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    cfg = ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, patch_size=2,
                         num_labels=CLASSES, torchscript=False)
    return _seeded(lambda: ConvNextForImageClassification(cfg))


MOBILENET_BLOCKS = 4  # of MobileNetV2's 16 inverted-residual blocks (see build_mobilenetv2)


def build_mobilenetv2(torchscript: bool = False) -> nn.Module:
    """transformers' MobileNetV2 at its smallest width, cut to its first 4 inverted-residual blocks
    (its config fixes 16, and the zoo's cost grew with them: every format's export, load, prune
    and finetune walked ~150 layers). The 4 keep every kind of layer and join the 16 have: the
    stem, expand / depthwise (ReLU6, exported as Clip) / linear-reduce convolutions, blocks that
    downsample and blocks with a residual add, the 1x1 head convolution, pooling, the classifier."""
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification
    from transformers.models.mobilenet_v2.modeling_mobilenet_v2 import MobileNetV2ConvLayer

    cfg = MobileNetV2Config(num_channels=3, image_size=16, depth_multiplier=0.25, min_depth=4,
                            num_labels=CLASSES, torchscript=torchscript, return_dict=not torchscript)

    def make():
        m = MobileNetV2ForImageClassification(cfg)
        body = m.mobilenet_v2
        body.layer = body.layer[:MOBILENET_BLOCKS]
        body.conv_1x1 = MobileNetV2ConvLayer(cfg, in_channels=body.layer[-1].reduce_1x1.convolution.out_channels,
                                             out_channels=m.classifier.in_features, kernel_size=1)
        return m

    return _seeded(make)


class SentenceEmbedder(nn.Module):
    """all-MiniLM-L6-v2's shape (a BERT encoder, mean pooling, L2 norm), at a tiny size."""

    def __init__(self, torchscript: bool = False):
        super().__init__()
        from transformers import BertModel

        self.encoder = BertModel(_bert_cfg(torchscript=torchscript, return_dict=not torchscript), add_pooling_layer=False)

    def forward(self, input_ids, attention_mask):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(e, dim=-1)


def build_minilm(torchscript: bool = False) -> nn.Module:
    return _seeded(lambda: SentenceEmbedder(torchscript))


# ---------------------------------------------------------------- plain torch models people save

class EncoderClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, CLASSES)

    def forward(self, input_ids):
        return self.head(self.encoder(self.embed(input_ids)).mean(1))


class RNNClassifier(nn.Module):
    def __init__(self, cell: str = "lstm"):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(16, 24, batch_first=True)
        self.head = nn.Linear(24, CLASSES)

    def forward(self, input_ids):
        out, _ = self.rnn(self.embed(input_ids))
        return self.head(out[:, -1])


class AudioNet(nn.Module):
    """A Conv1d keyword-spotting net over raw waveforms [N, 1, 256]."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, 8, 9, stride=2, padding=4), nn.BatchNorm1d(8), nn.ReLU(),
            nn.Conv1d(8, 16, 9, stride=2, padding=4), nn.BatchNorm1d(16), nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(16, 16, 5, padding=2), nn.BatchNorm1d(16), nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
        )
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def build_encoder(torchscript: bool = False) -> nn.Module:
    return _seeded(EncoderClassifier)


def build_lstm(torchscript: bool = False) -> nn.Module:
    return _seeded(lambda: RNNClassifier("lstm"))


def build_gru(torchscript: bool = False) -> nn.Module:
    return _seeded(lambda: RNNClassifier("gru"))


def build_audio(torchscript: bool = False) -> nn.Module:
    return _seeded(AudioNet)


def _ids(n):
    return {"input_ids": _tokens(n)}


def _ids_mask(n):
    t = _tokens(n)
    mask = torch.ones_like(t)
    mask[:, -2:] = 0  # padding at the end of every row
    return {"input_ids": t, "attention_mask": mask}


ZOO: dict[str, Entry] = {e.name: e for e in [
    Entry("bert", build_bert, _ids_mask, "class", hf=True),
    Entry("distilbert", build_distilbert, _ids_mask, "class", hf=True),
    Entry("gpt2", build_gpt2, _ids, "token", hf=True,
          why_not={"onnx17": "torch's legacy exporter cannot export aten::diff (transformers' mask code) at opset 17"}),
    Entry("vit", build_vit, lambda n: {"pixel_values": _image(n)}, "class", hf=True),
    Entry("resnet", build_resnet, lambda n: {"pixel_values": _image(n)}, "class", hf=True),
    Entry("convnext", build_convnext, lambda n: {"pixel_values": _image(n)}, "class", hf=True),
    Entry("mobilenetv2", build_mobilenetv2, lambda n: {"pixel_values": _image(n)}, "class", hf=True),
    Entry("minilm", build_minilm, _ids_mask, "embedding", hf=True),
    Entry("encoder", build_encoder, _ids, "class"),
    Entry("lstm", build_lstm, _ids, "class"),
    Entry("gru", build_gru, _ids, "class"),
    Entry("audio", build_audio, lambda n: {"x": torch.randn(n, 1, 256, generator=torch.Generator().manual_seed(n))},
          "class"),
]}


def first_output(out):
    """The tensor a user reads: logits of a ModelOutput / first element of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):
        return out.to_tuple()[0]
    if isinstance(out, dict):  # a ModelOutput traced with strict=False comes back as a dict
        return next(iter(out.values()))
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(type(out))


_REFERENCE: dict[tuple[str, int], torch.Tensor] = {}


def reference(entry: Entry, n: int) -> torch.Tensor:
    """The original model's output on ``entry.inputs(n)`` in inference mode (computed once per
    entry and batch size: every cell of a model compares with the same one)."""
    key = (entry.name, n)
    if key not in _REFERENCE:
        model = entry.build()
        with torch.no_grad():
            _REFERENCE[key] = first_output(model(**entry.inputs(n))).detach().clone()
    return _REFERENCE[key]


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _dynamic(entry: Entry, inputs: dict[str, torch.Tensor]):
    batch = torch.export.Dim("batch", min=1, max=1024)
    return {k: {0: batch} for k in inputs}


def save(entry: Entry, fmt: str, directory: Path) -> Path:
    """Write ``entry`` in format ``fmt`` under ``directory``; returns the file (``.npz`` data beside
    it is the caller's business)."""
    path = Path(directory) / f"{entry.name}_{fmt}{SUFFIX[fmt]}"
    inputs = entry.inputs(BATCH)
    args = tuple(inputs.values())
    with _quiet():
        if fmt in ("ts",):
            model = entry.build(torchscript=True)
            # transformers' return_dict=False path is broken on some models (GPT-2, ViT, ConvNeXt in 5.x):
            # those are traced as users do then, with strict=False and a dict output
            ts = torch.jit.trace(model, args, check_trace=False, strict=False)
            torch.jit.save(ts, str(path))
        elif fmt == "pt2kw":
            ep = torch.export.export(entry.build(), (), kwargs=inputs, dynamic_shapes=_dynamic(entry, inputs))
            torch.export.save(ep, str(path))
        elif fmt == "pt2":
            ep = torch.export.export(entry.build(), args, dynamic_shapes=tuple(_dynamic(entry, inputs).values()))
            torch.export.save(ep, str(path))
        elif fmt == "onnx17":
            names = list(inputs)
            axes = {k: {0: "batch"} for k in names}
            axes["out"] = {0: "batch"}
            torch.onnx.export(entry.build(torchscript=True), args, str(path), dynamo=False, opset_version=17,
                              input_names=names, output_names=["out"], dynamic_axes=axes)
        elif fmt == "onnx18":
            names = list(inputs)
            prog = torch.onnx.export(entry.build(), (), kwargs=inputs, dynamo=True, opset_version=18,
                                     input_names=names, dynamic_shapes=_dynamic(entry, inputs), verbose=False)
            prog.save(str(path))
        elif fmt == "pickle":
            torch.save(entry.build(), str(path))
        elif fmt == "state_dict":
            torch.save(entry.build().state_dict(), str(path))
        else:
            raise ValueError(fmt)
    return path


def save_inputs(entry: Entry, n: int, path: Path, labels: bool = True) -> Path:
    """An ``.npz`` with the entry's inputs (named as the model's inputs) and, for classifiers,
    labels ``y`` (the original model's argmax: what a well-fitted model would be scored on)."""
    import numpy as np

    inputs = entry.inputs(n)
    arrays = {k: v.numpy() for k, v in inputs.items()}
    if labels and entry.output == "class":
        arrays["y"] = reference(entry, n).argmax(-1).numpy()
    np.savez(path, **arrays)
    return Path(path)


# ---------------------------------------------------------------- the checks each cell runs

VERBS = ("inspect", "inject", "exact", "mc", "uncertainty", "finetune", "prune")
PRUNE = {"resnet", "mobilenetv2", "audio"}  # the convolutional nets issue 15 asks to prune from every format
# finetune learns rates from labels: every classifier (not the language model's per-token output,
# whose labels training does not take, nor the sentence embedder, which has none), in every format
CHECK_BATCH = 3  # != BATCH: outputs must run at a batch size other than the export's


def load_options(entry: Entry, fmt: str, shape: bool = True) -> dict:
    """What a user passes to load ``entry`` saved as ``fmt`` on a verb without data: the classes'
    file for a pickle, the factory for a state_dict, and ``--input-shape`` (with dtypes) where the
    file does not record its inputs: a TorchScript model of float inputs (token models must do
    without: dropcli reads them from the Embedding), a pickle or a state_dict."""
    here = str(Path(__file__).resolve())
    opts: dict = {}
    if fmt == "pickle":
        opts = {"trust_pickle": True, "imports": [here]}
    elif fmt == "state_dict":
        opts = {"arch": f"{here}:build_{entry.name}"}
    ex = entry.inputs(1)
    floats = all(v.is_floating_point() for v in ex.values())
    if shape and (fmt in ("pickle", "state_dict") or (fmt == "ts" and floats)):
        opts["input_shape"] = ";".join("x".join(str(d) for d in v.shape) + f":{str(v.dtype).replace('torch.', '')}"
                                       for v in ex.values())
    return opts


def stock_runner(path: Path) -> Callable[..., torch.Tensor]:
    """A written model loaded once with its format's stock loader (not dropcli's); the result
    runs it: ``run(inputs, mc)`` -> its first output, MC mode on or off."""
    import numpy as np

    from dropcli.model import formats

    fmt = formats.detect(str(path))
    if fmt == formats.ONNX:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()} | {i.name for i in sess.get_overridable_initializers()}

        def run_onnx(inputs: dict[str, torch.Tensor], mc: bool) -> torch.Tensor:
            feed = {k: v.numpy() for k, v in inputs.items() if k in names}
            if "dropcli_mc" in names:
                feed["dropcli_mc"] = np.array(mc)
            elif mc:
                raise AssertionError("the ONNX output has no dropcli_mc input")
            return torch.from_numpy(sess.run(None, feed)[0])

        return run_onnx
    if fmt == formats.EXPORT:
        model = torch.export.load(str(path)).module()
        holder = model
    elif fmt == formats.TORCHSCRIPT:  # called positionally, as TorchScript users do
        ts = torch.jit.load(str(path))
        holder = ts

        def model(**kw):
            return ts(*kw.values())
    else:
        model = torch.load(str(path), weights_only=False)  # the tier's own file
        holder = model
    bufs = [buf for name, buf in holder.named_buffers() if name.endswith("dropcli_mc")]

    def run_torch(inputs: dict[str, torch.Tensor], mc: bool) -> torch.Tensor:
        if mc and not bufs:
            raise AssertionError("the torch output has no dropcli_mc buffers")
        for buf in bufs:
            buf.fill_(mc)
        with torch.no_grad():
            try:
                out = model(**inputs)
            except (TypeError, ValueError):  # a positional-only program (TorchScript, positional .pt2)
                out = model(*inputs.values())
        return first_output(out)

    return run_torch


# (model, format, step) -> (wall s, CPU s) of the last run: where the tier's time goes
# (scripts/zoo_table.py --times prints it)
TIMES: dict[tuple[str, str, str], tuple[float, float]] = {}


@contextlib.contextmanager
def timed(name: str, fmt: str, what: str):
    import time

    w, c = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        TIMES[(name, fmt, what)] = (time.perf_counter() - w, time.process_time() - c)


def check_cell(entry: Entry, fmt: str, src: Path, work: Path, data: Path) -> dict[str, str]:
    """Run every verb on one saved model; ``{verb: "ok" | "n/a" | error text}``. ``src`` is the
    saved model, ``work`` a scratch folder, ``data`` the entry's ``.npz`` inputs (with labels)."""
    import dropcli

    res: dict[str, str] = {}
    opts = load_options(entry, fmt)

    def step(verb, fn):
        if any(v not in ("ok", "n/a") for v in res.values()):
            res[verb] = "not reached"
            return
        try:
            with timed(entry.name, fmt, verb):
                fn()
            res.setdefault(verb, "ok")  # a verb that does not apply has set "n/a" itself
        except Exception as e:  # noqa: BLE001  (the cell records it; the test asserts on it)
            res[verb] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"

    state: dict = {}

    def inspect():
        # loaded once, as a user of the API would: inspect, inject and prune share the model
        state["in"] = dropcli.load(str(src), **opts)
        info = dropcli.inspect(state["in"])
        state["layers"] = info["layers"]
        assert len(info["layers"]) >= 3, f"only {len(info['layers'])} layers seen"

    def inject():
        from dropcli.api.common import copy_model
        from dropcli.api.models import inject_sites

        m = copy_model(state["in"])
        sites = inject_sites(m, "standard", p=0.2)
        body = len(sites) >= 2 or any(st.get("kind") in ("lstm", "gru", "rnn", "embedding") for st in sites)
        assert body, f"{len(sites)} site(s) {[st.get('at') for st in sites]}: the body got none"
        out = work / f"{entry.name}_{fmt}_mc{Path(src).suffix}"
        dropcli.save(m, str(out))
        state["out"], state["injected"] = out, m

    def exact():
        ref = reference(entry, CHECK_BATCH)
        state["run"] = stock_runner(state["out"])  # loaded once for exact and mc
        got = state["run"](entry.inputs(CHECK_BATCH), mc=False)
        assert got.shape == ref.shape, f"shape {tuple(got.shape)} != {tuple(ref.shape)}"
        err = (got.float() - ref.float()).abs().max().item()
        assert err <= 1e-4 * (1 + ref.abs().max().item()), f"inference mode differs from the original by {err:.3g}"

    def mc():
        x = entry.inputs(CHECK_BATCH)
        a, b = state["run"](x, mc=True), state["run"](x, mc=True)
        assert not torch.equal(a, b), "MC mode does not sample"

    def uncertainty():
        # the written file, read back by dropcli (the round trip a user makes)
        r = dropcli.uncertainty(str(state["out"]), str(data), T=4, seed=0, **load_options(entry, fmt) if fmt == "pickle" else {})
        check_task(entry, r)

    def finetune():
        if entry.output != "class":
            res["finetune"] = "n/a"
            return
        out = work / f"{entry.name}_{fmt}_ft{Path(state['out']).suffix}"
        # the injected model (its sites are what finetune learns), one epoch; the written file is
        # checked by finetune itself against its stock loader
        dropcli.finetune(state["injected"], str(data), str(out), variant="concrete", epochs=1, samples=2, select="elbo")

    def prune():
        if entry.name not in PRUNE:
            res["prune"] = "n/a"
            return
        out = work / f"{entry.name}_{fmt}_pruned{Path(src).suffix}"
        if "input_shape" in opts:  # a file that does not record its input: prune reads it from its data
            dropcli.prune(str(src), str(data), str(out), epochs=1, allow_larger=True, **load_options(entry, fmt, shape=False))
        else:
            dropcli.prune(state["in"], str(data), str(out), epochs=1, allow_larger=True)

    for verb, fn in [("inspect", inspect), ("inject", inject), ("exact", exact), ("mc", mc),
                     ("uncertainty", uncertainty), ("finetune", finetune), ("prune", prune)]:
        if verb in res:
            continue
        step(verb, fn)
    return res


def check_task(entry: Entry, r) -> None:
    """The output kind uncertainty chose fits the model: one class per row, per token, or not logits."""
    if entry.output == "class":
        assert r.task == "classification", f"task {r.task!r}"
        assert r.per["mean"].shape[-1] == CLASSES
    elif entry.output == "token":
        assert r.task == "token-classification", f"task {r.task!r}: per-token logits not classified per position"
        assert r.per["entropy"].shape == (5, SEQ), "per-token statistics expected [N, S]"
    else:
        assert r.task != "classification" and r.summary["output"]["kind"] == "embedding", \
            "sentence embeddings soft-maxed as class scores"


# ---------------------------------------------------------------- cells known to fail today

KNOWN_GAPS: dict[tuple[str, str], str] = {
}


# ---------------------------------------------------------------- the README table

TABLE_BEGIN = "<!-- zoo-table: generated by scripts/zoo_table.py from the zoo test tier; do not edit -->"
TABLE_END = "<!-- /zoo-table -->"
MARK = {"ok": "✓", "n/a": "·"}


def cell_text(res: dict[str, str] | None, reason: str = "") -> str:
    if res is None:
        return f"— ({reason})"
    return " ".join(MARK.get(res[v], "✗") for v in VERBS)


def render_table(results: dict[tuple[str, str], dict[str, str] | None]) -> str:
    """Architectures x formats; each cell lists the verbs in :data:`VERBS` order (✓ works,
    · does not apply, ✗ fails, — the format cannot hold the model, with the reason)."""
    head = "| model | " + " | ".join(FORMATS) + " |"
    rows = [head, "|" + "---|" * (len(FORMATS) + 1)]
    for name, entry in ZOO.items():
        cells = [cell_text(results.get((name, f)), entry.why_not.get(f, "")) for f in FORMATS]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    gaps = sorted({(k, v) for k, v in KNOWN_GAPS.items() if results.get(k) and any(
        r not in ("ok", "n/a") for r in results[k].values())})
    if gaps:
        rows.append("")
        rows.append("Known gaps (each ✗ above; the tier fails when one of them starts to pass, so this list stays true):")
        rows.append("")
        for reason in sorted({v for _, v in gaps}):
            cells = ", ".join(f"{m}/{f}" for (m, f), v in gaps if v == reason)
            rows.append(f"- {cells}: {reason}")
    return "\n".join(rows)


def readme_cells(readme: str) -> dict[tuple[str, str], str]:
    """The table's cells as the README has them."""
    block = readme.split(TABLE_BEGIN, 1)[1].split(TABLE_END, 1)[0]
    out = {}
    for line in block.strip().split("\n\n")[0].splitlines()[2:]:
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        for fmt, text in zip(FORMATS, parts[1:]):
            out[(parts[0], fmt)] = text
    return out


def run_model(entry: Entry, directory: Path) -> dict[tuple[str, str], dict[str, str] | None]:
    """Save ``entry`` in every format and check every cell (what the test tier and the table share)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with timed(entry.name, "", "data"):
        data = save_inputs(entry, 5, directory / f"{entry.name}.npz")
    results = {}
    for fmt in FORMATS:
        if fmt in entry.why_not:
            results[(entry.name, fmt)] = None
            continue
        with timed(entry.name, fmt, "save"):
            src = save(entry, fmt, directory)
        work = directory / fmt
        work.mkdir(exist_ok=True)
        results[(entry.name, fmt)] = check_cell(entry, fmt, src, work, data)
    return results
