"""Checkpoints of a sharded run (FSDP2, DeepSpeed ZeRO-3): a folder, one file per rank.

Every rank calls :func:`srlora.save_checkpoint` / :func:`srlora.load_checkpoint` (they come
here when the model is sharded). The folder::

    PATH/
      manifest.json        format, world size, step, the files below (written last)
      rank00000.pt ...     what each rank holds: its shards of the trainable parameters,
                           buffers and of the frozen weights SRLoRA changed, fingerprints of
                           its shards of the others, SRLoRA's state (its rows' EMAs and
                           records), the optimizer's state (its shards), the scheduler,
                           its RNG states, ``extra``
      deepspeed/           under ZeRO-3: the engine's own checkpoint (trainable partitions,
                           fp32 masters, optimizer), when the engine is passed as optimizer

No rank ever holds more than its own shards: nothing is gathered. It is built in a
temporary sibling folder that rank 0 swaps into place once every rank has written and
synced its file, so a crash or ``kill -9`` during a save leaves the previous checkpoint
whole, and what is read back is always a complete one. Loading reads each file with
``torch.load(weights_only=True)``, checks all of it (world size, layers, shapes, base
weights, SRLoRA config), then changes anything; it resumes bit-exactly with the same
world size and sharding.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_torch_save, atomic_write_json, remove_stale_temporaries, replace_dir, temp_name
from .checkpoint_io import check_method_state, read_payload, restore_rng_states, rng_states
from .collective import barrier, is_writer
from .controller import SRLoRA
from .errors import CheckpointError
from .targets import fingerprint, shard_like, shard_of, write_shard_

FORMAT = "srlora-sharded-1"
MANIFEST = "manifest.json"


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _engine(optimizer: Any) -> Any:
    """The DeepSpeed engine when one was passed as the optimizer (ZeRO-3), else ``None``."""
    return optimizer if hasattr(optimizer, "save_checkpoint") and hasattr(optimizer, "module") else None


def _local_state(value: Any) -> Any:
    """An optimizer state with every sharded tensor replaced by this rank's shard."""
    if isinstance(value, torch.Tensor):
        return shard_of(value).detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _local_state(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_local_state(v) for v in value]
    return value


def _model_shards(model: nn.Module, controller: SRLoRA) -> tuple[dict[str, torch.Tensor], dict[str, list[float]]]:
    names = {id(p): name for name, p in model.named_parameters()}
    state = {n: shard_of(p).detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: shard_of(b).detach().cpu().clone() for n, b in model.named_buffers()})
    prints: dict[str, list[float]] = {}
    for layer in controller.layers.values():
        name = names[id(layer.target.base_param)]
        if layer.has_switched and layer.target.writes_base_weight:
            state[name] = shard_of(layer.target.base_param).detach().cpu().clone()
        else:
            prints[name] = fingerprint(shard_of(layer.target.base_param))
    return state, prints


def save_sharded(
    path: Path,
    model: nn.Module,
    controller: SRLoRA,
    optimizer: Any,
    lr_scheduler: Any,
    step: int,
    extra: dict[str, Any] | None,
) -> int:
    """Write the checkpoint folder (see the module doc); every rank calls it. Returns the
    bytes of this rank's file."""
    import torch.distributed as dist

    rank, world = _rank_world()
    barrier("save_checkpoint")  # every rank is here, or a clear error
    name = [None]
    if is_writer():
        remove_stale_temporaries(path)
        tmp = temp_name(path)
        tmp.mkdir(parents=True)
        name = [str(tmp)]
    dist.broadcast_object_list(name, src=0)
    tmp = Path(name[0])  # type: ignore[arg-type]
    engine = _engine(optimizer)
    model_state, prints = _model_shards(model, controller)
    payload = {
        "format": FORMAT,
        "rank": rank,
        "world": world,
        "step": int(step),
        "model": model_state,
        "frozen_fingerprints": prints,
        "controller": controller.state_dict(),
        "optimizer": None if engine is not None else _local_state(optimizer.state_dict()),
        "lr_scheduler": None if lr_scheduler is None else lr_scheduler.state_dict(),
        "rng": rng_states(),
        "extra": extra,
    }
    size = atomic_torch_save(payload, tmp / f"rank{rank:05d}.pt")
    if engine is not None:
        engine.save_checkpoint(str(tmp / "deepspeed"), tag="state")
    barrier("save_checkpoint")  # every file written and synced
    if is_writer():
        files = [f"rank{k:05d}.pt" for k in range(world)]
        manifest = {
            "format": FORMAT,
            "world": world,
            "step": int(step),
            "files": files,
            "deepspeed": engine is not None,
        }
        atomic_write_json(tmp / MANIFEST, manifest)
        replace_dir(tmp, path)
    barrier("save_checkpoint")  # the folder is in place for everyone
    return size


def load_sharded(
    path: Path, model: nn.Module, controller: SRLoRA, optimizer: Any, lr_scheduler: Any, restore_rng: bool
) -> int:
    """Restore :func:`save_sharded`'s folder; every rank calls it. Returns the saved step."""
    rank, world = _rank_world()
    barrier("load_checkpoint")  # every rank, or a clear error
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST}; not a (complete) sharded srlora checkpoint.")
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path}: unreadable {MANIFEST} ({exc}).") from exc
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a sharded srlora checkpoint of format {FORMAT!r}.")
    if manifest["world"] != world:
        raise CheckpointError(
            f"{path}: saved by {manifest['world']} ranks, loaded by {world}; resume with the world size and sharding "
            f"of the run that saved it."
        )
    engine = _engine(optimizer)
    if manifest["deepspeed"] != (engine is not None):
        raise CheckpointError(
            f"{path}: saved {'with' if manifest['deepspeed'] else 'without'} a DeepSpeed engine; pass the engine as "
            f"the optimizer exactly when the run that saved it did."
        )
    payload = read_payload(path / f"rank{rank:05d}.pt")
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: rank{rank:05d}.pt is not a checkpoint file.")
    if payload.get("format") != FORMAT or payload.get("rank") != rank:
        raise CheckpointError(f"{path}: rank{rank:05d}.pt is not this rank's file of this checkpoint.")
    check_method_state(payload, model, controller, str(path))
    barrier("load_checkpoint")
    controller.load_state_dict(payload["controller"])
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    for name, value in payload["model"].items():
        write_shard_(own[name], value)
    if engine is not None:
        engine.load_checkpoint(str(path / "deepspeed"), tag="state")
    else:
        optimizer.load_state_dict(_as_params(payload["optimizer"], optimizer))
    if lr_scheduler is not None and payload["lr_scheduler"] is not None:
        lr_scheduler.load_state_dict(payload["lr_scheduler"])
    if restore_rng:
        restore_rng_states(payload["rng"])
    barrier("load_checkpoint")
    return int(payload["step"])


def _as_params(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The saved optimizer state with each shard turned back into the kind of tensor its
    parameter is (a DTensor under FSDP2), so that the optimizer's step sees what it saved."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    index = dict(zip([i for g in saved["param_groups"] for i in g["params"]], params, strict=True))
    state = {}
    for key, entry in saved["state"].items():
        param = index[key]
        state[key] = {
            k: shard_like(v, param) if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in entry.items()
        }
    return {"state": state, "param_groups": saved["param_groups"]}
