"""Registry credentials for build image pulls: per customer or per image, from the box's
config or with the build's assignment.

Box config (TOML), any number of entries; the most specific match wins (a customer's own
over anyone's, a repository pattern over a whole registry):

    [[registry_credentials]]
    registry = "registry.example:5000"        # host[:port] of the image reference
    repository = "team/*"                     # optional glob on the repository path
    customer = "acme"                         # optional: only this customer's builds
    username = "puller"
    password_file = "/etc/hived/registry-acme.pass"   # or password = "..." (not recommended)

With the assignment: the hive's config may hold a customer's credentials
(`[[customers.NAME.registry_credentials]]`, same keys but `customer`); the control plane puts
the matching one into that build's `build.assign` as `options.registry_auth = {registry,
username, password}` when it sends it (never into its store); it wins over the box's config.

Where a password goes: into the registry client's memory and its Authorization headers (only
to the registry's origin, see hived/oci/registry.py), nowhere else — not into the build
record, logs, a process's argv or environment, the cache's files, or the guest (the cell gets
the image as a read-only drive, never the options). `Credentials.password` is not in repr.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from pathlib import Path

from hived.oci.registry import Credentials


class CredentialsError(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class RegistryCredential:
    registry: str
    username: str
    password: str = dataclasses.field(repr=False)
    repository: str = ""   # glob; "": every repository of the registry
    customer: str = ""     # "": every customer

    def matches(self, registry: str, repository: str, customer: str) -> bool:
        return (self.registry == registry and (not self.customer or self.customer == customer)
                and (not self.repository or fnmatch.fnmatchcase(repository, self.repository)))

    def specificity(self) -> tuple[int, int]:
        return (1 if self.customer else 0, len(self.repository))


def parse(entries, source: str, *, customer: str = "") -> tuple[RegistryCredential, ...]:
    """`[[registry_credentials]]` of a box config (or of a hive's customer: `customer` given);
    every error names the entry and the fix."""
    if not isinstance(entries, list):
        raise CredentialsError(f"{source}: registry_credentials: expected [[registry_credentials]] entries")
    out = []
    known = {"registry", "repository", "username", "password", "password_file"}
    if not customer:  # a box's entry names the customer it is for; a hive's customer's does not
        known.add("customer")
    for i, raw in enumerate(entries):
        where = f"{source}: registry_credentials[{i}]"
        if not isinstance(raw, dict):
            raise CredentialsError(f"{where}: expected a table")
        for key in raw:
            if key not in known:
                raise CredentialsError(f"{where}.{key}: unknown key (known: {', '.join(sorted(known))})")
        for key in ("registry", "username"):
            if not isinstance(raw.get(key), str) or not raw[key]:
                raise CredentialsError(f"{where}.{key}: required (a non-empty string)")
        if "password_file" in raw:
            try:
                password = Path(raw["password_file"]).read_text().strip()
            except OSError as exc:
                raise CredentialsError(f"{where}.password_file: cannot read it: {exc.strerror or exc}") from None
        else:
            password = raw.get("password")
        if not isinstance(password, str) or not password:
            raise CredentialsError(f"{where}: needs password_file (or password)")
        out.append(RegistryCredential(raw["registry"], raw["username"], password,
                                      str(raw.get("repository", "")), customer or str(raw.get("customer", ""))))
    return tuple(out)


def pick(configured: tuple[RegistryCredential, ...], registry: str, repository: str, customer: str,
         assigned: object = None) -> Credentials | None:
    """The credentials for pulling registry/repository for this customer's build, or None
    (anonymous). `assigned`: options.registry_auth from the assignment, if any."""
    if isinstance(assigned, dict) and assigned.get("registry") == registry:
        user, password = assigned.get("username"), assigned.get("password")
        if isinstance(user, str) and isinstance(password, str) and user and password:
            return Credentials(user, password)
    hits = [c for c in configured if c.matches(registry, repository, customer)]
    if not hits:
        return None
    best = max(hits, key=RegistryCredential.specificity)
    return Credentials(best.username, best.password)


def for_assignment(configured: tuple[RegistryCredential, ...], image_ref: str, customer: str) -> dict | None:
    """options.registry_auth for a build.assign (the control plane's side), or None."""
    from hived.oci import reference
    from hived.oci.errors import OciError

    try:
        r = reference.parse(image_ref)
    except OciError:
        return None  # the box says what is wrong with the reference
    creds = pick(configured, r.registry, r.repository, customer)
    if creds is None:
        return None
    return {"registry": r.registry, "username": creds.username, "password": creds.password}
