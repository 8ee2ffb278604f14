import os

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
torch.set_num_threads(1)


@pytest.fixture
def flower_task_identity():
    """Messages built outside a Flower runtime need the process' task identity set."""
    from fedsafe.flower.task_identity import task_identity

    with task_identity(run_id=7):
        yield
