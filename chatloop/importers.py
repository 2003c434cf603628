"""Public preference data sets: readers, and imports into the feedback log.

Owns: parsing HH-RLHF dialogues and OpenAssistant message trees, the fixed held-out rule of
``../shared/data/README.md`` (HH-RLHF line ``i % 5 == 0`` and OASST tree ``i % 5 == 0`` are held
out), and replaying them as conversations, thumbs and A/B choices.

Invariants:
- Imports write through the same store calls as live traffic (``new_conversation``,
  ``record_exchange``, ``record_feedback``, ``record_comparison``): nothing reaches the log by
  another path. Imported replies record the adapter version ``external`` (no version of ours wrote them).
- Held-out rows are imported into conversations marked ``held_out``; the store never hands those
  to a training snapshot.
- An import is idempotent: each conversation names its origin (``external_id``) and a row that
  is already in the log is skipped.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Iterator

EXTERNAL_VERSION = "external"  # adapter_version of imported replies

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


def held_out_index(i: int) -> bool:
    """The shared data's fixed split: row (or tree) ``i`` is held out when ``i % 5 == 0``."""
    return i % 5 == 0


def oasst_trees(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(position, tree) of an OpenAssistant ``*_tree.jsonl`` file."""
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if line.strip():
                yield i, json.loads(line)


def oasst_reply_sets(tree: dict[str, Any]) -> Iterator[tuple[list[dict[str, str]], list[dict[str, Any]]]]:
    """(context, assistant replies) for every prompter message with assistant replies, walking the
    whole tree (multi-turn contexts included). Deleted and empty messages are skipped."""
    def walk(node: dict[str, Any], context: list[dict[str, str]]):
        if node.get("deleted") or not (node.get("text") or "").strip():
            return
        role = "user" if node["role"] == "prompter" else "assistant"
        here = context + [{"role": role, "content": node["text"].strip()}]
        kids = [r for r in node.get("replies", []) if not r.get("deleted") and (r.get("text") or "").strip()]
        if role == "user":
            replies = [r for r in kids if r["role"] == "assistant"]
            if replies:
                yield here, replies
        for r in kids:
            yield from walk(r, here)

    yield from walk(tree["prompt"], [])


@dataclass
class ImportReport:
    conversations: int = 0
    replies: int = 0
    thumbs: int = 0
    comparisons: int = 0
    held_out_conversations: int = 0
    skipped: int = 0  # already in the log

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def _record_reply(store, user: str, context: list[dict[str, str]], reply: str, external_id: str,
                  held_out: bool, report: ImportReport) -> str:
    from chatloop.store import GenerationRecord

    conv = store.new_conversation(user, "import", external_id=external_id, held_out=held_out)
    report.conversations += 1
    report.held_out_conversations += held_out
    report.replies += 1
    return store.record_exchange(conv, GenerationRecord(
        context=context, reply=reply, model="import", adapter_version=EXTERNAL_VERSION, settings={},
        prompt_tokens=0, completion_tokens=0, ttft_ms=None, latency_ms=0.0, finish_reason="import"))


def import_oasst(store, path: str | Path, on_tree=lambda i: None) -> ImportReport:
    """OpenAssistant trees as feedback: each assistant reply is a conversation; its ``+1``/``-1``
    emoji counts become that many thumbs from distinct raters; siblings ranked by people become A/B
    choices (every ranked pair: the better rank wins). Trees at ``i % 5 == 0`` are held out."""
    report = ImportReport()
    done = store.imported_ids("oasst:")
    for i, tree in oasst_trees(path):
        held = held_out_index(i)
        for context, replies in oasst_reply_sets(tree):
            ids: dict[str, str] = {}
            for r in replies:
                ext = f"oasst:{r['message_id']}"
                if ext in done:
                    report.skipped += 1
                    continue
                mid = _record_reply(store, f"oasst:author:{r['message_id']}", context, r["text"].strip(), ext,
                                    held, report)
                ids[r["message_id"]] = mid
                emojis = r.get("emojis") or {}
                for rating, key in ((1, "+1"), (-1, "-1")):
                    for k in range(int(emojis.get(key, 0) or 0)):
                        store.record_feedback(mid, f"oasst:rater:{tree['message_tree_id']}:{key}:{k}", rating,
                                              reason="imported from OpenAssistant")
                        report.thumbs += 1
            ranked = sorted((r for r in replies if r.get("rank") is not None and r["message_id"] in ids),
                            key=lambda r: r["rank"])
            ranker = f"oasst:ranker:{tree['message_tree_id']}"
            for a in range(len(ranked)):
                for b in range(a + 1, len(ranked)):
                    if ranked[a]["rank"] == ranked[b]["rank"]:
                        continue
                    store.record_comparison(ids[ranked[a]["message_id"]], ids[ranked[b]["message_id"]], "a", ranker)
                    report.comparisons += 1
        on_tree(i)
    return report


def import_hh(store, path: str | Path, limit: int | None = None, on_row=lambda i: None) -> ImportReport:
    """HH-RLHF pairs as A/B choices (chosen = a). Lines ``i % 5 == 0`` are held out; ``limit``
    caps the pairs imported from each side (held-out and training)."""
    report = ImportReport()
    done = store.imported_ids("hh:")
    counts = {True: 0, False: 0}
    rows = sorted(list(hh_pairs(path, "train")) + list(hh_pairs(path, "heldout")), key=lambda p: p["index"])
    for p in rows:
        held = held_out_index(p["index"])
        if limit is not None and counts[held] >= limit:
            continue
        counts[held] += 1
        ext = f"hh:{Path(path).name}:{p['index']}"
        if f"{ext}:chosen" in done:
            report.skipped += 1
            continue
        user = f"hh:rater:{p['index']}"
        a = _record_reply(store, user, p["prompt"], p["chosen"], f"{ext}:chosen", held, report)
        b = _record_reply(store, user, p["prompt"], p["rejected"], f"{ext}:rejected", held, report)
        store.record_comparison(a, b, "a", user)
        report.comparisons += 1
        on_row(p["index"])
    return report
