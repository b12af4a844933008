"""Every command's --help: a complete description and the environment variables it reads."""

import subprocess
import sys
from pathlib import Path

import pytest

KIT = Path(__file__).resolve().parent.parent
# command -> the environment variables its --help must name
COMMANDS = {
    "prepare.py": ("AUTORESEARCH_CACHE_DIR", "AUTORESEARCH_DOWNLOAD_URL", "AUTORESEARCH_DATASET"),
    "tools/bench.py": ("AUTORESEARCH_CACHE_DIR", "AUTORESEARCH_DATASET", "AUTORESEARCH_BACKEND",
                       "AUTORESEARCH_PROFILE", "AUTORESEARCH_TIME_BUDGET"),
    "tools/sweep_cpu.py": ("AUTORESEARCH_CACHE_DIR", "AUTORESEARCH_DATASET", "AUTORESEARCH_TIME_BUDGET",
                           "AUTORESEARCH_PROFILE", "AUTORESEARCH_BACKEND"),
    "tools/report.py": ("AUTORESEARCH_RUNS_DIR",),
    "tools/plot.py": (),
    "tools/cluster.py": ("AUTORESEARCH_CACHE_DIR",),
}


def help_text(command):
    done = subprocess.run([sys.executable, str(KIT / command), "--help"], cwd=KIT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_names_every_environment_variable_the_command_reads(command):
    text = help_text(command)
    environment = text.split("environment:", 1)
    assert len(environment) == 2, f"{command} --help has no environment section"
    for variable in COMMANDS[command]:
        assert variable in environment[1], f"{command} --help does not mention {variable}"
    if not COMMANDS[command]:
        assert "reads no environment variables" in environment[1]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_description_is_a_whole_sentence(command):
    text = help_text(command)
    description = text.split("\n\n")[1].strip()  # after the usage block
    assert description.endswith("."), f"{command}: {description!r}"
