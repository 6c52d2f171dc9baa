"""arm64 without a board: the aarch64 onnxruntime under QEMU user mode.

The slow tests set emulation up on first use (debootstrap + pip, ~2 min, cached in
~/.cache/edgeprune/qemu-arm64) and need `qemu-user-static` and `debootstrap` (scripts/test.sh installs
them). They are not skipped when those are missing: arm64 verification is a feature CI must exercise.
"""

from __future__ import annotations

import platform
import subprocess

import pytest
import torch
from edgeprune.benchmarks import qemu_arm64
from edgeprune.benchmarks.qemu_arm64 import QemuArm64, debian_mirror, qemu_python
from edgeprune.export import export_onnx, verify_artifact
from edgeprune.export.ship import ship_artifacts

from edgeprune.errors import EdgepruneError

from .test_export import _randomize_bn, _zero_fraction
from .test_export_verify import run_cli, statuses, tamper_weights

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------ fast checks


def test_mirror_comes_from_the_apt_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGEPRUNE_DEBIAN_MIRROR", raising=False)
    deb822 = tmp_path / "debian.sources"
    deb822.write_text(
        "Types: deb\nURIs: http://mirror.example.org/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\nURIs: http://mirror.example.org/debian/\nSuites: bookworm\nComponents: main\n"
    )
    one_line = tmp_path / "sources.list"
    one_line.write_text("deb [arch=amd64 signed-by=/k.gpg] https://ftp.example.net/debian bookworm main\n")
    ubuntu = tmp_path / "ubuntu.list"
    ubuntu.write_text("deb http://archive.ubuntu.com/ubuntu jammy main\n")
    disabled = tmp_path / "other.list.disabled"
    disabled.write_text("deb http://disabled.example.org/debian bookworm main\n")
    assert debian_mirror([disabled, deb822, one_line]) == "http://mirror.example.org/debian"
    assert debian_mirror([one_line]) == "https://ftp.example.net/debian"
    assert debian_mirror([ubuntu, disabled]) == qemu_arm64.DEFAULT_MIRROR  # no Debian archive: the default
    monkeypatch.setenv("EDGEPRUNE_DEBIAN_MIRROR", "http://local/debian/")
    assert debian_mirror([one_line]) == "http://local/debian"


def test_missing_tools_are_named_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(qemu_arm64.shutil, "which", lambda name: None)
    monkeypatch.setattr(qemu_arm64.platform, "machine", lambda: "x86_64")
    script = tmp_path / "s.py"
    script.write_text("print(1)\n")
    with pytest.raises(EdgepruneError, match="apt-get install qemu-user-static"):
        qemu_python(script, [], cache_dir=tmp_path / "cache")
    monkeypatch.setattr(qemu_arm64.shutil, "which", lambda name: "/usr/bin/" + name if "qemu" in name else None)
    monkeypatch.setattr(qemu_arm64.os.path, "exists", lambda p: False)
    with pytest.raises(EdgepruneError, match="apt-get install debootstrap"):
        QemuArm64(tmp_path / "cache", progress=None)._debootstrap(tmp_path / "root")


def test_non_root_without_fakeroot_is_told_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(qemu_arm64.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(qemu_arm64.shutil, "which", lambda name: None if name == "fakeroot" else f"/usr/sbin/{name}")
    with pytest.raises(EdgepruneError, match="root or fakeroot"):
        QemuArm64(tmp_path / "cache", progress=None)._debootstrap(tmp_path / "root")


# ------------------------------------------------------------------------------------------ emulated runs


@pytest.fixture(scope="module")
def emulator() -> QemuArm64:
    if platform.machine() != "x86_64":
        pytest.skip("emulation of arm64 is tested from x86_64 hosts")
    return QemuArm64().ensure()  # first use: sets up (cached), with progress on stderr


@pytest.fixture(scope="module")
def artifacts(demo_data, tmp_path_factory):
    """A 70 %-sparse demo-architecture model: FP32, INT8 (S8S8, the arm64 format) and INT8 sparse-packed."""
    import timm

    import edgeprune.zoo  # noqa: F401

    folder = tmp_path_factory.mktemp("arm")
    torch.manual_seed(0)
    model = timm.create_model("fmnist_resnet").eval()
    _randomize_bn(model)
    _zero_fraction(model, 0.7)
    export_onnx(model, demo_data.eval_x[:1], folder / "model.onnx", check_inputs=demo_data.eval_x[:16])
    ship_artifacts(folder / "model.onnx", target="arm64", quantize="int8", calibration=demo_data.calib_x[:64])
    packed = folder / "packed"
    packed.mkdir()
    (packed / "model.onnx").write_bytes((folder / "model.onnx").read_bytes())
    ship_artifacts(packed / "model.onnx", target="arm64", quantize="int8", pack="sparse", ort_format=True,
                   calibration=demo_data.calib_x[:64])  # fmt: skip
    return folder, packed


@pytest.mark.slow
def test_qemu_python_runs_aarch64(emulator, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(
        "import platform, sys, numpy, onnxruntime\n"
        "print(platform.machine(), sys.argv[1:], onnxruntime.__version__)\nsys.exit(3)\n"
    )
    proc = qemu_python(script, ["a b", "--x"])
    assert proc.returncode == 3
    assert proc.stdout.split()[0] == "aarch64" and "['a b', '--x']" in proc.stdout
    assert emulator.info()["qemu_cpu"] == "neoverse-n1"
    with pytest.raises(subprocess.TimeoutExpired):
        qemu_python(script, [], timeout=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["model.onnx", "model.int8.onnx", "packed/model.int8.onnx", "packed/model.ort"])
def test_arm64_outputs_match_x86(emulator, artifacts, demo_data, name):
    folder, _ = artifacts
    report = verify_artifact(folder / name, target="arm64", inputs=demo_data.eval_x[:8])
    s = statuses(report)
    assert report.ok, report.checks
    assert s["arm64"] == "ok" and s["reference"] == "ok"
    assert report.arm64_max_abs_diff is not None
    if report.precision == "fp32":
        assert report.arm64_max_abs_diff <= 1e-4


@pytest.mark.slow
def test_arm64_check_fails_on_a_corrupted_artifact(emulator, artifacts, tmp_path, capsys):
    folder, _ = artifacts
    tamper_weights(folder / "model.onnx", tmp_path / "bad.onnx")
    report = verify_artifact(tmp_path / "bad.onnx", target="arm64")
    s = statuses(report)
    assert not report.ok
    # aarch64 and x86_64 agree with each other on the damaged weights, but not with the recorded reference
    assert s["arm64"] == "FAILED" and "reference" in next(c.detail for c in report.checks if c.name == "arm64")
    assert s["weights"] == "FAILED"

    data = (folder / "model.int8.onnx").read_bytes()
    (tmp_path / "cut.int8.onnx").write_bytes(data[: len(data) * 2 // 3])
    assert run_cli(["verify", str(tmp_path / "cut.int8.onnx"), "--target", "arm64"]) == 2
    assert "failed verification" in capsys.readouterr().err


@pytest.mark.slow
def test_arm64_verify_cli_passes_on_int8(emulator, artifacts, capsys):
    folder, _ = artifacts
    assert run_cli(["verify", str(folder / "model.int8.onnx"), "--target", "arm64", "--data", "demo",
                    "--samples", "4"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "arm64" in out and "FAILED" not in out
