"""The absorption corpus (:mod:`srlora.experiments.absorb`): TRL's source cut into training
blocks, held-out chunks and held-out documents, and the general texts that measure forgetting
(movie-review prose, news snippets) or feed CorDA's covariance (review snippets, in no
evaluation set). Fixed sets: they do not depend on a run's seed.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from . import assets


class Sizes(Protocol):
    """What the corpus takes of a run's configuration (:class:`~srlora.experiments.absorb.AbsorbConfig`)."""

    block: int  # tokens per block
    train_blocks: int  # at most this many training blocks
    eval_blocks: int  # blocks per evaluation set
    batch: int  # blocks per training batch: the training set must hold one


@dataclass
class Corpus:
    train: torch.Tensor  # (N, block) token ids
    held_chunks: torch.Tensor
    held_docs: torch.Tensor
    prose: torch.Tensor
    news: torch.Tensor
    general: torch.Tensor  # CorDA's covariance source (Amazon review snippets): in no evaluation set
    stats: dict[str, int]


def _hash01(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def _blocks(ids: list[int], block: int) -> list[list[int]]:
    return [ids[i : i + block] for i in range(0, len(ids) - block + 1, block)]


def snippets(folder: Path, kind: str) -> list[str]:
    """The texts of one of the vaderSentiment archive's rated snippet files (``id, rating, text``)."""
    texts = []
    with open(folder / f"{kind}_GroundTruth.txt", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 3 and parts[2].strip():
                texts.append(parts[2].strip())
    return texts


def build_corpus(
    tokenizer: Any,
    cfg: Sizes,
    folder: Path | None = None,
    prose: list[str] | None = None,
    news: list[str] | None = None,
    general: list[str] | None = None,
) -> Corpus:
    """The token sets (fixed: they do not depend on the run's seed). Forgetting is measured on two
    general texts, the movie-review sentences (``prose``) and New York Times editorial snippets
    (``news``); CorDA's covariance comes from a third, Amazon review snippets (``general``)."""
    folder = folder or assets.fetch("trl-source")
    docs = sorted(p for p in folder.rglob("*.py") if p.is_file())
    rng = random.Random(20)
    train, held_chunks, held_docs = [], [], []
    for path in docs:
        rel = str(path.relative_to(folder))
        ids = tokenizer(path.read_text(encoding="utf-8", errors="replace"))["input_ids"]
        blocks = _blocks(ids, cfg.block)
        if len(blocks) < 2:
            continue
        if _hash01(rel) < 0.15:
            held_docs.extend(blocks)
            continue
        if len(train) >= cfg.train_blocks:
            continue  # the training set is full; later documents stay out of every set
        held = set(rng.sample(range(len(blocks)), max(1, round(0.12 * len(blocks)))))
        held_chunks.extend(b for i, b in enumerate(blocks) if i in held)
        train.extend(b for i, b in enumerate(blocks) if i not in held)
    if prose is None:
        from .tasks import load_mr_lines

        prose, _, _ = load_mr_lines(assets.fetch("vader"))
        prose = prose[:3000]
    if news is None:
        news = snippets(assets.fetch("vader"), "nytEditorialSnippets")
    if general is None:
        general = snippets(assets.fetch("vader"), "amazonReviewSnippets")

    def text_blocks(texts: list[str]) -> list[list[int]]:
        return _blocks(tokenizer("\n".join(texts))["input_ids"], cfg.block)

    def pick(blocks: list[list[int]], k: int) -> torch.Tensor:
        chosen = random.Random(7).sample(range(len(blocks)), min(k, len(blocks)))
        return torch.tensor([blocks[i] for i in sorted(chosen)], dtype=torch.long)

    corpus = Corpus(
        train=torch.tensor(train, dtype=torch.long),
        held_chunks=pick(held_chunks, cfg.eval_blocks),
        held_docs=pick(held_docs, cfg.eval_blocks),
        prose=pick(text_blocks(prose), cfg.eval_blocks),
        news=pick(text_blocks(news), cfg.eval_blocks),
        general=pick(text_blocks(general), 4 * cfg.eval_blocks),  # 32k tokens: a full-rank covariance
        stats={"train_blocks": len(train), "held_chunk_pool": len(held_chunks), "held_doc_pool": len(held_docs)},
    )
    if len(corpus.train) < cfg.batch:
        raise ValueError(f"the corpus gave {len(corpus.train)} training blocks, fewer than one batch.")
    return corpus
