"""A file name may hold any byte but '/' and NUL: a newline or an escape sequence in one
must not forge a line (or colour a terminal) wherever the name is printed (issue 15.6):
`annofs events`, the daemon log, explanations and `annofs why`, error lines. One
function does it: annofs.printable.one_line."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from conftest import annofs_cmd
from t2_trust import ALICE, policy, sign, write

from annofs.daemon.events import Event, EventLog, format_event
from annofs.daemon.mount import OneLineFormatter
from annofs.explain.diff import text_diff
from annofs.explain.report import explain, summary_line
from annofs.printable import one_line
from annofs.transfer.import_tree import TreeImporter
from annofs.trust.annotations import AnnotationStore
from annofs.volume import Volume

FORGED = "x\n2026-12-06 10:00:00 refused  pid 1       innocent.c: forged"  # no "/"
EVIL_NAME = FORGED.encode() + b"\x1b[2J\r\x7f\xff"


def test_one_line_escapes_every_control_character() -> None:
    assert one_line("plain /src/a.c: ok") == "plain /src/a.c: ok"
    shown = one_line("a\nb\rc\td\x1be\x7ff\x85g\u2028h\udcffi")
    assert shown == "a\\nb\\rc\\td\\x1be\\x7ff\\x85g\\u2028h\\udcffi"
    assert shown.isprintable()


def test_events_print_a_name_with_a_newline_on_one_line(tmp_path: Path) -> None:
    store = tmp_path / "store"
    subprocess.run(annofs_cmd("--store", str(store), "init"), check=True,
                   capture_output=True)
    name = "/src/" + EVIL_NAME.decode("utf-8", "surrogateescape")
    EventLog(store).record(Event(name, "refused", "needs 1 signer, has 0",
                                 rule="rules[0] /src/**"))
    line = format_event(Event(name, "refused", "r\nforged", rule="x\ny"))
    assert "\n" not in line and "\x1b" not in line and "\r" not in line
    assert "\\n2026-12-06" in line
    out = subprocess.run(annofs_cmd("--store", str(store), "events"), capture_output=True,
                         check=True).stdout
    assert out.count(b"\n") == 1 and b"\x1b" not in out and b"\\n2026-12-06" in out


def test_the_daemon_log_keeps_each_record_on_one_line() -> None:
    fmt = OneLineFormatter("%(levelname)s %(message)s")
    rec = logging.LogRecord("annofs.fs", logging.INFO, __file__, 1,
                            "refused: %s (pid %d)", ("/src/a\nERROR forged", 7), None)
    assert fmt.format(rec) == "INFO refused: /src/a\\nERROR forged (pid 7)"
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("annofs", logging.ERROR, __file__, 1, "failed\n%s", ("x",),
                                sys.exc_info())
    text = fmt.format(rec)
    assert text.startswith("ERROR failed\\nx\nTraceback")  # a traceback stays readable


def test_explanations_escape_names(vol: Volume, tmp_path: Path) -> None:
    host = tmp_path / "host"
    host.mkdir()
    (host / EVIL_NAME.decode("utf-8", "surrogateescape")).write_bytes(b"int a;\n" * 100)
    TreeImporter(vol).run(host, [b"src"])
    path = [b"src", EVIL_NAME]
    sign(vol, ALICE, "/src")
    write(vol, path, b"int a;\n" * 99 + b"int b;\n")
    pol = policy('[[rules]]\npath = "/src/**"\nsigners = 1\n', ALICE)
    with vol.store.read() as txn:
        v = vol.versions.get(txn, int(vol.namespace.resolve(txn, path).target))
    e = explain(vol, AnnotationStore(vol.store), pol, path, v)
    assert e.original is not None
    text = e.to_text()
    assert "\x1b" not in text and "\r" not in text
    assert not any(line.startswith("2026-12-06") for line in text.splitlines())
    assert "/src/x\\n2026-12-06" in text.splitlines()[0]
    line = summary_line(e)
    assert "\n" not in line and "\x1b" not in line


def test_a_text_diff_shows_control_characters_instead_of_sending_them() -> None:
    a = b"int a;\n\tint tab;\n"
    b = b"int a;\n\tint tab;\n\x1b]52;c;ZWNobyBldmls\x07 /* \x1b[2J */\n"
    d = text_diff(a, b, "original/a.c", "src/a.c")
    assert "\x1b" not in d and "\x07" not in d
    assert "+\\x1b]52;c;ZWNobyBldmls\\x07 /* \\x1b[2J */\n" in d
    assert " \tint tab;\n" in d  # tabs stay
