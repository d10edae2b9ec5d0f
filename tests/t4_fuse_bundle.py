"""A mount whose policy names a trust bundle served over HTTP on loopback: the daemon
fetches it at start, `annofs policy reload` applies a published revocation at once, and a
bundle frozen past its timestamp's expiry turns stale on the timer and refuses."""

from __future__ import annotations

import hashlib
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cache_server import serve_cache
from conftest import Mount, annofs_cmd

from annofs.daemon.events import read_events
from annofs.trust.bundle_content import Revocation
from annofs.trust.bundle_repo import Repository, init_repository
from annofs.trust.keys import generate_key, load_public_key

ROOTS = [generate_key(f"root-{i}") for i in range(2)]


def annofs(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(annofs_cmd("--store", str(store), *args), capture_output=True,
                          text=True, check=True)


def readable(path: Path) -> bool:
    try:
        path.read_bytes()
    except PermissionError:
        return False
    return True


def wait_for(what: Callable[[], bool], seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def setup(mounted: Mount, tmp_path: Path, timestamp: int) -> tuple[Repository, str, Path]:
    """/src/proj signed by alice-1, whom only the bundle trusts; the repository; the pin."""
    mounted.stop()
    tree = tmp_path / "proj"
    tree.mkdir()
    (tree / "main.c").write_text("int main(void) { return 0; }\n")
    keys = tmp_path / "keys"
    keys.mkdir()
    annofs(mounted.store, "import", str(tree), "/src/proj")
    annofs(mounted.store, "key", "generate", "alice-1", "--dir", str(keys))
    annofs(mounted.store, "sign", "--key", str(keys / "alice-1.secret"), "/src/proj")
    repo = init_repository(tmp_path / "repo", [k.public_key() for k in ROOTS], 2,
                           expires={"timestamp": timestamp})
    for k in ROOTS:
        repo.sign("root", k)
    content = repo.content()
    content.keys.append(load_public_key(keys / "alice-1.public"))
    repo.set_content(content)
    for k in ROOTS:
        repo.sign("targets", k)
    repo.publish()
    pin = hashlib.sha256((repo.dir / "metadata" / "1.root.json").read_bytes()).hexdigest()
    return repo, pin, mounted.path / "src" / "proj" / "main.c"


def policy(tmp_path: Path, url: str, pin: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(f'trust-bundle = "{url}"\ntrust-bundle-root = "sha256:{pin}"\n'
                    '[[rules]]\npath = "/src/**"\nsigners = 1\n')
    return path


def test_a_published_revocation_applies_on_reload(mounted: Mount, tmp_path: Path) -> None:
    repo, pin, main = setup(mounted, tmp_path, 3600)
    with serve_cache(repo.dir) as url:
        mounted.start("--policy", str(policy(tmp_path, url, pin)))
        wait_for(lambda: readable(main))  # fetched at start, in a worker thread
        content = repo.content()
        content.revocations.append(Revocation(content.keys[0], "laptop stolen"))
        repo.set_content(content)
        for k in ROOTS:
            repo.sign("targets", k)
        repo.publish()
        assert readable(main)  # published, not yet fetched (the timer is 5 minutes)
        subprocess.run(annofs_cmd("policy", "reload", str(mounted.path)), check=True,
                       capture_output=True)
        assert not readable(main)
    last = read_events(mounted.store)[-1]
    assert last.verdict == "refused" and "alice-1: key revoked" in last.reason


@pytest.mark.expected_log("trust bundle update failed", "is stale: its timestamp expired")
def test_a_frozen_bundle_turns_stale_on_the_timer(mounted: Mount, tmp_path: Path) -> None:
    # The refresh timer is 5 minutes: the daemon also watches the loaded bundle's expiry.
    repo, pin, main = setup(mounted, tmp_path, 3600)
    with serve_cache(repo.dir) as url:
        mounted.start("--policy", str(policy(tmp_path, url, pin)))
        wait_for(lambda: readable(main))
        repo.publish({"timestamp": 5})  # a short-lived timestamp, then nobody republishes
        subprocess.run(annofs_cmd("policy", "reload", str(mounted.path)), check=True,
                       capture_output=True)
        assert readable(main)
        # It expires, updates fail (the same timestamp again), the bundle is stale.
        wait_for(lambda: not readable(main))
        # The next refresh's refusal (the expired timestamp served again) is recorded.
        wait_for(lambda: any(e.verdict == "bundle-refused"
                             for e in read_events(mounted.store)))
    events = read_events(mounted.store)
    assert "bundle-stale" in [e.verdict for e in events]
    assert "expired" in next(e for e in events if e.verdict == "bundle-refused").reason
    refusal = [e for e in events if e.verdict == "refused"][-1]
    assert "is stale" in refusal.reason and "on-stale refuse" in refusal.reason
