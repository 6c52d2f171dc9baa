"""Run Python scripts with the aarch64 build of onnxruntime on an x86_64 machine, under QEMU user mode.

For correctness checks without a board (``edgeprune verify --target arm64``, ``edgeprune bench --device
qemu-arm64``). Emulated timings mean nothing: never report them as latency.

First use sets up, once, into a cache directory (default ``~/.cache/edgeprune/qemu-arm64``, or
``$EDGEPRUNE_QEMU_CACHE``), about 370 MB and a minute or two:

1. ``debootstrap --arch=arm64 --foreign --variant=minbase --include=python3 bookworm`` downloads a Debian
   arm64 base + Python 3.11 from the Debian mirror in this machine's apt sources (``$EDGEPRUNE_DEBIAN_MIRROR``
   overrides); every downloaded ``.deb`` is then unpacked with ``dpkg-deb -x`` (no chroot, no second stage).
2. ``pip install --target site --platform manylinux_2_28_aarch64 ... --only-binary=:all:`` fetches the
   aarch64 wheels of onnxruntime (the host's version when available) and numpy.
3. Empty ``sys/devices/system/cpu/{possible,present}`` in the rootfs: onnxruntime's cpuinfo otherwise reads
   the host's /sys and segfaults under qemu 7.2.

Scripts run as ``qemu-aarch64-static ROOT/usr/bin/python3 SCRIPT`` with ``QEMU_LD_PREFIX=ROOT`` (guest
libraries and stdlib come from the rootfs, everything else, e.g. the script and its files, from the host)
and ``QEMU_CPU=neoverse-n1``: with qemu's default CPU (SVE on) INT8 results were garbage.

Needs: ``qemu-user-static``, ``debootstrap`` and ``debian-archive-keyring`` (``apt-get install
qemu-user-static debootstrap debian-archive-keyring``; the keyring is there already on Debian); root, or
``fakeroot``, for debootstrap; the Debian mirror and a Python package index reachable, at setup only.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from edgeprune.errors import EdgepruneError

SUITE = "bookworm"  # Debian 12: Python 3.11, glibc 2.36 (manylinux_2_28 wheels run)
DEFAULT_MIRROR = "http://deb.debian.org/debian"
QEMU_CPU = "neoverse-n1"  # Armv8.2 + dot-product, no SVE
READY = "ready.json"
SETUP_TIMEOUT_S = 1800
KEYRINGS = ("/usr/share/keyrings/debian-archive-keyring.gpg", "/usr/share/keyrings/debian-archive-keyring.pgp")
WHEEL_PLATFORMS = ["manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux2014_aarch64"]

Progress = Callable[[str], None]


def _say(message: str) -> None:
    print(f"edgeprune: qemu-arm64: {message}", file=sys.stderr, flush=True)


def default_cache_dir() -> Path:
    env = os.environ.get("EDGEPRUNE_QEMU_CACHE")
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "edgeprune" / "qemu-arm64"


def qemu_binary() -> str:
    """Path of the aarch64 user-mode emulator; a clear error when it is not installed."""
    for name in ("qemu-aarch64-static", "qemu-aarch64"):
        found = shutil.which(name)
        if found:
            return found
    raise EdgepruneError(
        "qemu-aarch64-static not found: arm64 emulation needs QEMU user mode; "
        "install it with `sudo apt-get install qemu-user-static`"
    )


def debian_mirror(sources: list[Path] | None = None) -> str:
    """The Debian mirror named in this machine's apt sources (``$EDGEPRUNE_DEBIAN_MIRROR`` wins).

    Only a Debian archive serves the arm64 ``bookworm`` suite; an Ubuntu host falls back to deb.debian.org.
    """
    env = os.environ.get("EDGEPRUNE_DEBIAN_MIRROR")
    if env:
        return env.rstrip("/")
    if sources is None:
        sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        if path.suffix not in ("", ".list", ".sources") or not path.is_file():
            continue  # skips *.disabled, *.save and the like
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for uri in re.findall(r"(?:^deb\s+(?:\[[^\]]*\]\s+)?|^URIs:\s*)(\S+)", text, flags=re.M):
            uri = uri.rstrip("/")
            # The main archive, not debian-security / debian-ports / third-party repositories.
            if re.match(r"^https?://", uri) and uri.endswith("/debian"):
                return uri
    return DEFAULT_MIRROR


class QemuArm64:
    """An aarch64 Debian rootfs + onnxruntime/numpy wheels in ``cache_dir``, ready to run Python scripts."""

    def __init__(self, cache_dir: str | Path | None = None, progress: Progress | None = _say):
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.root = self.cache_dir / "rootfs"
        self.site = self.cache_dir / "site"
        self.progress = progress or (lambda _msg: None)

    # ---- setup -------------------------------------------------------------------------------------
    def is_ready(self) -> bool:
        return (self.cache_dir / READY).is_file() and (self.root / "usr/bin/python3").exists()

    def info(self) -> dict:
        try:
            return json.loads((self.cache_dir / READY).read_text())
        except (OSError, ValueError):
            return {}

    def ensure(self) -> QemuArm64:
        """Set up once (idempotent, safe across concurrent processes); return self."""
        qemu_binary()
        if self.is_ready():
            return self
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EdgepruneError(
                f"cannot create the qemu-arm64 cache {self.cache_dir}: {exc.strerror}; set EDGEPRUNE_QEMU_CACHE"
            ) from None
        with open(self.cache_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here, then finds it ready
            if not self.is_ready():
                self._setup()
        return self

    def _setup(self) -> None:
        started = time.monotonic()
        self.progress(f"first use: setting up an arm64 Python + onnxruntime in {self.cache_dir} (once, ~1-2 min)")
        work = Path(tempfile.mkdtemp(prefix="setup-", dir=self.cache_dir))
        try:
            root, site = work / "rootfs", work / "site"
            self._debootstrap(root)
            self._unpack_debs(root)
            pyver = self._guest_python_version(root)
            self._stub_sysfs(root)
            ort_version = self._install_wheels(site, pyver)
            for final, new in ((self.root, root), (self.site, site)):
                if final.exists():
                    shutil.rmtree(final)
                os.replace(new, final)
            ready = {"suite": SUITE, "python": pyver, "onnxruntime": ort_version, "qemu_cpu": QEMU_CPU}
            self._check(ready)
            (self.cache_dir / READY).write_text(json.dumps(ready))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        self.progress(f"ready in {time.monotonic() - started:.0f} s ({self.cache_dir})")

    def _debootstrap(self, root: Path) -> None:
        tool = shutil.which("debootstrap") or next(
            (p for p in ("/usr/sbin/debootstrap", "/sbin/debootstrap") if os.path.exists(p)), None
        )
        if tool is None:
            raise EdgepruneError(
                "debootstrap not found: the arm64 rootfs is built with it; "
                "install it with `sudo apt-get install debootstrap`"
            )
        if shutil.which("dpkg-deb") is None:
            raise EdgepruneError("dpkg-deb not found: the arm64 rootfs is unpacked with it (a Debian/Ubuntu tool)")
        argv = [tool, "--arch=arm64", "--foreign", "--variant=minbase", "--include=python3"]
        keyring = next((k for k in KEYRINGS if Path(k).is_file()), None)
        if keyring is None:
            raise EdgepruneError(
                "the Debian archive keyring is missing, so downloads cannot be verified; "
                "install it with `sudo apt-get install debian-archive-keyring`"
            )
        argv += [f"--keyring={keyring}", SUITE, str(root)]
        mirror = debian_mirror()
        argv.append(mirror)
        if os.geteuid() != 0:
            fakeroot = shutil.which("fakeroot")
            if fakeroot is None:
                raise EdgepruneError(
                    "setting up the arm64 rootfs needs root or fakeroot for debootstrap; "
                    "install fakeroot (`sudo apt-get install fakeroot`) or run this once as root"
                )
            argv = [fakeroot, *argv]
        self.progress(f"downloading the Debian {SUITE} arm64 base and python3 from {mirror} (debootstrap)")
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=SETUP_TIMEOUT_S)
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
            tail = lines[-1] if lines else f"exit code {proc.returncode}"
            raise EdgepruneError(
                f"debootstrap failed ({tail}); check that {mirror} is reachable "
                "or set EDGEPRUNE_DEBIAN_MIRROR to a Debian mirror"
            )

    def _unpack_debs(self, root: Path) -> None:
        debs = sorted((root / "var/cache/apt/archives").glob("*.deb"))
        if not debs:
            raise EdgepruneError("debootstrap downloaded no packages; check the Debian mirror")
        self.progress(f"unpacking {len(debs)} arm64 packages")
        for deb in debs:
            proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise EdgepruneError(f"cannot unpack {deb.name}: {proc.stderr.strip()[:200]}")
            deb.unlink()  # the archives are not needed once unpacked

    @staticmethod
    def _guest_python_version(root: Path) -> str:
        link = root / "usr/bin/python3"
        if not link.exists() and not link.is_symlink():
            raise EdgepruneError("the arm64 rootfs has no python3; remove the qemu-arm64 cache and retry")
        m = re.search(r"python(\d+\.\d+)", os.readlink(link) if link.is_symlink() else "")
        if m:
            return m.group(1)
        found = sorted(p.name for p in (root / "usr/bin").glob("python3.*") if re.fullmatch(r"python3\.\d+", p.name))
        if not found:
            raise EdgepruneError("cannot tell the arm64 rootfs's Python version")
        return found[-1][len("python") :]

    @staticmethod
    def _stub_sysfs(root: Path) -> None:
        cpu = root / "sys/devices/system/cpu"
        cpu.mkdir(parents=True, exist_ok=True)
        for name in ("possible", "present"):
            (cpu / name).write_text("")

    def _install_wheels(self, site: Path, pyver: str) -> str:
        try:
            import onnxruntime

            host_ort = onnxruntime.__version__
        except ImportError:  # pragma: no cover - onnxruntime is a dependency
            host_ort = ""
        base = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile"]
        base += ["--target", str(site), "--only-binary=:all:", "--implementation", "cp", "--python-version", pyver]
        for plat in WHEEL_PLATFORMS:
            base += ["--platform", plat]
        # The host's onnxruntime version first, so arm64 and x86_64 results come from the same release.
        attempts = [[f"onnxruntime=={host_ort}", "numpy"]] if host_ort else []
        attempts.append(["onnxruntime", "numpy"])
        last = ""
        for packages in attempts:
            self.progress(f"downloading aarch64 wheels: {' '.join(packages)} (pip)")
            shutil.rmtree(site, ignore_errors=True)
            proc = subprocess.run(base + packages, capture_output=True, text=True, timeout=SETUP_TIMEOUT_S)
            if proc.returncode == 0:
                found = sorted(site.glob("onnxruntime-*.dist-info"))
                return found[0].name.removesuffix(".dist-info").split("-")[1] if found else "?"
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING")]
            last = lines[-1] if lines else f"pip exit code {proc.returncode}"
        raise EdgepruneError(f"cannot download the aarch64 onnxruntime wheel ({last}); check the package index")

    def _check(self, ready: dict) -> None:
        self.progress("checking that onnxruntime imports under emulation")
        proc = self.run_python(["-c", "import onnxruntime, numpy, platform; print(platform.machine())"], timeout=300)
        if proc.returncode != 0 or "aarch64" not in proc.stdout:
            raise EdgepruneError(
                f"onnxruntime {ready['onnxruntime']} does not start under qemu-aarch64 "
                f"({(proc.stderr.strip().splitlines() or ['no output'])[-1][:200]}); remove {self.cache_dir} and retry"
            )

    # ---- running -----------------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "QEMU_", "LD_"))}
        env.update(
            {
                "QEMU_LD_PREFIX": str(self.root),
                "QEMU_CPU": QEMU_CPU,
                "PYTHONPATH": str(self.site),
                "PYTHONNOUSERSITE": "1",
                "PYTHONDONTWRITEBYTECODE": "1",
                "OMP_NUM_THREADS": "1",
            }
        )
        return env

    def run_python(
        self, argv: list[str], *, timeout: float = 600, cwd: str | Path | None = None
    ) -> subprocess.CompletedProcess:
        """``python3 *argv`` in the emulated aarch64 rootfs (stdout/stderr captured as text)."""
        command = [qemu_binary(), str(self.root / "usr/bin/python3"), *argv]
        return subprocess.run(
            command,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            cwd=str(cwd) if cwd else None,
        )


def qemu_python(
    script: str | Path,
    args: list[str],
    *,
    cache_dir: str | Path | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """Run ``script`` with ``args`` under the emulated aarch64 Python (set up on first use).

    Paths in ``args`` are the host's (the guest sees the host filesystem, except for its own system
    libraries). Returns the completed process, stdout/stderr as text, whatever its exit code; raises
    `subprocess.TimeoutExpired` after ``timeout`` seconds of running (setup not counted), and
    `EdgepruneError` when emulation cannot be set up.
    """
    script = Path(script)
    if not script.is_file():
        raise EdgepruneError(f"script not found: {script}")
    if platform.machine() in ("aarch64", "arm64"):
        # Already on arm64: no emulation needed, run the local interpreter.
        return subprocess.run(
            [sys.executable, str(script), *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    emulator = QemuArm64(cache_dir).ensure()
    return emulator.run_python([str(script.absolute()), *map(str, args)], timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    """``python -m edgeprune.benchmarks.qemu_arm64 [--cache DIR]``: set up ahead of time (e.g. in CI)."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=None, help="cache directory (default ~/.cache/edgeprune/qemu-arm64)")
    ns = parser.parse_args(argv)
    try:
        emulator = QemuArm64(ns.cache).ensure()
    except EdgepruneError as exc:
        print(f"edgeprune: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"cache_dir": str(emulator.cache_dir), **emulator.info()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
