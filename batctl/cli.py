"""The `batctl` command line: one command per stage, flags generated from each stage's config.

This module only parses: it turns flags (and `--config FILE.toml`) into a stage's config
dataclass, calls `batctl.stages.<name>.run(config)` and maps the outcome to an exit code
(0 done or up to date, 1 failure, 2 usage error). Stage modules are imported lazily, so
`batctl --help` never imports torch.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape

from batctl import __version__
from batctl.config import FieldSpec, field_specs, flag_name, name_the_source, read_toml
from batctl.console import error, print_result, setup_logging, stderr
from batctl.errors import BatctlError, UpToDate, UsageError
from batctl.stages.demo import DemoConfig
from batctl.stages.eval import EvalConfig
from batctl.stages.score import ScoreConfig
from batctl.stages.select import SelectConfig
from batctl.stages.surrogate import SurrogateConfig
from batctl.stages.train import TrainConfig


class _PlainArgument(typer.core.TyperArgument):
    """A positional argument shown as `PATH` in usage and help, as options show their
    metavars: no `{path}` braces, no `<path>` type after the name."""

    def display_type_rich(self, ctx: Any) -> None:
        return None

    def _usage_display_name(self) -> str:
        return self.display_name_raw


class _ValuesAsParsed:
    """A flag's value as click parsed it. A stage's config converts and checks every value
    (`StageConfig.from_sources`: naming the flag, every problem at once), so typer's own
    coercion would only import pydantic and build one adapter per flag: a third of the CPU of
    an up-to-date run."""

    def coerce(self, value: Any, param: Any = None, ctx: Any = None) -> Any:
        return value


def _as_parsed(param: Any) -> Any:
    if param is not None and hasattr(param, "_runtime_param"):
        param._runtime_param = _ValuesAsParsed()
    return param


class _PlainCommand(typer.core.TyperCommand):
    """A command whose positional arguments read as plain metavars in help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if type(param) is typer.core.TyperArgument:
                param.__class__ = _PlainArgument


class _ConfigCommand(_PlainCommand):
    """A command whose values its own code converts (the stages' configs, info's PATH)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            _as_parsed(param)

    def get_help_option(self, ctx: Any) -> Any:
        return _as_parsed(super().get_help_option(ctx))  # a switch: nothing to convert


class _Group(typer.core.TyperGroup):
    """The root: --version and --help are switches, nothing to convert."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            _as_parsed(param)

    def get_help_option(self, ctx: Any) -> Any:
        return _as_parsed(super().get_help_option(ctx))


app = typer.Typer(
    cls=_Group,
    name="batctl",
    help="Backbone Augmented Training: score a backbone's own pretraining data by influence, "
    "select the samples that help, and train adapters on the augmented set.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

STAGES: dict[str, tuple[type, str]] = {
    "surrogate": (SurrogateConfig, "Train a cheap surrogate adapter on the adaptation set D_A."),
    "score": (ScoreConfig, "Score every backbone pool sample by its influence on D_A (resumable)."),
    "select": (SelectConfig, "Select pool samples at one or more γ from a score store."),
    "train": (TrainConfig, "Train the final adapter on D_A plus a selection (or D_A alone)."),
    "eval": (EvalConfig, "Evaluate adapters on held-out data; writes metrics.json and report.md."),
    "demo": (DemoConfig, "Run the whole pipeline on the embedded default data, offline."),
}


def _version_callback(value: bool) -> None:
    if value:
        sys.stdout.write(f"batctl {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_version_callback,
        is_eager=True,
        help="Print the version and exit.",
    ),
) -> None:
    """Backbone Augmented Training from the command line."""


