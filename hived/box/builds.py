"""One build on one fresh cell: take it warm, run, relay output and exit, destroy it.

The cell is hostile: everything it sends is checked (right build id, output within the
limit, paced by a token bucket so a flood becomes back-pressure, not memory), and a
cell that breaks the rules or dies fails only its own build.
"""

import asyncio
import base64
import contextlib
import dataclasses
import logging
import time

from hived.box import prestart
from hived.box.cell import CellState
from hived.box.cellrecord import BuildFacts
from hived.box.pool import BootFailed
from hived.box.secure import CellTunnel, SecureComputeFailed
from hived.protocol.channel import ChannelClosed
from hived.protocol.errors import ProtocolError
from hived.ratelimit import TokenBucket
from hived.vmm.base import VmmError

log = logging.getLogger(__name__)

GRACE_S = 10.0  # host-side deadline beyond the build's own timeout, for a guest that ignores it
SETTLE_S = 10.0  # how long a finished build's cell waits for its exit to be stored before it goes


WORKSPACE = "/workspace"  # where a build's checkout is, unless it names another cwd


class CellBroke(Exception):
    """The cell misbehaved or died; the message says how."""


class BadInput(Exception):
    """A build's image or repository cannot be had; the message says which and why.
    `permanent`: asking again cannot help (it does not exist, or is named wrong); else the
    cause is on the way (a registry or git server down, the cache full) and a retry may work."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


def _permanent(exc: Exception) -> bool:
    from hived.oci import errors as oci
    from hived.repos import errors as repos

    return isinstance(exc, (oci.InvalidReference, oci.NotFound, oci.AuthError, oci.UnsupportedImage,
                            repos.InvalidUrl, repos.InvalidRevision, repos.RepoNotFound, repos.RevisionNotFound,
                            repos.AuthError))


@dataclasses.dataclass
class BuildInputs:
    image: object = None      # hived.oci.cache.CachedImage
    checkout: object = None   # hived.repos.cache.CheckoutImage, leased until copied

    def release(self, box) -> None:
        if self.checkout is not None:
            checkout, self.checkout = self.checkout, None
            try:
                box.repos.release(checkout.path)
            except Exception as exc:  # a lease we cannot give back must not fail the build
                log.error("checkout lease %s: %s", checkout.path, exc)


async def resolve_inputs(box, options: dict, rec: dict, held: tuple[str, int] | None = None) -> BuildInputs:
    """Pull the build image and make the checkout image the build names (both cached on the box).

    held: (build id, lease) of a build assigned by the control plane: its checkout may come
    from a peer the control plane vouches for (hived/box/peers.py). Every failure is this
    build's alone and names what is wrong (hived.oci / hived.repos errors); the caches never
    keep anything partial."""
    from hived.oci.errors import OciError
    from hived.repos.errors import RepoError

    image_ref, repo, rev = (str(options.get(k) or "") for k in ("image", "repo", "rev"))
    if rev and not repo:
        raise BadInput(f"revision {rev!r} given without a repository: add the repository URL (--repo)",
                       permanent=True)
    inputs = BuildInputs()
    t0 = time.monotonic()
    if image_ref:
        try:
            credentials = _credentials(box, image_ref, rec.get("customer", ""), options.get("registry_auth"))
            peers = getattr(box, "peers", None)
            inputs.image = await box.images.pull(
                image_ref, credentials,
                peers=peers.image_sources if peers is not None and box.config.peer_fetch else None)
        except OciError as exc:
            raise BadInput(f"build image {image_ref}: {exc}", _permanent(exc)) from None
        except OSError as exc:
            raise BadInput(f"build image {image_ref}: cache error: {exc}") from None
        rec.update(image_digest=inputs.image.digest, image_ms=round((time.monotonic() - t0) * 1000, 2))
    if repo:
        t1 = time.monotonic()
        try:
            peers = getattr(box, "peers", None)
            sources = None
            if held is not None and peers is not None and box.config.peer_fetch:
                def sources(repo_key: str, commit: str):
                    return peers.checkout_sources(held[0], held[1], repo_key, commit)
            inputs.checkout = await box.repos.checkout_image(repo, rev or None, acquire=True, peers=sources)
        except RepoError as exc:
            raise BadInput(f"repository {repo} at {rev or 'HEAD'}: {exc}", _permanent(exc)) from None
        except OSError as exc:
            raise BadInput(f"repository {repo}: cache error: {exc}") from None
        rec.update(commit=inputs.checkout.commit, checkout_ms=round((time.monotonic() - t1) * 1000, 2))
    return inputs


def _credentials(box, image_ref: str, customer: str, assigned):
    """Registry credentials for this build's image (hived/oci/credentials.py), or None."""
    from hived.oci import reference
    from hived.oci.credentials import pick

    r = reference.parse(image_ref)  # InvalidReference is an OciError: the build's bad input
    return pick(box.config.registry_credentials, r.registry, r.repository, customer, assigned)


