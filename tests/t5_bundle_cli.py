"""`annofs bundle ...` as a team runs it: init with offline root keys, signatures
collected from k holders, publish, and a client updating over HTTP on loopback; a
revocation and a stale (frozen) bundle as `verify` and `why` report them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from bundle_helpers import tree_bytes
from cache_server import serve_cache
from t5_cli import ok
from t5_trust_cli import Env, clone_env, fail, template  # noqa: F401  (fixture)


def publish(env: Env, *extra: str) -> str:
    """Publish; the root pin it prints."""
    out = ok(env.run("bundle", "publish", "--repo", "repo", *extra)).decode()
    line = out.strip().splitlines()[-1]
    assert line.startswith('trust-bundle-root = "sha256:'), out
    return line.split('"')[1]


def make_repo(env: Env, timestamp: str = "1h") -> str:
    keys = [env.key(f"root-{i}")[1] for i in range(3)]
    env.key("alice-1")
    ok(env.run("bundle", "init", "repo", "--threshold", "2", "--expires",
               f"timestamp={timestamp}", *[a for k in keys for a in ("--root-key", str(k))]))
    ok(env.run("bundle", "add-key", "alice-1", "keys/alice-1.public", "--repo", "repo"))
    ok(env.run("bundle", "sign", "root", "--key", "keys/root-0.secret", "--repo", "repo"))
    # One of two: refused, nothing published.
    msg = fail(env.run("bundle", "publish", "--repo", "repo"))
    assert msg == "root v1: 1 of 2 signatures needed (annofs bundle sign root --key FILE)"
    assert not (env.tmp / "repo" / "metadata" / "1.root.json").exists()
    out = ok(env.run("bundle", "sign", "root", "--key", "keys/root-2.secret", "--repo",
                     "repo")).decode()
    assert "2 of 2 signatures" in out
    for k in ("root-0", "root-1"):
        ok(env.run("bundle", "sign", "targets", "--key", f"keys/{k}.secret", "--repo", "repo"))
    return publish(env)


def write_policy(env: Env, source: str, pin: str, extra: str = "",
                 name: str = "policy.toml") -> Path:
    return env.policy(f'trust-bundle = "{source}"\ntrust-bundle-root = "{pin}"\n{extra}\n'
                      '[[rules]]\npath = "/src/**"\nsigners = 1\n', name)


def verify(env: Env, policy: Path) -> tuple[int, list[dict[str, object]]]:
    proc = env.run("verify", "--json", "--policy", str(policy), "/src/proj")
    return proc.returncode, [json.loads(line) for line in proc.stdout.decode().splitlines()]


def test_publish_update_revoke_over_http(template: Path, tmp_path: Path) -> None:  # noqa: F811
    env = clone_env(template, tmp_path / "e")
    pin = make_repo(env)
    ok(env.run("sign", "--key", "keys/alice-1.secret", "/src/proj"))
    with serve_cache(env.tmp / "repo") as url:
        policy = write_policy(env, url, pin)
        status, lines = verify(env, policy)
        assert status == 1 and "never been fetched" in str(lines[0]["reason"])
        out = ok(env.run("bundle", "update", "--policy", "policy.toml")).decode()
        assert out.startswith("new bundle: root v1, targets v1")
        assert verify(env, policy)[0] == 0
        out = ok(env.run("bundle", "status", "--policy", "policy.toml")).decode()
        assert "root v1 (2 of 3 keys)" in out and "1 keys, 0 revocations" in out

        ok(env.run("bundle", "revoke", "alice-1", "--reason", "laptop stolen", "--repo",
                   "repo"))
        for k in ("root-1", "root-2"):
            ok(env.run("bundle", "sign", "targets", "--key", f"keys/{k}.secret", "--repo",
                       "repo"))
        publish(env)
        assert verify(env, policy)[0] == 0  # not fetched yet
        out = ok(env.run("bundle", "update", "--policy", "policy.toml")).decode()
        assert "key revoked: alice-1" in out and "laptop stolen" in out
        status, lines = verify(env, policy)
        assert status == 1 and "alice-1: key revoked" in str(lines[0]["reason"])
        why = env.run("why", "--policy", str(policy), "/src/proj/a.c")
        assert why.returncode == 1 and b"key revoked" in why.stdout


def test_a_frozen_bundle_is_stale_refuse_or_warn(template: Path, tmp_path: Path) -> None:  # noqa: F811
    env = clone_env(template, tmp_path / "e")
    pin = make_repo(env)
    ok(env.run("sign", "--key", "keys/alice-1.secret", "/src/proj"))
    refuse = write_policy(env, "repo", pin)
    warn = write_policy(env, "repo", pin, 'on-stale = "warn"', "warn.toml")
    start = time.time()
    publish(env, "--expires", "timestamp=5s")  # a short-lived timestamp
    ok(env.run("bundle", "update", "--policy", "policy.toml"))
    # Past the timestamp's expiry; the repository is not republished (a freeze).
    time.sleep(max(0.0, start + 5.1 - time.time()))
    state = tree_bytes(env.store / "bundle")
    msg = fail(env.run("bundle", "update", "--policy", "policy.toml"), status=1)
    assert "update refused, the trusted state is kept: expired" in msg
    assert tree_bytes(env.store / "bundle") == state
    status, lines = verify(env, refuse)
    assert status == 1
    reason = str(lines[0]["reason"])
    assert "is stale: its timestamp expired at" in reason and "on-stale refuse" in reason
    why = env.run("why", "--policy", str(refuse), "/src/proj/a.c")
    assert why.returncode == 1 and b"is stale" in why.stdout
    # Signed content: no original to look for; what would lift it is a fresh bundle.
    assert b"no signed original" not in why.stdout
    assert b"would lift it: a successful annofs bundle update" in why.stdout
    status, lines = verify(env, warn)
    assert status == 0 and lines[0]["status"] == "warn"
    assert "on-stale warn" in str(lines[0]["reason"])


@pytest.mark.parametrize(("args", "message"), [
    (("bundle", "update"), "give --policy FILE"),
    (("bundle", "update", "repo"), "--root sha256:<hex> is needed with a SOURCE"),
    (("bundle", "add-key", "x", "nope", "--repo", "nowhere"), "not a trust bundle repository"),
    (("bundle", "publish", "--repo", "repo", "--expires", "snapshot=1y"),
     "an expiry period is a number"),
])
def test_errors_are_one_line(template: Path, tmp_path: Path, args: tuple[str, ...],  # noqa: F811
                             message: str) -> None:
    env = clone_env(template, tmp_path / "e")
    env.key("root-0")
    ok(env.run("bundle", "init", "repo", "--threshold", "1", "--root-key",
               "keys/root-0.public"))
    assert message in fail(env.run(*args))
