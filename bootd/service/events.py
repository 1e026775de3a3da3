"""The in-memory bus of node updates that the live status page streams (server-sent events).

The lifecycle publishes every state change it writes, every heartbeat (a
contact) and every progress report of a capsule fetch.  Progress lives only
here: a node reports it once a second while it fetches, and writing that to
the registry would be thousands of writes a second in a boot storm for a
number nobody needs after the boot.

Every subscriber is bounded.  Progress and contact updates of one node
replace each other while they wait (the page wants the newest, not every
one), and a subscriber that falls ``queue_size`` updates behind is not
given more memory: its queue is dropped and it is told to resync (fetch a
fresh snapshot).  One that keeps falling behind is closed, and its page
reconnects.  The number of subscribers is bounded too.

Updates are plain JSON-ready dictionaries with a kind ``t``: ``state``
(the node's row after the change), ``progress``, ``contact`` (with the
heartbeat's ``usage`` report when it carried one), ``removed``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bootd.errors import BootdError
from bootd.model import Node, State

Update = dict[str, Any]

MAX_SUBSCRIBERS = 64
QUEUE_SIZE = 4096  # updates one subscriber may fall behind before it is resynced
RESYNC_LIMIT = 3  # resyncs within RESYNC_WINDOW before a subscriber is closed
RESYNC_WINDOW = 60.0
MAX_PROGRESS = 200_000  # nodes whose last fetch progress is kept (for a page loaded mid-boot)
COALESCED = frozenset({"progress", "contact"})


class TooManySubscribers(BootdError):
    """The bus has all the subscribers it accepts."""


def state_update(node: Node) -> Update:
    """A node's row as the page shows it (no variables: they may hold site secrets)."""
    return {"t": "state", "node": node.name, "group": node.group, "state": node.state.value, "reason": node.reason,
            "since": node.state_since, "contact": node.last_contact, "approved": node.approved}


@dataclass(eq=False)
class Subscription:
    """One reader of the bus (one open status page)."""

    queue_size: int
    clock: Callable[[], float]
    pending: OrderedDict[Any, Update] = field(default_factory=OrderedDict)
    resync: bool = False
    closed: bool = False
    resyncs: list[float] = field(default_factory=list)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _seq: int = 0

    def put(self, update: Update) -> None:
        if self.closed:
            return
        if self.resync:
            return  # the snapshot it will fetch includes this
        if update["t"] in COALESCED:
            key: Any = (update["t"], update["node"])
            self.pending.pop(key, None)
        else:
            self._seq += 1
            key = self._seq
        if len(self.pending) >= self.queue_size:
            self._overflow()
        else:
            self.pending[key] = update
        self._wake.set()

    def _overflow(self) -> None:
        self.pending.clear()
        now = self.clock()
        self.resyncs = [t for t in self.resyncs if now - t < RESYNC_WINDOW] + [now]
        if len(self.resyncs) > RESYNC_LIMIT:
            self.closed = True
        else:
            self.resync = True

    def close(self) -> None:
        self.closed = True
        self.pending.clear()
        self._wake.set()

    def take(self) -> list[Update]:
        """What is pending now, oldest first (empty when nothing is)."""
        out = list(self.pending.values())
        self.pending.clear()
        self._wake.clear()
        return out

    def take_resync(self) -> bool:
        """True once after an overflow: the reader must fetch a fresh snapshot."""
        was, self.resync = self.resync, False
        return was

    async def wait(self, timeout: float) -> None:
        """Until something is pending, the subscription closes or ``timeout`` passes."""
        if self.pending or self.resync or self.closed:
            return
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            pass


class EventBus:
    def __init__(self, *, max_subscribers: int = MAX_SUBSCRIBERS, queue_size: int = QUEUE_SIZE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_subscribers = max_subscribers
        self.queue_size = queue_size
        self.clock = clock
        self.subscribers: list[Subscription] = []
        self.progress: dict[str, Update] = {}  # node -> its last progress, while it fetches
        self.published = 0
        self.dropped = 0  # subscribers closed for falling behind

    def subscribe(self) -> Subscription:
        self.subscribers = [s for s in self.subscribers if not s.closed]
        if len(self.subscribers) >= self.max_subscribers:
            raise TooManySubscribers(f"the status page has {len(self.subscribers)} live streams, the most it "
                                     "serves; close one, or retry later")
        sub = Subscription(self.queue_size, self.clock)
        self.subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        sub.close()
        self.subscribers = [s for s in self.subscribers if s is not sub]

    def publish(self, update: Update) -> None:
        """Called on the event loop's thread; costs one dictionary insert per subscriber."""
        self.published += 1
        update["at"] = round(time.time(), 3)  # when bootd published it: the page's lag is measured from here
        name = update.get("node", "")
        if update["t"] == "progress":
            if name in self.progress or len(self.progress) < MAX_PROGRESS:
                self.progress[name] = update
        elif update["t"] == "removed" or (update["t"] == "state" and update["state"] != State.FETCHING.value):
            self.progress.pop(name, None)
        for sub in self.subscribers:
            was_closed = sub.closed
            sub.put(update)
            if sub.closed and not was_closed:
                self.dropped += 1
                sub.close()

    def close(self) -> None:
        """Daemon shutdown: every stream ends now rather than at the listener's grace timeout."""
        for sub in self.subscribers:
            sub.close()
        self.subscribers = []


PROGRESS_FIELDS = ("done", "total", "bytes", "bytes_total")


def progress_update(name: str, detail: str, now: float) -> Update:
    """A fetch progress report (``detail``: the JSON the node's event carried) as a bus update."""
    try:
        facts = json.loads(detail) if detail else {}
    except ValueError:
        facts = {}
    out: Update = {"t": "progress", "node": name, "contact": now}
    if isinstance(facts, dict):
        out.update({k: facts[k] for k in PROGRESS_FIELDS if isinstance(facts.get(k), int)})
    return out
