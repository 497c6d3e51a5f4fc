"""Schema models of the files a training run writes: ``supernet.json`` and the checkpoint's metadata.

Both are :class:`search_spaces.schema.Schema` models (frozen, strict, unknown fields refused);
:func:`search_spaces.schema.validate` turns a bad file into one line of
:class:`~search_spaces.errors.FileFormatError`.

``supernet.json`` is at schema 1, the format every ``nas-train`` so far has written: the
fields below, in this order. The resolution is an int (square inputs; a non-square run will
need schema 2, with ``[height, width]`` as :func:`search_spaces.resolution_json` writes it).
Only ``schema``, ``space``, ``resolution``, ``num_classes``, ``in_chans``, ``recipe``,
``weights_sha256`` and ``complete`` are required, so hand-made run folders (tests, other tools)
keep loading.

The checkpoint's metadata (the JSON in the ``formslim`` entry of ``checkpoint.safetensors``)
holds the training settings, the step, the log, the optimizer's non-tensor state, the run
metadata and the running sums of the current epoch.
"""
from __future__ import annotations

from typing import Final, Literal

from pydantic import ConfigDict, Field, JsonValue, field_validator, model_validator

from search_spaces import SearchSpace
from search_spaces.schema import Schema

__all__ = ["SUPERNET_SCHEMA", "DatasetInfo", "EpochRow", "RunMeta", "SupernetFile", "EpochSums",
           "OptimizerMeta", "CheckpointMeta"]

#: The ``schema`` number of the ``supernet.json`` files this version writes.
SUPERNET_SCHEMA: Final = 1


class DatasetInfo(Schema):
    """What the run was trained on (``DatasetSplits.describe()``)."""

    name: str
    num_classes: int = Field(ge=1)
    in_chans: int = Field(ge=1)
    resolution: int = Field(ge=1)
    sizes: dict[str, int]
    mean: list[float]
    std: list[float]
    class_names: list[str]


class EpochRow(Schema):
    """One row of the training log, written at the end of every epoch."""

    epoch: int = Field(ge=1)
    step: int = Field(ge=0)
    lr: float
    train_loss: float
    epoch_seconds: float
    images_per_s: float
    val_acc_largest: float | None = Field(None, ge=0, le=1)
    val_acc_smallest: float | None = Field(None, ge=0, le=1)


class RunMeta(Schema):
    """The run's metadata: what the supernet is (space, input, classes) and how it was trained."""

    model_config = ConfigDict(populate_by_name=True)

    schema_version: Literal[1] = Field(alias="schema")
    space: dict[str, JsonValue]
    space_name: str | None = None
    space_hash: str | None = None
    family: str | None = None
    resolution: int = Field(ge=1)
    num_classes: int = Field(ge=1)
    in_chans: int = Field(ge=1)
    distillation: bool | None = None
    dataset: DatasetInfo | None = None
    recipe: dict[str, JsonValue]

    @field_validator("space")
    @classmethod
    def _space_loads(cls, value: dict[str, JsonValue]) -> dict[str, JsonValue]:
        SearchSpace.from_dict(value)  # a NasUserError (a ValueError) becomes this field's error
        return value

    def to_json(self) -> dict[str, JsonValue]:
        """The JSON object as written (``schema`` first, unset optional fields included)."""
        return self.model_dump(mode="json", by_alias=True)


class SupernetFile(RunMeta):
    """``supernet.json``: the run metadata plus the weights' checksum, the metrics and the log."""

    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    metrics: dict[str, float] = Field(default_factory=dict)
    log: list[EpochRow] = Field(default_factory=list)
    complete: bool


class EpochSums(Schema):
    """Running sums of the current epoch, so that a run resumed mid-epoch logs the whole epoch."""

    loss_sum: float = 0.0
    loss_n: int = Field(default=0, ge=0)
    seen: int = Field(default=0, ge=0)
    seconds: float = 0.0


class OptimizerMeta(Schema):
    """The optimizer's state besides its tensors (:func:`supernet.checkpoint.optimizer_to_tensors`)."""

    param_groups: list[dict[str, JsonValue]]
    scalars: dict[str, dict[str, JsonValue]] = Field(default_factory=dict)


class CheckpointMeta(Schema):
    """The JSON metadata of ``checkpoint.safetensors``."""

    config: dict[str, JsonValue]
    step: int = Field(ge=0)
    total: int = Field(ge=1)
    log: list[EpochRow]
    optimizer: OptimizerMeta
    meta: RunMeta
    epoch_running: EpochSums = Field(default_factory=lambda: EpochSums())

    @model_validator(mode="after")
    def _step_in_range(self) -> CheckpointMeta:
        if self.step > self.total:
            raise ValueError(f"step {self.step} is beyond the run's total of {self.total} steps")
        return self
