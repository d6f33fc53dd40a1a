"""`hived bench`: the JSON each benchmark prints, its errors, and that boot leaves nothing behind.

No timing assertions: only that numbers exist, are positive and consistent with each other.
The boot benchmark boots real microVMs (marked vm; skipped without a built image).
"""

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from hived.bench import boot, common
from hived.box.leftovers import _cmdline

ROOT = Path(__file__).resolve().parent.parent
CODEC_KEYS = [f"{mode}/{w}" for mode in ("encode", "decode", "framing_only")
              for w in ("ping", "output_4k", "output_64k", "stream_64k_chunks")]


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a benchmark; on timeout SIGTERM it (so it cleans up) before failing."""
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"{' '.join(argv)} did not finish in {timeout:g} s; stderr: {err[-2000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _one_json_object(stdout: str) -> dict:
    report = json.loads(stdout)  # the whole of stdout: exactly one JSON value
    assert isinstance(report, dict)
    return report


def _need_image(bench: str) -> None:
    """Skip, saying why, when there is no cell image for this code."""
    try:
        boot.resolve_image(None)
    except common.BenchError as exc:
        reason = f"no cell image for the {bench} benchmark: {exc}"
        print(reason)
        pytest.skip(reason)


# -- pure helpers ---------------------------------------------------------------------------
def test_percentile_interpolates_between_ranks():
    assert common.percentile([5.0], 50) == 5.0
    assert common.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert common.percentile([4.0, 1.0, 3.0, 2.0], 0) == 1.0
    assert common.percentile([4.0, 1.0, 3.0, 2.0], 100) == 4.0
    assert common.percentile(list(map(float, range(1, 11))), 95) == pytest.approx(9.55)


def test_dist_ms_shape():
    d = common.dist_ms([3.0, 1.0, 2.0])
    assert d["p50"] == 2.0 and d["min"] == 1.0 and d["max"] == 3.0 and d["n"] == 3
    assert d["min"] <= d["p50"] <= d["p95"] <= d["max"]


# -- codec ----------------------------------------------------------------------------------
def test_codec_json_both_implementations():
    r = _run([sys.executable, "-m", "hived", "bench", "codec", "--json", "--seconds", "0.2"], 300)
    assert r.returncode == 0, r.stderr
    report = _one_json_object(r.stdout)
    assert report["benchmark"] == "codec"
    machine = report["machine"]
    assert machine["nproc"] >= 1 and machine["cpu_model"] and machine["python"]
    assert sorted(report["results"]) == sorted(CODEC_KEYS)
    for key, entry in report["results"].items():
        for impl in ("cython", "python"):
            e = entry[impl]
            assert e["rounds"] == report["config"]["rounds"] == 7, key
            for unit in ("frames_per_s", "mb_per_s"):
                assert 0 < e[f"{unit}_min"] <= e[f"{unit}_p50"] <= e[f"{unit}_max"], (key, impl, e)
        ratio = entry["cython"]["frames_per_s_p50"] / entry["python"]["frames_per_s_p50"]
        assert entry["speedup"] == pytest.approx(ratio, rel=1e-2), key
    assert "round 7/7" in r.stderr  # progress goes to stderr


def test_codec_script_and_table():
    r = _run([sys.executable, str(ROOT / "benchmarks" / "bench_codec.py"), "--seconds", "0.05",
              "--rounds", "1"], 300)
    assert r.returncode == 0, r.stderr
    assert "cython frames/s" in r.stdout and "python frames/s" in r.stdout
    assert "framing_only/stream_64k_chunks" in r.stdout


@pytest.mark.parametrize("args", [["control", "--boxes", "0"], ["boot", "--cells", "0"], ["secure", "--builds", "0"],
                                  ["peers", "--runs", "0"], ["imageauth", "--runs", "0"]], ids=lambda a: a[0])
def test_bad_arguments_are_one_line(args):
    r = _run([sys.executable, "-m", "hived", "bench", *args], 60)
    assert r.returncode == 1 and r.stdout == "" and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert args[1] in r.stderr, r.stderr


def test_boot_without_image_is_one_line_error(tmp_path):
    env = dict(os.environ, HIVED_IMAGE_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "hived", "bench", "boot", "--json"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and "hived image build" in r.stderr


# -- control plane (simulated boxes) ---------------------------------------------------------
def test_control_json_tiny_run_and_nothing_left():
    r = _run([sys.executable, "-m", "hived", "bench", "control", "--json", "--boxes", "10", "--builds", "200",
              "--latency-builds", "100", "--http", "50"], 300)
    assert r.returncode == 0, r.stderr
    report = _one_json_object(r.stdout)
    assert report["benchmark"] == "control" and report["simulated_boxes"] is True
    assert report["boxes"] == 10
    sat, lat = report["saturation"], report["latency"]
    assert report["builds_per_s"] == sat["builds_per_s"] > 0
    assert sat["builds"] == 200 and sat["commits"] >= 1 and sat["builds_per_commit"] > 0
    sched = report["schedule_ms"]
    assert sched == lat["schedule_ms"] and sched["n"] == lat["builds"] == 100
    assert 0 <= sched["p50"] <= sched["p90"] <= sched["p99"] <= sched["max"]
    assert report["latency_rate_per_s"] == lat["rate_per_s"] > 0
    http = report["http"]
    assert http["builds"] == 50 and http["submits_per_s"] > 0 and http["submit_ms"]["n"] == 50
    # every build submitted ran once and succeeded (warm-up, saturation, latency, HTTP)
    boxes = report["processes"]["simulated_boxes"]
    assert boxes["builds_done"] == report["builds_total"] >= 200 + 100 + 50
    assert boxes["pid"] != report["processes"]["control_plane"]["pid"]
    assert not Path(f"/proc/{boxes['pid']}").exists(), "the simulated boxes' process was left behind"
    assert report["machine"]["nproc"] >= 1


def _need_postgres() -> None:
    from hived.control.pgserver import PostgresUnavailable, find_bindir

    try:
        find_bindir()
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))


def _throwaway_pg_files() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("hived-pg-*"))


def test_control_on_postgresql_tiny_run_and_its_server_is_gone():
    _need_postgres()
    before = _throwaway_pg_files()
    r = _run([sys.executable, "-m", "hived", "bench", "control", "--json", "--store", "postgresql", "--boxes", "10",
              "--builds", "200", "--latency-builds", "100", "--http", "50"], 300)
    assert r.returncode == 0, r.stderr
    report = _one_json_object(r.stdout)
    assert report["store"] == "postgresql" and "throwaway" in report["database"] and report["writers"] == 2
    assert report["saturation"]["builds"] == 200 and report["builds_per_s"] > 0
    assert report["schedule_ms"]["n"] == 100 and report["http"]["builds"] == 50
    assert report["processes"]["simulated_boxes"]["builds_done"] == report["builds_total"] >= 350
    assert _throwaway_pg_files() <= before, "the throwaway server's files were left"


def test_control_database_url_with_a_password_is_refused_in_one_line():
    r = _run([sys.executable, "-m", "hived", "bench", "control", "--store", "postgresql", "--database",
              "postgresql://u:hunter2@127.0.0.1/x"], 60)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and "holds a password" in r.stderr and "hunter2" not in r.stderr


def test_failover_json_two_kills_nothing_lost_or_twice_and_nothing_left():
    _need_postgres()
    before = _throwaway_pg_files()
    r = _run([sys.executable, "-m", "hived", "bench", "failover", "--json", "--kills", "2", "--every", "2",
              "--rate", "20", "--boxes", "4"], 300)
    assert r.returncode == 0, r.stderr
    report = _one_json_object(r.stdout)
    assert report["benchmark"] == "failover" and report["replicas"] == 2 and report["kills"] == 2
    assert report["builds"] > 0 and report["builds_lost"] == 0 and report["builds_duplicated"] == 0
    f = report["failover_s"]
    assert len(f["each"]) == 2 and 0 < f["p50"] <= f["p95"] <= f["max"]
    assert _throwaway_pg_files() <= before, "the throwaway server's files were left"
    left = subprocess.run(["pgrep", "-f", "hived-failover-"], capture_output=True, text=True).stdout.split()
    assert not left, f"replica processes left: {left}"


# -- boot (real microVMs) -------------------------------------------------------------------
def _bench_qemus() -> set[int]:
    """QEMU processes started by any boot benchmark (their paths are under /tmp/hvb-)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        cmd = _cmdline(int(entry))
        if "qemu" in cmd.split(" ", 1)[0] and f"/tmp/{boot.TMP_PREFIX}" in cmd:
            pids.add(int(entry))
    return pids