async def _tell(client, name: str, **fields) -> bool:
    """Send to the client if it is still there; a client gone does not stop the cleanup."""
    try:
        await client.send(name, **fields)
        return True
    except (ChannelClosed, ProtocolError, OSError):
        return False


def _finisher(box, client, build_id: str, rec: dict):
    """The one way a build ends on the box: its record, the metric, `exit` to its client."""
    async def finish(code: int, sig: int, reason: str, message: str, usage=None, permanent=False) -> None:
        rec.update(state="done", code=code, signal=sig, reason=reason, message=message,
                   finished=time.time())
        if permanent and hasattr(client, "permanent_failure"):
            client.permanent_failure()  # the control plane must not try it again elsewhere
        box.metrics.builds.labels(reason).inc()
        await _tell(client, "exit", build_id=build_id, code=code, signal=sig, reason=reason,
                    message=message[:4096], usage=usage or {})

    return finish


async def run_build(box, client, build_id: str, msg) -> None:
    req = msg.fields
    shape = box.config.shapes.get(req["shape"] or next(iter(box.config.shapes)))
    options = req.get("options") or {}
    rec = box.record_build(build_id, shape=req["shape"], customer=req["customer"], state="queued",
                           argv=req["argv"][:8], submitted=time.time(),
                           **{k: options[k] for k in ("image", "repo", "rev") if options.get(k)})
    cancel = box.cancels[build_id]

    finish = _finisher(box, client, build_id, rec)
    try:
        if shape is None:
            await _tell(client, "error", code="not_found", fatal=False, ref=req["request_id"],
                        message=f"unknown shape {req['shape']!r}: this box offers "
                                f"{', '.join(box.config.shapes)}")
            await finish(-1, 0, "no_capacity", f"unknown shape {req['shape']!r}", permanent=True)
            return
        try:
            inputs = await resolve_inputs(box, options, rec, (build_id, client.lease) if hasattr(client, "lease")
                                          else None)
        except BadInput as exc:
            await finish(-1, 0, "spawn_failed", str(exc), permanent=exc.permanent)
            return
        try:
            await _take_and_run(box, client, build_id, req, shape, cancel, rec, finish, inputs)
        finally:
            inputs.release(box)
    finally:
        box.cancels.pop(build_id, None)


async def resume_build(box, rt, client, facts, adopted) -> None:
    """A build a previous box daemon started, on the cell this one adopted (hived/box/adopt.py):
    the same loop as run_build's, from the offsets the cell record kept. `adopted`: the cell's
    `cell.adopted`; its output from facts.cell_next on and its exit (if it ended) follow."""
    shape = box.config.shapes[facts.shape]
    rec = box.record_build(facts.id, shape=facts.shape, customer=facts.customer, state="running", adopted=True,
                           cell=rt.cell.id, origin=rt.origin)
    cancel = box.cancels.setdefault(facts.id, asyncio.Event())

    finish = _finisher(box, client, facts.id, rec)
    req = {"timeout_s": facts.timeout_s, "request_id": "", "options": {}}
    try:
        await _run_on_cell(box, rt, client, facts.id, req, shape, cancel, rec, finish, BuildInputs(),
                           resume=(facts, adopted))
    finally:
        box.cancels.pop(facts.id, None)
        await _settled(box, client)
        await box.destroy(rt, "build over")


