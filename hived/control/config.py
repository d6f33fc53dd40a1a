"""Control plane config (TOML): one hive, its shapes, customers, boxes and webhook repos.

    [hive]
    name = "eu1"                       # lower-case letters, digits, '-'; prefixes build ids
    state_dir = "/var/lib/hived/control/eu1"   # eu1.db (SQLite, WAL) lives here
    api_listen = "127.0.0.1:8080"      # HTTP API; port 0 picks a free one
    box_listen = "127.0.0.1:7070"      # boxes connect here (msgpack)
    heartbeat_s = 1.0                  # boxes heartbeat this often
    box_lost_s = 10.0                  # a box silent this long loses its builds
    max_body_bytes = 1048576           # larger request bodies get 413
    log_max_bytes = 8388608            # output kept per build; beyond, a truncation marker
    synchronous = "full"               # SQLite: full (durable across power loss) or normal
    database = ""                      # "": SQLite in state_dir; or "postgresql://USER@HOST[:PORT]/DB"
                                       # (no password in the URL; several control planes may share it)
    database_password_file = ""        # its password; else $HIVED_DATABASE_PASSWORD, $PGPASSWORD, ~/.pgpass
    tls_dir = ""                       # "": plain TCP; else the dir `hived control init` made
    require_box_certs = false          # with TLS: boxes must also show their certificate (CN = box id)

    [shapes.small]                     # the shapes this hive offers (keys are informational)
    [customers.acme]
    shapes = ["small"]                 # optional: what this customer may use (default: all)
    api_tokens_sha256 = ["<64 hex>"]   # SHA-256 of the customer's API tokens
    [[customers.acme.registry_credentials]]  # optional: build image pulls (sent with build.assign, not stored)
    registry = "registry.example"      # host[:port]; repository = "team/*" narrows it
    username = "puller"
    password_file = "/etc/hived/acme-registry.pass"
    [admin]
    api_tokens_sha256 = []             # tokens that may act for any customer
    [boxes.box-a]
    token_sha256 = "<64 hex>"          # or minted into the state file by `hived control add-box`
    [networks.acme-private]            # Secure Compute: a customer network behind a connector
    customer = "acme"                  # the customer whose builds may use it
    connector_tokens_sha256 = ["<64 hex>"]   # SHA-256 of the connector's token(s)
    tunnel_subnet = "100.96.0.0/24"    # tunnel addresses: the connector takes the first, cells the rest
    routes = ["10.50.0.0/24"]          # what cells reach through the connector (default 0.0.0.0/0)
    [repos."acme/web"]                 # GitHub push webhooks
    customer = "acme"
    secret = "..."                     # or secret_file = "/etc/hived/acme-web.secret"
    command = ["make", "test"]
    shape = "small"
    branches = ["main"]                # optional: only pushes to these
    url = "https://github.com/acme/web.git"  # optional: where boxes fetch it (default: the event's clone_url)
    image = "registry.example/ci:1"    # optional: build image its builds run in
    secure_compute = "acme-private"    # optional: its builds reach this network through a tunnel

Every error names the key and what was expected.
"""

import dataclasses
import ipaddress
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from hived import tomlfile
from hived.configspec import (
    REQUIRED,
    Key,
    address,
    boolean,
    choice,
    integer,
    number,
    read_table,
    sha256s,
    string,
    strings,
)

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


