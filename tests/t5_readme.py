"""The README's "Using it" blocks, run as written, mounted for real.

The shell blocks of that section, up to the first with a placeholder (`<hash>`), are
taken from README.md and run as one bash session, each command on its own, with only
these substitutions: `~` is a temporary home (HOME), `/tmp/` and `/mnt/annofs` are
temporary directories, and `.venv` is this interpreter's environment. A command whose
comment starts `exit N` must end with status N, every other with 0.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
PLACEHOLDER = re.compile(r"<[a-z]+>")
EXPECTED = re.compile(r"#\s*exit (\d+)\b")
_LOG_PROBLEM = re.compile(r"^\S+ \S+ \d+ (WARNING|ERROR|CRITICAL) ")


def using_it_blocks(text: str) -> list[str]:
    """The ```sh blocks of "## Using it", up to the first holding a placeholder."""
    section = text.split("\n## Using it\n", 1)[1].split("\n## ", 1)[0]
    blocks = []
    for block in re.findall(r"```sh\n(.*?)```", section, flags=re.S):
        if PLACEHOLDER.search(block):
            break
        blocks.append(block)
    return blocks


def commands(block: str) -> list[str]:
    """Logical commands: one per line, a here-document joined to its command."""
    out: list[str] = []
    lines = block.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = re.search(r"<<'?(\w+)'?", line)
        if m:
            body = [line]
            while i < len(lines):
                body.append(lines[i])
                i += 1
                if body[-1] == m.group(1):
                    break
            out.append("\n".join(body))
        else:
            out.append(line)
    return out


def test_readme_using_it_runs_as_written(tmp_path: Path) -> None:
    blocks = using_it_blocks(README.read_text())
    assert len(blocks) >= 2, "the README's Using it section lost its runnable blocks"
    cmds = [c for b in blocks for c in commands(b)]
    assert any(c.startswith("annofs mount") for c in cmds)

    home, work, tmp, mnt = (tmp_path / n for n in ("home", "work", "tmp", "mnt"))
    for d in (home, work, tmp):
        d.mkdir()
    project = home / "src" / "project"
    project.mkdir(parents=True)
    (project / "main.c").write_text("int main(void) { return 0; }\n")
    (project / "util.c").write_text("int util(void) { return 1; }\n")
    (project / "evil.c").write_text("int evil(void) { return system(\"id\"); }\n")
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    script = ["set -u"]
    expected = []
    for n, cmd in enumerate(cmds):
        # /tmp/ first: the clone itself (sys.prefix) may be under /tmp.
        real = (cmd.replace("/tmp/", f"{tmp}/").replace("/mnt/annofs", str(mnt))
                .replace(". .venv/bin/activate", f". {sys.prefix}/bin/activate"))
        m = EXPECTED.search(cmd.splitlines()[0])
        expected.append(int(m.group(1)) if m else 0)
        # Braces, not a subshell: `export` and `v=$(...)` must reach later commands.
        script.append(f"{{ {real}\n}} > {out_dir}/{n}.out 2> {out_dir}/{n}.err")
        script.append(f"echo $? > {out_dir}/{n}.status")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANNOFS_")}
    env["HOME"] = str(home)
    env.pop("XDG_DATA_HOME", None)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    try:
        subprocess.run(["bash", "-c", "\n".join(script)], cwd=work, env=env, timeout=600,
                       check=False)
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)

    def result(i: int) -> tuple[int, str, str]:
        status = (out_dir / f"{i}.status").read_text().strip()
        return (int(status), (out_dir / f"{i}.out").read_text(errors="replace"),
                (out_dir / f"{i}.err").read_text(errors="replace"))

    for i, cmd in enumerate(cmds):
        status, out, err = result(i)
        assert status == expected[i], f"README: {cmd}\nexit {status}\n{out}{err}"

    def find(prefix: str, nth: int = 0) -> tuple[int, str, str]:
        hits = [i for i, c in enumerate(cmds) if c.startswith(prefix)]
        return result(hits[nth])

    # What the comments promise.
    diff = find("annofs diff")[1]
    assert diff.count("\n+/* changed */") == 1 and "\n-" not in diff
    assert find("ls /mnt/annofs/src/try")[1].split() == ["evil.c", "main.c", "util.c"]
    assert "evil.c: refused" in find("annofs verify --policy")[1]
    assert "Permission denied" in find("cat /mnt/annofs/src/project/main.c", 1)[2]
    why = find("annofs why")[1]
    assert "found by signed tree path" in why or "found by edit graph" in why
    assert "-int main(void) { return 0; }" in why
    assert "+int patched_main(void) { return 0; }" in why
    assert find("cat /mnt/annofs/src/project/main.c", 2)[1] == \
        "int patched_main(void) { return 0; }\n/* changed */\n"
    assert "/src/project/evil.c: refused" in find("annofs verify /mnt")[1]
    assert (tmp / "project-copy" / "util.c").exists()
    store = home / "annofs-store"
    problems = [line for line in (store / "daemon.log").read_text().splitlines()
                if _LOG_PROBLEM.match(line)]
    assert not problems, "the daemon logged:\n" + "\n".join(problems)
