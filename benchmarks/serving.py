"""Serving speed of the engine on the default model, side by side in one process (ratios, because
these machines are shared and noisy):

- single-stream decode tokens/s through the engine, and a bare KV-cache greedy loop over the same
  model (the ceiling for one stream in eager PyTorch);
- aggregate decode tokens/s with 8 (and 16) concurrent streams, and TTFT p50/p95 at 8; at 8 also
  with sdpa over the whole padded batch instead of the engine's row-invariant attention (its cost);
- activation latency: publish a new adapter version -> first token from it, while 4 streams run
  (with the service's spare slot kept ready; the stall that building it again puts on the streams);
- decode cost of a LoRA adapter (r=16 on every linear layer) vs the base model: as served alone
  (folded into the weights, ``merge_single_version``) and unmerged (the per-row forward of mixed
  batches);
- chunked prefill: the p95 inter-token gap of 7 running streams while a 2,000-token prompt joins
  them, against their quiet p95 in the seconds just before and just after the join, with the
  prompt prefilled in chunks that ride in the streams' decode steps (the default,
  engine/ragged.py), in chunks of their own between two steps, and whole;
- per weight format (``serve_weights``: fp32, bf16, int8, int4; engine/weights.py), side by side:
  single-stream and 8-stream tokens/s, a LoRA version served fused vs the base, how many greedy
  tokens stay equal to fp32's, and per-token perplexity of held-out HH-RLHF (chosen) and OASST
  replies (../shared/data; skipped with a note where it is absent) as a ratio to fp32's;
  the headline figures above use the default format (``--serve-weights``, auto = int4 on a CPU);
- where ``llama-cpp-python`` is installed (``pip install -e .[bench]``, compiles for minutes),
  the same GGUF through llama.cpp, single stream, and our ratios to it.

    python benchmarks/serving.py [--tokens 64] [--rounds 3] [--serve-weights auto] [--formats fp32,bf16,int8,int4] [--json]

Prints a table, and with --json a last line holding one JSON object with the keys single_tok_s,
bare_tok_s, single_vs_bare, concurrent8_tok_s, concurrent8_vs_single, row_invariant_vs_batched_attention,
ttft_p50_ms, ttft_p95_ms, activation_ms_p50 (and _p95, _max), lora_vs_base, lora_unmerged_vs_base, long_join_vs_quiet (and _own_forward, _unchunked),
long_join_ttft_s (and _own_forward, _unchunked), and when measured llamacpp_tok_s, single_vs_llamacpp,
concurrent8_vs_llamacpp (plus a few more described in the table), and ``formats``: one object
per weight format.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from tqdm import tqdm

from _report import print_report
from chatloop.adapters import AdapterRegistry
from chatloop.config import GenerationDefaults, Settings
from chatloop.engine import Completion, Engine, GenerationParams
from chatloop.engine.attention import use_row_invariant_attention
from chatloop.engine.weights import PackedLinear, pack_for_serving, resolve_serve_weights
from chatloop.importers import hh_pairs, held_out_index, oasst_reply_sets, oasst_trees
from chatloop.oracles import SHARED_DATA, load_oracle, load_prompts
from chatloop.models import LoadedModel, default_model_source, in_passing_thread, load_model
from chatloop.train.configs import lora_config

TOPICS = ["the printing press", "bees", "the Roman roads", "volcanoes", "the violin", "tea",
          "lighthouses", "glaciers", "the bicycle", "coral reefs", "paper money", "owls",
          "the telescope", "salt", "bridges", "the compass"]


def essay(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write a long, detailed essay about {TOPICS[i % len(TOPICS)]}."}]


def params(tokens: int, greedy: bool = True, seed: int | None = None) -> GenerationParams:
    given = {"temperature": 0.0} if greedy else {"temperature": 0.7, "seed": seed}
    return GenerationParams.from_request(GenerationDefaults(), max_tokens=tokens, repetition_penalty=1.0,
                                         **given)


def decode_tok_s(c: Completion) -> float:
    """Tokens per second after the first one (prefill and queueing excluded)."""
    return (c.completion_tokens - 1) / max((c.latency_ms - (c.ttft_ms or 0.0)) / 1000, 1e-9)


def bare_greedy_tok_s(loaded: LoadedModel, messages: list[dict[str, str]], n: int) -> float:
    """The ceiling: a plain KV-cache greedy loop, no sampling machinery, no streaming."""
    ids = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)["input_ids"].to(loaded.device)
    model = loaded.model
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(n - 1):
            out = model(input_ids=tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return (n - 1) / (time.perf_counter() - t0)


def single(engine: Engine, tokens: int, adapter: str | None = None) -> Completion:
    return engine.generate(essay(0), params(tokens), adapter=adapter, timeout=600)


def concurrent(engine: Engine, streams: int, tokens: int, round_: int) -> tuple[float, list[float]]:
    """Aggregate tokens/s of ``streams`` simultaneous sampled requests, and their TTFTs."""
    t0 = time.perf_counter()
    handles = [engine.submit(essay(i), params(tokens, greedy=False, seed=round_ * 100 + i))
               for i in range(streams)]
    done = [h.result(600) for h in handles]
    wall = time.perf_counter() - t0
    return sum(c.completion_tokens for c in done) / wall, [c.ttft_ms for c in done]


def make_lora(loaded: LoadedModel, out: Path) -> Path:
    """A random r=16 LoRA on every linear layer of the default model (timing only)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(loaded.path, dtype=torch.float32)
    peft = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                           init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.mul_(0.01)  # a nudge, not noise: replies stay text
    peft.save_pretrained(out)
    return out


