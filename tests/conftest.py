import pytest
import torch


@pytest.fixture(scope='module')
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core CPU spinning OpenMP threads make them 10-100x
    slower. A module opts in with `pytestmark = pytest.mark.usefixtures('one_thread')`; restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
