"""Input files validated by schema (issue 19): rules, targets, image folders, images, ONNX files, BN guard."""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from edgeprune.export.load import load_onnx_checked
from onnx import TensorProto, helper
from torch import nn

from edgeprune.data import MAX_IMAGE_PIXELS, list_imagefolder, load_data
from edgeprune.errors import DataError, EdgepruneError
from edgeprune.ranges import load_rules
from edgeprune.recovery import recalibrate_bn
from edgeprune.schema import MAX_PATTERN_CHARS, safe_pattern
from edgeprune.targets import available_targets


def _one_line(info: pytest.ExceptionInfo) -> str:
    text = str(info.value)
    assert "\n" not in text and text.strip() == text
    return text


# ------------------------------------------------------------------------------------------------ rules files


def _rules_error(tmp_path: Path, content: str | bytes) -> str:
    path = tmp_path / "my.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(EdgepruneError) as info:
        load_rules(None, path)
    text = _one_line(info)
    assert str(path) in text  # the file is named
    return text


def _rule(**fields: object) -> str:
    return json.dumps({"rules": [{"range": [0.0, 0.5]}, {"range": [0.1, 0.6], **fields}]})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (_rule(name=5), "rules[1].name must be a regex string, got 5"),
        (_rule(roles=None), "rules[1].roles must be a list of role names, got null"),
        (_rule(roles="conv"), "rules[1].roles must be a list of role names, got 'conv'"),
        (_rule(not_roles=["attention"]), "rules[1].not_roles has unknown role(s) ['attention']"),
        (_rule(max_params="abc"), "rules[1].max_params must be an integer, got 'abc'"),
        (_rule(max_params=True), "rules[1].max_params must be an integer, got True"),
        (_rule(min_params=-1), "rules[1].min_params must be an integer in [0, inf], got -1"),
        (_rule(max_share="half"), "rules[1].max_share must be a number, got 'half'"),
        (_rule(why=["x"]), "rules[1].why must be a string"),
        (json.dumps({"rules": [{"range": [0.1, "0.5"]}]}), "rules[0].range must be [min, max] (two numbers)"),
        (json.dumps({"rules": [{"roles": ["conv"]}]}), "rules[0]: missing range"),
        (json.dumps({"rules": [[0.1, 0.5]]}), "rules[0] must be an object"),
        (json.dumps({"rules": [], "late_rules": {"a": 1}}), "late_rules must be a list of rules"),
        (json.dumps({"rules": [], "structured": "x"}), "structured must be a list of rules"),
        ('{"rules": [{"range": [0.1, Infinity]}]}', "Infinity is not allowed in JSON"),
        ("[" * 100_000 + "]" * 100_000, "nests too deeply"),
        (bytes(range(256)) * 4, "is not UTF-8 text"),
        ("{not json", "is not valid JSON"),
    ],
)
def test_bad_rules_files_name_the_file_and_the_field(tmp_path: Path, content: str | bytes, message: str) -> None:
    assert message in _rules_error(tmp_path, content)


def test_a_folder_or_a_device_is_not_a_rules_file(tmp_path: Path) -> None:
    with pytest.raises(EdgepruneError, match="is a folder") as info:
        load_rules(None, tmp_path)
    _one_line(info)
    with pytest.raises(EdgepruneError, match="not a regular file"):
        load_rules(None, "/dev/zero")  # would never finish reading
    with pytest.raises(EdgepruneError, match="rules file not found"):
        load_rules(None, tmp_path / "nope.json")


def test_good_rules_still_load(tmp_path: Path) -> None:
    path = tmp_path / "ok.json"
    rule = {"name": r"^layer\d+\.\d+\.conv\d+$", "roles": ["conv"], "max_params": 10, "range": [0.1, 0.4]}
    path.write_text(json.dumps({"description": "mine", "rules": [rule]}))
    rules = load_rules("resnet", path)
    mine = [r for r in rules if r.name == rule["name"]]
    assert len(mine) == 1 and mine[0].range == (0.1, 0.4) and mine[0].max_params == 10


@pytest.mark.parametrize("family", [None, "resnet", "swin"])
def test_builtin_rules_pass_the_schema(family: str | None) -> None:
    assert load_rules(family)


# ------------------------------------------------------------------------------------------------ regexes


