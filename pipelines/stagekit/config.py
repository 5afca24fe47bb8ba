"""params.yaml, typed: how a stage declares what it reads, the loader, and the sections that
every paradigm shares (`train`, `export`).

A stage declares each params value it reads as an annotated parameter of its function:

    def pretrain_mlm(
        mlm: Annotated[MlmConfig, Param("mlm", reads=("mask_probability", "model", "train"))],
        data_dir: str = "data/prepared/mlm",
        ...

`stage_command` then loads just those sections from `--params` (params.yaml), validated
against their dataclasses (one per section, a docstring per field, beside the stages that
read it: `pipelines/<paradigm>/config.py`). A section narrowed with `reads=` reaches the stage
as a view holding only those keys; reading another one raises, so a stage cannot depend on
a key its `dvc.yaml` `params:` list does not name (tests/unit/test_params.py compares the two).

Errors name the file and key, e.g. `params.yaml: train.lr: expected a number, got 'fast'`,
so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from models.augmentation import AugmentConfig
from models.losses import LOSSES
from models.optimizers import OPTIMIZERS
from pipelines.stagekit.errors import UserError

QUANTIZE_MODES = ("none", "int8")
"""`export.quantize`: fp32 graphs only, or int8 ones where they pass the accuracy gate."""

LrSchedule = Literal["constant", "cosine"]
"""How the learning rate moves over a run (`train.lr_schedule`, `pseudolabel.lr_schedule`)."""

SECTIONS = (
    "prepare",
    "evaluate",
    "model",
    "train",
    "export",
    "tuned_params",
    "tracking",
    "timeseries",
    "pseudolabel",
    "mlm",
    "segment",
    "segment_digits",
    "generate",
    "tune",
)
"""The top-level keys of params.yaml (anything else is a typo). A new section is a name here
plus its dataclass beside the stages that read it."""


class Section:
    """Base of the params sections (declared `@dataclass(frozen=True, repr=False)`). A view
    of one (see `view`) holds only the keys its stage declares; reading another raises
    AttributeError naming it, where a plain dataclass would silently answer with the
    class-level default."""

    def __getattribute__(self, name: str) -> Any:
        values = object.__getattribute__(self, "__dict__")
        if name in values:  # every field of a full section: the common, fast path
            return values[name]
        if name in type(self).__dataclass_fields__:  # type: ignore[attr-defined]
            raise AttributeError(
                f"{type(self).__name__}.{name}: this stage does not declare that params key "
                "(add it to the `reads` of its Param and to the stage's params in dvc.yaml)"
            )
        return object.__getattribute__(self, name)

    def __repr__(self) -> str:
        # Sections are declared with repr=False: the generated repr would read every field,
        # and raise on a view.
        values = vars(self)
        fields = dataclasses.fields(self)  # type: ignore[arg-type]
        shown = [f"{f.name}={values[f.name]!r}" for f in fields if f.name in values]
        return f"{type(self).__name__}({', '.join(shown)})"


@dataclass(frozen=True)
class Param:
    """Marks a stage parameter as a params.yaml value: `section` is a top-level key; `reads`,
    when given, narrows a section to those keys (dotted for a nested section that is itself a
    `Section`; a models/ config such as `mlm.model` is read whole)."""

    section: str
    reads: tuple[str, ...] = ()

    def keys(self) -> list[str]:
        """The dotted params keys this parameter reads (as dvc.yaml `params:` lists them)."""
        return [f"{self.section}.{key}" for key in self.reads] or [self.section]


@dataclass(frozen=True, repr=False)
class TrainConfig(Section):
    epochs: int = 40
    """Maximum number of passes over the training set."""
    batch_size: int = 64
    """Examples per step on each worker (gd and sgd override it: full batch / one example)."""
    optimizer: str = "adam"
    """One of: gd, sgd, minibatch_sgd, momentum, nesterov, adagrad, adadelta, rmsprop, adam, adamw."""
    lr: float = 0.002
    """Learning rate (the peak, with a schedule)."""
    lr_schedule: LrSchedule = "constant"
    """After warm-up: keep `lr`, or decay it along a cosine to 0 at the last epoch."""
    warmup_epochs: int = 0
    """Epochs over which the learning rate rises linearly to `lr` (transformers need it)."""
    weight_decay: float = 0.0001
    """L2 penalty (decoupled for adamw)."""
    momentum: float = 0.9
    """Momentum of the momentum and nesterov optimizers."""
    beta1: float = 0.9
    """Decay of adam's and adamw's gradient average (its first moment). GANs use 0.5
    (DCGAN): each player's target moves as the other learns, and a long average follows it
    too slowly."""
    loss: str = "cross_entropy"
    """One of: mse, mae, huber, bce, cross_entropy, kl_divergence."""
    huber_delta: float = 1.0
    """Where the huber loss turns from quadratic to linear."""
    early_stopping_patience: int = 8
    """Stop after this many epochs without a better validation loss (0 disables it)."""
    divergence_factor: float = 100.0
    """An epoch's training loss this many times the untrained model's (or NaN/inf) stops the
    run as diverged."""
    num_workers: int = 2
    """Ray Train workers (data-parallel replicas)."""
    device: Literal["auto", "cpu", "gpu"] = "auto"
    """auto uses one GPU per worker when the Ray cluster has GPUs, else CPU."""
    amp: bool = True
    """Mixed precision (bf16 autocast) when training on a GPU; ignored on CPU."""
    max_failures: int = 2
    """Worker failures survived by restarting from the latest checkpoint."""
    seed: int = 0
    """Seed for weight initialisation, shuffling, dropout and augmentation."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights, updated after every step with this
    decay (0: off; warmed up over the first steps); validation, early stopping and the saved
    model then use the average. It smooths the epoch-to-epoch noise of small-batch runs:
    on the digits' 60-label FixMatch, 0.99 held validation accuracy within 0.94-0.96 where
    the raw weights swung 0.92-0.97 (its effect on test accuracy is not yet measured)."""
    augment: AugmentConfig = AugmentConfig()
    """Random changes to each training batch of images (crop, shift, rotation, mirror,
    colour), drawn on the workers; validation and test images are never changed."""

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "num_workers", "lr", "huber_delta", "divergence_factor")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "early_stopping_patience", "max_failures", "warmup_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0.0 <= self.beta1 < 1.0:
            raise ValueError(f"beta1 must be in [0, 1), got {self.beta1}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.optimizer == "nesterov" and self.momentum == 0:
            raise ValueError("momentum must be > 0 for the nesterov optimizer")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer {self.optimizer!r} unknown; choose one of {', '.join(OPTIMIZERS)}"
            )
        if self.loss not in LOSSES:
            raise ValueError(f"loss {self.loss!r} unknown; choose one of {', '.join(LOSSES)}")


@dataclass(frozen=True, repr=False)
class ExportConfig(Section):
    opset: int = 18
    """ONNX opset of the exported graphs, at least: a layer whose export needs a newer one
    raises it for its graph (the transformer encoder's: 23)."""
    parity_atol: float = 0.0001
    """Largest allowed |onnxruntime - torch| on the test split; above it the stage fails."""
    registered_model: str = "dlpipe-classifier"
    """Name in the MLflow Model Registry."""
    alias: str = "champion"
    """Registry alias pointed at the new version (what serving loads)."""
    quantize: str = "none"
    """none | int8: int8 dynamic quantisation of the classifiers' and the encoder's graphs
    for CPU serving, kept only past the accuracy gate (pipelines/stagekit/quantize.py)."""
    quantize_max_drop: float = 0.005
    """Largest accuracy drop (0.005: half a point) at which the int8 graph still serves."""

    def __post_init__(self) -> None:
        if not 13 <= self.opset <= 21:
            raise ValueError(f"opset must be between 13 and 21, got {self.opset}")
        if self.parity_atol <= 0:
            raise ValueError(f"parity_atol must be > 0, got {self.parity_atol}")
        if self.quantize not in QUANTIZE_MODES:
            raise ValueError(
                f"quantize {self.quantize!r} unknown; choose one of {', '.join(QUANTIZE_MODES)}"
            )
        if not 0 <= self.quantize_max_drop < 1:
            raise ValueError(
                f"quantize_max_drop must be in [0, 1) (an accuracy drop), got "
                f"{self.quantize_max_drop}"
            )
        # MLflow reserves `latest` and version-like names (v1, V2 ...) for itself.
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.alias) or re.fullmatch(
            r"(?i)latest|v\d+", self.alias
        ):
            raise ValueError(
                f"alias {self.alias!r} is not allowed: use letters, digits, _ or -, "
                "and not 'latest' or v<number>"
            )
        if not self.registered_model.strip():
            raise ValueError("registered_model must not be empty")


