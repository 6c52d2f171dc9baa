"""Every `compress` / `export` option is refused before any model or data loads (issue 16).

Each refused config also names a data folder that does not exist: had anything loaded before the check,
the error would be about the data, not the option. The CLI cases are timed: a refusal costs well under a
second once the CLI is imported, not the ~70 s of a default job.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from edgeprune.errors import EdgepruneError
from edgeprune.pipeline import CompressConfig, compress
from tests.hostile.runner import run_cli

BASE = CompressConfig()
CHANNEL = replace(BASE, granularity="channel")

REFUSED = [
    (replace(BASE, quantize="int4"), "--quantize must be int8 or none, got 'int4'"),
    (replace(BASE, pack="bogus"), "--pack must be dense or sparse, got 'bogus'"),
    (replace(BASE, threads=0), "--threads must be >= 1"),
    (replace(BASE, threads=-1), "--threads must be >= 1"),
    (replace(BASE, image_size=0), "--image-size must be between 8 and 4096"),
    (replace(BASE, image_size=4), "--image-size must be between 8 and 4096"),
    (replace(BASE, num_classes=0), "--num-classes must be >= 1"),
    (replace(BASE, finetune_lr=0.0), "--finetune-lr must be a positive number"),
    (replace(BASE, finetune_lr=float("nan")), "--finetune-lr must be a positive number"),
    (replace(BASE, max_drop=float("nan")), "--max-drop must be >= 0"),
    (replace(BASE, test_size=0), "--test-size must be >= 1"),
    (replace(BASE, recover="successive"), "unknown --recover 'successive'; choose from top, halving"),
    (replace(BASE, recover_threads=0), "--recover-threads must be >= 1"),
    (replace(BASE, cluster="ray://head"), "bad --cluster 'ray://head'"),
    (replace(BASE, cluster="local:0"), "local:N needs a CPU count N >= 1"),
    (replace(BASE, target="arm65"), "unknown target 'arm65'"),
    (replace(BASE, latency_from="board:22"), "unknown device 'board:22'"),
    (replace(BASE, latency_from="ssh://pi@board:99999"), "the port must be a number"),
    (replace(BASE, latency_from="ssh://pi@-oProxyCommand=x"), "invalid host name"),
    (replace(BASE, latency_from="ssh://pi@board", identity="/nonexistent/id_ed25519"), "no such key file"),
    (replace(BASE, latency_from="ssh://pi@board", identity="/"), "is a directory"),
    (replace(BASE, latency_from="ssh://pi@board", ssh_options=("-oProxyCommand=sh",)), "bad --ssh-option"),
    (replace(BASE, identity="/"), "--identity only applies to an ssh:// device"),
    (replace(BASE, ssh_options=("ConnectTimeout=3",)), "--ssh-option only applies to an ssh:// device"),
    (replace(BASE, speedup=2.0), "--speedup only applies to --granularity channel"),
    (replace(BASE, latency_budget_ms=1.0), "--latency-budget only applies to --granularity channel"),
    (replace(BASE, round_to=8), "--round-to only applies to --granularity channel"),
    (replace(BASE, latency_costs=True), "--latency-costs only applies to --granularity channel"),
    (replace(CHANNEL, speedup=1.0), "--speedup must be > 1"),
    (replace(CHANNEL, speedup=0.5), "--speedup must be > 1"),
    (replace(CHANNEL, speedup=float("inf")), "--speedup must be > 1"),
    (replace(CHANNEL, latency_budget_ms=0.0), "--latency-budget must be a positive number"),
    (replace(CHANNEL, latency_budget_ms=-3.0), "--latency-budget must be a positive number"),
    (replace(CHANNEL, round_to=0), "--round-to must be >= 1"),
    (replace(CHANNEL, speedup=2.0, latency_budget_ms=1.0), "either --latency-budget or --speedup"),
    (replace(CHANNEL, speedup=2.0, max_drop=1.0), "give one selection goal: --max-drop"),
    (replace(CHANNEL, latency_budget_ms=1.0, max_drop=1.0), "or --latency-budget"),
    (replace(CHANNEL, method="snip"), "supports --method mix-and-match only"),
    (replace(CHANNEL, pack="sparse"), "--pack sparse does not apply to --granularity channel"),
]

ACCEPTED = [
    BASE,
    replace(BASE, threads=1, quantize="none", pack="sparse", ort_format=True),
    replace(BASE, max_drop=1.0, quantize="int8", latency_from="qemu-arm64"),
    replace(BASE, latency_from="ssh://pi@board:2222", ssh_options=("StrictHostKeyChecking=accept-new",)),
    replace(CHANNEL, speedup=1.5, round_to=8, latency_costs=True),
    replace(CHANNEL, latency_budget_ms=0.5, quantize="none"),
    replace(CHANNEL, max_drop=1.0),
    # one deliver step for both granularities: INT8, ORT files and a remote / emulated bench device in channel mode
    replace(CHANNEL, quantize="int8", ort_format=True, latency_from="qemu-arm64"),
    replace(BASE, recover="halving", cluster="local:2", resume=True, finetune_lr=5e-5),
]


@pytest.mark.parametrize("cfg,expect", REFUSED, ids=[e for _, e in REFUSED])
def test_validate_refuses(cfg: CompressConfig, expect: str) -> None:
    with pytest.raises(EdgepruneError) as info:
        cfg.validate()
    assert expect in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("cfg", ACCEPTED)
def test_validate_accepts(cfg: CompressConfig) -> None:
    cfg.validate()


@pytest.mark.parametrize("cfg,expect", REFUSED[:3] + REFUSED[-4:])
def test_compress_refuses_before_loading(cfg: CompressConfig, expect: str, tmp_path) -> None:
    out = tmp_path / "out"
    cfg = replace(cfg, data=f"imagefolder:{tmp_path / 'no-such-folder'}", out=str(out))
    with pytest.raises(EdgepruneError) as info:
        compress(cfg)
    assert expect in str(info.value)
    assert not out.exists()


def test_compress_connects_to_the_cluster_before_claiming_out(tmp_path) -> None:
    """An unreachable Ray head (a closed port on loopback): one line, before the data loads, --out untouched."""
    out = tmp_path / "out"
    cfg = replace(BASE, data=f"imagefolder:{tmp_path / 'none'}", out=str(out), cluster="127.0.0.1:1")
    with pytest.raises(EdgepruneError, match=r"cannot reach the Ray head at 127.0.0.1:1"):
        compress(cfg)
    assert not out.exists()


def test_compress_probes_an_ssh_device_before_loading(tmp_path) -> None:
    """A closed port on loopback: refused at once (connection refused), before the data would load."""
    out = tmp_path / "out"
    cfg = replace(BASE, data=f"imagefolder:{tmp_path / 'none'}", out=str(out), latency_from="ssh://u@127.0.0.1:1")
    with pytest.raises(EdgepruneError, match="unreachable"):
        compress(cfg)
    assert not out.exists()


CLI_REFUSED = [
    (["compress", "--quantize", "int4"], "--quantize must be int8 or none"),
    (["compress", "--pack", "bogus"], "--pack must be dense or sparse"),
    (["compress", "--threads", "-1"], "--threads must be >= 1"),
    (["compress", "--threads", "0"], "--threads must be >= 1"),
    (["compress", "--speedup", "2"], "--speedup only applies to --granularity channel"),
    (["compress", "--cluster", "head.example"], "bad --cluster 'head.example'"),
    (["compress", "--recover", "bogus"], "unknown --recover 'bogus'"),
    (["export", "--quantize", "int4"], "--quantize must be int8 or none"),
    (["export", "--pack", "zip"], "--pack must be dense or sparse"),
    (["export", "--opset", "0"], "--opset must be >= 1"),
    (["export", "--calib-size", "0"], "--calib-size and --eval-size must be >= 1"),
    (["export", "--target", "nope"], "unknown target 'nope'"),
]


@pytest.fixture(scope="module")
def warm_cli(tmp_path_factory) -> None:
    """Import the CLI and let Typer build its parameter parsers once (~0.6 s on the first call): that is
    start-up, not loading, and is not what the timed cases measure."""
    import edgeprune.export.ship  # noqa: F401

    run_cli(["compress", "--threads", "0", "--out", str(tmp_path_factory.mktemp("warm") / "out")])
    run_cli(["export", "--opset", "0", "--out", str(tmp_path_factory.mktemp("warm") / "out")])


@pytest.mark.parametrize("argv,expect", CLI_REFUSED, ids=[" ".join(a) for a, _ in CLI_REFUSED])
def test_cli_refuses_fast(argv: list[str], expect: str, tmp_path, warm_cli) -> None:
    out = tmp_path / "out"
    args = [*argv, "--data", f"imagefolder:{tmp_path / 'no-such-folder'}", "--out", str(out)]
    t0 = time.monotonic()
    outcome = run_cli(args)
    elapsed = time.monotonic() - t0
    assert outcome.exit_code != 0 and expect in outcome.stderr and "Traceback" not in outcome.stderr
    assert [ln for ln in outcome.stderr.splitlines() if ln.strip()][-1].startswith("edgeprune: ")
    assert not out.exists() and elapsed < 1.0, elapsed
