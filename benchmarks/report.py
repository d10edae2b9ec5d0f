"""RESULTS.md: read the rows and notes already there, merge a run's figures in, write it back.

The file is meant for people, so the table is plain Markdown; it is also read back, so
that figures can be measured in separate invocations (`--only`): the rows and notes of
a figure measured now replace that figure's old ones, and every other figure keeps its
rows and notes exactly as they were, each row with the date it was measured.

Layout::

    # annofs benchmark results
    (intro, then "## Last run": date, command, machine facts)
    ## Figures
    | figure | measure | annofs | baseline | ratio | target | result | measured |
    ## Notes
    ### <figure name>: <title>
    (provenance line, then what was measured and how)
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.registry import Row

COLUMNS = ("figure", "measure", "annofs", "baseline", "ratio", "target", "result", "measured")
_SPLIT = re.compile(r"(?<!\\)\|")
_NONE = "—"


@dataclass
class Results:
    """The content of a results file: table rows and per-figure notes (heading, body)."""

    rows: list[Row]
    notes: dict[str, tuple[str, str]]


# -- machine facts ---------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _meminfo_total() -> str:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            kib = int(line.split()[1])
            return f"{kib / (1 << 20):.1f} GiB"
    return "unknown"


def _cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _disk_of(path: str) -> str:
    """Device, filesystem type, size and whether it is rotational, for the mount of path."""
    target = os.path.realpath(path)
    best = ("", "", "")
    for line in _read("/proc/mounts").splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        device, mount, fstype = parts[0], parts[1], parts[2]
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best[1]):
            best = (device, mount, fstype)
    device, mount, fstype = best
    try:
        usage = shutil.disk_usage(path)
        size = f"{usage.total / 1e9:.0f} GB, {usage.free / 1e9:.0f} GB free"
    except OSError:
        size = "size unknown"
    rotational = _read(f"/sys/block/{os.path.basename(device)}/queue/rotational").strip()
    kind = {"0": "kernel reports non-rotational", "1": "kernel reports rotational"}.get(
        rotational, "rotation unknown")
    return f"{device} ({fstype}) mounted on {mount}, {size}, {kind}"


def machine_facts(disk_path: str = "/work") -> list[tuple[str, str]]:
    """Facts that matter when reading the numbers, as (label, value) pairs."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 0
    version = _read("/proc/version").strip() or platform.platform()
    return [
        ("nproc", f"{usable} ({_cpu_model()})"),
        ("memory", _meminfo_total()),
        ("python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("kernel", version),
        (f"disk of {disk_path}", _disk_of(disk_path)),
    ]


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as text, with the blocked tasks counted in it.

    Linux counts tasks in uninterruptible sleep (state D: waiting on disk, or on a FUSE
    mount that does not answer) in the load average although they use no CPU.
    """
    try:
        text = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"
    blocked = _blocked_tasks()
    return f"{text} ({blocked} in state D)" if blocked else text


def _blocked_tasks() -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _read(f"/proc/{entry}/stat")
        # The state follows the command name, which is in parentheses and may hold spaces.
        if stat[stat.rfind(")") + 2 : stat.rfind(")") + 3] == "D":
            count += 1
    return count


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process and its
    waited-for children): two snapshots give how much CPU other work took in between."""
    busy = 0.0
    first = _read("/proc/stat").splitlines()[:1]
    if first and first[0].startswith("cpu "):
        # user nice system idle iowait irq softirq steal ...: all but idle and iowait.
        ticks = [int(x) for x in first[0].split()[1:9]]
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    t = os.times()
    return busy, t.user + t.system + t.children_user + t.children_system


def other_cpu(before: tuple[float, float], after: tuple[float, float], seconds: float) -> float:
    """Average number of CPUs kept busy by other work (other processes, hypervisor steal)."""
    if seconds <= 0:
        return 0.0
    others = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, others / seconds)


# -- reading -----------------------------------------------------------------------------


def _cells(line: str) -> list[str]:
    inner = line.strip()
    inner = inner[1:] if inner.startswith("|") else inner
    inner = inner[:-1] if inner.endswith("|") and not inner.endswith("\\|") else inner
    return [cell.strip().replace("\\|", "|") for cell in _SPLIT.split(inner)]


def _escape(cell: str) -> str:
    return cell.replace("|", "\\|").replace("\n", " ")


