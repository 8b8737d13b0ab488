"""The Dockerfile and the shell scripts pass their linters (hadolint, ShellCheck)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.deploy.common import ROOT

BIN = Path(sys.executable).parent
SCRIPTS = [
    ROOT / "docker" / "entrypoint.sh",
    *sorted((ROOT / "scripts").glob("*.sh")),
    ROOT / ".ci" / "run",
]


def _run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=60, check=False
    )


def test_the_dockerfile_passes_hadolint():
    result = _run(BIN / "hadolint", "--no-color", ROOT / "docker" / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_shell_scripts_pass_shellcheck():
    assert all(path.exists() for path in SCRIPTS)
    result = _run(BIN / "shellcheck", "--severity=warning", *SCRIPTS)
    assert result.returncode == 0, result.stdout + result.stderr
