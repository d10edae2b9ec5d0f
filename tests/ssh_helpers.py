"""SSH keys, an ssh-agent and FIDO statements for the SSH trust tests: keys are made by
the real ssh-keygen, the agent is the real ssh-agent (started on a socket of the test's
own), and FIDO signatures come from t1_trust_sshsig's SoftToken (checked there by the
real ssh-keygen)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from t1_trust_sshsig import SoftToken

from annofs.trust.sshsig import FLAG_USER_PRESENT
from annofs.trust.statement import (
    PAYLOAD_TYPE,
    SignedStatement,
    Subject,
    make_ssh_statement,
    pae,
    ssh_signed,
)


def make_key(directory: Path, name: str, comment: str | None = None) -> Path:
    """A new ssh-ed25519 key pair without passphrase: NAME and NAME.pub."""
    key = directory / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment or name,
                    "-f", str(key)], check=True)
    return key


def public_line(key: Path) -> str:
    """`TYPE BASE64` of a key pair's .pub."""
    return " ".join(Path(f"{key}.pub").read_text().split()[:2])


@contextmanager
def ssh_agent(directory: Path, *keys: Path) -> Iterator[str]:
    """A real ssh-agent on a socket in `directory`, holding `keys`; yields the socket.
    SSH_AUTH_SOCK points at it meanwhile; the agent is stopped by its pid after."""
    sock = directory / "agent.sock"
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    old = os.environ.get("SSH_AUTH_SOCK")
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline, "ssh-agent did not start"
            time.sleep(0.02)
        os.environ["SSH_AUTH_SOCK"] = str(sock)
        for key in keys:
            subprocess.run(["ssh-add", "-q", str(key)], check=True, capture_output=True)
        yield str(sock)
    finally:
        if old is None:
            os.environ.pop("SSH_AUTH_SOCK", None)
        else:
            os.environ["SSH_AUTH_SOCK"] = old
        proc.terminate()
        proc.wait(10)


def token_statement(token: SoftToken, subjects: list[Subject], *, claim: str = "reviewed",
                    flags: int = FLAG_USER_PRESENT, when: int | None = None,
                    name: str = "yubikey") -> SignedStatement:
    """A statement signed by a software FIDO token with the given flags."""
    st = make_ssh_statement(subjects, claim, token.public, name, when=when)
    return ssh_signed(st, token.sshsig(pae(PAYLOAD_TYPE.encode(), st.payload()), flags=flags))
