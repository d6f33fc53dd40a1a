"""Box configuration (TOML): totals, shapes, pools. Every error names the key and the fix."""

import hashlib
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from hived import tomlfile
from hived.configspec import Key, boolean, choice, integer, number, read_table, string, strings


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class Shape:
    name: str
    vcpus: int = 1
    memory_mib: int = 512
    scratch_mib: int = 2048
    pool_target: int = 1
    disk_bytes_s: int = 0
    disk_iops: int = 0
    output_bytes_s: int = 32 << 20   # host-side pacing of a cell's output
    output_limit: int = 1 << 30      # a build writing more than this is stopped
    net_in_bits_s: int = 0           # host -> guest; 0: no network limit
    net_out_bits_s: int = 0          # guest -> host


@dataclass(frozen=True)
class BoxConfig:
    name: str
    state_dir: Path
    image_dir: Path
    shapes: dict[str, Shape]
    boot_concurrency: int = 2
    boot_timeout_s: float = 120.0
    vmm_overhead_mib: int = 256
    metrics_addr: str = "127.0.0.1"
    metrics_port: int = 0            # 0: pick a free port (written to endpoints.json)
    queue_timeout_s: float = 300.0   # a build waits this long for a warm cell
    accelerator: str = ""            # "", "kvm" or "tcg": "" means the KVM probe decides
    reserved_cores: int = 1          # host cores kept for the box daemon (the first N)
    memory_mib: int = 0              # memory the cells may use; 0: host RAM - 1 GiB
    disk_bytes_s: int = 0            # the box's disk bandwidth to share out; 0: not partitioned
    net_bits_s: int = 0              # the box's network bandwidth to share out; 0: not partitioned
    overcommit: bool = False         # allow cells to share cores / exceed memory
    cells_cpu_weight: int = 1        # cells' CPU weight against the daemon's (cgroup v2 units; 100: equal)
    adopt_cells: bool = True         # a daemon that starts again adopts the cells left running (hived/box/adopt.py)
    vmm_uid_base: int = 0            # VMMs run as uid base+slot; 0: as root (no confinement)
    network: bool = True             # each cell gets a netns, a tap and a NIC (hived/box/network.py)
    net_subnet: str = "10.213.0.0/16"
    net_uplink: str = ""             # host interface cells' egress leaves by; "": no egress
    net_deny: tuple = ()             # extra destinations cells may not reach (the control plane)
    oci_dir: Path = Path("/var/lib/hived/oci")      # build image cache (hived/oci)
    oci_max_mib: int = 20480
    oci_insecure: tuple = ()         # registries (host[:port]) pulled over plain HTTP
    repos_dir: Path = Path("/var/lib/hived/repos")  # repository cache (hived/repos)
    repos_max_mib: int = 20480
    repo_protocols: tuple = ("https", "ssh", "git")
    source_slot_mib: int = 1024      # each cell's sparse source slot; a checkout image must fit
    image_pool_target: int = 1       # warm cells kept per (shape, build image) once a build used it
    peer_listen: str = ""            # "HOST:PORT" the peer link is served on (box peers); "": not served
    peer_advertise: str = ""         # "HOST:PORT" other boxes dial; "": peer_listen (with its real port)
    peer_serve_bytes_s: int = 100 << 20  # all peer serving together, at most this (token bucket); 0: no limit
    peer_fetch: bool = True          # ask the hive's other boxes for build images before the registry
    registry_credentials: tuple = field(default=(), repr=False)  # hived/oci/credentials.py (passwords: not in repr)
    templates: bool = True           # fill warm pools by restoring clones of a template (hived/box/templates.py)
    template_max_age_s: float = 3600.0  # a template is replaced after this long (0: no limit)
    template_max_clones: int = 500   # ... or after this many clones (0: no limit)
    template_hugepages: bool = False  # template guest RAM on huge pages (vm.nr_hugepages reserved; templates.py)
    secure_prestart: bool = False    # this box serves Secure Compute: each warm cell gets its WireGuard
    #                                  interface (no keys) pre-started (hived/box/prestart.py)
    # [box] cgroup_parent: "auto" (hived/box/placement.py decides) or the cells' parent cgroup,
    # an absolute path below the cgroup root
    cgroup_placement: str = "auto"
    extra: dict = field(default_factory=dict)

    @property
    def client_socket(self) -> Path:
        return self.state_dir / "box.sock"

    @property
    def cells_dir(self) -> Path:
        return self.state_dir / "cells"

    @property
    def cgroup_parent(self) -> str:
        """The cells' parent below the cgroup root, unless systemd delegated the daemon a subtree
        (then hived/box/placement.py puts them in it: the daemon's `cgroups.parent` says where)."""
        if self.cgroup_placement != "auto":
            return self.cgroup_placement.strip("/")
        return f"hived/{self.name}"


