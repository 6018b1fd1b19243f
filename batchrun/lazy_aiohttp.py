"""aiohttp, imported without the CA roots it loads at import time (issue 12: ~57 ms a run).

`aiohttp.connector` makes two default SSL contexts as it is imported, and each reads the
system's CA roots (`ssl.create_default_context()`, `set_default_verify_paths()`): tens of
milliseconds, spent even by a run over plain HTTP. batchrun hands the connector its own context
(`client._verify`), so those two serve only other code in the process that asks aiohttp for
`ssl=True` or `ssl=False`. `import_aiohttp` lets aiohttp build them as it always does, the two
root-loading calls excepted; those are replayed the first time either context wraps a
connection, so the contexts behave as aiohttp made them, only later.
"""

from __future__ import annotations

import ssl
import sys
import threading
from collections.abc import Callable
from types import FrameType, ModuleType
from typing import Any

#: the calls that read CA roots from disk, deferred while aiohttp makes its defaults
_ROOT_LOADERS = ("load_default_certs", "set_default_verify_paths")

_lock = threading.Lock()


class DeferredRootsContext(ssl.SSLContext):
    """An SSL context whose CA roots load when it first wraps a connection.

    aiohttp's default contexts become this class (by `__class__` assignment: same layout,
    nothing else changes); `_deferred` holds the root-loading calls aiohttp made.
    """

    _deferred: list[tuple[str, tuple[Any, ...]]]

    def load_deferred_roots(self) -> None:
        """Make the root-loading calls put off at import, once (a no-op after)."""
        with _lock:
            calls = self.__dict__.pop("_deferred", None)
            for name, args in calls or ():
                getattr(ssl.SSLContext, name)(self, *args)

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        self.load_deferred_roots()
        return super().wrap_socket(*args, **kwargs)

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        self.load_deferred_roots()
        return super().wrap_bio(*args, **kwargs)

    def get_ca_certs(self, binary_form: bool = False) -> Any:
        self.load_deferred_roots()
        return super().get_ca_certs(binary_form)

    def cert_store_stats(self) -> dict[str, int]:
        self.load_deferred_roots()
        return super().cert_store_stats()


def _for_aiohttp_defaults(frame: FrameType | None) -> bool:
    """Whether a call comes from `aiohttp.connector._make_ssl_context` (directly, or through
    `ssl.create_default_context`)."""
    for _ in range(3):
        if frame is None:
            return False
        code = frame.f_code
        if (
            code.co_name == "_make_ssl_context"
            and frame.f_globals.get("__name__") == "aiohttp.connector"
        ):
            return True
        frame = frame.f_back
    return False


def _deferring(name: str, made: list[ssl.SSLContext]) -> Callable[..., None]:
    real = getattr(ssl.SSLContext, name)

    def call(self: ssl.SSLContext, *args: Any) -> None:
        if not _for_aiohttp_defaults(sys._getframe(1)):
            return real(self, *args)  # type: ignore[no-any-return]  # any other caller's
        self.__dict__.setdefault("_deferred", []).append((name, args))
        if self not in made:
            made.append(self)
        return None

    return call


def import_aiohttp() -> ModuleType:
    """`import aiohttp`, its default contexts' CA roots loaded on first use, not at import.

    Only the first import is changed: if aiohttp is already loaded this returns it as it is.
    While aiohttp imports, `ssl.SSLContext`'s two root-loading methods are wrapped; the
    wrappers defer only calls made from aiohttp's `_make_ssl_context` and pass any other
    (another thread's, another module's) straight through.
    """
    loaded = sys.modules.get("aiohttp")
    if loaded is not None and "aiohttp.connector" in sys.modules:
        return loaded
    made: list[ssl.SSLContext] = []
    with _lock:
        # load_default_certs is ssl.SSLContext's own, set_default_verify_paths inherited
        own = {name: ssl.SSLContext.__dict__.get(name) for name in _ROOT_LOADERS}
        for name in _ROOT_LOADERS:
            setattr(ssl.SSLContext, name, _deferring(name, made))
        try:
            import aiohttp
        finally:
            for name, method in own.items():
                if method is None:
                    delattr(ssl.SSLContext, name)
                else:
                    setattr(ssl.SSLContext, name, method)
    for context in made:
        if type(context) is ssl.SSLContext:
            context.__class__ = DeferredRootsContext
        else:  # a subclass we cannot stand in for: load now, as aiohttp would have
            for name, args in context.__dict__.pop("_deferred", ()):
                getattr(ssl.SSLContext, name)(context, *args)
    return aiohttp
