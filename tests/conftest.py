import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='session')
def data_root(tmp_path_factory):
    """The embedded dataset, built once per test session for every module that trains."""
    sys.path.insert(0, REPO)
    from prepare_data import ensure_dataset
    root = tmp_path_factory.mktemp('data')
    ensure_dataset(str(root), 'embedded')
    return str(root)


@pytest.fixture(scope='module')
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core CPU spinning OpenMP threads
    make them 10-100x slower. A module opts in with
    `pytestmark = pytest.mark.usefixtures('one_thread')`; restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