SHAPE_INTS = ("vcpus", "memory_mib", "scratch_mib", "pool_target", "disk_bytes_s", "disk_iops",
              "output_bytes_s", "output_limit", "net_in_bits_s", "net_out_bits_s")
MINIMUM = {"vcpus": 1, "memory_mib": 128, "scratch_mib": 64}


def _int(where: str, value, minimum: int = 0) -> int:
    return integer(minimum)(where, value, ConfigError)


ADDR_RE = re.compile(r"^(|[^\s]+:\d{1,5})$")  # box peers: "" or HOST:PORT
# "auto", or an absolute cgroup path: no empty, "." or ".." parts, nothing starting with "."
# (systemd's own .control), only characters a unit or cgroup name uses
CGROUP_PARENT_RE = re.compile(r"^(auto|(/[A-Za-z0-9_@:+\-][A-Za-z0-9_.@:+\-]*)+)$")

# The [box] table, key by key: default and check (hived/configspec.py). None: computed below.
BOX_KEYS = {
    "name": Key(None, string(), "default: the host name"),
    "state_dir": Key("/var/lib/hived/box", string()),
    "image_dir": Key(None, string(), "default: $HIVED_IMAGE_DIR or /var/lib/hived/images"),
    "boot_concurrency": Key(2, integer(1)),
    "boot_timeout_s": Key(120.0, number(0.1)),
    "vmm_overhead_mib": Key(256, integer(0)),
    "metrics_addr": Key("127.0.0.1", string()),
    "metrics_port": Key(0, integer(0)),
    "queue_timeout_s": Key(300.0, number(0.0)),
    "accelerator": Key("", choice("", "kvm", "tcg"), "absent: the KVM probe decides"),
    "reserved_cores": Key(1, integer(0)),
    "memory_mib": Key(0, integer(0)),
    "disk_bytes_s": Key(0, integer(0)),
    "net_bits_s": Key(0, integer(0)),
    "overcommit": Key(False, boolean()),
    "cells_cpu_weight": Key(1, integer(1, 10000), "1-10000 (cgroup v2 cpu.weight; 100 = the daemon's)"),
    "adopt_cells": Key(True, boolean(), "false: a daemon that starts again destroys what it finds"),
    "vmm_uid_base": Key(0, integer(0)),
    "network": Key(True, boolean()),
    "net_subnet": Key("10.213.0.0/16", string()),
    "net_uplink": Key("", string()),
    "net_deny": Key((), strings()),
    "oci_dir": Key("/var/lib/hived/oci", string()),
    "oci_max_mib": Key(20480, integer(64)),
    "oci_insecure": Key((), strings()),
    "repos_dir": Key("/var/lib/hived/repos", string()),
    "repos_max_mib": Key(20480, integer(64)),
    "repo_protocols": Key(("https", "ssh", "git"), strings()),
    "source_slot_mib": Key(1024, integer(0)),
    "image_pool_target": Key(1, integer(0)),
    "peer_listen": Key("", string(ADDR_RE, '"HOST:PORT" (port 0: any free port) or ""')),
    "peer_advertise": Key("", string(ADDR_RE, '"HOST:PORT" or ""')),
    "peer_serve_bytes_s": Key(100 << 20, integer(0)),
    "peer_fetch": Key(True, boolean()),
    "templates": Key(True, boolean()),
    "template_max_age_s": Key(3600.0, number(0.0)),
    "template_max_clones": Key(500, integer(0)),
    "template_hugepages": Key(False, boolean(), "true: template memory on huge pages (needs vm.nr_hugepages)"),
    "secure_prestart": Key(False, boolean(), "true: pre-start each warm cell's WireGuard interface (boxes "
                           "serving Secure Compute)"),
    "cgroup_parent": Key("auto", string(CGROUP_PARENT_RE, '"auto" or an absolute cgroup path such as '
                                        '"/hived/box1" (below the cgroup root, no "." or ".." parts)')),
}


