"""Config helpers: `get_config(arg)` argument parsing, loading config files, validation.

Configs are Python files exposing `get_config(arg: str | None) -> ml_collections.ConfigDict`; `arg` is
the text after the colon in `--config=configs/x.py:key=value,key2=value2` (big_vision's convention).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import pathlib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from ml_collections import config_dict


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses `key=value,...` into a ConfigDict, typed by the defaults.

    Every key must have a default (so a typo fails loudly); values are converted to the type of
    their default: `parse_arg('steps=3,fast=True', steps=10, fast=False, name='x')`.
    """
    result = ml_collections.ConfigDict(defaults)
    if not arg:
        return result
    for item in arg.split(','):
        if not item:
            continue
        if '=' not in item:
            raise ValueError(f"config arg {item!r} is not of the form key=value (in {arg!r})")
        key, value = item.split('=', 1)
        if key not in defaults:
            raise ValueError(f"unknown config arg {key!r}; known: {sorted(defaults)}")
        result[key] = _convert(value, defaults[key], key)
    return result


def _convert(value: str, default: Any, key: str) -> Any:
    if isinstance(default, bool):
        if value.lower() not in ('true', 'false', '1', '0'):
            raise ValueError(f"config arg {key}={value!r} is not a boolean")
        return value.lower() in ('true', '1')
    if isinstance(default, (int, float)):
        try:
            return type(default)(ast.literal_eval(value))
        except (ValueError, SyntaxError) as e:
            raise ValueError(f"config arg {key}={value!r} is not a {type(default).__name__}") from e
    return value


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/config.py[:arg]` and calls its `get_config(arg)`."""
    path, _, arg = spec.partition(':')
    file = pathlib.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"unimoe_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def stage(
    *,
    trains: str,
    tasks: Sequence[str],
    steps: int,
    learning_rate: float,
    mode: str = 'chat',
    warmup_fraction: float = 0.05,
    batch_size: int = 32,
    init_from: Sequence[str] = (),
    experts_from: Sequence[str] = (),
    moe: bool = False,
    lora_rank: int = 0,
    balance_coef: float = 0.0,
    z_coef: float = 0.0,
) -> ml_collections.ConfigDict:
    """One entry of `config.stages` (the fields `unimoe.train.trainer` reads), for config files.

    Every field of the stage's loss (`unimoe.train.step.LossConfig`) is declared, so each can be
    set from the command line (`--config.stages.s3_moe.dcmoe_coef_end=0.01`); the annealed ends
    are unset (None) until a value is given.
    """
    return ml_collections.ConfigDict(
        dict(
            trains=trains,
            mode=mode,
            tasks=','.join(tasks),
            steps=steps,
            learning_rate=learning_rate,
            warmup_steps=max(1, int(steps * warmup_fraction)),
            weight_decay=0.0,
            grad_clip=1.0,
            batch_size=batch_size,
            init_from=','.join(init_from),
            experts_from=','.join(experts_from),
            moe=moe,
            lora_rank=lora_rank,
            balance_coef=balance_coef,
            balance_coef_end=config_dict.placeholder(float),
            balance_decay_steps=0,
            dcmoe_coef=0.0,
            dcmoe_coef_end=config_dict.placeholder(float),
            answer_token_weight=1.0,
            z_coef=z_coef,
        )
    )


def split_list(text: str) -> list[str]:
    """'a,b,,c' -> ['a', 'b', 'c']: a comma-separated list field of a config."""
    return [item for item in text.split(',') if item]


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One stage, typed: `config.stages.<name>` as the trainer, the model factory, accounting and
    lowering read it. Comma-separated lists of the ConfigDict become tuples; `trains` stays the
    '+'-joined parts string (`factory.trainable_filter`). Fields and their meaning: `stage()`,
    `train.step.LossConfig` (the loss fields), `train.optim.OptimConfig`."""

    name: str
    trains: str
    mode: str
    tasks: tuple[str, ...]
    steps: int
    learning_rate: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    batch_size: int
    init_from: tuple[str, ...] = ()
    experts_from: tuple[str, ...] = ()
    upcycle_mode: str = 'per_source'
    moe: bool = False
    lora_rank: int = 0
    balance_coef: float = 0.0
    balance_coef_end: float | None = None
    balance_decay_steps: int = 0
    dcmoe_coef: float = 0.0
    dcmoe_coef_end: float | None = None
    answer_token_weight: float = 1.0
    z_coef: float = 0.0
    # Uni-MoE JSON datasets the stage reads instead of the built-in tasks, and their weights.
    json_sources: tuple[str, ...] = ()
    json_weights: tuple[float, ...] = ()

    @classmethod
    def from_config(cls, name: str, stage: Mapping[str, Any]) -> StageConfig:
        """Raises ValueError naming `config.stages.<name>.<field>` for an unknown field, a
        missing one or a value of the wrong type."""
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != 'name'}
        unknown = sorted(set(stage) - set(fields))
        if unknown:
            raise ValueError(
                f"config.stages.{name} has unknown fields {unknown}; known: {sorted(fields)}"
            )
        missing = [k for k, f in fields.items() if k not in stage and _required(f)]
        if missing:
            raise ValueError(f"config.stages.{name} lacks the fields {missing}")
        hints = typing.get_type_hints(cls)
        values = {k: _typed(f'config.stages.{name}.{k}', stage[k], hints[k]) for k in stage}
        return cls(name=name, **values)


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _typed(where: str, value: Any, hint: Any) -> Any:
    """value as `hint` (str, int, float, bool, an optional float, a tuple of str / float); comma
    strings become tuples."""
    if typing.get_origin(hint) is tuple:
        (item,) = set(typing.get_args(hint)) - {Ellipsis}
        items = split_list(value) if isinstance(value, str) else list(value)
        return tuple(_typed(where, v, item) for v in items)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None:
            return None
        hint = next(h for h in typing.get_args(hint) if h is not type(None))
    if hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    elif isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ValueError(f"{where}={value!r} must be of type {hint.__name__}")


def stage_order(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    return tuple(split_list(config.stage_order))


def stage_config(config: ml_collections.ConfigDict, name: str) -> StageConfig:
    """The typed `config.stages.<name>`."""
    if name not in config.stages:
        raise ValueError(f"stage {name!r} is not defined in config.stages: {sorted(config.stages)}")
    return StageConfig.from_config(name, config.stages[name])
