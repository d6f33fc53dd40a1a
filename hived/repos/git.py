"""Running git for the repository cache: clean environment, bounded time, allowlisted protocols.

Every git process gets:
* an environment built from nothing: PATH, an empty HOME, LC_ALL=C (so messages can be
  recognised), GIT_TERMINAL_PROMPT=0 (never wait for a password), GIT_CONFIG_NOSYSTEM=1 and
  GIT_CONFIG_GLOBAL=<an empty read-only file of the cache> (no system or user config: no
  credential helpers, no aliases, no url.*.insteadOf, no filters; not /dev/null, which on
  some hosts - this one - is not the null device), GIT_NO_REPLACE_OBJECTS=1, and
  GIT_ALLOW_PROTOCOL=<allowed>: git refuses every other transport (ext::, fd::, ...) even
  if a URL got past `url.py`;
* `-c protocol.allow=never` plus `protocol.<p>.allow=always` for the allowed ones (the same
  rule, stated the config way), hooks off, no automatic gc or maintenance;
* credentials (http(s) only) as `http.<scheme://host/>.extraHeader` in GIT_CONFIG_COUNT /
  GIT_CONFIG_KEY_n / GIT_CONFIG_VALUE_n: in the environment of git and its children (readable
  only by the same user in /proc/<pid>/environ), never in argv (/proc/<pid>/cmdline is
  world-readable), never in a file; redirects are not followed then;
* its own session (process group), killed as a whole on timeout or cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass

from hived.repos.errors import (
    AuthError,
    CacheFull,
    GitError,
    InvalidUrl,
    RemoteUnavailable,
    RepoError,
    RepoNotFound,
    RevisionNotFound,
)
from hived.repos.url import Credentials, Remote

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_SSH = "ssh -o BatchMode=yes -o ConnectTimeout=30 -o ServerAliveInterval=15 -o ServerAliveCountMax=4"
STDERR_KEEP = 64 << 10


class GitFailed(Exception):
    def __init__(self, args: list[str], returncode: int | None, stderr: str, timeout: float | None = None):
        super().__init__(f"git {' '.join(args[:3])} failed ({returncode})")
        self.args_ = args
        self.returncode = returncode
        self.stderr = stderr
        self.timeout = timeout  # set when it was killed for taking too long


@dataclass
class GitRunner:
    protocols: tuple[str, ...]
    home: str  # an empty directory of the cache's own, with empty.gitconfig and hooks/ in it
    ssh_command: str = DEFAULT_SSH
    fsck: bool = True
    git: str = "git"

    def config_args(self) -> list[str]:
        args = ["-c", "protocol.allow=never"]
        for p in self.protocols:
            args += ["-c", f"protocol.{p}.allow=always"]
        args += ["-c", f"core.hooksPath={self.home}/hooks", "-c", "credential.helper=", "-c", "gc.auto=0",
                 "-c", "maintenance.auto=false", "-c", "fetch.writeCommitGraph=false",
                 "-c", "fetch.recurseSubmodules=false", "-c", "submodule.recurse=false",
                 "-c", "fetch.showForcedUpdates=false", "-c", "core.fsync=committed",
                 "-c", "http.lowSpeedLimit=1024", "-c", "http.lowSpeedTime=60",
                 "-c", "advice.detachedHead=false", "-c", "init.defaultBranch=main"]
        if self.fsck:
            args += ["-c", "fetch.fsckObjects=true"]
        return args

    def env(self, creds: Credentials | None = None, remote: Remote | None = None) -> dict[str, str]:
        env = {
            "PATH": PATH,
            "HOME": self.home,
            "LC_ALL": "C",
            "LANG": "C",
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": f"{self.home}/empty.gitconfig",
            "GIT_NO_REPLACE_OBJECTS": "1",
            "GIT_ALLOW_PROTOCOL": ":".join(self.protocols),
            "GIT_SSH_COMMAND": self.ssh_command,
            "GIT_SSH_VARIANT": "ssh",
        }
        pairs: list[tuple[str, str]] = []
        if creds is not None and remote is not None and remote.netloc:
            pairs.append((f"http.{remote.netloc}.extraHeader", creds.header()))
            pairs.append(("http.followRedirects", "false"))
        if pairs:
            env["GIT_CONFIG_COUNT"] = str(len(pairs))
            for i, (k, v) in enumerate(pairs):
                env[f"GIT_CONFIG_KEY_{i}"] = k
                env[f"GIT_CONFIG_VALUE_{i}"] = v
        return env

    async def run(self, args: list[str], *, git_dir: str | os.PathLike | None = None, timeout: float,
                  creds: Credentials | None = None, remote: Remote | None = None, stdin: bytes | None = None,
                  stdout_fd: int | None = None, env: dict[str, str] | None = None,
                  cwd: str | os.PathLike | None = None) -> bytes:
        """git <config args> [--git-dir=D] args; its stdout (or None written to stdout_fd)."""
        cmd = [self.git, *self.config_args()]
        if git_dir is not None:
            cmd.append(f"--git-dir={os.fspath(git_dir)}")
        cmd += args
        full_env = self.env(creds, remote)
        if env:
            full_env.update(env)
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.PIPE,
            stdout=stdout_fd if stdout_fd is not None else asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=full_env, cwd=cwd, start_new_session=True)
        t0 = time.monotonic()
        if not stdin:  # no input: an empty pipe, closed now (never /dev/null: see above)
            proc.stdin.close()
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin or None), timeout)
        except TimeoutError:
            await _kill(proc)
            raise GitFailed(args, None, "", timeout=time.monotonic() - t0) from None
        except BaseException:
            await _kill(proc)
            raise
        stderr = (err or b"")[-STDERR_KEEP:].decode(errors="replace")
        if proc.returncode != 0:
            raise GitFailed(args, proc.returncode, stderr)
        return out or b""


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """Kill git and its children (index-pack, remote helpers, ssh): its process group, while
    git itself is not reaped yet (so the group id cannot belong to anyone else)."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    with contextlib.suppress(Exception):
        await asyncio.shield(proc.wait())


