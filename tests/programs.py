"""Where the test fixtures find system programs: PATH first, then the sbin directories a user's PATH
may lack (daemons such as krb5kdc, slapd and samba live there)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def find_program(name: str, extra_dirs: tuple[str, ...] = ()) -> str | None:
    """The path of an executable `name` on PATH, else in SBIN or `extra_dirs`; None when there is none."""
    found = shutil.which(name)
    if found:
        return found
    for d in (*SBIN, *extra_dirs):
        path = Path(d) / name
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None
