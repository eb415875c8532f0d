"""Shared checks of the integration tests."""

from __future__ import annotations

import importlib.metadata

import pytest


def assert_refuses_unknown_version(integration, package, fake_version, monkeypatch, probe):
    """``integration.patch()`` raises naming ``package fake_version`` and changes nothing
    (``probe()`` returns the same object before and after)."""
    from rlfuse.integrations import UnsupportedVersionError

    integration.unpatch()
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda p: fake_version if p == package else real(p))
    before = probe()
    with pytest.raises(UnsupportedVersionError, match=f"{package} {fake_version}"):
        integration.patch()
    assert not integration.is_patched() and probe() is before