@pytest.mark.vm
def test_boot_two_cells_and_nothing_left():
    _need_image("boot")
    if shutil.which("qemu-system-x86_64") is None:
        reason = "qemu-system-x86_64 not installed (Debian package qemu-system-x86)"
        print(reason)
        pytest.skip(reason)
    before = _bench_qemus()
    r = _run([sys.executable, "-m", "hived", "bench", "boot", "--json", "--cells", "2", "--warmup", "0"], 540)
    assert r.returncode == 0, r.stderr
    report = _one_json_object(r.stdout)

    assert report["benchmark"] == "boot" and report["cells"] == 2
    assert report["accelerator"] in ("kvm", "tcg")
    for key in ("cold_boot_ms", "bare_qemu_ms", "warm_start_ms", "isolation_setup_ms", "teardown_ms"):
        assert {"p50", "p95"} <= set(report[key]), key
        assert report[key]["n"] == 2, key
    assert report["bare_qemu_ms"]["p50"] > 0
    assert report["cold_boot_ms"]["p50"] > 0
    assert report["warm_start_ms"]["p50"] > 0
    # where warm starts went: every build got its cell's pre-made container, the guest's part is within
    stages = report["warm_start_stages_p50"]
    assert stages["premade"] == "2/2", stages
    assert 0 < stages["guest_run_to_started_ms"] <= report["warm_start_ms"]["p50"], stages
    assert report["ratio"] == pytest.approx(report["cold_boot_ms"]["p50"] / report["bare_qemu_ms"]["p50"],
                                            rel=1e-2)
    assert report["machine"]["nproc"] >= 1
    # template figures: restores and the same box's figures with and without templates
    assert report["restore_ms"]["n"] == 2 and 0 < report["restore_ms"]["p50"] <= report["restore_ms"]["p95"]
    assert report["template_ms"] > 0 and report["template_state_bytes"] > 0
    pss = report["idle_pss_mib"]
    assert pss["restored"] > 0 and pss["cold"] > 0 and len(pss["all"]["restored"]) == len(pss["all"]["cold"]) == 3
    assert pss["ratio"] == pytest.approx(pss["restored"] / pss["cold"], rel=2e-2)
    ram = pss["guest_ram"]  # a part of each VMM's Pss: its guest RAM mapping alone
    assert 0 < ram["restored"] < pss["restored"] and 0 < ram["cold"] < pss["cold"], pss
    assert set(report["burst_ms"]) == {"with_templates", "without_templates"}
    assert all(v > 0 for v in report["burst_ms"].values())

    # Nothing left: no QEMU, no temp dir, no cell cgroup, no box cgroup parent.
    res = report["resources"]
    tmp = Path(res["tmp_dir"])
    assert tmp.name.startswith(boot.TMP_PREFIX)
    assert not tmp.exists(), f"{tmp} left behind"
    # only this run's VMMs: other benchmark runs may be going on at the same time
    mine = {pid for pid in _bench_qemus() - before if report["resources"]["tmp_dir"] in _cmdline(pid)}
    assert mine == set(), "QEMU processes left behind"
    if os.geteuid() == 0:
        from hived.box.cgroups import CgroupError, open_cgroups

        try:
            cells_cg = open_cgroups(res["cgroup_parents"][0])
            box_cgs = [open_cgroups(parent) for parent in res["cgroup_parents"][1:]]
        except CgroupError:
            return
        assert len(box_cgs) == 3  # warm starts, and the boxes with and without templates
        left = [str(d) for cell in res["cell_ids"] for d in cells_cg.dirs(cell) if d.exists()]
        left += [str(d) for box_cg in box_cgs for d in box_cg.parent_dirs() if d.exists()]
        assert left == [], f"cgroups left behind: {left}"


