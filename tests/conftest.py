import importlib
import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["cython", "python"])
def framing(request):
    """Both frame implementations; the compiled one must exist (native.compiled is required)."""
    if request.param == "cython":
        return importlib.import_module("hived._framing")
    return importlib.import_module("hived.protocol.framing_py")


@pytest.fixture(params=["cython", "python"])
def tokenbucket(request):
    if request.param == "cython":
        return importlib.import_module("hived._tokenbucket")
    return importlib.import_module("hived.ratelimit_py")


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy_name(request):
    return request.param


def run_on(loop_name: str, coro_fn):
    """Run `coro_fn()` on a fresh loop of the named kind."""
    if loop_name == "uvloop":
        import uvloop

        return uvloop.run(coro_fn())
    import asyncio

    return asyncio.run(coro_fn())


def need_root():
    if os.geteuid() != 0:
        pytest.skip("needs root (cgroups, namespaces, taps)")


def need_binary(name: str, package: str):
    if shutil.which(name) is None:
        pytest.skip(f"{name} not installed (Debian package {package})")


def python() -> str:
    return sys.executable
