"""Stage ``weights``: the backbone's starting weights (``model.weights``: torchvision's, timm's,
``none`` or a local file; docs/data-and-models.md) in a file DVC tracks, so that training never
touches the network. The keys are checked against ``model.arch``; the sidecar records where
the weights came from and the preprocessing they expect.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from transfer.checkpoints import PretrainedMeta, save_checkpoint
from transfer.download import fetch, sha256_of
from transfer.errors import UserError
from transfer.models import (
    STATE_SUFFIXES,
    create_backbone,
    load_backbone_state,
    pretrained_preprocess,
    read_state_dict,
    timm_pretrained,
    torchvision_weights,
    weights_hash_prefix,
)
from transfer.params import load_params
from transfer.stage import run_stage, stage_parser


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--out", type=Path, default="models/pretrained.pt")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    arch, weights = params.model.arch, params.model.weights
    model = create_backbone(arch, args.params)  # validates the arch before anything is downloaded
    path: Path | None = None
    if weights.lower() == "none":
        state: dict[str, torch.Tensor] = {}
        source = "none (random initialisation from seed)"
    elif weights.endswith(STATE_SUFFIXES):
        path = Path(os.path.expanduser(weights))  # ~nosuchuser stays as it is, and then does not exist
        source = str(path)
    elif arch.startswith("timm/"):
        model = timm_pretrained(arch, weights, args.params)
        state, source = model.state_dict(), f"timm {model.pretrained_cfg.get('hf_hub_id') or arch}"
    else:  # torchvision's: from torch's cache, or downloaded into it, where torchvision puts it
        source = torchvision_weights(arch, weights, args.params).url
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(source).name
        prefix = weights_hash_prefix(source) or ""

        def matches_prefix(file: Path) -> str | None:
            digest = sha256_of(file)
            return None if digest.startswith(prefix) else \
                f"sha256 {digest} does not start with {prefix}, as the file name says it must"

        if not path.is_file():
            fetch(source, path, retries=params.runtime.download_retries, timeout=params.runtime.download_timeout,
                  check=matches_prefix,
                  hint=f"download {source} by hand into {path.parent}/ (or set model.weights in {args.params} to a "
                  "local .pth file)")
        elif problem := matches_prefix(path):
            raise UserError(f"cached weights {path} are damaged ({problem}); delete the file and rerun")
    if path:  # a state_dict file: checked against the arch
        state = read_state_dict(path)
        load_backbone_state(model, state, f"weights file {path}")
    save_checkpoint(args.out, state, PretrainedMeta(
        arch=arch, weights=weights, pretrained=bool(state), source=source, sha256=sha256_of(path) if path else None,
        preprocess=pretrained_preprocess(arch, weights, model)))
    print(f"weights for {arch}: {source} -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
