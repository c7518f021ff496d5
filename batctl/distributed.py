"""Data-parallel `surrogate` and `train` through accelerate (DESIGN §7), one process per device.

Started by `torchrun --nproc_per_node N -m batctl train ...` or `accelerate launch
--multi_gpu --num_processes N -m batctl train ...` (both set RANK, LOCAL_RANK, WORLD_SIZE); a
plain `batctl train` is one process and behaves as before.

- `--batch-size` stays the *global* micro-batch: the training loop draws the same seeded batch
  of B samples on every rank, and rank r computes the loss of its slice `batch[r::N]`. Its loss
  is Σ_slice w_i l_i · N / B, so accelerate's DDP average over ranks is exactly the
  single-process batch loss Σ w_i l_i / B and the adapter equals the one-process adapter (up to
  float rounding) with the same global batch and seed.
- The model-family parts that `per_sample_loss` runs (`Task.forward_modules`) are wrapped by
  `accelerator.prepare`, which averages their gradients in the backward; there is no
  all-reduce of our own.
- Only rank 0 writes the output directory; the other ranks check the same up-to-date and
  refusal rules and follow rank 0's verdict, so no rank trains alone into a refused output.
- Mixed precision: on a GPU with a half-precision backbone (`--dtype auto` gives bf16 on
  Ampere and newer), accelerate runs the forward under autocast (and scales fp16 losses).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from batctl.errors import BatctlError, UpToDate


@dataclass(frozen=True)
class World:
    """This process's place among the processes a launcher started."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process writes outputs (rank 0)."""
        return self.rank == 0


def world_from_env(env: Mapping[str, str] | None = None) -> World:
    """RANK, WORLD_SIZE and LOCAL_RANK as torchrun and accelerate launch set them."""
    env = os.environ if env is None else env
    size = int(env.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return World()
    return World(int(env.get("RANK", "0")), size, int(env.get("LOCAL_RANK", "0")))


def share_of(batch: Sequence[Any], world: World) -> tuple[list[Any], float]:
    """This rank's slice of a global batch, and the factor N·|slice|/B that turns the slice's
    mean loss into its share of the global mean after DDP divides the summed gradients by N."""
    mine = list(batch[world.rank :: world.size])
    return mine, world.size * len(mine) / len(batch)


def check_batch_fits(batch_size: int, world: World) -> None:
    """Every rank needs at least one sample of each global batch."""
    if batch_size < world.size:
        raise BatctlError(
            f"--batch-size {batch_size} is the global micro-batch, shared by {world.size} "
            f"processes: give at least {world.size} (one sample per process)"
        )


# --------------------------------------------------------------------------- rank 0 writes


def _verdict_from_main(verdict: tuple[str, str] | None, world: World) -> tuple[str, str] | None:
    """Rank 0's verdict (None: go ahead; or (kind, message)) on every rank."""
    from accelerate.utils import broadcast_object_list

    box = [verdict]
    broadcast_object_list(box, from_process=0)
    return box[0]


@contextlib.contextmanager
def rank_output(path: str | Path, **kwargs: Any) -> Iterator[Any]:
    """`open_output` on rank 0; on other ranks an `Output` with no work dir (they write nothing).

    All ranks raise the same UpToDate or BatctlError when rank 0's output check refuses.
    """
    from batctl.artifacts import Output, open_output, utcnow

    world = world_from_env()
    if world.size == 1:
        with open_output(path, **kwargs) as out:
            yield out
        return
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available())  # joins the process group
    if not world.main:
        verdict = _verdict_from_main(None, world)
        if verdict is not None:
            kind, message = verdict
            leave_group()
            raise UpToDate(path) if kind == "up to date" else BatctlError(message)
        yield Output(
            Path(path).absolute(),
            None,  # type: ignore[arg-type]
            kwargs["stage"],
            dict(kwargs["params"]),
            dict(kwargs["inputs"]),
            utcnow(),
        )
        return
    with contextlib.ExitStack() as stack:
        try:
            out = stack.enter_context(open_output(path, **kwargs))
        except UpToDate:
            _verdict_from_main(("up to date", ""), world)
            leave_group()
            raise
        except BatctlError as exc:
            _verdict_from_main(("error", f"rank 0 refused the output: {exc}"), world)
            leave_group()
            raise
        _verdict_from_main(None, world)
        yield out


