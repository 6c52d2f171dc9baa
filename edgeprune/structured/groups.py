"""Coupled channel groups and attention heads, from torch-pruning's DependencyGraph, and their removal.

A *group* is what has to be pruned together so the network still computes: a conv's output channels,
its BatchNorm, the next conv's input channels, every layer tied to them by a residual add or a concat,
the depthwise conv in between, ... torch-pruning's ``DependencyGraph`` finds those couplings by tracing;
nothing here re-derives them. This module only

- names each group after its first layer (in module order) and gives it a role, so rules can address it;
- turns attention blocks (timm ``Attention`` / ``WindowAttention``: a ``qkv`` Linear and ``num_heads``)
  into *head* groups, pruned as whole heads, never as single head dimensions;
- removes the chosen units through the graph (physically: the layers get smaller) and fixes the
  attention modules' ``num_heads`` / ``attn_dim`` and per-head parameters (Swin's relative position
  bias table) that the graph cannot see.

The classifier's outputs are never pruned (it is excluded as a group root) and the model's input
channels are never pruned (no graph node owns them).
"""

from __future__ import annotations

import contextlib
import copy
import json
import linecache
import traceback
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import graph as tp_graph

from ..errors import EdgepruneError, UnsupportedModelError
from ..inventory import NORM_TYPES, build_inventory
from ..masking import Masks
from ..recover import content_digest

ROOT_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

# When a group couples layers of several roles, the group takes the first of these it contains: the
# most fragile part decides how hard the group may be pruned (e.g. a ResNet stage's residual stream
# contains the downsample conv, so it is a "downsample" group, not a plain "conv" group).
ROLE_PRIORITY: tuple[str, ...] = (
    "qkv", "patch_embed", "stem", "downsample", "head", "attn_proj", "mlp_fc1", "mlp_fc2", "depthwise",
    "conv", "linear", "se",
)  # fmt: skip


@dataclass
class ChannelGroup:
    """One prunable group. Its *units* are what gets removed: single channels, or whole heads."""

    name: str  # the group's first layer (module order); for heads, the attention block's qkv layer
    role: str  # see ROLE_PRIORITY; "qkv" for head groups
    kind: str  # "channels" | "heads"
    units: int  # channels, or heads
    unit_size: int  # channels per unit: 1, or head_dim for heads
    params: int  # weights of the conv/linear layers the group's channels run through (whole tensors)
    depth: float = 0.0  # 0 = first group in module order, 1 = last
    layers: tuple[str, ...] = ()  # conv/linear/norm layers in the group
    index: int = 0

    @property
    def channels(self) -> int:
        return self.units * self.unit_size

    def unit_channels(self, unit: int) -> list[int]:
        """Channel indices (in the group root's numbering) that make up ``unit``."""
        return list(range(unit * self.unit_size, (unit + 1) * self.unit_size))


@dataclass
class _Root:
    """How to ask the dependency graph for a group: the root module and the pruning function."""

    module: nn.Module
    fn: object
    attention: nn.Module | None = None  # head groups: the attention block
    head_params: list[tuple[str, int]] = field(default_factory=list)  # (param name in block, head dim)


