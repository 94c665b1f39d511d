import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIXTURES = ROOT / "tests" / "fixtures"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end tests (minutes); CI runs them too")


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    """One small toy kitchen for the whole session (read-only: copy it before writing into it)."""
    import data

    return data.make_toy(tmp_path_factory.mktemp("toy"), videos_per_split=(2, 1), segments_per_video=30)
