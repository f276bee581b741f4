"""What enters at a switch (issue 24): W0's directions at a scale that does not shrink with the
spectrum (``entry_scale``), and new pairs along the gradient's own subspace
(``direction_policy="gradient_subspace"``). Each keeps the function at every switch, keeps the
books exact (total update, export), and resumes bit-exactly."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import CASES, adam, build, logits, make_base, make_peft, train

from srlora import SRLoRA, SRLoRAConfig, load_checkpoint, save_checkpoint
from srlora.export import base_weight
from srlora.subspace import sketch_top_vectors

OPTIONS = {
    "spectrum, first pairs' scale": dict(entry_scale=1.0),
    "gradient-aligned W0, scale 2": dict(direction_policy="gradient", entry_scale=2.0),
    "gradient subspace": dict(direction_policy="gradient_subspace", entry_scale=1.0),
    "gradient subspace, scale 0.25": dict(direction_policy="gradient_subspace", entry_scale=0.25),
    "gradient subspace, W0's top 4 left alone": dict(
        direction_policy="gradient_subspace", entry_scale=0.25, subspace_exclude=4
    ),
    "gradient subspace, LoRA's first pairs": dict(direction_policy="gradient_subspace", first_pairs="lora"),
    "gradient subspace, no records": dict(direction_policy="gradient_subspace", fused_records=False),
    "gradient subspace, whitened": dict(direction_policy="gradient_subspace", subspace_whiten=4),
}


def _effective(ctl: SRLoRA) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in ctl.layers.items():
        t = layer.target
        W = t.base_param.detach().float()
        W = W.T if t.fan_in_fan_out else W
        out[name] = W + t.scaling * (t.lora_B.detach().float() @ t.lora_A.detach().float())
    return out


@pytest.mark.parametrize("option", list(OPTIONS))
def test_every_switch_keeps_the_output_and_the_total_update_is_exact(case_name, option):
    """Trained through three scheduled switches (the windows before them captured), then
    switched by hand: the logits after each forced switch equal those before it, and the
    factors of the total update give W_t + s B A - W0 exactly."""
    model, ctl = build(case_name, r=2, r_target=14, gamma=0.5, switch_interval=20, **OPTIONS[option])
    W0 = _effective(ctl)  # the pretrained weights (the PiSSA split keeps them)
    opt = adam(model)
    train(model, case_name, opt, steps=65, ctl=ctl)
    assert len(ctl.history) == 3 * len(ctl.layers)
    for _ in range(3):
        before = logits(case_name, model)
        assert len(ctl.switch(opt)) == len(ctl.layers)
        torch.testing.assert_close(logits(case_name, model), before, atol=1e-5, rtol=0)
    now = _effective(ctl)
    base = make_base(CASES[case_name])  # read only where the layers keep no records
    for name, layer in ctl.layers.items():
        P, Q = layer.total_update_factors(None if layer.keeps_records else base_weight(base, name))
        torch.testing.assert_close(P @ Q, now[name] - W0[name], atol=2e-5, rtol=0)


@pytest.mark.parametrize("option", list(OPTIONS))
def test_a_scheduled_switch_changes_nothing_but_the_split(option):
    """On the MLP, around each scheduled switch: the output just after the optimizer step equals
    the output after the switch that follows it (the switch runs in the step's post-hook)."""
    model, ctl = build("mlp", r=2, r_target=12, gamma=1.0, switch_interval=20, **OPTIONS[option])
    opt = adam(model)
    ctl.attach(opt)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 48, generator=g)
    for step in range(1, 61):
        batch = CASES["mlp"].batch(g)
        CASES["mlp"].loss(model, batch).backward()
        if step % 20 == 0:
            ctl.detach()  # take the step without the switch, then switch by hand
            opt.step()
            with torch.no_grad():
                ref = model(x)
            ctl.attach(opt)
            ctl.detach()
            events = ctl.switch(opt)
            ctl.attach(opt)
            assert len(events) == 2
            with torch.no_grad():
                torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=0)
        else:
            opt.step()
        opt.zero_grad()