class ConfigError(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class Customer:
    name: str
    shapes: tuple[str, ...] | None = None       # None: every shape of the hive
    api_tokens_sha256: tuple[str, ...] = ()
    secure_networks: tuple[str, ...] = ()   # Secure Compute networks (from [networks.NAME] customer)
    registry_credentials: tuple = dataclasses.field(default=(), repr=False)  # hived.oci.credentials


@dataclasses.dataclass(frozen=True)
class SecureNetwork:
    """A customer network reached through a connector (Secure Compute)."""
    name: str
    customer: str
    connector_tokens_sha256: tuple[str, ...]
    tunnel_subnet: ipaddress.IPv4Network
    routes: tuple[str, ...] = ("0.0.0.0/0",)


@dataclasses.dataclass(frozen=True)
class Repo:
    name: str
    customer: str
    secret: bytes
    command: tuple[str, ...]
    shape: str
    branches: tuple[str, ...] | None = None
    env: dict = dataclasses.field(default_factory=dict)
    timeout_s: float = 0.0
    url: str = ""      # where boxes fetch it from; "": the push event's clone_url
    image: str = ""    # build image (OCI reference) its builds run in; "": the cell's own root
    secure_compute: str = ""  # Secure Compute network its builds reach ([networks.NAME] of its customer)


@dataclasses.dataclass(frozen=True)
class ControlConfig:
    hive: str
    state_dir: Path
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    box_host: str = "127.0.0.1"
    box_port: int = 7070
    heartbeat_s: float = 1.0
    box_lost_s: float = 10.0
    max_body_bytes: int = 1 << 20
    log_max_bytes: int = 8 << 20
    synchronous: str = "full"
    tls_dir: Path | None = None
    require_box_certs: bool = False
    shapes: dict = dataclasses.field(default_factory=dict)
    customers: dict = dataclasses.field(default_factory=dict)
    admin_tokens_sha256: tuple[str, ...] = ()
    box_tokens_sha256: dict = dataclasses.field(default_factory=dict)
    repos: dict = dataclasses.field(default_factory=dict)
    networks: dict = dataclasses.field(default_factory=dict)   # name -> SecureNetwork
    database: str = ""                        # "": SQLite at db_path; else a PostgreSQL URL
    database_password_file: Path | None = None

    def database_password(self) -> str | None:
        """The PostgreSQL password: from its file, else $HIVED_DATABASE_PASSWORD; None lets the
        driver look ($PGPASSWORD, ~/.pgpass). Never in the URL, argv or a log."""
        if self.database_password_file is not None:
            try:
                return self.database_password_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"hive.database_password_file: {exc}") from None
        return os.environ.get("HIVED_DATABASE_PASSWORD") or None

    @property
    def db_path(self) -> Path:
        return self.state_dir / f"{self.hive}.db"


def _num(where: str, value, lo: float) -> float:
    return number(lo)(where, value, ConfigError)


def _str(where: str, value) -> str:
    return string()(where, value, ConfigError)


def _strs(where: str, value) -> tuple[str, ...]:
    return strings()(where, value, ConfigError)


def _hashes(where: str, value) -> tuple[str, ...]:
    return sha256s()(where, value, ConfigError)


def _known(where: str, table: dict, keys: set) -> None:
    for key in table:
        if key not in keys:
            raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(sorted(keys))})")


# The [hive] table, key by key: default and check (hived/configspec.py).
HIVE_KEYS = {
    "name": Key(REQUIRED, string(NAME_RE, "lower-case letters, digits and '-' (at most 32)"),
                "the hive's name, e.g. name = \"eu1\""),
    "state_dir": Key("", string(), "default: /var/lib/hived/control/<name>"),
    "api_listen": Key(("127.0.0.1", 8080), address()),
    "box_listen": Key(("127.0.0.1", 7070), address()),
    "heartbeat_s": Key(1.0, number(0.01)),
    "box_lost_s": Key(10.0, number(0.05)),
    "max_body_bytes": Key(1 << 20, integer(1024)),
    "log_max_bytes": Key(8 << 20, integer(1024)),
    "synchronous": Key("full", choice("full", "normal")),
    "tls_dir": Key("", string()),
    "require_box_certs": Key(False, boolean()),
    "database": Key("", lambda where, value, error: check_database_url(where, value)),
    "database_password_file": Key("", string()),
}


