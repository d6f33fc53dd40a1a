"""Pick compiled modules or their pure-Python twins.

HIVED_PUREPYTHON=1 forces the pure-Python twins (the cell daemon runs that way: the
guest has no compiler). Otherwise a missing compiled module is a packaging fault,
reported by `hived doctor` as native.compiled = false, and the twin is used.
"""

import importlib
import os

PURE = os.environ.get("HIVED_PUREPYTHON", "") not in ("", "0")

# compiled module -> its pure-Python twin
TWINS = {
    "hived._framing": "hived.protocol.framing_py",
    "hived._tokenbucket": "hived.ratelimit_py",
}

_missing: dict[str, str] = {}


def load(compiled: str):
    """Return the compiled module, or its twin when forced or when it is not built."""
    if not PURE:
        try:
            return importlib.import_module(compiled)
        except ImportError as exc:
            _missing[compiled] = str(exc)
    return importlib.import_module(TWINS[compiled])


def status() -> dict:
    """What is in use, for `hived doctor`."""
    compiled = {}
    for name in [*TWINS, "hived._kvm"]:
        try:
            importlib.import_module(name)
            compiled[name] = True
        except ImportError:
            compiled[name] = False
    return {
        "compiled": all(compiled.values()),
        "modules": compiled,
        "pure_python_forced": PURE,
    }
