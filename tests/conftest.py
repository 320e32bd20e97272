import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers on two cores: one intra-op thread each, instead of two threads fighting per core
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def seqs(tmp_path_factory):
    """A batch of 6 sequences of 5 steps x 8 features for the recurrent CLI tests: (dir, x), x saved as x.npy."""
    d = tmp_path_factory.mktemp("seqs")
    torch.manual_seed(0)
    x = torch.randn(6, 5, 8)
    np.save(d / "x.npy", x.numpy())
    return d, x