def _invoke(action: Callable[[], dict[str, Any] | None], as_json: bool, debug: bool) -> None:
    """Run `action`, print its result, and turn expected failures into one line and an exit code."""
    setup_logging(debug)
    try:
        result = action()
    except UpToDate as done:
        stderr.print(f"{done.path} is up to date: nothing to do", highlight=False, markup=False)
        if as_json:
            print_result({"status": "up to date", "path": str(done.path)}, as_json=True)
        raise typer.Exit(0) from None
    except BatctlError as exc:
        if debug:
            traceback.print_exc()
        for line in str(exc).splitlines() or [type(exc).__name__]:
            error(escape(line))
        raise typer.Exit(exc.exit_code) from None
    except OSError as exc:  # permissions, a full disk, a directory where a file was expected
        if debug:
            traceback.print_exc()
        error(escape(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")))
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        error("interrupted")
        raise typer.Exit(130) from None
    if result is not None:
        print_result(result, as_json)


def default_text(value: Any) -> str | None:
    """How help shows a default, the same for every flag: `(default: 0.5,0.75,0.9)`, never a
    Python repr; None for no default (and for switches, which are off unless given)."""
    if value is None or value == () or isinstance(value, bool):
        return None
    if isinstance(value, tuple | list):
        return ",".join(default_text(v) or "" for v in value)
    if isinstance(value, Path):
        return value.as_posix()
    return str(value)


def _option_help(spec: FieldSpec) -> str:
    parts = [spec.doc]
    shown = default_text(spec.default)
    if shown is not None:
        parts.append(f"(default: {shown})")
    if spec.multiple:
        parts.append("Repeatable.")
    return " ".join(parts)


def _metavar(spec: FieldSpec) -> str:
    if spec.choices:
        return "|".join(spec.choices)
    return {int: "INT", float: "FLOAT", Path: "PATH", str: "TEXT", bool: ""}[spec.base]


def _option_parameter(spec: FieldSpec) -> inspect.Parameter:
    """A Typer option for one config field. Its default is None, meaning "not on the command line"."""
    flag = flag_name(spec.name)
    if spec.base is bool:
        annotation: Any = Optional[bool]  # noqa: UP045 - Typer reads the annotation at runtime
        option = typer.Option(None, flag, help=_option_help(spec), show_default=False)
    else:
        base = str if spec.choices else spec.base
        annotation = Optional[list[base]] if spec.multiple else Optional[base]  # noqa: UP045
        option = typer.Option(
            None, flag, help=_option_help(spec), show_default=False, metavar=_metavar(spec)
        )
    return inspect.Parameter(
        spec.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation
    )


def _common_parameters() -> list[inspect.Parameter]:
    kw = inspect.Parameter.KEYWORD_ONLY
    return [
        inspect.Parameter(
            "config_file",
            kw,
            annotation=Optional[Path],  # noqa: UP045
            default=typer.Option(
                None,
                "--config",
                metavar="FILE.toml",
                help="Read flags from a TOML file; the command line wins.",
            ),
        ),
        inspect.Parameter(
            "json_output",
            kw,
            annotation=bool,
            default=typer.Option(False, "--json", help="Print the result as JSON."),
        ),
        inspect.Parameter(
            "debug",
            kw,
            annotation=bool,
            default=typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
        ),
    ]


def build_config(name: str, cli_values: dict[str, Any], config_file: Path | None) -> Any:
    """Parse one stage's flags (command line over TOML) into its config; UsageError lists every problem."""
    config_cls = STAGES[name][0]
    commands = {
        command: ({spec.name for spec in field_specs(cls)}, cls.shared_fields())
        for command, (cls, _) in STAGES.items()
    }
    toml = read_toml(config_file, name, commands) if config_file is not None else None
    config, problems = config_cls.from_sources(cli_values, toml, config_file)
    if problems:
        raise UsageError("\n".join(problems))
    return config


def _register_stage(name: str, config_cls: type, help_text: str) -> None:
    specs = field_specs(config_cls)

    def command(**kwargs: Any) -> None:
        config_file = kwargs.pop("config_file")
        config_file = None if config_file is None else Path(config_file)
        as_json = kwargs.pop("json_output")
        debug = kwargs.pop("debug")

        def action() -> dict[str, Any] | None:
            config = build_config(name, kwargs, config_file)
            stage = importlib.import_module(f"batctl.stages.{name}")
            try:
                return stage.run(config)
            except BatctlError as exc:
                lines = str(exc).splitlines()
                if lines:
                    noted = name_the_source(lines[0], config, kwargs, config_file)
                    if noted != lines[0]:
                        exc.args = ("\n".join([noted, *lines[1:]]),)
                raise

        _invoke(action, as_json, debug)

    command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [_option_parameter(s) for s in specs] + _common_parameters()
    )
    command.__name__ = name
    app.command(name, help=help_text, no_args_is_help=False, cls=_ConfigCommand)(command)


for _name, (_cls, _help) in STAGES.items():
    _register_stage(_name, _cls, _help)


@app.command("info", cls=_ConfigCommand)
def info_command(
    path: Path = typer.Argument(
        ...,
        metavar="PATH",
        help="An output directory, a model directory, or pool data (a file, a directory, a brace pattern).",
    ),
    json_output: bool = typer.Option(False, "--json", help="Print the description as JSON."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
) -> None:
    """What an artifact is: stage, params, inputs, outputs, and how far unfinished work has got."""
    from batctl.info import describe_path, render

    def action() -> None:
        description = describe_path(Path(path))
        if json_output:
            print_result(description, as_json=True)
        else:
            render(description)

    _invoke(action, json_output, debug)


@app.command("tiny", cls=_PlainCommand)
def tiny_command(
    family: str = typer.Argument(
        ...,
        metavar="lm|diffusion|clip",
        help="Which tiny model to build (clip: for score --method embed --clip DIR).",
    ),
    directory: Path = typer.Argument(
        ..., metavar="DIR", help="Where to save it (save_pretrained layout)."
    ),
    seed: int = typer.Option(
        0,
        "--seed",
        metavar="INT",
        show_default=False,
        help="Seed for the random weights. (default: 0)",
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="Replace a tiny backbone batctl wrote there before (never a folder it did not write).",
    ),
    json_output: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
) -> None:
    """A tiny random backbone (or CLIP) with an offline tokenizer, for tests and CI smoke runs (no network)."""

    def action() -> dict[str, Any]:
        if family not in ("lm", "diffusion", "clip"):
            raise UsageError(f"FAMILY must be lm, diffusion or clip, got {family!r}")
        from batctl.tiny import write_tiny

        return write_tiny(family, directory, seed=seed, force=force)

    _invoke(action, json_output, debug)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
