import os
import sys
from pathlib import Path

# Tests run against this source tree, even without an editable install (or with one that points
# at another checkout): in this process, and in every subprocess a test starts (`python -m meshlm`,
# torchrun workers), which inherit PYTHONPATH.
SRC = str(Path(__file__).resolve().parents[1] / "src")
sys.path.insert(0, SRC)
os.environ["PYTHONPATH"] = os.pathsep.join([SRC, *filter(None, [os.environ.get("PYTHONPATH")])])
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prepare_corpus(tmp_path_factory):
    """prepare_corpus(overrides) -> a fresh data cache directory holding the prepared corpus of
    that config. Called before any rank is forked, so every rank and case reuses the files."""
    from meshlm.config import load_config
    from meshlm.data.prepare import prepare_data

    def prepare(overrides: list[str]):
        cache = tmp_path_factory.mktemp("data-cache")
        cfg = load_config(None, list(overrides) + [f'data.cache_dir="{cache}"'])
        prepare_data(cfg.data, cfg.model.vocab_size, log=lambda *a, **k: None)
        return cache

    return prepare
