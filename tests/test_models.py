"""The model side of transfer learning: finding and replacing the classification head,
freezing the backbone, and reading weight files safely and with clear errors.

Every model here is randomly initialised (no weights can be downloaded in tests); weight
files are state_dicts the tests save themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from imagefolders import random_state_dict, save_state_dict
from torch import nn

from transfer.errors import UserError
from transfer.models import (
    Head,
    create_backbone,
    find_head,
    freeze_backbone,
    load_backbone_state,
    read_state_dict,
    replace_head,
    torchvision_weights,
    weights_hash_prefix,
)


def forward(model: nn.Module, size: int) -> torch.Tensor:
    """One image of ``size``x``size`` through ``model`` in eval mode (BatchNorm needs no batch)."""
    model.eval()
    with torch.no_grad():
        return model(torch.zeros(1, 3, size, size))


def test_resnet18_head_becomes_linear_512_to_n() -> None:
    """The tutorial's ``model.fc = nn.Linear(num_ftrs, 2)``, found without naming ``fc``."""
    model = create_backbone("resnet18")
    head = replace_head(model, 3)
    assert head == Head("fc", 512)
    assert type(model.fc) is nn.Linear
    assert (model.fc.in_features, model.fc.out_features) == (512, 3)
    assert forward(model, 64).shape == (1, 3)


# (arch, kwargs for get_model, expected head, input size): convnets run on 64x64 inputs;
# vit_b_16 is built for 32x32 images (2x2 patches) so its forward pass stays cheap.
OTHER_ARCHS = [
    ("mobilenet_v3_small", {}, Head("classifier.3", 1024), 64),
    ("efficientnet_b0", {}, Head("classifier.1", 1280), 64),
    ("vit_b_16", {"image_size": 32}, Head("heads.head", 768), 32),
]


@pytest.mark.parametrize(("arch", "kwargs", "expected", "size"), OTHER_ARCHS, ids=[a[0] for a in OTHER_ARCHS])
def test_head_is_found_in_other_architectures(arch: str, kwargs: dict[str, Any], expected: Head,
                                              size: int) -> None:
    """``find_head`` picks the layer producing the 1000 ImageNet scores (not an earlier Linear
    such as MobileNet's 576->1024 or ViT's MLPs), and the new head gives ``n`` scores."""
    model = torchvision.models.get_model(arch, weights=None, **kwargs)
    head = find_head(model)
    assert head == expected
    assert model.get_submodule(head.name).out_features == 1000
    assert replace_head(model, 3) == expected
    new = model.get_submodule(head.name)
    assert type(new) is nn.Linear and (new.in_features, new.out_features) == (expected.in_features, 3)
    assert forward(model, size).shape == (1, 3)


def test_all_convolutional_head_is_replaced_by_a_1x1_conv() -> None:
    """SqueezeNet has no Linear layer: its classifier is the last 1x1 convolution."""
    model = torchvision.models.get_model("squeezenet1_0", weights=None)
    assert replace_head(model, 3) == Head("classifier.1", 512)
    conv = model.classifier[1]
    assert isinstance(conv, nn.Conv2d) and (conv.in_channels, conv.out_channels) == (512, 3)
    assert forward(model, 64).shape == (1, 3)


def test_unknown_arch_is_a_user_error() -> None:
    """A typo in model.arch names the key and suggests real names, instead of a KeyError."""
    with pytest.raises(UserError, match=r"model.arch 'resnet19' is not a torchvision .*close: .*resnet18"):
        create_backbone("resnet19")


def test_feature_extract_freezes_everything_but_the_head() -> None:
    """Only the head's parameters stay trainable, and they are what the optimizer gets."""
    model = create_backbone("resnet18")
    head = replace_head(model, 2)
    trainable = freeze_backbone(model, head)
    head_params = list(model.fc.parameters())
    assert [id(p) for p in trainable] == [id(p) for p in head_params]
    for name, param in model.named_parameters():
        assert param.requires_grad == name.startswith("fc."), name
    assert sum(p.numel() for p in trainable) == 512 * 2 + 2
    # What stages/train.py does with them: the optimizer holds the head only.
    optimizer = torch.optim.SGD(trainable, lr=0.001, momentum=0.9)
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in held} == {id(p) for p in head_params}


def test_loading_weights_ignores_the_head_and_copies_the_rest() -> None:
    """A 1000-class ImageNet state_dict loads into a model whose head was already replaced;
    the backbone gets the file's tensors exactly, the new head is left alone."""
    state = random_state_dict("resnet18", seed=1)
    model = create_backbone("resnet18")
    replace_head(model, 2)
    head_before = model.fc.weight.detach().clone()
    load_backbone_state(model, state, "test weights")
    loaded = model.state_dict()
    for key, value in state.items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], value), key
    assert torch.equal(model.fc.weight, head_before)


