"""Both test suites (tests/ and lab/tests/, run together by pytest-xdist's ``-n auto`` in
pyproject.toml): one torch thread per worker, so that as many workers as cores do not
oversubscribe them; ``OMP_NUM_THREADS`` passes the same to the subprocesses the tests start."""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