@pytest.mark.parametrize(
    "pattern",
    [r"^layer1\.", r"^layers\.0\.", r"(conv|fc)\d+", r"^blocks\.\d+\.attn\.qkv$", r"\w+\.\w+\.\w+", r"(ab){3}"],
)
def test_ordinary_name_patterns_are_accepted(pattern: str) -> None:
    assert safe_pattern(pattern) is None


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        (r"^((([\w.])|([\w.]))+)+!", "nests a quantifier inside a quantifier"),
        (r"(a+)+$", "nests a quantifier inside a quantifier"),
        (r"(?:x*)*y", "nests a quantifier inside a quantifier"),
        (r"(?=(a+)+)b", "nests a quantifier inside a quantifier"),
        (r"(a|ab)+c", "repeats an alternation"),
        (r"\w*\w*\w*\w*!", "has 4 variable-length quantifiers"),
        ("a" * (MAX_PATTERN_CHARS + 1), f"at most {MAX_PATTERN_CHARS}"),
        ("(", "is not a valid regex"),
    ],
)
def test_pathological_patterns_are_refused(pattern: str, message: str) -> None:
    problem = safe_pattern(pattern)
    assert problem is not None and message in problem


def test_the_catastrophic_pattern_is_refused_without_running_it(tmp_path: Path) -> None:
    # Unchecked, this pattern takes 1.9 s on a 12-character layer name and doubles with each character.
    path = tmp_path / "redos.json"
    path.write_text(_rule(name=r"^((([\w.])|([\w.]))+)+!"))
    start = time.perf_counter()
    with pytest.raises(EdgepruneError, match=r"rules\[1\]\.name .* nests a quantifier"):
        load_rules(None, path)
    assert time.perf_counter() - start < 1.0


def test_the_worst_pattern_within_the_bound_stays_fast() -> None:
    pattern = r"\w*\w*\w*!"  # three variable-length quantifiers that overlap: the bound's worst shape
    assert safe_pattern(pattern) is None
    start = time.perf_counter()
    assert re.search(pattern, "a" * 60) is None
    assert time.perf_counter() - start < 1.0


# ------------------------------------------------------------------------------------------------ targets


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"b": {"base": ["rpi4"], "threads": 2}}, "base must be the name of a target (a string), got ['rpi4']"),
        ({"b": {"base": {"x": 1}}}, "base must be the name of a target"),
        ({"b": {"base": "rpi4", "threads": "four"}}, "threads must be a positive integer, got 'four'"),
        ({"b": {"base": "rpi4", "opset": 17.5}}, "opset must be a positive integer, got 17.5"),
        ({"b": {"base": "rpi4", "description": None}}, "description must be a string, got null"),
        ({"b": {"base": "rpi4", "arch": 64}}, "arch must be one of x86_64, aarch64, got 64"),
    ],
)
def test_bad_target_files_name_the_profile_and_the_field(tmp_path: Path, content: dict, message: str) -> None:
    path = tmp_path / "t.json"
    path.write_text(json.dumps(content))
    with pytest.raises(EdgepruneError) as info:
        available_targets(path)
    assert message in _one_line(info) and "'b'" in str(info.value)


def test_target_files_that_are_not_json_files(tmp_path: Path) -> None:
    with pytest.raises(EdgepruneError, match="target file .* is a folder"):
        available_targets(tmp_path)
    deep = tmp_path / "deep.json"
    deep.write_text('{"a":' * 100_000 + "1" + "}" * 100_000)
    with pytest.raises(EdgepruneError, match="nests too deeply"):
        available_targets(deep)


# ------------------------------------------------------------------------------------------------ image folders


