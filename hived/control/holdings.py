"""The hive's "who holds X" index (pure, no I/O): which box holds which build image and
checkout image, and where it serves its peer link.

Boxes report with `holds.report` (a full set after registering, then changes, each message
bounded); a box that disconnects is forgotten. `find` answers least loaded first (running
builds, then the box id for a stable order). Nearer boxes would come first where the control
plane knew distances (rack, zone); it does not yet, so every box counts as equally near — on
one machine they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

MAX_KEYS_PER_BOX = 100_000   # a box reporting more is cut off there (its oldest reports win)
MAX_HOLDERS = 16


@dataclasses.dataclass
class BoxHoldings:
    peer_addr: str = ""
    items: dict[str, str] = dataclasses.field(default_factory=dict)  # key -> sha256 ("" for images)


class HoldingsIndex:
    def __init__(self) -> None:
        self.boxes: dict[str, BoxHoldings] = {}
        self.by_key: dict[str, set[str]] = {}

    def report(self, box_id: str, *, full: bool, added: dict[str, str], removed: Iterable[str],
               peer_addr: str) -> None:
        box = self.boxes.get(box_id)
        if box is None or full:
            if box is not None:
                self._drop_items(box_id, box)
            box = self.boxes[box_id] = BoxHoldings()
        if peer_addr:
            box.peer_addr = peer_addr
        for key in removed:
            if box.items.pop(key, None) is not None:
                self._unindex(key, box_id)
        for key, sha in added.items():
            if key not in box.items and len(box.items) >= MAX_KEYS_PER_BOX:
                continue
            box.items[key] = sha
            self.by_key.setdefault(key, set()).add(box_id)

    def forget(self, box_id: str) -> None:
        box = self.boxes.pop(box_id, None)
        if box is not None:
            self._drop_items(box_id, box)

    def _drop_items(self, box_id: str, box: BoxHoldings) -> None:
        for key in box.items:
            self._unindex(key, box_id)

    def _unindex(self, key: str, box_id: str) -> None:
        holders = self.by_key.get(key)
        if holders is not None:
            holders.discard(box_id)
            if not holders:
                del self.by_key[key]

    def find(self, key: str, *, asking: str, load: Callable[[str], int],
             limit: int = MAX_HOLDERS) -> list[dict]:
        """Holders of `key` that serve a peer link, except the box asking: least loaded first."""
        out = []
        for box_id in self.by_key.get(key, ()):
            box = self.boxes[box_id]
            if box_id == asking or not box.peer_addr:
                continue
            out.append({"box_id": box_id, "addr": box.peer_addr, "running": int(load(box_id)),
                        "sha256": box.items.get(key, "")})
        out.sort(key=lambda h: (h["running"], h["box_id"]))
        return out[:limit]

    def describe(self) -> dict:
        return {"boxes": {b: {"peer_addr": h.peer_addr, "items": len(h.items)} for b, h in self.boxes.items()},
                "keys": len(self.by_key)}
