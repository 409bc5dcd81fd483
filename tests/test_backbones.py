"""Any backbone: torchvision classifiers and ``timm/`` models get a new head wherever their
classifier sits, feature extraction trains that head only (no graph through the backbone),
preprocessing follows the weights' metadata, and weights come from local files without the
network.

Every model is randomly initialised; "pretrained" files are state_dicts the tests save. Wide
sweeps build models on PyTorch's ``meta`` device (shapes only, no memory, no arithmetic), so
checking a family costs a fraction of a second; the models that really train are small.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import timm
import torch
import torchvision
from conftest import error_line, stage_env
from imagefolders import (
    Tensors,
    load_trained,
    loader,
    make_image_folders,
    preprocess,
    random_state_dict,
    run_training,
    save_state_dict,
    tiny_params,
    tutorial_transform,
)
from PIL import Image
from torch import nn

import stages.train
import stages.weights
from transfer.archive import split_off
from transfer.checkpoints import CheckpointMeta, PretrainedMeta, read_meta
from transfer.download import sha256_of
from transfer.errors import UserError
from transfer.models import (
    check_input_size,
    create_backbone,
    find_head,
    freeze_backbone,
    load_backbone_state,
    pretrained_preprocess,
    replace_head,
)
from transfer.params import PreprocessParams
from transfer.preprocess import IMAGENET, Preprocess, resolve_preprocess
from transfer.stage import run_stage
from transfer.training import WarmUp, train_model

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
TIMM_SMALL = "timm/mobilenetv3_small_050"  # 1.6M parameters; its classifier follows a wider pre-logits layer


def build(arch: str, device: str = "meta") -> nn.Module:
    """``create_backbone(arch)`` on ``device``; ``meta`` builds the module tree without tensors."""
    with torch.device(device):
        return create_backbone(arch)


# --------------------------------------------------------------------------- heads and freezing

#: (arch, where its classifier is, input size): the issue's torchvision four and three timm
#: models whose heads sit in different places. ViTs need their 224-pixel input.
BACKBONES = [
    ("resnet18", "fc", 64),
    ("mobilenet_v3_small", "classifier.3", 64),
    ("efficientnet_b0", "classifier.1", 64),
    ("vit_b_16", "heads.head", 224),
    (TIMM_SMALL, "classifier", 64),
    ("timm/vit_tiny_patch16_224", "head", 224),
    ("timm/convnext_atto", "head.fc", 64),
]


@pytest.mark.parametrize(("arch", "head_name", "size"), BACKBONES, ids=[b[0] for b in BACKBONES])
def test_new_head_and_feature_extraction(arch: str, head_name: str, size: int) -> None:
    """The new 3-way head is the model's last layer; after ``freeze_backbone`` only it needs
    gradients; a feature-extract epoch of the real training loop changes nothing but the
    head, computes the features without an autograd graph (the head's input does not
    require grad, while it does before freezing) and leaves no gradient in the backbone."""
    torch.manual_seed(0)
    model = create_backbone(arch)
    head = replace_head(model, 3)
    assert head.name == head_name
    layer = model.get_submodule(head.name)
    assert isinstance(layer, nn.Linear) and (layer.in_features, layer.out_features) == (head.in_features, 3)

    seen: list[tuple[bool, torch.Tensor]] = []  # per head call: input requires grad, output
    hook = layer.register_forward_hook(lambda _m, inp, out: seen.append((inp[0].requires_grad, out.detach())))
    images = torch.randn(1, 3, size, size)
    model.eval()
    out = model(images)  # nothing frozen yet: the features carry a graph (the control)
    assert out.shape == (1, 3)
    assert seen == [(True, seen[0][1])] and torch.equal(out.detach(), seen[0][1]), "head is not the last layer"

    trainable = freeze_backbone(model, head)
    prefix = f"{head.name}."
    assert [id(p) for p in trainable] == [id(p) for p in layer.parameters()]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {prefix + "weight", prefix + "bias"}

    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen.clear()
    batches = loader(Tensors(images, [2]), batch_size=1)
    optimizer = torch.optim.SGD(trainable, lr=0.1, momentum=0.9, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7)
    train_model(model, {"train": batches, "val": batches}, nn.CrossEntropyLoss(reduction="sum"), optimizer, scheduler,
                1, torch.device("cpu"), warmup=WarmUp(1, layer, []))  # the head alone, the rest in eval mode
    hook.remove()

    assert len(seen) == 2 and not any(requires for requires, _ in seen), "features were computed with a graph"
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {prefix + "weight", prefix + "bias"}  # BatchNorm statistics included
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith(prefix))


#: With BACKBONES, one model of each torchvision classification family (built on ``meta``),
#: and timm models whose classifier is a 1x1 convolution (dla34) or nested behind a wider
#: pre-logits layer (efficientvit_b0).
FAMILIES = [
    "alexnet", "convnext_tiny", "densenet121", "googlenet", "inception_v3", "maxvit_t", "mnasnet0_5",
    "regnet_y_400mf", "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_1", "swin_v2_t", "vgg11_bn",
    "wide_resnet50_2", "timm/dla34", "timm/efficientvit_b0",
]


def test_families_cover_torchvision() -> None:
    """Every family of ``torchvision.models``' classifiers has a representative above, so a
    new one (with a new kind of head) gets checked too."""
    def family(name: str) -> str:
        return name.split("_")[0].rstrip("0123456789")

    names = torchvision.models.list_models(module=torchvision.models)
    covered = [n for n in FAMILIES + [b[0] for b in BACKBONES] if not n.startswith("timm/")]
    assert {family(n) for n in names} == {family(n) for n in covered}


@pytest.mark.filterwarnings("ignore:The default weight initialization:FutureWarning")  # torchvision's own
@pytest.mark.parametrize("arch", FAMILIES)
def test_head_is_found_in_every_family(arch: str) -> None:
    """The layer found is the one producing the 1000 ImageNet scores, its input width is
    reported correctly, and after replacement the model gives 3 scores in eval and in
    training mode (a plain tensor: GoogLeNet and Inception v3 would add auxiliary outputs)."""
    try:
        model, size = build(arch), 224
    except NotImplementedError:  # RegNet computes its widths with real tensors: build it for real
        model, size = build(arch, "cpu"), 32
    device = next(model.parameters()).device
    head = find_head(model)
    layer = model.get_submodule(head.name)
    if isinstance(layer, nn.Conv2d):
        assert (layer.in_channels, layer.out_channels, layer.kernel_size) == (head.in_features, 1000, (1, 1))
    else:
        assert (layer.in_features, layer.out_features) == (head.in_features, 1000)
    with torch.device(device):
        assert replace_head(model, 3).name == head.name
    for training in (False, True):
        out = model.train(training)(torch.zeros(2, 3, size, size, device=device))
        assert type(out) is torch.Tensor and out.shape == (2, 3), (training, type(out))


@pytest.mark.filterwarnings("ignore:The default weight initialization:FutureWarning")
@pytest.mark.parametrize("arch", ["googlenet", "inception_v3"])
def test_auxiliary_classifiers_are_dropped_but_their_weights_load(arch: str) -> None:
    """torchvision's pretrained GoogLeNet and Inception v3 files hold auxiliary classifiers,
    which torchvision drops after loading (and turns ``transform_input`` on, which converts
    ImageNet-normalised input to the scaling those weights expect). Such a file loads
    without an "unexpected keys" error into a model that does the same."""
    with torch.device("meta"):
        reference = torchvision.models.get_model(arch, weights=None, aux_logits=True, init_weights=False)
        model = create_backbone(arch)
    state = reference.state_dict()
    aux = {k for k in state if k.split(".")[0] in ("aux1", "aux2", "AuxLogits")}
    assert aux and not aux & model.state_dict().keys()
    load_backbone_state(model, state, f"{arch}.pth")
    assert model.transform_input is True and model.aux_logits is False


def test_timm_arch_with_an_unknown_tag_is_one_clear_error() -> None:
    """``timm.is_model`` accepts any ``name.tag``; a wrong tag must not end in a traceback."""
    with pytest.raises(UserError, match=r"model.arch 'timm/resnet18.nosuch': 'nosuch' is not a pretrained "
                                        r"tag of resnet18 \(tags: a1_in1k, .*tv_in1k"):
        create_backbone("timm/resnet18.nosuch")
    assert find_head(build("timm/resnet18.tv_in1k")).name == "fc"


@pytest.mark.parametrize(("arch", "crop", "accepted"), [
    ("vit_b_16", 32, False), ("vit_b_16", 224, True), ("resnet18", 32, True),
])
def test_input_size_the_backbone_cannot_take_is_one_clear_error(arch: str, crop: int, accepted: bool) -> None:
    """ViTs take exactly their training size: a wrong crop fails before training, naming the param."""
    model = create_backbone(arch)
    if accepted:
        check_input_size(model, crop)
        assert model.training  # the probe leaves the model's mode as it was
    else:
        with pytest.raises(UserError, match=rf"cannot take {crop}x{crop} images .*set preprocess.crop"):
            check_input_size(model, crop)


def test_unknown_timm_model_suggests_close_names() -> None:
    """A misspelt timm name gets the names it was probably meant to be, not timm's KeyError."""
    with pytest.raises(UserError, match=r"'timm/convnext_attoo' is not a timm model \(close: convnext_atto"):
        create_backbone("timm/convnext_attoo")