def stage_params(function: Callable[..., Any]) -> dict[str, tuple[Param, Any, Any]]:
    """The function's params parameters: name -> (Param, annotated type, default)."""
    hints = typing.get_type_hints(function, include_extras=True)
    found = {}
    for name, parameter in inspect.signature(function).parameters.items():
        hint = hints.get(name)
        if typing.get_origin(hint) is not typing.Annotated:
            continue
        base, *marks = typing.get_args(hint)
        for mark in marks:
            if isinstance(mark, Param):
                found[name] = (mark, base, parameter.default)
    return found


def declared_keys(function: Callable[..., Any]) -> list[str]:
    """Every params key `function` reads, dotted, as its dvc.yaml `params:` should list them."""
    return [key for mark, _, _ in stage_params(function).values() for key in mark.keys()]


def read_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """params.yaml as a mapping, its top-level keys checked against SECTIONS."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found (run from the repository root)")
    return _yaml_sections(path, SECTIONS, "unknown key {key}; known sections: {known}")


def _yaml_sections(path: Path, known: Iterable[str], unknown_message: str) -> dict[str, Any]:
    """The YAML mapping in `path`, every top-level key one of `known` (else a UserError
    from `unknown_message`, formatted with `key` and `known`)."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        # One line, where PyYAML's own message spans several (with a caret drawing).
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}: not valid YAML{where}: {problem}") from None
    known = tuple(known)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping with {', '.join(known)} keys, got {raw!r}")
    unknown = sorted(set(raw) - set(known))
    if unknown:
        message = unknown_message.format(key=unknown[0], known=", ".join(known))
        raise UserError(f"{path}: {message}")
    return raw


