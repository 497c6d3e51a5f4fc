"""The settings of a supernet training run, as a schema model: each field is one ``nas-train`` flag.

:class:`TrainConfig` is a pydantic model on :class:`search_spaces.schema.Schema`: frozen, strict
(``true`` is not an integer, ``"3"`` is not a number) and closed (an unknown setting is refused).
Each field carries its type, its constraints and a description; ``nas-train`` generates its
flags from them (:func:`nas._cli.add_schema_flags`), so a new setting is one field here.

A bad value raises :class:`~search_spaces.errors.NasUserError` with one line that names the
setting, the bad value and what is allowed. The setting is named as the caller knows it:
``--epochs`` for a command-line flag, ``run.json: `epochs``` for a ``--config`` file and
```epochs``` for the Python API:

>>> TrainConfig(epochs=0)  # doctest: +IGNORE_EXCEPTION_DETAIL
Traceback (most recent call last):
NasUserError: `epochs` must be an integer >= 1, got 0
>>> TrainConfig.from_dict({"lr": float("nan")}, flags={"lr"})  # doctest: +IGNORE_EXCEPTION_DETAIL
Traceback (most recent call last):
NasUserError: --lr must be a finite number > 0, got nan
>>> TrainConfig(resolution="64").to_dict()["resolution"]
64
"""
from __future__ import annotations

import math
import typing
from typing import Annotated, Callable, Collection, Literal, Mapping

from annotated_types import Ge, Gt, Le, Lt
from pydantic import AfterValidator, BeforeValidator, Field, JsonValue, PlainSerializer, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from search_spaces.errors import NasUserError
from search_spaces.schema import Schema
from search_spaces.setup import format_resolution, parse_resolution, resolution_json

__all__ = ["TrainConfig", "MIN_TRAIN_RESOLUTION", "MAX_TRAIN_RESOLUTION", "allowed_values", "flag_name"]

#: Input sides ``nas-train`` accepts (two stride-2 stem convs and three downsamplings need 16;
#: the data loaders stop at 1024).
MIN_TRAIN_RESOLUTION, MAX_TRAIN_RESOLUTION = 16, 1024

_SIDES = f"within [{MIN_TRAIN_RESOLUTION}, {MAX_TRAIN_RESOLUTION}]"


def _to_hw(value: object) -> object:
    """``32``, ``"32"``, ``"512x1024"`` or ``[512, 1024]`` to ``(height, width)``; anything else is left to fail."""
    if isinstance(value, tuple):
        return value
    try:
        return parse_resolution(value)
    except NasUserError:
        raise PydanticCustomError("resolution", "not a resolution") from None


def _check_sides(hw: tuple[int, int]) -> tuple[int, int]:
    if not all(MIN_TRAIN_RESOLUTION <= side <= MAX_TRAIN_RESOLUTION for side in hw):
        raise PydanticCustomError("resolution", "sides out of range")
    return hw


def _no_bool(value: object) -> object:
    if isinstance(value, bool):  # a Literal[0, ...] would take False as 0
        raise PydanticCustomError("bool", "a bool")
    return value


#: ``(height, width)``; read from ``32``, ``"512x1024"`` or ``[512, 1024]``, written as an int when square.
Resolution = Annotated[tuple[int, int], BeforeValidator(_to_hw), AfterValidator(_check_sides),
                       PlainSerializer(resolution_json, return_type=int | list[int])]
_DEVICE_PATTERN = r"^(cpu|cuda(:[0-9]+)?)$"