# ------------------------------------------------------------------------------- error messages

_DISK = ("no space left on device", "disk quota exceeded", "out of diskspace")  # the last: git writing to a full fd
_PROTOCOL = ("not allowed", "unsupported protocol", "unable to find remote helper")
_AUTH = ("authentication failed", "could not read username", "could not read password",
         "terminal prompts disabled", "permission denied (publickey", "requested url returned error: 401",
         "requested url returned error: 403", "host key verification failed", "invalid credentials",
         "http basic: access denied")
_NOT_FOUND = ("repository not found", "does not appear to be a git repository", "not exported",
              "requested url returned error: 404", "no such repository", "not a git repository",
              "project not found", "' not found")
_NO_REV = ("couldn't find remote ref", "not our ref", "no such remote ref", "unadvertised object",
           "is not a valid ref", "bad object")
_DOWN = ("connection refused", "could not resolve host", "unable to connect", "timed out", "early eof",
         "hung up unexpectedly", "unexpected disconnect", "connection reset", "broken pipe",
         "index-pack failed", "invalid index-pack output", "transfer closed", "rpc failed",
         "failed to connect", "network is unreachable", "no route to host", "could not read from remote",
         "ssl", "gnutls", "tls", "protocol error", "remote error", "connection closed",
         "did not send all necessary objects", "unable to access", "empty reply", "recv failure",
         "the remote end hung up", "pack has bad object", "premature end", "couldn't connect")


def first_line(stderr: str, secrets: list[str] = ()) -> str:
    """The line that says why: the last `fatal:`/`error:` line, else the last line."""
    lines = [ln.strip() for ln in stderr.replace("\r", "\n").splitlines() if ln.strip()]
    pick = ""
    at = -1
    for i, ln in enumerate(lines):
        low = ln.lower()
        if low.startswith(("fatal:", "error:")):
            pick, at = ln, i
            if low.startswith("fatal:"):
                break  # git's first fatal line is the cause; later ones repeat it
    if at >= 0:  # lines that continue it ("unable to connect to h:" / "h[0: ...]: errno=Connection refused")
        for ln in lines[at + 1:at + 3]:
            if ln.lower().startswith(("fatal:", "error:", "warning:", "hint:")):
                break
            pick += " " + ln
    elif lines:
        pick = lines[-1]
    for s in secrets:
        if s:
            pick = pick.replace(s, "***")
    return pick[:300] or "no message"


def classify(e: GitFailed, action: str, remote: Remote, rev: str = "", creds: Credentials | None = None,
             ) -> RepoError:
    """A precise one-line error for a failed network git command."""
    secrets = creds.secrets() if creds else []
    what = f"{action} {remote.normal}"
    if e.timeout is not None:
        return RemoteUnavailable(f"{what}: no answer within {e.timeout:.0f} s (timed out)")
    line = first_line(e.stderr, secrets)
    low = e.stderr.lower()
    if any(s in low for s in _DISK):
        return CacheFull(f"{what}: the cache disk is full ({line})")
    if "transport" in low and any(s in low for s in _PROTOCOL):
        return InvalidUrl(f"{what}: git refused the protocol ({line})")
    if any(s in low for s in _AUTH):
        return AuthError(f"{what}: access denied ({line})")
    if any(s in low for s in _NOT_FOUND):
        return RepoNotFound(f"{what}: no such repository ({line})")
    if any(s in low for s in _NO_REV):
        return RevisionNotFound(f"{what}: revision {rev or '?'} does not exist ({line})")
    if any(s in low for s in _DOWN):
        return RemoteUnavailable(f"{what}: the server failed or went away ({line})")
    if e.returncode is not None and e.returncode < 0:
        return RemoteUnavailable(f"{what}: git was killed by signal {-e.returncode} ({line})")
    return GitError(f"{what}: git exited with {e.returncode} ({line})")


def local_error(e: GitFailed, what: str) -> RepoError:
    """A failed local git command (checkout, pack, rev-parse on the mirror)."""
    if e.timeout is not None:
        return GitError(f"{what}: took longer than {e.timeout:.0f} s")
    line = first_line(e.stderr)
    if any(s in e.stderr.lower() for s in _DISK):
        return CacheFull(f"{what}: the cache disk is full ({line})")
    return GitError(f"{what}: git exited with {e.returncode} ({line})")


def ensure_home(home: str) -> None:
    """The HOME git runs with: empty, plus an empty global config and an empty hooks dir."""
    os.makedirs(os.path.join(home, "hooks"), exist_ok=True)
    cfg = os.path.join(home, "empty.gitconfig")
    if not os.path.isfile(cfg) or os.path.getsize(cfg):
        with open(cfg, "w"):
            pass
        os.chmod(cfg, 0o444)
