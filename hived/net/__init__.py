"""Host networking primitives shared by the box (cell networks) and the Secure Compute connector:
namespaces and taps (netns.py), nftables expressions (nft.py), tc sizing (tc.py), errors."""
