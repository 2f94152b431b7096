"""Find the headless Chromium the review-page test drives, and how to start it.

    found = find_chromium()          # (executable, environment) or a reason why there is none

Looked for in this order: the executable named by MOLEFLOW_CHROMIUM; the one `fetch_chromium.sh` unpacked
into .browser/ at the repository root (its libraries go on LD_LIBRARY_PATH). The executable must answer
`--version`, so a half-unpacked or broken browser is reported, not driven.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UNPACKED = ROOT / ".browser" / "root"
FETCH = "tests/browser/fetch_chromium.sh"


def _library_dirs(root: Path) -> list[str]:
    """Folders of the unpacked tree that hold shared libraries."""
    found = {p.parent for base in (root / "usr" / "lib", root / "lib") if base.is_dir() for p in base.rglob("*.so*")}
    return sorted(str(d) for d in found)


def find_chromium() -> tuple[str, dict[str, str]] | str:
    """(executable, environment for it) or the reason no usable browser was found."""
    env = dict(os.environ)
    named = os.environ.get("MOLEFLOW_CHROMIUM")
    if named:
        exe = Path(named)
    else:
        exe = UNPACKED / "usr" / "lib" / "chromium" / "chromium-headless-shell"
        if not exe.is_file():
            return (f"no headless Chromium: run {FETCH} (apt-get download + dpkg -x into .browser/) "
                    "or set MOLEFLOW_CHROMIUM")
        env["LD_LIBRARY_PATH"] = ":".join(_library_dirs(UNPACKED) + [env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    try:
        out = subprocess.run([str(exe), "--version"], env=env, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{exe} cannot be started ({exc})"
    if out.returncode != 0:
        return f"{exe} does not start: {' '.join((out.stderr or out.stdout).split())[:300]}"
    return str(exe), env
