"""Device names are checked once, with a one-line error, before any work (lmlab/device.py)."""

import pytest
import torch

from lmlab.device import check_device, resolve_device
from lmlab.errors import LmlabError


def test_auto_and_cpu_resolve_on_this_machine():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == expected


@pytest.mark.parametrize("name", ["tpu", "gpu", "cuda:x", "", "cpu cpu"])
def test_a_name_that_is_no_device_is_an_error_naming_the_flag(name):
    with pytest.raises(LmlabError, match="device is .*expected auto, cpu, cuda"):
        check_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_a_gpu_this_machine_lacks_is_an_error_unless_only_predicting():
    with pytest.raises(LmlabError, match="no cuda device"):
        resolve_device("cuda")
    assert resolve_device("cuda:1", present=False) == torch.device("cuda", 1)  # a memory prediction for a GPU
    assert resolve_device("cuda", local_rank=3, present=False) == torch.device("cuda", 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_index_past_the_last_gpu_is_an_error():
    with pytest.raises(LmlabError, match="numbered from 0"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
