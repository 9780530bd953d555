
import pytest
import torch

# Keep the CPU tests deterministic and within the 2 cores CI has.
torch.set_num_threads(1)  # small ops; 2 threads on 2 shared cores spin-wait badly


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords or "multigpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def bytelm_corpus(tmp_path_factory):
    """A small deterministic text corpus (a few of the standard library's files)."""
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    d = tmp_path_factory.mktemp("corpus")
    for name in ("textwrap.py", "bisect.py", "heapq.py", "fnmatch.py", "shlex.py", "colorsys.py"):
        (d / name).write_bytes((root / name).read_bytes())
    return d