# --------------------------------------------------------------------------- preprocessing

AUTO = PreprocessParams(resize="auto", crop="auto", interpolation="auto", mean="auto", std="auto")


def photo() -> Image.Image:
    """A landscape 300x200 noise image: resizing must act on the shorter side, then crop."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (200, 300, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


@pytest.mark.parametrize(("arch", "weights", "resize", "crop", "interpolation"), [
    ("resnet18", "IMAGENET1K_V1", 256, 224, "bilinear"),
    ("efficientnet_b3", "DEFAULT", 320, 300, "bicubic"),
    ("vit_b_16", "IMAGENET1K_SWAG_E2E_V1", 384, 384, "bicubic"),
])
def test_torchvision_weights_metadata(arch: str, weights: str, resize: int, crop: int, interpolation: str) -> None:
    """With every key ``auto``, validation images are preprocessed exactly as torchvision's
    own ``weights.transforms()`` does it (compared pixel for pixel)."""
    meta = pretrained_preprocess(arch, weights, build(arch))
    assert meta == preprocess(resize, crop, interpolation, IMAGENET_MEAN, IMAGENET_STD)
    ours = tutorial_transform(resolve_preprocess(AUTO, meta))(photo())
    reference = torchvision.models.get_model_weights(arch)[weights].transforms()(photo())
    assert ours.shape == reference.shape == (3, crop, crop)
    torch.testing.assert_close(ours, reference)


@pytest.mark.parametrize("weights", ["none", "/somewhere/weights.pth", "w.safetensors"])
def test_torchvision_without_metadata(weights: str) -> None:
    """Random and local weights carry no metadata: ``auto`` then means the tutorial's values."""
    assert pretrained_preprocess("efficientnet_b3", weights, build("efficientnet_b3")) is None
    assert resolve_preprocess(AUTO, None) == IMAGENET == preprocess(256, 224, "bilinear", IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.parametrize(("arch", "expected"), [
    ("timm/vit_tiny_patch16_224", preprocess(248, 224, "bicubic", [0.5] * 3, [0.5] * 3)),
    ("timm/convnext_atto", preprocess(256, 224, "bicubic", IMAGENET_MEAN, IMAGENET_STD)),
    ("timm/resnet18.tv_in1k", preprocess(256, 224, "bilinear", IMAGENET_MEAN, IMAGENET_STD)),  # the tag decides
])
def test_timm_metadata(arch: str, expected: Preprocess) -> None:
    """timm's pretrained config (``resolve_data_config``): the same pixels as timm's own
    evaluation transform."""
    model = build(arch)
    pre = resolve_preprocess(AUTO, pretrained_preprocess(arch, "DEFAULT", model))
    assert pre == expected
    config = timm.data.resolve_data_config({}, model=model)
    torch.testing.assert_close(tutorial_transform(pre)(photo()), timm.data.create_transform(**config)(photo()))


def test_explicit_params_win_over_metadata() -> None:
    """Each key on its own: a value in params.yaml wins, ``auto`` takes the metadata's."""
    meta = preprocess(320, 300, "bicubic", [0.5] * 3, [0.25] * 3)
    assert resolve_preprocess(AUTO, meta) == meta
    mixed = PreprocessParams(resize=40, crop=32, interpolation="nearest", mean="auto", std=[0.2, 0.3, 0.4])
    assert resolve_preprocess(mixed, meta) == preprocess(40, 32, "nearest", [0.5] * 3, [0.2, 0.3, 0.4])
    assert resolve_preprocess(mixed, None) == preprocess(40, 32, "nearest", IMAGENET_MEAN, [0.2, 0.3, 0.4])


# --------------------------------------------------------------------------- weights from files, offline

#: Runs modules one after the other in one Python process (one import of torch and timm),
#: each with its own stdout/stderr files, exit code and list of network attempts. Python's
#: audit events fire before a socket connects or a host name is resolved, whatever library
#: asks, and every such attempt is refused and recorded.
OFFLINE_RUNNER = """
import contextlib, json, runpy, sys, traceback
from pathlib import Path
attempts = []
def refuse(event, args):
    if event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex"):
        attempts.append(f"{event} {args!r:.200}")
        raise OSError(f"network access during an offline test: {event}")
sys.addaudithook(refuse)
for folder, module, *args in json.loads(sys.argv[1]):
    folder, code = Path(folder), 0
    attempts.clear()
    with open(folder / "stdout.txt", "w") as out, open(folder / "stderr.txt", "w") as err, \\
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        sys.argv = [module, *args]
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            code = exc.code
        except Exception:
            traceback.print_exc()
            code = "traceback"
    (folder / "result.json").write_text(json.dumps({"exit": code, "attempts": attempts}))
"""


@dataclasses.dataclass(frozen=True)
class OfflineRun:
    folder: Path
    exit: int | str
    stderr: str
    attempts: list[str]


def run_offline(base: Path, runs: dict[str, list[str]]) -> dict[str, OfflineRun]:
    """Run ``python -m <module> <args>`` for each ``name: [module, *args]`` as DVC would, but
    offline: Hugging Face in offline mode with an empty cache, an empty torch cache, proxies
    on a closed port, and every socket connection or name lookup refused."""
    env = stage_env()
    env.update({"HF_HUB_OFFLINE": "1", "HF_HOME": str(base / "hf-home"), "TORCH_HOME": str(base / "torch-home"),
                "OMP_NUM_THREADS": "1"})
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env[name] = "http://127.0.0.1:9"
    plan = [[str(base / name), *command] for name, command in runs.items()]
    proc = subprocess.run([sys.executable, "-c", OFFLINE_RUNNER, json.dumps(plan)], cwd=Path(__file__).parents[1],
                          env=env, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr
    results = {}
    for name in runs:
        result = json.loads((base / name / "result.json").read_text())
        results[name] = OfflineRun(base / name, result["exit"], (base / name / "stderr.txt").read_text(),
                                   result["attempts"])
    return results


def randomised_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """``model``'s state_dict with random BatchNorm statistics, so "loaded from the file"
    differs from "freshly initialised"."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.9, 1.1)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The weights stage run offline for timm models: with "pretrained" weights in a local
    .safetensors file (``file``), with timm's default pretrained weights, which are not in
    the empty cache (``download``), and with a misspelt pretrained tag (``typo``)."""
    base = tmp_path_factory.mktemp("offline")
    torch.manual_seed(5)
    state = randomised_state(timm.create_model(TIMM_SMALL.removeprefix("timm/")), seed=5)
    source = save_state_dict(state, base / "mobilenetv3.safetensors")
    changes = {"file": {"model.weights": str(source), "preprocess.std": [0.5, 0.5, 0.5]},
               "download": {"model.weights": "DEFAULT"},
               "typo": {"model.arch": "timm/resnet18", "model.weights": "a1_in1kk"}}
    runs = {}
    for name, change in changes.items():
        params = tiny_params(base / name / "params.yaml", {"model.arch": TIMM_SMALL, **change})
        runs[name] = ["stages.weights", "--params", str(params), "--out", str(base / name / "models" / "pretrained.pt")]
    return {"state": state, "source": source, **run_offline(base, runs)}


def test_timm_safetensors_file_needs_no_network(offline: dict[str, Any]) -> None:
    """The file's tensors, all of them, become models/pretrained.pt, and its sidecar names
    the file and holds the preprocessing of the timm model's pretrained config."""
    run, state = offline["file"], offline["state"]
    assert run.exit == 0, run.stderr
    assert run.attempts == []
    out = run.folder / "models" / "pretrained.pt"
    stored = torch.load(out, map_location="cpu", weights_only=True)
    assert stored.keys() == state.keys()
    assert all(torch.equal(stored[k], state[k]) for k in state)
    meta = read_meta(out, PretrainedMeta)
    source = offline["source"]
    assert meta == PretrainedMeta(arch=TIMM_SMALL, weights=str(source), pretrained=True, source=str(source),
                                  sha256=sha256_of(source),
                                  preprocess=preprocess(256, 224, "bicubic", IMAGENET_MEAN, IMAGENET_STD))


def test_timm_feature_extract_keeps_the_file_and_records_preprocessing(offline: dict[str, Any],
                                                                        tmp_path: Path) -> None:
    """The train stage starts a timm model from the file, leaves its backbone bit-identical
    in feature_extract mode, and records the preprocessing it used: params where given
    (resize, crop, std), the weights' metadata where ``auto`` (bicubic), for evaluate and
    predict to repeat."""
    data = make_image_folders(tmp_path / "data", n_train=2, n_val=1)
    out = tmp_path / "trained"
    folder = offline["file"].folder
    run_training("feature_extract", folder / "params.yaml", data, folder / "models" / "pretrained.pt", out)
    trained = torch.load(out / "feature_extract.pt", weights_only=True)
    state = offline["state"]
    backbone = [k for k in state if not k.startswith("classifier.")]
    assert len(backbone) > 100
    assert all(torch.equal(trained[k], state[k]) for k in backbone)
    assert trained["classifier.weight"].shape == (2, 1024)

    expected = preprocess(40, 32, "bicubic", IMAGENET_MEAN, [0.5, 0.5, 0.5])
    assert read_meta(out / "feature_extract.pt", CheckpointMeta).preprocess == expected
    model, loaded = load_trained(out / "feature_extract.pt", torch.device("cpu"))
    assert loaded.preprocess == expected
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 2)


def test_timm_file_for_another_model_lists_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A torchvision MobileNetV3 file given for timm's MobileNetV3: one line listing the
    missing and unexpected keys (the classifier's own keys are not counted)."""
    source = save_state_dict(random_state_dict("mobilenet_v3_small"), tmp_path / "torchvision.pth")
    params = tiny_params(tmp_path / "params.yaml", {"model.arch": TIMM_SMALL, "model.weights": str(source)})
    out = tmp_path / "models" / "pretrained.pt"
    with pytest.raises(SystemExit):
        run_stage(stages.weights.main, ["--params", str(params), "--out", str(out)])
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: weights file {source} does not match MobileNetV3: ")
    assert "missing keys (blocks.0.0." in line and "unexpected keys (features.0.0." in line
    assert not out.exists()


def test_unknown_timm_tag_lists_the_tags(offline: dict[str, Any]) -> None:
    """``timm.list_pretrained`` works offline, so a typo is caught, with the tags there are,
    before anything is downloaded."""
    run = offline["typo"]
    assert run.exit == 1 and run.attempts == []
    line = error_line(run.stderr)
    assert re.match(r"error: \S*params\.yaml: model\.weights 'a1_in1kk' is not a pretrained tag of resnet18 "
                    r"\(tags: a1_in1k, a2_in1k, a3_in1k, ", line), line
    assert "tv_in1k" in line and line.endswith("nor none or a .pth/.pt/.safetensors path")


def test_timm_download_offline_is_one_line(offline: dict[str, Any]) -> None:
    """Pretrained timm weights that are not in the Hugging Face cache, offline: one line
    saying what could not be fetched and what to do instead; nothing is written."""
    run = offline["download"]
    assert run.exit == 1
    line = error_line(run.stderr)
    assert line.startswith("error: could not get timm weights mobilenetv3_small_050 (")
    assert line.endswith("run once with network access, or set model.weights to a local .pth/.safetensors file")
    assert run.attempts == [] and not (run.folder / "models" / "pretrained.pt").exists()
    assert not (run.folder / "models" / "pretrained.json").exists()


# --------------------------------------------------------------------------- data sets

def test_val_split_is_stratified_over_uneven_classes() -> None:
    """Each class gives its own rounded share (at least one image, never its last), so a
    small class is not left out of validation; the split depends on the seed only."""
    sizes = {"cats": 10, "dogs": 3, "owls": 2}
    files = [PurePosixPath("train", cls, f"{cls}{i}.png") for cls, n in sizes.items() for i in range(n)]
    files.append(PurePosixPath("train", "cats", "notes.txt"))  # not an image: never moved
    moved = split_off(files, 0.34, seed=1)
    per_class = {cls: sum(1 for rel in moved if rel.parts[1] == cls) for cls in sizes}
    assert per_class == {"cats": 3, "dogs": 1, "owls": 1}
    assert all(dest == PurePosixPath("val", *src.parts[1:]) for src, dest in moved.items())
    assert split_off(list(reversed(files)), 0.34, seed=1) == moved, "depends on the listing order"
    assert split_off(files, 0.34, seed=2) != moved

