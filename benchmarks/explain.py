"""Figure `explain`: how long it takes to explain a refusal in a store of many signed files.

Issue 6: `annofs why` (and `user.annofs.why`) must find the signed original without
scanning the signed files: along the edit graph, through the fragment index, or through
a signed tree statement's names. Target: under 100 ms per explanation with 100k signed
files (the figure's ratio is the time over 100 ms, so the target is `<= 1.00`).

Measured in-process (what the mount's worker thread does), on one store holding a
100k-file tree signed in one statement, for each way an original is found and for a file
with none. Each case is timed cold (a new AnnotationStore: the big statement is parsed
and its signature checked, as in a fresh `annofs why` process) and warm (median of 5,
as in a running mount).
"""

from __future__ import annotations

import dataclasses
import io
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from annofs.content.ingest import ingest_stream
from annofs.errors import NotFoundError
from annofs.explain.report import explain
from annofs.namespace.tree import split_path
from annofs.transfer.import_tree import TreeImporter
from annofs.trust.annotations import AnnotationStore
from annofs.trust.keys import generate_key
from annofs.trust.policy import parse_policy
from annofs.trust.signing import collect_files, sign_files
from annofs.volume import Volume
from benchmarks.registry import Context, FigureResult, Row, figure
from benchmarks.trust import PER_DIR
from benchmarks.trust import _make_tree as make_c_tree

FILES, QUICK_FILES = 100_000, 2_000
TARGET_MS = 100.0


def _make_tree(root: Path, files: int) -> bytes:
    """The trust figure's small C files, and one 200 KB source (several fragments) at
    d0000/big.c."""
    make_c_tree(root, files)
    rng = random.Random(5)
    big = "".join(f"int g{i}(int x) {{ return x ^ {rng.getrandbits(32)}; }}\n"
                  for i in range(5000)).encode()
    (root / "d0000" / "big.c").write_bytes(big)
    return big


def _write(vol: Volume, path: str, data: bytes, *, fresh: bool) -> None:
    """A new version of `path` (edited in place), or new content with no edit-graph
    link to what was there (`fresh`; a new file if there was none)."""
    parts = split_path(path)
    got = ingest_stream(vol.store, vol.fragments, io.BytesIO(data), vol.params)
    with vol.store.write() as txn:
        vol.namespace.make_dirs(txn, parts[:-1], 0, 0)
        if fresh:
            try:
                vol.namespace.resolve(txn, parts)
            except NotFoundError:
                vol.namespace.copy(txn, split_path("/src/tree/d0000/f000000.c"), parts)
        dir_id = vol.namespace.writable_dir(txn, parts[:-1])
        old = vol.namespace.get(txn, dir_id, parts[-1])
        assert old is not None
        parent = 0 if fresh else int(old.target)
        v = vol.versions.create(txn, parent, got.hashes, got.lengths, got.digest)
        vol.namespace.set_attrs(txn, dir_id, parts[-1],
                                lambda a: dataclasses.replace(a, target=v.id, size=v.size))


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


@figure("explain", "time to explain a refusal (find the signed original, diff) in a big store")
def explain_figure(ctx: Context) -> FigureResult:
    """Explain refused files of four kinds in a store of many signed files."""
    files = QUICK_FILES if ctx.quick else FILES
    tree = ctx.work / "explain-tree"
    ctx.log(f"explain: making a {files}-file tree")
    big = _make_tree(tree, files)
    vol = Volume.open(ctx.work / "explain-store", create=True)
    try:
        ctx.log("explain: importing and signing")
        TreeImporter(vol).run(tree, split_path("/src/tree"))
        key = generate_key("bench-1")
        sign_files(vol, collect_files(vol, [split_path("/src/tree")]), key, "reviewed")
        policy = parse_policy(
            f'trusted-public-keys = ["{key.public_key().to_text()}"]\n'
            '[[rules]]\npath = "/**"\nsigners = 1\n', Path("policy.toml"))
        patched = big.replace(b"int g2500(", b"int evil(")
        mid = f"d{files // PER_DIR // 2:04d}"
        cases = {
            "edit graph (one-line patch in place)": "/src/tree/d0000/big.c",
            "shared fragments (patched copy imported fresh)": "/other/big-copy.c",
            "signed tree path (small file rewritten)": f"/imp/tree/{mid}/f{files // 2:06d}.c",
            "no original (new file)": f"/src/tree/{mid}/new.c",
        }
        _write(vol, cases["edit graph (one-line patch in place)"], patched, fresh=False)
        _write(vol, cases["shared fragments (patched copy imported fresh)"], patched,
               fresh=True)
        # A copy of one signed directory (as a fresh import of it would be), with one file
        # rewritten as new content (no edit-graph link, no shared fragment).
        with vol.store.write() as txn:
            vol.namespace.make_dirs(txn, split_path("/imp/tree"), 0, 0)
            vol.namespace.copy(txn, split_path(f"/src/tree/{mid}"), split_path("/imp/tree"))
        _write(vol, cases["signed tree path (small file rewritten)"], b"int rewritten;\n",
               fresh=True)
        _write(vol, cases["no original (new file)"], b"int brand_new;\n", fresh=True)
        rows = []
        for what, path in cases.items():
            parts = split_path(path)

            def run(ann: AnnotationStore, parts: list[bytes] = parts, what: str = what) -> None:
                with vol.store.read() as txn:
                    v = vol.versions.get(txn, int(vol.namespace.resolve(txn, parts).target))
                e = explain(vol, ann, policy, parts, v)
                assert not e.verdict.allowed, what
                if not what.startswith("no original"):
                    assert e.original is not None and e.original.how in what, (what, e.original)

            cold = _time(lambda: run(AnnotationStore(vol.store)))
            ann = AnnotationStore(vol.store)
            run(ann)
            warm = statistics.median(_time(lambda a=ann: run(a)) for _ in range(5))
            ctx.log(f"explain: {what}: cold {cold:.1f} ms, warm {warm:.1f} ms")
            rows.append(Row(f"explain, {what}, {files} signed files (warm)", f"{warm:.1f} ms",
                            f"{TARGET_MS:.0f} ms", warm / TARGET_MS, "<= 1.00"))
            rows.append(Row(f"explain, {what} (cold: statement parsed and verified)",
                            f"{cold:.1f} ms", "", None))
    finally:
        vol.close()
    notes = f"""\
What: {files} small C files ({PER_DIR} per directory) and one 200 KB C source imported to
/src/tree and signed in one statement; then four refused files: the big source patched
in place (found along the edit graph), the same patch written as a new file elsewhere
(found through the fragment index), a small file rewritten (no shared fragments; found
by its name in the tree statement over its siblings), and a new file (no original).
Timed: `annofs.explain.report.explain` (verdict, find the original, read both, diff),
warm = median of 5 with the parsed-statement cache filled (a running mount), cold = a
fresh AnnotationStore (the {files}-subject statement parsed and its signature verified
once, as in a new `annofs why` process). Ratio: warm time over {TARGET_MS:.0f} ms."""
    return FigureResult(rows, notes)
