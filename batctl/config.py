"""Stage configs: small frozen dataclasses whose field docstrings are the CLI's help.

A config field is declared once, with its type, default and a docstring right below it::

    @dataclass(frozen=True)
    class ScoreConfig(StageConfig):
        batch_size: int = 32
        \"\"\"Pool samples per forward/backward pass.\"\"\"

`batctl.cli` turns every field into a kebab-case flag (`--batch-size`) whose help is that
docstring, merges a `--config FILE.toml` under the command line, and calls `problems()` so every
bad flag is reported at once, each naming its flag.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from batctl.errors import UsageError

OPERATIONAL = "operational"


def operational(default: Any) -> Any:
    """A field that changes how a stage runs but not what it produces (`--force`, `--json`).

    Operational fields are left out of the manifest's params, so they never make an output
    look out of date.
    """
    return dataclasses.field(default=default, metadata={OPERATIONAL: True})


def flag_name(field_name: str) -> str:
    """`batch_size` -> `--batch-size`."""
    return "--" + field_name.replace("_", "-")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written right below the field, over the class and its bases.

    Python keeps no attribute docstrings at runtime, so they are read from the source with `ast`.
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


@functools.cache
def _own_field_docs(klass: type) -> dict[str, str]:
    """The field docstrings written in `klass` itself."""
    docs: dict[str, str] = {}
    body = _class_bodies(klass.__module__).get(klass.__qualname__, [])
    for stmt, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


@functools.cache
def _class_bodies(module_name: str) -> dict[str, list[ast.stmt]]:
    """Top-level class name -> its body, from one parse of the module's source file (cached:
    the CLI asks for every config class of every stage at start-up, and `inspect.getsource`
    would parse and tokenize a whole module for each class)."""
    import sys

    source = Path(inspect.getfile(sys.modules[module_name])).read_text(encoding="utf-8")
    tree = ast.parse(source)
    return {node.name: node.body for node in tree.body if isinstance(node, ast.ClassDef)}


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """What the CLI needs to know about one config field."""

    name: str
    base: type  # str, int, float, bool or Path
    multiple: bool  # a tuple field: the flag may repeat
    choices: tuple[str, ...] | None
    default: Any
    doc: str
    operational: bool


def _unwrap(annotation: Any) -> tuple[type, bool, tuple[str, ...] | None]:
    """Reduce `int | None`, `tuple[str, ...]`, `Literal[...]` to (base type, multiple, choices)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported config annotation {annotation!r}")
        return _unwrap(args[0])
    if origin is tuple:
        base, _, choices = _unwrap(typing.get_args(annotation)[0])
        return base, True, choices
    if origin is Literal:
        return str, False, tuple(typing.get_args(annotation))
    if annotation in (str, int, float, bool, Path):
        return annotation, False, None
    raise TypeError(f"unsupported config annotation {annotation!r}")


@functools.cache
def field_specs(cls: type) -> tuple[FieldSpec, ...]:
    """One FieldSpec per dataclass field of `cls`, in declaration order."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    specs = []
    for f in dataclasses.fields(cls):
        base, multiple, choices = _unwrap(hints[f.name])
        if f.name not in docs:
            raise TypeError(f"{cls.__name__}.{f.name} has no docstring: the CLI help comes from it")
        specs.append(
            FieldSpec(
                name=f.name,
                base=base,
                multiple=multiple,
                choices=choices,
                default=f.default,
                doc=docs[f.name],
                operational=bool(f.metadata.get(OPERATIONAL)),
            )
        )
    return tuple(specs)


def _coerce(spec: FieldSpec, value: Any, source: str) -> tuple[Any, str | None]:
    """Convert one value from TOML or the command line to the field's type, or say why not."""
    flag = flag_name(spec.name)
    if spec.multiple:
        items = value if isinstance(value, list | tuple) else [value]
        out = []
        for item in items:
            converted, problem = _coerce(dataclasses.replace(spec, multiple=False), item, source)
            if problem:
                return None, problem
            out.append(converted)
        return tuple(out), None
    if value is None:
        return None, None
    base = spec.base
    try:
        if base is bool:
            if not isinstance(value, bool):
                raise ValueError
            converted: Any = value
        elif base is int:
            if isinstance(value, bool) or not isinstance(value, int | str):
                raise ValueError
            converted = int(value)
        elif base is float:
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise ValueError
            converted = float(value)
        elif base is Path:
            converted = Path(str(value))
        else:
            if not isinstance(value, str | int | float):
                raise ValueError
            converted = str(value)
    except ValueError:
        return None, f"{flag}: expected {base.__name__}, got {value!r} ({source})"
    if spec.choices and converted not in spec.choices:
        return None, f"{flag}: {converted!r} is not one of {', '.join(spec.choices)} ({source})"
    return converted, None


