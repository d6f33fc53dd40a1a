"""hived: untrusted, ephemeral builds in microVMs on your own bare metal.

The package is imported inside cells too (the cell daemon runs on the guest's own
Python with only msgpack), so nothing here may import more than the standard library.
"""

__version__ = "0.1.0"
