"""What the caller has heard of the agent's audio, told by Twilio's marks.

Twilio plays the audio it is sent in order, across the model's items: a
second item's audio queues behind the first's. Each chunk the relay sends is
followed by a mark, which Twilio echoes once the audio before it has played;
a `clear` drops the unplayed audio and returns the pending marks at once.
So a mark coming back means every mark sent before it has played too, and a
mark that is no longer pending (returned after a clear, or repeated) says
nothing: it is ignored rather than taken as news about newer audio.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass

BYTES_PER_MS = 8  # mu-law, 8000 samples/s, one byte per sample


@dataclass
class _Item:
    item_id: str
    sent_bytes: int = 0
    acked_bytes: int = 0
    acked_at: float = 0.0
    started_at: float | None = None  # None while earlier items still play
    marks: int = 0  # its marks not yet echoed


class Playback:
    def __init__(self):
        self._pending: collections.OrderedDict[str, tuple[_Item, int]] = collections.OrderedDict()
        self._items: dict[str, _Item] = {}  # items with audio not yet heard
        self._seq = 0
        # The relay's two loops call in (audio out, marks back): one lock orders them.
        self._lock = threading.Lock()

    @property
    def speaking(self) -> bool:
        """Audio has been sent that Twilio has not yet played."""
        return bool(self._pending)

    def sent(self, item_id: str, nbytes: int, now: float) -> str:
        """Record a chunk of `item_id` sent to Twilio; returns the mark to send after it."""
        with self._lock:
            item = self._items.get(item_id)
            if item is None:
                # It plays at once on a quiet line, or after what is queued before it.
                item = self._items[item_id] = _Item(
                    item_id, started_at=None if self._pending else now
                )
            item.sent_bytes += nbytes
            item.marks += 1
            self._seq += 1
            name = f"m{self._seq}"
            self._pending[name] = (item, item.sent_bytes)
            return name

    def acked(self, name: str, now: float) -> bool:
        """Twilio echoed mark `name`; True when everything sent so far has played."""
        with self._lock:
            if name not in self._pending:
                return False  # late, repeated or returned by a clear: not news
            pending = self._pending
            while True:
                mark, (item, end) = pending.popitem(last=False)
                item.acked_bytes, item.acked_at = end, now
                item.marks -= 1
                if not item.marks:
                    del self._items[item.item_id]  # all of it heard
                if mark == name:
                    break
            if pending:
                following = next(iter(pending.values()))[0]
                if following.started_at is None:
                    following.started_at = now  # the previous item just finished
            return not pending

    def heard_ms(self, item_id: str, now: float) -> int:
        """Audio of `item_id` played so far: its last acknowledged mark, plus real time since.

        Twilio plays at 8 bytes/ms; the estimate is capped at what was sent of
        the item, which is all that can have played. (Not at its next pending
        mark: echoes already played can wait unread while this process is busy,
        and that cap would then cut the estimate to one chunk past a stale mark.)
        """
        item = self._items.get(item_id)
        if item is None or item.started_at is None:
            return 0
        base, since = (item.acked_bytes, item.acked_at) if item.acked_at else (0, item.started_at)
        estimate = base + (now - since) * 1000 * BYTES_PER_MS
        return int(min(estimate, item.sent_bytes) // BYTES_PER_MS)

    def interrupt(self, now: float) -> list[tuple[str, int]]:
        """The caller barged in and a clear is on its way: (item, heard ms) to truncate.

        The item playing now is cut where the caller stopped hearing it;
        items queued behind it were not heard at all.
        """
        with self._lock:
            order = list(dict.fromkeys(item.item_id for item, _ in self._pending.values()))
            cut = [(item_id, self.heard_ms(item_id, now)) for item_id in order]
            self._pending.clear()
            self._items.clear()
            return cut
