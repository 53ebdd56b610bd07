"""--help shows flags as flags and lists choices; shell completion is enabled and completes choices."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from vitattn.cli import app

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "TERM": "dumb"}


@pytest.mark.parametrize("command", [[], ["heatmap"], ["info"], ["models"]])
def test_help_shows_flags_without_a_type(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "<bool>" not in result.stdout and "--help" in result.stdout
    if command == ["heatmap"]:
        for choices in ("raw|rollout|grad-rollout", "mean|max|min", "png|jpg|webp", "fp32|bf16|fp16"):
            assert choices in result.stdout
        flags = [line for line in result.stdout.splitlines() if "--json" in line or "--overwrite" in line]
        assert len(flags) == 2 and all("<" not in line for line in flags)
    if command == []:
        assert "--install-completion" in result.stdout and "--show-completion" in result.stdout


@pytest.mark.subprocess
def test_shell_completion_completes_options_and_choices() -> None:
    def complete(words: str, cword: int) -> list[str]:
        env = {**ENV, "_VITATTN_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
        proc = subprocess.run([sys.executable, "-m", "vitattn"], env=env, capture_output=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.decode().split()

    assert complete("vitattn hea", 1) == ["heatmap"]
    assert complete("vitattn heatmap --meth", 2) == ["--method"]
    assert complete("vitattn heatmap --method ", 3) == ["raw", "rollout", "grad-rollout"]
    # --show-completion detects the user's shell from the process tree: run it from bash (the "; true" keeps
    # bash as the parent instead of exec-ing), whatever shell runs the tests (make uses sh)
    shown = f"'{sys.executable}' -m vitattn --show-completion; true"
    script = subprocess.run(["bash", "-c", shown], env=ENV, capture_output=True, timeout=60)
    assert script.returncode == 0 and b"_VITATTN_COMPLETE=complete_bash" in script.stdout