def _layer_with_gradient_along(
    u: torch.Tensor, v: torch.Tensor, policy: str, calibration: torch.Tensor | None = None, **kw
):
    """A bias-free 16x16 Linear with W0 = U diag(16..1) V^T and SRLoRA r = 2 on it
    (``calibration``: the inputs ``run_model`` runs it on, for ``subspace_whiten``)."""
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    base = torch.nn.Sequential(torch.nn.Linear(16, 16, bias=False))
    with torch.no_grad():
        base[0].weight.copy_((U * torch.arange(16, 0, -1, dtype=torch.float64)) @ V.T)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0"]))
    run_model = None if calibration is None else (lambda: model(calibration))
    config = SRLoRAConfig(r_target=8, gamma=0.5, switch_interval=20, direction_policy=policy, **kw)
    return model, SRLoRA(model, config, run_model=run_model)


def test_whitened_pairs_follow_the_gradient_where_general_text_is_quiet():
    """Calibration inputs driven hard along q; the window's gradient G = -2 u1 q^T - u2 p^T.
    Plain: the pair enters along G's top pair, mostly (u1, q). Whitened (k = 4; the sketch
    keeps l = n = 16 columns, so the covariance's top eigenpairs are exact):
    P = I + Q (diag(g) - 1) Q^T, g = sqrt(2 mean / (lambda + mean)) from the calibration inputs
    alone, and the pair enters along G P's top left vector and v = P w / |P w|, w its top
    right vector."""
    g = torch.Generator().manual_seed(5)
    q, p, u1, u2 = (torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0) for _ in range(4))
    calibration = 0.3 * torch.randn(64, 16, generator=g) + 5 * torch.randn(64, 1, generator=g) * q

    def entered(whiten: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        kw = dict(subspace_whiten=whiten, calibration=calibration) if whiten else {}
        model, ctl = _layer_with_gradient_along(u1, q, "gradient_subspace", **kw)
        layer = ctl.layers[ctl.layer_names[0]]
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        ctl.attach(opt)
        G = torch.zeros(16, 16, dtype=torch.float64)
        for _ in range(20):
            strong, weak = q * (1 + torch.rand(8, 1, generator=g)), p * (1 + torch.rand(8, 1, generator=g))
            (-2 * (model(strong) @ u1).sum() - (model(weak) @ u2).sum()).backward()
            G -= 2 * torch.outer(u1, strong.sum(0)).double() + torch.outer(u2, weak.sum(0)).double()
            opt.step()
            opt.zero_grad()
        (event,) = ctl.history
        b, a = layer.target.lora_B.detach()[:, event.slots[0]], layer.target.lora_A.detach()[event.slots[0]]
        return (b / b.norm()).double(), (a / a.norm()).double(), G

    b, a, G = entered(0)
    U, _, Vh = torch.linalg.svd(G)  # plain: G's top pair, mostly the loud (u1, q)
    assert abs(float(b @ U[:, 0])) > 1 - 1e-4 and abs(float(a @ Vh[0])) > 1 - 1e-4 and abs(float(a @ q.double())) > 0.9
    b, a, G = entered(4)
    C = calibration.double().T @ calibration.double()
    lam, vec = torch.linalg.eigh(C)
    lam, Q = lam.flip(0)[:4], vec.flip(1)[:, :4]
    gain = (2 * (C.trace() / 16) / (lam + C.trace() / 16)).sqrt()
    P = torch.eye(16, dtype=torch.float64) + Q @ torch.diag(gain - 1) @ Q.T
    U, _, Vh = torch.linalg.svd(G @ P)
    v = P @ Vh[0]
    assert abs(float(b @ U[:, 0])) > 1 - 1e-4 and abs(float(a @ (v / v.norm()))) > 1 - 1e-4
    assert abs(float(a @ q.double())) < 0.5  # it turned away from the loud direction


def test_the_new_pair_lies_along_the_gradients_top_singular_vectors():
    """Inputs along v and an output gradient along -u (u, v random: not W0's directions), so the
    windowed gradient is rank one, G = -T u v^T: the pair that enters is (u, v) up to sign, at
    the default scale, 0.25 of the first pairs' singular value."""
    g = torch.Generator().manual_seed(5)
    u = torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0)
    v = torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0)
    model, ctl = _layer_with_gradient_along(u, v, "gradient_subspace")
    layer = ctl.layers[ctl.layer_names[0]]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ctl.attach(opt)
    for _ in range(20):
        x = v * (1 + torch.rand(8, 1, generator=g))
        (-(model(x) @ u).sum()).backward()
        opt.step()
        opt.zero_grad()
    (event,) = ctl.history
    assert event.directions == (2,)  # the third pair to enter the layer
    slot = event.slots[0]
    b, a = layer.target.lora_B.detach()[:, slot], layer.target.lora_A.detach()[slot]
    assert abs(float(torch.dot(b / b.norm(), u))) > 1 - 1e-5
    assert abs(float(torch.dot(a / a.norm(), v))) > 1 - 1e-5
    sigma = layer.target.scaling * float(b.norm() * a.norm())  # the default scale: 0.25 of the first pairs'
    torch.testing.assert_close(sigma, 0.25 * float(layer.cache.S[:2].mean()), rtol=1e-5, atol=0)
    assert layer.entry_sigma == pytest.approx(0.25 * float(layer.cache.S[:2].mean()))
    assert layer.cache.rank == 2  # only the first pairs come from W0's SVD


