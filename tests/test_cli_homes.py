"""`hived run` and `hived status` pointed at the wrong kind of directory say what it is and
what to do, in one line; their --help explains every option."""

import signal
import subprocess
import sys

from ports import free_port
from test_control_restart import ControlProcess, write_config

HIVED = [sys.executable, "-m", "hived"]


def test_run_and_status_on_a_control_plane_state_dir_say_what_it_is(tmp_path):
    config = write_config(tmp_path, free_port(), free_port())
    proc = ControlProcess(config, tmp_path / "control.log")
    state = tmp_path / "state"
    try:
        assert (state / "endpoints.json").exists()
        for argv, hint in ((["run", "--home", str(state), "--", "true"], "POST http://"),
                           (["status", "--home", str(state)], "GET http://")):
            r = subprocess.run([*HIVED, *argv], capture_output=True, timeout=60)
            err = r.stderr.decode()
            assert r.returncode == 2 and "Traceback" not in err and err.count("\n") == 1, err
            assert f"{state} is the state directory of `hived control` (hive r1" in err, err
            assert "takes a `hived up` home" in err and hint in err, err
    finally:
        proc.kill(signal.SIGTERM)


def test_help_explains_run_and_status_options():
    run = subprocess.run([*HIVED, "run", "--help"], capture_output=True, timeout=60, check=True).stdout.decode()
    text = " ".join(run.split())
    assert "-- CMD [ARG...] the command to run in the cell" in text
    assert "--env NAME=VALUE set an environment variable for the build" in text
    assert "--cwd DIR directory the build starts in" in text
    status = subprocess.run([*HIVED, "status", "--help"], capture_output=True, timeout=60, check=True).stdout.decode()
    text = " ".join(status.split())
    assert "--home HOME home of `hived up`, or state directory of `hived box`" in text
    assert "--json print the whole report as one JSON object" in text


def test_run_with_api_urls_bad_input_is_one_line(tmp_path):
    """`hived run --api URL` (a hive's replicas, repeated): what is missing or wrong is named."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "HIVED_API_TOKEN"}
    cases = (
        (["--api", "http://127.0.0.1:1", "--customer", "a"], {}, "--api needs the customer's API token"),
        (["--api", "http://127.0.0.1:1"], {"HIVED_API_TOKEN": "t"}, "--api needs --customer"),
        (["--api", "nope", "--customer", "a"], {"HIVED_API_TOKEN": "t"}, "--api: expected an API URL"),
        (["--api", "http://127.0.0.1:1", "--token-file", str(tmp_path / "none"), "--customer", "a"], {},
         "--token-file"),
        (["--token-file", str(tmp_path / "none")], {}, "--token-file goes with --api"),
        (["--api", "http://127.0.0.1:1", "--api", "http://127.0.0.1:2", "--customer", "a"], {"HIVED_API_TOKEN": "t"},
         "cannot reach the hive's API at any of http://127.0.0.1:1, http://127.0.0.1:2"),
    )
    for args, more, expected in cases:
        r = subprocess.run([*HIVED, "run", *args, "--", "true"], capture_output=True, timeout=60,
                           env={**env, **more})
        err = r.stderr.decode()
        assert r.returncode == 2 and "Traceback" not in err and err.count("\n") == 1, (args, err)
        assert expected in err, (args, err)


def test_a_hive_of_several_replicas_in_endpoints_json_is_every_api_in_turn():
    """endpoints.json may name a hive's API as a list (its replicas): `hived run` gets them all,
    in order; a bad one is named."""
    import pytest

    from hived.cli.client import _api
    from hived.errors import UserError

    ep = {"api": "http://router:8000", "token": "t", "customer": "acme",
          "hives": {"eu1": {"api": ["http://cp1:8080/", "http://cp2:8080"]}}}
    assert _api(ep, "/h", "eu1", "acme") == (["http://cp1:8080", "http://cp2:8080"], "t")
    assert _api(ep, "/h", "", "acme") == (["http://router:8000"], "t")
    ep["hives"]["eu1"]["api"] = ["http://cp1:8080", "cp2:8080"]
    with pytest.raises(UserError, match=r"/h/endpoints.json: api: expected an API URL like http://10.0.0.1:8080, "
                                        r"got 'cp2:8080'"):
        _api(ep, "/h", "eu1", "acme")
