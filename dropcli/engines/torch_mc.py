"""Monte-Carlo dropout engine for torch models.

Only the dropout sites are stochastic; every other layer stays in eval mode (the model
is never put in train mode). The fx graph is split at the first stochastic node:

* prefix: nodes that depend on no stochastic site, computed ONCE on the B examples;
* suffix: everything else, computed on the B*T tiled rows (i-major, row = i*T + t).

Sites are dropcli SiteModules, stock dropout (nn.Dropout* modules, aten/F.dropout calls,
which run as standard inverted dropout with their own p) and the rand ops that dropcli
writes into saved TorchScript/.pt2 models. All their noise comes from
:class:`dropcli.noise.KeyedNoise`, keyed by (seed, call, example index).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import fx, nn

from dropcli.backends.torch.fx import ATEN_DROPOUT, DROPOUT_FUNCS, aten_name, fetch_attr
from dropcli.errors import DropcliError
from dropcli.engines.keyed import MIN_ROWS
from dropcli.engines.noise import KeyedNoise
from dropcli.model.naming import is_mc_buffer, mc_owner, reads_mc
from dropcli.variants.base import SiteModule, apply_keep, keep_mask_like, noise_source, normal_like, set_mc, uniform_like

_ATEN_RAND = {"rand_like": "uniform", "randn_like": "normal", "rand": "uniform", "randn": "normal", "bernoulli": "bernoulli"}
_SIZE_FUNCS = {"sym_size", "size", "sym_numel", "sym_stride", "dim"}
_INPLACE_OPERATORS = {"iadd", "isub", "imul", "imatmul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior", "ixor",
                      "ilshift", "irshift"}  # ``x += y`` in a traced module: operator.iadd, in place on x


def _reads_size(n: fx.Node) -> bool:
    """A size read (``sym_size``...) or Python arithmetic on sizes (``operator.mul``...)."""
    return n.op == "call_function" and (_is_size_read(n) or getattr(n.target, "__module__", "") == "_operator"
                                        or getattr(n.target, "dropcli_size_arith", False))


def _integer_valued(n: fx.Node) -> bool:
    """A node whose recorded value (``meta['val']``) is an integer or bool tensor."""
    val = n.meta.get("val")
    return isinstance(val, torch.Tensor) and not val.is_floating_point() and not val.is_complex()


def _is_size_read(n: fx.Node) -> bool:
    """A read of a tensor's size (not of its values): ``sym_size``, ``x.size(0)``, ``x.dim()``..."""
    if n.op == "call_method":
        return n.target in ("size", "dim", "numel")
    return n.op == "call_function" and aten_name(n.target) in _SIZE_FUNCS


def _is_tensor_like(v: Any) -> bool:
    return isinstance(v, torch.Tensor)


