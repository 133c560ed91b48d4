"""Config helpers: `get_config(arg)` argument parsing, loading config files, validation.

Configs are Python files exposing `get_config(arg: str | None) -> ml_collections.ConfigDict`; `arg` is
the text after the colon in `--config=configs/x.py:key=value,key2=value2` (big_vision's convention).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib.util
import os
import pathlib
import re
import sys
import traceback
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any, NoReturn

import ml_collections
from absl import flags
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
    *, steps: int, warmup_fraction: float = 0.05, **fields: Any
) -> ml_collections.ConfigDict:
    """One entry of `config.stages`, for config files: `StageConfig`'s fields by name, every one
    declared (`declared`), so each can be set from the command line
    (`--config.stages.s3_moe.dcmoe_coef_end=0.01`). `warmup_steps` defaults to `warmup_fraction`
    of the steps (at least 1).
    """
    fields.setdefault('warmup_steps', max(1, int(steps * warmup_fraction)))
    entry = declared(StageConfig.from_config('<stage()>', {'steps': steps, **fields}))
    del entry['name']  # the key of the entry in `config.stages`
    return entry


def declared(instance: Any) -> ml_collections.ConfigDict:
    """Every field of config dataclass `instance` as a ConfigDict, so that each can be set from
    the command line (a locked config refuses undeclared fields): `config.model.moe =
    declared(MoEConfig(num_experts=4))`. Tuples become comma-separated strings, unset optional
    fields typed placeholders."""
    hints = typing.get_type_hints(type(instance))
    entry: dict[str, Any] = {}
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        if isinstance(value, tuple):
            value = ','.join(str(v) for v in value)
        elif value is None:  # `float | None`: a float once set
            (kind,) = set(typing.get_args(hints[field.name])) - {type(None)}
            value = config_dict.placeholder(kind)
        entry[field.name] = value
    return ml_collections.ConfigDict(entry)


def _split_list(text: str) -> list[str]:
    """'a,b,,c' -> ['a', 'b', 'c']: a comma-separated list field of a config."""
    return [item for item in text.split(',') if item]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossWeights:
    """The weights of a stage's loss terms, declared once: a stage config sets them
    (`StageConfig`), the loss reads them (`train.step.LossConfig`, which checks them).

    balance_coef: weight of the balance loss (its form: `config.model.moe.balance_loss_form`, the
      Switch loss summed over MoE layers by default); linearly annealed to
      `balance_coef_end` over `balance_decay_steps` when that is set (UniMoE-Audio), else constant.
    dcmoe_coef: weight of the DCMoE balance loss, whose tokens are weighted `answer_token_weight`
      on supervised (answer) tokens and 1 on the prompt (DCMoE uses 10); annealed to
      `dcmoe_coef_end` over the same `balance_decay_steps` when that is set, else constant.
    z_coef: weight of the router z-loss.
    """

    balance_coef: float = 0.0
    balance_coef_end: float | None = None
    balance_decay_steps: int = 0
    dcmoe_coef: float = 0.0
    dcmoe_coef_end: float | None = None
    answer_token_weight: float = 1.0
    z_coef: float = 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageConfig(LossWeights):
    """One stage, typed: `config.stages.<name>` as the trainer, the model factory, accounting and
    lowering read it. Comma-separated lists of the ConfigDict become tuples; `trains` stays the
    '+'-joined parts string (`factory.trainable_filter`). `mode` is the data mode and loss kind;
    the loss fields are `LossWeights`', the optimizer's `train.optim.OptimConfig`'s;
    config files write stages with `stage()`."""

    name: str
    trains: str
    tasks: tuple[str, ...]
    steps: int
    learning_rate: float
    warmup_steps: int
    mode: str = 'chat'
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 32
    # Gradient accumulation: the step runs batch_size / micro_batches rows at a time.
    micro_batches: int = 1
    # The LM's frozen matrices held in its compute dtype (`factory.frozen_in_compute_dtype`):
    # the same numbers, half their memory; this stage's checkpoint then holds them so.
    frozen_in_compute_dtype: bool = False
    init_from: tuple[str, ...] = ()
    experts_from: tuple[str, ...] = ()
    upcycle_mode: str = 'per_source'
    moe: bool = False
    lora_rank: int = 0
    # Uni-MoE JSON datasets the stage reads instead of the built-in tasks, and their weights.
    json_sources: tuple[str, ...] = ()
    json_weights: tuple[float, ...] = ()

    @classmethod
    def from_config(cls, name: str, stage: Mapping[str, Any]) -> StageConfig:
        """Raises ValueError naming `config.stages.<name>.<field>` for an unknown field, a
        missing one or a value of the wrong type."""
        return from_fields(cls, f'config.stages.{name}', stage, name=name)


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _typed(where: str, value: Any, hint: Any) -> Any:
    """value as `hint` (str, int, float, bool, an optional float, a tuple of str / float); comma
    strings become tuples."""
    if typing.get_origin(hint) is tuple:
        (item,) = set(typing.get_args(hint)) - {Ellipsis}
        items = _split_list(value) if isinstance(value, str) else list(value)
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


# Uni-MoE's released models (`python -m unimoe.convert from-unimoe --variant`) and the evaluation
# protocols (`unimoe.eval.protocol`).
RELEASED_VARIANTS = ('speech_4e', 'audio_4e', '8e')
EVAL_PROTOCOLS = ('official', 'ours')


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """`config.eval`, typed: the stages evaluated on the built-in tasks at the end of a run, and
    the defaults of `python -m unimoe.eval`: `protocol` 'ours' or 'official' (the released
    Uni-MoE variant's eval.py, `released_variant`; `unimoe.eval.protocol`)."""

    stages: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    batch_size: int = 8
    max_new_tokens: int = 16
    protocol: str = 'ours'
    released_variant: str = ''

    def __post_init__(self):
        if self.protocol not in EVAL_PROTOCOLS:
            raise ValueError(f"EvalConfig.protocol must be in {EVAL_PROTOCOLS}, got {self.protocol!r}")
        if self.released_variant not in ('', *RELEASED_VARIANTS):
            raise ValueError(
                f"EvalConfig.released_variant must be '' or in {RELEASED_VARIANTS}, got "
                f"{self.released_variant!r}"
            )


def from_fields(cls: type, where: str, raw: Mapping[str, Any], **extra: Any) -> Any:
    """`cls(**extra, **raw)` with every field of `raw` known and typed (`_typed`); raises
    ValueError naming `<where>.<field>`."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in extra}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"{where} has unknown fields {unknown}; known: {sorted(fields)}")
    missing = [k for k, f in fields.items() if k not in raw and _required(f)]
    if missing:
        raise ValueError(f"{where} lacks the fields {missing}")
    hints = typing.get_type_hints(cls)
    with errors_at(where, cls.__name__):
        return cls(**extra, **{k: _typed(f'{where}.{k}', v, hints[k]) for k, v in raw.items()})


# Set to 1 to see the traceback of a user's mistake too (as `--debug` does).
DEBUG_ENV = 'UNIMOE_DEBUG'


def debug_requested(argv: list[str]) -> bool:
    """`--debug` on the command line or UNIMOE_DEBUG=1: show tracebacks of user errors. Read from
    argv, since a user error may come before absl has parsed the flags."""
    flag = any(arg in ('--debug', '--debug=true', '--debug=True', '--debug=1') for arg in argv)
    return flag or os.environ.get(DEBUG_ENV, '') not in ('', '0')


def _root_cause(error: BaseException) -> BaseException:
    """The innermost exception, not looking past `raise ... from None` (whose message is whole)."""
    while error.__cause__ is not None or (
        error.__context__ is not None and not error.__suppress_context__
    ):
        error = error.__cause__ or error.__context__
    return error


def _suggestion(error: BaseException) -> str:
    """ml_collections' 'Did you mean "top_k" instead of "top_kk"?', found on the way to the root
    (the root's own message lacks it), as ' (did you mean top_k?)'."""
    while error is not None:
        match = re.search(r'Did you mean "([^"]+)"', str(error))
        if match:
            return f' (did you mean {match.group(1)}?)'
        error = error.__cause__ or error.__context__
    return ''


def user_error_lines(error: BaseException) -> list[str]:
    """What to print for a user's mistake: each problem of a `UserError`, else the message of
    the innermost exception (absl and ml_collections wrap the config file's own errors)."""
    if isinstance(error, UserError):
        return error.problems
    root = _root_cause(error)
    if isinstance(root, (AttributeError, KeyError)):  # a --config.<field> override of no field
        return [
            f"the config has no field {str(root).strip(chr(34))}{_suggestion(error)}: check the "
            "--config.* flags"
        ]
    return [line.strip() for line in str(root).splitlines() if line.strip()][-1:] or [repr(root)]


def exit_on_user_error(error: BaseException, argv: list[str] | None = None) -> NoReturn:
    """Prints `user_error_lines(error)` as 'error: ...' lines (and the traceback when
    `debug_requested` by `argv`, default `sys.argv`), then exits with code 2."""
    if debug_requested(sys.argv if argv is None else argv):
        traceback.print_exception(error)
    exit_with_problems(user_error_lines(error))


def exit_with_problems(problems: list[str]) -> NoReturn:
    """Prints each problem as an 'error: ...' line on stderr and exits with code 2."""
    for line in problems:
        print(f'error: {line}', file=sys.stderr)
    sys.exit(2)


def define_debug_flag() -> None:
    """Defines a command line's `--debug` flag (absl), which `debug_requested` reads."""
    flags.DEFINE_bool(
        'debug',
        False,
        f'Show the traceback of a config or input error too (or set {DEBUG_ENV}=1); errors are '
        'otherwise one line each, exit code 2.',
    )


def parse_flags_or_exit(argv: list[str]) -> list[str]:
    """absl's flag parsing, for `app.run(main, flags_parser=parse_flags_or_exit)`: a config file
    is loaded and its overrides applied here, and their errors are the user's (exit code 2)."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - any error of the user's config file or flags
        exit_on_user_error(e)


def loaded_config(flag: Any) -> ml_collections.ConfigDict:
    """The ConfigDict of a `config_flags.DEFINE_config_file` flag, loaded now: an error of the
    config file is the user's (exit code 2)."""
    try:
        config = flag.value
        config.to_dict()  # a config file that failed to load raises on first use
        return config
    except Exception as e:  # noqa: BLE001 - any error of the user's config file
        exit_on_user_error(e)


class UserError(Exception):
    """A user's mistake or their machine's limit (a bad config, a full disk), not a bug: one line
    per problem, each naming what to change. The command-line entry points print the lines and
    exit with code 2, without a traceback."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__('\n'.join(self.problems))


class ConfigError(UserError, ValueError):
    """The problems of an experiment config, all found before anything is built: one line each,
    naming the config path (`config.<path>...`) and what to set."""


@contextlib.contextmanager
def errors_at(where: str, name: str) -> Iterator[None]:
    """Re-raises a TypeError / ValueError of building config class `name` as a ValueError naming
    the config path `where`: its own 'name.field' becomes '<where>.field'."""
    try:
        yield
    except (TypeError, ValueError) as e:
        message, prefix = str(e), f'{name}.'
        if message.startswith(where):
            raise
        if message.startswith(prefix):
            raise ValueError(f'{where}.{message.removeprefix(prefix)}') from e
        raise ValueError(f'{where}: {message}') from e
