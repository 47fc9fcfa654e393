"""Cold page parts on a worker: one ranged read per run of consecutive cold pages, read
ahead of the pages, each page served once its part is in.

A worker asked for cold pages of one object groups each run of consecutive pages into a
part (:class:`ray_cache.store.fetch.PagePart`, up to ``PART_BYTES``) read with one GET.
:class:`ColdParts` keeps the parts being read, so readers asking for the same part at once
share its one read; reads them on a pool of their own, :data:`AHEAD_PARTS` at once, so
the link stays busy while earlier parts are served; and queues a page for a page thread
only once its part is in (:meth:`ColdParts.after`), so no page thread waits on the store.
Page threads that waited used to hold every thread on the first reader's pages while
several readers asked one worker at once: the others' first pages came at the end of the
read, and the transfers to their nodes could not overlap it.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ray_cache.store import fetch
from ray_cache.store.fetch import PageRequest

#: Cold parts (``fetch.PART_BYTES`` each) one worker reads ahead of their pages at once.
AHEAD_PARTS = 8

Span = Tuple[str, str]


class AheadPart(fetch.PagePart):
    """A part whose read may be under way ahead of its pages (:meth:`ColdParts.claim`)."""

    #: That read, if one was started.
    ahead: Optional["Future[None]"] = None


class ColdParts:
    """The parts one worker is reading, by their first and last page.

    ``held(digest)`` says whether the worker holds a page or is filling it: a part any of
    whose pages is held or being filled is left to its pages (no read ahead).

    Examples
    --------
    >>> from ray_cache.store.keys import StoreObject
    >>> obj = StoreObject("file", "/tmp/x", 8, "size:8")
    >>> parts = ColdParts(held=lambda digest: True)  # every page held: nothing read ahead
    >>> by_page, mine = parts.claim(None, [fetch.page_request(obj, i, 4) for i in range(2)])
    >>> len(set(map(id, by_page.values()))), len(mine), parts.reading()
    (1, 1, 1)
    >>> parts.release(mine); parts.reading()
    0
    """

    def __init__(self, held: Callable[[str], bool], count: Optional[Callable[[int, int], None]] = None,
                 ahead: int = AHEAD_PARTS) -> None:
        self._held, self._count = held, count
        self._pool = ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="ray-cache-part")
        self._lock = threading.Lock()
        self._parts: Dict[Span, AheadPart] = {}

    def claim(self, fs: Any, requests: Sequence[Any]) -> Tuple[Dict[str, AheadPart], List[Span]]:
        """The part of each page request among ``requests`` (by key digest), shared with
        readers asking for the same part now, and the spans this call started (to
        :meth:`release` when it is done). Cold parts it started are being read."""
        by_page: Dict[str, AheadPart] = {}
        mine: List[Span] = []
        try:
            for part in AheadPart.group(fs, [r for r in requests if isinstance(r, PageRequest)],
                                             self._count):
                span = (part.reqs[0].key.digest, part.reqs[-1].key.digest)
                cold = not any(self._held(r.key.digest) for r in part.reqs)
                with self._lock:
                    shared = self._parts.setdefault(span, part)
                    if shared is part:
                        mine.append(span)
                        if cold:
                            part.ahead = self._pool.submit(part.fetch)
                for r in part.reqs:
                    by_page[r.key.digest] = shared
        except BaseException:
            self.release(mine)
            raise
        return by_page, mine

    def release(self, spans: Sequence[Span]) -> None:
        """Forget parts a call started (their pages are in the tiers, or failed)."""
        with self._lock:
            for span in spans:
                self._parts.pop(span, None)

    def reading(self) -> int:
        """How many parts are claimed now."""
        return len(self._parts)

    @staticmethod
    def after(part: Optional[AheadPart], submit: Callable[[], "Future[Any]"]) -> "Future[Any]":
        """``submit()`` now, or once ``part``'s read ahead is done; a future of its result.

        Examples
        --------
        >>> with ThreadPoolExecutor(1) as pool:
        ...     ColdParts.after(None, lambda: pool.submit(sum, [1, 2])).result()
        3
        """
        ahead = None if part is None else part.ahead
        if ahead is None or ahead.done():
            return submit()
        out: "Future[Any]" = Future()

        def settle(done: "Future[Any]") -> None:
            try:
                out.set_result(done.result())
            except BaseException as exc:  # noqa: BLE001 - a failure (or cancellation) is the page's
                out.set_exception(exc)

        def go(_read: "Future[Any]") -> None:
            try:
                submit().add_done_callback(settle)
            except RuntimeError as exc:  # the page threads are shut down: the worker is stopping
                out.set_exception(exc)

        ahead.add_done_callback(go)
        return out