class SwinPatchMergingPruner(tp.BasePruningFunc):
    """timm Swin ``PatchMerging`` for the dependency graph: it concatenates each channel of a 2x2 patch
    four times (channel c sits at c + k*dim, k = 0..3) before its LayerNorm and Linear, a reshape the
    graph's index mapping cannot follow, so the block is pruned as one unit (as in torch-pruning's own
    Swin example for the Hugging Face model)."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        tp.prune_linear_out_channels(layer.reduction, list(idxs))
        layer.out_dim = layer.reduction.out_features
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        dim = layer.dim
        repeated = [i + k * dim for k in range(4) for i in idxs]
        tp.prune_linear_in_channels(layer.reduction, repeated)
        tp.prune_layernorm_out_channels(layer.norm, repeated)
        layer.dim = dim - len(idxs)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.reduction.out_features

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.dim


def customized_pruners() -> dict[type, tp.BasePruningFunc]:
    """Layer types the dependency graph needs help with (imported lazily: timm is big)."""
    from timm.models.swin_transformer import PatchMerging

    return {PatchMerging: SwinPatchMergingPruner()}


def attention_blocks(model: nn.Module) -> dict[nn.Module, nn.Module]:
    """qkv Linear -> its attention block, for blocks that split qkv into ``num_heads`` heads."""
    out = {}
    for module in model.modules():
        qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
        heads = getattr(module, "num_heads", None)
        if isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(heads, int) and heads > 0:
            out[qkv] = module
    return out


def _per_head_params(block: nn.Module) -> list[tuple[str, int]]:
    """Direct parameters of an attention block with one slice per head (e.g. relative position bias)."""
    out = []
    for name, p in block.named_parameters(recurse=False):
        dims = [d for d, s in enumerate(p.shape) if s == block.num_heads]
        if dims:
            out.append((name, dims[-1]))
    return out


def _innermost_module(model: nn.Module, exc: BaseException) -> str | None:
    """Name of the innermost module of ``model`` whose code was running when ``exc`` was raised."""
    names = {id(m): n for n, m in model.named_modules()}
    found = None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        obj = frame.f_locals.get("self")
        if isinstance(obj, nn.Module) and id(obj) in names:
            found = f"{names[id(obj)] or '<model>'} ({type(obj).__name__})"
            if not names[id(obj)]:  # the model's own forward: its name says nothing, the failing line does
                line = linecache.getline(frame.f_code.co_filename, lineno).strip()
                found = f"the model's own {type(obj).__name__}.{frame.f_code.co_name} at `{line[:80]}`"
    return found


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # torch-pruning warns about every unwrapped parameter (cls_token, pos_embed, layer scales) it handles.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class _Unbounded(Exception):
    """torch-pruning's traversal of one group grew past what any group of this graph can hold."""

    def __init__(self, root: object):
        super().__init__(root)
        self.root = root


@dataclass(frozen=True)
class _TraversalBounds:
    """What no real group of one graph exceeds (see `_bounded_traversal`): items and indices per item."""

    items: int
    idxs: int

    @classmethod
    def of(cls, dg: tp.DependencyGraph, model: nn.Module) -> _TraversalBounds:
        deps = sum(len(node.dependencies) for node in dg.module2node.values())
        widths = [
            w
            for m in model.modules()
            for w in (
                (m.in_features, m.out_features)
                if isinstance(m, nn.Linear)
                else (m.in_channels, m.out_channels)
                if isinstance(m, nn.modules.conv._ConvNd)
                else ()
            )
        ]
        return cls(items=2 * deps + 100, idxs=2 * max(widths, default=1))


@contextlib.contextmanager
def _bounded_traversal(bounds: _TraversalBounds) -> Iterator[None]:
    """Stop torch-pruning's group traversal once it cannot be a real group any more.

    On some graphs (timm's EfficientViT-M, LeViT-conv, EfficientFormerV2: a reshape between conv features and
    attention tokens inside a cycle) ``get_pruning_group`` never terminates: every lap maps the indices
    through the reshape again, so they multiply and never repeat (known upstream, e.g. Torch-Pruning #397 and
    #532). It ate 23 GB in 15 minutes here before the kernel killed it. A real group holds each dependency a
    few times at most (measured: at most 1/3 of the graph's dependencies on 10 timm families) and never more
    indices than the widest layer has channels, so a traversal past twice either bound (``bounds``, from the
    unpruned model: pruning only narrows it) is stopped and raised as `_Unbounded`, naming its root. The graph
    module looks ``Group`` up at call time, so the bounded class is swapped in for the duration only."""
    plain = tp_graph.Group

    class Bounded(plain):
        def add_dep(self, dep, idxs):
            super().add_dep(dep, idxs)
            if len(self) > bounds.items or len(idxs) > bounds.idxs:
                raise _Unbounded(self[0].dep.target.module)

    tp_graph.Group = Bounded
    try:
        yield
    finally:
        tp_graph.Group = plain


def check_forward(model: nn.Module, example: torch.Tensor) -> None:
    """Run a pruned ``model`` once; a failure becomes an UnsupportedModelError naming the layer that broke."""
    try:
        with torch.no_grad():
            model.eval()(example)
    except Exception as exc:  # noqa: BLE001 - any failure here means the graph mis-pruned a layer
        where = _innermost_module(model, exc) or "an unknown layer"
        raise UnsupportedModelError(
            f"channel pruning breaks layer {where} ({_one_line(exc)}): torch-pruning's dependency graph does not "
            "follow its channels; use --granularity unstructured for this model"
        ) from exc


