"""GPU clients: the device choice, and DP-SGD / evaluation on a CUDA device.

The CUDA tests skip where no GPU is visible (CI, this project's machines); they run on a
GPU machine with `pytest tests/test_gpu.py`. The device choice is tested everywhere.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from client.training import DPSettings, train_local
from common.devices import DeviceError, pick_device, to_device
from common.evaluation import evaluate
from common.models import LeNet5

CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not CUDA, reason="no CUDA device visible")


def test_device_choice_names_what_exists():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto") == (torch.device("cuda") if CUDA else torch.device("cpu"))
    with pytest.raises(DeviceError, match="use auto, cpu, cuda or cuda:<index>"):
        pick_device("tpu")
    visible = torch.cuda.device_count() if CUDA else 0
    with pytest.raises(DeviceError, match=f"this process sees {visible} CUDA device"):
        pick_device(f"cuda:{visible}")


def test_to_device_copies_once_and_keeps_data_already_there():
    data = TensorDataset(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    assert to_device(data, torch.device("cpu")) is data


def _digits_like(n: int = 96) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 1, 28, 28, generator=g)
    return TensorDataset(images, torch.randint(0, 10, (n,), generator=g))


@needs_gpu
@pytest.mark.parametrize("mode", ["bookkeeping", "ghost", "hooks"])
def test_a_noiseless_dp_step_on_the_gpu_equals_the_cpu_step(mode):
    """σ = 0, q = 1: one DP-SGD step is deterministic; on CUDA it must match the CPU."""
    torch.manual_seed(0)
    data = _digits_like()
    cpu, gpu = LeNet5(10), LeNet5(10)
    gpu.load_state_dict(cpu.state_dict())
    dp = DPSettings(0.0, 0.1, 1.0, 1, "rdp", mode)
    train_local(cpu, data, epochs=1, batch_size=96, learning_rate=0.5, dp=dp)
    result = train_local(gpu, data, epochs=1, batch_size=96, learning_rate=0.5, dp=dp,
                         device=torch.device("cuda"))  # fmt: skip
    assert result.mechanism == (0.0, 1.0, 1)
    for a, b in zip(cpu.parameters(), gpu.parameters(), strict=True):
        assert b.device.type == "cpu"  # back on the CPU, ready to be sent
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@needs_gpu
def test_dp_training_on_the_gpu_adds_noise_and_records_the_mechanism():
    data = _digits_like(256)
    a, b = LeNet5(10), LeNet5(10)
    b.load_state_dict(a.state_dict())
    dp = DPSettings(1.0, 1.0, 0.125, 8, "rdp", "bookkeeping")
    ra = train_local(a, data, epochs=1, batch_size=32, learning_rate=0.1, dp=dp,
                     device=torch.device("cuda"))  # fmt: skip
    train_local(b, data, epochs=1, batch_size=32, learning_rate=0.1, dp=dp,
                device=torch.device("cuda"))  # fmt: skip
    assert ra.mechanism == (1.0, 0.125, 8)
    assert not torch.equal(a.features[0].weight, b.features[0].weight)  # fresh noise


@needs_gpu
def test_evaluation_on_the_gpu_equals_the_cpu():
    data = _digits_like()
    model = LeNet5(10)
    on_cpu = evaluate(model, data)
    on_gpu = evaluate(_copy_to_cuda(model), to_device(data, torch.device("cuda")))
    assert on_gpu.num_examples == on_cpu.num_examples
    assert on_gpu.accuracy == pytest.approx(on_cpu.accuracy)
    assert on_gpu.loss == pytest.approx(on_cpu.loss, rel=1e-4)


def _copy_to_cuda(model: nn.Module) -> nn.Module:
    copy = LeNet5(10)
    copy.load_state_dict(model.state_dict())
    return copy.to("cuda")