def test_w0s_top_directions_are_left_alone():
    """A windowed gradient along W0's top direction (strong) and along a random pair (u, v)
    (weak): without subspace_exclude the pair that enters is W0's top direction; with
    subspace_exclude=4 it is (u, v) with W0's top-4 subspace projected out of both sides."""
    g0 = torch.Generator().manual_seed(0)  # W0 = U diag(16..1) V^T of _layer_with_gradient_along
    U = torch.linalg.qr(torch.randn(16, 16, generator=g0, dtype=torch.float64)).Q.float()
    V = torch.linalg.qr(torch.randn(16, 16, generator=g0, dtype=torch.float64)).Q.float()
    g = torch.Generator().manual_seed(5)
    u = torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0)
    v = torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0)

    def entered(exclude: int) -> tuple[torch.Tensor, torch.Tensor]:
        model, ctl = _layer_with_gradient_along(u, v, "gradient_subspace", subspace_exclude=exclude)
        layer = ctl.layers[ctl.layer_names[0]]
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        ctl.attach(opt)
        for _ in range(20):
            strong = V[:, 0] * (1 + torch.rand(8, 1, generator=g))
            weak = v * (1 + torch.rand(8, 1, generator=g))
            (-3 * (model(strong) @ U[:, 0]).sum() - (model(weak) @ u).sum()).backward()
            opt.step()
            opt.zero_grad()
        (event,) = ctl.history
        b, a = layer.target.lora_B.detach()[:, event.slots[0]], layer.target.lora_A.detach()[event.slots[0]]
        return b / b.norm(), a / a.norm()

    b, a = entered(0)  # G's top pair: W0's top direction, tilted by the weak part (u is not orthogonal to it)
    assert abs(float(b @ U[:, 0])) > 0.95 and abs(float(a @ V[:, 0])) > 0.95
    b, a = entered(4)
    torch.testing.assert_close(U[:, :4].T @ b, torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(V[:, :4].T @ a, torch.zeros(4), atol=1e-5, rtol=0)
    u_out = torch.nn.functional.normalize(u - U[:, :4] @ (U[:, :4].T @ u), dim=0)
    v_out = torch.nn.functional.normalize(v - V[:, :4] @ (V[:, :4].T @ v), dim=0)
    assert abs(float(b @ u_out)) > 1 - 1e-4 and abs(float(a @ v_out)) > 1 - 1e-4


def test_lora_first_pairs_leave_the_model_and_the_adapter_as_peft_built_them():
    """first_pairs='lora': building SRLoRA writes nothing (W, A and B as PEFT made them, B = 0),
    and the first switch's pairs enter along the gradient as usual."""
    from conftest import make_peft

    reference = make_peft(CASES["bert"], 0, r=2, alpha=8)
    model, ctl = build(
        "bert", r=2, r_target=12, gamma=1.0, switch_interval=20, **OPTIONS["gradient subspace, LoRA's first pairs"]
    )
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q), name
    layer = ctl.layers[ctl.layer_names[0]]
    assert not layer.target.lora_B.any() and layer.entered is not None and layer.entered.A.shape[0] == 2
    train(model, "bert", adam(model), steps=25, ctl=ctl)
    assert len(ctl.history) == len(ctl.layers) and layer.target.lora_B.any()


