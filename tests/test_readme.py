"""Every snippet in the README runs, so the docs cannot drift from the code."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"```(\w+)\n(.*?)```", re.S)


def snippets(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(README.read_text()) if lang == language]


@pytest.mark.parametrize("index", range(len(snippets("python"))))
def test_python_snippet_runs(index: int, tmp_path: Path) -> None:
    code = snippets("python")[index]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_quickstart_prints_the_captured_trajectory(tmp_path: Path) -> None:
    code = snippets("python")[0]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.stdout.strip() == "greeter t1 ok hello [('node', 'model'), ('model', 'tool-script')]"


def test_every_honed_command_in_the_readme_exists() -> None:
    honed_bin = Path(sys.executable).parent / "honed"
    commands = set()
    for block in snippets("bash"):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["honed"] and len(words) > 1:
                commands.add(words[1])
    assert {"runs", "show", "demo"} <= commands
    for command in sorted(commands):
        done = subprocess.run([str(honed_bin), command, "--help"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (command, done.stderr)


def test_readme_gives_the_two_commands_ci_runs() -> None:
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    assert "make test" in (README.parent / ".ci" / "run").read_text()