class GroupGraph:
    """torch-pruning's DependencyGraph over one model, with named groups (``groups``) and unit removal."""

    def __init__(self, model: nn.Module, example: torch.Tensor):
        self.model = model
        self.example = example
        self.blocks = attention_blocks(model)
        head_tables = []
        for block in self.blocks.values():
            for pname, _ in _per_head_params(block):
                head_tables.append(getattr(block, pname))
        was_training = model.training
        model.eval()
        try:
            with _quiet():
                # Per-head tables are pruned here, by head; the graph would map channel indices onto them.
                self.dg = tp.DependencyGraph().build_dependency(
                    model, example_inputs=example, ignored_params=head_tables, customized_pruners=customized_pruners()
                )
        except Exception as exc:  # noqa: BLE001 - tracing failures come in every type
            where = _innermost_module(model, exc) or "an untraceable layer"
            raise UnsupportedModelError(
                f"the dependency graph cannot trace layer {where}: {_one_line(exc)}; "
                "use --granularity unstructured for this model"
            ) from exc
        finally:
            model.train(was_training)
        self._bounds = _TraversalBounds.of(self.dg, model)
        self._names = {m: n for n, m in model.named_modules()}
        self.roles = {layer.name: layer.role for layer in build_inventory(model)}
        self._custom = tuple(customized_pruners())
        self._roots: dict[str, _Root] = {}
        self.groups: list[ChannelGroup] = self._discover()

    # -- discovery ---------------------------------------------------------------------------------------

    def _discover(self) -> list[ChannelGroup]:
        dg = self.dg
        order = {m: i for i, m in enumerate(self.model.modules())}
        classifier = [m for n, m in self.model.named_modules() if self.roles.get(n) == "classifier"]
        found: list[tuple[int, ChannelGroup]] = []
        try:
            with _quiet(), _bounded_traversal(self._bounds):
                all_groups = list(dg.get_all_groups(ignored_layers=classifier, root_module_types=ROOT_TYPES))
        except _Unbounded as exc:
            where = self._names.get(exc.root, type(exc.root).__name__)
            raise UnsupportedModelError(
                f"the dependency graph does not terminate on the group of layer {where} (torch-pruning's index "
                "mapping grows without end on this graph); use --granularity unstructured for this model"
            ) from None
        for group in all_groups:
            root = group[0].dep.target.module
            out_layers = [
                d.target.module
                for d, _ in group
                if isinstance(d.target.module, (*ROOT_TYPES, *self._custom)) and dg.is_out_channel_pruning_fn(d.handler)
            ]
            if not out_layers:
                continue
            block = next((self.blocks[m] for m in out_layers if m in self.blocks), None)
            members = [d.target.module for d, _ in group if isinstance(d.target.module, (*ROOT_TYPES, *NORM_TYPES))]
            params = sum(
                w.weight.numel() for m in {*members, *out_layers} for w in m.modules() if isinstance(w, ROOT_TYPES)
            )
            layer_names = tuple(
                sorted({self._names[m] for m in members}, key=lambda n: order[self.model.get_submodule(n)])
            )
            if block is not None:
                g = self._head_group(block, params, layer_names)
                if g is None:
                    continue
            else:
                first = min(out_layers, key=lambda m: order.get(m, 1 << 30))
                name = self._names[first]
                roles = {self._role(self._names[m]) for m in out_layers}
                role = next((r for r in ROLE_PRIORITY if r in roles), "conv")
                channels = dg.get_out_channels(root)
                if not channels or channels < 2:
                    continue
                self._roots[name] = _Root(root, dg.get_pruner_of_module(root).prune_out_channels)
                g = ChannelGroup(name, role, "channels", channels, 1, params, layers=layer_names)
            found.append((order.get(self.model.get_submodule(g.name), 0), g))
        groups = [g for _, g in sorted(found, key=lambda item: item[0])]
        for i, g in enumerate(groups):
            g.index = i
            g.depth = i / max(1, len(groups) - 1)
        return groups

    def _role(self, name: str) -> str:
        """Inventory role of a layer; for a composite layer (Swin PatchMerging) the role of its first conv/linear."""
        if name in self.roles:
            return self.roles[name]
        return next((r for n, r in self.roles.items() if n.startswith(name + ".") and r != "norm"), "conv")

    def _head_group(self, block: nn.Module, params: int, layers: tuple[str, ...]) -> ChannelGroup | None:
        # Re-root the group at the output projection's input channels (as torch-pruning's MetaPruner
        # does): there, channel c belongs to head c // head_dim, and the graph maps it to q, k and v.
        proj = block.proj
        if proj.in_features % block.num_heads:
            return None
        name = self._names[block.qkv]
        head_dim = proj.in_features // block.num_heads
        self._roots[name] = _Root(proj, tp.prune_linear_in_channels, block, _per_head_params(block))
        return ChannelGroup(name, "qkv", "heads", block.num_heads, head_dim, params, layers=layers)

    def group(self, name: str) -> ChannelGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def full_group(self, name: str) -> tp.dependency.Group:
        """The torch-pruning group of ``name`` with every channel (what importance criteria score)."""
        root = self._roots[name]
        g = self.group(name)
        return self.dg.get_pruning_group(root.module, root.fn, list(range(g.channels)))

    # -- removal -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def remove(self, units: Mapping[str, Sequence[int]]) -> None:
        """Physically remove the given units (channel or head indices) of each named group.

        Groups are disjoint, so each one's indices stay valid while the others shrink.
        """
        for name, idxs in units.items():
            idxs = sorted({int(i) for i in idxs})
            if not idxs:
                continue
            g = self.group(name)
            if idxs[0] < 0 or idxs[-1] >= g.units:
                raise EdgepruneError(f"group {name} has {g.units} {g.kind}; cannot remove unit {idxs[-1]}")
            if len(idxs) >= g.units:
                raise EdgepruneError(
                    f"group {name}: removing all {g.units} {g.kind} would cut the network; keep at least one"
                )
            root = self._roots[name]
            channels = [c for u in idxs for c in g.unit_channels(u)]
            try:
                with _quiet(), _bounded_traversal(self._bounds):
                    self.dg.get_pruning_group(root.module, root.fn, channels).prune()
            except Exception as exc:  # noqa: BLE001 - _Unbounded too: the same one-line stop
                raise UnsupportedModelError(
                    f"the dependency graph cannot prune group {name} (layers {', '.join(g.layers[:4])}): "
                    f"{_one_line(exc)}; use --granularity unstructured for this model"
                ) from exc
            if root.attention is not None:
                self._shrink_heads(root, idxs)

    @staticmethod
    def _shrink_heads(root: _Root, heads: list[int]) -> None:
        block = root.attention
        assert block is not None
        for pname, dim in root.head_params:
            p = getattr(block, pname)
            keep = [h for h in range(p.shape[dim]) if h not in set(heads)]
            new = nn.Parameter(p.data.index_select(dim, torch.tensor(keep)).clone(), requires_grad=p.requires_grad)
            setattr(block, pname, new)
        block.num_heads -= len(heads)
        if hasattr(block, "attn_dim"):
            block.attn_dim = block.num_heads * block.head_dim


def compact(model: nn.Module, example: torch.Tensor, remove: dict[str, list[int]]) -> nn.Module:
    """A pruned deep copy of ``model``: the given units of each group physically removed."""
    pruned = copy.deepcopy(model)
    pruned.zero_grad(set_to_none=True)
    GroupGraph(pruned, example).remove(remove)
    check_forward(pruned, example)
    return pruned.eval()


@dataclass(frozen=True)
class CompactBuild:
    """Channel mode's `recover.Builder`: ``compact(dense, example, remove)``, the units physically removed (no
    masks). Picklable: a Ray worker replays the compaction from the dense weights it was shared."""

    remove: dict[str, list[int]]
    example: torch.Tensor  # one input, for tracing the dependency graph

    def build(self, dense: nn.Module) -> nn.Module:
        return compact(dense, self.example, self.remove)

    def train_masks(self) -> Masks:
        return {}

    def digest(self) -> str:
        units = json.dumps({k: sorted(v) for k, v in sorted(self.remove.items())})
        return content_digest("compact", units, str(tuple(self.example.shape[1:])))
