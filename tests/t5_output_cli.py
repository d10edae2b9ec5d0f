"""What commands print for people and for scripts: --json schemas (as the README lists
them), verify's summary line, log's header, and messages that say what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

from t5_cli import BASE_NS, annofs, ok, write
from t5_trust_cli import ONE, Env, fail, make_env


def env_with_keys(tmp: Path) -> tuple[Env, Path]:
    e = make_env(tmp / "e")
    secret, _ = e.key("alice-1")
    return e, secret


def test_json_schemas(tmp_path: Path) -> None:
    e, secret = env_with_keys(tmp_path)
    policy = e.policy(ONE)
    write(e.src / "a.c", b"int a = 1;\n", BASE_NS + 10**9)
    imp = json.loads(ok(e.run("import", "--json", str(e.src), "/src/proj")))
    assert set(imp) == {"src", "dest", "files", "files_read", "files_unchanged", "dirs",
                        "symlinks", "hard_links", "removed", "bytes_read", "new_bytes",
                        "seconds"}
    assert (imp["files"], imp["files_read"], imp["files_unchanged"]) == (3, 1, 2)
    ok(e.run("sign", "--key", str(secret), "/src/proj/a.c"))

    log = [json.loads(line) for line in ok(e.run("log", "--json", "/src/proj/a.c")).splitlines()]
    assert [v["size"] for v in log] == [11, 7, 0]
    assert log[0]["parent"] == log[1]["version"] and log[-1]["edit"] is None
    assert log[0]["statements"][0]["signer"] == "alice-1"
    assert log[0]["statements"][0]["claim"] == "reviewed" and log[1]["statements"] == []
    text = ok(e.run("log", "/src/proj/a.c")).decode().splitlines()
    assert text[0].split()[:2] == ["VERSION", "TIME"] and len(text) == 4
    assert "signed: alice-1 [key " in text[1] and "(reviewed)" in text[1]

    proc = e.run("verify", "--json", "--policy", str(policy), "/src/proj")
    assert proc.returncode == 1
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["path"], r["status"]) for r in rows] == [
        ("/src/proj/a.c", "allowed"), ("/src/proj/b.c", "refused"),
        ("/src/proj/sub/c.c", "refused")]
    assert rows[0]["signers"] == ["alice-1"] and rows[1]["needed"] == 1
    proc = e.run("verify", "--policy", str(policy), "/src/proj")
    assert proc.stdout.decode().splitlines()[-1] == "verified 3 files: 1 allowed, 2 refused"

    gc = json.loads(ok(e.run("gc", "--json")))
    assert set(gc) == {"versions_freed", "fragments_freed", "bytes_freed", "staging_dropped",
                       "versions_kept", "packs_compacted"}
    fsck = json.loads(ok(e.run("fsck", "--json")))
    assert fsck["ok"] and fsck["problems"] == [] and fsck["reclaimable"]["bytes"] == 0


def test_messages_say_what_is_wrong(tmp_path: Path) -> None:
    e, _ = env_with_keys(tmp_path)
    assert fail(e.run("cat", "/src/proj/a.c@abc")) == (
        "/src/proj/a.c@abc: version 'abc' is not a number (PATH@VERSION takes a version id "
        "from annofs log)")
    assert fail(e.run("cat", "/src/proj/nothing@abc")) == \
        "/src/proj/nothing@abc: no such file or directory"
    assert fail(e.run("key", "generate", "bad name")) == \
        "key generate: key name 'bad name' may not contain ':', spaces or control characters"
    empty = e.policy("", "empty.toml")
    proc = e.run("policy", "check", str(empty))
    assert proc.returncode == 0
    assert proc.stderr.decode().splitlines() == [
        f"annofs: warning: {empty}: no rules: every path gets default = 'allow'",
        f"annofs: warning: {empty}: no trusted keys (trusted-public-keys, trusted-keys-dir): "
        f"no signature counts"]
    proc = e.run("policy", "check", str(e.policy(ONE)))
    assert proc.returncode == 0 and proc.stderr == b""


def test_dashboard_takes_the_same_allow_remote_option_as_mount(tmp_path: Path) -> None:
    for args in (["mount", "--help"], ["dashboard", "--help"]):
        assert b"--dashboard-allow-remote" in ok(annofs(None, *args, cwd=tmp_path))


def test_import_progress_has_a_total_and_a_percentage(tmp_path: Path) -> None:
    store = tmp_path / "store"
    ok(annofs(store, "init", cwd=tmp_path))
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}").write_bytes(bytes([i]) * 50_000)
    proc = annofs(store, "import", "--progress", str(src), "/s", cwd=tmp_path)
    ok(proc)
    frames = proc.stderr.decode().replace("\r", "\n").splitlines()
    done = [f for f in frames if "100%" in f]
    assert done and "977k/977k" in done[-1] and "20 files" in done[-1], frames
