"""nftables rules as raw netlink expressions (pyroute2's NFTables speaks those): matches on
interface names, conntrack state and IPv4 prefixes; verdicts; masquerade. Used by the box's
router namespace and by the Secure Compute connector."""

from __future__ import annotations

import ipaddress
import struct

# nftables numbers (linux/netfilter/nf_tables.h, linux/netfilter.h)
NF_DROP, NF_ACCEPT = 0, 1
NFT_REG_VERDICT, NFT_REG_1 = 0, 1
NFT_CMP_EQ, NFT_CMP_NEQ = 0, 1
NFT_META_IIFNAME, NFT_META_OIFNAME = 6, 7
NFT_CT_STATE = 0
CT_ESTABLISHED, CT_RELATED = 1 << 1, 1 << 2
NFT_PAYLOAD_NETWORK_HEADER = 1


def expr(name: str, **data) -> dict:
    attrs = [(f"NFTA_{name.upper()}_{k.upper()}", v) for k, v in data.items()]
    return {"attrs": [("NFTA_EXPR_NAME", name), ("NFTA_EXPR_DATA", {"attrs": attrs})]}


def data_value(b: bytes) -> dict:
    return {"attrs": [("NFTA_DATA_VALUE", b)]}


def match_ifname(key: int, name: str, op: int = NFT_CMP_EQ) -> list:
    """iifname/oifname == name; a trailing '*' matches a prefix (like nft)."""
    data = name[:-1].encode() if name.endswith("*") else name.encode() + b"\0"
    return [expr("meta", dreg=NFT_REG_1, key=key), expr("cmp", sreg=NFT_REG_1, op=op, data=data_value(data))]


def match_ct_state(mask: int) -> list:
    """ct state & mask != 0."""
    return [expr("ct", dreg=NFT_REG_1, key=NFT_CT_STATE),
            expr("bitwise", sreg=NFT_REG_1, dreg=NFT_REG_1, len=4,
               mask=data_value(struct.pack("=I", mask)), xor=data_value(b"\0\0\0\0")),
            expr("cmp", sreg=NFT_REG_1, op=NFT_CMP_NEQ, data=data_value(b"\0\0\0\0"))]


def match_ip_in(cidr: str, *, dst: bool) -> list:
    net = ipaddress.IPv4Network(cidr)
    return [expr("payload", dreg=NFT_REG_1, base=NFT_PAYLOAD_NETWORK_HEADER,
               offset=16 if dst else 12, len=4),
            expr("bitwise", sreg=NFT_REG_1, dreg=NFT_REG_1, len=4,
               mask=data_value(net.netmask.packed), xor=data_value(b"\0\0\0\0")),
            expr("cmp", sreg=NFT_REG_1, op=NFT_CMP_EQ, data=data_value(net.network_address.packed))]


def verdict(code: int) -> list:
    return [expr("immediate", dreg=NFT_REG_VERDICT,
               data={"attrs": [("NFTA_DATA_VERDICT", {"attrs": [("NFTA_VERDICT_CODE", code)]})]})]


def masquerade() -> list:
    return [expr("masq")]
