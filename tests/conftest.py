import os

import pytest
import torch

# Keep the CPU tests deterministic and within the 2 cores CI has.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords or "multigpu" in item.keywords:
            item.add_marker(skip)
