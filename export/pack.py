"""Sparse storage of zeroed weights (``--pack sparse``), and the ORT-format conversion (``--ort-format``).

Packed layout: each prunable weight whose sparse form is smaller moves from ``graph.initializer`` to
``graph.sparse_initializer`` as an ONNX ``SparseTensorProto`` with 1-D *linear* indices stored as
**int32** (the ONNX spec asks for int64; stock onnxruntime accepts int32 and densifies either at load).
int32 costs 4 bytes per nonzero instead of 8: a 90 %-sparse FP32 weight takes 20 % of its dense bytes
instead of 30 %. Because the indices are not the spec's int64, ``onnx.checker`` is run on the densified
twin (`unpack_dense`), which must carry exactly the weights of the dense-stored artifact (same digest).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeprune.errors import EdgepruneError

from .sparsity import _PASS_THROUGH, _WEIGHT_SLOTS, _sparse_to_dense

INDEX_BYTES = 4  # int32 linear indices


@dataclass
class PackResult:
    path: Path
    bytes: int
    gzip_bytes: int
    dense_bytes: int  # the dense-stored artifact this was packed from
    packed_tensors: int  # initializers stored sparse
    nonzeros: int  # stored values in the packed tensors
    floor_bytes: int  # value + index bytes of the prunable nonzeros: what no int32-index packing can beat

    @property
    def ratio(self) -> float:
        return self.bytes / max(1, self.dense_bytes)


def _prunable_initializer_names(graph: onnx.GraphProto) -> set[str]:
    """Initializers that are (or feed, through DequantizeLinear/Transpose/...) a Conv/Gemm/MatMul weight."""
    init_names = {i.name for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    names: set[str] = set()
    for node in graph.node:
        for slot in _WEIGHT_SLOTS.get(node.op_type, ()):
            if slot >= len(node.input):
                continue
            name = node.input[slot]
            while name not in init_names and name in producer and producer[name].op_type in _PASS_THROUGH:
                name = producer[name].input[0]
            if name in init_names:
                names.add(name)
    return names


def pack_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int, int]:
    """A copy of ``model`` with sparse-worthy prunable weights moved to sparse initializers.

    Returns (packed model, number of tensors packed, nonzeros stored in them).
    """
    packed = onnx.ModelProto()
    packed.CopyFrom(model)
    graph = packed.graph
    candidates = _prunable_initializer_names(graph)
    keep, sparse = [], []
    nnz_total = 0
    for init in graph.initializer:
        if init.name not in candidates:
            keep.append(init)
            continue
        array = numpy_helper.to_array(init)
        flat = array.ravel()
        nz = np.flatnonzero(flat)
        if array.size >= 2**31 or nz.size * (array.itemsize + INDEX_BYTES) >= array.nbytes:
            keep.append(init)  # dense is smaller (or int32 cannot index it)
            continue
        values = numpy_helper.from_array(flat[nz], init.name)
        indices = numpy_helper.from_array(nz.astype(np.int32), init.name + "_indices")
        sparse.append(helper.make_sparse_tensor(values, indices, list(array.shape)))
        nnz_total += int(nz.size)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    graph.sparse_initializer.extend(sparse)
    return packed, len(sparse), nnz_total


def compact_graph(model: onnx.ModelProto, keep: set[str]) -> dict[str, str]:
    """Shrink the graph's bookkeeping in place; returns {new name: old name} for renamed initializers.

    For a small model the names of a QDQ graph cost more than its sparse weights: intermediate values and
    scale/zero-point initializers get short names (graph inputs/outputs and the ``keep`` names stay),
    node names (optional) are dropped, and the all-zero zero points of int8 weight / int32 bias
    DequantizeLinear nodes (optional, 0 by default) are removed. Graphs with subgraphs (If/Loop) are
    left as they are.
    """
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return {}
    arrays = {i.name: i for i in graph.initializer}
    dtypes = {i.name: i.data_type for i in graph.initializer}
    dtypes.update({s.values.name: s.values.data_type for s in graph.sparse_initializer})
    # Drop all-zero zero points of int8 / int32 DequantizeLinear inputs (symmetric weights, biases).
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    dropped = set()
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and len(node.input) == 3 and node.input[0] in dtypes:
            zp = arrays.get(node.input[2])
            if (
                dtypes[node.input[0]] in (onnx.TensorProto.INT32, onnx.TensorProto.INT8)
                and zp is not None
                and uses.get(zp.name) == 1
                and not np.any(numpy_helper.to_array(zp))
            ):
                dropped.add(zp.name)
                del node.input[2]
    if dropped:
        kept_inits = [i for i in graph.initializer if i.name not in dropped]
        del graph.initializer[:]
        graph.initializer.extend(kept_inits)

    keep = set(keep) | {v.name for v in graph.input} | {v.name for v in graph.output} | {""}
    mapping: dict[str, str] = {}

    def short(name: str) -> str:
        if name in keep:
            return name
        if name not in mapping:
            candidate = f"_{len(mapping):x}"
            while candidate in keep:
                candidate += "_"
            mapping[name] = candidate
        return mapping[name]

    for node in graph.node:
        node.name = ""
        node.doc_string = ""
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    for init in graph.initializer:
        init.name = short(init.name)
    for sparse in graph.sparse_initializer:
        sparse.values.name = short(sparse.values.name)
        sparse.indices.name = sparse.values.name + "_i"
    for info in graph.value_info:  # kept: without them onnxruntime fuses differently (last-bit changes)
        info.name = short(info.name)
    return {new: old for old, new in mapping.items()}


def _same_weights(original: onnx.ModelProto, packed: onnx.ModelProto, renamed: dict[str, str]) -> bool:
    """Every initializer of ``original`` is in ``packed`` (under its new name) with equal values, or
    was an all-zero bias zero point that `compact_graph` dropped; nothing else was added."""
    before = {i.name: numpy_helper.to_array(i) for i in original.graph.initializer}
    for sparse in original.graph.sparse_initializer:
        before[sparse.values.name] = _sparse_to_dense(sparse)
    twin = unpack_dense(packed)
    after = {renamed.get(i.name, i.name): numpy_helper.to_array(i) for i in twin.graph.initializer}
    if set(after) - set(before):
        return False
    for name, a in before.items():
        if name not in after:
            if a.dtype not in (np.int32, np.int8) or np.any(a):
                return False
        elif a.dtype != after[name].dtype or a.shape != after[name].shape or not np.array_equal(a, after[name]):
            return False
    return True


def unpack_dense(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with every sparse initializer stored dense again (the input of `onnx.checker` and quantizers)."""
    if not len(model.graph.sparse_initializer):
        return model
    dense = onnx.ModelProto()
    dense.CopyFrom(model)
    arrays = [(s.values.name, _sparse_to_dense(s)) for s in dense.graph.sparse_initializer]
    del dense.graph.sparse_initializer[:]
    dense.graph.initializer.extend(numpy_helper.from_array(a, name) for name, a in arrays)
    return dense


