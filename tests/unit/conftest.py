"""Fixtures shared by the runtime tests: one small export folder per module, and private copies of it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.unit.runtime_model import Export, make_export


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Export:
    """A small decoder export (model, tokenizer, manifest with golden outputs), built once per module."""
    return make_export(tmp_path_factory.mktemp("runtime") / "export")


@pytest.fixture
def folder(export: Export, tmp_path: Path) -> Path:
    """A private copy of the export, free to damage."""
    return Path(shutil.copytree(export.folder, tmp_path / "export"))
