"""Talk to a benchmark device with the system ``ssh`` client.

Why the system client: it already knows the user's keys, agent, ``~/.ssh/config`` (jump hosts, aliases)
and ``known_hosts``. Every call is an argument list (never ``shell=True``); the one string the remote
shell sees is built here from constants and ``shlex.quote``-d values. Host-key checking stays on:
``BatchMode=yes`` turns "unknown host" into an error instead of a prompt, and the error says how to
add the key. Every failure becomes a one-line `DeviceError`.

Files travel as ``ssh host 'cat > DIR/NAME'`` with the file on stdin, not ``scp``: OpenSSH >= 9's scp
speaks SFTP, and boards running dropbear (or any server without an sftp-server) close the connection
on it. A plain exec channel works with every server.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from edgeprune.errors import DeviceError, EdgepruneError

CONNECT_TIMEOUT_S = 10
# The up-front check (`SshSession.probe`) runs before minutes of pruning: a dead board should fail fast.
PROBE_CONNECT_TIMEOUT_S = 5
PROBE_TIMEOUT_S = 20
# A device that stops answering (power cut, kernel panic, cable pulled) is noticed after ~15 s.
SERVER_ALIVE = ("ServerAliveInterval=5", "ServerAliveCountMax=3")
_OPTION = re.compile(r"^[A-Za-z][A-Za-z0-9]*[= ]\S.*$")
_HOST = re.compile(r"^[A-Za-z0-9_.:%-]+$")
_USER = re.compile(r"^[A-Za-z0-9_.@-]+$")
_SAFE_REMOTE_DIR = re.compile(r"^/[A-Za-z0-9_./-]*/edgeprune\.[A-Za-z0-9]+$")


@dataclass(frozen=True)
class SshTarget:
    """``ssh://[user@]host[:port]`` split into parts."""

    host: str
    user: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, url: str) -> SshTarget:
        bad = f"bad device '{url}': expected ssh://user@host[:port]"
        if not url.startswith("ssh://"):
            raise EdgepruneError(bad)
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            raise EdgepruneError(f"{bad} (the port must be a number 1-65535)") from None
        host = parts.hostname
        if not host or parts.path not in ("", "/") or parts.query or parts.fragment or parts.password:
            raise EdgepruneError(bad)
        # A host or user starting with '-' would be read by ssh as an option.
        if host.startswith("-") or not _HOST.match(host):
            raise EdgepruneError(f"{bad} (invalid host name '{host}')")
        user = parts.username
        if user is not None and (user.startswith("-") or not _USER.match(user)):
            raise EdgepruneError(f"{bad} (invalid user name '{user}')")
        return cls(host=host, user=user, port=port)

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    @property
    def known_hosts_name(self) -> str:
        """How the host appears in known_hosts (``[host]:port`` for non-default ports)."""
        return f"[{self.host}]:{self.port}" if self.port and self.port != 22 else self.host

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"ssh://{user}{host}{port}"


def check_identity(identity: str | Path | None) -> str | None:
    """``--identity`` must name a readable key file (ssh would otherwise fall back to other keys quietly)."""
    if identity is None:
        return None
    path = Path(identity)
    if path.is_dir():
        raise EdgepruneError(
            f"--identity {identity} is a directory; give the private key file (e.g. ~/.ssh/id_ed25519)"
        )
    if not path.is_file():
        raise EdgepruneError(f"--identity {identity}: no such key file")
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as exc:
        raise EdgepruneError(
            f"--identity {identity}: cannot read the key file ({exc.strerror or exc}); check its owner and mode"
        ) from None
    return str(identity)


def check_ssh_options(options: list[str] | tuple[str, ...]) -> list[str]:
    """``--ssh-option`` values must look like ``Key=Value`` (what ``ssh -o`` takes)."""
    for opt in options:
        if not _OPTION.match(opt):
            raise EdgepruneError(f"bad --ssh-option '{opt}': expected Key=Value, e.g. ConnectTimeout=5")
    return list(options)


_CONNECTION_LOST = (
    "timeout, server",
    "connection reset",
    "broken pipe",
    "connection closed",
    "closed by remote",
)


def ssh_failure(stderr: str, target: SshTarget, during: str) -> DeviceError:
    """Turn the stderr of an ``ssh`` that exited with 255 into a one-line error with a fix."""
    text = stderr.strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    last = lines[-1] if lines else "no message from ssh"
    low = text.lower()
    if "remote host identification has changed" in low:
        return DeviceError(
            f"the host key of {target.host} CHANGED since it was recorded in known_hosts (reinstalled "
            "device, or someone in between); if you trust the change: "
            f"ssh-keygen -R '{target.known_hosts_name}'"
        )
    if "host key verification failed" in low or "no matching host key" in low:
        port = f"-p {target.port} " if target.port else ""
        return DeviceError(
            f"{target.host} is not in known_hosts, so its identity cannot be checked; add it with "
            f"`ssh-keyscan {port}{target.host} >> ~/.ssh/known_hosts` (after checking the fingerprint), "
            "or connect once with ssh, or pass --ssh-option StrictHostKeyChecking=accept-new"
        )
    if "permission denied" in low or "too many authentication failures" in low:
        return DeviceError(
            f"authentication to {target.destination} failed ({last}); pass the right key with --identity KEY "
            "or add your public key to the device's ~/.ssh/authorized_keys (ssh-copy-id)"
        )
    if "could not resolve hostname" in low or "name or service not known" in low:
        return DeviceError(f"cannot resolve device host name '{target.host}'; check the spelling or use its IP")
    for sign in ("connection refused", "no route to host", "network is unreachable", "connection timed out"):
        if sign in low:
            return DeviceError(
                f"device {target} is unreachable ({sign}); check that it is on, on the network, "
                "that sshd runs there and that the port is right"
            )
    for sign in _CONNECTION_LOST:
        if sign in low:
            return DeviceError(
                f"lost the connection to {target} {during} ({last}); the device may have crashed, "
                "rebooted or dropped off the network"
            )
    return DeviceError(f"ssh to {target} failed {during}: {last}")