SEED_LIMIT = 1 << 32
"""Seeds are in [0, 2^32): what numpy's and torch's seeding accept everywhere."""

INT_LIMIT = (1 << 31) - 1
"""Every other integer flag fits a signed 32-bit int: counts, sizes and steps beyond it are
typos, and would otherwise surface as an allocator or overflow traceback deep in a library."""


def number_problem(spec: FieldSpec, value: Any) -> str | None:
    """Why a parsed number cannot be used, naming its flag, or None.

    Floats must be finite (`nan`, `inf` and `1e400` all parse); seeds must be in [0, 2^32);
    other integers within a signed 32-bit int.
    """
    flag = flag_name(spec.name)
    for item in value if spec.multiple and isinstance(value, tuple) else [value]:
        if spec.base is float and isinstance(item, float) and not math.isfinite(item):
            return f"{flag} must be a finite number, got {item!r}"
        if spec.base is int and isinstance(item, int):
            if spec.name.endswith("seed") and not 0 <= item < SEED_LIMIT:
                return f"{flag} must be in [0, 2^32), got {item}"
            if abs(item) > INT_LIMIT:
                return f"{flag}: {item} is out of range (at most {INT_LIMIT})"
    return None


def _read_toml_file(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--config: {path} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"--config: {path} is a directory; pass a TOML file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"--config: {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise UsageError(f"--config: cannot read {path}: {exc.strerror or exc}") from None


def read_toml(
    path: Path, command: str, commands: Mapping[str, tuple[set[str], set[str]]]
) -> dict[str, Any]:
    """The flags a `--config FILE.toml` gives for `command`, keys as field names.

    A file without tables holds one command's flags. A pipeline file holds one table per command
    (`[surrogate]`, `[score]`, `[select]`, `[train]`, `[eval]`, `[demo]`) and top-level keys. `commands` maps
    every command to (its fields, the fields top-level keys may set): a top-level key applies to
    a command only where the flag means the same thing (`model`, `steps`), never where it means
    something else (`eval --data` is the held-out set, `eval --adapter` a directory) or is per
    stage (`out`). The command's table wins over top-level keys. Keys may be kebab-case or
    snake_case. Unknown tables and keys, anywhere in the file, are usage errors naming the file.
    """
    data = _read_toml_file(path)
    problems = []
    top = {k.replace("-", "_"): v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    for name, table in tables.items():
        if name not in commands:
            problems.append(
                f"{path}: unknown table [{name}]; tables are named after commands: "
                + ", ".join(f"[{c}]" for c in commands)
            )
            continue
        for key in table:
            if key.replace("-", "_") not in commands[name][0]:
                problems.append(f"{path}: [{name}] {key}: {name} has no flag {flag_name(key)}")
    fields, shared = commands[command]
    if not tables:
        # A flat file is one command's flags, as typed on its command line: every key applies
        # (unknown ones are reported by the config, naming the file).
        return top
    shareable = set().union(*(shared for _, shared in commands.values()))
    everywhere = set().union(*(fields for fields, _ in commands.values()))
    for key in top:
        if key not in everywhere:
            problems.append(f"{path}: unknown key {key!r} (no command has a flag {flag_name(key)})")
        elif key not in shareable:
            problems.append(
                f"{path}: {key} at top level would apply to no command ({flag_name(key)} differs "
                "from one command to the next): put it in each command's table"
            )
    if problems:
        raise UsageError("\n".join(problems))
    values = {k: v for k, v in top.items() if k in shared}
    values.update({k.replace("-", "_"): v for k, v in tables.get(command, {}).items()})
    return values


_FLAG = re.compile(r"--[a-z][a-z0-9-]*")


def name_the_file(message: str, from_file: set[str], path: Path | str) -> str:
    """`message` with " (--x set in FILE)" appended for each flag it names whose value came from
    the --config file, so a user who did not type the flag knows where it came from."""
    if str(path) in message:
        return message
    named = [
        f for f in dict.fromkeys(_FLAG.findall(message)) if f[2:].replace("-", "_") in from_file
    ]
    if not named:
        return message
    return f"{message} ({', '.join(named)} set in {path})"


def name_the_source(
    message: str, config: Any, cli_values: dict[str, Any], config_file: Path | None
) -> str:
    """An error message from a stage, with the flag behind it named when it does not say: the
    flag whose value the message quotes, and the --config file when the value came from there
    (`data spec 'domain.jsonl' matches no files (--data, set in pipeline.toml)`)."""
    given = {k for k, v in cli_values.items() if v not in (None, (), [])}
    from_file = set()
    if config_file is not None and config is not None:
        from_file = {spec.name for spec in field_specs(type(config))} - given
    if "--" in message:
        return name_the_file(message, from_file, config_file) if from_file else message
    best = None
    for spec in field_specs(type(config)) if config is not None else ():
        value = getattr(config, spec.name)
        for item in value if isinstance(value, tuple) else (value,):
            text = item.as_posix() if isinstance(item, Path) else item
            if isinstance(text, str) and len(text) > 2 and text in message:
                if best is None or len(text) > len(best[1]):
                    best = (spec.name, text)
    if best is None:
        return message
    where = f", set in {config_file}" if best[0] in from_file else ""
    return f"{message} ({flag_name(best[0])}{where})"


class StageConfig:
    """Mixin for stage configs: required flags, params for the manifest, validation."""

    REQUIRED: ClassVar[tuple[str, ...]] = ()
    """Field names that must be given, on the command line or in --config."""

    UNSHARED: ClassVar[tuple[str, ...]] = ("out", "force")
    """Fields that a pipeline TOML's top-level keys do not set for this command: per-stage ones
    (`out`), and flags that mean something else here than in the other commands."""

    @classmethod
    def shared_fields(cls) -> set[str]:
        """The fields a top-level key of a pipeline TOML sets for this command."""
        return {s.name for s in field_specs(cls)} - set(cls.UNSHARED)

    @classmethod
    def from_sources(
        cls,
        cli: Mapping[str, Any],
        toml: Mapping[str, Any] | None = None,
        toml_path: Path | None = None,
    ) -> tuple[Any, list[str]]:
        """Build the config from TOML values overlaid by command-line values.

        `cli` maps field names to values, None meaning "not given". Returns (config or None,
        problems); every problem names its flag. Required flags and `problems()` are checked here
        so the user sees everything wrong in one go.
        """
        specs = {s.name: s for s in field_specs(cls)}
        values: dict[str, Any] = {}
        problems: list[str] = []
        for key, value in (toml or {}).items():
            if key not in specs:
                problems.append(f"{toml_path}: unknown key {key!r} (no flag {flag_name(key)})")
                continue
            converted, problem = _coerce(specs[key], value, f"in {toml_path}")
            if problem:
                problems.append(problem)
            else:
                values[key] = converted
        for key, value in cli.items():
            if value is None or (specs[key].multiple and len(value) == 0):
                continue
            converted, problem = _coerce(specs[key], value, "on the command line")
            if problem:
                problems.append(problem)
            else:
                values[key] = converted
        for name in cls.REQUIRED:
            if values.get(name) in (None, ()):
                problems.append(f"{flag_name(name)} is required")
        for key, value in list(values.items()):
            problem = number_problem(specs[key], value)
            if problem:
                problems.append(problem)
                del values[key]  # the semantic checks below see the default instead
        # Semantic checks run even when some flags were bad, on the values that did parse, so
        # one invocation shows every problem.
        config = cls(**values)  # type: ignore[call-arg]
        from_file = {k for k in (toml or {}) if k in specs and cli.get(k) in (None, (), [])}
        problems += [
            name_the_file(p, from_file, toml_path) if toml_path else p for p in config.problems()
        ]
        return (None if problems else config), problems

    def problems(self) -> list[str]:
        """Semantic checks beyond types and choices; each problem names its flag."""
        return []

    def params(self) -> dict[str, Any]:
        """The effective config as JSON-ready values, without operational fields.

        This is what a manifest records and what decides whether an output is up to date.
        """
        out: dict[str, Any] = {}
        for spec in field_specs(type(self)):
            if spec.operational:
                continue
            out[spec.name] = to_jsonable(getattr(self, spec.name))
        return out


def to_jsonable(value: Any) -> Any:
    """Paths become strings, tuples lists; everything else passes through."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    return value


def parse_shard(value: str | None) -> tuple[int, int] | None:
    """`"3/8"` -> (3, 8); raises ValueError with a message for anything else."""
    if value is None:
        return None
    head, sep, tail = value.partition("/")
    if not sep or not head.strip().isdigit() or not tail.strip().isdigit():
        raise ValueError(f"expected i/N such as 0/4, got {value!r}")
    index, count = int(head), int(tail)
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"need 0 <= i < N, got {value!r}")
    return index, count


# --------------------------------------------------------------------------- shared field groups
# Stage configs inherit these groups so a flag means the same thing in every command.


@dataclasses.dataclass(frozen=True)
class OutputOptions(StageConfig):
    """Where a stage writes and whether it may replace what is there."""

    out: Path | None = None
    """Output directory. Written atomically; manifest.json inside marks it complete."""

    force: bool = operational(False)
    """Replace an existing output of this stage even if it differs from this run (never a folder
    batctl did not write, nor another stage's output)."""

    strict_fingerprints: bool = False
    """Fingerprint input files by their whole content instead of size, mtime and first/last MiB."""

    REMOTE_OUT: ClassVar[bool] = False
    """Whether --out may be an s3:// (gs://, az://) URL; only score stores can live there."""

    def problems(self) -> list[str]:
        from batctl.remote import url_problem

        out = super().problems()
        problem = url_problem(self.out, "--out", self.REMOTE_OUT) if self.out else None
        return out + ([problem] if problem else [])


@dataclasses.dataclass(frozen=True)
class ModelOptions(OutputOptions):
    """The frozen backbone."""

    model: str | None = None
    """Backbone: a local directory or a hub id (a diffusers pipeline, or a causal LM)."""

    task: Literal["auto", "lm", "diffusion"] = "auto"
    """Model family; auto detects it (model_index.json means diffusion, *ForCausalLM means lm)."""

    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Precision the backbone is loaded in; auto: bf16 on a GPU that supports it, else fp32. Adapters train in fp32 under autocast."""

    device: str | None = operational(None)
    """cpu, cuda, cuda:N or mps; default: this rank's own GPU (cuda:$LOCAL_RANK under torchrun / accelerate launch), else cpu."""

    trust_remote_code: bool = False
    """Allow a hub model to run its own Python code. Off unless you trust the model's authors."""

    def family(self) -> str:
        """The --model's family: --task, else detected from its config files (cheap, no torch)."""
        from batctl.tasks import detect_family

        return detect_family(str(self.model)) if self.task == "auto" else self.task

    def problems(self) -> list[str]:
        from batctl.devices import device_problem

        out = super().problems()
        problem = device_problem(self.device)
        return out + ([problem] if problem else [])


@dataclasses.dataclass(frozen=True)
class DataOptions(ModelOptions):
    """The adaptation set D_A and how samples become model inputs."""

    data: str | None = None
    """Adaptation set D_A: a JSON/JSONL/text file, a webdataset tar or an image folder."""

    strict: bool = False
    """Stop at the first unreadable sample instead of counting and skipping it."""

    paragraphs: bool = False
    """In .txt inputs, one sample per blank-line-separated paragraph instead of per line."""

    max_length: int = 512
    """LM: longest sequence in tokens; longer samples are truncated and the count reported."""

    max_sample_mib: int = 16
    """Largest sample read, in MiB of raw bytes (a JSONL line, a tar sample's members); a larger one is skipped unread and counted as unreadable."""

    instance_prompt: str | None = None
    """Diffusion: the prompt for every adaptation image, e.g. "a photo of sks dog"."""

    resolution: int | None = None
    """Diffusion: images are resized and center-cropped to this many pixels a side; default: the model's native size."""

    flip: bool = False
    """Diffusion: mirror half the images left-right (which half is fixed by each sample's key, so losses stay reproducible)."""

    # -- what the library needs from these flags (imports stay lazy: --help must not load torch)

    def task_settings(self) -> Any:
        """The TaskSettings these flags describe."""
        from batctl.tasks.base import TaskSettings

        return TaskSettings(
            model=str(self.model),
            dtype=self.dtype,
            trust_remote_code=self.trust_remote_code,
            device=self.device,
            max_length=self.max_length,
            instance_prompt=self.instance_prompt,
            resolution=self.resolution,
            flip=self.flip,
        )

    def max_sample_bytes(self) -> int:
        """--max-sample-mib in bytes, what the pool readers take."""
        return self.max_sample_mib << 20

    def read_samples(self, spec: Any, flag: str) -> list[Any]:
        """Every readable sample of `spec` read as these flags say (--strict, --paragraphs,
        --max-sample-mib); `flag` names the input in messages. Unreadable samples are counted
        and skipped; none readable is an error naming `flag`."""
        from batctl.samples import load_samples

        return load_samples(
            spec,
            flag=flag,
            strict=self.strict,
            paragraphs=self.paragraphs,
            max_sample_bytes=self.max_sample_bytes(),
        )

    def problems(self) -> list[str]:
        out = super().problems()
        if self.max_length < 1:
            out.append(f"--max-length must be >= 1, got {self.max_length}")
        if not 1 <= self.max_sample_mib <= 1 << 20:
            out.append(f"--max-sample-mib must be in [1, 2^20], got {self.max_sample_mib}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            out.append(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        return out


MAX_RANK = 65536
"""No layer of any released backbone is this wide; the exact bound (the adapted layers' width)
is checked when the adapter is added."""


@dataclasses.dataclass(frozen=True)
class TrainingOptions(DataOptions):
    """An adapter and the loop that trains it (surrogate and train share these)."""

    adapter: Literal["lora", "dora", "locon"] = "lora"
    """Adapter kind: LoRA, DoRA (weight-decomposed LoRA) or LoCon (LoRA on conv layers too)."""

    rank: int = 8
    """LoRA rank r."""

    alpha: float | None = None
    """LoRA alpha (scale alpha/r); defaults to the rank."""

    dropout: float = 0.0
    """Dropout on the LoRA input."""

    targets: tuple[str, ...] = ()
    """Module names to adapt; default: peft's choice for the architecture; all-linear allowed."""

    train_text_encoder: bool = False
    """Diffusion: also put the adapter on the CLIP text encoder's attention (q/k/v/out_proj)."""

    steps: int | None = 200
    """Optimizer steps (ignored when --epochs is given)."""

    epochs: int | None = None
    """Passes over the training set, instead of --steps."""

    batch_size: int = 4
    """Samples per micro-batch."""

    grad_accum: int = 1
    """Micro-batches per optimizer step."""

    lr: float = 1e-4
    """Peak learning rate of AdamW."""

    schedule: Literal["cosine", "constant"] = "cosine"
    """Learning-rate schedule after warmup."""

    warmup_steps: int = 0
    """Linear warmup steps."""

    seed: int = 0
    """Seed for adapter init, data order and dropout."""

    save_every: int = 0
    """Save checkpoints/step-N every N steps (0: only the final adapter)."""

    def problems(self) -> list[str]:
        out = super().problems()
        for name in ("rank", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                out.append(f"{flag_name(name)} must be >= 1, got {getattr(self, name)}")
        if self.rank > MAX_RANK:
            out.append(f"--rank must be <= {MAX_RANK}, got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            out.append(f"--alpha must be > 0, got {self.alpha}")
        if self.epochs is None and (self.steps is None or self.steps < 1):
            out.append("--steps must be >= 1 (or give --epochs)")
        if self.epochs is not None and self.epochs < 1:
            out.append(f"--epochs must be >= 1, got {self.epochs}")
        if self.lr <= 0:
            out.append(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.dropout < 1:
            out.append(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.warmup_steps < 0 or self.save_every < 0:
            out.append("--warmup-steps and --save-every must be >= 0")
        elif self.epochs is None and self.steps is not None and self.warmup_steps > self.steps:
            out.append(f"--warmup-steps must be <= --steps ({self.steps}), got {self.warmup_steps}")
        return out

    # -- what the library needs from these flags

    def adapter_settings(self) -> Any:
        """The AdapterSettings these flags describe."""
        from batctl.tasks.base import AdapterSettings

        return AdapterSettings(
            self.adapter,
            self.rank,
            self.alpha,
            self.dropout,
            self.targets,
            text_encoder=self.train_text_encoder,
        )

    def loop_settings(self, mix: str = "uniform", backbone_weight: float = 1.0) -> Any:
        """The LoopSettings these flags describe."""
        from batctl.training import LoopSettings

        return LoopSettings(
            steps=self.steps,
            epochs=self.epochs,
            batch_size=self.batch_size,
            grad_accum=self.grad_accum,
            lr=self.lr,
            schedule=self.schedule,
            warmup_steps=self.warmup_steps,
            seed=self.seed,
            save_every=self.save_every,
            mix=mix,
            backbone_weight=backbone_weight,
        )
