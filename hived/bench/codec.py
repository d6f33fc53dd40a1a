"""`hived bench codec`: frame encode/decode, compiled framing (hived._framing) against its
pure-Python twin (hived.protocol.framing_py), interleaved rounds in one run."""

import dataclasses
import gc
import random
import time
from collections.abc import Callable

from hived.bench.common import BenchError, _loadavg, _r, machine_info, percentile, progress

IMPLS = {"cython": "hived._framing", "python": "hived.protocol.framing_py"}
CHUNK = 64 << 10          # bytes per read for the stream workload
STREAM_TARGET = 1 << 20   # about this many bytes of frames per stream pass


def _load_impls() -> dict:
    import importlib

    mods = {}
    for name, module in IMPLS.items():
        try:
            mods[name] = importlib.import_module(module)
        except ImportError as exc:
            raise BenchError(f"cannot import {module} ({exc}): build the native modules with "
                             "`pip install -e .`") from None
    if mods["cython"].__name__ != "hived._framing" or not mods["cython"].__file__.endswith((".so", ".pyd")):
        raise BenchError("hived._framing is not the compiled module: rebuild with `pip install -e .`")
    return mods


def _workloads() -> dict[str, dict]:
    """name -> {"messages": [(message name, fields), ...], "chunked": bool, "about": str}."""
    rnd = random.Random(1234)
    build_id = "b" + "0123456789ab"

    def output(size: int, seq: int) -> tuple[str, dict]:
        fields = {"build_id": build_id, "stream": 1 + seq % 2, "seq": seq, "data": rnd.randbytes(size)}
        return "output", fields

    ping = [("ping", {"seq": 1_000_000 + i}) for i in range(1000)]
    out4k = [output(4096, i) for i in range(100)]
    out64k = [output(65536, i) for i in range(10)]
    # A build's stream as the box sees it: mostly short lines and pipe-sized chunks,
    # some full 64 KiB reads, pings in between; read 64 KiB at a time, so frames
    # straddle reads and the decoder has to buffer.
    cycle: list[tuple[str, dict]] = []
    seq = 0
    while True:
        for kind in ("ping", 256, 256, 4096, 256, 65536, 4096, "ping", 256, 4096, 256, 256):
            if kind == "ping":
                cycle.append(("ping", {"seq": seq}))
            else:
                cycle.append(output(kind, seq))
            seq += 1
        if sum(len(f.get("data", b"")) for _, f in cycle) >= STREAM_TARGET:
            break
    return {
        "ping": {"messages": ping, "chunked": False,
                 "about": "ping control frames (~10 bytes), one frame per read"},
        "output_4k": {"messages": out4k, "chunked": False,
                      "about": "output frames with 4 KiB data, one frame per read"},
        "output_64k": {"messages": out64k, "chunked": False,
                       "about": "output frames with 64 KiB data, one frame per read"},
        "stream_64k_chunks": {"messages": cycle, "chunked": True,
                              "about": "mixed stream (ping, output 256 B/4 KiB/64 KiB) of ~1 MiB, "
                                       "fed to FrameDecoder in 64 KiB reads"},
    }


@dataclasses.dataclass
class _Case:
    key: str                       # "encode/ping"
    frames: int                    # frames per op
    nbytes: int                    # wire bytes (header + body) per op
    ops: dict[str, Callable[[], object]]  # impl -> op


def _chunks(data: bytes, size: int = CHUNK) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def _codec_cases(mods: dict) -> tuple[list[_Case], dict]:
    from hived.protocol import codec

    max_frame = codec.MAX_FRAME
    encode, decode = codec.encode, codec.decode
    cases: list[_Case] = []
    about = {}
    for wname, w in _workloads().items():
        msgs = w["messages"]
        bodies = [encode(name, **fields) for name, fields in msgs]
        ref = {impl: [m.pack_frame(b, max_frame) for b in bodies] for impl, m in mods.items()}
        if ref["cython"] != ref["python"]:
            raise BenchError(f"{wname}: the two pack_frame implementations disagree: run the test-suite")
        frames = ref["python"]
        wire = b"".join(frames)
        reads = _chunks(wire) if w["chunked"] else frames
        for impl, m in mods.items():  # both must split the reads back into the same bodies
            dec = m.FrameDecoder(max_frame)
            got = [b for r in reads for b in dec.feed(r)]
            if got != bodies or dec.buffered:
                raise BenchError(f"{wname}: {IMPLS[impl]}.FrameDecoder does not round-trip: "
                                 "run the test-suite")
        for name, fields in msgs[:20]:
            if decode(encode(name, **fields)).fields.get("seq") != fields.get("seq"):
                raise BenchError(f"{wname}: codec does not round-trip")
        n, nbytes = len(msgs), len(wire)
        about[wname] = {"about": w["about"], "frames_per_op": n, "bytes_per_op": nbytes,
                        "reads_per_op": len(reads)}

        def make_encode(m, msgs=msgs):
            pack = m.pack_frame

            def op():
                for name, fields in msgs:
                    pack(encode(name, **fields), max_frame)
            return op

        def make_decode(m, reads=reads):
            dec = m.FrameDecoder(max_frame)
            feed = dec.feed

            def op():
                for r in reads:
                    for body in feed(r):
                        decode(body)
            return op

        def make_framing(m, bodies=bodies, reads=reads, chunked=w["chunked"]):
            dec = m.FrameDecoder(max_frame)
            pack, feed = m.pack_frame, dec.feed

            if chunked:
                def op():  # the sender packs every body; the receiver splits 64 KiB reads
                    for b in bodies:
                        pack(b, max_frame)
                    for r in reads:
                        feed(r)
            else:
                def op():  # pack a body, and split the frame it made
                    for b in bodies:
                        feed(pack(b, max_frame))
            return op

        for mode, make in (("encode", make_encode), ("decode", make_decode), ("framing_only", make_framing)):
            cases.append(_Case(f"{mode}/{wname}", n, nbytes, {impl: make(m) for impl, m in mods.items()}))
    return cases, about