def floor_bytes(model: onnx.ModelProto) -> int:
    """The least bytes the prunable weights can take with int32-index packing: for each weight, the
    smaller of its dense bytes and (value bytes + 4 index bytes) per nonzero. Everything else in the
    file (biases, scales, graph) comes on top."""
    from .sparsity import prunable_onnx_weights

    total = 0
    stored = {i.name: numpy_helper.to_array(i).itemsize for i in model.graph.initializer}
    stored.update({s.values.name: numpy_helper.to_array(s.values).itemsize for s in model.graph.sparse_initializer})
    for name, w in prunable_onnx_weights(model).items():
        itemsize = stored.get(name, 4)
        total += min(w.size * itemsize, int(np.count_nonzero(w)) * (itemsize + INDEX_BYTES))
    return total


def pack_sparse(src: str | Path, dst: str | Path, *, dense_reference: str | Path | None = None) -> PackResult:
    """Write the sparse-packed twin of the artifact ``src`` to ``dst``, checked to equal ``src`` exactly.

    Checks before renaming into place: the densified twin passes ``onnx.checker`` and has the same weights
    digest as ``src``; onnxruntime loads the packed file and its outputs on the embedded reference input
    are bit-identical to those of ``src``. ``dense_reference`` (default ``src``) is the size baseline.
    """
    from .metadata import PREFIX, file_sizes, load_artifact, set_metadata, weights_digest
    from .onnx_export import write_atomic

    src, dst = Path(src), Path(dst)
    model = unpack_dense(load_artifact(src))  # re-packing a packed file starts from its dense twin
    packed, n_tensors, nnz = pack_model(model)
    renamed = compact_graph(packed, keep={s.values.name for s in packed.graph.sparse_initializer})
    twin = unpack_dense(packed)
    try:
        onnx.checker.check_model(twin)
    except onnx.checker.ValidationError as exc:
        raise EdgepruneError(f"packed artifact is invalid: {str(exc).splitlines()[0]}") from exc
    if not _same_weights(model, packed, renamed):
        raise EdgepruneError("sparse packing changed the weights; use --pack dense")
    # The digest covers names, and scale/zero-point names changed: record the packed file's own.
    set_metadata(packed, {PREFIX + "packing": "sparse", PREFIX + "weights_sha256": weights_digest(packed)})
    _same_outputs(model, packed)
    write_atomic(packed, dst)
    sizes = file_sizes(dst)
    dense_bytes = (Path(dense_reference) if dense_reference else src).stat().st_size
    return PackResult(
        path=dst,
        bytes=sizes["bytes"],
        gzip_bytes=sizes["gzip_bytes"],
        dense_bytes=dense_bytes,
        packed_tensors=n_tensors,
        nonzeros=nnz,
        floor_bytes=floor_bytes(model),
    )


