"""Benchmark runner and local device: statistics on fixed inputs, real onnxruntime runs on tiny models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from edgeprune.benchmarks import runner
from edgeprune.benchmarks.device import bench_artifacts, input_shape, sample_input
from onnx import TensorProto, helper, numpy_helper

from edgeprune.errors import DeviceError, EdgepruneError

# ---------------------------------------------------------------- tiny real models (shared with test_ssh*)


def make_tiny_classifier(
    path: Path,
    hidden: list[int],
    seed: int = 0,
    batch: int | str = "N",
    chw: tuple[int, int, int] = (1, 4, 4),
    classes: int = 4,
) -> Path:
    """An MLP classifier on (batch, *chw) images (default 1x4x4, 4 classes), built with onnx.helper.

    More / wider hidden layers make it slower, which the ratio tests rely on.
    """
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Flatten", ["x"], ["h0"], axis=1)]
    inits = []
    width = int(np.prod(chw))
    for i, h in enumerate([*hidden, classes]):
        w = (rng.standard_normal((width, h)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"m{i}"]))
        last = i == len(hidden)
        nodes.append(helper.make_node("Identity" if last else "Relu", [f"m{i}"], ["logits" if last else f"h{i + 1}"]))
        width = h
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, *chw])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # loadable by older onnxruntime builds on devices
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """Small model A, large model B (same task), labels = A's predictions: A's accuracy is exactly 1."""
    d = tmp_path_factory.mktemp("models")
    a = make_tiny_classifier(d / "small.onnx", [8], seed=0)
    b = make_tiny_classifier(d / "large.onnx", [1024, 1024], seed=1)
    x = np.random.default_rng(2).standard_normal((64, 1, 4, 4)).astype(np.float32)
    y = ort_logits(a, x).argmax(1).astype(np.int64)
    acc_b = float((ort_logits(b, x).argmax(1) == y).mean())
    assert 0.0 < acc_b < 1.0  # B is a genuinely different classifier
    return {"a": a, "b": b, "x": x, "y": y, "acc_b": acc_b}


# ---------------------------------------------------------------- latency statistics (pure)


def test_latency_stats_on_fixed_samples():
    s = runner.latency_stats([1.0, 2.0, 3.0, 4.0, 10.0])
    assert s["p50"] == 3.0
    assert s["p90"] == pytest.approx(7.6)  # linear interpolation between 4 and 10
    assert s["p99"] == pytest.approx(9.76)
    assert s["mean"] == 4.0
    assert s["std"] == pytest.approx(np.sqrt(12.5))  # sample std (ddof=1)
    assert s["cv"] == pytest.approx(np.sqrt(12.5) / 4.0)
    assert s["throughput_per_s"] == 250.0
    assert s["runs"] == 5


def test_latency_stats_constant_and_single_samples():
    s = runner.latency_stats(np.full(20, 2.5))
    assert (s["p50"], s["p99"], s["cv"], s["std"]) == (2.5, 2.5, 0.0, 0.0)
    one = runner.latency_stats([7.0])
    assert one["std"] == 0.0 and one["p90"] == 7.0 and one["throughput_per_s"] == pytest.approx(1000 / 7)
    with pytest.raises(ValueError):
        runner.latency_stats([])


def test_latency_stats_cv_threshold_separates_noisy_runs():
    steady = runner.latency_stats([10.0, 10.5, 9.5, 10.0])
    jumpy = runner.latency_stats([10.0, 30.0, 10.0, 30.0])
    assert steady["cv"] < runner.NOISY_CV < jumpy["cv"]


# ---------------------------------------------------------------- runner and the local device


def test_run_orders_shuffle_each_round_so_no_model_always_follows_the_same_one():
    orders = runner.run_orders(3, 300)
    assert len(orders) == 300 and all(sorted(o) == [0, 1, 2] for o in orders)
    assert orders == runner.run_orders(3, 300)  # seeded: a rerun times the same sequence
    # who ran just before each model (across round boundaries too): every other model, often
    flat = [i for o in orders for i in o]
    before = {m: [p for p, q in zip(flat, flat[1:]) if q == m] for m in range(3)}
    for m, preds in before.items():
        for other in range(3):
            if other != m:
                assert preds.count(other) > len(preds) / 4, (m, other)


def test_runner_accuracy_on_fixed_batch_model(tmp_path, models):
    fixed = make_tiny_classifier(tmp_path / "fixed.onnx", [8], seed=0, batch=1)  # same weights as A
    sess = runner.make_session(str(fixed), 1)
    assert runner.accuracy(sess, models["x"], models["y"]) == 1.0


def test_local_bench_interleaved_ratios_and_accuracy(models):
    sample = sample_input(models["a"])
    assert sample.shape == (1, 1, 4, 4)
    rep = bench_artifacts(
        [models["a"], models["b"]],
        "local",
        sample=sample,
        runs=30,
        warmup=3,
        x=models["x"],
        y=models["y"],
        return_outputs=True,
    )
    a, b = rep.results
    assert [a["artifact"], b["artifact"]] == [str(models["a"]), str(models["b"])]
    assert a["ratio_to_first"] == 1.0
    assert b["ratio_to_first"] == pytest.approx(b["latency_ms"]["p50"] / a["latency_ms"]["p50"])
    # ~2M multiply-adds against ~200: B is slower even on a busy shared machine.
    assert b["ratio_to_first"] > 3
    assert a["accuracy"] == 1.0 and b["accuracy"] == pytest.approx(models["acc_b"])
    assert a["latency_ms"]["p50"] <= a["latency_ms"]["p90"] <= a["latency_ms"]["p99"]
    assert not rep.emulated and rep.threads == 1
    assert rep.device["spec"] == "local" and rep.device["onnxruntime"] == ort.__version__
    assert rep.device["cpu_count"] >= 1
    # The runner's own peak RSS (onnxruntime + numpy), not this pytest process's (torch loaded).
    assert 10 < rep.peak_rss_mb < 400
    np.testing.assert_allclose(rep.outputs[1], ort_logits(models["b"], sample), rtol=1e-5, atol=1e-6)
    d = rep.to_dict()
    assert set(d) == {"device", "threads", "emulated", "peak_rss_mb", "results"}
    json.dumps(d)


def test_bench_rejects_bad_inputs(tmp_path, models):
    sample = sample_input(models["a"])
    with pytest.raises(EdgepruneError, match="artifact not found"):
        bench_artifacts([tmp_path / "nope.onnx"], sample=sample)
    with pytest.raises(EdgepruneError, match="unknown device"):
        bench_artifacts([models["a"]], "gpu://x", sample=sample)
    with pytest.raises(EdgepruneError, match="both images"):
        bench_artifacts([models["a"]], sample=sample, x=models["x"])


def test_model_onnxruntime_cannot_run_is_one_line_error(tmp_path, models):
    wrong = tmp_path / "wrong_input.onnx"
    make_tiny_classifier(wrong, [8], batch=1)
    bad_sample = np.zeros((1, 3, 4, 4), np.float32)  # 3 channels for a 1-channel model
    with pytest.raises(DeviceError, match=r"benchmark failed on this machine: .*") as info:
        bench_artifacts([wrong], sample=bad_sample, runs=2, warmup=0)
    assert "\n" not in str(info.value)


def test_runner_reports_missing_module_as_json(tmp_path, models):
    # An interpreter without site-packages has neither numpy nor onnxruntime.
    np.savez(tmp_path / "in.npz", sample=sample_input(models["a"]))
    proc = subprocess.run(
        [sys.executable, "-S", "-I", runner.__file__, "--inputs", str(tmp_path / "in.npz"), str(models["a"])],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == runner.EXIT_MISSING_MODULE
    out = json.loads(proc.stdout)
    assert out["error"] == "missing_module" and out["module"] == "numpy and onnxruntime"
    assert out["fix"].endswith("-m pip install numpy onnxruntime")


def test_sample_input_shapes(tmp_path, models):
    fixed = make_tiny_classifier(tmp_path / "b4.onnx", [8], batch=4)
    assert sample_input(fixed).shape == (4, 1, 4, 4)
    assert sample_input(models["a"], batch=3).shape == (3, 1, 4, 4)
    assert input_shape(models["a"]) == (None, 1, 4, 4)


# ---------------------------------------------------------------- CLI


def run_cli(args: list[str]) -> int:
    """Exit code of ``edgeprune ARGS`` run in this process (Typer always ends with SystemExit)."""
    from edgeprune.cli import main  # here, so a broken sibling command only fails the CLI tests

    try:
        main(args)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def test_cli_bench_json(tmp_path, models, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", str(models["a"]), str(models["b"]), "--runs", "20", "--warmup", "2", "--json", str(out)]
    assert run_cli(args) == 0
    printed = capsys.readouterr().out
    assert "small.onnx" in printed and "large.onnx" in printed and "1.00×" in printed
    data = json.loads(out.read_text())
    assert not out.with_name("bench.json.tmp").exists()
    assert data["device"]["machine"] and data["emulated"] is False
    entries = data["results"]
    assert [e["artifact"] for e in entries] == [str(models["a"]), str(models["b"])]
    for e in entries:
        assert set(e["latency_ms"]) == {"p50", "p90", "p99", "mean"}
        assert e["accuracy"] is None and e["cv"] >= 0
    assert entries[0]["ratio_to_first"] == 1.0 and entries[1]["ratio_to_first"] > 3


def test_cli_bench_errors_are_one_line(tmp_path, models, capsys):
    assert run_cli(["bench", str(tmp_path / "missing.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgeprune: error: artifact not found") and "\n" not in err
    assert run_cli(["bench", str(models["a"]), "--device", "ssh://-oProxyCommand=touch@host"]) == 2
    assert "invalid" in capsys.readouterr().err
    # --select-size has no fixed default (compress's rule), but 0 is still refused before any data loads
    assert run_cli(["bench", str(models["a"]), "--data", "demo", "--select-size", "0"]) == 2
    assert "--select-size, --test-size and --calib-size must be >= 1" in capsys.readouterr().err


def test_cli_bench_with_data_matches_onnxruntime(tmp_path, capsys):
    """--data: real demo images, adapted to the artifact's 3x32x32 input, split as compress splits them."""
    from edgeprune.data import load_data

    model = make_tiny_classifier(tmp_path / "rgb32.onnx", [16], seed=4, batch=1, chw=(3, 32, 32), classes=10)
    out = tmp_path / "acc.json"
    args = ["bench", str(model), "--data", "demo", "--eval-size", "60", "--runs", "3", "--warmup", "0"]
    assert run_cli([*args, "--json", str(out)]) == 0
    got = json.loads(out.read_text())["results"][0]["accuracy"]
    bundle = load_data("demo", calib_size=1000, eval_size=1000, test_size=2000, image_size=32).with_channels(3)
    x, y = (t.numpy()[:60] for t in bundle.test_split("check"))  # bench reports on the test split
    assert x.shape == (60, 3, 32, 32)
    want = float(np.mean([ort_logits(model, x[i : i + 1]).argmax() == y[i] for i in range(len(x))]))
    assert got == pytest.approx(want)
    assert "0." in capsys.readouterr().out  # the accuracy column is printed


