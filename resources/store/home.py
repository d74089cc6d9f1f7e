"""Where Crucible keeps artifacts and the registry: `$CRUCIBLE_HOME`, default `~/.crucible`."""

import os
from pathlib import Path


def crucible_home() -> Path:
    return Path(os.environ.get("CRUCIBLE_HOME") or Path.home() / ".crucible").expanduser()
