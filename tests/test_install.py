"""The package as a user gets it: a wheel built from this tree, installed NON-editable, runs both modes.

Development and CI use `pip install -e .`, whose import hook serves every file straight from the tree, so a
subpackage or data file missing from the package list (as `edgeprune/structured` once was, breaking
`--granularity channel` for every `pip install .`) never shows there. Here the wheel goes into a fresh
`--system-site-packages` venv (torch and friends come from the system, edgeprune from the wheel) and every
check asserts that the code that ran is the venv's copy: the editable install's finder stays on `sys.meta_path`
of that venv too and would otherwise quietly fill in whatever the wheel lacks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
# source folder -> installed package (pyproject.toml / setup.py): export/ and benchmarks/ install under edgeprune
PACKAGE_ROOTS = {"edgeprune": "edgeprune", "export": "edgeprune.export", "benchmarks": "edgeprune.benchmarks"}
# data files the installed code reads at run time
DATA = ("edgeprune/targets.json", "edgeprune/rules/*.json", "edgeprune/assets/*")
# what a checkout holds that is not source: copied trees leave these out (a clean clone has none of them)
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    ".benchmarks",
    ".whl",
    ".devdata",
    "*.tmp",
    "edgeprune-out",
)
QUICK = ["--signals", "magnitude", "--finetune-epochs", "0", "--eval-size", "300", "--calib-size", "200"]
QUICK += ["--bench-runs", "5", "-q"]
MODES = {  # mode -> extra flags (fewer range baselines: this test is about packaging, not pruning quality)
    "unstructured": ["--range-baselines", "mag"],
    "channel": ["--granularity", "channel"],
}
# written into the venv only: records, at exit, the file of every edgeprune module the process imported
AUDIT = """import atexit, json, os, sys
def _dump(path=os.environ.get("EDGEPRUNE_TEST_AUDIT")):
    if path:
        mods = {n: getattr(m, "__file__", None) for n, m in list(sys.modules.items()) if n.split(".")[0] == "edgeprune"}
        with open(path, "w") as f:
            json.dump(mods, f)
atexit.register(_dump)
"""


def source_modules() -> dict[str, str]:
    """Installed module name -> wheel path of every .py file in the source tree."""
    out = {}
    for folder, package in PACKAGE_ROOTS.items():
        for py in sorted((ROOT / folder).rglob("*.py")):
            rel = py.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = "/".join([*package.split("."), *py.relative_to(ROOT / folder).parts])
    return out


def clean_env() -> dict[str, str]:
    # nothing may point Python back at the source tree but the editable finder, which the audit catches
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def sh(argv: list, cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(a) for a in argv], cwd=cwd, env={**clean_env(), **env}, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip wheel .` builds from a copy of this tree (a copy: no build/ or egg-info left in the tree)."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
    # the build backend must be the system's setuptools, not one fetched into an isolated env (offline-safe)
    sh([sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "-q", "-w", base], base)
    (whl,) = base.glob("edgeprune-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv seeing the system's packages, with the wheel installed into it (over the editable install)."""
    env = tmp_path_factory.mktemp("venv") / "venv"
    # --without-pip: the system's pip (visible through --system-site-packages) installs into the venv just as well
    sh([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", env], env.parent)
    python = env / "bin" / "python"
    # --ignore-installed: the editable edgeprune in the system site-packages must not count as "already satisfied"
    sh([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--ignore-installed", "-q", wheel], env)
    purelib = sh([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], env).stdout.strip()
    (Path(purelib) / "_edgeprune_test_audit.py").write_text(AUDIT)
    (Path(purelib) / "_edgeprune_test_audit.pth").write_text("import _edgeprune_test_audit\n")
    return env


def site_packages(venv: Path) -> Path:
    (sp,) = (venv / "lib").glob("python3*/site-packages")
    return sp.resolve()


def assert_from_venv(files: dict[str, str | None], venv: Path) -> None:
    sp = site_packages(venv)
    elsewhere = {n: f for n, f in files.items() if f is not None and not Path(f).resolve().is_relative_to(sp)}
    assert not elsewhere, f"imported from outside the installed wheel ({sp}): {elsewhere}"


def test_wheel_holds_every_subpackage_and_data_file_and_nothing_else(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/")[0] for n in names}
    assert tops == {"edgeprune", wheel.name.split("-py")[0] + ".dist-info"}  # no tests/, scripts/, export/ …
    missing = sorted(set(source_modules().values()) - names)
    assert not missing, f"source files missing from the wheel: {missing}"
    assert "edgeprune/structured/flow.py" in names and "edgeprune/export/ort_outputs.py" in names
    for pattern in DATA:
        files = sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob(pattern) if p.is_file() and p.suffix != ".py")
        assert files and set(files) <= names, f"{pattern}: {sorted(set(files) - names)} not in the wheel"
    assert not any(n.startswith("edgeprune/benchmarks/results/") for n in names)  # measurements, not code
    entry = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-py')[0]}.dist-info/entry_points.txt").decode()
    assert "edgeprune = edgeprune.cli:main" in entry


def test_every_module_imports_from_the_installed_copy(venv: Path, tmp_path: Path):
    python = venv / "bin" / "python"
    first = sh([python, "-c", "import edgeprune; print(edgeprune.__file__)"], tmp_path).stdout.strip()
    assert Path(first).resolve().is_relative_to(site_packages(venv)), first
    # every module of the tree, by its installed name; one missing from the wheel would be served by the
    # editable finder from /work/main (or fail to import) and show up here
    code = (
        "import importlib, json, sys\n"
        "names = json.loads(sys.argv[1])\n"
        "print(json.dumps({n: importlib.import_module(n).__file__ for n in names}))\n"
    )
    names = sorted(source_modules())
    files = json.loads(sh([python, "-c", code, json.dumps(names)], tmp_path).stdout.splitlines()[-1])
    assert sorted(files) == names
    assert_from_venv(files, venv)


@pytest.mark.parametrize("mode", list(MODES))
def test_compress_runs_from_the_wheel(mode: str, venv: Path, tmp_path: Path):
    """`edgeprune compress` (the venv's console script) from a folder outside the tree, on the bundled demo."""
    out, audit = tmp_path / "out", tmp_path / "modules.json"
    argv = [venv / "bin" / "edgeprune", "compress", "--out", out, *QUICK, *MODES[mode]]
    sh(argv, tmp_path, timeout=900, EDGEPRUNE_TEST_AUDIT=str(audit))
    report = json.loads((out / "report.json").read_text())
    assert report["granularity"] == mode and report["selected"]
    for name in ("model.onnx", "dense.onnx", "report.md", "report.json", "pareto.png"):
        assert (out / name).stat().st_size > 0, name
    assert all((tmp_path / p).is_file() for p in report["artifacts"].values()), report["artifacts"]
    modules = json.loads(audit.read_text())
    assert_from_venv(modules, venv)
    used = {"unstructured": "edgeprune.export.onnx_export", "channel": "edgeprune.structured.flow"}[mode]
    assert used in modules  # the run really went through the subpackage this mode needs