def parse(data: dict, source: str = "<config>", base: Path | None = None) -> ControlConfig:
    _known(source, data, {"hive", "shapes", "customers", "admin", "boxes", "repos", "networks"})
    hive = read_table(data.get("hive", {}), HIVE_KEYS, f"{source}: hive", ConfigError)
    name = hive["name"]
    (api_host, api_port), (box_host, box_port) = hive["api_listen"], hive["box_listen"]

    shapes = data.get("shapes", {})
    if not shapes or not isinstance(shapes, dict):
        raise ConfigError(f"{source}: no [shapes.NAME] table: a hive offers at least one shape")
    for sname, sval in shapes.items():
        if not isinstance(sval, dict):
            raise ConfigError(f"{source}: shapes.{sname}: expected a table")

    customers = {}
    for cname, raw in data.get("customers", {}).items():
        where = f"{source}: customers.{cname}"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a table")
        _known(where, raw, {"shapes", "api_tokens_sha256", "registry_credentials"})
        cshapes = _strs(f"{where}.shapes", raw["shapes"]) if "shapes" in raw else None
        for s in cshapes or ():
            if s not in shapes:
                raise ConfigError(f"{where}.shapes: {s!r} is not a shape of this hive "
                                  f"({', '.join(shapes)})")
        customers[cname] = Customer(cname, cshapes, _hashes(f"{where}.api_tokens_sha256",
                                                            raw.get("api_tokens_sha256", [])))
        if "registry_credentials" in raw:  # sent with build.assign, never stored (hived/oci/credentials.py)
            from hived.oci.credentials import CredentialsError
            from hived.oci.credentials import parse as parse_credentials

            try:
                creds = parse_credentials(raw["registry_credentials"], where, customer=cname)
            except CredentialsError as exc:
                raise ConfigError(str(exc)) from None
            customers[cname] = dataclasses.replace(customers[cname], registry_credentials=creds)

    networks = {}
    for nname, raw in data.get("networks", {}).items():
        where = f"{source}: networks.{nname}"
        networks[nname] = _network(where, nname, raw, customers)
    for cname, cust in customers.items():
        mine = tuple(sorted(n for n, net in networks.items() if net.customer == cname))
        if mine:
            customers[cname] = dataclasses.replace(cust, secure_networks=mine)

    admin = data.get("admin", {})
    _known(f"{source}: admin", admin, {"api_tokens_sha256"})
    admin_tokens = _hashes(f"{source}: admin.api_tokens_sha256", admin.get("api_tokens_sha256", []))

    boxes = {}
    for bname, raw in data.get("boxes", {}).items():
        where = f"{source}: boxes.{bname}"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a table")
        _known(where, raw, {"token_sha256"})
        if "token_sha256" in raw:
            boxes[bname] = _hashes(f"{where}.token_sha256", [raw["token_sha256"]])[0]

    repos = {}
    for rname, raw in data.get("repos", {}).items():
        where = f"{source}: repos.{rname}"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a table")
        _known(where, raw, {"customer", "secret", "secret_file", "command", "shape", "branches", "env",
                            "timeout_s", "url", "image", "secure_compute"})
        if raw.get("customer") not in customers:
            raise ConfigError(f"{where}.customer: {raw.get('customer')!r} is not a [customers.NAME] "
                              "of this hive")
        if "secret_file" in raw:
            path = Path(raw["secret_file"])
            if base is not None and not path.is_absolute():
                path = base / path
            try:
                secret = path.read_bytes().strip()
            except OSError as exc:
                raise ConfigError(f"{where}.secret_file: {exc}") from None
        elif isinstance(raw.get("secret"), str) and raw["secret"]:
            secret = raw["secret"].encode()
        else:
            raise ConfigError(f"{where}: needs secret = \"...\" or secret_file (the webhook's secret)")
        command = _strs(f"{where}.command", raw.get("command", []))
        if not command:
            raise ConfigError(f"{where}.command: expected the build command, e.g. [\"make\", \"test\"]")
        shape = raw.get("shape", next(iter(shapes)))
        if shape not in shapes:
            raise ConfigError(f"{where}.shape: {shape!r} is not a shape of this hive ({', '.join(shapes)})")
        env = raw.get("env", {})
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            raise ConfigError(f"{where}.env: expected a table of strings")
        repos[rname] = Repo(rname, raw["customer"], secret, command, shape,
                            _strs(f"{where}.branches", raw["branches"]) if "branches" in raw else None,
                            dict(env), _num(f"{where}.timeout_s", raw.get("timeout_s", 0), 0),
                            _str(f"{where}.url", raw.get("url", "")), _str(f"{where}.image", raw.get("image", "")),
                            _str(f"{where}.secure_compute", raw.get("secure_compute", "")))
        net = repos[rname].secure_compute
        if net and (net not in networks or networks[net].customer != raw["customer"]):
            raise ConfigError(f"{where}.secure_compute: {net!r} is not a [networks.NAME] of customer "
                              f"{raw['customer']!r}")

    heartbeat, lost = hive["heartbeat_s"], hive["box_lost_s"]
    if lost <= heartbeat * 2:
        raise ConfigError(f"{source}: hive.box_lost_s ({lost:g}) must be more than twice heartbeat_s "
                          f"({heartbeat:g}), or one late heartbeat loses a box")
    tls_dir = hive["tls_dir"]
    tls_path = None
    if tls_dir:
        tls_path = Path(tls_dir)
        if base is not None and not tls_path.is_absolute():
            tls_path = base / tls_path
    require_certs = hive["require_box_certs"]
    if require_certs and tls_path is None:
        raise ConfigError(f"{source}: hive.require_box_certs needs hive.tls_dir (box certificates are TLS)")
    state_dir = Path(hive["state_dir"] or f"/var/lib/hived/control/{name}")
    if base is not None and not state_dir.is_absolute():
        state_dir = base / state_dir
    database, pw_file = hive["database"], hive["database_password_file"]
    pw_path = None
    if pw_file:
        if not database:
            raise ConfigError(f"{source}: hive.database_password_file needs hive.database (a PostgreSQL URL)")
        pw_path = Path(pw_file)
        if base is not None and not pw_path.is_absolute():
            pw_path = base / pw_path
    return ControlConfig(
        hive=name, state_dir=state_dir, api_host=api_host, api_port=api_port, box_host=box_host,
        box_port=box_port, heartbeat_s=heartbeat, box_lost_s=lost,
        max_body_bytes=hive["max_body_bytes"], log_max_bytes=hive["log_max_bytes"],
        synchronous=hive["synchronous"], tls_dir=tls_path, require_box_certs=require_certs,
        shapes={k: dict(v) for k, v in shapes.items()},
        customers=customers, admin_tokens_sha256=admin_tokens, box_tokens_sha256=boxes, repos=repos,
        networks=networks, database=database, database_password_file=pw_path,
    )


