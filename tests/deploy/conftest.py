"""Fixtures of the deployment tests (helpers: tests/deploy/common.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy.common import HELM


@pytest.fixture(scope="session")
def helm_binary() -> Path:
    assert HELM.exists(), "helm comes from requirements/dev.txt (helm-binary)"
    return HELM
