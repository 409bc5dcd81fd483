"""Stage ``weights``: the backbone's starting weights (``model.weights``: torchvision's, timm's,
``none`` or a local file; docs/data-and-models.md) in a file DVC tracks, so that training never
touches the network. The keys are checked against ``model.arch``; the sidecar records where
the weights came from and the preprocessing they expect.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from transfer.checkpoints import PretrainedMeta, save_checkpoint
from transfer.download import fetch, sha256_of
from transfer.errors import UserError
from transfer.models import (
    STATE_SUFFIXES,
    TIMM_PREFIX,
    create_backbone,
    load_backbone_state,
    pretrained_preprocess,
    read_state_dict,
    timm_pretrained,
    torchvision_weights,
    weights_hash_prefix,
)
from transfer.params import RuntimeParams, load_params
from transfer.stage import run_stage


def download_torchvision_weights(arch: str, name: str, net: RuntimeParams, params_file: str) -> tuple[Path, str]:
    """Return the verified local file of torchvision's weights ``name`` and its URL."""
    url = torchvision_weights(arch, name, params_file).url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    prefix = weights_hash_prefix(url)

    def matches_prefix(path: Path) -> str | None:
        digest = sha256_of(path)
        if prefix and not digest.startswith(prefix):
            return f"sha256 {digest} does not start with {prefix}, as the file name says it must"
        return None

    if cached.is_file():
        problem = matches_prefix(cached)
        if problem is None:
            return cached, url
        raise UserError(f"cached weights {cached} are damaged ({problem}); delete the file and rerun")
    hint = (f"download {url} by hand into {cached.parent}/ (or set model.weights in {params_file} "
            "to a local .pth file)")
    fetch(url, cached, retries=net.download_retries, timeout=net.download_timeout, check=matches_prefix, hint=hint)
    return cached, url


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, default=Path("models/pretrained.pt"))
    args = parser.parse_args(argv)

    params = load_params(args.params)
    arch, weights = params.model.arch, params.model.weights
    model = create_backbone(arch, args.params)  # validates the arch before anything is downloaded
    sha256 = None
    if weights.lower() == "none":
        state: dict[str, torch.Tensor] = {}
        source = "none (random initialisation from seed)"
    elif weights.endswith(STATE_SUFFIXES):
        path = Path(os.path.expanduser(weights))  # ~nosuchuser stays as it is, and then does not exist
        state = read_state_dict(path)
        load_backbone_state(model, state, f"weights file {path}")
        source, sha256 = str(path), sha256_of(path)
    elif arch.startswith(TIMM_PREFIX):
        model = timm_pretrained(arch, weights, args.params)
        state = model.state_dict()
        source = f"timm {model.pretrained_cfg.get('hf_hub_id') or arch}"
    else:
        path, source = download_torchvision_weights(arch, weights, params.runtime, args.params)
        state = read_state_dict(path)
        load_backbone_state(model, state, f"weights file {path}")
        sha256 = sha256_of(path)
    save_checkpoint(args.out, state, PretrainedMeta(
        arch=arch, weights=weights, pretrained=weights.lower() != "none", source=source, sha256=sha256,
        preprocess=pretrained_preprocess(arch, weights, model)))
    print(f"weights for {arch}: {source} -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
