"""Tiny random models for the unit tests (an MLP, a BERT, a GPT-2) and helpers; for the
harness, a tiny BERT folder, a fake MR asset and a GLUE folder built here."""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import peft
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast, GPT2Config, GPT2LMHeadModel

from srlora import SRLoRA, SRLoRAConfig
from srlora.experiments import assets, tasks
from srlora.experiments.cache import write_manifest


# ---------------------------------------------------------------- running the suite
def _share_the_cores() -> None:
    """Under pytest-xdist, each worker takes its share of the cores (torch's default is all of
    them in every worker, which oversubscribes them)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


_share_the_cores()


def pytest_collection_modifyitems(config, items) -> None:
    """The multi-process modules first: under xdist their long launches start at once and the
    many short tests fill the other workers around them, instead of one worker running the last
    launch-heavy module alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("distributed") is None)  # stable


class MLP(nn.Module):
    """Three Linear layers; the two hidden ones are LoRA targets."""

    def __init__(self, d_in: int = 48, d_hidden: int = 80, d_out: int = 5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_in)
        self.head = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


@dataclass
class Case:
    """A tiny model, its LoRA targets, an input batch and a loss."""

    name: str
    build: Callable[[], nn.Module]
    targets: list[str]
    batch: Callable[[torch.Generator], dict]
    loss: Callable[[nn.Module, dict], torch.Tensor]
    logits: Callable[[nn.Module, dict], torch.Tensor]


def _mlp_batch(g: torch.Generator) -> dict:
    return {"x": torch.randn(8, 48, generator=g), "y": torch.randint(0, 5, (8,), generator=g)}


def _bert() -> nn.Module:
    cfg = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg)


def _gpt2() -> nn.Module:
    cfg = GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return GPT2LMHeadModel(cfg)


def _tokens(g: torch.Generator) -> dict:
    return {
        "input_ids": torch.randint(0, 100, (4, 12), generator=g),
        "labels": torch.randint(0, 3, (4,), generator=g),
    }


def _lm_tokens(g: torch.Generator) -> dict:
    ids = torch.randint(0, 100, (4, 12), generator=g)
    return {"input_ids": ids, "labels": ids}


CASES = {
    "mlp": Case(
        "mlp",
        MLP,
        ["fc1", "fc2"],
        _mlp_batch,
        lambda m, b: nn.functional.cross_entropy(m(b["x"]), b["y"]),
        lambda m, b: m(b["x"]),
    ),
    "bert": Case(
        "bert",
        _bert,
        ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
        _tokens,
        lambda m, b: m(**b).loss,
        lambda m, b: m(input_ids=b["input_ids"]).logits,
    ),
    "gpt2": Case(
        "gpt2",
        _gpt2,
        ["c_attn", "c_proj", "c_fc"],
        _lm_tokens,
        lambda m, b: m(**b).loss,
        lambda m, b: m(input_ids=b["input_ids"]).logits,
    ),
}


def make_llama(seed: int = 0, **sizes: int) -> nn.Module:
    """A tiny random Llama (2 blocks, grouped-query attention), ``sizes`` overriding its
    vocabulary, widths and context."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = dict(vocab_size=64, hidden_size=32, intermediate_size=64, max_position_embeddings=32)
    cfg = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **{**dims, **sizes})
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def make_base(case: Case, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return case.build().eval()


def make_peft(case: Case, seed: int = 0, r: int = 4, alpha: float = 8, **lora_kwargs) -> nn.Module:
    """A PEFT LoRA model over the tiny base (default init: B = 0). The B factors are
    then given random values so the LoRA branch is not a no-op (a partially trained adapter)."""
    base = make_base(case, seed)
    kwargs = dict(r=r, lora_alpha=alpha, target_modules=case.targets, lora_dropout=0.0)
    if case.name == "gpt2":
        kwargs["fan_in_fan_out"] = True
    kwargs.update(lora_kwargs)
    return peft.get_peft_model(base, peft.LoraConfig(**kwargs))


def build(
    case_name: str, seed: int = 0, r: int = 4, alpha: float = 8, lora_kwargs: dict | None = None, **config_kwargs
) -> tuple[nn.Module, SRLoRA]:
    case = CASES[case_name]
    model = make_peft(case, seed, r=r, alpha=alpha, **(lora_kwargs or {}))
    config_kwargs.setdefault("r_target", 16)
    config_kwargs.setdefault("switch_interval", 20)
    run_model = general_text(model, case) if config_kwargs.get("subspace_whiten") else None
    ctl = SRLoRA(model, SRLoRAConfig(**config_kwargs), run_model=run_model)
    return model, ctl


def general_text(model: nn.Module, case: Case, batches: int = 2):
    """``run_model`` for ``subspace_whiten``: the model's forward on batches of a seed no
    training batch uses (the tests' "text the model should keep knowing")."""

    def run_model() -> None:
        g = torch.Generator().manual_seed(99)
        for _ in range(batches):
            case.loss(model, case.batch(g))

    return run_model


def adam(model: nn.Module, lr: float = 1e-2, **kw) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, **kw)