@pytest.mark.parametrize("case_name", ["bert", "gpt2"])
def test_lora_first_pairs_keep_a_peft_start_that_moved_w(case_name):
    """first_pairs='lora' over a PEFT start that is not B = 0 and moved its part out of W (as
    CorDA's and LoRA-GA's do; PEFT's PiSSA init here): the slots and W stay as PEFT built them,
    every switch keeps the logits, and the total update is W_t + s B A - W0 against the
    pretrained weights (W0 = W + s B0 A0 at the start)."""
    kw = dict(r=2, r_target=12, gamma=1.0, switch_interval=20, direction_policy="gradient_subspace")
    model, ctl = build(case_name, lora_kwargs=dict(init_lora_weights="pissa"), first_pairs="lora", **kw)
    reference = make_peft(CASES[case_name], 0, r=2, init_lora_weights="pissa")
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q), name
    base = make_base(CASES[case_name])
    pretrained = {  # (out, in), as _effective writes it
        name: base_weight(base, name).float().T if layer.target.fan_in_fan_out else base_weight(base, name).float()
        for name, layer in ctl.layers.items()
    }
    W0 = _effective(ctl)
    for name in ctl.layers:
        torch.testing.assert_close(W0[name], pretrained[name], atol=1e-5, rtol=0)  # PEFT's split kept W0
    opt = adam(model)
    train(model, case_name, opt, steps=45, ctl=ctl)
    assert len(ctl.history) == 2 * len(ctl.layers)
    before = logits(case_name, model)
    ctl.switch(opt)
    torch.testing.assert_close(logits(case_name, model), before, atol=1e-5, rtol=0)
    now = _effective(ctl)
    for name, layer in ctl.layers.items():
        P, Q = layer.total_update_factors()
        torch.testing.assert_close(P @ Q, now[name] - W0[name], atol=2e-5, rtol=0)


def test_subspace_exclude_is_refused_outside_the_gradient_subspace():
    with pytest.raises(ValueError, match="direction_policy='gradient_subspace'"):
        SRLoRAConfig(r_target=8, total_steps=10, subspace_exclude=4)
    with pytest.raises(ValueError, match="subspace_exclude"):
        SRLoRAConfig(r_target=8, total_steps=10, direction_policy="gradient_subspace", subspace_exclude=-1)
    with pytest.raises(ValueError, match=r"first_pairs='lora'.*direction_policy='gradient_subspace'"):
        SRLoRAConfig(r_target=8, total_steps=10, first_pairs="lora")


