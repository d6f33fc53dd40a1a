"""TLS for the peer link (box <-> box): the hive's CA and the box's own certificate, both ways.

The material is the box's control link material ([control] ca_file, cert_file, key_file, from
`hived control init --box NAME`, hived/control/tls.py): the hive CA, and a certificate whose
CN is the box id and whose organisation is "hived hive NAME" (usable as a client's and as a
server's). On the peer link:

* the holder serves TLS only (TLS 1.2 at least) with its certificate; a fetcher's
  certificate must be of the hive's CA (the handshake fails otherwise); a fetcher that shows
  none gets a `not_allowed` error over TLS naming what is missing (hived/box/peers.py);
* the fetcher verifies the holder against the hive's CA and then that the certificate is the
  box the control plane named as the holder (CN) of this hive (O) — not a hostname: peers
  are dialled by address, which box certificates do not name;
* both ends check the other's CN against the box id it claims in the HMAC exchange.

So everything on the peer link is encrypted, and a box serves only boxes of its hive. A box
without that material takes no part in the peer link (it neither serves nor fetches; the
registry serves it): `load()` says why.
"""

from __future__ import annotations

import dataclasses
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


class PeerTlsError(Exception):
    """The box's peer link material is missing or unusable; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class PeerTls:
    server: ssl.SSLContext   # the holder's side
    client: ssl.SSLContext   # the fetcher's side
    box_id: str              # the CN of this box's certificate
    hive_org: str            # its organisation: "hived hive NAME"


FIX = ("make one with `hived control init --config HIVE.toml --box BOX_ID` and set [control] ca_file, "
       "cert_file, key_file")


def load(ca_file: Path | None, cert_file: Path | None, key_file: Path | None, box_id: str) -> PeerTls:
    """Contexts for the peer link from the box's hive material, checked: the certificate must
    be of this box (CN = box_id) and usable as a server's (box certificates made before the
    peer link were client-only)."""
    if ca_file is None or cert_file is None:
        raise PeerTlsError(f"the peer link is TLS with the box's hive certificate, and [control] has no "
                           f"{'ca_file' if ca_file is None else 'cert_file'}: {FIX}")
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    except (OSError, ValueError) as exc:
        raise PeerTlsError(f"box certificate {cert_file}: cannot read it ({exc}): {FIX}") from None
    cn = _attr(cert.subject, NameOID.COMMON_NAME)
    org = _attr(cert.subject, NameOID.ORGANIZATION_NAME)
    if cn != box_id:
        raise PeerTlsError(f"box certificate {cert_file} is of {cn!r}, this box is {box_id!r}: {FIX}")
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None
    if usages is not None and ExtendedKeyUsageOID.SERVER_AUTH not in usages:
        raise PeerTlsError(f"box certificate {cert_file} is a client's only (made before the peer link); "
                           f"make a new one: {FIX}")
    try:
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.minimum_version = ssl.TLSVersion.TLSv1_2
        server.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
        server.load_verify_locations(str(ca_file))
        # OPTIONAL, not REQUIRED: a certificate that is shown must be of the hive's CA (else the
        # handshake fails), and a fetcher that shows none is told so in words over TLS
        # (and counted) rather than by a bare TLS alert; peers.py refuses it before anything else.
        server.verify_mode = ssl.CERT_OPTIONAL
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
        client.minimum_version = ssl.TLSVersion.TLSv1_2
        client.check_hostname = False  # peers are dialled by address: the CN is checked instead
        client.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise PeerTlsError(f"the box's hive TLS files ({ca_file}, {cert_file}, {key_file}) are unusable: {exc}: "
                           f"{FIX}") from None
    return PeerTls(server, client, box_id, org or "")


def _attr(name: x509.Name, oid) -> str | None:
    values = name.get_attributes_for_oid(oid)
    return str(values[0].value) if values else None


def peer_identity(transport) -> tuple[str, str] | None:
    """(CN, O) of the other end's verified certificate; None without one (or without TLS)."""
    cert = transport.get_extra_info("peercert") if transport is not None else None
    if not cert:
        return None
    found = {}
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            found.setdefault(key, value)
    return found.get("commonName", ""), found.get("organizationName", "")
