"""`hived connector`: the customer side of Secure Compute. daemon.py registers with the hive's key
exchange service and keeps one WireGuard peer per cell; config.py reads its TOML; testbed.py
builds a customer network on this machine (for tests and `hived bench secure`)."""
