"""pydantic's plugins off for the `batchrun` command, without the cost of saying so (issue 12).

pydantic looks for plugins among every installed package's entry points when it builds its
first validator, unless `PYDANTIC_DISABLE_PLUGINS` turns them off; batchrun's models use none.
Even to read that variable, its loader module (`pydantic.plugin._loader`) imports
`importlib.metadata` first: ~12 ms and ~50M instructions of every run, for an answer the
command knows. So the command puts a stand-in loader in its place before pydantic is imported,
which answers "no plugins" while the variable says so and hands over to pydantic's own loader
otherwise (the variable changed later, or a name pydantic asks for that it does not have).
A library user's process never sees it: only `cli.main` calls `turn_off`.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from collections.abc import Iterable
from typing import Any

VARIABLE = "PYDANTIC_DISABLE_PLUGINS"
#: the values with which pydantic's `get_plugins` returns no plugins at all
_ALL_OFF = ("__all__", "1", "true")
#: the module pydantic imports `get_plugins` from, once per validator it builds
LOADER = "pydantic.plugin._loader"


class _PluginsOff(types.ModuleType):
    """Stands in for pydantic's plugin loader: no plugins while `VARIABLE` says all are off,
    without importing `importlib.metadata`; pydantic's own loader for anything else."""

    def get_plugins(self) -> Iterable[Any]:
        if os.environ.get(VARIABLE) in _ALL_OFF:
            return ()
        plugins: Iterable[Any] = self._real().get_plugins()
        return plugins

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # the import system's questions (`__path__`): a module's
            raise AttributeError(name)
        return getattr(self._real(), name)

    def _real(self) -> types.ModuleType:
        """pydantic's own loader, imported now and put in this stand-in's place."""
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return importlib.import_module(self.__name__)


def turn_off() -> None:
    """Turn pydantic's plugins off for this process, unless `VARIABLE` says otherwise (the
    user's setting is kept as it is); before pydantic loads its loader, a stand-in takes its
    place (`_PluginsOff`)."""
    if VARIABLE in os.environ:
        return
    os.environ[VARIABLE] = "__all__"
    if LOADER not in sys.modules:
        sys.modules[LOADER] = _PluginsOff(LOADER)
