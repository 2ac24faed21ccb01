"""Matching across processes with torch.distributed (``torchrun``; NCCL on GPUs, gloo on CPU).

Work is split by layer: rank ``r`` owns the per-layer groups of a contiguous block of layers
and reads only their tensors. A per-layer group's step reads nothing but global groups
(residual streams), so the per-layer steps between two global steps of a sweep are independent
and run on their owners at the same time; the owners then exchange the new permutations and
objective gains, and every rank applies them in the sweep's order. A global group's cost is a
sum over every tensor that touches it: each rank adds its own tensors' terms and the partial
sums are all-reduced; rank 0 solves and broadcasts the permutation, so all ranks hold the same
π at every step and return the same result. Tensors that touch only global groups (embeddings,
final norms, the LM head) are spread over the ranks by size.

Single process: :func:`context` returns a world of one and every call here is a no-op.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from rebasin.specs import Spec

T = TypeVar("T")


@dataclass
class Dist:
    """This process's place in the world (rank 0 of 1 without torch.distributed)."""

    rank: int = 0
    world: int = 1
    backend: str = ""

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place (float64 statistics travel as they are)."""
        if self.active:
            import torch.distributed as td

            td.all_reduce(tensor)
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.active:
            import torch.distributed as td

            td.broadcast(tensor, src)
        return tensor

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (small Python objects: permutations, gains)."""
        if not self.active:
            return [obj]
        import torch.distributed as td

        out: list[Any] = [None] * self.world
        td.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as td

            td.barrier()

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on every rank; if it raises on any rank, raise that error on all of them
        (a rank that failed alone would leave the others waiting in the next collective)."""
        if not self.active:
            return fn()
        result, error = None, None
        try:
            result = fn()
        except Exception as exc:  # re-raised below, on every rank
            error = exc
        errors = [e for e in self.gather(error) if e is not None]
        if errors:
            raise error if error is not None else errors[0]
        return result


def context(device: torch.device) -> tuple[Dist, torch.device]:
    """The current world, starting torch.distributed when launched by ``torchrun`` (WORLD_SIZE > 1).

    Returns the world and the device this rank computes on (``cuda:LOCAL_RANK`` on GPUs).
    """
    try:
        import torch.distributed as td
    except ImportError:  # pragma: no cover - torch builds without distributed
        return Dist(), device
    if not td.is_available():
        return Dist(), device
    if not td.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "MASTER_ADDR" not in os.environ:
            return Dist(), device
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        td.init_process_group(backend)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return Dist(td.get_rank(), td.get_world_size(), td.get_backend()), device


def is_main_process() -> bool:
    """True unless this is a rank > 0 of an initialised torch.distributed world (who writes, who prints)."""
    try:
        import torch.distributed as td
    except ImportError:  # pragma: no cover
        return True
    return not (td.is_available() and td.is_initialized()) or td.get_rank() == 0


@dataclass
class Ownership:
    """Which rank does what: per-layer groups and every tensor (a global group's cost terms)."""

    world: int
    group_owner: dict[str, int | None] = field(default_factory=dict)  # None: global (every rank)
    tensor_owner: dict[str, int] = field(default_factory=dict)

    def owns_group(self, group: str, rank: int) -> bool:
        owner = self.group_owner.get(group)
        return owner is None or owner == rank

    def share(self, spec: Spec, rank: int) -> dict[str, Any]:
        """What ``rank`` owns: per-layer groups, tensors and their elements."""
        tensors = [n for n, r in self.tensor_owner.items() if r == rank]
        return {"rank": rank, "groups": sum(1 for o in self.group_owner.values() if o == rank),
                "tensors": len(tensors), "elements": sum(_numel(spec.shapes[n]) for n in tensors)}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def plan_ownership(spec: Spec, world: int) -> Ownership:
    """Contiguous blocks of layers per rank; tensors follow their layer's group; tensors of global
    groups only go, largest first, to the rank with the fewest elements so far."""
    own = Ownership(world)
    layers = sorted({g.layer for g in spec.groups.values() if g.layer is not None})
    rank_of_layer = {layer: i * world // len(layers) for i, layer in enumerate(layers)} if layers else {}
    for name, g in spec.groups.items():
        own.group_owner[name] = rank_of_layer[g.layer] if g.layer is not None else None
    load = [0] * world
    unplaced = []
    for name in spec.permuted_tensors():
        owners = [own.group_owner[r.group] for r in spec.axes[name] if r is not None]
        layer_owner = next((o for o in owners if o is not None), None)
        if layer_owner is None:
            unplaced.append(name)
            continue
        own.tensor_owner[name] = layer_owner
        load[layer_owner] += _numel(spec.shapes[name])
    for name in sorted(unplaced, key=lambda n: (-_numel(spec.shapes[n]), n)):
        rank = min(range(world), key=lambda r: (load[r], r))
        own.tensor_owner[name] = rank
        load[rank] += _numel(spec.shapes[name])
    return own