def _time_ops(op: Callable[[], object], count: int) -> float:
    gc.collect()
    t0 = time.perf_counter()
    for _ in range(count):
        op()
    return time.perf_counter() - t0


def run_codec(seconds: float = 30.0, rounds: int = 7) -> dict:
    if seconds <= 0:
        raise BenchError(f"--seconds must be > 0, got {seconds:g}")
    if rounds < 1:
        raise BenchError(f"--rounds must be >= 1, got {rounds}")
    import msgpack

    mods = _load_impls()
    started = time.monotonic()
    machine = machine_info()
    cases, about = _codec_cases(mods)
    impls = list(IMPLS)
    sample_s = seconds / (len(cases) * len(impls) * rounds)

    # Calibrate: ops per sample so each sample lasts about sample_s (also warms up).
    counts: dict[tuple[str, str], int] = {}
    for case in cases:
        for impl in impls:
            op = case.ops[impl]
            op()
            n, t = 1, _time_ops(op, 1)
            while t < min(sample_s, 0.01) and n < 1 << 20:
                n *= 2
                t = _time_ops(op, n)
            counts[case.key, impl] = max(1, round(n * sample_s / max(t, 1e-9)))
    progress(f"[codec] {len(cases)} cases x {len(impls)} implementations x {rounds} rounds, "
             f"~{sample_s * 1000:.0f} ms per sample")

    fps: dict[tuple[str, str], list[float]] = {(c.key, i): [] for c in cases for i in impls}
    for r in range(rounds):
        order = impls if r % 2 == 0 else impls[::-1]  # alternate who goes first
        for case in cases:
            for impl in order:
                count = counts[case.key, impl]
                dt = _time_ops(case.ops[impl], count)
                fps[case.key, impl].append(count * case.frames / dt)
        progress(f"[codec] round {r + 1}/{rounds} done")

    results = {}
    for case in cases:
        entry: dict = {}
        for impl in impls:
            f = fps[case.key, impl]
            mb = [x * case.nbytes / case.frames / 1e6 for x in f]
            entry[impl] = {
                "frames_per_s_p50": _r(percentile(f, 50)),
                "frames_per_s_min": _r(min(f)),
                "frames_per_s_max": _r(max(f)),
                "mb_per_s_p50": _r(percentile(mb, 50), 2),
                "mb_per_s_min": _r(min(mb), 2),
                "mb_per_s_max": _r(max(mb), 2),
                "rounds": len(f),
                "ops_per_sample": counts[case.key, impl],
            }
        entry["speedup"] = round(entry["cython"]["frames_per_s_p50"] / entry["python"]["frames_per_s_p50"], 3)
        results[case.key] = entry
    return {
        "benchmark": "codec",
        "machine": dict(machine, loadavg_at_end=_loadavg(), msgpack=".".join(map(str, msgpack.version))),
        "config": {
            "seconds": seconds, "rounds": rounds, "sample_s": round(sample_s, 4),
            "chunk_bytes": CHUNK,
            "implementations": IMPLS,
            "baseline": "python",
            "speedup": "cython frames_per_s_p50 / python frames_per_s_p50 (same run, interleaved rounds)",
            "mb": "10^6 bytes of frames on the wire (4-byte header + body)",
            "modes": {
                "encode": "codec.encode (validate + msgpack) + pack_frame",
                "decode": "FrameDecoder.feed + codec.decode (msgpack + validate)",
                "framing_only": "pack_frame + FrameDecoder.feed, no msgpack: "
                                "the part the Cython module replaces",
            },
        },
        "workloads": about,
        "results": results,
        "elapsed_s": round(time.monotonic() - started, 1),
    }


def render_codec(report: dict) -> str:
    lines = [f"codec: compiled (cython) vs pure-Python framing, {report['config']['rounds']} interleaved "
             f"rounds, p50 [min..max]"]
    head = (f"{'case':<32} {'cython frames/s':>26} {'python frames/s':>26} {'cy MB/s':>9} {'py MB/s':>9} "
            f"{'x':>6}")
    lines += [head, "-" * len(head)]
    for key, e in report["results"].items():
        cy, py = e["cython"], e["python"]

        def fmt(d):
            return (f"{d['frames_per_s_p50']:>10,.0f} "
                    f"[{d['frames_per_s_min']:,.0f}..{d['frames_per_s_max']:,.0f}]")
        lines.append(f"{key:<32} {fmt(cy):>26} {fmt(py):>26} {cy['mb_per_s_p50']:>9.1f} "
                     f"{py['mb_per_s_p50']:>9.1f} {e['speedup']:>6.2f}")
    m = report["machine"]
    lines.append(f"machine: {m['nproc']} cpus ({m['cpu_model']}), python {m['python']}, "
                 f"load {m['loadavg_at_start']} -> {m['loadavg_at_end']}")
    return "\n".join(lines)

def parser(p):
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--seconds", type=float, default=30.0,
                   help="total measuring time, split over every sample (default %(default)g)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default %(default)d)")
    return p


def run(args) -> dict:
    return run_codec(args.seconds, args.rounds)


render = render_codec
