import logging

import pytest
import torch

from emtransfer.logs import configure_logging

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _quiet_logs() -> None:
    configure_logging(logging.WARNING)