def leave_group() -> None:
    """Every rank waits for the others, then the process group is torn down: a rank that exits
    (up to date, refused) while its peer still holds the group can abort the peer's exit."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# --------------------------------------------------------------------------- the loop's helpers


def _mixed_precision(task: Any) -> str:
    """accelerate's mixed_precision for the task's backbone: autocast only on a GPU."""
    if task.device.type != "cuda":
        return "no"
    for p in task.model.parameters():
        if not p.requires_grad and p.is_floating_point():
            return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(p.dtype, "no")
    return "no"


def _swap(task: Any, dotted: str, module: torch.nn.Module) -> None:
    owner_path, _, name = dotted.rpartition(".")
    owner = task
    for part in owner_path.split(".") if owner_path else []:
        owner = getattr(owner, part)
    setattr(owner, name, module)


class Parallel:
    """The accelerate side of one training run: wraps the task's forward modules for DDP (and
    autocast), and undoes that when training ends so the task saves plain peft adapters."""

    def __init__(self, task: Any, optimizer: torch.optim.Optimizer) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.world = world_from_env()
        self.task = task
        self.accelerator = Accelerator(
            cpu=task.device.type == "cpu",
            mixed_precision=_mixed_precision(task),
            device_placement=False,
            # A micro-batch runs one forward per role in it (adaptation, pool), so ranks may
            # run different numbers of forwards: no per-forward buffer broadcast (the frozen
            # backbone's buffers are identical everywhere anyway), gradients still averaged.
            kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        )
        if self.world.size > 1 and task.device.type == "cuda":
            if task.device != self.accelerator.device:
                raise BatctlError(
                    f"--device {task.device}: under a launcher each process trains on its own "
                    f"GPU ({self.accelerator.device} here); leave --device out"
                )
        self.originals = task.forward_modules()
        self.wrapped = {}
        for dotted, module in self.originals.items():
            self.wrapped[dotted] = self.accelerator.prepare_model(module)
            _swap(task, dotted, self.wrapped[dotted])
        self.optimizer = self.accelerator.prepare_optimizer(optimizer)

    def share(self, batch: Sequence[Any]) -> tuple[list[Any], float]:
        """This rank's slice of the global batch and its loss factor (see `share_of`)."""
        return share_of(batch, self.world)

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        """Backward; with `sync` False (a micro-batch before the last) gradients stay local."""
        with contextlib.ExitStack() as stack:
            if not sync:
                for module in self.wrapped.values():
                    stack.enter_context(self.accelerator.no_sync(module))
            self.accelerator.backward(loss)

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a per-rank scalar over all ranks (the global batch loss)."""
        if self.world.size == 1:
            return float(value.detach())
        return float(self.accelerator.reduce(value.detach().reshape(1), reduction="mean")[0])

    @contextlib.contextmanager
    def unwrapped(self) -> Iterator[None]:
        """The task with its own modules in place (DDP wraps the same parameters), to save."""
        for dotted, module in self.originals.items():
            _swap(self.task, dotted, module)
        try:
            yield
        finally:
            for dotted, module in self.wrapped.items():
                _swap(self.task, dotted, module)

    def close(self) -> None:
        """Wait for every rank, then give the task back its own modules, without autocast."""
        self.accelerator.wait_for_everyone()
        for module in self.wrapped.values():
            self.accelerator.unwrap_model(module, keep_fp32_wrapper=False)
        for dotted, module in self.originals.items():
            _swap(self.task, dotted, module)