def test_weights_of_another_arch_list_missing_and_unexpected_keys() -> None:
    """The usual mistake (weights of another model) shows which keys do not fit."""
    state = random_state_dict("mobilenet_v3_small", seed=1)
    model = create_backbone("resnet18")
    with pytest.raises(UserError) as info:
        load_backbone_state(model, state, "weights file other.pth")
    message = str(info.value)
    assert message.startswith("weights file other.pth does not match ResNet:")
    assert "missing keys (bn1.bias, bn1.num_batches_tracked" in message
    assert "unexpected keys (classifier.0.bias" in message


def test_wrong_shapes_are_named() -> None:
    """Same keys, other sizes (e.g. a modified resnet): a clear error, not a torch traceback."""
    state = random_state_dict("resnet18", seed=1)
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    with pytest.raises(UserError, match=r"wrong shape .*conv1.weight \(64, 3, 3, 3\) vs \(64, 3, 7, 7\)"):
        load_backbone_state(create_backbone("resnet18"), state, "w.pth")


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".safetensors"])
def test_state_dict_files_are_read(tmp_path: Path, suffix: str) -> None:
    """Every suffix the weights param accepts gives back the saved tensors exactly."""
    state = random_state_dict("mobilenet_v3_small", seed=2)  # small: the format is what counts
    loaded = read_state_dict(save_state_dict(state, tmp_path / f"w{suffix}"))
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


class _Touch:
    """A pickle payload that creates a file when unpickled: what a malicious .pth can do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_pickled_code_is_never_run(tmp_path: Path) -> None:
    """Weight files are loaded with ``weights_only=True``: a pickle that runs code is refused."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "x": _Touch(marker)}, path)
    with pytest.raises(UserError, match=r"weights file .*evil\.pth holds pickled Python objects beyond tensors"):
        read_state_dict(path)
    assert not marker.exists()
    # The payload is real: an unrestricted unpickler does run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_whole_model_pickle_is_refused(tmp_path: Path) -> None:
    """``torch.save(model)`` (not ``model.state_dict()``) is a common mistake: one clear line."""
    path = tmp_path / "model.pth"
    torch.save(create_backbone("resnet18"), path)
    with pytest.raises(UserError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert message.startswith(f"weights file {path} holds pickled Python objects beyond tensors "
                              "(torchvision.models.resnet.ResNet), which loading could run as code: refused. Save a "
                              "plain state_dict (torch.save(model.state_dict(), path))")
    assert "\n" not in message and len(message) < 400


@pytest.mark.parametrize("payload", [{"state_dict": {"w": torch.zeros(1)}}, [torch.zeros(1)]],
                         ids=["nested", "list"])
def test_checkpoint_that_is_not_a_plain_state_dict(tmp_path: Path, payload: object) -> None:
    """Training checkpoints (``{"state_dict": ...}``) load safely but are not weights: say so."""
    path = tmp_path / "ckpt.pth"
    torch.save(payload, path)
    with pytest.raises(UserError, match="is not a plain state_dict"):
        read_state_dict(path)


def test_missing_and_misnamed_weight_files(tmp_path: Path) -> None:
    """Each way a weights path can be wrong gets its own message naming the file."""
    with pytest.raises(UserError, match=r"weights file .*nowhere\.pth does not exist"):
        read_state_dict(tmp_path / "nowhere.pth")
    other = tmp_path / "weights.bin"
    other.write_bytes(b"weights")
    with pytest.raises(UserError, match=r"must end in \.pth, \.pt, \.safetensors"):
        read_state_dict(other)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot read weights file"):
        read_state_dict(garbage)


def test_torchvision_weight_names() -> None:
    """Names resolve to torchvision's enum; a wrong one lists the valid names, once each."""
    enum = torchvision.models.ResNet18_Weights
    assert torchvision_weights("resnet18", "DEFAULT") is enum.DEFAULT
    assert torchvision_weights("resnet18", "IMAGENET1K_V1") is enum.IMAGENET1K_V1
    with pytest.raises(UserError, match=r"'IMAGENET1K_V9' is neither .* \(DEFAULT, IMAGENET1K_V1\)"):
        torchvision_weights("resnet18", "IMAGENET1K_V9")


@pytest.mark.parametrize(("url", "prefix"), [
    ("https://download.pytorch.org/models/resnet18-f37072fd.pth", "f37072fd"),
    ("https://download.pytorch.org/models/efficientnet_b0_rwightman-7f5810bc.pth", "7f5810bc"),
    ("https://download.pytorch.org/models/mobilenet_v3_small-047dcff4.pth", "047dcff4"),
    ("https://example.invalid/models/resnet18.pth", None),
    ("https://example.invalid/models/resnet18-abc.pth", None),  # too short to be a digest
    ("https://example.invalid/models/resnet18-XYZ12345.pth", None),  # not hex
])
def test_weights_hash_prefix(url: str, prefix: str | None) -> None:
    """torchvision's naming convention ``<name>-<first sha256 hex digits>.pth``."""
    assert weights_hash_prefix(url) == prefix


def test_resnet18_weights_url_has_a_hash_prefix() -> None:
    """The weights stage checks cached files against it; the tutorial's weights must have one."""
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    assert weights_hash_prefix(url) == "f37072fd"
