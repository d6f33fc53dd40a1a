"""Secure Compute: WireGuard tunnels from cells to a customer's connector.

keys.py       key pairs in memory (X25519)
wireguard.py  one WireGuard interface: wireguard-go (UAPI socket) or kernel (netlink)
connector.py  `hived connector --config FILE`: the customer's end of the tunnels
"""