def _png(size: tuple[int, int] = (12, 12), mode: str = "L", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = PIL.Image.fromarray(rng.integers(0, 255, (size[1], size[0]), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _folder(root: Path, classes: tuple[str, ...] = ("a", "b"), per_class: int = 3) -> Path:
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / c / f"{i}.png").write_bytes(_png(seed=i))
    return root


def _load(root: Path, **kw):
    return load_data(f"imagefolder:{root}", calib_size=2, eval_size=10, image_size=kw.pop("image_size", 12), **kw)


def test_hidden_folders_and_files_are_skipped(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d")
    _folder(root, (".ipynb_checkpoints", ".git"))
    (root / "a" / ".hidden.png").write_bytes(b"junk that would not decode")
    (root / "a" / "._0.png").write_bytes(b"macOS resource fork")
    (root / "b" / ".cache").mkdir()
    (root / "b" / ".cache" / "x.png").write_bytes(_png())
    classes, samples = list_imagefolder(root)
    assert classes == ["a", "b"] and len(samples) == 6
    b = _load(root)
    assert b.class_names == ["a", "b"] and b.num_classes == 2 and len(b.calib_x) + len(b.eval_x) + len(b.test) == 6


@pytest.mark.parametrize("classes", [("cats",), ("cats", ".ipynb_checkpoints"), ("cats", "empty")])
def test_one_class_is_refused(tmp_path: Path, classes: tuple[str, ...]) -> None:
    root = _folder(tmp_path / "d", classes[:1])
    for extra in classes[1:]:
        (root / extra).mkdir()
        if extra.startswith("."):
            (root / extra / "0.png").write_bytes(_png())
    with pytest.raises(DataError, match=r"one class only \(cats\).*at least 2 classes") as info:
        _load(root)
    _one_line(info)


def _cut_png() -> bytes:
    data = _png((64, 64), "RGB")
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("cut.png", _cut_png(), "image file is truncated"),
        ("zero.png", b"", "empty file (0 bytes)"),
        ("text.png", b"hello", "cannot identify image file"),
        ("bomb.png", None, "decompression bomb"),
    ],
)
def test_every_decoding_failure_names_the_file(tmp_path: Path, name: str, content: bytes | None, message: str) -> None:
    saved = PIL.Image.MAX_IMAGE_PIXELS
    root = _folder(tmp_path / "d")
    if content is None:  # more pixels than MAX_IMAGE_PIXELS, a few KB on disk
        side = int(MAX_IMAGE_PIXELS**0.5) + 100
        PIL.Image.new("1", (side, side)).save(root / "b" / name)
    else:
        (root / "b" / name).write_bytes(content)
    with pytest.raises(DataError) as info:
        _load(root)
    text = _one_line(info)
    assert message in text and str(root / "b" / name) in text
    assert PIL.Image.MAX_IMAGE_PIXELS == saved  # the bound is local to edgeprune's reading, PIL's is restored


@pytest.mark.parametrize("size", [0, -3, 4, 7, 100_000])
def test_image_size_is_checked_before_anything_loads(tmp_path: Path, size: int) -> None:
    # The folder does not exist: had the data been read first, the error would be about the folder.
    with pytest.raises(DataError, match=f"--image-size must be between 8 and 4096 pixels, got {size}"):
        load_data(f"imagefolder:{tmp_path / 'missing'}", image_size=size)


# ------------------------------------------------------------------------------------------------ BN guard


def _bn_net() -> nn.Module:
    # A 1x1 input stays 1x1: every BatchNorm channel sees one value per image.
    return nn.Sequential(nn.Conv2d(1, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))


def test_bn_recalibration_refuses_one_image_and_keeps_the_statistics() -> None:
    net = _bn_net()
    net[1].running_mean.fill_(0.5)
    with pytest.raises(EdgepruneError, match="at least 2 calibration images, got 1.*--no-bn-recal") as info:
        recalibrate_bn(net, torch.randn(1, 1, 1, 1))
    _one_line(info)
    assert torch.all(net[1].running_mean == 0.5)  # refused before the reset, not halfway


def test_bn_recalibration_folds_a_last_batch_of_one_into_the_previous() -> None:
    torch.manual_seed(0)
    net, x = _bn_net(), torch.randn(5, 1, 1, 1)
    recalibrate_bn(net, x, batch_size=2)  # batches 2, 2, 1 -> 2, 3 (a batch of one 1x1 image would fail)
    expected = net[0](x).mean(dim=(0, 2, 3))
    assert torch.allclose(net[1].running_mean, expected, atol=0.15)
    assert net[1].num_batches_tracked.item() == 2


# ------------------------------------------------------------------------------------------------ ONNX files


def _onnx(tmp_path: Path, nodes: bool = True, inputs: bool = True) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    if not inputs:
        value = helper.make_tensor("v", TensorProto.FLOAT, [1, 2], [0.0, 1.0])
        graph = helper.make_graph([helper.make_node("Constant", [], ["y"], value=value)], "g", [], [y])
    else:
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])] if nodes else [], "g", [x], [y])
    path = tmp_path / "m.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return path


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_load_onnx_checked_accepts_a_real_graph(tmp_path: Path) -> None:
    model = load_onnx_checked(_onnx(tmp_path))
    assert [n.op_type for n in model.graph.node] == ["Relu"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing.onnx", "artifact not found"),
        (lambda p: p, "is not a file"),
        (lambda p: _file(p / "e.onnx", b""), "is empty (0 bytes)"),
        (lambda p: _file(p / "t.onnx", b"not onnx at all"), "is not an ONNX model"),
        (lambda p: _onnx(p, nodes=False), "graph has no nodes"),
        (lambda p: _onnx(p, inputs=False), "graph has no inputs"),
    ],
    ids=["missing", "folder", "empty-file", "text", "no-nodes", "no-inputs"],
)
def test_load_onnx_checked_refuses_with_one_line(tmp_path: Path, make, message: str) -> None:
    path = make(tmp_path)
    with pytest.raises(EdgepruneError) as info:
        load_onnx_checked(path)
    assert message in _one_line(info)