def parse(data: dict, source: str = "<config>") -> BoxConfig:
    box = read_table(data.get("box", {}), BOX_KEYS, f"{source}: box", ConfigError)
    shapes = {}
    for name, raw in data.get("shapes", {}).items():
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: shapes.{name}: expected a table")
        kw = {}
        for key, value in raw.items():
            if key not in SHAPE_INTS:
                raise ConfigError(f"{source}: shapes.{name}.{key}: unknown key "
                                  f"(known: {', '.join(SHAPE_INTS)})")
            kw[key] = _int(f"{source}: shapes.{name}.{key}", value, MINIMUM.get(key, 0))
        shapes[name] = Shape(name=name, **kw)
    if not shapes:
        raise ConfigError(f"{source}: no [shapes.NAME] table: a box needs at least one shape")
    if box["secure_prestart"] and not box["network"]:
        raise ConfigError(f"{source}: box.secure_prestart: pre-started WireGuard interfaces live in the cells' "
                          "network namespaces: set network = true, or secure_prestart = false")
    if box["template_hugepages"] and not box["templates"]:
        raise ConfigError(f"{source}: box.template_hugepages: huge pages back template memory: set "
                          "templates = true, or template_hugepages = false")
    name = box["name"] or socket.gethostname().split(".")[0] or "box"
    extra = {}
    creds = ()
    if "registry_credentials" in data:  # build image pulls (hived/oci/credentials.py)
        from hived.oci.credentials import CredentialsError
        from hived.oci.credentials import parse as parse_credentials

        try:
            creds = parse_credentials(data["registry_credentials"], source)
        except CredentialsError as exc:
            raise ConfigError(str(exc)) from None
    if "control" in data:  # the link to the hive's control plane (hived/box/controllink.py)
        from hived.box.controllink import LinkConfig, LinkConfigError

        if not isinstance(data["control"], dict):
            raise ConfigError(f"{source}: control: expected a [control] table (address, token_file, ...)")
        try:
            extra["control"] = LinkConfig.from_table(data["control"], box_name=name,
                                                     source=f"{source}: control")
        except LinkConfigError as exc:
            raise ConfigError(str(exc)) from None
    paths = ("state_dir", "oci_dir", "repos_dir")
    return BoxConfig(
        **{k: v for k, v in box.items() if k not in ("name", "image_dir", "cgroup_parent", *paths)},
        cgroup_placement=box["cgroup_parent"],
        **{k: Path(box[k]) for k in paths},
        name=name,
        image_dir=Path(box["image_dir"] or os.environ.get("HIVED_IMAGE_DIR", "/var/lib/hived/images")),
        shapes=shapes,
        registry_credentials=creds,
        extra=extra,
    )


def load(path: Path) -> BoxConfig:
    return parse(tomlfile.read(path, ConfigError), str(path))


def embedded(home: Path, pool_target: int = 1) -> BoxConfig:
    """`hived up`'s box: one small shape, a small warm pool, state under `home`."""
    # Named after its home, so two `hived up` on one machine never share cgroups.
    name = "up-" + hashlib.sha1(str(home.resolve()).encode()).hexdigest()[:8]
    # A small machine (2 cores, like a laptop or a CI runner) cannot give every cell
    # dedicated cores and keep one for the daemon: the embedded box says so and shares.
    small = (os.cpu_count() or 1) <= 2
    return parse(
        {
            "box": {"name": name, "state_dir": str(home / "state"), "overcommit": small,
                    "reserved_cores": 0 if small else 1, "vmm_uid_base": 3_100_000,
                    # no peer_listen: the peer link is TLS with hive certificates, which `hived up`
                    # does not make (its box link is plain TCP on loopback)
                    "oci_dir": str(home / "oci"), "repos_dir": str(home / "repos")},
            "shapes": {"small": {"vcpus": 1, "memory_mib": 512, "scratch_mib": 1024,
                                 "pool_target": pool_target}},
        },
        "embedded defaults",
    )