def activation_ms(engine: Engine, registry: AdapterRegistry, adapter_dir: Path, trials: int,
                  tokens: int) -> tuple[list[float], int]:
    """Publish -> activate -> first token from the new version, while 4 streams keep decoding;
    and how many of the trials found no spare slot (so built one inside the activation).

    In the service, activations come a training cycle apart, and the engine builds its spare slot
    again in the meantime (``spare_wait_s`` after an activation, between two steps): each trial
    waits up to 10 s for that spare first, as an activation in the service would have had it."""
    stop = threading.Event()

    def background(i: int) -> None:
        while not stop.is_set():
            engine.generate(essay(i), params(tokens, greedy=False, seed=i), timeout=600)

    workers = [threading.Thread(target=background, args=(i,), daemon=True) for i in range(4)]
    for w in workers:
        w.start()
    time.sleep(2)
    out, without_spare = [], 0
    for _ in range(trials):
        deadline = time.monotonic() + 10
        while not engine.spare_ready and time.monotonic() < deadline:
            time.sleep(0.05)
        without_spare += not engine.spare_ready
        t0 = time.perf_counter()
        version = registry.publish(adapter_dir, {"parent": "base", "algorithm": "benchmark"})
        engine.activate(version)
        handle = engine.submit(essay(1), params(1))
        next(iter(handle), None)
        done = handle.result(600)
        assert done.adapter_version == version
        out.append((time.perf_counter() - t0) * 1000)
    stop.set()
    for w in workers:
        w.join(600)
    return out, without_spare


def long_prompt(engine: Engine, tokens: int) -> list[dict[str, str]]:
    """A user message of about ``tokens`` tokens (with the chat template)."""
    words = ("The river runs past the old mill, under the stone bridge and out to the wide sea. " * 400).split()
    lo, hi = 1, len(words)
    while lo < hi:  # the longest prefix of words that fits
        mid = (lo + hi + 1) // 2
        if len(engine._encode([{"role": "user", "content": " ".join(words[:mid])}])) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return [{"role": "user", "content": " ".join(words[:lo]) + " Summarise that."}]


def p95(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.95 * len(xs)))] if xs else float("nan")


