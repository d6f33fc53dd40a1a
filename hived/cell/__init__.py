"""The cell daemon: runs inside the guest, on the guest's own Python (stdlib + msgpack)."""
