"""What enters the slots at a switch: the direction policy (``SRLoRAConfig.direction_policy``).

A policy is one small interface, :class:`DirectionPolicy`; the controller calls it at fixed
points of every step and never asks which policy it is:

* before each optimizer step, with the gradients it applies: :meth:`~DirectionPolicy.fold`
  (what the policy captured during the step's backward), or :meth:`~DirectionPolicy.discard`
  when the step is skipped;
* after each step: :meth:`~DirectionPolicy.update_windows` (a capturing policy opens its hooks
  only in the steps before a layer's switch);
* at a switch: :meth:`~DirectionPolicy.host_reads` (tensors read on the host in the switch's
  one transfer), :meth:`~DirectionPolicy.choose` (which of ``W0``'s directions enter, or the
  entries' ordinal numbers), :meth:`~DirectionPolicy.vectors` (the new pairs' own vectors,
  where they are not ``W0``'s), :meth:`~DirectionPolicy.switched`;
* ``state_dict`` / ``load_state_dict`` (in the controller's).

The policies: :class:`Spectrum` (the paper's: the next unused singular directions of ``W0`` in
singular-value order; no state, no hooks), ``"gradient"`` (:mod:`srlora.alignment`: ``W0``'s
unused directions best aligned with the gradient), ``"gradient_subspace"``
(:mod:`srlora.subspace`: the gradient's own top singular vectors). The capturing ones share
their hooks and windows (:mod:`srlora.capture`). A new policy is one class here or in its own
module, one entry in :data:`POLICIES` and one in the config's choices.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .config import SRLoRAConfig
    from .layer import LayerState


class DirectionPolicy:
    """What enters at a switch, for a controller's layers (see the module doc). This base is
    the paper's behaviour at every point: a subclass overrides what it changes.

    """

    @classmethod
    def full_rows(cls, config: SRLoRAConfig) -> bool:
        """The layers' SVD caches keep every row of ``U``, also where a process holds only some
        rows of the layer (a policy that projects the whole gradient on them needs them)."""
        return False

    def __init__(self, layers: Mapping[str, LayerState], config: SRLoRAConfig) -> None:
        self.layers = layers

    def update_windows(self, next_step: int) -> None:
        """After each optimizer step (and at build): ``next_step`` is the step coming."""

    def fold(self) -> None:
        """Before an optimizer step that applies its gradients: take in what was captured."""

    def discard(self) -> None:
        """A skipped step (non-finite gradients): drop what it captured."""

    def host_reads(self, layers: Sequence[LayerState]) -> list[torch.Tensor | None]:
        """A float tensor per switching layer that :meth:`choose` reads on the host (``None``:
        nothing); read in the switch's one device-to-host transfer."""
        return [None] * len(layers)

    def choose(self, layer: LayerState, host: torch.Tensor | None) -> list[int] | None:
        """The directions that enter ``layer``'s slots (``r'`` unused ones), or ``None``: the
        next unused ones in singular-value order. ``host``: its :meth:`host_reads` entry."""
        return None

    def vectors(self, layers: Sequence[LayerState]) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        """The new pairs' own unit vectors ``{layer: (u (m, r'), v (n, r'))}`` for the layers
        switching now, or ``None``: they are ``W0``'s directions (from the SVD cache). A
        collective where the policy sums over processes: every rank calls it."""
        return None

    def switched(self, name: str) -> None:
        """Layer ``name`` has switched."""

    def close(self) -> None:
        """Remove every hook (the model is being merged and unloaded)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state_dict` (``None``: a checkpoint of the paper's policy)."""


class Spectrum(DirectionPolicy):
    """``direction_policy="spectrum"``, the paper's: the next ``r'`` unused directions of ``W0``
    in singular-value order."""


# Each policy's class, by its SRLoRAConfig.direction_policy name: (module, class). The
# capturing policies' modules import this one, so they are imported when named.
POLICIES: dict[str, tuple[str, str]] = {
    "spectrum": (__name__, "Spectrum"),
    "gradient": ("srlora.alignment", "GradientDirections"),
    "gradient_subspace": ("srlora.subspace", "GradientSubspace"),
}


def policy_class(config: SRLoRAConfig) -> type[DirectionPolicy]:
    """The class of ``config.direction_policy`` (:data:`POLICIES`)."""
    module, name = POLICIES[config.direction_policy]
    return getattr(importlib.import_module(module), name)


def policy_for(
    layers: Mapping[str, LayerState], config: SRLoRAConfig, run_model: Callable[[], object] | None = None
) -> DirectionPolicy:
    """The direction policy of ``config`` over a controller's layers (``run_model``: the
    general-text pass of ``subspace_whiten``, :mod:`srlora.whiten`)."""
    if not config.subspace_whiten:
        if run_model is not None:
            raise ValueError(
                "run_model runs the model on general text for subspace_whiten's input covariance, and subspace_whiten "
                "is 0: set subspace_whiten=k (direction_policy='gradient_subspace'), or leave run_model out."
            )
        return policy_class(config)(layers, config)
    return policy_class(config)(layers, config, run_model)  # type: ignore[call-arg]
