import pytest
import torch
from opacus.validators import ModuleValidator

from common.models import LeNet5, build_model, count_parameters


def test_lenet5_shape_and_parameter_count():
    model = LeNet5(num_classes=10)
    out = model(torch.zeros(4, 1, 28, 28))
    assert out.shape == (4, 10)
    # conv1 156 + conv2 2,416 + fc 48,120 + 10,164 + 850 (LeCun 1998 with 28x28 input)
    assert count_parameters(model) == 61_706


@pytest.mark.parametrize("name", ["lenet5", "text-linear", "text-mlp"])
def test_models_are_opacus_compatible(name):
    model = build_model(name, 4, num_features=64)
    assert ModuleValidator.validate(model, strict=False) == []


def test_text_models_output_one_logit_per_class():
    x = torch.rand(3, 128)
    assert build_model("text-linear", 2, num_features=128)(x).shape == (3, 2)
    assert build_model("text-mlp", 4, num_features=128, hidden=8)(x).shape == (3, 4)


def test_unknown_model_and_activation_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_model("resnet", 10)
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        build_model("lenet5", 10, activation="gelu")
