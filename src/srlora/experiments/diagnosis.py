"""What happens to the pairs that enter at a switch, measured inside an absorption run.

``srlora absorb ... --diagnose`` records, every ``T`` steps (SRLoRA's
switch steps; the same steps for LoRA and PiSSA, whose pairs are compared with them):

* the loss of a fixed probe batch right before the switch and right after it (a switch
  moves terms between ``W`` and ``s B A`` only: the two must agree to float rounding);
* the full-weight gradient ``G = dL/dW`` of each adapted layer on the probe batch (from the
  layer's input and output gradient, ``G = sum_t delta_t^T x_t``; the switch leaves it
  unchanged) and, for the pairs that leave and those that enter, their alignment with it::

      a_k = |u_k^T G v_k| / ||G||_F,      u_k = B[:, k] / |B[:, k]|,  v_k = A[k] / |A[k]|

  against the best a rank-1 pair could have, ``sigma_1(G) / ||G||_F``;
* each pair's size ``sigma_k = s |B[:, k]| |A[k]|`` when it enters and when it leaves, how far
  its product ``s B[:, k] A[k]`` moved in its first and last 5 steps (its speed), and what it
  learnt over its life, ``||s b a^T (leaving) - s b a^T (entering)||_F``, against the layer's
  whole update ``||W_t + s B A - W0||_F``;
* the learning rate at each switch.

Layers are summarised by medians over the adapted layers; the per-switch rows go into
``results.json`` under ``"diagnosis"``.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
from torch import nn

SPEED_STEPS = 5


def _lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}


def _factors(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
    B = module.lora_B["default"].weight.detach().float()
    A = module.lora_A["default"].weight.detach().float()
    return B, A, float(module.scaling["default"])


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


class SwitchDiagnosis:
    """Hooks around the optimizer step of an absorption run (see the module doc).

    Args:
        model: the PEFT model.
        ctl: its SRLoRA controller, or ``None`` (LoRA, PiSSA: the same steps are probed).
        probe: ``(N, L)`` token ids of the probe batch.
        interval: steps between probes (SRLoRA's switch interval).
        sched: the learning-rate scheduler (its rate is recorded).
    """

    def __init__(self, model: nn.Module, ctl: Any, probe: torch.Tensor, interval: int, sched: Any) -> None:
        self.model, self.ctl, self.probe, self.interval, self.sched = model, ctl, probe, interval, sched
        self.modules = _lora_modules(model)
        self.step = 0
        self.rows: list[dict[str, Any]] = []
        self._before: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._loss_before: float | None = None
        # per layer and slot: the pair's factors at entry, at entry + SPEED_STEPS, and SPEED_STEPS before leaving
        self._entry: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._early: dict[tuple[str, int], float] = {}
        self._late: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        # LoRA / PiSSA: the adapter's start, so that the update is s (B A - B0 A0)
        self._init = {name: _factors(m)[:2] for name, m in self.modules.items()} if ctl is None else {}

    def attach(self, opt: torch.optim.Optimizer, after: bool) -> Any:
        """Register the hook that runs right after ``opt.step()``: before the controller's
        switch (``after=False``, registered before ``ctl.attach``) or after it."""
        return opt.register_step_post_hook(self._after_switch if after else self._before_switch)

    # ------------------------------------------------------------------ hooks
    def _probe_step(self, step: int) -> bool:
        return step % self.interval == 0

    @torch.no_grad()
    def _probe_loss(self) -> float:
        was = self.model.training
        self.model.eval()
        ids = self.probe
        loss = float(self.model(input_ids=ids, labels=ids).loss)
        self.model.train(was)
        return loss

    def _before_switch(self, opt: Any, args: Any, kwargs: Any) -> None:
        self.step += 1
        step = self.step
        if self._probe_step(step + SPEED_STEPS) and not self._probe_step(step):  # SPEED_STEPS before leaving
            for name, module in self.modules.items():
                B, A, _ = _factors(module)
                for k in range(B.shape[1]):
                    self._late[(name, k)] = (B[:, k].clone(), A[k].clone())
        if self._probe_step(step):
            self._loss_before = self._probe_loss()
            self._before = {name: tuple(t.clone() for t in _factors(m)[:2]) for name, m in self.modules.items()}  # type: ignore[misc]
        if step > SPEED_STEPS and self._probe_step(step - SPEED_STEPS):
            for name, module in self.modules.items():
                B, A, s = _factors(module)
                for k in range(B.shape[1]):
                    start = self._entry.get((name, k))
                    if start is not None:
                        moved = s * (torch.outer(B[:, k], A[k]) - torch.outer(*start))
                        self._early[(name, k)] = float(moved.norm()) / SPEED_STEPS

    def _after_switch(self, opt: Any, args: Any, kwargs: Any) -> None:
        step = self.step
        if not self._probe_step(step):
            return
        loss_after = self._probe_loss()
        switched = {}
        if self.ctl is not None:
            for event in self.ctl.history:
                if event.step == step:
                    switched[event.layer] = list(event.slots)
        grads = self._layer_gradients()
        aligned_in, aligned_out, best, sigma_in, sigma_out, speed_in, speed_out, learnt, share = ([] for _ in range(9))
        for name, module in self.modules.items():
            G = grads[name]
            g_norm = float(G.norm())
            if g_norm == 0:
                continue
            best.append(float(torch.linalg.matrix_norm(G, ord=2)) / g_norm)
            B, A, s = _factors(module)
            B0, A0 = self._before[name]
            total = self._update_norm(name)
            slots = switched.get(name, list(range(B.shape[1])))  # LoRA / PiSSA: every pair
            for k in slots:
                key = (name, k)
                aligned_out.append(_alignment(B0[:, k], A0[k], G) / g_norm)
                sigma_out.append(s * float(B0[:, k].norm() * A0[k].norm()))
                start = self._entry.get(key)
                if start is not None:
                    learnt_k = float((s * (torch.outer(B0[:, k], A0[k]) - torch.outer(*start))).norm())
                    learnt.append(learnt_k)
                    share.append(learnt_k / total if total > 0 else float("nan"))
                if key in self._early:
                    speed_in.append(self._early.pop(key))
                if key in self._late:
                    late_B, late_A = self._late.pop(key)
                    speed_out.append(
                        float((s * (torch.outer(B0[:, k], A0[k]) - torch.outer(late_B, late_A))).norm()) / SPEED_STEPS
                    )
                if name in switched or self.ctl is None:
                    aligned_in.append(_alignment(B[:, k], A[k], G) / g_norm)
                    sigma_in.append(s * float(B[:, k].norm() * A[k].norm()))
                    self._entry[key] = (B[:, k].clone(), A[k].clone())
        self.rows.append(
            {
                "step": step,
                "lr": float(self.sched.get_last_lr()[0]),
                "loss_before": self._loss_before,
                "loss_after": loss_after,
                "switched_layers": len(switched),
                "alignment_entering": _median(aligned_in),
                "alignment_leaving": _median(aligned_out),
                "alignment_best_rank1": _median(best),
                "sigma_entering": _median(sigma_in),
                "sigma_leaving": _median(sigma_out),
                "speed_first_steps": _median(speed_in),
                "speed_last_steps": _median(speed_out),
                "learnt_per_pair": _median(learnt),
                "learnt_share_of_update": _median(share),
            }
        )

    # ------------------------------------------------------------------ measurements
    def _layer_gradients(self) -> dict[str, torch.Tensor]:
        """``G = dL/dW`` of every adapted layer on the probe batch (``torch.autograd.grad`` on
        the layers' outputs: no ``.grad`` is touched)."""
        inputs: dict[str, torch.Tensor] = {}
        outputs: dict[str, torch.Tensor] = {}

        def hook(name: str) -> Any:
            def capture(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                inputs[name] = args[0].detach()
                outputs[name] = output

            return capture

        handles = [m.register_forward_hook(hook(n)) for n, m in self.modules.items()]
        try:
            ids = self.probe
            loss = self.model(input_ids=ids, labels=ids).loss
            names = list(outputs)
            deltas = torch.autograd.grad(loss, [outputs[n] for n in names])
        finally:
            for h in handles:
                h.remove()
        out = {}
        for name, delta in zip(names, deltas, strict=True):
            x = inputs[name]
            out[name] = delta.reshape(-1, delta.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
        return out

    def _update_norm(self, name: str) -> float:
        """``||W_t + s B A - W0||_F`` of one layer (SRLoRA: from its factors; LoRA, PiSSA:
        ``s (B A - B0 A0)``)."""
        if self.ctl is not None:
            P, Q = self.ctl.layers[name].total_update_factors()
        else:
            B, A, s = _factors(self.modules[name])
            B0, A0 = self._init[name]
            P, Q = torch.cat([s * B, -s * B0], dim=1), torch.cat([A, A0], dim=0)
        _, rp = torch.linalg.qr(P.double())
        _, rq = torch.linalg.qr(Q.double().T)
        return float(torch.linalg.matrix_norm(rp @ rq.T))


def _alignment(b: torch.Tensor, a: torch.Tensor, G: torch.Tensor) -> float:
    """``|u^T G v|`` for the unit directions of ``b`` (m) and ``a`` (n)."""
    nb, na = float(b.norm()), float(a.norm())
    if nb == 0 or na == 0:
        return 0.0
    return abs(float(b @ G @ a)) / (nb * na)