def check_database_url(where: str, url) -> str:
    """"" or a PostgreSQL URL without a password (URLs end up in logs and process lists)."""
    url = _str(where, url)
    if not url:
        return ""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(f"{where}: expected \"postgresql://USER@HOST[:PORT]/DATABASE\" (or \"\" for SQLite), "
                          f"got a {parts.scheme or 'schemeless'} URL")
    if parts.password is not None:
        raise ConfigError(f"{where}: the URL holds a password: put it in hive.database_password_file or "
                          "$HIVED_DATABASE_PASSWORD instead (URLs end up in logs and process lists)")
    return url


def _network(where: str, name: str, raw, customers: dict) -> SecureNetwork:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table")
    if not NAME_RE.match(name):
        raise ConfigError(f"{where}: a network name is lower-case letters, digits and '-' (at most 32)")
    _known(where, raw, {"customer", "connector_tokens_sha256", "tunnel_subnet", "routes"})
    if raw.get("customer") not in customers:
        raise ConfigError(f"{where}.customer: {raw.get('customer')!r} is not a [customers.NAME] of this hive")
    tokens = _hashes(f"{where}.connector_tokens_sha256", raw.get("connector_tokens_sha256", []))
    if not tokens:
        raise ConfigError(f"{where}.connector_tokens_sha256: the network needs at least one connector "
                          "token (`hived control token` prints a token and its SHA-256)")
    try:
        subnet = ipaddress.IPv4Network(raw.get("tunnel_subnet", ""))
    except ValueError as exc:
        raise ConfigError(f"{where}.tunnel_subnet: expected an IPv4 network like \"100.96.0.0/24\" ({exc})") \
            from None
    if subnet.num_addresses < 4:
        raise ConfigError(f"{where}.tunnel_subnet: {subnet} is too small: at least a /30")
    routes = _strs(f"{where}.routes", raw.get("routes", ["0.0.0.0/0"]))
    for r in routes:
        try:
            ipaddress.IPv4Network(r)
        except ValueError as exc:
            raise ConfigError(f"{where}.routes: {r!r} is not an IPv4 network ({exc})") from None
    if not routes:
        raise ConfigError(f"{where}.routes: expected at least one network the connector leads to")
    return SecureNetwork(name, raw["customer"], tokens, subnet, routes)


def load(path: Path | str) -> ControlConfig:
    path = Path(path)
    return parse(tomlfile.read(path, ConfigError), str(path), base=path.resolve().parent)
