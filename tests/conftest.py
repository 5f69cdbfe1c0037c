"""Shared test fixtures.

Tests marked ``real_data`` read the real datasets from ``$RECSYS_FLOWADAM_DATA``. Locally
they skip when it is unset; in CI (``RECSYS_FLOWADAM_REQUIRE_REAL_DATA=1``) a skipped
real-data test fails the session, so CI can never pass without having used the real files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

REQUIRE_REAL_DATA = os.environ.get("RECSYS_FLOWADAM_REQUIRE_REAL_DATA") == "1"
_skipped_real: list[str] = []


@pytest.fixture(scope="session", autouse=True)
def private_parsed_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh parsed-dataset cache for this session (subprocesses inherit it): tests never
    read or write the user's ~/.cache, and CI exercises the cold-cache parse as a new machine would."""
    folder = tmp_path_factory.mktemp("parsed-cache")
    previous = os.environ.get("RECSYS_FLOWADAM_CACHE")
    os.environ["RECSYS_FLOWADAM_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("RECSYS_FLOWADAM_CACHE", None)
    else:
        os.environ["RECSYS_FLOWADAM_CACHE"] = previous


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for the module: the tests' problems are tiny, and intra-op threads only add
    synchronisation (badly so on a loaded 2-core machine). Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The folder holding the real datasets (ml-100k/, jester-4/, ...)."""
    value = os.environ.get("RECSYS_FLOWADAM_DATA")
    if not value or not Path(value).is_dir():
        if REQUIRE_REAL_DATA:
            pytest.fail("RECSYS_FLOWADAM_DATA must name the real datasets folder in CI")
        pytest.skip("RECSYS_FLOWADAM_DATA is not set")
    return Path(value)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and "real_data" in report.keywords:
        _skipped_real.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if REQUIRE_REAL_DATA and _skipped_real:
        print("\nreal-data tests were skipped, which CI does not allow:")
        for nodeid in _skipped_real:
            print(f"  {nodeid}")
        session.exitstatus = 1