def load_params(function: Callable[..., Any], path: str | Path = "params.yaml") -> dict[str, Any]:
    """The keyword arguments `function` takes from params.yaml: each declared section parsed
    and validated whole, then narrowed to the keys the function reads."""
    raw = read_params(path)
    arguments = {}
    for name, (mark, base, default) in stage_params(function).items():
        if dataclasses.is_dataclass(base):
            section = parse_section(base, raw.get(mark.section, {}), str(path), f"{mark.section}.")
            arguments[name] = view(section, mark.reads) if mark.reads else section
        elif mark.section in raw:
            arguments[name] = _coerce(base, raw[mark.section], str(path), mark.section)
        elif default is not inspect.Parameter.empty:
            arguments[name] = default
        else:
            raise UserError(f"{path}: {mark.section}: missing")
    return arguments


def view(section: Any, keys: Iterable[str]) -> Any:
    """A copy of `section` holding only `keys` (dotted keys narrow nested sections); reading
    any other field raises AttributeError naming it."""
    nested: dict[str, list[str]] = {}
    whole = set()
    for key in keys:
        head, _, rest = key.partition(".")
        if head not in {f.name for f in dataclasses.fields(section)}:
            raise TypeError(f"{type(section).__name__} has no field {head!r}")
        if rest:
            if not isinstance(getattr(section, head), Section):
                # Only a Section guards its left-out fields; another dataclass would answer
                # with its class-level defaults.
                raise TypeError(f"{head}: only params sections can be narrowed, read it whole")
            nested.setdefault(head, []).append(rest)
        else:
            whole.add(head)
    narrowed = object.__new__(type(section))
    for name in whole:
        object.__setattr__(narrowed, name, getattr(section, name))
    for name, rest in nested.items():
        if name not in whole:
            object.__setattr__(narrowed, name, view(getattr(section, name), rest))
    return narrowed


def overlay_sections(path: str | Path, sections: dict[str, Any]) -> dict[str, Any]:
    """`sections` (name -> section) with the values of the YAML file `path` laid over them,
    validated like params.yaml itself (errors name that file); the file may only hold those
    sections."""
    path = Path(path)
    if not path.is_file():
        hint = " (run `dvc repro tune` first)" if "tune" in path.parts else ""
        raise UserError(f"tuned_params: {path} not found{hint}")
    overlay = _yaml_sections(path, sections, "{key}: only {known} can be set here")
    merged = dict(sections)
    for name, values in overlay.items():
        fields = _laid_over(config_to_dict(sections[name]), values or {})
        merged[name] = parse_section(type(sections[name]), fields, str(path), f"{name}.")
    return merged


def _laid_over(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overlay`'s values, nested groups merged key by key: an overlay setting
    `train.augment.rotation` keeps the rest of `train.augment`."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _laid_over(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_section(cls: type, raw: Any, where: str, prefix: str) -> Any:
    """Build dataclass `cls` from the mapping `raw`, naming `prefix.key` in every error."""
    label = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise UserError(f"{where}: {label}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(
            f"{where}: unknown key {prefix}{unknown[0]!s}; known keys here: {', '.join(sorted(known))}"
        )
    values = {
        name: _coerce(hints[name], value, where, f"{prefix}{name}") for name, value in raw.items()
    }
    try:
        return cls(**values)
    except ValueError as exc:
        raise UserError(f"{where}: {prefix}{exc}") from None


def _coerce(hint: Any, value: Any, where: str, key: str) -> Any:
    """Check `value` against the type `hint`, converting YAML lists to tuples and ints to floats."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)

    def fail(expected: str) -> UserError:
        return UserError(f"{where}: {key}: expected {expected}, got {value!r}")

    if dataclasses.is_dataclass(hint):
        return parse_section(hint, value, where, prefix=f"{key}.")
    if origin is Literal:
        if value not in args:
            raise fail("one of " + ", ".join(repr(a) for a in args))
        return value
    if origin in (typing.Union, types.UnionType):
        # A choice of plain values (a `tune.space` list: numbers, names, flags): the
        # first type that takes the value, in the order the hint lists them.
        for option in args:
            try:
                return _coerce(option, value, where, key)
            except UserError:
                continue
        raise fail(" or ".join(getattr(a, "__name__", str(a)) for a in args))
    if origin is dict:
        if not isinstance(value, dict):
            raise fail("a mapping")
        return {str(k): _coerce(args[1], v, where, f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise fail("a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, where, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise fail(f"a list of {len(args)} values")
        return tuple(
            _coerce(a, v, where, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value))
        )
    if hint is bool:
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise fail("a string")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as plain, YAML/JSON-friendly data (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    # A view (see `view`) holds only the keys its stage reads: those are what it logs.
    return {
        f.name: plain(config_to_dict(value) if dataclasses.is_dataclass(value) else value)
        for f in dataclasses.fields(config)
        if (value := vars(config).get(f.name, _MISSING)) is not _MISSING
    }


_MISSING = object()
