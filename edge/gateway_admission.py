"""How the gateway admits generations, the way llama.cpp's server queues its requests: at most
``slots`` run at once; past that a request waits its turn (first come, first served) in a
queue of at most ``max_queued``, for at most ``timeout_s``; only a full queue or a wait past
the limit is refused, with :class:`~tandem.runtime.errors.OverloadedError` (429 and
``Retry-After``).

The states of a request here: *running* (holds a slot) or *queued* (holds a place); the
transitions: ``enter`` (free slot: run; else queue, or refuse if full), a slot handed over by
``leave`` (queued → running: the slot passes straight to the first in line, so a newcomer
never overtakes the queue), and giving up (the wait limit, or a cancellation: the client
went away) which frees the place, or passes the slot on if it had just been handed over.
"""

from __future__ import annotations

from collections import deque

import anyio

from tandem.runtime.errors import ConfigError, OverloadedError

RETRY_AFTER_MS = 1000.0  # what a refused client is told to wait before trying again


class AdmissionQueue:
    """Slots for at most ``slots`` generations, and a queue of at most ``max_queued`` (0: a
    request past ``slots`` is refused at once) waiting up to ``timeout_s`` (seconds) each.
    ``active``: slots held; ``queued``: requests waiting. For one event loop's tasks (not
    thread-safe)."""

    def __init__(self, slots: int, max_queued: int, timeout_s: float) -> None:
        if slots < 1 or max_queued < 0 or not timeout_s >= 0:
            raise ConfigError(
                f"the gateway's queue needs slots >= 1, max_queued >= 0 and a wait limit "
                f">= 0 s (got {slots}, {max_queued}, {timeout_s})"
            )
        self.slots, self.max_queued, self.timeout_s = slots, max_queued, timeout_s
        self.active = 0
        self._line: deque[anyio.Event] = deque()  # the queued requests' turns, in order

    @property
    def queued(self) -> int:
        return len(self._line)

    async def enter(self) -> None:
        """Take a slot, waiting in line if none is free; :meth:`leave` gives it back. Raises
        :class:`OverloadedError` when the queue is full or no slot came free in time; a
        cancelled wait (the client went away) gives up its place."""
        if self.active < self.slots and not self._line:
            self.active += 1
            return
        if len(self._line) >= self.max_queued:
            raise OverloadedError(
                f"the gateway is serving {self.slots} generations and has {len(self._line)} "
                "queued: retry later",
                retry_after_ms=RETRY_AFTER_MS,
            )
        turn = anyio.Event()
        self._line.append(turn)
        try:
            with anyio.move_on_after(self.timeout_s):
                await turn.wait()
        except BaseException:
            self._give_up(turn)
            raise
        if turn.is_set():  # handed a slot (perhaps just as the wait limit passed): run
            return
        self._give_up(turn)
        raise OverloadedError(
            f"no generation slot came free within {self.timeout_s:g} s "
            f"({self.slots} running): retry later",
            retry_after_ms=RETRY_AFTER_MS,
        )

    def leave(self) -> None:
        """Give a slot back: to the first request in line if any, else free."""
        if self._line:
            self._line.popleft().set()
        else:
            self.active -= 1

    def _give_up(self, turn: anyio.Event) -> None:
        if turn.is_set():  # the slot was handed over as the wait ended: pass it on
            self.leave()
        else:
            self._line.remove(turn)