class JoinGaps(NamedTuple):
    quiet_before: float  # p95 inter-token gap (ms) of the streams in the window before the join
    quiet_after: float  # ... in the window after it (their conversations have grown meanwhile)
    quiet: float  # ... over both windows: the quiet reference, at contexts around the join's
    join: float  # ... while the prompt joined (from its submission to its first token)
    ttft_s: float  # the joining prompt's time to first token


def long_join_gaps(engine: Engine, prompt_tokens: int, streams: int = 7, quiet_s: float = 2.0) -> JoinGaps:
    """The inter-token gaps of ``streams`` running replies while a prompt of ``prompt_tokens``
    tokens joins them, against their gaps without it just before and just after (the streams'
    own conversations grow during a join of many seconds, and a longer one decodes slower; the
    joining reply ends at its first token, so the window after holds only the streams)."""
    long = long_prompt(engine, prompt_tokens)
    stamps: list[list[float]] = [[] for _ in range(streams)]
    handles = [engine.submit(essay(i), params(1024, greedy=False, seed=i)) for i in range(streams)]

    def read(i: int) -> None:
        for _ in handles[i]:
            stamps[i].append(time.perf_counter())

    readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(streams)]
    for r in readers:
        r.start()
    while not all(stamps):
        time.sleep(0.01)
    q0 = time.perf_counter()
    time.sleep(quiet_s)
    j0 = time.perf_counter()
    joining = engine.submit(long, params(1))
    next(iter(joining), None)
    joining.result(600)
    j1 = time.perf_counter()
    time.sleep(0.2)  # the joined row leaves the batch at its first token
    a0 = time.perf_counter()
    time.sleep(quiet_s)
    a1 = time.perf_counter()
    for h in handles:
        h.cancel()
    for r in readers:
        r.join(600)

    def gaps(keep: Callable[[float, float], bool]) -> list[float]:
        return [(b - a) * 1000 for ts in stamps for a, b in zip(ts, ts[1:]) if keep(a, b)]

    before, after = gaps(lambda a, b: q0 <= a and b <= j0), gaps(lambda a, b: a0 <= a and b <= a1)
    return JoinGaps(p95(before), p95(after), p95(before + after), p95(gaps(lambda a, b: b >= j0 and a <= j1)),
                    j1 - j0)


LLAMACPP_CHILD = """
import sys, time
from llama_cpp import Llama
path, tokens, threads, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
llm = Llama(model_path=path, n_ctx=2048, n_threads=threads, verbose=False)
rates = []
for _ in range(2):
    first, n = None, 0
    for _chunk in llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=tokens,
                                             temperature=0.0, stream=True):
        if first is None:
            first = time.perf_counter()
        n += 1
    rates.append((n - 1) / (time.perf_counter() - first))
print(max(rates))
"""


