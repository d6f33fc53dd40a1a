"""The pieces of a pre-made build container (hived/cell/premade.py) that run on this host too:
hived-buildinit waiting for its build on fd 4, the build's command spec, the image filesystem
check, and mounting a checkout into another mount namespace. The real cells are in
tests/test_premade.py."""

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from hived.cell import container, premade
from hived.image.spec import BUILDINIT_C


@pytest.fixture(scope="module")
def buildinit(tmp_path_factory) -> str:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler: `apt-get install gcc libc6-dev` (the cell image needs it too)")
    out = tmp_path_factory.mktemp("bi") / "hived-buildinit"
    subprocess.run(["cc", "-static", "-Os", "-Wall", "-Werror", "-o", str(out), str(BUILDINIT_C)], check=True)
    return str(out)


def _waiting_init(buildinit: str, spec: bytes | None):
    """hived-buildinit started as a pre-made container's init (no program), then given `spec`
    on fd 4 as the cell daemon does; (exit code, stdout, stderr, its fd 3 report)."""
    rep_r, rep_w = os.pipe()
    cmd_r, cmd_w = os.pipe()

    def fds() -> None:
        os.dup2(rep_w, 3)
        os.dup2(cmd_r, 4)

    proc = subprocess.Popen([buildinit], preexec_fn=fds, close_fds=False, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={"PATH": "/usr/bin:/bin", "WAITER_ONLY": "1"}, cwd="/")
    os.close(rep_w)
    os.close(cmd_r)
    time.sleep(0.05)  # it waits: nothing runs before the build is written
    assert proc.poll() is None
    if spec:
        os.write(cmd_w, spec)
    os.close(cmd_w)
    out, err = proc.communicate(timeout=30)
    report = os.read(rep_r, 256).decode()
    os.close(rep_r)
    return proc.returncode, out, err, report


def test_a_waiting_init_runs_exactly_the_build_it_is_given(buildinit, tmp_path):
    spec = container.command_spec(["sh", "-c", "pwd; env | sort; echo \"$1\"; exit 7", "sh", "a b\tc"],
                                  {"PATH": "/usr/bin:/bin", "ONLY": "mine", "EMPTY": ""}, str(tmp_path))
    code, out, err, report = _waiting_init(buildinit, spec)
    lines = out.decode().splitlines()
    assert code == 7 and report == f"status {7 << 8}\n", (code, err, report)
    assert lines[0] == str(tmp_path)                   # its cwd
    env = [x for x in lines[1:-1] if not x.startswith(("PWD=", "SHLVL=", "_="))]
    assert env == ["EMPTY=", "ONLY=mine", "PATH=/usr/bin:/bin"]  # only its env: nothing of the waiter's
    assert lines[-1] == "a b\tc"                       # its argv, word for word
    assert container.parse_report(report) == ("status", 7 << 8)


def test_a_waiting_init_reports_a_cwd_or_program_it_cannot_use(buildinit, tmp_path):
    code, _, err, report = _waiting_init(buildinit, container.command_spec(["true"], {}, str(tmp_path / "no")))
    assert code == 127 and container.parse_report(report) == ("chdir", 2) and b"cannot enter" in err
    code, _, err, report = _waiting_init(buildinit, container.command_spec(["no-such-program"], {"PATH": "/bin"}, "/"))
    assert code == 127 and container.parse_report(report) == ("exec", 2), err


@pytest.mark.parametrize("spec", [None, b"/\x002\x00only-one\x00", b"/\x00x\x00true\x00", b"/\x001\x00true"])
def test_a_waiting_init_given_no_well_formed_build_runs_nothing(buildinit, spec):
    code, out, err, report = _waiting_init(buildinit, spec)
    assert (code, out, report) == (126, b"", ""), err


def test_the_command_spec_refuses_nul_bytes():
    with pytest.raises(container.ContainerError, match="NUL"):
        container.command_spec(["sh", "-c", "a\0b"], {}, "/")


def test_the_image_filesystem_is_known_from_its_superblock(tmp_path):
    made = 0
    for kind, cmd in (("ext4", ["mke2fs", "-q", "-t", "ext4", "-F"]), ("erofs", ["mkfs.erofs", "--quiet"])):
        tool = shutil.which(cmd[0])
        if tool is None:
            continue
        src = tmp_path / f"src-{kind}"
        src.mkdir()
        (src / "f").write_text("x")
        img = tmp_path / f"{kind}.img"
        if kind == "ext4":
            subprocess.run([*cmd, "-d", str(src), str(img), "4M"], check=True, capture_output=True)
        else:
            subprocess.run([*cmd, str(img), str(src)], check=True, capture_output=True)
        assert container.fs_type_of(img.read_bytes()[:2048]) == kind
        made += 1
    if not made:
        pytest.skip("neither mke2fs nor mkfs.erofs here")
    assert container.fs_type_of(bytes(2048)) == ""


def _msg(**over):
    msg = {"argv": ["true"], "env": {}, "cwd": "/work", "limits": {"output_bytes": 1 << 20}, "image_fs": "",
           "source_fs": ""}
    msg.update(over)
    return msg


def test_a_premade_container_takes_only_builds_it_can_run_exactly():
    made = premade.PremadeContainer(agent=None)
    assert made.fits(_msg(), "/work") == "not made"
    made.pid, made.image_fs = os.getpid(), "erofs"  # a live process stands for its waiting init
    assert made.fits(_msg(image_fs="erofs", source_fs="erofs"), "/workspace") == ""
    assert "image filesystem" in made.fits(_msg(), "/work")               # the cell root, not its image
    assert "rlimits" in made.fits(_msg(image_fs="erofs", limits={"nofile": 64}), "/work")
    assert "not absolute" in made.fits(_msg(image_fs="erofs"), "work")
    zombie = subprocess.Popen(["true"])  # an init that died, its SIGCHLD not handled yet
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{zombie.pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] != b"Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        made.pid = zombie.pid
        assert "ended" in made.fits(_msg(image_fs="erofs"), "/work")
    finally:
        zombie.wait()
    made.dead = "its init ended before any build (wait status 9)"
    assert made.fits(_msg(image_fs="erofs"), "/work") == made.dead


def test_a_checkout_is_mounted_into_a_waiting_containers_namespace(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root: mount namespaces")
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        pytest.skip("needs unshare and nsenter (util-linux)")
    src = Path(tempfile.mkdtemp(prefix="hvpm", dir="/tmp"))
    target = f"/tmp/hvpm-target-{os.getpid()}/workspace"
    # A process in a mount namespace of its own, as a pre-made container's init is.
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "60"])
    try:
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{holder.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
            assert time.monotonic() < deadline, "unshare did not make its namespace"
            time.sleep(0.02)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "hvpm", str(src)], check=True)
        (src / "checkout.txt").write_text("the checkout\n")
        container.mount_into(holder.pid, src, target)
        seen = subprocess.run(["nsenter", "-t", str(holder.pid), "-m", "cat", f"{target}/checkout.txt"],
                              capture_output=True, check=True)
        assert seen.stdout == b"the checkout\n"
        assert not os.path.exists(f"{target}/checkout.txt")  # only there, not in our namespace
        with pytest.raises(container.ContainerError, match="gone"):
            container.mount_into(2**22 + 12345, src, target)  # no such process
    finally:
        holder.kill()
        holder.wait()
        subprocess.run(["umount", str(src)], capture_output=True)
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(f"/tmp/hvpm-target-{os.getpid()}", ignore_errors=True)