def _row_from_cells(cells: list[str]) -> Row | None:
    if len(cells) != len(COLUMNS):
        return None
    figure, measure, value, baseline, ratio, target, status, date = cells
    try:
        parsed_ratio = None if ratio in (_NONE, "") else float(ratio)
    except ValueError:
        parsed_ratio = None
    return Row(measure, value, baseline, parsed_ratio, "" if target == _NONE else target,
               figure, status, date)


def _section(lines: Sequence[str], heading: str) -> list[str]:
    """The lines under a level-2 heading, up to the next level-2 heading."""
    out: list[str] = []
    inside = False
    for line in lines:
        if line.startswith("## "):
            inside = line[3:].strip() == heading
            continue
        if inside:
            out.append(line)
    return out


def parse(text: str) -> Results:
    """Rows and notes of a results file's text (unknown lines are ignored)."""
    lines = text.splitlines()
    rows = []
    for line in _section(lines, "Figures"):
        if not line.lstrip().startswith("|"):
            continue
        cells = _cells(line)
        if cells and (cells[0] == COLUMNS[0] or set(cells[0]) <= set("-: ")):
            continue  # header and separator
        row = _row_from_cells(cells)
        if row is not None:
            rows.append(row)
    notes: dict[str, tuple[str, str]] = {}
    name = heading = ""
    body: list[str] = []
    for line in [*_section(lines, "Notes"), "### "]:
        if line.startswith("### "):
            if name:
                notes[name] = (heading, "\n".join(body).strip("\n"))
            heading = line[4:].strip()
            name = heading.split(":", 1)[0].strip()
            body = []
        else:
            body.append(line)
    return Results(rows, notes)


def read(path: Path) -> Results:
    """The results already in `path`; empty if it does not exist."""
    if not path.exists():
        return Results([], {})
    return parse(path.read_text())


# -- merging and writing -------------------------------------------------------------------


def merge(old: Results, new: Results, order: Iterable[str]) -> Results:
    """Replace the rows and notes of every figure in `new`; keep the others from `old`.

    Rows are ordered by `order` (the registry), then figures unknown to it in the order
    the old file had them.
    """
    measured = {row.figure for row in new.rows} | set(new.notes)
    kept = [row for row in old.rows if row.figure not in measured]
    by_figure: dict[str, list[Row]] = {}
    for row in [*kept, *new.rows]:
        by_figure.setdefault(row.figure, []).append(row)
    names = [n for n in order if n in by_figure]
    names += [n for n in by_figure if n not in names]
    rows = [row for n in names for row in by_figure[n]]
    notes = {k: v for k, v in old.notes.items() if k not in measured}
    notes.update(new.notes)
    note_names = [n for n in names if n in notes] + [n for n in notes if n not in names]
    return Results(rows, {n: notes[n] for n in note_names})


def _ratio_text(ratio: float | None) -> str:
    if ratio is None:
        return _NONE
    return f"{ratio:.2f}" if ratio < 100 else f"{ratio:.0f}"


def render(results: Results, *, date: str, command: str,
           facts: Sequence[tuple[str, str]], load: str) -> str:
    """The whole file's text."""
    out = [
        "# annofs benchmark results",
        "",
        "Written by `python -m benchmarks` (see `benchmarks/__main__.py`). Each figure measures",
        "annofs and its baseline in the same run; the ratio is what SPEC.md §8 sets a target",
        "on. Rows of figures not measured by the last invocation are kept from earlier ones;",
        "the `measured` column and each figure's notes say when and with which command.",
        "",
        "## Last run",
        "",
        f"- date: {date}",
        f"- command: `{command}`",
        *(f"- {label}: {value}" for label, value in facts),
        f"- load average (1/5/15 min) at start: {load}",
        "",
        "## Figures",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for row in results.rows:
        cells = [row.figure, row.measure, row.value or _NONE, row.baseline or _NONE,
                 _ratio_text(row.ratio), row.target or _NONE, row.status, row.date]
        out.append("| " + " | ".join(_escape(c) for c in cells) + " |")
    out += ["", "## Notes", ""]
    for _name, (heading, body) in results.notes.items():
        out += [f"### {heading}", "", body.strip("\n"), ""]
    return "\n".join(out).rstrip("\n") + "\n"


def reflow(text: str, width: int = 96) -> str:
    """Re-wrap each blank-line-separated paragraph of `text` to `width` columns."""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text.strip())]
    return "\n\n".join(
        textwrap.fill(p, width, break_long_words=False, break_on_hyphens=False)
        for p in paragraphs if p
    )


def write(path: Path, text: str) -> None:
    """Replace `path` atomically (a crash leaves the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
