"""How relevant are stored replies to their prompts? The gate's task-relevance figure (the base
model's prompt-reply PMI per token, ``chatloop.train.relevance``) of every side of a replies file
that ``benchmarks/efficacy.py --replies`` wrote, with its standard error, and the gate's verdict on
each candidate at the current ``gate_min_relevance`` and over a range of thresholds.

    python benchmarks/relevance.py REPLIES.json [REPLIES.json ...] [--prompts N] [--model default] [--json]

Per side (the base model, then each algorithm's candidate): ``mean``, ``se``, ``replies`` (empty ones
left out), ``ratio_to_base``, ``drop`` (base minus side) and ``passes`` (the gate's own
``relevance_check`` at the default thresholds). Also the same verdict at the gate's own size:
``gate_prompts`` consecutive prompts at a time, the share of such windows that pass
(``pass_rate_at_gate_size``), since the gate sees that many prompts, not all of them. With --json the last line is one JSON object keyed by file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from chatloop.config import TrainingDefaults  # noqa: E402
from chatloop.evaluate import relevance_check  # noqa: E402
from chatloop.oracles import load_oracle, load_prompts  # noqa: E402
from chatloop.train.relevance import pmi_of_texts, summary  # noqa: E402


def gate_size_pass_rate(cand: list[float | None], base: list[float | None], size: int, t: TrainingDefaults) -> float:
    """The share of consecutive ``size``-prompt windows that the gate's relevance check passes."""
    n = len(cand)
    if n < size:
        size = n
    passed = total = 0
    for start in range(0, n - size + 1):
        check = relevance_check({"candidate": summary(cand[start:start + size]),
                                 "base": summary(base[start:start + size])}, t)
        if check.passed is None:
            continue
        total += 1
        passed += bool(check.passed)
    return passed / max(total, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--prompts", type=int, default=0, help="only the first N prompts (0 = all)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--max-reply-tokens", type=int, default=48)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import tempfile

    from chatloop.models import load_model

    loaded = load_model(args.model, Path(tempfile.gettempdir()) / "chatloop-relevance-models")
    model, tok = loaded.model.eval(), loaded.tokenizer
    t = TrainingDefaults()
    out: dict[str, Any] = {}
    for name in args.files:
        data = json.loads(Path(name).read_text())
        contexts = load_prompts(load_oracle(data["oracle"]), "heldout", data.get("prompts"))
        sides = {"base": data["base"], **{k: v["texts"] for k, v in data.items() if isinstance(v, dict) and "texts" in v}}
        n = min(len(v) for v in sides.values())
        if args.prompts:
            n = min(n, args.prompts)
        values = {s: pmi_of_texts(model, tok, contexts[:n], texts[:n], max_reply_tokens=args.max_reply_tokens)
                  for s, texts in sides.items()}
        base = summary(values["base"])
        rows = {}
        for side, vals in values.items():
            s = summary(vals)
            ratio = s["mean"] / base["mean"] if base["mean"] and base["mean"] > 0 and s["mean"] is not None else None
            rows[side] = {**{k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()},
                          "ratio_to_base": None if ratio is None else round(ratio, 3),
                          "drop": None if s["mean"] is None else round(base["mean"] - s["mean"], 4),
                          "passes": None if side == "base" else relevance_check({"candidate": s, "base": base}, t).passed,
                          "pass_rate_at_gate_size": None if side == "base" else round(
                              gate_size_pass_rate(vals, values["base"], t.gate_prompts, t), 3),
                          "gate_then": data[side].get("gate") if side != "base" else None}
        out[Path(name).name] = {"oracle": data["oracle"], "prompts": n, "sides": rows}
        print(f"{name}: oracle {data['oracle']}, {n} held-out prompts, gate_max_relevance_drop "
              f"{t.gate_max_relevance_drop}, gate_min_relevance {t.gate_min_relevance}")
        cols = ["mean", "se", "replies", "ratio_to_base", "drop", "passes", "pass_rate_at_gate_size", "gate_then"]
        print(f"{'side':<10}" + "".join(f"{c:>24}" for c in cols))
        for side, r in rows.items():
            print(f"{side:<10}" + "".join(f"{r[c]!s:>24}" for c in cols))
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
