"""The connector's TOML config (`hived connector --config FILE`). Errors name the key and what to do.

    [connector]
    control = "10.0.0.1:7070"        # the hive control plane's box-link address, or a list of its
                                     # replicas' (tried in turn: any replica forwards to the leader)
    network = "acme-private"         # the Secure Compute network it serves
    token_file = "/etc/hived/connector.token"   # or token = "..." (the network's connector secret)
    endpoint = "203.0.113.5:51820"   # where boxes reach this connector's WireGuard UDP port
    listen_port = 51820
    interface = "hvc0"               # the WireGuard interface (default hvc0)
    masquerade = true                # cells' traffic leaves with this host's address
    ca_file = ""                     # TLS to the control plane, verified against the hive CA
    cert_file = "" ; key_file = ""   # a client certificate, if the hive asks for one
    server_name = ""                 # name in the control plane's certificate (default: host)
    netns = ""                       # run the interface in this named network namespace (tests)
    driver = "auto"                  # auto | kernel | wireguard-go
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import ssl
from pathlib import Path

from hived import tomlfile

KNOWN = {"control", "network", "token", "token_file", "endpoint", "listen_port", "interface", "masquerade",
         "ca_file", "cert_file", "key_file", "server_name", "netns", "driver"}


class ConnectorConfigError(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
    control_host: str
    control_port: int
    network: str
    token: str = dataclasses.field(repr=False)
    endpoint: str
    listen_port: int = 51820
    interface: str = "hvc0"
    masquerade: bool = True
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str = ""
    netns: str | None = None
    driver: str = "auto"
    others: tuple[tuple[str, int], ...] = ()   # more control plane replicas, tried in turn

    @property
    def controls(self) -> tuple[tuple[str, int], ...]:
        return ((self.control_host, self.control_port), *self.others)

    @classmethod
    def load(cls, path: str | Path) -> ConnectorConfig:
        data = tomlfile.read(path, ConnectorConfigError, "give the connector's config with --config")
        table = data.get("connector")
        if not isinstance(table, dict):
            raise ConnectorConfigError(f"{path}: needs a [connector] table (control, network, token, endpoint)")
        others = sorted(set(data) - {"connector"})
        if others:
            raise ConnectorConfigError(f"{path}: unknown table(s) {', '.join(others)} (only [connector])")
        return cls.from_table(table, source=f"{path}: [connector]")

    @classmethod
    def from_table(cls, table: dict, *, source: str = "[connector]") -> ConnectorConfig:
        for key in table:
            if key not in KNOWN:
                raise ConnectorConfigError(f"{source}.{key}: unknown key (known: {', '.join(sorted(KNOWN))})")

        def text(key: str, default: str | None = None) -> str:
            value = table.get(key, default)
            if not isinstance(value, str):
                raise ConnectorConfigError(f"{source}.{key}: expected a string, got {value!r}")
            return value

        control = table.get("control", "")
        if isinstance(control, str):
            control = [control]
        if not isinstance(control, list) or not control or not all(isinstance(c, str) for c in control):
            raise ConnectorConfigError(f"{source}.control: expected the hive control plane's box-link address "
                                       f"\"HOST:PORT\" or a list of its replicas', got {table.get('control')!r}")
        controls = [_host_port(c, f"{source}.control", "the hive control plane's box-link address, e.g. "
                               "\"10.0.0.1:7070\" (or a list of its replicas')") for c in control]
        (host, port), others = controls[0], tuple(controls[1:])
        network = text("network", "")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", network):
            raise ConnectorConfigError(f"{source}.network: expected the Secure Compute network's name "
                                       f"(1-64 of [A-Za-z0-9._-]), got {network!r}")
        if "token_file" in table:
            try:
                token = Path(text("token_file")).read_text().strip()
            except OSError as exc:
                raise ConnectorConfigError(f"{source}.token_file: {exc.strerror}: {table['token_file']}") from None
        else:
            token = text("token", "")
        if not token:
            raise ConnectorConfigError(f"{source}: needs token_file or token (the network's connector secret, "
                                       "configured in the hive's [networks.NAME])")
        if len(token) > 256:
            raise ConnectorConfigError(f"{source}.token: at most 256 characters")
        endpoint = text("endpoint", "")
        ehost, eport = _host_port(endpoint, f"{source}.endpoint",
                                  "where boxes reach this connector's WireGuard UDP port, e.g. \"203.0.113.5:51820\"")
        listen_port = table.get("listen_port", eport)
        if not isinstance(listen_port, int) or isinstance(listen_port, bool) or not 1 <= listen_port <= 65535:
            raise ConnectorConfigError(f"{source}.listen_port: expected a UDP port 1..65535, got {listen_port!r}")
        interface = text("interface", "hvc0")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", interface):
            raise ConnectorConfigError(f"{source}.interface: expected an interface name (1-15 of [A-Za-z0-9_.-]), "
                                       f"got {interface!r}")
        masquerade = table.get("masquerade", True)
        if not isinstance(masquerade, bool):
            raise ConnectorConfigError(f"{source}.masquerade: expected true or false, got {masquerade!r}")
        driver = text("driver", "auto")
        if driver not in ("auto", "kernel", "wireguard-go"):
            raise ConnectorConfigError(f"{source}.driver: expected auto, kernel or wireguard-go, got {driver!r}")

        def path(key: str) -> Path | None:
            value = text(key, "")
            if not value:
                return None
            p = Path(value)
            if not p.is_file():
                raise ConnectorConfigError(f"{source}.{key}: {value} is not a readable file")
            return p

        endpoint = f"{ehost}:{eport}" if ":" not in ehost else f"[{ehost}]:{eport}"
        try:
            check_endpoint_ip(endpoint)
        except ConnectorConfigError as exc:
            raise ConnectorConfigError(f"{source}.{exc}") from None
        return cls(host, port, network, token, endpoint,
                   listen_port, interface, masquerade, path("ca_file"), path("cert_file"), path("key_file"),
                   text("server_name", ""), text("netns", "") or None, driver, others)

    def ssl_context(self) -> ssl.SSLContext | None:
        from hived.link import tls_context

        return tls_context(self.ca_file, self.cert_file, self.key_file)


def _host_port(value: str, where: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConnectorConfigError(f"{where}: expected HOST:PORT, {what}; got {value!r}")
    return host, int(port)


def check_endpoint_ip(endpoint: str) -> None:
    """WireGuard endpoints are addresses, not names (boxes do not resolve them)."""
    host = endpoint.rpartition(":")[0].strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConnectorConfigError(f"endpoint {endpoint!r}: the host must be an IP address (boxes give it to "
                                   "WireGuard as is)") from None