def test_runner_stays_python38_and_self_contained():
    """The runner is copied to devices that may have Python 3.8 and nothing but numpy + onnxruntime."""
    import ast

    src = Path(runner.__file__).read_text()
    tree = ast.parse(src, feature_version=(3, 8))  # raises SyntaxError on newer grammar (match, except*)
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    stdlib = set(sys.stdlib_module_names)
    assert imported - stdlib == {"numpy", "onnxruntime"}
    newer_apis = {"removeprefix", "removesuffix"}  # str methods of 3.9
    assert not [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in newer_apis]
    assert not [k for n in ast.walk(tree) if isinstance(n, ast.Call) for k in n.keywords if k.arg == "strict"]


PI4_CPUINFO = """processor	: 0
BogoMIPS	: 108.00
Features	: fp asimd evtstrm crc32 cpuid
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x0
CPU part	: 0xd08
CPU revision	: 3

Revision	: c03114
Model		: Raspberry Pi 4 Model B Rev 1.4
"""
PI5_FEATURES = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
X86_CPUINFO = """processor	: 0
vendor_id	: GenuineIntel
model		: 143
model name	: Intel(R) Xeon(R) Platinum 8480+
flags		: fpu vme sse sse2 avx avx2 avx512f avx512_vnni amx_int8
"""


