"""Hostile input files (issue 19): rules and target files, image folders and images, ONNX artifacts.

Each is refused with one line naming the file (and the field, for JSON files) before any job runs.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from . import Case

OUT = "out"


def _write(s: Path, name: str, content: str | bytes) -> str:
    path = s / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


def _rules(s: Path, content: object) -> list[str]:
    text = content if isinstance(content, (str, bytes)) else json.dumps(content)
    return ["inspect", "--rules", _write(s, "rules.json", text)]


def _rule(**fields: object) -> dict:
    return {"rules": [{"range": [0.0, 0.5], **fields}]}


def _targets(s: Path, content: object) -> list[str]:
    text = content if isinstance(content, (str, bytes)) else json.dumps(content)
    return ["targets", "--targets-file", _write(s, "targets.json", text)]


def _png(size: tuple[int, int] = (16, 16), mode: str = "L") -> bytes:
    import PIL.Image

    buf = io.BytesIO()
    PIL.Image.new(mode, size, 128).save(buf, "PNG")
    return buf.getvalue()


def _folder(s: Path, classes: tuple[str, ...] = ("a", "b"), extra: dict[str, bytes] | None = None) -> Path:
    """ROOT/<class>/<n>.png, two small images per class, plus ``extra`` files (relative path -> bytes)."""
    root = s / "images"
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            (root / c / f"{i}.png").write_bytes(_png())
    for rel, data in (extra or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _compress_on(s: Path, root: Path, *extra: str) -> list[str]:
    return ["compress", "--data", f"imagefolder:{root}", *extra, "--out", str(s / OUT), "-q"]


def _truncated_png() -> bytes:
    import numpy as np
    import PIL.Image

    buf = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    data = buf.getvalue()
    return data[: len(data) // 2]


def _bomb_png() -> bytes:
    # 9000 x 9000 one-bit pixels compress to ~10 KB; decoded as RGB they would be 243 MB.
    return _png((9000, 9000), "1")


def _onnx_bytes(kind: str) -> bytes:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])
    if kind == "no-nodes":
        graph = helper.make_graph([], "empty", [x], [y])
    else:  # a graph that computes a constant: nodes, but nothing to feed
        value = helper.make_tensor("v", TensorProto.FLOAT, [1, 1, 4, 4], [0.0] * 16)
        graph = helper.make_graph([helper.make_node("Constant", [], ["y"], value=value)], "const", [], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


CASES = [
    # ------------------------------------------------------------------------------------------- rules files
    Case(
        name="input-rules-name-not-string",
        what='rules file with `"name": 5`',
        expect="rules[0].name must be a regex string, got 5",
        argv=lambda s: _rules(s, _rule(name=5)),
    ),
    Case(
        name="input-rules-null-roles",
        what='rules file with `"roles": null`',
        expect="rules[0].roles must be a list of role names, got null",
        argv=lambda s: _rules(s, _rule(roles=None)),
    ),
    Case(
        name="input-rules-string-max-params",
        what='rules file with `"max_params": "abc"`',
        expect="rules[0].max_params must be an integer, got 'abc'",
        argv=lambda s: _rules(s, _rule(max_params="abc")),
    ),
    Case(
        name="input-rules-folder",
        what="a folder given as the rules file",
        expect="is a folder",
        argv=lambda s: ["inspect", "--rules", str(s)],
    ),
    Case(
        name="input-rules-binary",
        what="a binary file given as the rules file",
        expect="is not UTF-8 text",
        argv=lambda s: _rules(s, bytes(range(256)) * 16),
    ),
    Case(
        name="input-rules-deep-nesting",
        what="rules file nested 100 000 lists deep (json recursion)",
        expect="nests too deeply",
        argv=lambda s: _rules(s, "[" * 100_000 + "]" * 100_000),
    ),
    Case(
        name="input-rules-nan",
        what='rules file with `"range": [NaN, 0.5]`',
        expect="NaN is not allowed",
        argv=lambda s: _rules(s, '{"rules": [{"range": [NaN, 0.5]}]}'),
    ),
    Case(
        name="input-rules-catastrophic-regex",
        what="rules name pattern `^((([\\w.])|([\\w.]))+)+!` (exponential backtracking)",
        expect="nests a quantifier inside a quantifier",
        argv=lambda s: _rules(s, _rule(name=r"^((([\w.])|([\w.]))+)+!")),
    ),
    Case(
        name="input-rules-polynomial-regex",
        what="rules name pattern `\\w*\\w*\\w*\\w*!` (n^5 backtracking)",
        expect="at most 3 are allowed",
        argv=lambda s: _rules(s, _rule(name=r"\w*\w*\w*\w*!")),
    ),
    Case(
        name="input-rules-long-regex",
        what="rules name pattern of 1000 characters",
        expect="at most 200 are allowed",
        argv=lambda s: _rules(s, _rule(name="a" * 1000)),
    ),
    Case(
        name="input-rules-late-rules-not-list",
        what='rules file with `"late_rules": 3`',
        expect="late_rules must be a list of rules",
        argv=lambda s: _rules(s, {"rules": [], "late_rules": 3}),
    ),
    Case(
        name="input-compress-rules-bad-field",
        what='`compress --rules` with `"min_params": -5` (refused before anything loads)',
        expect="rules[0].min_params must be an integer in [0, inf], got -5",
        argv=lambda s: [
            "compress",
            "--rules",
            _rules(s, _rule(min_params=-5))[-1],
            "--data",
            f"imagefolder:{s / 'missing'}",
            "--out",
            str(s / OUT),
            "-q",
        ],
    ),
    # ----------------------------------------------------------------------------------------- target files
    Case(
        name="input-targets-base-list",
        what='targets file with `"base": ["rpi4"]`',
        expect="base must be the name of a target",
        argv=lambda s: _targets(s, {"b": {"base": ["rpi4"], "threads": 2}}),
    ),
    Case(
        name="input-targets-folder",
        what="a folder given as the targets file",
        expect="is a folder",
        argv=lambda s: ["targets", "--targets-file", str(s)],
    ),
    Case(
        name="input-targets-deep-nesting",
        what="targets file nested 100 000 objects deep",
        expect="nests too deeply",
        argv=lambda s: _targets(s, '{"a":' * 100_000 + "1" + "}" * 100_000),
    ),
    Case(
        name="input-targets-threads-string",
        what='targets file with `"threads": "four"`',
        expect="threads must be a positive integer, got 'four'",
        argv=lambda s: _targets(s, {"b": {"base": "rpi4", "threads": "four"}}),
    ),
    # ------------------------------------------------------------------------------ image folders and images
    Case(
        name="input-image-truncated",
        what="image folder with a truncated PNG",
        expect="image file is truncated",
        argv=lambda s: _compress_on(s, _folder(s, extra={"a/cut.png": _truncated_png()})),
    ),
    Case(
        name="input-image-decompression-bomb",
        what="image folder with a 9000×9000 PNG of 10 KB (decompression bomb)",
        expect="decompression bomb",
        argv=lambda s: _compress_on(s, _folder(s, extra={"b/bomb.png": _bomb_png()})),
    ),
    Case(
        name="input-image-empty-file",
        what="image folder with a 0-byte .png",
        expect="empty file (0 bytes)",
        argv=lambda s: _compress_on(s, _folder(s, extra={"a/zero.png": b""})),
    ),
    Case(
        name="input-imagefolder-one-class",
        what="image folder with one class",
        expect="one class only",
        argv=lambda s: _compress_on(s, _folder(s, classes=("cats",))),
    ),
    Case(
        name="input-imagefolder-hidden-class",
        what="image folder whose second 'class' is `.ipynb_checkpoints/` (hidden folders are skipped)",
        expect="one class only",
        argv=lambda s: _compress_on(s, _folder(s, classes=("cats", ".ipynb_checkpoints"))),
    ),
    Case(
        name="input-image-size-too-small",
        what="`compress --image-size 4` on an image folder",
        expect="--image-size must be between 8 and 4096",
        argv=lambda s: _compress_on(s, _folder(s), "--image-size", "4"),
    ),
    Case(
        name="input-inspect-image-size-zero",
        what="`inspect --image-size 0`",
        expect="--image-size must be between 8 and 4096",
        argv=lambda s: ["inspect", "--image-size", "0"],
    ),
    # -------------------------------------------------------------------------------------- ONNX artifacts
    Case(
        name="input-bench-not-onnx",
        what="`bench` on a text file named .onnx",
        expect="is not an ONNX model",
        argv=lambda s: ["bench", _write(s, "model.onnx", "hello, I am not a model\n")],
    ),
    Case(
        name="input-verify-not-onnx",
        what="`verify` on a text file named .onnx",
        expect="readable",
        argv=lambda s: ["verify", _write(s, "model.onnx", "hello, I am not a model\n")],
    ),
    Case(
        name="input-verify-empty-graph",
        what="`verify` on an ONNX model whose graph has no nodes",
        expect="failed verification (onnx.checker",
        argv=lambda s: ["verify", _write(s, "model.onnx", _onnx_bytes("no-nodes"))],
    ),
    Case(
        name="input-compress-image-size-zero",
        what="`compress --image-size 0` (refused before the demo data loads)",
        expect="--image-size must be between 8 and 4096",
        argv=lambda s: ["compress", "--image-size", "0", "--out", str(s / "out"), "-q"],
    ),
    Case(
        name="input-inspect-not-onnx",
        what="`inspect` on a text file named .onnx",
        expect="is not an ONNX model",
        argv=lambda s: ["inspect", _write(s, "model.onnx", "hello, I am not a model\n")],
    ),
    Case(
        name="input-inspect-run-without-report",
        what="`inspect` on a folder that is no compress --out (no report.json)",
        expect="has no report.json",
        argv=lambda s: ["inspect", str(s)],
    ),
    Case(
        name="input-inspect-foreign-report",
        what="`inspect` on a JSON file that is not an edgeprune report",
        expect="is not an edgeprune report this version reads",
        argv=lambda s: ["inspect", _write(s, "report.json", json.dumps({"model": "x", "accuracy": 0.9}))],
    ),
    Case(
        name="input-inspect-model-flags-on-a-path",
        what="`inspect PATH --model resnet18` (model flags do not apply to an artifact or a run)",
        expect="--model: a model's options, which do not apply to",
        argv=lambda s: ["inspect", _write(s, "model.onnx", b""), "--model", "resnet18"],
    ),
    Case(
        name="input-bench-empty-file",
        what="`bench` on a 0-byte .onnx",
        expect="is empty (0 bytes)",
        argv=lambda s: ["bench", _write(s, "model.onnx", b"")],
    ),
    Case(
        name="input-bench-empty-graph",
        what="`bench` on an ONNX model whose graph has no nodes",
        expect="graph has no nodes",
        argv=lambda s: ["bench", _write(s, "model.onnx", _onnx_bytes("no-nodes"))],
    ),
    Case(
        name="input-inspect-empty-graph",
        what="`inspect` on an ONNX model whose graph has no nodes",
        expect="graph has no nodes",
        argv=lambda s: ["inspect", _write(s, "model.onnx", _onnx_bytes("no-nodes"))],
    ),
    Case(
        name="input-bench-no-inputs",
        what="`bench` on an ONNX model with no inputs (a constant)",
        expect="graph has no inputs",
        argv=lambda s: ["bench", _write(s, "model.onnx", _onnx_bytes("no-inputs"))],
    ),
    Case(
        name="input-bench-folder",
        what="`bench` on a folder",
        expect="is not a file",
        argv=lambda s: ["bench", str(s)],
    ),
]
