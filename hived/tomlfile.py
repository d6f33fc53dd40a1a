"""Reading a config file: every daemon's TOML goes through `read`, so a missing, unreadable or
malformed file is said the same way everywhere (and names the file)."""

from __future__ import annotations

import tomllib
from pathlib import Path


def read(path: str | Path, error: type[Exception], hint: str = "") -> dict:
    """The parsed file; `error(message)` when it is missing, unreadable or not TOML. `hint`
    (e.g. "give the connector's config with --config") ends the missing-file message."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise error(f"config file {path} does not exist" + (f" ({hint})" if hint else "")) from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise error(f"config file {path}: {exc.strerror or exc}") from None