def _as_tuple(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value


def _check_inits(value: tuple[str, ...]) -> tuple[str, ...]:
    for item in value:
        name, _, path = item.partition("=")
        if not name or not path:
            raise PydanticCustomError("init", "not PRESET=WEIGHTS")
    return value


#: ``PRESET=WEIGHTS`` items (a JSON list in a ``--config`` file).
Inits = Annotated[tuple[str, ...], BeforeValidator(_as_tuple), AfterValidator(_check_inits)]


class TrainConfig(Schema):
    """Everything that defines a supernet training run (each field is one ``nas-train`` flag).

    Raises:
        NasUserError: a value of the wrong type or out of range, or an unknown setting; the
            message names the setting, the bad value and what is allowed.
    """

    space: str = Field("efficientformer_v2_demo", description="search space of the V1 or V2 family "
                       "(nas-info --list shows them)")
    dataset: str = Field("fashion-mnist", description="fashion-mnist, imagefolder:PATH or synthetic[:N]")
    resolution: Resolution = Field((32, 32), description="input size in pixels: 32, or HEIGHTxWIDTH such as "
                                   "512x1024 (training takes square inputs for now)",
                                   json_schema_extra={"allowed": f"an integer {_SIDES}, or HEIGHTxWIDTH with "
                                                                 f"both sides {_SIDES} (e.g. 32 or 512x1024)",
                                                      "metavar": "N|HxW"})
    stem_stride: Annotated[Literal[0, 2, 4], BeforeValidator(_no_bool)] = Field(
        0, description="stem stride 2 or 4; 0: automatic (2 for resolutions up to 64, for small images; else the "
        "space's ImageNet-shaped 4)")
    epochs: int = Field(5, ge=1, description="passes over the training split")
    batch_size: int = Field(128, ge=2, description="global batch (split across processes)")
    lr: float = Field(2e-3, gt=0, allow_inf_nan=False, description="peak AdamW learning rate, reached after "
                      "--warmup-epochs")
    min_lr: float = Field(1e-5, ge=0, allow_inf_nan=False, description="final learning rate of the cosine "
                          "schedule (at most --lr)")
    weight_decay: float = Field(0.05, ge=0, allow_inf_nan=False, description="AdamW weight decay (none on "
                                "norms, biases, layer scales and attention biases)")
    warmup_epochs: float = Field(0.3, ge=0, allow_inf_nan=False, description="linear warm-up in epochs "
                                 "(at most --epochs)")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="label smoothing of the largest subnet's loss")
    num_random: int = Field(1, ge=0, le=16, description="random subnets per step besides the largest and the "
                            "smallest")
    distill: bool = Field(True, description="train the other subnets on the largest's soft predictions "
                          "(in-place distillation)")
    seed: int = Field(0, ge=0, description="seed of the data order, augmentation, initialisation and subnets")
    train_subset: int | None = Field(None, ge=2, description="train on this many images only (seeded; at "
                                     "least --batch-size)", json_schema_extra={"default_help": "all"})
    val_size: int | None = Field(None, ge=1, description="validation images carved from the training set",
                                 json_schema_extra={"default_help": "the dataset's own"})
    calib_batches: int = Field(8, ge=1, description="batches used to recalibrate BN before each evaluation")
    save_every: int = Field(0, ge=0, description="also checkpoint every N steps (0: at epoch ends only)")
    device: str = Field("cpu", pattern=_DEVICE_PATTERN, description="cpu or cuda",
                        json_schema_extra={"allowed": "cpu, cuda or cuda:N"})
    channels_last: bool = Field(True, description="NHWC memory format")
    bf16: bool | None = Field(None, description="bfloat16 autocast",
                              json_schema_extra={"default_help": "on for cuda, off on cpu"})
    compile: bool = Field(False, description="torch.compile the supernet, one static graph per block spec; "
                          "any compiler failure falls back to eager with a warning",
                          json_schema_extra={"switch": True})
    compile_backend: str = Field("inductor", min_length=1, description="torch.compile backend of --compile: "
                                 "inductor (fused kernels), or aot_eager to debug a compile problem")
    threads: int = Field(0, ge=0, description="torch intra-op threads (0: torch's default)")
    init: Inits = Field((), description="warm start from published weights: PRESET=WEIGHTS, e.g. "
                        "efficientformerv2_s0=s0.pth (timm, snap or mit layout); the preset's weights fill its "
                        "slice of the shared tensors, everything else keeps its default initialisation",
                        json_schema_extra={"repeat": True, "metavar": "PRESET=WEIGHTS", "default_help": "none",
                                           "allowed": "PRESET=WEIGHTS, e.g. efficientformerv2_s0=s0.pth"})
    teacher: str | None = Field(None, min_length=1, description="hard distillation of the largest subnet from a "
                                "teacher (its head_dist learns the teacher's classes): an extracted model folder "
                                "or PRESET=WEIGHTS, predicting the dataset's classes",
                                json_schema_extra={"default_help": "none", "metavar": "PATH"})

    def __init__(self, *, _names: Callable[[str], str] | None = None, **data: object) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise NasUserError(_message(exc, data, name=_names or _backticked)) from None

    @model_validator(mode="after")
    def _cross_field(self) -> TrainConfig:
        rules = [  # (field, the field it is checked against, what is allowed; {other} names that field)
            ("min_lr", "lr", self.min_lr <= self.lr, f"at most {{other}} ({self.lr})"),
            ("warmup_epochs", "epochs", self.warmup_epochs <= self.epochs, f"at most {{other}} ({self.epochs})"),
            ("train_subset", "batch_size", self.train_subset is None or self.train_subset >= self.batch_size,
             f"at least {{other}} ({self.batch_size})"),
        ]
        for field, other, ok, allowed in rules:
            if not ok:
                raise PydanticCustomError("cross_field", "{field} must be " + allowed.replace("{other}", other),
                                          {"field": field, "other": other, "allowed": allowed})
        return self

    @classmethod
    def from_dict(cls, d: Mapping[str, object], *, source: str = "", flags: Collection[str] = ()) -> TrainConfig:
        """Validate settings (a ``--config`` file's JSON object merged with flags).

        Args:
            d: field name to value; missing fields take their defaults.
            source: where the values not in ``flags`` came from (a file name), for the message.
            flags: names of the fields given as command-line flags. A message names these and
                the fields not in ``d`` (defaults) as ``--flag``, the others as fields of ``source``.

        Raises:
            NasUserError: an unknown setting, or a value of the wrong type or out of range.
        """
        known = list(cls.model_fields)
        unknown = sorted(set(d) - set(known))
        if unknown:
            where = f"{source}: " if source else ""
            raise NasUserError(f"{where}unknown training setting(s) {unknown}; known: {sorted(known)}")

        def name(field: str) -> str:  # as given: a flag, a field of the file; a default reads as its flag
            if field in d and field not in flags:
                return f"{source}: `{field}`" if source else f"`{field}`"
            return flag_name(field)

        return cls(_names=name, **d)

    def to_dict(self) -> dict[str, JsonValue]:
        """The settings as JSON values (``resolution`` an int when square, else ``[height, width]``)."""
        return self.model_dump(mode="json")

    def identity(self) -> dict[str, JsonValue]:
        """The settings that must match for a run folder to be resumed (not device or threads)."""
        d = self.to_dict()
        for k in ("device", "threads", "save_every", "compile", "compile_backend"):
            d.pop(k)
        return d

    @property
    def resolution_text(self) -> str:
        """The resolution as users write it: ``32`` or ``512x1024``."""
        return format_resolution(self.resolution)


