"""Oracles: stand-ins for people that score a reply, and the prompts they ask.

Owns: the built-in oracles (``sentiment``: VADER's compound score of the reply, on prompts that ask
the bot to continue the opening of an IMDb review; ``concise``: shorter complete answers score
higher, on OpenAssistant prompts), loading any ``module:function`` as an oracle, and reading
prompts with the shared data's fixed split (row or tree ``i % 5 == 0`` is held out).

Invariants: an oracle only scores; it never sees the model. ``score(context, reply)`` is
deterministic, so the same reply always gets the same verdict. A reply is *liked* (a thumbs-up)
when its score is at least the oracle's threshold; in an A/B choice the higher score wins and
equal scores are a tie.
"""

from __future__ import annotations

import csv
import html
import importlib
import json
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

Context = list[dict[str, str]]
ScoreFn = Callable[[Context, str], float]

# the shared evaluation data beside a checkout of the repository (or where CHATLOOP_SHARED_DATA says)
SHARED_DATA = Path(os.environ.get("CHATLOOP_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
IMDB_FILE = "imdb_reviews.csv"
OASST_FILE = "oasst_en_100_tree.jsonl"
SPLITS = ("train", "heldout")


@dataclass
class Oracle:
    name: str
    score: ScoreFn
    threshold: float
    default_prompts: str | None  # a file name in the shared data directory, or None

    def likes(self, context: Context, reply: str) -> bool:
        return self.score(context, reply) >= self.threshold

    def choose(self, context: Context, reply_a: str, reply_b: str) -> str:
        """'a', 'b' or 'tie' for two replies to the same context."""
        a, b = self.score(context, reply_a), self.score(context, reply_b)
        return "a" if a > b else "b" if b > a else "tie"


# ---- built-in oracles ------------------------------------------------------------------------------
_vader = None


def sentiment_score(context: Context, reply: str) -> float:
    """VADER's compound sentiment of the reply, in [-1, 1] (>= 0.05 is VADER's 'positive')."""
    global _vader
    if _vader is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _vader = SentimentIntensityAnalyzer()
    return float(_vader.polarity_scores(reply)["compound"])


def concise_score(context: Context, reply: str) -> float:
    """1 / (1 + words / 25), halved when the reply does not end a sentence (cut off or rambling):
    a short complete answer scores near 1, an empty one 0."""
    text = reply.strip()
    if not text:
        return 0.0
    words = len(text.split())
    complete = bool(re.search(r"[.!?)\"'`]\s*$", text))
    return (1.0 if complete else 0.5) / (1 + words / 25)


BUILT_IN = {
    "sentiment": lambda: Oracle("sentiment", sentiment_score, 0.05, IMDB_FILE),
    "concise": lambda: Oracle("concise", concise_score, 0.5, OASST_FILE),
}


def load_oracle(name: str, threshold: float | None = None) -> Oracle:
    """A built-in oracle by name, or ``module:function`` (the function scores (context, reply))."""
    if name in BUILT_IN:
        oracle = BUILT_IN[name]()
    elif ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot load oracle {name!r}: {exc}") from None
        if not callable(fn):
            raise ValueError(f"oracle {name!r} is not callable")
        oracle = Oracle(name, fn, 0.0, None)
    else:
        raise ValueError(f"unknown oracle {name!r}: use {', '.join(BUILT_IN)} or module:function")
    if threshold is not None:
        oracle.threshold = threshold
    return oracle


# ---- prompts ---------------------------------------------------------------------------------------
def _in_split(i: int, split: str) -> bool:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    return (i % 5 == 0) == (split == "heldout")


def review_opening(review: str, words: int = 12) -> str:
    """The first ``words`` words of an IMDb review, HTML line breaks, entities and control
    characters (the data set has stray C1 codes such as U+0085) removed."""
    text = html.unescape(re.sub(r"<br\s*/?>", " ", review))
    text = "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in text)
    return " ".join(text.split()[:words])


def imdb_prompts(path: Path, split: str, words: int = 12) -> list[Context]:
    """'Continue this movie review' prompts from the openings of IMDb reviews (row split)."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if rows and "review" not in rows[0]:
        raise ValueError(f"{path} has no 'review' column")
    return [[{"role": "user", "content": f"Continue this movie review: {review_opening(r['review'], words)}"}]
            for i, r in enumerate(rows) if _in_split(i, split)]


def oasst_prompts(path: Path, split: str) -> list[Context]:
    """The opening question of every OpenAssistant tree (tree split)."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(l for l in fh if l.strip()):
            if _in_split(i, split):
                text = json.loads(line)["prompt"]["text"].strip()
                if text:
                    out.append([{"role": "user", "content": text}])
    return out


def text_prompts(path: Path, split: str) -> list[Context]:
    """One prompt per non-empty line (line split)."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [[{"role": "user", "content": t}] for i, t in enumerate(lines) if _in_split(i, split)]


def load_prompts(oracle: Oracle, split: str, path: str | Path | None = None) -> list[Context]:
    """The prompts an oracle asks: from ``path`` (IMDb ``.csv``, OASST ``.jsonl`` trees or a ``.txt``
    with one prompt per line), else from the oracle's own file in ``../shared/data``."""
    if path is None:
        if oracle.default_prompts is None:
            raise ValueError(f"oracle {oracle.name!r} has no prompts of its own: pass a prompts file")
        path = SHARED_DATA / oracle.default_prompts
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompts file not found: {path}")
    if path.suffix == ".csv":
        prompts = imdb_prompts(path, split)
    elif path.suffix == ".jsonl":
        prompts = oasst_prompts(path, split)
    else:
        prompts = text_prompts(path, split)
    if not prompts:
        raise ValueError(f"no {split} prompts in {path}")
    return prompts
