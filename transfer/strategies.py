"""Transfer strategies as data: one record per strategy, which the stages read instead of
branching on names (docs/strategies.md compares them).

A record says what a strategy trains on (the images, or the frozen backbone's stored
features), what it starts from (the pretrained backbone with a new head, or another
strategy's trained classifier), which parameters train, and the schema of its params under
``train.<name>``. Adding a strategy is a record here, its params in params.yaml, and its
entries in dvc.yaml's train and evaluate stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # params.py reads the table: every stage imports this module, most without torch
    from torch import nn

    from transfer.models import Head


@dataclass(frozen=True)
class Recipe:
    """SGD with momentum and a StepLR schedule, the tutorial's recipe."""

    epochs: int = field(metadata={"gt": 0})
    lr: float = field(metadata={"gt": 0})
    momentum: float = field(metadata={"ge": 0})
    weight_decay: float = field(metadata={"ge": 0})
    step_size: int = field(metadata={"gt": 0})  # multiply lr by gamma every step_size epochs
    gamma: float = field(metadata={"gt": 0})


@dataclass(frozen=True)
class FinetuneRecipe(Recipe):
    """Training every parameter: the backbone at ``backbone_lr_scale`` times the head's lr,
    after ``freeze_epochs`` epochs of the head alone."""

    backbone_lr_scale: float = field(metadata={"gt": 0, "le": 1})
    freeze_epochs: int = field(metadata={"ge": 0})
    sync_batchnorm: bool

    def check(self) -> tuple[str, str] | None:
        if self.freeze_epochs >= self.epochs:
            return "freeze_epochs", f"must be less than epochs ({self.epochs}), got {self.freeze_epochs}"
        return None


@dataclass(frozen=True)
class FeatureExtractRecipe(Recipe):
    """Training the head alone on the stored features (see :mod:`transfer.features`)."""

    batchnorm: Literal["frozen", "update"]
    views: int | Literal["auto"] = field(metadata={"ge": 0})

    def check(self) -> tuple[str, str] | None:
        if self.batchnorm == "update" and self.views != "auto":
            return "views", ("must be auto with batchnorm: update (the BatchNorm statistics change with every "
                             f"epoch's batches), got {self.views}")
        return None


@dataclass(frozen=True)
class Strategy:
    inputs: Literal["images", "features"]  #: features: the features stage's output, for train.feature_extract
    start: str | None  #: the strategy whose trained classifier it starts from; None: the pretrained backbone
    trains: Literal["head", "all"]
    recipe: type[Recipe]  #: the schema of train.<name>


STRATEGIES: dict[str, Strategy] = {
    "finetune": Strategy(inputs="images", start=None, trains="all", recipe=FinetuneRecipe),
    "feature_extract": Strategy(inputs="features", start=None, trains="head", recipe=FeatureExtractRecipe),
    "lp_ft": Strategy(inputs="images", start="feature_extract", trains="all", recipe=FinetuneRecipe),
}


def param_groups(model: nn.Module, head: Head, recipe: Recipe) -> list[dict[str, object]]:
    """The optimizer's parameter groups: the head at ``recipe.lr``, first (its lr is the one
    the history records), then, for a recipe that trains the backbone, the backbone at
    ``backbone_lr_scale`` times that."""
    head_params = list(model.get_submodule(head.name).parameters())
    groups: list[dict[str, object]] = [{"params": head_params, "lr": recipe.lr}]
    if isinstance(recipe, FinetuneRecipe):
        ids = {id(p) for p in head_params}
        backbone = [p for p in model.parameters() if id(p) not in ids]
        groups.append({"params": backbone, "lr": recipe.lr * recipe.backbone_lr_scale})
    return groups


@dataclass(frozen=True)
class WarmUp:
    """The first ``epochs`` epochs train the head alone: the backbone's parameters take no
    gradient and its layers stay in eval mode (BatchNorm statistics fixed, as in
    feature_extract); then the backbone joins."""

    epochs: int
    head: nn.Module
    backbone: list[nn.Parameter]

    def frozen(self, epoch: int) -> bool:
        return epoch <= self.epochs

    def apply(self, epoch: int) -> None:
        for param in self.backbone:
            param.requires_grad_(not self.frozen(epoch))
