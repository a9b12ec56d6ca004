import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# one intra-op thread: the tests are small, and multithreaded torch can stall badly on a
# loaded 2-core machine (measured 10-100x on SVDs)
torch.set_num_threads(1)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
