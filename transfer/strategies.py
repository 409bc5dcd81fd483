"""Transfer strategies as data: one record per strategy, which the stages read instead of
branching on names (docs/strategies.md compares them), and the schemas of their recipes.

A record says what a strategy trains on (the images, or the frozen backbone's stored
features), what it starts from (the pretrained backbone with a new head, or another
strategy's trained classifier) and which parameters train. Adding a strategy is a record
here, its recipe in :class:`transfer.params.TrainParams` and params.yaml, and its entries in
dvc.yaml's train and evaluate stages. Torch-free: params.py reads it in every stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field, model_validator

from transfer.schema import Problem, Schema

#: Counts go to torch and the operating system as C ints.
MAX_INT = 2**31 - 1
Count = Annotated[int, Field(gt=0, le=MAX_INT)]
CountOrZero = Annotated[int, Field(ge=0, le=MAX_INT)]
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]


class Recipe(Schema):
    """SGD with momentum and a StepLR schedule, the tutorial's recipe."""

    epochs: Count
    lr: Positive
    momentum: NonNegative
    weight_decay: NonNegative
    step_size: Count  # multiply lr by gamma every step_size epochs
    gamma: Positive


class FinetuneRecipe(Recipe):
    """Training every parameter: the backbone at ``backbone_lr_scale`` times the head's lr,
    after ``freeze_epochs`` epochs of the head alone."""

    backbone_lr_scale: Annotated[float, Field(gt=0, le=1)]
    freeze_epochs: CountOrZero
    sync_batchnorm: bool

    @model_validator(mode="after")
    def _warm_up_ends(self) -> FinetuneRecipe:
        if self.freeze_epochs >= self.epochs:
            raise Problem("freeze_epochs", f"must be less than epochs ({self.epochs}), got {self.freeze_epochs}")
        return self


class FeatureExtractRecipe(Recipe):
    """Training the head alone on the stored features (see :mod:`transfer.stored_features`)."""

    batchnorm: Literal["frozen", "update"]
    views: CountOrZero | Literal["auto"]

    @model_validator(mode="after")
    def _views_follow_the_statistics(self) -> FeatureExtractRecipe:
        if self.batchnorm == "update" and self.views != "auto":
            raise Problem("views", "must be auto with batchnorm: update (the BatchNorm statistics change with every "
                          f"epoch's batches), got {self.views}")
        return self


@dataclass(frozen=True)
class Strategy:
    inputs: Literal["images", "features"]  #: features: the features stage's output, for train.feature_extract
    start: str | None  #: the strategy whose trained classifier it starts from; None: the pretrained backbone
    trains: Literal["head", "all"]


STRATEGIES: dict[str, Strategy] = {
    "finetune": Strategy(inputs="images", start=None, trains="all"),
    "feature_extract": Strategy(inputs="features", start=None, trains="head"),
    "lp_ft": Strategy(inputs="images", start="feature_extract", trains="all"),
}