def _same_outputs(dense: onnx.ModelProto, packed: onnx.ModelProto) -> None:
    from .metadata import REFERENCE_BATCH, reference_inputs
    from .onnx_export import make_session, run_onnx

    shape = _input_shape(dense, REFERENCE_BATCH)
    x = reference_inputs(shape)
    try:
        got = run_onnx(make_session(packed), x)
    except Exception as exc:
        raise EdgepruneError(f"onnxruntime cannot load the sparse-packed artifact: {str(exc)[:200]}") from exc
    want = run_onnx(make_session(dense), x)
    if not all(np.array_equal(g, w) for g, w in zip(got, want, strict=True)):
        raise EdgepruneError("the sparse-packed artifact's outputs differ from the dense one; use --pack dense")


def _input_shape(model: onnx.ModelProto, batch: int) -> list[int]:
    """The first input's shape with the batch set to ``batch`` (from the embedded reference if dims are symbolic)."""
    import json

    dims = model.graph.input[0].type.tensor_type.shape.dim
    shape = [batch] + [d.dim_value if d.HasField("dim_value") else 0 for d in dims[1:]]
    if 0 in shape[1:]:
        meta = {p.key: p.value for p in model.metadata_props}
        ref = meta.get("edgeprune.reference")
        if not ref:
            raise EdgepruneError("the model's input shape is not fixed; export it with a fixed image size")
        shape = [batch, *json.loads(ref)["shape"][1:]]
    return shape


def to_ort_format(src: str | Path, dst: str | Path, *, arch: str = "aarch64") -> Path:
    """Convert the ONNX artifact ``src`` to ORT format (``.ort``) with onnxruntime's own converter.

    ``arch`` ("x86_64" or "aarch64") picks the converter's target platform: for Arm it leaves out the
    x86-only NCHWc layout transform so the file runs on both.
    """
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    src, dst = Path(src), Path(dst)
    with tempfile.TemporaryDirectory(prefix=".edgeprune-ort-", dir=dst.parent) as tmp:
        model_in = Path(tmp) / "model.onnx"
        shutil.copyfile(src, model_in)
        out_dir = Path(tmp) / "out"
        log = io.StringIO()
        # The converter logs every config file it writes, at INFO, through its own loggers.
        quiet = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith("ort_format")]
        levels = [q.level for q in quiet]
        for q in quiet:
            q.setLevel(logging.WARNING)
        try:
            with contextlib.redirect_stdout(log):
                convert_onnx_models_to_ort(
                    model_in,
                    output_dir=out_dir,
                    optimization_styles=[OptimizationStyle.Fixed],
                    target_platform="amd64" if arch == "x86_64" else "arm",
                )
        except Exception as exc:
            raise EdgepruneError(f"ORT-format conversion failed: {str(exc)[:300]}; drop --ort-format") from exc
        finally:
            for q, level in zip(quiet, levels, strict=True):
                q.setLevel(level)
        produced = sorted(out_dir.glob("*.ort"))
        if not produced:
            raise EdgepruneError(f"ORT-format conversion wrote no .ort file: {log.getvalue()[-300:]}")
        _check_ort_file(src, produced[0])
        os.replace(produced[0], dst)
    return dst


def _check_ort_file(src: Path, ort_file: Path) -> None:
    """The .ort must load and reproduce the embedded reference outputs (or the source's, within 1e-4)."""
    from .metadata import REFERENCE_BATCH, load_artifact, reference_inputs, reference_mismatch
    from .onnx_export import make_session, max_abs_diff, run_onnx

    model = load_artifact(src)
    x = reference_inputs(_input_shape(model, REFERENCE_BATCH))
    try:
        got = run_onnx(make_session(ort_file), x)
    except Exception as exc:
        raise EdgepruneError(f"onnxruntime cannot load the ORT-format file: {str(exc)[:200]}") from exc
    meta = {p.key: p.value for p in model.metadata_props}
    if "edgeprune.reference" in meta:
        import json

        bad = reference_mismatch(json.loads(meta["edgeprune.reference"]), got) > 1.0
    else:
        bad = max_abs_diff(got, run_onnx(make_session(model), x)) > 1e-4
    if bad:
        raise EdgepruneError("the ORT-format file's outputs differ from the ONNX artifact's; drop --ort-format")