def train(
    model: nn.Module, case_name: str, opt: torch.optim.Optimizer, steps: int, seed: int = 1, ctl: SRLoRA | None = None
) -> list[float]:
    """``steps`` optimizer steps on fresh random batches; with ``ctl``, the manual protocol."""
    case = CASES[case_name]
    g = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(steps):
        loss = case.loss(model, case.batch(g))
        loss.backward()
        if ctl is not None:
            ctl.update_importance()
        opt.step()
        if ctl is not None:
            ctl.step(opt)
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def logits(case_name: str, model: nn.Module, seed: int = 3) -> torch.Tensor:
    """The model's logits (eval mode, no grad) on a fixed batch of the case."""
    case = CASES[case_name]
    model.eval()
    with torch.no_grad():
        return case.logits(model, case.batch(torch.Generator().manual_seed(seed)))


def hand_scores(snapshots, beta1: float = 0.85, beta2: float = 0.85) -> torch.Tensor:
    """Pair scores by Eq. 3-7 in float64 from the ``(A, grad A, B, grad B)`` of each step."""
    ibar = ubar = None
    for A, gA, B, gB in snapshots:
        sens = [(A * gA).abs(), (B * gB).abs()]
        if ibar is None:
            ibar, ubar = [torch.zeros_like(t) for t in sens], [torch.zeros_like(t) for t in sens]
        for i in range(2):
            ibar[i] = beta1 * ibar[i] + (1 - beta1) * sens[i]
            ubar[i] = beta2 * ubar[i] + (1 - beta2) * (sens[i] - ibar[i]).abs()
    return (ibar[0] * ubar[0]).mean(dim=1) + (ibar[1] * ubar[1]).mean(dim=0)


@pytest.fixture(params=list(CASES))
def case_name(request) -> str:
    return request.param


# ---------------------------------------------------------------- the harness
WORDS = [
    "good",
    "bad",
    "great",
    "awful",
    "fine",
    "poor",
    "movie",
    "film",
    "plot",
    "acting",
    "story",
    "dull",
    "fun",
    "boring",
    "superb",
    "weak",
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertForSequenceClassification(cfg).save_pretrained(folder)
    return folder


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))


@pytest.fixture()
def fake_cache(tmp_path, monkeypatch) -> Path:
    """An SRLORA_CACHE whose 'vader' asset is a small file in the real layout, with the
    manifest a fetch writes (the real file's pinned hash is lifted for it)."""
    cache = tmp_path / "cache"
    folder = cache / "vader"
    folder.mkdir(parents=True)
    rng = random.Random(0)
    n_pos = tasks.MR_POSITIVE_LINES
    lines = []
    for i in range(1, 6001):
        rating = rng.uniform(0.1, 4) if i <= n_pos else -rng.uniform(0.1, 4)
        lines.append(f"{i}\t{rating:.3f}\t{sentence(rng)} {i}")  # unique: the splits can be checked
    (folder / "movieReviewSnippets_GroundTruth.txt").write_text("\n".join(lines) + "\n")
    write_manifest(folder)
    monkeypatch.setitem(assets.ASSETS, "vader", dataclasses.replace(assets.ASSETS["vader"], files=None))
    monkeypatch.setenv("SRLORA_CACHE", str(cache))
    return cache


def glue_folder(root: Path) -> Path:
    rng = random.Random(1)
    (root / "SST-2").mkdir(parents=True)
    (root / "RTE").mkdir()
    (root / "STS-B").mkdir()
    for split, n in (("train", 64), ("dev", 24)):
        rows = ["sentence\tlabel"] + [f"{sentence(rng)}\t{rng.randint(0, 1)}" for _ in range(n)]
        (root / "SST-2" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
        rows = ["index\tsentence1\tsentence2\tlabel"] + [
            f"{i}\t{sentence(rng)}\t{sentence(rng)}\t{rng.choice(['entailment', 'not_entailment'])}" for i in range(n)
        ]
        (root / "RTE" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
        rows = ["index\tgenre\tsentence1\tsentence2\tscore"] + [
            f"{i}\tmain\t{sentence(rng)}\t{sentence(rng)}\t{rng.uniform(0, 5):.2f}" for i in range(n)
        ]
        (root / "STS-B" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return root