@pytest.mark.vm
def test_secure_two_builds_each_and_nothing_left():
    _need_image("secure")
    if os.geteuid() != 0 or shutil.which("wireguard-go") is None:
        reason = "needs root and wireguard-go (Debian package wireguard-go)"
        print(reason)
        pytest.skip(reason)
    netns_before = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    r = _run([sys.executable, "-m", "hived", "bench", "secure", "--json", "--builds", "2"], 540)
    assert r.returncode == 0, r.stderr
    report = _one_json_object(r.stdout)
    assert report["bench"] == "secure" and report["builds_each"] == 2
    p = report["provision_ms"]
    assert p["n"] == 2 and 0 < p["min"] <= p["p50"] <= p["p95"] <= p["max"]
    stages = report["stages_ms"]
    # cumulative stages: each ends no earlier than the one before, the last is the whole
    order = ["interface_kex_cut_ms", "configure_ms", "route_ms", "provision_ms"]
    for a, b in itertools.pairwise(order):
        assert stages[a]["samples"] and all(x <= y for x, y in zip(stages[a]["samples"], stages[b]["samples"],
                                                                   strict=True))
    assert stages["provision_ms"]["samples"] == p["samples"]
    s, pl = report["start_ms"]["secure"], report["start_ms"]["plain"]
    assert s["n"] == pl["n"] == 2
    assert report["overhead_ratio"] == pytest.approx(s["p50"] / pl["p50"], abs=0.01)
    # the bench's box pre-starts interfaces by default, and both tunnels used theirs
    assert report["prestart"]["configured"] is True and report["prestart"]["tunnels_prestarted"] == 2
    assert report["prestart"]["plain_removal_ms"]["n"] == 2  # each plain build's cell lost its interface
    # the secure build started after its tunnel was up
    assert all(start >= prov for start, prov in zip(s["samples"], p["samples"], strict=True))
    netns_after = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    assert not {n for n in netns_after - netns_before if n.startswith(("hvt", "hv-bsec", "hvr-bsec"))}