async def _settled(box, client) -> None:
    """Wait (a little) until the build's end is stored where it goes: a box that dies now
    still has the cell, which tells the next daemon everything again."""
    settled = getattr(client, "settled", None)
    if settled is not None and not box.stopping:
        await settled(SETTLE_S)


async def _take_and_run(box, client, build_id, req, shape, cancel, rec, finish, inputs) -> None:
    pool = box.pool_for(shape, inputs.image)
    try:
        rt = await _take_cell(pool, cancel, box.config.queue_timeout_s)
    except (TimeoutError, BootFailed) as exc:
        why = str(exc) or f"no warm cell of shape {shape.name} within {box.config.queue_timeout_s:g} s"
        await finish(-1, 0, "no_capacity", why)
        return
    if rt is None:
        await finish(-1, 0, "cancelled", "cancelled while waiting for a cell")
        return
    try:
        await _run_on_cell(box, rt, client, build_id, req, shape, cancel, rec, finish, inputs)
    finally:
        await _settled(box, client)
        await box.destroy(rt, "build over")


# usage keys of the cell's exit -> the build record's `guest_start` (ms; premade 1/0)
GUEST_START_STAGES = {"spawn_s": "spawn_ms", "spawn_wait_s": "wait_premade_ms", "spawn_crun_s": "crun_ms",
                      "spawn_premade": "premade"}


def _cut_message(kept: int, cut: int, shape) -> str:
    return (f"output cut after {kept} bytes: the build wrote more than the output limit of {shape.output_limit} "
            f"bytes of shape {shape.name}; {cut} more byte(s) read and not kept, the build was stopped")


