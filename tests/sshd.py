"""A throwaway OpenSSH server for tests: real ``/usr/sbin/sshd`` on a free loopback port.

Everything it needs lives in one folder: a fresh host key, a user key pair that is authorized, a second
key pair that is *not*, its own ``sshd_config`` and a ``known_hosts`` file for the client. Sessions get
``TMPDIR`` pointed at ``remote_tmp/`` inside that folder, so tests can check that the benchmark removed
its remote temp dir. Used by ``tests/test_ssh*.py`` as a module-scoped fixture; also runnable by hand:

    python -m tests.sshd /tmp/sshd-play     # prints the ssh command line, Ctrl-C stops it
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def sshd_unavailable_reason() -> str | None:
    """Why this machine cannot run the test server, or None when it can."""
    for tool in (SSHD, shutil.which("ssh"), shutil.which("scp"), shutil.which("ssh-keygen")):
        if not tool or not os.path.exists(tool):
            return "OpenSSH server/client not installed (apt-get install openssh-server openssh-client)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgeprune-test", "-f", str(path)],
        check=True,
        capture_output=True,
    )


@dataclass
class Sshd:
    root: Path
    port: int
    user: str
    user_key: Path  # authorized
    wrong_key: Path  # a valid key pair the server does not know
    known_hosts: Path  # the server's host key, as the client should see it
    empty_known_hosts: Path
    remote_tmp: Path  # TMPDIR of every session
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}"

    def client_options(self, known_hosts: Path | None = None) -> list[str]:
        """``-o`` values that make the client trust exactly this server and nothing from ~/.ssh."""
        kh = known_hosts if known_hosts is not None else self.known_hosts
        return [f"UserKnownHostsFile={kh}", "GlobalKnownHostsFile=/dev/null"]

    def log(self) -> str:
        path = self.root / "sshd.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def start_sshd(root: Path, timeout: float = 10.0) -> Sshd:
    """Generate keys and config under ``root`` and start sshd in the foreground (``-D``) on a free port."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    host_key, user_key, wrong_key = root / "host_ed25519", root / "id_user", root / "id_wrong"
    for key in (host_key, user_key, wrong_key):
        if not key.exists():
            _keygen(key)
    (root / "authorized_keys").write_text((root / "id_user.pub").read_text())
    remote_tmp = root / "remote_tmp"
    remote_tmp.mkdir(exist_ok=True)
    user = getpass.getuser()
    port = _free_port()
    config = root / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {host_key}",
                f"PidFile {root / 'sshd.pid'}",
                f"AuthorizedKeysFile {root / 'authorized_keys'}",
                f"AllowUsers {user}",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                # The test user's real account is irrelevant: no PAM, no checks on folder modes.
                "UsePAM no",
                "StrictModes no",
                f"SetEnv TMPDIR={remote_tmp}",
                # OpenSSH >= 9 scp talks SFTP; the built-in server needs no external binary.
                "Subsystem sftp internal-sftp",
                "LogLevel VERBOSE",
                "",
            ]
        )
    )
    host_pub = (root / "host_ed25519.pub").read_text().split()
    known_hosts = root / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    empty_known_hosts = root / "known_hosts_empty"
    empty_known_hosts.write_text("")
    if os.geteuid() == 0:
        # sshd refuses to start without its privilege-separation directory (normally made by systemd).
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    log = open(root / "sshd.log", "ab")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log)
    log.close()
    server = Sshd(root, port, user, user_key, wrong_key, known_hosts, empty_known_hosts, remote_tmp, proc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}: {server.log()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return server
        except OSError:
            time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"sshd did not listen on port {port} within {timeout} s: {server.log()[-2000:]}")


if __name__ == "__main__":
    import sys

    srv = start_sshd(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/edgeprune-sshd"))
    print(
        f"ssh -i {srv.user_key} -p {srv.port} -o UserKnownHostsFile={srv.known_hosts} {srv.user}@127.0.0.1",
        flush=True,
    )
    try:
        srv.proc.wait()
    except KeyboardInterrupt:
        srv.stop()