@pytest.mark.vm
def test_peers_tiny_run_and_nothing_left():
    _need_image("peers")
    if os.geteuid() != 0 or not os.path.exists("/usr/bin/docker-registry"):
        pytest.skip("needs root and docker-registry (apt-get install docker-registry)")
    netns_before = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    r = _run([sys.executable, "-m", "hived", "bench", "peers", "--json", "--runs", "1", "--image-mb", "6",
              "--repo-mb", "4"], 1200)
    assert r.returncode == 0, r.stderr[-3000:]
    report = _one_json_object(r.stdout)
    assert report["bench"] == "peers" and report["runs"] == 1
    assert report["from_registry_ms"] > 0 and report["from_peer_ms"] > 0
    assert report["pull_from_registry_ms"] > 0 and report["pull_from_peer_ms"] > 0
    assert report["fallback_ok"] is True, report["fallback"]
    assert report["fallback"]["peer_failures_counted"] >= 1 and report["detail"]["peer_fetches_ok"] >= 1
    assert report["checkout_from_origin_ms"] > 0 and report["checkout_from_peer_ms"] > 0
    assert report["checkout_pull_from_origin_ms"] > 0 and report["checkout_pull_from_peer_ms"] > 0
    assert report["checkout_peer_fetches"] == 1  # the peer runs' checkout came from box A
    netns_after = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    assert not {n for n in netns_after - netns_before if n.startswith("hvbp")}
    left = subprocess.run(["pgrep", "-f", "hived.bench.delayline|bpa-"], capture_output=True, text=True).stdout
    assert left.strip() == "", left


def test_imageauth_tiny_run_and_nothing_left():
    if os.geteuid() != 0 or not os.path.exists("/usr/bin/docker-registry") or shutil.which("htpasswd") is None:
        pytest.skip("needs root, docker-registry and htpasswd (apt-get install docker-registry apache2-utils)")
    netns_before = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    r = _run([sys.executable, "-m", "hived", "bench", "imageauth", "--json", "--runs", "3", "--image-mb", "0.5",
              "--rtt-ms", "20"], 600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = _one_json_object(r.stdout)
    assert report["bench"] == "imageauth" and report["runs"] == 3
    # the registry asked costs at least one round trip of the shaped link; the cache alone does not
    assert report["private_asked_ms"] >= 20 > report["public_hit_ms"]
    assert report["private_memo_ms"] < 20 and report["dist_ms"]["asked"]["n"] == 3
    netns_after = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    left = {n for n in netns_after - netns_before if n.startswith("hvbp")}
    assert not left, left


def test_restart_two_kills_nothing_lost_and_nothing_left():
    _need_image("restart")
    if os.geteuid() != 0:
        pytest.skip("needs root: cells get cgroups and network namespaces")
    before = {p for p in os.listdir("/tmp") if p.startswith("hvbr")}
    r = _run([sys.executable, "-m", "hived", "bench", "restart", "--json", "--restarts", "2", "--pool", "1",
              "--every", "0.5"], 900)
    assert r.returncode == 0, r.stderr
    report = _one_json_object(r.stdout)
    assert report["bench"] == "restart" and report["restarts"] == 2
    a = report["adopt_ms"]
    assert len(a["all"]) == 2 and 0 < a["p50"] <= a["max"]
    assert all(n >= 1 for n in report["cells_adopted"])  # at least the build's cell, each time
    assert (report["output_lost_bytes"], report["output_duplicated_lines"], report["builds_lost"]) == (0, 0, 0), report
    assert report["baseline_ready_ms"] > 0 and report["baseline_over_adopt"] > 0
    assert {p for p in os.listdir("/tmp") if p.startswith("hvbr")} == before  # its home removed
