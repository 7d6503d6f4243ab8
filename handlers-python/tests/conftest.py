"""Shared fixtures: the repository's protocol files and a fake broker."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PKG_ROOT = HERE.parent
REPO = PKG_ROOT.parent
SCHEMAS = REPO / "protocol" / "schemas"
VECTORS = REPO / "protocol" / "vectors"

# Test the source tree, whether or not the package is installed.
if str(PKG_ROOT) not in sys.path:
    sys.path.insert(0, str(PKG_ROOT))


@pytest.fixture(scope="session")
def codec():
    from stepbroker_handlers.protocol import Codec

    c = Codec.create(SCHEMAS, validate=True)
    assert c.validating
    return c
