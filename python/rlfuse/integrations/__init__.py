"""Drop-in patches that put rlfuse ops into the trainers people already use.

    import rlfuse.integrations.trl as rl_trl
    rl_trl.patch()                 # or: with rl_trl.patched(): ...
    import rlfuse.integrations.verl as rl_verl
    rl_verl.patch()

Each patch checks the installed version, replaces the peer's functions (in the module that
defines them and in every already-imported module of the peer that bound them by name) and
records every original object, so ``unpatch()`` restores them exactly.  What each patch
covers, and what it leaves to the peer's own code, is in ``docs/integrations.md``.
"""

from rlfuse.integrations._patching import UnsupportedVersionError

__all__ = ["UnsupportedVersionError"]
