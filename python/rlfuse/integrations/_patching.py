"""Version checks and a reversible record of monkey-patches (shared by the integrations)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import sys
import warnings

_MISSING = object()


class UnsupportedVersionError(RuntimeError):
    """The installed peer library has a version this integration does not know."""


def check_version(package: str, known: tuple, tested: str) -> str:
    """Return the installed version of ``package``; raise when its release series is unknown.

    ``known`` holds version prefixes as int tuples: ``(1,)`` accepts every 1.x, ``(0, 9)``
    accepts every 0.9.x (for 0.x releases the minor number is the breaking one).  A known
    series with a different minor/patch than ``tested`` only warns.
    """
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ImportError(f"rlfuse.integrations: {package} is not installed") from exc
    parts = []
    for p in version.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    series = [".".join(map(str, k)) + ".x" for k in known]
    if not any(tuple(parts[: len(k)]) == tuple(k) for k in known):
        raise UnsupportedVersionError(
            f"rlfuse.integrations: {package} {version} is not supported; this patch knows "
            f"{package} {', '.join(series)} (tested with {tested}). Install a known version "
            "or leave the patch off."
        )
    if version != tested:
        warnings.warn(f"rlfuse.integrations: {package} {version} was not tested (tested with "
                      f"{tested}); patching anyway", RuntimeWarning, stacklevel=3)
    return version


class Patcher:
    """Applies attribute and dict-entry replacements and undoes them exactly (same objects)."""

    def __init__(self):
        self._saved = []  # (kind, owner, key, original or _MISSING, replacement)

    def setattr(self, owner, name: str, value) -> None:
        original = vars(owner).get(name, _MISSING)
        self._saved.append(("attr", owner, name, original, value))
        setattr(owner, name, value)

    def setitem(self, mapping: dict, key, value) -> None:
        self._saved.append(("item", mapping, key, mapping.get(key, _MISSING), value))
        mapping[key] = value

    def rebind(self, prefix: str, original, replacement) -> int:
        """Point every attribute of the imported modules ``prefix``/``prefix.*`` that is
        ``original`` (by identity, whatever its local name) at ``replacement``."""
        n = 0
        for mod in _modules(prefix):
            for name, value in list(vars(mod).items()):
                if value is original:
                    self.setattr(mod, name, replacement)
                    n += 1
        return n

    def undo(self, prefix: str | None = None) -> None:
        """Restore everything, newest first; then, for modules of ``prefix`` imported while
        patched (they bound the replacements), rebind the originals too."""
        swaps = {}
        for kind, owner, key, original, value in reversed(self._saved):
            if kind == "attr":
                if original is _MISSING:
                    delattr(owner, key)
                else:
                    setattr(owner, key, original)
            else:
                if original is _MISSING:
                    owner.pop(key, None)
                else:
                    owner[key] = original
            if original is not _MISSING and callable(value):
                swaps[id(value)] = (value, original)
        self._saved.clear()
        if prefix is None or not swaps:
            return
        for mod in _modules(prefix):
            for name, value in list(vars(mod).items()):
                hit = swaps.get(id(value))
                if hit is not None and hit[0] is value:
                    setattr(mod, name, hit[1])


def _modules(prefix: str):
    for name, mod in list(sys.modules.items()):
        if mod is not None and (name == prefix or name.startswith(prefix + ".")):
            yield mod


class Integration:
    """The public ``patch`` / ``unpatch`` / ``patched`` / ``is_patched`` of one peer:
    ``apply(patcher)`` makes the replacements through a :class:`Patcher`."""

    def __init__(self, package: str, known: tuple, tested: str, apply):
        self.package, self.known, self.tested, self.apply = package, known, tested, apply
        self._patcher = None

    def is_patched(self) -> bool:
        return self._patcher is not None

    def patch(self) -> None:
        """Make the replacements (idempotent).  Raises :class:`UnsupportedVersionError`
        for an unknown version of the package, before touching anything."""
        if self.is_patched():
            return
        check_version(self.package, self.known, self.tested)
        p = Patcher()
        try:
            self.apply(p)
        except BaseException:
            p.undo(self.package)
            raise
        self._patcher = p

    def unpatch(self) -> None:
        """Restore every original object (no-op when not patched)."""
        if self._patcher is not None:
            self._patcher.undo(self.package)
            self._patcher = None

    @contextlib.contextmanager
    def patched(self):
        """``with patched(): ...`` patches for the block (unless it already was)."""
        was = self.is_patched()
        self.patch()
        try:
            yield
        finally:
            if not was:
                self.unpatch()
