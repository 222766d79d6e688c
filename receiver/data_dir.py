"""The receiver's data directory is private to the service's user.

Why: it holds every device's bitstreams and reconstructions and the SQLite database (token hashes,
session hashes); with the usual umask a new folder would be world-readable, so any local user could read
every image. A folder that already exists is left as the operator made it (it may be shared on purpose,
e.g. with a backup group), with a warning when others can read it.
"""

from __future__ import annotations

import logging
import stat
from pathlib import Path

__all__ = ["prepare_data_dir"]

log = logging.getLogger(__name__)


def prepare_data_dir(path: Path) -> None:
    """Create `path` with mode 0700 when it is missing; warn when an existing one is open to others."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=0o700)
        path.chmod(0o700)  # whatever the umask
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("data directory %s has mode %04o: other users can read the images and the database "
                    "(chmod 700 it unless that is intended)", path, mode)
