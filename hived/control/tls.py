"""TLS for the box link: a hive CA, the control plane's certificate, box certificates.

`hived control init` writes, in the hive's tls_dir:

    ca.pem, ca.key            the hive CA (ECDSA P-256, 10 years); ca.key stays on the control plane
    server.pem, server.key    the control plane's certificate, for the names/IPs boxes dial
    box-NAME.pem, .key        a certificate per box (CN = box id), copied to that box; also the
                              box's certificate on the peer link, both ways (hived/box/peertls.py)

Boxes verify the control plane against ca.pem. A box that presents a certificate must
present one of this CA whose CN is the box id it registers as; the per-box token is
checked either way (a stolen certificate alone is not enough, nor a token alone when the
hive requires certificates: `require_box_certs`).
"""

import datetime
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DAYS_CA = 3650
DAYS_LEAF = 825


def _write_key(path: Path, key) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _name(cn: str, hive: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"hived hive {hive}"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _leaf(ca_key, ca_cert, cn: str, hive: str, *, server_names=(), client=False):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(cn, hive)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=DAYS_LEAF))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               # a box's certificate is a client's on its control link and a server's on the
               # peer link (it serves its hive's other boxes: hived/box/peertls.py)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
                                                    if client else [ExtendedKeyUsageOID.SERVER_AUTH]),
                              critical=False))
    if server_names:
        alt = []
        for n in server_names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                alt.append(x509.DNSName(n))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def init(tls_dir: Path, hive: str, *, hosts=("127.0.0.1",), boxes=()) -> list[Path]:
    """Make the CA (if missing), the server certificate, and a certificate per box."""
    tls_dir = Path(tls_dir)
    tls_dir.mkdir(parents=True, exist_ok=True)
    written = []
    ca_pem, ca_key_path = tls_dir / "ca.pem", tls_dir / "ca.key"
    if ca_pem.exists() and ca_key_path.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_pem.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        name = _name(f"hived hive {hive} CA", hive)
        ca_cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=DAYS_CA))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False,
                                                encipher_only=False, decipher_only=False), critical=True)
                   .sign(ca_key, hashes.SHA256()))
        _write_key(ca_key_path, ca_key)
        ca_pem.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        written += [ca_pem, ca_key_path]
    names = list(dict.fromkeys([*hosts, "localhost"]))
    key, cert = _leaf(ca_key, ca_cert, names[0], hive, server_names=names)
    _write_key(tls_dir / "server.key", key)
    (tls_dir / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    written += [tls_dir / "server.pem", tls_dir / "server.key"]
    for box in boxes:
        key, cert = _leaf(ca_key, ca_cert, box, hive, client=True)
        _write_key(tls_dir / f"box-{box}.key", key)
        (tls_dir / f"box-{box}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        written += [tls_dir / f"box-{box}.pem", tls_dir / f"box-{box}.key"]
    return written


def server_context(tls_dir: Path) -> ssl.SSLContext:
    tls_dir = Path(tls_dir)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(tls_dir / "server.pem"), str(tls_dir / "server.key"))
        ctx.load_verify_locations(str(tls_dir / "ca.pem"))
    except (OSError, ssl.SSLError) as exc:
        raise OSError(f"TLS files in {tls_dir} are missing or unreadable ({exc}): "
                      "run `hived control init --config FILE`") from None
    ctx.verify_mode = ssl.CERT_OPTIONAL  # a box certificate, when given, must be from this CA
    return ctx


def client_context(ca_file: Path, cert_file: Path | None = None,
                   key_file: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file))
    if cert_file is not None:
        ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    return ctx


def peer_common_name(transport) -> str | None:
    """The CN of the peer's verified certificate, or None if it gave none (or not TLS)."""
    cert = transport.get_extra_info("peercert") if transport is not None else None
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None