def test_the_sketches_are_of_the_accumulated_full_weight_gradient():
    """Two micro-batches in a window: Y = G Omega and Z = Psi G with G = dL/dW from autograd;
    and the randomized SVD of the sketches gives G's top vectors when G has low rank."""
    model, ctl = _layer_with_gradient_along(torch.zeros(16), torch.zeros(16), "gradient_subspace")
    ctl.directions.update_windows(20)
    probe = ctl.directions.probes[ctl.layer_names[0]]
    assert probe.armed
    W = ctl.layers[ctl.layer_names[0]].target.base_param
    W.requires_grad_(True)
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        x = torch.randn(4, 3, 16, generator=g)  # any leading shape
        (model(x) ** 2).mean().backward()
    probe.fold()
    omega, psi = probe.test_matrices()
    G = W.grad.double()
    torch.testing.assert_close(probe.Y.double(), G @ omega.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probe.Z.double(), psi.double() @ G, rtol=1e-5, atol=1e-6)
    W.requires_grad_(False)
    # A rank-3 matrix: the sketch's top-2 vectors are its exact top-2 singular vectors.
    low = torch.randn(16, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 16, generator=g, dtype=torch.float64)
    u, v = sketch_top_vectors((low @ omega.double()).float(), (psi.double() @ low).float(), psi, 2)
    U, _, Vh = torch.linalg.svd(low)
    torch.testing.assert_close((U[:, :2].T @ u.double()).abs(), torch.eye(2, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close((Vh[:2] @ v.double()).abs(), torch.eye(2, dtype=torch.float64), atol=1e-4, rtol=0)
    # Evaluation adds nothing.
    before = probe.Y.clone()
    with torch.no_grad():
        model(torch.randn(5, 16, generator=g))
    probe.fold()
    assert torch.equal(probe.Y, before)


def test_the_hooks_exist_only_in_the_windows():
    model, ctl = build("mlp", r=2, r_target=12, switch_interval=40, direction_policy="gradient_subspace")
    probes = ctl.directions.probes.values()
    opt = adam(model)
    ctl.attach(opt)
    armed = []
    g = torch.Generator().manual_seed(0)
    for _ in range(45):
        armed.append(all(p.armed for p in probes))
        CASES["mlp"].loss(model, CASES["mlp"].batch(g)).backward()
        opt.step()
        opt.zero_grad()
    # steps 22..40 precede the switch after step 40 (19 steps at beta1 0.85)
    assert [i + 1 for i, a in enumerate(armed) if a] == list(range(22, 41))


@pytest.mark.parametrize(
    "option",
    [
        "gradient subspace",
        "spectrum, first pairs' scale",
        "gradient subspace, W0's top 4 left alone",
        "gradient subspace, LoRA's first pairs",
        "gradient subspace, whitened",
    ],
)
def test_resume_inside_a_window_is_bit_equal(tmp_path, option):
    """A run checkpointed inside a capture window, after two switches, resumed in a fresh
    model and controller, ends bit-equal to the uninterrupted run (the sketches, their test
    matrices and the records of entered pairs are restored)."""
    kw = dict(r=2, r_target=12, gamma=1.0, switch_interval=20, **OPTIONS[option])

    def run(steps: int, model, ctl, opt, seed: int) -> None:
        train(model, "bert", opt, steps=steps, seed=seed, ctl=ctl)

    model, ctl = build("bert", **kw)
    opt = adam(model)
    run(50, model, ctl, opt, 1)  # switches after steps 20 and 40; the window of step 60 is open
    save_checkpoint(tmp_path / "c.pt", model, ctl, opt)
    run(30, model, ctl, opt, 2)
    model2, ctl2 = build("bert", **kw)
    opt2 = adam(model2)
    load_checkpoint(tmp_path / "c.pt", model2, ctl2, opt2)
    run(30, model2, ctl2, opt2, 2)
    assert [e.to_dict() for e in ctl2.history] == [e.to_dict() for e in ctl.history]
    assert len(ctl.history) == 4 * len(ctl.layers)
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    for name, layer in ctl.layers.items():
        assert torch.equal(layer.entered.A, ctl2.layers[name].entered.A)


def test_export_of_a_gradient_subspace_run_loads_in_plain_peft(tmp_path):
    model, ctl = build("bert", r=2, r_target=12, gamma=1.0, switch_interval=20, direction_policy="gradient_subspace")
    opt = adam(model)
    train(model, "bert", opt, steps=65, ctl=ctl)
    ref = logits("bert", model)
    errors = ctl.export_lora(tmp_path / "adapter")
    assert max(errors.values()) < 1e-6
    from conftest import make_base

    loaded = peft.PeftModel.from_pretrained(make_base(CASES["bert"]), tmp_path / "adapter")
    torch.testing.assert_close(logits("bert", loaded), ref, atol=1e-4, rtol=0)


def test_batched_and_layer_by_layer_switches_agree(monkeypatch):
    """The groups' batched switch with vectors of their own equals the per-layer path."""
    from srlora.kinds.dense import DenseTarget

    def run(batched: bool):
        if not batched:
            monkeypatch.setattr(DenseTarget, "batch_key", lambda self: None)
        kw = dict(r=2, r_target=12, gamma=1.0, switch_interval=20, direction_policy="gradient_subspace")
        model, ctl = build("bert", **kw)
        monkeypatch.undo()
        opt = adam(model)
        train(model, "bert", opt, steps=45, ctl=ctl)
        return model, ctl

    (m1, c1), (m2, c2) = run(True), run(False)
    assert c1.switch_groups() != c2.switch_groups()
    # The two paths round differently (one batched product and randomized SVD per shape against
    # one per layer); after 45 AdamW steps at lr 1e-2 and two switches that reaches 1.05e-6 on
    # weights of ~0.15 on one of this project's CPUs (float32 eps 1.2e-7, amplified by Adam's
    # normalised steps). A different pair or direction moves a weight by ~1e-2.
    for (n, p), (_, q) in zip(m1.named_parameters(), m2.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=5e-6, rtol=0, msg=n)


def test_bad_entry_options_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="positive finite"):
        SRLoRAConfig(r_target=8, total_steps=10, entry_scale=0.0)
    with pytest.raises(TypeError, match="entry_scale"):
        SRLoRAConfig(r_target=8, total_steps=10, entry_scale="large")
    with pytest.raises(ValueError, match="gradient_subspace"):
        SRLoRAConfig(r_target=8, total_steps=10, direction_policy="subspace")


def test_bad_whitening_is_refused_with_the_fix():
    """subspace_whiten: only under the gradient's subspace, not with subspace_exclude, never
    without a run_model (nor a run_model without it), and a run_model that reaches every layer."""
    with pytest.raises(ValueError, match="direction_policy='gradient_subspace'"):
        SRLoRAConfig(r_target=8, total_steps=10, subspace_whiten=4)
    with pytest.raises(ValueError, match="one way to shape"):
        SRLoRAConfig(
            r_target=8, total_steps=10, direction_policy="gradient_subspace", subspace_whiten=4, subspace_exclude=4
        )
    config = SRLoRAConfig(r_target=12, switch_interval=20, direction_policy="gradient_subspace", subspace_whiten=4)
    with pytest.raises(ValueError, match=r"SRLoRA\(model, config, run_model=fn\)"):
        SRLoRA(make_peft(CASES["mlp"], 0, r=2), config)
    with pytest.raises(ValueError, match="set subspace_whiten=k"):
        SRLoRA(make_peft(CASES["mlp"], 0, r=2), SRLoRAConfig(r_target=12, switch_interval=20), run_model=lambda: None)
    with pytest.raises(ValueError, match="run_model never ran layer"):
        SRLoRA(make_peft(CASES["mlp"], 0, r=2), config, run_model=lambda: None)


def test_a_window_whose_gradient_is_exactly_zero_enters_the_seeded_random_directions():
    """Zero inputs: every step reaches the sketches (the output gradient is not zero), but the
    weight gradient G = delta^T x is. The pair that enters lies along the probe's seeded random
    vectors, not along whatever an SVD of a zero matrix returns."""
    model, ctl = _layer_with_gradient_along(torch.zeros(16), torch.zeros(16), "gradient_subspace")
    name = ctl.layer_names[0]
    layer, probe = ctl.layers[name], ctl.directions.probes[name]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ctl.attach(opt)
    u_out = torch.nn.functional.normalize(torch.ones(16), dim=0)
    for step in range(20):
        if step == 19:
            assert probe.steps_seen > 0 and not probe.captured
            u, v = probe.random_vectors()  # drawn before the switch moves the layer's count
            A_before = layer.target.lora_A.detach().clone()
        (-(model(torch.zeros(4, 16)) @ u_out).sum()).backward()
        opt.step()
        opt.zero_grad()
    assert len(ctl.history) == 1  # one scheduled switch
    (slot,) = [i for i in range(2) if not torch.equal(layer.target.lora_A.detach()[i], A_before[i])]
    b, a = layer.target.lora_B.detach()[:, slot], layer.target.lora_A.detach()[slot]
    assert abs(float(torch.dot(b / b.norm(), u[:, 0]))) > 1 - 1e-5
    assert abs(float(torch.dot(a / a.norm(), v[:, 0]))) > 1 - 1e-5