def _backticked(field: str) -> str:
    return f"`{field}`"


def flag_name(field: str) -> str:
    """The command-line flag of a field: ``batch_size`` -> ``--batch-size``."""
    return "--" + field.replace("_", "-")


def allowed_values(info: FieldInfo) -> str:
    """What a field accepts, in words, from its annotation and constraints (``an integer >= 1``)."""
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    if "allowed" in extra:
        return str(extra["allowed"])
    annotation: object = info.annotation
    args = typing.get_args(annotation)
    nullable = type(None) in args and typing.get_origin(annotation) is not Literal
    if nullable:
        annotation = next(a for a in args if a is not type(None))
    if typing.get_origin(annotation) is Literal:
        text = "one of " + ", ".join(str(c) for c in typing.get_args(annotation))
    else:
        finite = any(getattr(m, "allow_inf_nan", True) is False for m in info.metadata)
        base = {int: "an integer", float: "a finite number" if finite else "a number", bool: "true or false",
                str: "a string"}
        text = base.get(annotation, str(annotation)) if isinstance(annotation, type) else str(annotation)
        text += _bounds(info.metadata)
    if nullable:
        text = text.replace(" or ", ", ") + " or null" if text == "true or false" else text + " or null"
    return text


def _bounds(metadata: list[object]) -> str:
    low = next((("[", m.ge) for m in metadata if isinstance(m, Ge)), None) or \
        next((("(", m.gt) for m in metadata if isinstance(m, Gt)), None)
    high = next(((m.le, "]") for m in metadata if isinstance(m, Le)), None) or \
        next(((m.lt, ")") for m in metadata if isinstance(m, Lt)), None)
    if low and high:
        return f" within {low[0]}{low[1]}, {high[0]}{high[1]}"
    if low:
        return f" {'>=' if low[0] == '[' else '>'} {low[1]}"
    if high:
        return f" {'<=' if high[1] == ']' else '<'} {high[0]}"
    return ""


def _message(exc: ValidationError, data: Mapping[str, object], *, name: Callable[[str], str]) -> str:
    """One line for the first error of ``exc``: ``<setting> must be <allowed>, got <value>``."""
    errors = exc.errors(include_url=False)
    err = errors[0]
    more = len(errors) - 1
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    if err["type"] == "cross_field":
        ctx = err["ctx"]
        allowed = str(ctx["allowed"]).replace("{other}", name(ctx["other"]))
        field = str(ctx["field"])
        value = data[field] if field in data else TrainConfig.model_fields[field].default
        return f"{name(field)} must be {allowed}, got {_show(value)}{tail}"
    loc = err.get("loc", ())
    field = str(loc[0]) if loc else ""
    info = TrainConfig.model_fields.get(field)
    if info is None:  # not expected: the model refuses unknown fields before this
        return f"bad training settings: {err['msg']}{tail}"
    return f"{name(field)} must be {allowed_values(info)}, got {_show(data.get(field, err.get('input')))}{tail}"


def _show(value: object) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