def llamacpp_tok_s(tokens: int) -> float | str | None:
    """llama.cpp's single-stream tokens/s on the same GGUF and prompt (None: not installed; a
    string: why it failed). In a child process: a crash of the native library must not end the run."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("llama_cpp") is None:
        return None
    src = default_model_source()
    proc = subprocess.run([sys.executable, "-c", LLAMACPP_CHILD, str(Path(src.path) / src.gguf_file), str(tokens),
                           str(torch.get_num_threads()), essay(0)[0]["content"]],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return f"llama-cpp-python failed (exit {proc.returncode}): {proc.stderr.strip()[-200:]}"
    return float(proc.stdout.strip().splitlines()[-1])


def held_out_replies(limit: int) -> dict[str, list[tuple[list[dict[str, str]], str]]]:
    """(context, reply) pairs from the held-out splits: HH-RLHF chosen replies, OASST replies."""
    out: dict[str, list[tuple[list[dict[str, str]], str]]] = {}
    hh = SHARED_DATA / "hh_rlhf_harmless_base_test.jsonl.gz"
    if hh.is_file():
        out["hh"] = [(p["prompt"], p["chosen"]) for p, _ in zip(hh_pairs(hh, "heldout"), range(limit))]
    oasst = SHARED_DATA / "oasst_en_100_tree.jsonl"
    if oasst.is_file():
        pairs = [(ctx, r["text"].strip()) for i, tree in oasst_trees(oasst) if held_out_index(i)
                 for ctx, replies in oasst_reply_sets(tree) for r in replies]
        out["oasst"] = pairs[:limit]
    return out


def perplexity(loaded: LoadedModel, pairs: list[tuple[list[dict[str, str]], str]], max_tokens: int = 512) -> float:
    """Per-token perplexity of the replies given their contexts (chat template, reply tokens only),
    every position through the weights decode steps use (packed layers' dense prefill copy off)."""
    tok, model = loaded.tokenizer, loaded.model
    nll, count = 0.0, 0
    PackedLinear.prefill_dense = False
    try:
        with torch.inference_mode():
            for context, reply in pairs:
                prompt = tok.apply_chat_template(context, add_generation_prompt=True, tokenize=False)
                p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
                r_ids = tok(reply + tok.eos_token, add_special_tokens=False)["input_ids"]
                ids = (p_ids + r_ids)[-max_tokens:]
                n = min(len(r_ids), len(ids) - 1)
                logits = model(input_ids=torch.tensor([ids])).logits[0, -n - 1:-1].float()
                nll += torch.nn.functional.cross_entropy(logits, torch.tensor(ids[-n:]), reduction="sum").item()
                count += n
    finally:
        PackedLinear.prefill_dense = True
    return float(torch.exp(torch.tensor(nll / count)))


def oracle_replies(engine: Engine, prompts: list, tokens: int, streams: int = 8) -> list[str]:
    """Sampled replies (the product's generation defaults, seed i for prompt i), ``streams`` at once."""
    out: list[str] = []
    for start in range(0, len(prompts), streams):
        handles = [engine.submit(p, GenerationParams.from_request(GenerationDefaults(), max_tokens=tokens, seed=start + i))
                   for i, p in enumerate(prompts[start:start + streams])]
        out += [h.result(600).text for h in handles]
    return out


def paired(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Mean of ys - xs and its standard error (paired, same prompt and seed)."""
    d = [y - x for x, y in zip(xs, ys)]
    mean = sum(d) / len(d)
    var = sum((v - mean) ** 2 for v in d) / max(len(d) - 1, 1)
    return mean, (var / len(d)) ** 0.5


def same_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def format_row(fmt: str, settings: Settings, adapter_dir: Path, tmp: Path, args: argparse.Namespace,
               reference: list[int] | None, replies: dict, oracle_prompts: list) -> tuple[dict[str, object], list[int]]:
    """One weight format's figures, measured on a fresh engine of the default model packed as ``fmt``."""
    loaded = in_passing_thread(lambda: load_model(settings.model, settings.models_dir, device="cpu", dtype="float32"))
    t0 = time.perf_counter()
    packed = in_passing_thread(lambda: pack_for_serving(loaded.model, fmt))
    pack_s = time.perf_counter() - t0
    row: dict[str, object] = {"format": fmt, "packed_layers": packed, "pack_s": round(pack_s, 2)}
    for name, pairs in replies.items():
        row[f"ppl_{name}"] = round(in_passing_thread(lambda: perplexity(loaded, pairs)), 4)
    registry = AdapterRegistry(tmp / f"adapters-{fmt}")
    engine = Engine(loaded, registry, max_batch=16, queue_size=64)
    engine.start()
    try:
        engine.generate(essay(0), params(4))
        greedy_ids, rates = None, []
        for _ in range(args.rounds):
            c = single(engine, args.tokens)
            greedy_ids = greedy_ids or c.token_ids
            rates.append(decode_tok_s(c))
        row["single_tok_s"] = round(statistics.median(rates), 2)
        c8 = [concurrent(engine, 8, args.tokens, r) for r in range(max(1, args.rounds - 1))]
        row["concurrent8_tok_s"] = round(statistics.median(rate for rate, _ in c8), 2)
        row["ttft8_p50_ms"] = round(statistics.median(t for _, ts in c8 for t in ts), 1)
        if oracle_prompts:
            oracle = load_oracle("sentiment")
            texts = oracle_replies(engine, oracle_prompts, args.tokens)
            row["_sentiment_scores"] = [oracle.score(p, t) for p, t in zip(oracle_prompts, texts)]
            row["sentiment_liked_pct"] = round(100 * sum(x >= oracle.threshold for x in row["_sentiment_scores"])
                                               / len(texts), 1)
            row["sentiment_mean_score"] = round(sum(row["_sentiment_scores"]) / len(texts), 4)
            row["_sentiment_texts"] = texts
        version = registry.publish(adapter_dir, {"parent": "base"})
        engine.activate(version)
        base_rates, lora_rates = [], []
        for _ in range(args.rounds):
            base_rates.append(decode_tok_s(single(engine, args.tokens, adapter="base")))
            lora_rates.append(decode_tok_s(single(engine, args.tokens, adapter=version)))
        row["lora_tok_s"] = round(statistics.median(lora_rates), 2)
        row["lora_vs_base"] = round(statistics.median(lora_rates) / statistics.median(base_rates), 3)
    finally:
        engine.stop()
    assert greedy_ids is not None
    ref = reference if reference is not None else greedy_ids
    row["greedy_same_prefix_vs_fp32"] = f"{same_prefix(ref, greedy_ids)}/{len(ref)} tokens"
    return row, greedy_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64, help="reply length per request")
    ap.add_argument("--rounds", type=int, default=3, help="repetitions of each measurement")
    ap.add_argument("--long-prompt", type=int, default=2000,
                    help="tokens of the prompt that joins 7 running streams (chunked prefill)")
    ap.add_argument("--serve-weights", default="auto", help="the headline figures' weight format (auto = int4 on a CPU)")
    ap.add_argument("--formats", default="fp32,bf16,int8,int4", help="weight formats compared side by side")
    ap.add_argument("--ppl-replies", type=int, default=64, help="held-out replies per data set for perplexity")
    ap.add_argument("--oracle-prompts", type=int, default=100,
                    help="held-out IMDb prompts answered per format, scored by the sentiment oracle (0: none)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    settings = Settings()
    fmt = resolve_serve_weights(args.serve_weights, torch.device("cpu"))
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    for f in formats:
        resolve_serve_weights(f, torch.device("cpu"))
    if "fp32" in formats:  # the reference of the others' ratios comes first
        formats = ["fp32"] + [f for f in formats if f != "fp32"]
    steps = tqdm(total=8 + len(formats), desc="serving benchmark", unit="step")

    # torch work outside the engine thread runs in passing threads, as in the service: a second
    # live OpenMP team halves the engine's speed on this 2-core machine (models.in_passing_thread)
    loaded = in_passing_thread(lambda: load_model(settings.model, settings.models_dir, device="cpu", dtype="float32"))
    in_passing_thread(lambda: pack_for_serving(loaded.model, fmt))
    tmp = Path(tempfile.mkdtemp(prefix="chatloop-bench-"))
    registry = AdapterRegistry(tmp / "adapters")
    # as the service builds it: a spare slot of the training settings' LoRA shape kept ready
    engine = Engine(loaded, registry, max_batch=16, queue_size=64, spare_lora=lora_config(settings.training))
    engine.start()
    engine.generate(essay(0), params(4))  # warm-up
    steps.update()

    singles, bares, first = [], [], None
    for _ in range(args.rounds):  # interleaved, so drift in machine load hits both alike
        c = single(engine, args.tokens)
        first = first or c
        singles.append(decode_tok_s(c))
        # in the engine thread, between its steps (its control queue)
        bares.append(engine._call(lambda: bare_greedy_tok_s(loaded, essay(0), c.completion_tokens), 600))
    single_tok_s, bare_tok_s = statistics.median(singles), statistics.median(bares)
    steps.update()

    c8, c8_batched_attention, ttfts = [], [], []
    for r in range(args.rounds):
        rate, t = concurrent(engine, 8, args.tokens, r)
        c8.append(rate)
        ttfts += t
        # the same with sdpa over the whole padded batch (not row-invariant: engine/attention.py)
        engine._call(lambda: use_row_invariant_attention(engine.model, False), 60)
        c8_batched_attention.append(concurrent(engine, 8, args.tokens, r)[0])
        engine._call(lambda: use_row_invariant_attention(engine.model, True), 60)
    c16 = [concurrent(engine, 16, args.tokens, r)[0] for r in range(max(1, args.rounds - 1))]
    ttfts.sort()
    steps.update()

    adapter_dir = in_passing_thread(lambda: make_lora(loaded, tmp / "lora"))
    lora_v = registry.publish(adapter_dir, {"parent": "base"})
    engine.activate(lora_v)
    base_rates, lora_rates, unmerged_rates = [], [], []
    for _ in range(args.rounds):  # the engine's default: one version in flight is served folded
        base_rates.append(decode_tok_s(single(engine, args.tokens, adapter="base")))
        lora_rates.append(decode_tok_s(single(engine, args.tokens, adapter=lora_v)))
        engine.merge_single_version = False  # the per-row LoRA forward that mixed batches use
        unmerged_rates.append(decode_tok_s(single(engine, args.tokens, adapter=lora_v)))
        engine.merge_single_version = True
    engine.activate("base")
    steps.update()

    engine.spare_build_ms.clear()  # the builds during the trials only
    act, act_without_spare = activation_ms(engine, registry, adapter_dir, trials=10, tokens=args.tokens)
    spare_build_ms = list(engine.spare_build_ms)
    engine.activate("base")
    steps.update()

    chunk = engine.prefill_chunk
    joined = long_join_gaps(engine, args.long_prompt)
    engine.ragged_chunks = False  # each chunk a forward of its own between two decode steps
    joined_own = long_join_gaps(engine, args.long_prompt)
    engine.ragged_chunks = True
    engine.prefill_chunk = 10**9  # the same join with the whole prompt prefilled in one step
    joined_whole = long_join_gaps(engine, args.long_prompt)
    engine.prefill_chunk = chunk
    engine.stop()
    steps.update()

    replies = held_out_replies(args.ppl_replies)
    if not replies:
        print(f"note: {SHARED_DATA} is absent: no perplexity figures")
    oracle_prompts = []
    if args.oracle_prompts:
        try:
            oracle_prompts = load_prompts(load_oracle("sentiment"), "heldout")[:args.oracle_prompts]
        except (FileNotFoundError, ValueError) as exc:
            print(f"note: no oracle scores ({exc})")
    rows, fp32_ids = [], None
    for fmt in formats:
        row, ids = format_row(fmt, settings, adapter_dir, tmp, args, fp32_ids, replies, oracle_prompts)
        fp32_ids = fp32_ids if fp32_ids is not None else (ids if fmt == "fp32" else None)
        rows.append(row)
        steps.update()
    fp32_row = next((r for r in rows if r["format"] == "fp32"), None)
    if fp32_row is not None:
        for r in rows:
            r["single_vs_fp32"] = round(float(r["single_tok_s"]) / float(fp32_row["single_tok_s"]), 3)
            for name in replies:
                r[f"ppl_{name}_vs_fp32"] = round(float(r[f"ppl_{name}"]) / float(fp32_row[f"ppl_{name}"]), 4)
            if oracle_prompts:
                threshold = load_oracle("sentiment").threshold
                mean, se = paired(fp32_row["_sentiment_scores"], r["_sentiment_scores"])
                r["sentiment_score_vs_fp32"] = f"{mean:+.4f} ± {se:.4f}"
                liked = paired([float(x >= threshold) for x in fp32_row["_sentiment_scores"]],
                               [float(x >= threshold) for x in r["_sentiment_scores"]])
                r["sentiment_liked_vs_fp32"] = f"{100 * liked[0]:+.1f} ± {100 * liked[1]:.1f} points"
    examples = {r["format"]: r.pop("_sentiment_texts")[:2] for r in rows if "_sentiment_texts" in r}
    for r in rows:
        r.pop("_sentiment_scores", None)

    llama = llamacpp_tok_s(args.tokens)
    steps.update()
    steps.close()

    c8_rate = statistics.median(c8)
    result: dict[str, object] = {
        "device": f"cpu, {torch.get_num_threads()} torch threads",
        "serve_weights": fmt,
        "tokens_per_reply": args.tokens,
        "single_tok_s": round(single_tok_s, 2),
        "bare_tok_s": round(bare_tok_s, 2),
        "single_vs_bare": round(single_tok_s / bare_tok_s, 3),
        "concurrent8_tok_s": round(c8_rate, 2),
        "concurrent8_vs_single": round(c8_rate / single_tok_s, 2),
        "concurrent8_batched_attention_tok_s": round(statistics.median(c8_batched_attention), 2),
        # the cost of row-invariant attention (each row alone on its own keys) at 8 streams
        "row_invariant_vs_batched_attention": round(c8_rate / statistics.median(c8_batched_attention), 3),
        "concurrent16_tok_s": round(statistics.median(c16), 2),
        "ttft_p50_ms": round(statistics.median(ttfts), 1),
        "ttft_p95_ms": round(ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], 1),
        "activation_ms_p50": round(statistics.median(act), 1),
        "activation_ms_p95": round(p95(act), 1),
        "activation_ms_max": round(max(act), 1),
        "activations_without_spare": act_without_spare,  # these built their slot (others hot-swapped)
        "spare_build_ms_max": round(max(spare_build_ms), 1) if spare_build_ms else None,  # a stall of the streams
        "long_prompt_tokens": args.long_prompt,
        "quiet_gap_p95_ms": round(joined.quiet, 1),  # before and after the join, pooled
        "quiet_gap_p95_ms_before": round(joined.quiet_before, 1),
        "quiet_gap_p95_ms_after": round(joined.quiet_after, 1),
        "long_join_gap_p95_ms": round(joined.join, 1),
        "long_join_vs_quiet": round(joined.join / joined.quiet, 2),
        "long_join_vs_quiet_before": round(joined.join / joined.quiet_before, 2),  # the reference before 2026-12-05
        "long_join_vs_quiet_own_forward": round(joined_own.join / joined_own.quiet, 2),
        "long_join_vs_quiet_unchunked": round(joined_whole.join / joined_whole.quiet, 2),
        "long_join_ttft_s": round(joined.ttft_s, 2),  # the long prompt's own wait, paced chunks
        "long_join_ttft_s_own_forward": round(joined_own.ttft_s, 2),
        "long_join_ttft_s_unchunked": round(joined_whole.ttft_s, 2),
        "lora_tok_s": round(statistics.median(lora_rates), 2),
        "lora_vs_base": round(statistics.median(lora_rates) / statistics.median(base_rates), 3),
        "lora_unmerged_tok_s": round(statistics.median(unmerged_rates), 2),
        "lora_unmerged_vs_base": round(statistics.median(unmerged_rates) / statistics.median(base_rates), 3),
        "formats": rows,
        "sentiment_replies": examples,
    }
    if isinstance(llama, str):
        result["llamacpp"] = llama
    elif llama is not None:
        result |= {
            "llamacpp_tok_s": round(llama, 2),
            "single_vs_llamacpp": round(single_tok_s / llama, 3),
            "concurrent8_vs_llamacpp": round(c8_rate / llama, 3),
        }
        for r in rows:
            r["single_vs_llamacpp"] = round(float(r["single_tok_s"]) / llama, 3)
            r["concurrent8_vs_llamacpp"] = round(float(r["concurrent8_tok_s"]) / llama, 3)
    print_report(result, args.json)


if __name__ == "__main__":
    main()
