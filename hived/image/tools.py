"""Running the tools an image build needs: one line per failure, a log of the rest."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from hived.image.spec import TOOLS, ImageError

# --------------------------------------------------------------------------
# running tools


def _require_tools(names: list[str] | tuple[str, ...]) -> None:
    for name in names:
        if shutil.which(name) is None:
            pkg = TOOLS.get(name, name)
            raise ImageError(
                "tool check", f"{name} is not installed", f"run `apt-get install {pkg}`"
            )


def _last_error_line(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith(("E:", "Error", "error", "mke2fs:", "tar:")) or "failed" in ln.lower():
            return ln
    return lines[-1] if lines else "no output"


class _Log:
    """Full output of every tool run, kept in the build dir (cache/last-build.log)."""

    def __init__(self, path: Path | None):
        self.path = path

    def write(self, text: str) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8", errors="replace") as f:
            f.write(text)


def _run(
    cmd: list[str],
    what: str,
    todo: str,
    log: _Log | None = None,
    *,
    cwd: Path | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    env = dict(os.environ, LC_ALL="C", DEBIAN_FRONTEND="noninteractive")
    try:
        p = subprocess.run(
            cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
        )
    except FileNotFoundError:
        pkg = TOOLS.get(cmd[0], cmd[0])
        raise ImageError("tool check", f"{cmd[0]} is not installed",
                         f"run `apt-get install {pkg}`") from None
    if log is not None:
        log.write(f"$ {' '.join(cmd)}\n{p.stdout}\n[exit {p.returncode}]\n")
    if check and p.returncode != 0:
        if "No space left on device" in p.stdout:
            raise ImageError(what, "disk full (No space left on device)",
                             "free space or set HIVED_IMAGE_DIR to a bigger disk")
        raise ImageError(what, f"{cmd[0]} exited {p.returncode}: {_last_error_line(p.stdout)}",
                         todo)
    return p