class TorchMC:
    """Runs T stochastic passes per example over a torch fx GraphModule."""

    min_rows = MIN_ROWS  # smaller batches are padded to this (0 for a model saved with a fixed batch)

    def __init__(self, gm: fx.GraphModule, device: str | torch.device = "cpu"):
        self.gm = gm
        self.device = torch.device(device)
        self.gm.to(self.device)
        set_mc(self.gm, True)
        self.nodes = list(gm.graph.nodes)
        self.modules = dict(gm.named_modules())
        self.site_nodes = [n for n in self.nodes if self._is_site(n)]
        self.stochastic = self._stochastic_closure()
        # values computed from the inputs (the others -- weights and what is derived from them
        # alone, e.g. a sparse-VD site's masked weight -- are never tiled, whatever their shape)
        self.input_dependent: set[fx.Node] = set()
        for n in self.nodes:
            if n.op == "placeholder" or any(a in self.input_dependent for a in n.all_input_nodes):
                self.input_dependent.add(n)
        # values that depend on the inputs' data, not only on their sizes: a tensor made from sizes
        # alone (``arange(batch)`` indexing the batch, a causal mask) is recomputed in the suffix at
        # the tiled batch, never tiled itself (tiled, arange(B) would index example 0's samples)
        self.data_dependent: set[fx.Node] = set()
        for n in self.nodes:
            if n.op == "placeholder":
                self.data_dependent.add(n)
            elif _is_size_read(n):
                continue
            elif any(a in self.data_dependent for a in n.all_input_nodes):
                self.data_dependent.add(n)
        # rebuilt in the suffix rather than tiled: tensors made from sizes alone, and integer or
        # bool tensors (indices, masks): an index such as ``arange(B) * S + last`` means rows of the
        # batch it was made for, and only a copy rebuilt from the tiled values means the tiled rows
        self.rebuilt: set[fx.Node] = {
            n for n in self.input_dependent
            if n.op in ("call_function", "call_method", "call_module")
            and (n not in self.data_dependent or _integer_valued(n))}
        # free each value after its last use, so memory holds only live tensors
        pos = {n: i for i, n in enumerate(self.nodes)}
        # a size (or arithmetic on sizes), or a rebuilt tensor, that the suffix reads is recomputed
        # there from the tiled tensors (get_t): what it reads lives until its own last use
        last_use: dict[fx.Node, int] = {}
        for n in reversed(self.nodes):
            last_use[n] = max((last_use[u] if _reads_size(u) or u in self.rebuilt else pos[u] for u in n.users), default=pos[n])
        self.frees: dict[int, list[fx.Node]] = {}
        for n in self.nodes:
            if n.op in ("placeholder", "get_attr", "output"):
                continue
            self.frees.setdefault(last_use[n], []).append(n)
        # the suffix's large tensors (a Linear's product, a float dropout mask) are written into
        # buffers kept from one chunk to the next: a new 26 MB tensor every chunk costs the kernel
        # mapping and zeroing its pages again (see docs/speed.md); release() frees them
        self._bufs: dict[Any, torch.Tensor] = {}
        self.eval_in_run = self._eval_in_run_ok()

    # ---------------------------------------------------------------- classification
    def _is_site(self, n: fx.Node) -> bool:
        if n.op == "call_module":
            m = self.modules.get(n.target)
            return isinstance(m, SiteModule) or isinstance(m, nn.modules.dropout._DropoutNd)
        if n.op == "call_function":
            if n.target in DROPOUT_FUNCS:
                return True
            name = aten_name(n.target)
            return name in ATEN_DROPOUT or name in _ATEN_RAND
        return False

    def _stochastic_closure(self) -> set[fx.Node]:
        out: set[fx.Node] = set()
        for n in self.nodes:
            if n in self.site_nodes or any(a in out for a in n.all_input_nodes):
                out.add(n)
        return out

    def _logical_sites(self) -> list[str]:
        """Sites as a user counts them: a dropcli site saved to TorchScript/.pt2 is one site
        (its where(<site>.dropcli_mc) nodes: one per output, e.g. a GRU site's sequence and state),
        not its several random ops."""
        names = []
        for n in self.nodes:
            if n.op == "call_function" and len(n.args) == 3 and isinstance(n.args[0], fx.Node) \
                    and n.args[0].op == "get_attr" and reads_mc(n.args[0].target):
                names.append(mc_owner(n.args[0].target))
        raw_rand = [n for n in self.site_nodes if aten_name(n.target) in _ATEN_RAND]
        others = [n for n in self.site_nodes if n not in raw_rand]
        names += [str(n.target) if n.op == "call_module" else n.name for n in others]
        if not names:
            names = [n.name for n in raw_rand]
        return list(dict.fromkeys(names))

    @property
    def n_sites(self) -> int:
        return len(self._logical_sites())

    def describe_sites(self) -> list[str]:
        return self._logical_sites()

    def _eval_in_run_ok(self) -> bool:
        """Whether :meth:`run` may compute the deterministic pass beside the MC samples, from the
        prefix values it has already computed on the B examples: only when that pass is the same
        computation as ``run_eval``'s, node for node. So: no dropcli site or mc flag (``set_mc``
        switches them for the deterministic pass), every site a stock dropout that is the identity
        in eval mode (a module in eval mode, an aten dropout with ``train=False``), and no in-place
        op after the first site (it could write into a prefix value the MC path still reads)."""
        if any(is_mc_buffer(name) for name, _ in self.gm.named_buffers()):
            return False
        if any(isinstance(m, SiteModule) for m in self.modules.values()):
            return False
        for n in self.site_nodes:
            if n.op == "call_module":
                m = self.modules.get(n.target)
                if not isinstance(m, nn.modules.dropout._DropoutNd) or m.training:
                    return False
            elif n.op == "call_function" and aten_name(n.target) in ATEN_DROPOUT:
                train = n.args[2] if len(n.args) > 2 else n.kwargs.get("train")
                if train is not False:
                    return False
            else:
                return False
        for n in self.stochastic:
            name = aten_name(n.target) if n.op == "call_function" else (n.target if n.op == "call_method" else "")
            if isinstance(name, str) and name.endswith("_") and not name.endswith("__"):
                return False
            if n.op == "call_function" and getattr(n.target, "__name__", "") in _INPLACE_OPERATORS:
                return False
            if n.op == "call_function" and isinstance(n.kwargs.get("out"), fx.Node):
                return False
        return True

    # ---------------------------------------------------------------- execution
    def _call(self, n: fx.Node, args: tuple, kwargs: dict, stochastic: bool) -> Any:
        if n.op == "call_module":
            m = self.modules[n.target]
            if stochastic and isinstance(m, nn.modules.dropout._DropoutNd) and not isinstance(m, SiteModule):
                return _inverted_dropout(args[0], float(m.p), feature=not isinstance(m, nn.Dropout))
            return m(*args, **kwargs)
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        tgt = n.target
        if stochastic:
            name = aten_name(tgt)
            if tgt in DROPOUT_FUNCS or name in ATEN_DROPOUT:
                p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
                out = _inverted_dropout(args[0], float(p), feature=(name or getattr(tgt, "__name__", "")).startswith("feature") or "2d" in getattr(tgt, "__name__", ""))
                return (out, torch.ones_like(out, dtype=torch.bool)) if name == "native_dropout" else out
            if name in ("rand_like", "rand"):
                return uniform_like(args[0] if name == "rand_like" else torch.empty(args[0], device=self.device))
            if name in ("randn_like", "randn"):
                return normal_like(args[0] if name == "randn_like" else torch.empty(args[0], device=self.device))
            if name == "bernoulli":
                x = args[0]
                return (uniform_like(x) < x).to(x.dtype)
        return tgt(*args, **kwargs)

    def run(self, inputs: Sequence[torch.Tensor], indices: Sequence[int], seed: int, T: int,
            t0: int = 0, capture: Sequence[fx.Node] = (), with_eval: bool = False) -> torch.Tensor:
        """Outputs of T samples for B examples: a tensor [B, T, ...] (first model output).

        ``capture``: intermediate nodes whose values are kept in ``self.captured`` as [B, T, ...]
        tensors (``dropcli analyze`` reads the units after each site this way).

        ``with_eval`` (and :attr:`eval_in_run`): the deterministic pass is computed too, into
        ``self.eval_out`` ([B, ...], what :meth:`run_eval` returns for these inputs, bit for bit):
        the nodes after the first site are evaluated once more on the B examples, reading the
        prefix values this run computed, so the prefix is not computed a second time."""
        B0 = inputs[0].shape[0]
        if B0 < self.min_rows:
            # BLAS takes other code paths for tiny matrices, which changes the last bits of a
            # row's result; padding to MIN_ROWS rows keeps results independent of batch size.
            pad = self.min_rows - B0
            inputs = [torch.cat([x, x[:1].expand((pad,) + tuple(x.shape[1:]))]) for x in inputs]
            indices = list(indices) + [-1 - k for k in range(pad)]
        B = inputs[0].shape[0]
        env_b: dict[fx.Node, Any] = {}
        env_t: dict[fx.Node, Any] = {}
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(placeholders) != len(inputs):
            raise DropcliError(f"the model takes {len(placeholders)} inputs, got {len(inputs)}")
        for n, x in zip(placeholders, inputs):
            env_b[n] = x.to(self.device)

        def get_b(a: fx.Node) -> Any:
            return env_b[a]

        def get_t(a: fx.Node) -> Any:
            """A prefix value as the suffix sees it: batch tensors tiled, sizes recomputed."""
            if a in env_t:
                return env_t[a]
            v = env_b[a]
            if _is_tensor_like(v) and a in self.rebuilt:
                v = self._eval_node(a, get_t, stochastic=False)  # an index or a size-made tensor: at B*T rows
            elif _is_tensor_like(v):
                d = self._batch_dim(a)  # from export's symbolic shapes, when it knows
                if d is None or d >= v.dim() or v.shape[d] != B:
                    d = 0 if v.dim() > 0 and v.shape[0] == B else None
                if d is not None and a in self.input_dependent:
                    # the batch is not always dim 0: an RNN's zero state [layers, B, H] made before the first site
                    v = v.repeat_interleave(T, dim=d)
            elif a.op in ("call_function", "call_method", "call_module"):
                v = self._eval_node(a, get_t, stochastic=False)
            env_t[a] = v
            return v

        noise = KeyedNoise(seed, indices, t0, t0 + T, self.device)
        noise.alloc = lambda call, shape, dtype: self._buf(("mask", call), shape, dtype)
        want = set(capture)
        self.captured: dict[fx.Node, torch.Tensor] = {}
        self.eval_out = None
        env_e: dict[fx.Node, Any] | None = {} if with_eval and self.eval_in_run else None

        def get_e(a: fx.Node) -> Any:
            """A value of the deterministic pass: the suffix's own, else the prefix's (on B rows)."""
            return env_e[a] if a in env_e else env_b[a]
        with torch.no_grad(), noise_source(noise):
            result = None
            for k, n in enumerate(self.nodes):
                if n.op == "placeholder":
                    continue
                if n.op == "get_attr":
                    env_b[n] = fetch_attr(self.gm, n.target)
                    env_t[n] = env_b[n]
                    continue
                if n.op == "output":
                    out = n.args[0]
                    first = _first_output(out)
                    result = get_t(first) if isinstance(first, fx.Node) else first
                    if env_e is not None:
                        self.eval_out = get_e(first)[:B0] if isinstance(first, fx.Node) else None
                    break
                if n in self.stochastic:
                    if n in self.site_nodes:
                        v = self._site_on_untiled(n, env_b, B, T, noise)
                        v = v if v is not None else self._eval_node(n, get_t, stochastic=True)
                    else:
                        v = self._in_buffer(n, get_t)
                        v = v if v is not None else self._eval_node(n, get_t, stochastic=False)
                    env_t[n] = v
                    if env_e is not None:
                        env_e[n] = self._eval_node(n, get_e, stochastic=False)
                else:
                    env_b[n] = self._eval_node(n, get_b, stochastic=False)
                if n in want:
                    v = get_t(n)
                    self.captured[n] = self._unshared(v.reshape((B, T) + tuple(v.shape[1:]))[:B0])
                for dead in self.frees.get(k, ()):
                    env_b.pop(dead, None)
                    env_t.pop(dead, None)
                    if env_e is not None:
                        env_e.pop(dead, None)
        if not _is_tensor_like(result):
            raise DropcliError("the model's first output is not a tensor")
        return self._unshared(result.reshape((B, T) + tuple(result.shape[1:]))[:B0])

    # ---------------------------------------------------------------- buffers reused across chunks
    def _buf(self, key: Any, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        b = self._bufs.get(key)
        if b is None or tuple(b.shape) != tuple(shape) or b.dtype != dtype:
            self._bufs.pop(key, None)  # free the old one first
            b = self._bufs[key] = torch.empty(shape, dtype=dtype, device=self.device)
        return b

    def release(self) -> None:
        """Free the buffers kept between chunks (the next run allocates them again)."""
        self._bufs.clear()

    def _unshared(self, v: torch.Tensor) -> torch.Tensor:
        """``v``, copied if it lives in a buffer that the next chunk overwrites (a value returned
        to the caller must stay valid)."""
        if self._bufs and _is_tensor_like(v):
            ptr = v.untyped_storage().data_ptr()
            if any(b.untyped_storage().data_ptr() == ptr for b in self._bufs.values()):
                return v.clone()
        return v

    def _in_buffer(self, n: fx.Node, get: Callable[[fx.Node], Any]) -> torch.Tensor | None:
        """A suffix Linear computed into its node's buffer (``addmm`` with ``out=``: the same call
        ``F.linear`` makes on a 2-d input, so the same bits), or a ReLU applied in place to such a
        value (one of the buffers itself, not a view of one) when nothing else reads it; None:
        evaluate the node as usual."""
        if n.op != "call_function":
            return None
        name = aten_name(n.target)
        if name == "linear" or n.target is torch.nn.functional.linear:
            args = fx.node.map_arg(n.args, get)
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else n.kwargs.get("bias")
            if n.kwargs.keys() - {"bias"} or not all(_is_tensor_like(t) for t in (x, w)) or x.dim() != 2 \
                    or w.dim() != 2 or not x.is_contiguous() or not x.is_floating_point() or x.dtype != w.dtype \
                    or x.device != self.device or (b is not None and (not _is_tensor_like(b) or b.dtype != x.dtype)):
                return None
            out = self._buf(n, (x.shape[0], w.shape[0]), x.dtype)
            if b is None:
                return torch.mm(x, w.t(), out=out)
            return torch.addmm(b, x, w.t(), out=out)
        if name == "relu" or n.target in (torch.relu, torch.nn.functional.relu):
            a = n.args[0] if n.args else None
            if len(n.args) == 1 and not n.kwargs and isinstance(a, fx.Node) and len(a.users) == 1:
                v = get(a)
                if any(v is b for b in self._bufs.values()):
                    return torch.relu_(v)
        return None

    def _plain_dropout_p(self, n: fx.Node) -> float | None:
        """p of a stock elementwise dropout node (nn.Dropout, F.dropout, aten.dropout), else None."""
        if n.op == "call_module":
            m = self.modules.get(n.target)
            return float(m.p) if type(m) is nn.Dropout else None
        if n.op == "call_function" and (n.target is torch.nn.functional.dropout or aten_name(n.target) == "dropout"):
            p = n.args[1] if len(n.args) > 1 else n.kwargs.get("p", 0.5)
            return float(p) if isinstance(p, (int, float)) else None
        return None

    def _site_on_untiled(self, n: fx.Node, env_b: dict, B: int, T: int, noise: KeyedNoise) -> torch.Tensor | None:
        """Stock dropout right after the prefix, on a value [B, ...] that nothing else reads: the
        mask [B*T, ...] is multiplied in place by the value seen as [B, 1, ...], so the T copies of
        the value are never written (the same products and the same draw as the tiled path)."""
        p = self._plain_dropout_p(n)
        a = n.args[0] if n.args else None
        if p is None or not 0.0 < p < 1.0 or not isinstance(a, fx.Node) or a not in env_b or len(a.users) != 1:
            return None
        v = env_b[a]
        if not _is_tensor_like(v) or a not in self.input_dependent or v.dim() < 1 or v.shape[0] != B \
                or self._batch_dim(a) not in (None, 0) or not v.is_floating_point():
            return None
        q = 1.0 - p
        rest = tuple(v.shape[1:])
        mask = noise.mask_like(torch.empty((B * T,) + rest, dtype=v.dtype, device=v.device), q, 1.0 / q)
        mask.view((B, T) + rest).mul_(v.unsqueeze(1))
        return mask

    def _batch_dim(self, n: fx.Node) -> int | None:
        """The dim of ``n``'s value that is the batch, from export's symbolic shapes (None if unknown)."""
        batch = getattr(self, "_batch_sym", False)
        if batch is False:
            batch = None
            ph = next((p for p in self.nodes if p.op == "placeholder"), None)
            val = ph.meta.get("val") if ph is not None else None
            if isinstance(val, torch.Tensor) and val.dim() > 0 and isinstance(val.shape[0], torch.SymInt):
                batch = val.shape[0].node.expr
            self._batch_sym = batch
        val = n.meta.get("val")
        if batch is None or not isinstance(val, torch.Tensor):
            return None
        dims = [i for i, s in enumerate(val.shape) if isinstance(s, torch.SymInt) and s.node.expr == batch]
        return dims[0] if len(dims) == 1 else None

    def probe_row_bytes(self, inputs: Sequence[torch.Tensor]) -> int:
        """Bytes per tiled row of all suffix values (run on one example, T=1)."""
        sizes: list[int] = []
        orig = self._call

        def spy(n, args, kwargs, stochastic):
            out = orig(n, args, kwargs, stochastic)
            if n in self.stochastic and isinstance(out, torch.Tensor) and out.dim() > 0:
                sizes.append(out[0].numel() * out.element_size())
            return out

        self._call = spy  # type: ignore[method-assign]
        try:
            self.run(inputs, [0], seed=0, T=1)
        finally:
            self._call = orig  # type: ignore[method-assign]
        return max(1, sum(sizes))

    def _eval_node(self, n: fx.Node, get: Callable[[fx.Node], Any], stochastic: bool) -> Any:
        args = fx.node.map_arg(n.args, get)
        kwargs = fx.node.map_arg(n.kwargs, get)
        return self._call(n, args, kwargs, stochastic)

    def run_eval(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The deterministic (inference-mode) pass."""
        B0 = inputs[0].shape[0]
        if B0 < self.min_rows:
            inputs = [torch.cat([x, x[:1].expand((self.min_rows - B0,) + tuple(x.shape[1:]))]) for x in inputs]
        set_mc(self.gm, False)
        try:
            with torch.no_grad():
                out = self.gm(*[x.to(self.device) for x in inputs])
        finally:
            set_mc(self.gm, True)
        return _first_output(out)[:B0]


def _first_output(out: Any) -> Any:
    while isinstance(out, (tuple, list)):
        if not out:
            return None
        out = out[0]
    if isinstance(out, dict):
        return next(iter(out.values()))
    return out


def _inverted_dropout(x: torch.Tensor, p: float, feature: bool = False) -> torch.Tensor:
    q = 1.0 - p
    if q <= 0:
        return torch.zeros_like(x)
    if feature and x.dim() > 2:  # one mask per (sample, channel)
        keep = keep_mask_like(x[(slice(None), slice(None)) + (slice(0, 1),) * (x.dim() - 2)], q)
        return torch.mul(x, keep).mul_(1.0 / q)
    return apply_keep(x, q, 1.0 / q)
