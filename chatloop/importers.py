"""Readers for public preference data sets, turned into chatloop's (context, chosen, rejected).

Owns: parsing HH-RLHF dialogues and the fixed held-out rule of ``../shared/data/README.md``
(line ``i % 5 == 0`` is held out and must never train).
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Iterator

_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh_dialogue(text: str) -> tuple[list[dict[str, str]], str]:
    """Split '\\n\\nHuman: ...\\n\\nAssistant: ...' into (context messages, final assistant reply)."""
    parts = _TURN.split("\n\n" + text.lstrip("\n"))
    turns = [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
             for who, body in zip(parts[1::2], parts[2::2])]
    if not turns or turns[-1]["role"] != "assistant":
        raise ValueError("an HH-RLHF dialogue must end with an Assistant turn")
    return turns[:-1], turns[-1]["content"]


def hh_pairs(path: str | Path, split: str = "train") -> Iterator[dict]:
    """Pairs from an HH-RLHF jsonl(.gz) file; split is 'train' (i % 5 != 0) or 'heldout' (i % 5 == 0)."""
    if split not in ("train", "heldout"):
        raise ValueError("split must be 'train' or 'heldout'")
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if (i % 5 == 0) != (split == "heldout"):
                continue
            row = json.loads(line)
            context, chosen = parse_hh_dialogue(row["chosen"])
            context_r, rejected = parse_hh_dialogue(row["rejected"])
            if context != context_r or not chosen or not rejected or chosen == rejected:
                continue
            yield {"index": i, "prompt": context, "chosen": chosen, "rejected": rejected}
