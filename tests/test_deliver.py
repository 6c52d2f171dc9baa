"""The deliver step both granularities share: channel mode ships INT8 / ORT files with their accuracy, and
with ``--latency-from ssh://`` times its candidates and its artifacts on the device (a real OpenSSH server,
tests/sshd.py)."""

from __future__ import annotations

import json
import re
import sys

import onnx
import pytest

from edgeprune.errors import EdgepruneError
from edgeprune.pipeline import CompressConfig, compress
from edgeprune.report import Report

from . import small_runs
from .small_runs import CHANNEL
from .sshd import sshd_unavailable_reason, start_sshd

SMALL = CHANNEL


@pytest.fixture(scope="module")
def channel_int8():
    return small_runs.channel_int8()


@pytest.mark.slow
def test_channel_mode_ships_int8_and_ort_with_accuracy(channel_int8):
    report, out = channel_int8
    rows = {a.file: a for a in report.shipped}
    want = {"model.onnx", "model.int8.onnx", "model.ort", "model.int8.ort", "dense.onnx", "dense.int8.onnx"}
    assert want <= set(rows)
    for name in want:
        assert (out / name).is_file(), name
        assert rows[name].bytes == (out / name).stat().st_size
    int8 = rows["model.int8.onnx"]
    assert int8.format == "int8" and int8.role == "selected" and 0.1 < int8.accuracy <= 1.0
    assert int8.latency_ms["p50"] > 0 and int8.bytes < rows["model.onnx"].bytes  # INT8 weights: 1 byte, not 4
    # the summaries are filled from the same rows; INT8 keeps the FP32 accuracy within a few points
    assert report.selected.int8_accuracy == int8.accuracy
    assert abs(int8.accuracy - rows["model.onnx"].accuracy) < 0.05
    assert report.selected.onnx_accuracy == pytest.approx(report.selected.test_accuracy, abs=0.02)  # same images
    # the compacted model is smaller than dense in every format
    assert rows["model.onnx"].bytes < rows["dense.onnx"].bytes
    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert meta["edgeprune.granularity"] == "channel"
    md = (out / "report.md").read_text()
    assert md.index("## Shipped") < md.index("## Dense vs selected")
    assert "| model.int8.onnx |" in md and "dense.onnx (ref)" in md


def test_pack_sparse_is_refused_up_front_in_channel_mode(tmp_path):
    kw = {**SMALL, "data": f"imagefolder:{tmp_path / 'not-there'}"}
    cfg = CompressConfig(**kw, pack="sparse", out=str(tmp_path / "o"))
    with pytest.raises(EdgepruneError, match="no zeros to pack"):  # before the (missing) data is looked at
        compress(cfg)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.skipif(sshd_unavailable_reason() is not None, reason=str(sshd_unavailable_reason()))
def test_channel_mode_times_candidates_and_artifacts_over_ssh(tmp_path):
    server = start_sshd(tmp_path / "sshd")
    try:
        out = tmp_path / "out"
        cfg = CompressConfig(
            **SMALL,
            quantize="none",
            latency_from=server.url,
            identity=str(server.user_key),
            ssh_options=tuple(server.client_options()),
            remote_python=sys.executable,
            out=str(out),
        )
        report = compress(cfg)
        log = server.log()
    finally:
        server.stop()
    assert report.bench["device"]["spec"] == server.url
    assert report.structured.timed_on == server.url
    for c in report.strategies:  # every candidate has a device latency
        assert c.latency_ms > 0
    assert {a.file for a in report.shipped} == {"model.onnx", "dense.onnx"}
    assert all(a.latency_ms["p50"] > 0 and a.accuracy is not None for a in report.shipped)
    # probe + candidates + deliver each ran on the server: a session per step (temp dir, copy, run, clean up)
    logins = len(re.findall(r"Accepted publickey", log))
    assert logins >= 3 * 3, logins
    assert not list(server.remote_tmp.glob("edgeprune.*"))  # every remote temp dir removed
    saved = Report.from_dict(json.loads((out / "report.json").read_text()))
    assert saved.structured.timed_on == server.url
