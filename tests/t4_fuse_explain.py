"""Explanations on a real mount: `annofs why` and `user.annofs.why` for a refused file show
its signed original and the difference (a patched C line; changed bytes of an ELF)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mount, Templates, annofs_cmd, serve
from t4_fuse_trust import refused, sign_tree

MAIN_C = """#include <stdio.h>

int main(void) {
    puts("hello");
    return 0;
}
"""

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")


def _make_signed(root: Path) -> None:
    """What `signed` starts from: /src/proj (root/proj: main.c and the ELF `hello` built
    from it) signed (`sign_tree`)."""
    tree = root / "proj"
    tree.mkdir()
    (tree / "main.c").write_text(MAIN_C)
    # A table makes the ELF ~200 KB: several fragments, as real binaries have.
    values = ", ".join(str((i * 2654435761) % 2**32) for i in range(50_000))
    (tree / "table.c").write_text(f"const unsigned int table[] = {{{values}}};\n")
    subprocess.run(["cc", "-O0", "-o", str(tree / "hello"), str(tree / "main.c"),
                    str(tree / "table.c")], check=True)
    assert (tree / "hello").read_bytes()[:4] == b"\x7fELF"
    sign_tree(root, tree)


@pytest.fixture
def signed(tmp_path: Path, templates: Templates,
           request: pytest.FixtureRequest) -> Iterator[Mount]:
    """/src/proj (main.c and the ELF `hello` built from it) imported, signed by alice-1;
    mounted with an enforcing policy."""
    templates.copy("t4_fuse_explain.signed", tmp_path, _make_signed)
    (tmp_path / "mnt").mkdir()
    yield from serve(Mount(tmp_path / "store", tmp_path / "mnt"), request,
                     "--policy", str(tmp_path / "policy.toml"))


def why(m: Mount, *args: str) -> subprocess.CompletedProcess[str]:
    policy = m.store.parent / "policy.toml"
    return subprocess.run(annofs_cmd("why", "--policy", str(policy), *args),
                          capture_output=True, text=True)


def test_one_line_patch_to_a_signed_c_file(signed: Mount) -> None:
    f = signed.path / "src" / "proj" / "main.c"
    f.write_text(MAIN_C.replace("return 0;", "return system(\"id\");"))
    assert refused(f)
    xattr = os.getxattr(f, "user.annofs.why").decode()
    res = why(signed, str(f))
    assert res.returncode == 1, res.stderr
    for text in (xattr, res.stdout):
        assert "/src/proj/main.c: refused" in text
        assert "found by edit graph, 1 edit back" in text
        assert "signed by alice-1 (trusted), claim reviewed" in text
        assert "as proj/main.c" in text
        assert "-    return 0;\n" in text
        assert '+    return system("id");\n' in text
        assert text.count("\n-    ") == 1 and text.count("\n+    ") == 1  # that line only
    j = json.loads(why(signed, "--json", str(f)).stdout)
    assert j["status"] == "refused" and j["original"]["found_by"] == "edit graph"
    assert j["original"]["statements"][0]["names"] == ["proj/main.c"]
    # The signed sibling: allowed, nothing to search.
    ok = why(signed, str(signed.path / "src" / "proj" / "hello"))
    assert ok.returncode == 0 and ": allowed" in ok.stdout


def test_a_refusal_is_explained_in_the_events_log_and_the_daemon_log(signed: Mount) -> None:
    f = signed.path / "src" / "proj" / "main.c"
    f.write_text(MAIN_C.replace("return 0;", "return 1;"))
    assert refused(f)
    # Recorded before open() failed: no waiting for the daemon.
    out = subprocess.run(annofs_cmd("--store", str(signed.store), "events", "--json"),
                         capture_output=True, text=True, check=True).stdout
    [event] = [json.loads(line) for line in out.splitlines()]
    assert event["verdict"] == "refused" and event["path"] == "/src/proj/main.c"
    assert "-    return 0;\n" in event["explanation"]
    assert "+    return 1;\n" in event["explanation"]
    assert event["details"]["original"]["found_by"] == "edit graph"
    assert event["details"]["diff_kind"] == "text"
    log = (signed.store / "daemon.log").read_text()
    [line] = [ln for ln in log.splitlines() if "/src/proj/main.c" in ln and "refused" in ln]
    assert "found by edit graph" in line and "signed by alice-1" in line
    assert "text diff -1 +1 lines" in line
    shown = subprocess.run(annofs_cmd("--store", str(signed.store), "events", "--why"),
                           capture_output=True, text=True, check=True).stdout
    assert "refused" in shown.splitlines()[0] and "\n    +    return 1;\n" in shown


def test_changed_bytes_of_an_elf(signed: Mount) -> None:
    f = signed.path / "src" / "proj" / "hello"
    data = bytearray(f.read_bytes())
    offsets = (0x200, 0x201, 0x400)
    with open(f, "r+b") as out:
        for off in offsets:
            out.seek(off)
            out.write(bytes([data[off] ^ 0xFF]))
    assert refused(f)
    xattr = os.getxattr(f, "user.annofs.why").decode()
    res = why(signed, str(f))
    assert res.returncode == 1, res.stderr
    for text in (xattr, res.stdout):
        assert "difference (original -> this file): binary" in text
        assert "2 changed range(s), 3 bytes changed, 0 inserted, 0 deleted" in text
        assert "@@ original/proj/hello [0x200, 0x202) -> src/proj/hello [0x200, 0x202) @@" \
            in text
        assert "@@ original/proj/hello [0x400, 0x401)" in text
    j = json.loads(why(signed, "--json", str(f)).stdout)
    assert j["ranges"] == [[0x200, 0x202, 0x200, 0x202], [0x400, 0x401, 0x400, 0x401]]
    assert j["summary"]["ranges"] == 2


def test_a_patched_copy_written_fresh_under_another_name(signed: Mount,
                                                          tmp_path: Path) -> None:
    data = bytearray((tmp_path / "proj" / "hello").read_bytes())
    assert len(data) > 150_000
    data[0x300] ^= 0xFF
    (tmp_path / "renamed-bin").write_bytes(bytes(data))
    f = signed.path / "src" / "other" / "renamed-bin"
    f.parent.mkdir()
    shutil.copyfile(tmp_path / "renamed-bin", f)  # a new file: no edit-graph link
    assert refused(f)
    text = os.getxattr(f, "user.annofs.why").decode()
    assert "found by shared fragments" in text
    assert "as proj/hello" in text
    assert "1 changed range(s), 1 bytes changed, 0 inserted, 0 deleted" in text
    assert "@@ original/proj/hello [0x300, 0x301)" in text


def test_a_file_with_no_original_says_so(signed: Mount) -> None:
    f = signed.path / "src" / "new.c"
    f.write_text("int fresh;\n")
    assert refused(f)
    res = why(signed, str(f))
    assert res.returncode == 1
    assert "no signed original" in res.stdout
    assert "would satisfy rules[0] /src/**: statements over this content by 1 distinct " \
        "signer from any trusted key (alice-1), any claim" in res.stdout
    assert "no signed original" in os.getxattr(f, "user.annofs.why").decode()


def test_sed_i_on_a_lone_signed_file_through_the_mount(signed: Mount, tmp_path: Path) -> None:
    """A lone signed file (no signed sibling), rewritten by `sed -i` in the mount (a new
    file renamed over it): the original is found by the statement's subject name, and
    `annofs why MNT/...` judges by the mount's policy (no --policy)."""
    d = signed.path / "src" / "etc"
    d.mkdir()
    f = d / "app.conf"
    f.write_text("listen = 127.0.0.1\nport = 80\n")
    keys = tmp_path / "keys"
    res = subprocess.run(annofs_cmd("sign", "--key", str(keys / "alice-1.secret"), str(f)),
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert f.read_text().startswith("listen")  # signed through the daemon: opens at once
    subprocess.run(["sed", "-i", "s/port = 80/port = 8080/", str(f)], check=True)
    assert refused(f)
    env = {k: v for k, v in os.environ.items() if k != "ANNOFS_POLICY"}
    res = subprocess.run(annofs_cmd("why", str(f)), capture_output=True, text=True, env=env)
    assert res.returncode == 1, res.stderr
    assert "/src/etc/app.conf: refused" in res.stdout
    assert "no signed original" not in res.stdout
    assert "found by signed tree path" in res.stdout and "as app.conf" in res.stdout
    assert "-port = 80\n" in res.stdout and "+port = 8080\n" in res.stdout