def test_parse_cpuinfo_names_arm_cores_and_int8_flags():
    pi4 = runner.parse_cpuinfo(PI4_CPUINFO)
    assert pi4 == {
        "cpu_model": "Cortex-A72",
        "board": "Raspberry Pi 4 Model B Rev 1.4",
        "int8_flags": [],
        "dotprod": False,
    }
    pi5 = runner.parse_cpuinfo(
        PI4_CPUINFO.replace("0xd08", "0xd0b").replace("fp asimd evtstrm crc32 cpuid", PI5_FEATURES)
    )
    assert pi5["cpu_model"] == "Cortex-A76" and pi5["dotprod"] is True and pi5["int8_flags"] == ["asimddp"]
    x86 = runner.parse_cpuinfo(X86_CPUINFO)
    assert x86["cpu_model"] == "Intel(R) Xeon(R) Platinum 8480+" and x86["board"] is None
    assert x86["int8_flags"] == ["avx2", "avx512_vnni", "amx_int8"] and x86["dotprod"] is None


def test_target_mismatch_warnings():
    from edgeprune.cli.bench import _target_mismatch
    from edgeprune.targets import get_target

    pi4_facts = {"machine": "aarch64", "dotprod": False}
    assert _target_mismatch(get_target("rpi4"), pi4_facts) == []  # the profile already says INT8 is not worth it
    assert "dot-product" in _target_mismatch(get_target("rpi5"), pi4_facts)[0]
    assert "is aarch64 but the device is x86_64" in _target_mismatch(get_target("arm64"), {"machine": "x86_64"})[0]


def test_cli_bench_takes_a_targets_threads_as_compress_does(tmp_path, models, monkeypatch):
    from edgeprune import targets

    monkeypatch.setattr(targets, "local_cores", lambda: 2)  # a 2-core machine: arm64's 4 threads would oversubscribe
    out = tmp_path / "bench.json"
    args = ["bench", str(models["a"]), "--target", "arm64", "--runs", "3", "--warmup", "0", "--json", str(out)]
    assert run_cli(args) == 0
    assert json.loads(out.read_text())["threads"] == 1
    assert run_cli([*args, "--threads", "3"]) == 0
    assert json.loads(out.read_text())["threads"] == 3  # the user's count stands
