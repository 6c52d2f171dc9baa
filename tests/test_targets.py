"""Target profiles: built-in data, user files (--targets-file / EDGEPRUNE_TARGETS), validation, CLI."""

from __future__ import annotations

import json

import pytest

from edgeprune import targets as targets_mod
from edgeprune.errors import EdgepruneError
from edgeprune.targets import (
    ENV_VAR,
    INT8_FORMATS,
    available_targets,
    bench_threads,
    get_target,
    host_cpu_flags,
    round_to_hint,
    threads_note,
)

from .test_bench import run_cli


@pytest.fixture(autouse=True)
def no_user_targets(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def test_builtin_profiles_cover_the_issue_list():
    t = available_targets()
    assert {"x86_64", "arm64", "rpi4", "rpi5", "jetson-orin-cpu"} <= set(t)
    assert t["x86_64"].arch == "x86_64"
    assert all(t[n].arch == "aarch64" for n in ("arm64", "rpi4", "rpi5", "jetson-orin-cpu"))
    # No dot-product on the Pi 4's Cortex-A72: INT8 is not the default there; it is on the A76.
    assert t["rpi4"].int8_worth_it is False and t["rpi5"].int8_worth_it is True
    assert t["x86_64"].int8_format == "qdq_u8s8_reduce_range" and t["rpi5"].int8_format == "qdq_s8s8"
    for p in t.values():
        assert p.threads >= 1 and p.round_to in (1, 2, 4, 8, 16, 32) and p.opset >= 13
        assert p.int8_format in INT8_FORMATS


X86_CPUINFO = "processor\t: 0\nmodel name\t: Xeon\nflags\t\t: fpu sse avx2 avx512f avx512bw\n\nprocessor\t: 1\n"
ARM_CPUINFO = "processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd asimddp\nCPU implementer\t: 0x41\n"


def test_avx512_profile_rounds_to_its_conv_block():
    t = get_target("x86_64-avx512")
    assert t.arch == "x86_64" and t.round_to == 16 and "16-channel" in t.description


def test_host_cpu_flags_read_x86_and_arm_cpuinfo():
    assert {"avx2", "avx512f"} <= host_cpu_flags(X86_CPUINFO)
    assert host_cpu_flags(ARM_CPUINFO) == {"fp", "asimd", "asimddp"}
    assert host_cpu_flags("") == set()


def test_round_to_hint_only_where_the_host_pads_widths_up():
    x86, arm = get_target("x86_64"), get_target("arm64")
    avx512 = host_cpu_flags(X86_CPUINFO)
    hint = round_to_hint(x86, 8, "x86_64", avx512)
    assert hint is not None and "--round-to 16" in hint and "\n" not in hint
    assert round_to_hint(x86, 16, "x86_64", avx512) is None  # already a multiple of the block
    assert round_to_hint(x86, 32, "x86_64", avx512) is None
    assert round_to_hint(x86, 8, "x86_64", {"avx2"}) is None  # AVX2: 8-float blocks, 8 is right
    assert round_to_hint(arm, 4, "x86_64", avx512) is None  # latency of an arm64 target is not this host's


def test_user_file_adds_inherits_and_overrides(tmp_path):
    f = tmp_path / "t.json"
    f.write_text(
        json.dumps(
            {
                "gateway": {"base": "rpi4", "threads": 2, "description": "our gateway"},
                "rpi5": {"base": "rpi5", "round_to": 16},
            }
        )
    )
    t = available_targets(f)
    assert t["gateway"].threads == 2 and t["gateway"].arch == "aarch64" and t["gateway"].round_to == 4
    assert t["gateway"].int8_worth_it is False  # inherited from rpi4
    assert t["rpi5"].round_to == 16 and available_targets()["rpi5"].round_to == 8
    assert get_target("gateway", f).description == "our gateway"


def test_environment_variable_names_the_user_file(tmp_path, monkeypatch):
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"box": {"base": "x86_64", "threads": 8}}))
    monkeypatch.setenv(ENV_VAR, str(f))
    assert get_target("box").threads == 8


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object of profiles"),
        ('{"b": {"base": "nope"}}', "base 'nope' is not a known target"),
        ('{"b": {"arch": "x86_64"}}', "missing description"),
        ('{"b": {"base": "arm64", "colour": "red"}}', "unknown colour"),
        ('{"b": {"base": "arm64", "arch": "riscv64"}}', "arch must be one of"),
        ('{"b": {"base": "arm64", "threads": 0}}', "threads must be a positive integer"),
        ('{"b": {"base": "arm64", "int8_format": "qoperator"}}', "int8_format must be one of"),
        ('{"b": {"base": "arm64", "int8_worth_it": "yes"}}', "int8_worth_it must be true or false"),
    ],
)
def test_malformed_user_files_are_one_line_errors(tmp_path, content, message):
    f = tmp_path / "t.json"
    f.write_text(content)
    with pytest.raises(EdgepruneError, match=message) as info:
        available_targets(f)
    assert "\n" not in str(info.value)


def test_unknown_target_lists_choices():
    with pytest.raises(EdgepruneError, match="unknown target 'rpi9'.*rpi4") as info:
        get_target("rpi9")
    assert "\n" not in str(info.value)
    with pytest.raises(EdgepruneError, match="not found"):
        available_targets("/nonexistent/targets.json")


def test_cli_targets_table_and_json(tmp_path, capsys):
    assert run_cli(["targets"]) == 0
    table = capsys.readouterr().out
    for name in ("x86_64", "arm64", "rpi4", "rpi5", "jetson-orin-cpu", "qdq_u8s8_reduce_range", "Cortex-A72"):
        assert name in table
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"gateway": {"base": "rpi4", "threads": 2, "description": "our gateway"}}))
    assert run_cli(["targets", "--json", "--targets-file", str(f)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["gateway"]["threads"] == 2 and data["gateway"]["arch"] == "aarch64"
    assert run_cli(["targets", "--targets-file", str(tmp_path / "missing.json")]) == 2
    assert "target file not found" in capsys.readouterr().err


def test_bench_threads_leave_a_core_free_here_and_take_the_targets_on_a_board(monkeypatch) -> None:
    board = get_target("rpi5")  # 4 threads
    for cores, want in ((1, 1), (2, 1), (4, 3), (8, 4)):
        monkeypatch.setattr(targets_mod, "local_cores", lambda c=cores: c)
        assert bench_threads(None, board) == want
        assert bench_threads(None, board, "qemu-arm64") == want  # emulated: the search times on this machine
        assert bench_threads(None, board, "ssh://pi@board") == 4
        assert bench_threads(3, board) == 3  # the user's choice stands
    monkeypatch.setattr(targets_mod, "local_cores", lambda: 2)
    note = threads_note(None, board, bench_threads(None, board))
    assert note is not None and note.startswith("latency timed at 1 thread(s), not the target's 4")
    assert threads_note(2, board, 2) is None and threads_note(None, board, 4) is None