async def _take_cell(pool, cancel: asyncio.Event, timeout: float):
    getter = asyncio.ensure_future(pool.get(timeout))
    canceller = asyncio.ensure_future(cancel.wait())
    try:
        done, _ = await asyncio.wait({getter, canceller}, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            return getter.result()
        getter.cancel()
        try:
            await getter
        except (asyncio.CancelledError, TimeoutError, BootFailed):
            pass
        return None
    finally:
        canceller.cancel()


async def _run_on_cell(box, rt, client, build_id, req, shape, cancel, rec, finish, inputs, resume=None) -> None:
    cell = rt.cell
    loop = asyncio.get_running_loop()
    t_assigned = time.monotonic()
    network = (req.get("options") or {}).get("secure_compute") or ""
    lost = None
    removing = None  # a plain build's cell loses its pre-started WireGuard interface (hived/box/prestart.py)
    if not network and resume is None and rt.wg_prestarted is not None:
        removing = asyncio.ensure_future(prestart.remove(rt))
    if resume is not None:
        facts, adopted = resume
    elif not (rt.channel and rt.channel.is_open) or rt.vmm_status is not None:
        await finish(-1, 0, "cell_failed", f"cell {cell.id} died while warm: {cell.reason}")
        return
    else:
        cell.transition(CellState.ASSIGNED)
        cell.build_id = build_id
        rec.update(state="assigned", cell=cell.id, origin=rt.origin, cell_premade=rt.premade)
        await _tell(client, "build.accepted", request_id=req["request_id"], build_id=build_id, cell_id=cell.id)
        facts = BuildFacts(build_id, "control" if hasattr(client, "lease") else "client",
                           lease=getattr(client, "lease", 0), shape=shape.name, customer=rec.get("customer", ""),
                           timeout_s=req["timeout_s"], assigned_at=time.time(), secure=bool(network))
    rt.facts = facts
    if network and resume is None:
        if not hasattr(client, "open_tunnel"):
            await finish(-1, 0, "secure_compute", "Secure Compute builds come through the hive's control plane "
                                                  "(its key exchange service), not a box's local socket")
            return
        try:
            rt.tunnel = await CellTunnel.open(box, cell.id, network, client, prestarted=prestart.take(rt))
        except SecureComputeFailed as exc:
            cell.transition(CellState.FAILED, "no tunnel")
            await finish(-1, 0, "secure_compute", str(exc))
            return
        box.metrics.secure_interfaces.labels("prestarted" if rt.tunnel.prestarted else "started").inc()
        rec.update(secure_ms={k: round(v, 2) for k, v in rt.tunnel.timings.items()},
                   tunnel={"network": network, "interface": rt.tunnel.iface.name, "address": rt.tunnel.address,
                           "public_key": base64.b64encode(rt.tunnel.public_key).decode(),
                           "prestarted": rt.tunnel.prestarted, "netlink_ms": rt.tunnel.netlink_ms})
        lost = client.tunnel_lost()
    bucket = TokenBucket(shape.output_bytes_s, 1.0, loop.time(), shape.output_bytes_s)
    # Where the output stands: from the cell record when resuming (what was made safe before).
    received = facts.received
    per_stream = {1: facts.stream_bytes[0], 2: facts.stream_bytes[1]}
    cell_seq = facts.cell_next  # the next output seq the cell must send
    late: set[int] = set()  # seqs skipped so far: an older cell may send another stream's chunk late
    out_seq = facts.control_next  # ours, to the client: output and gaps in one sequence
    safe_via_client = hasattr(client, "lease")  # the control link says when output is stored

    def made_safe(point: dict) -> None:
        """Output up to this point is stored where it goes: the cell may forget it, and a daemon
        that starts again resumes from here (the cell record)."""
        if point["cell_next"] <= facts.cell_next:
            return
        facts.cell_next, facts.control_next = point["cell_next"], point["control_next"]
        facts.received, facts.stream_bytes = point["received"], point["stream_bytes"]
        box.save_cell(rt)
        if rt.channel is not None and rt.channel.is_open:
            with contextlib.suppress(ChannelClosed, ProtocolError, OSError):
                rt.channel.send_nowait("output.ack", build_id=build_id, seq=facts.cell_next)

    if safe_via_client:
        client.on_safe(made_safe)

    async def relay(name: str, safe: dict | None = None, **fields) -> None:
        nonlocal out_seq
        if safe is not None and safe_via_client:
            await _tell(client, name, build_id=build_id, seq=out_seq, safe=safe, **fields)
        else:
            await _tell(client, name, build_id=build_id, seq=out_seq, **fields)
            if safe is not None:
                made_safe(dict(safe, control_next=out_seq + 1))
        out_seq += 1

    async def gap(stream: int, nbytes: int, reason: str, message: str) -> None:
        """Nothing is dropped silently: a cut or a hole is a marker in the log, saying why."""
        log.info("build %s: output gap (%s): %s", build_id, reason, message)
        box.metrics.output_gaps.labels(reason).inc()
        await relay("output.gap", stream=stream, bytes=nbytes, reason=reason, message=message[:512])
    deadline = None
    if req["timeout_s"] > 0:
        deadline = loop.time() + req["timeout_s"] + GRACE_S
    # The cell daemon reports `started` as soon as it has spawned the build: a cell that stays
    # silent after `run` is broken or hostile, whatever the build's own timeout.
    start_deadline = loop.time() + box.config.boot_timeout_s
    cancel_sent = False
    recv, rt.first_recv = rt.first_recv, None  # the warm cell's pending read (cell.ready), if still waiting
    if resume is not None:
        if facts.timeout_s > 0:  # the build's own clock started when it was assigned
            deadline = loop.time() + facts.timeout_s + GRACE_S - (time.time() - facts.assigned_at)
        if adopted["state"] != "warm":
            if cell.state is CellState.ASSIGNED:
                cell.transition(CellState.RUNNING)
            if not facts.started:
                facts.started = True
                await _tell(client, "build.accepted", request_id="", build_id=build_id, cell_id=cell.id)
            box.save_cell(rt, "running")
    cwd = req.get("cwd") or "/work"
    source_fs = ""
    if inputs.checkout is not None:
        try:  # microvm has no hotplug: the checkout goes into the slot the cell booted with
            copy_ms = await asyncio.to_thread(rt.driver.fill_source, inputs.checkout.path)
        except (OSError, VmmError) as exc:
            cell.transition(CellState.FAILED, str(exc))
            await finish(-1, 0, "spawn_failed", f"cannot give the checkout to cell {cell.id}: {exc}")
            return
        rec.update(source_copy_ms=round(copy_ms, 2))
        source_fs = inputs.checkout.fs_type
        if cwd == "/work":
            cwd = WORKSPACE  # the checkout does not hide the build's home
    image = inputs.image
    if removing is not None:  # a plain build never has a WireGuard interface: gone before `run`
        rec.update(prestart_removed_ms=round(await removing, 2))
    try:
        if resume is None:
            await rt.channel.send("run", build_id=build_id, argv=req["argv"], env=req["env"],
                                  cwd=cwd, timeout_s=req["timeout_s"],
                                  limits={"output_bytes": shape.output_limit},
                                  image=image.digest if image else "", image_fs=image.fs_type if image else "",
                                  image_env=list(image.config.env) if image else [], source_fs=source_fs)
            rec.update(run_sent_ms=(time.monotonic() - t_assigned) * 1000)
            box.save_cell(rt, "assigned")
        while True:
            recv = recv or asyncio.ensure_future(rt.channel.recv())
            waiters = {recv}
            if lost is not None:
                waiters.add(lost)
            if not cancel_sent:
                waiters.add(asyncio.ensure_future(cancel.wait()))
            ends = [d for d in (deadline, start_deadline if cell.state is CellState.ASSIGNED else None) if d]
            timeout = max(0.0, min(ends) - loop.time()) if ends else None
            done, pending = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            for w in pending:
                if w is not recv and w is not lost:
                    w.cancel()
            if lost is not None and lost in done:
                why = f"Secure Compute tunnel lost: {lost.result()}"
                cell.transition(CellState.FAILED, why)
                await finish(-1, 0, "secure_compute", why)
                return
            if not done:
                if cell.state is CellState.ASSIGNED and loop.time() >= start_deadline:
                    raise CellBroke(f"cell did not start the build within {box.config.boot_timeout_s:g} s of `run`")
                if deadline is None or loop.time() < deadline:
                    continue
                raise CellBroke(f"build ran {GRACE_S:g} s past its timeout of {req['timeout_s']:g} s "
                                "and the cell did not stop it")
            if recv not in done:
                cancel_sent = True
                await rt.channel.send("cancel", build_id=build_id, reason="cancelled by the client")
                deadline = loop.time() + GRACE_S
                continue
            msg, recv = recv.result(), None
            if msg.get("build_id", build_id) != build_id:
                raise CellBroke(f"cell sent {msg.name} for build {msg['build_id']!r}, not {build_id}")
            if msg.name == "started":
                if cell.state is not CellState.ASSIGNED:
                    raise CellBroke("cell sent started twice")
                cell.transition(CellState.RUNNING)
                warm_start_s = time.monotonic() - t_assigned
                rec.update(state="running", warm_start_ms=warm_start_s * 1000, started=time.time())
                box.metrics.warm_start_seconds.labels(shape.name).observe(warm_start_s)
                facts.started = True
                box.save_cell(rt, "running")
            elif msg.name == "output":
                if cell.state is not CellState.RUNNING:
                    raise CellBroke("cell sent output before started")
                seq = msg["seq"]
                if seq < cell_seq:  # each stream is in order by itself: relay a late one as it comes
                    if seq not in late:
                        raise CellBroke(f"cell sent output seq {seq} twice")
                    late.discard(seq)
                else:
                    if seq - cell_seq > 4096:
                        raise CellBroke(f"cell skipped from output seq {cell_seq} to {seq}")
                    late.update(range(cell_seq, seq))
                    cell_seq = seq + 1
                data, stream = msg["data"], msg["stream"]
                n = len(data)
                if received + n > shape.output_limit:  # the cell cuts at the limit itself: a backstop
                    keep = shape.output_limit - received
                    if keep:
                        await relay("output", stream=stream, data=data[:keep])
                    received += keep
                    rec.update(output_bytes=received)
                    await gap(stream, n - keep, "output_limit", _cut_message(received, n - keep, shape))
                    cell.transition(CellState.FINISHED, "output limit")
                    await finish(-1, 9, "output_limit", f"build wrote more than {shape.output_limit} "
                                 f"bytes; cell {cell.id} destroyed")
                    return
                received += n
                per_stream[stream] += n
                wait = bucket.wait_time(n, loop.time())
                if wait > 0:
                    await asyncio.sleep(wait)  # not reading meanwhile: back-pressure to the guest
                bucket.consume(min(n, bucket.size), loop.time())
                box.metrics.output_bytes.inc(n)
                # Once this chunk is safe, so is everything the cell sent before it (unless a
                # chunk is late: then the cell keeps it all until the build's end).
                safe = None if late else {"cell_next": cell_seq, "received": received,
                                          "stream_bytes": (per_stream[1], per_stream[2])}
                await relay("output", stream=stream, data=data, safe=safe)
            elif msg.name == "exit":
                if cell.state is CellState.ASSIGNED:  # spawn failed: it never started
                    cell.transition(CellState.RUNNING)
                cell.transition(CellState.FINISHED, msg["reason"])
                rec.update(output_bytes=received)
                usage = msg["usage"]
                # The guest's side of the start (hived/cell/agent.py): run received -> started sent,
                # of it waiting for the pre-made container and crun; premade 1 if the build got one.
                guest = {name: round(usage[key] * (1 if name == "premade" else 1000), 2)
                         for key, name in GUEST_START_STAGES.items() if key in usage}
                if guest:
                    rec.update(guest_start=guest)
                if late:
                    await gap(0, -1, "sequence", f"{len(late)} chunk(s) of output from cell {cell.id} never "
                              "arrived")
                for stream, key in ((1, "stdout_bytes"), (2, "stderr_bytes")):
                    missing = int(usage.get(key, per_stream[stream])) - per_stream[stream]
                    if missing > 0:
                        await gap(stream, missing, "sequence", f"{missing} bytes of {key[:6]} sent by cell "
                                  f"{cell.id} never reached the box")
                cut = int(usage.get("output_cut_bytes", 0))
                if msg["reason"] == "output_limit" or cut:
                    await gap(0, cut, "output_limit", _cut_message(received, cut, shape))
                if usage.get("output_undrained"):
                    await gap(0, -1, "not_drained", "the build's output pipes stayed open and still after it "
                              "ended; what was left in them is not here")
                await finish(msg["code"], msg["signal"], msg["reason"], msg["message"], msg["usage"])
                return
            elif msg.name == "error":
                log.warning("cell %s says %s: %s", cell.id, msg["code"], msg["message"])
            elif msg.name == "cell.ready":  # its container was still being made when the build came
                if rt.premade is not None:
                    raise CellBroke("cell sent cell.ready twice")
                box.cell_ready(rt, msg)
            elif msg.name == "ping":
                await rt.channel.send("pong", seq=msg["seq"])
            else:
                raise CellBroke(f"cell sent unexpected {msg.name} during a build")
    except (ChannelClosed, CellBroke) as exc:
        if isinstance(exc, ChannelClosed):
            try:  # the VMM usually exits with the channel: give its status a moment to arrive
                await asyncio.wait_for(asyncio.shield(rt.watcher), 1.0)
            except (TimeoutError, asyncio.CancelledError):
                pass
            vmm = f"VMM exited with status {rt.vmm_status}" if rt.vmm_status is not None else "VMM still up"
            why = f"cell {cell.id} failed during the build: {exc} ({vmm}); " \
                  f"console: {rt.driver.console_tail(6) or '(empty)'}"
        else:
            why = f"cell {cell.id} failed during the build: {exc}"
        log.warning("%s", why)
        box.metrics.cell_failures.labels("build").inc()
        cell.transition(CellState.FAILED, why)
        reason = "timeout" if "past its timeout" in str(exc) else "cell_failed"
        await finish(-1, 0, reason, why)
    finally:
        if recv is not None:
            recv.cancel()
