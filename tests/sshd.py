"""Throwaway SSH servers for tests on a free loopback port: real OpenSSH ``sshd``, and real ``dropbear``.

Everything a server needs lives in one folder: a fresh host key, a user key pair that is authorized, a
second key pair that is *not*, its config and a ``known_hosts`` file for the client. Sessions get
``TMPDIR`` pointed at ``remote_tmp/`` inside that folder, so tests can check that the benchmark removed
its remote temp dir. Used by ``tests/test_ssh*.py`` as module-scoped fixtures; also runnable by hand:

    python -m tests.sshd /tmp/sshd-play            # prints the ssh command line, Ctrl-C stops it
    python -m tests.sshd /tmp/db-play dropbear     # the same with dropbear

Dropbear is what small boards (OpenWrt, Buildroot, Yocto images) run: no SFTP, so OpenSSH >= 9's scp
fails against it. Unlike sshd it has no ``AuthorizedKeysFile`` option: it reads
``~/.ssh/authorized_keys`` of the login user, with the home taken from ``/etc/passwd``. So the test
server runs in a private mount namespace (``unshare -m``, root only) where a copy of ``/etc/passwd``
with the user's home moved into the test folder is bind-mounted over the real one; nothing outside the
folder changes, and the namespace goes away with the server. In the same namespace the
``sftp-server`` dropbear would exec is hidden (``/dev/null`` bound over it), as on a stock board.
"""

from __future__ import annotations

import functools
import getpass
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SSHD = "/usr/sbin/sshd"
DROPBEAR = "/usr/sbin/dropbear"
# Where Debian's dropbear looks for an SFTP server (`strings /usr/sbin/dropbear | grep sftp`).
DROPBEAR_SFTP_SERVERS = ("/usr/lib/sftp-server", "/usr/libexec/sftp-server")


def sshd_unavailable_reason() -> str | None:
    """Why this machine cannot run the test server, or None when it can."""
    for tool in (SSHD, shutil.which("ssh"), shutil.which("scp"), shutil.which("ssh-keygen")):
        if not tool or not os.path.exists(tool):
            return "OpenSSH server/client not installed (apt-get install openssh-server openssh-client)"
    return None


@functools.cache
def dropbear_unavailable_reason() -> str | None:
    """Why this machine cannot run the dropbear test server, or None when it can."""
    if not os.path.exists(DROPBEAR) or not shutil.which("dropbearkey"):
        return "dropbear not installed (apt-get install dropbear-bin)"
    for tool in ("ssh", "scp", "ssh-keygen", "ssh-keyscan", "unshare"):
        if not shutil.which(tool):
            return f"{tool} not installed (apt-get install openssh-client util-linux)"
    if os.geteuid() != 0:
        return "the dropbear test server needs root (a private mount namespace for its /etc/passwd)"
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0:
        return f"unshare -m is not permitted here: {probe.stderr.decode().strip()}"
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
    log_name: str = "sshd.log"

    @property
    def url(self) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}"

    def client_options(self, known_hosts: Path | None = None) -> list[str]:
        """``-o`` values that make the client trust exactly this server and nothing from ~/.ssh."""
        kh = known_hosts if known_hosts is not None else self.known_hosts
        return [f"UserKnownHostsFile={kh}", "GlobalKnownHostsFile=/dev/null"]

    def log(self) -> str:
        path = self.root / self.log_name
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
    return _wait_listening(server, "sshd", timeout)


def _wait_listening(server: Sshd, name: str, timeout: float) -> Sshd:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {server.proc.returncode}: {server.log()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=0.5):
                return server
        except OSError:
            time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"{name} did not listen on port {server.port} within {timeout} s: {server.log()[-2000:]}")


def start_dropbear(root: Path, timeout: float = 10.0) -> Sshd:
    """Real dropbear (``-F -E``: foreground, log to stderr; ``-s``: keys only) on a free loopback port.

    Host key from ``dropbearkey``; ``known_hosts`` from ``ssh-keyscan`` of the running server, so host-key
    checking stays on exactly as a user would set it up for a board. See the module docstring for the
    mount namespace that gives the login user a home inside ``root``.
    """
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    host_key, user_key, wrong_key = root / "dropbear_ed25519_host_key", root / "id_user", root / "id_wrong"
    if not host_key.exists():
        subprocess.run(["dropbearkey", "-t", "ed25519", "-f", str(host_key)], check=True, capture_output=True)
    for key in (user_key, wrong_key):
        if not key.exists():
            _keygen(key)
    user = getpass.getuser()
    home = root / "home"
    (home / ".ssh").mkdir(parents=True, exist_ok=True)
    (home / ".ssh" / "authorized_keys").write_text((root / "id_user.pub").read_text())
    # dropbear refuses an authorized_keys that others could write, like sshd's StrictModes.
    for path, mode in ((home, 0o700), (home / ".ssh", 0o700), (home / ".ssh" / "authorized_keys", 0o600)):
        path.chmod(mode)
    remote_tmp = root / "remote_tmp"
    remote_tmp.mkdir(exist_ok=True)
    entry = pwd.getpwnam(user)
    moved = ":".join(
        [user, "x", str(entry.pw_uid), str(entry.pw_gid), entry.pw_gecos, str(home), entry.pw_shell or "/bin/sh"]
    )
    lines = [ln for ln in Path("/etc/passwd").read_text().splitlines() if not ln.startswith(f"{user}:")]
    (root / "passwd").write_text("\n".join([moved, *lines]) + "\n")
    port = _free_port()
    mounts = [f"mount --bind {shlex.quote(str(root / 'passwd'))} /etc/passwd"]
    mounts += [f"mount --bind /dev/null {p}" for p in DROPBEAR_SFTP_SERVERS if os.path.exists(p)]
    dropbear = [DROPBEAR, "-F", "-E", "-e", "-s", "-p", f"127.0.0.1:{port}", "-r", str(host_key)]
    dropbear += ["-P", str(root / "dropbear.pid")]
    script = " && ".join([*mounts, "exec " + shlex.join(dropbear)])
    log = open(root / "dropbear.log", "ab")
    # -e hands this environment to every session: that is how TMPDIR reaches them (sshd: SetEnv).
    env = {**os.environ, "TMPDIR": str(remote_tmp)}
    proc = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script], stdout=log, stderr=log, env=env
    )
    log.close()
    empty_known_hosts = root / "known_hosts_empty"
    empty_known_hosts.write_text("")
    known_hosts = root / "known_hosts"
    server = Sshd(
        root, port, user, user_key, wrong_key, known_hosts, empty_known_hosts, remote_tmp, proc, "dropbear.log"
    )
    _wait_listening(server, "dropbear", timeout)
    scan = subprocess.run(
        ["ssh-keyscan", "-t", "ed25519", "-p", str(port), "127.0.0.1"], capture_output=True, text=True, timeout=timeout
    )
    if not scan.stdout.strip():
        server.stop()
        raise RuntimeError(f"ssh-keyscan found no host key on port {port}: {scan.stderr.strip()}")
    known_hosts.write_text(scan.stdout)
    return server


if __name__ == "__main__":
    import sys

    start = start_dropbear if sys.argv[2:3] == ["dropbear"] else start_sshd
    srv = start(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/edgeprune-sshd"))
    print(
        f"ssh -i {srv.user_key} -p {srv.port} -o UserKnownHostsFile={srv.known_hosts} {srv.user}@127.0.0.1",
        flush=True,
    )
    try:
        srv.proc.wait()
    except KeyboardInterrupt:
        srv.stop()