class SshSession:
    """Runs commands on one device. Each call is a fresh ``ssh`` process."""

    def __init__(
        self,
        target: SshTarget,
        identity: str | Path | None = None,
        options: list[str] | tuple[str, ...] = (),
        connect_timeout: int = CONNECT_TIMEOUT_S,
    ) -> None:
        self.target = target
        self.identity = check_identity(identity)
        self.options = check_ssh_options(options)
        self.connect_timeout = connect_timeout

    def _common(self, port_flag: str) -> list[str]:
        # ssh uses the *first* value it sees for each option, so the order is deliberate:
        # BatchMode first (never prompt: a hidden password prompt would hang a benchmark), then the
        # user's options (they override our defaults), then our defaults.
        argv = ["-o", "BatchMode=yes"]
        for opt in self.options:
            argv += ["-o", opt]
        argv += ["-o", f"ConnectTimeout={self.connect_timeout}"]
        for opt in SERVER_ALIVE:
            argv += ["-o", opt]
        if self.identity is not None:
            # Only this key: the agent's keys would otherwise be tried first and may lock us out.
            argv += ["-i", str(self.identity), "-o", "IdentitiesOnly=yes"]
        if self.target.port:
            argv += [port_flag, str(self.target.port)]
        return argv

    def ssh_argv(self, remote_command: str) -> list[str]:
        return ["ssh", *self._common("-p"), "--", self.target.destination, remote_command]

    def _call(
        self, argv: list[str], timeout: float, during: str, stdin=subprocess.DEVNULL
    ) -> subprocess.CompletedProcess:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=stdin)
        except FileNotFoundError:
            raise EdgepruneError(f"'{argv[0]}' not found; install the OpenSSH client") from None
        except subprocess.TimeoutExpired:
            raise DeviceError(
                f"{argv[0]} to {self.target} timed out after {timeout:g} s {during}; "
                "raise --timeout or check the device"
            ) from None
        if proc.returncode == 255:
            raise ssh_failure(proc.stderr, self.target, during)
        return proc

    def run(self, remote_command: str, timeout: float, during: str) -> subprocess.CompletedProcess:
        """Run one remote shell command; ssh-level failures raise, the command's own exit code is returned."""
        return self._call(self.ssh_argv(remote_command), timeout, during)

    def probe(self, timeout: float = PROBE_TIMEOUT_S) -> None:
        """Log in and run ``true``: reachability, host key and authentication, checked in one cheap call."""
        proc = self.run("true", timeout, "while checking the device")
        if proc.returncode != 0:
            detail = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            raise DeviceError(
                f"{self.target} accepted the login but `true` failed there (exit {proc.returncode}): {detail}"
            )

    def make_temp_dir(self, timeout: float) -> str:
        cmd = 'mktemp -d "${TMPDIR:-/tmp}/edgeprune.XXXXXXXX"'
        proc = self.run(cmd, timeout, "while creating a temp dir")
        lines = proc.stdout.strip().splitlines()
        path = lines[-1].strip() if lines else ""
        if proc.returncode != 0 or not _SAFE_REMOTE_DIR.match(path):
            detail = (proc.stderr.strip().splitlines() or [path or "no output"])[-1]
            raise DeviceError(f"cannot create a temp dir on {self.target} with mktemp -d: {detail}")
        return path

    def put(self, files: list[Path], remote_dir: str, timeout: float) -> None:
        """Copy ``files`` (by their base names) into ``remote_dir``, one ``cat >`` stream per file.

        ``remote_dir`` comes from `make_temp_dir` (checked against a strict pattern); the names are ours
        (runner.py, inputs.npz, m0.onnx, ...). Both are quoted anyway. The remote side prints the size it
        wrote, so a stream cut short (a dropped link) is an error, not a truncated model.
        """
        if not _SAFE_REMOTE_DIR.match(remote_dir):
            raise DeviceError(f"refusing to copy into unexpected remote path {remote_dir!r}")
        for f in files:
            dest = shlex.quote(f"{remote_dir}/{Path(f).name}")
            with open(f, "rb") as stream:
                size = os.fstat(stream.fileno()).st_size
                proc = self._call(
                    self.ssh_argv(f"cat > {dest} && wc -c < {dest}"), timeout, "while copying files", stream
                )
            wrote = (proc.stdout.strip().splitlines() or [""])[-1].strip()
            if proc.returncode != 0 or wrote != str(size):
                detail = (proc.stderr.strip().splitlines() or [f"{wrote or 'no'} bytes written of {size}"])[-1]
                raise DeviceError(f"copying {Path(f).name} to {self.target}:{remote_dir} failed: {detail}")

    def remove_dir(self, remote_dir: str, timeout: float, pidfile: str | None = None) -> None:
        """Stop a runner that may still be going (by the id it wrote) and delete the temp dir."""
        if not _SAFE_REMOTE_DIR.match(remote_dir):  # never rm -rf something we did not create
            raise DeviceError(f"refusing to remove unexpected remote path {remote_dir!r}")
        cmd = f"rm -rf -- {shlex.quote(remote_dir)}"
        if pidfile:
            pf = shlex.quote(pidfile)
            cmd = f'if [ -s {pf} ]; then kill -9 "$(cat {pf})" 2>/dev/null; fi; {cmd}'
        proc = self.run(cmd, timeout, "while removing the temp dir")
        if proc.returncode != 0:
            detail = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            raise DeviceError(f"could not remove {remote_dir} on {self.target}: {detail}")
