"""Shared training preparation: chat-template tokenization, reply masks, reply-only log-probs.

Owns: how a (context, reply) becomes token ids, the truncation policy, padding-safe batches,
and summed log-probabilities of reply tokens.

Invariants:
- The prompt is the chat template applied to the context with the generation prompt; the reply
  tokens are exactly what the template appends for an assistant turn (content + end-of-turn),
  so training sees the same tokens the engine produces and stops on.
- Truncation keeps the *end* of the context (the latest turns) and the *start* of the reply.
- Log-probs are computed only at reply positions: the LM head runs on those hidden states alone,
  never over the prompt. Padding positions never count.
- Replies to the same prompt share one pass over it (``PromptGroups``) on a CPU: the prompt is
  run once, left-padded, and every reply continues from its key/value cache, with gradients
  flowing back through that cache. This equals running each (prompt, reply) on its own (tested),
  and saves compute where compute is the limit: chat prompts are usually longer than the replies.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F


@dataclass
class TrainConfig:
    """The fields every offline trainer here shares (DPO, KTO, the reward model), as TRL's
    per-algorithm configs share theirs: each algorithm's config inherits these and adds its own."""
    learning_rate: float = 1e-4
    epochs: int = 3
    batch_size: int = 4
    max_prompt_tokens: int = 384  # a longer prompt keeps its end
    max_reply_tokens: int = 256  # a longer reply is cut
    seed: int = 0
    select_best: bool = True  # keep the checkpoint with the lowest held-out loss (when anything is held out)
    select_min_heldout: int = 1  # DPO/KTO select (and stop early) only with at least this many held-out examples
    evals_per_epoch: int = 2  # held-out scores an epoch (and one before the first step)
    patience: int = 2  # stop after this many held-out scores without a new best (0 = never)


@dataclass(frozen=True)
class Encoded:
    prompt_ids: list[int]
    reply_ids: list[int]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.reply_ids)


def encode_reply(tokenizer, context: Sequence[dict[str, str]], reply: str,
                 max_prompt_tokens: int, max_reply_tokens: int) -> Encoded:
    prompt = list(tokenizer.apply_chat_template(list(context), add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"])
    full = list(tokenizer.apply_chat_template(list(context) + [{"role": "assistant", "content": reply}],
                                              tokenize=True, return_dict=True)["input_ids"])
    if full[: len(prompt)] == prompt and len(full) > len(prompt):
        reply_ids = full[len(prompt):]
    else:  # a template that renders the last turn differently: plain text + end of sequence
        reply_ids = list(tokenizer(reply, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    return Encoded(prompt_ids=prompt[-max_prompt_tokens:], reply_ids=reply_ids[:max_reply_tokens])


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T)
    reply_mask: torch.Tensor  # (B, T) True where the token is a reply token (a prediction target)

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.reply_mask.to(device))


def collate(items: Sequence[Encoded], pad_id: int) -> Batch:
    length = max(len(e.prompt_ids) + len(e.reply_ids) for e in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    attn = torch.zeros((len(items), length), dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.bool)
    for i, e in enumerate(items):
        seq = e.prompt_ids + e.reply_ids
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        mask[i, len(e.prompt_ids): len(seq)] = True
    return Batch(ids, attn, mask)


@dataclass
class PromptGroups:
    """B prompts, each with K replies, laid out for one shared prompt pass.

    Prompts are left-padded so they all end at the same column (the position that predicts every
    reply's first token); replies are right-padded. Reply row ``k * B + b`` is reply ``k`` of
    prompt ``b``, so chosen/rejected (or matched/mismatched) come out as contiguous halves.
    """

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    reply_ids: torch.Tensor  # (K*B, R) right-padded
    reply_mask: torch.Tensor  # (K*B, R) True on real reply tokens

    @property
    def replies_per_prompt(self) -> int:
        return self.reply_ids.shape[0] // self.prompt_ids.shape[0]

    def to(self, device: torch.device) -> "PromptGroups":
        return PromptGroups(self.prompt_ids.to(device), self.prompt_mask.to(device),
                            self.reply_ids.to(device), self.reply_mask.to(device))


def collate_groups(groups: Sequence[Sequence[Encoded]], pad_id: int) -> PromptGroups:
    """``groups[b]`` are K encodings of one prompt (same ``prompt_ids``, any replies)."""
    k = len(groups[0])
    if any(len(g) != k for g in groups):
        raise ValueError("every prompt needs the same number of replies")
    for g in groups:
        if any(e.prompt_ids != g[0].prompt_ids for e in g[1:]):
            raise ValueError("replies grouped under one prompt must share its tokens")
    b = len(groups)
    plen = max(len(g[0].prompt_ids) for g in groups)
    rlen = max(len(e.reply_ids) for g in groups for e in g)
    prompt_ids = torch.full((b, plen), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((b, plen), dtype=torch.long)
    reply_ids = torch.full((k * b, rlen), pad_id, dtype=torch.long)
    reply_mask = torch.zeros((k * b, rlen), dtype=torch.bool)
    for i, g in enumerate(groups):
        p = g[0].prompt_ids
        if not p:
            raise ValueError("a prompt must have at least one token")
        prompt_ids[i, plen - len(p):] = torch.tensor(p)
        prompt_mask[i, plen - len(p):] = 1
        for j, e in enumerate(g):
            if not e.reply_ids:
                raise ValueError("a reply must have at least one token")
            reply_ids[j * b + i, : len(e.reply_ids)] = torch.tensor(e.reply_ids)
            reply_mask[j * b + i, : len(e.reply_ids)] = True
    return PromptGroups(prompt_ids, prompt_mask, reply_ids, reply_mask)


def grouped_hidden(model: torch.nn.Module, g: PromptGroups,
                   share_prompt: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of every reply of ``g``: the prompt run once and its replies on its cache
    (``share_prompt``), or each (prompt, reply) as one row of a single pass.

    Sharing saves the prompt's compute, which is what bounds a CPU; on a GPU a model this small is
    bound by kernel launches instead, and a second pass doubles them, so by default only the CPU
    shares (figures in docs/LOG.md). Both give the same result (tested).

    Returns ``(predicting, reply_hidden)``, both (K*B, R, H): ``reply_hidden[:, j]`` is the last
    layer's state *at* reply token j, ``predicting[:, j]`` the state that predicts reply token j
    (the prompt's last state for j = 0, else ``reply_hidden[:, j - 1]``).
    """
    decoder, _ = split_lm(model)
    k = g.replies_per_prompt
    if share_prompt is None:
        share_prompt = g.prompt_ids.device.type == "cpu"
    if not share_prompt:
        ids = torch.cat([g.prompt_ids.repeat(k, 1), g.reply_ids], dim=1)
        mask = torch.cat([g.prompt_mask.repeat(k, 1), g.reply_mask.to(g.prompt_mask.dtype)], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        p = g.prompt_ids.shape[1]
        return hidden[:, p - 1:-1], hidden[:, p:]
    prompt_pos = (g.prompt_mask.cumsum(-1) - 1).clamp(min=0)
    out = decoder(input_ids=g.prompt_ids, attention_mask=g.prompt_mask, position_ids=prompt_pos, use_cache=True)
    cache = out.past_key_values
    if k > 1:
        # row order k * B + b: repeat the whole batch K times (not interleave), through autograd
        for layer in cache.layers:
            layer.keys = layer.keys.repeat(k, 1, 1, 1)
            layer.values = layer.values.repeat(k, 1, 1, 1)
    prompt_mask = g.prompt_mask.repeat(k, 1)
    start = prompt_mask.sum(dim=1, keepdim=True)  # each reply continues its prompt's positions
    reply_pos = start + torch.arange(g.reply_ids.shape[1], device=start.device)[None]
    mask = torch.cat([prompt_mask, g.reply_mask.to(prompt_mask.dtype)], dim=1)
    reply_hidden = decoder(input_ids=g.reply_ids, attention_mask=mask, position_ids=reply_pos,
                           past_key_values=cache, use_cache=True).last_hidden_state
    prompt_last = out.last_hidden_state[:, -1:].repeat(k, 1, 1)
    return torch.cat([prompt_last, reply_hidden[:, :-1]], dim=1), reply_hidden


def grouped_token_logprobs(model: torch.nn.Module, g: PromptGroups, temperature: float = 1.0,
                           share_prompt: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per reply token of every reply row of ``g``: the log-prob of the sampling distribution
    (logits / temperature) and its entropy, as (K*B, R) tensors, and the (float) reply mask; zeros
    on padding. Equal to ``ppo.token_forward`` of each (prompt, reply) on its own."""
    _, head = split_lm(model)
    predicting, _ = grouped_hidden(model, g, share_prompt)
    rows, cols = g.reply_mask.nonzero(as_tuple=True)
    logprobs = F.log_softmax(head(predicting[rows, cols]).float() / temperature, dim=-1)
    token_lp = logprobs.gather(1, g.reply_ids[rows, cols][:, None]).squeeze(1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    shape = tuple(g.reply_ids.shape)
    lp = torch.zeros(shape, device=token_lp.device).index_put((rows, cols), token_lp)
    ent = torch.zeros(shape, device=token_lp.device).index_put((rows, cols), entropy)
    return lp, ent, g.reply_mask.float()


def grouped_reply_logprobs(model: torch.nn.Module, g: PromptGroups, average: bool = False,
                           share_prompt: bool | None = None) -> torch.Tensor:
    """Sum (or mean) of reply-token log-probs for every reply row of ``g`` (K*B values), the LM
    head run on reply positions only; equal to running each (prompt, reply) on its own."""
    _, head = split_lm(model)
    predicting, _ = grouped_hidden(model, g, share_prompt)
    rows, cols = g.reply_mask.nonzero(as_tuple=True)
    logits = head(predicting[rows, cols]).float()
    targets = g.reply_ids[rows, cols]
    token_lp = torch.gather(F.log_softmax(logits, dim=-1), 1, targets[:, None]).squeeze(1)
    out = torch.zeros(g.reply_ids.shape[0], dtype=token_lp.dtype, device=token_lp.device).index_add(0, rows, token_lp)
    if average:
        out = out / g.reply_mask.sum(dim=1).clamp(min=1)
    return out



@torch.no_grad()
def reference_logprobs(model: torch.nn.Module, groups: Sequence[Sequence[Encoded]], pad_id: int, batch_size: int,
                       device: torch.device, average: bool = False) -> list[list[float]]:
    """The reference pass before training: every group's reply log-probs (``groups[b]`` are K
    encodings of one prompt, as in ``collate_groups``) from the model as it is now, in eval mode
    (its mode restored after), batched in length order for less padding; one list per group, in
    the order given."""
    was_training = model.training
    model.eval()
    out: list[list[float]] = [[] for _ in groups]
    order = sorted(range(len(groups)), key=lambda i: max(len(e) for e in groups[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        lp = grouped_reply_logprobs(model, collate_groups([groups[i] for i in idx], pad_id).to(device), average)
        for i, values in zip(idx, lp.view(-1, len(idx)).t().tolist()):  # rows are K-major: reply k of every group
            out[i] = values
    model.train(was_training)
    return out

def split_lm(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder stack, LM head) of a causal LM, through a PEFT wrapper if there is one.

    LoRA layers are injected into the wrapped modules, so calling the decoder applies them.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_decoder(), inner.get_output_embeddings()


def batches(n: int, batch_size: int, epochs: int, seed: int,
            lengths: Sequence[int] | None = None) -> Iterator[tuple[int, list[int]]]:
    """(epoch, indices) for ``epochs`` shuffled passes over ``n`` items, reproducible by seed.

    With ``lengths``, items of similar length share a batch (sorted inside shuffled windows of
    16 batches, then the batches are shuffled), so little compute goes to padding.
    """
    rng = random.Random(seed)
    for epoch in range(epochs):
        order = list(range(n))
        rng.shuffle(order)
        chunks = [order[i: i + batch_size] for i in range(0, n, batch_size)]
        if lengths is not None:
            window = batch_size * 16
            chunks = []
            for w in range(0, n, window):
                part = sorted(order[w: w + window], key=lambda j: lengths[j])
                chunks += [part[i: i + batch_size] for i in range(0, len(part), batch_size)]
            rng.shuffle(chunks)
        for idx in chunks:
            yield epoch, idx


@dataclass
class HeldOutSelection:
    """Checkpoint selection on held-out data: ``evaluate()`` (held-out metrics; lower ``"loss"`` is
    better) is scored before the first step and every ``every`` steps and at the end; the trainable
    weights with the lowest loss are kept and put back when training ends, and ``best_metrics`` are
    their held-out metrics (no second pass). Training stops early once ``patience`` scores in a row
    have not improved on the best (0 = never stop early).

    The starting point is a candidate too: when no update beats it, training hands back the
    weights it started from and ``best_step`` is 0. Ties keep the earlier (less trained) weights.
    ``initial``, when the caller knows the starting metrics (DPO and KTO do: the policy is its own
    reference there), stands in for scoring the starting point.
    """

    evaluate: Callable[[], dict[str, float]]
    every: int
    patience: int = 0
    initial: dict[str, float] | None = None
    scores: list[tuple[int, float]] = field(default_factory=list)
    best_step: int = 0
    best_score: float = math.inf
    best_metrics: dict[str, float] = field(default_factory=dict)
    _best: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _since_best: int = 0

    @classmethod
    def per_epoch(cls, evaluate: Callable[[], dict[str, float]], n_items: int, batch_size: int,
                  evals_per_epoch: int, patience: int, initial: dict[str, float] | None = None) -> "HeldOutSelection":
        """Scored ``evals_per_epoch`` times an epoch of ``n_items`` in batches of ``batch_size``."""
        steps = math.ceil(n_items / batch_size)
        return cls(evaluate, every=max(1, math.ceil(steps / max(1, evals_per_epoch))), patience=patience,
                   initial=initial)

    @staticmethod
    def _tracked(model: torch.nn.Module, extra_params: Sequence[torch.nn.Parameter]) -> dict[str, torch.Tensor]:
        """The weights a checkpoint holds: the model's trainable ones and any outside it (a head)."""
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        named.update({f"<extra {k}>": p for k, p in enumerate(extra_params)})
        return named

    def observe(self, model: torch.nn.Module, step: int, extra_params: Sequence[torch.nn.Parameter] = ()) -> float:
        metrics = dict(self.initial if step == 0 and self.initial is not None else self.evaluate())
        score = float(metrics["loss"])
        self.scores.append((step, score))
        if score < self.best_score:
            self.best_score, self.best_step, self.best_metrics, self._since_best = score, step, metrics, 0
            self._best = {n: p.detach().clone() for n, p in self._tracked(model, extra_params).items()}
        else:
            self._since_best += 1
        return score

    @property
    def exhausted(self) -> bool:
        return self.patience > 0 and self._since_best >= self.patience

    @torch.no_grad()
    def restore(self, model: torch.nn.Module, extra_params: Sequence[torch.nn.Parameter] = ()) -> None:
        if self._best is None:
            return
        for n, p in self._tracked(model, extra_params).items():
            p.copy_(self._best[n])

    def summary(self) -> dict:
        return {"best_step": self.best_step, "best_score": self.best_score,
                "scores": [{"step": s, "score": v} for s, v in self.scores],
                "stopped_early": self.exhausted}


def fit(
    model: torch.nn.Module,
    n_items: int,
    batch_size: int,
    epochs: int,
    learning_rate: float,
    seed: int,
    step: Callable[[list[int]], tuple[torch.Tensor, dict[str, float]]],
    on_step: Callable[[dict], None] = lambda m: None,
    should_stop: Callable[[], bool] = lambda: False,
    extra_params: Sequence[torch.nn.Parameter] = (),
    max_grad_norm: float = 1.0,
    lengths: Sequence[int] | None = None,
    extra_learning_rate: float | None = None,
    selection: HeldOutSelection | None = None,
) -> list[dict]:
    """The shared optimisation loop: AdamW on the trainable parameters, clipped gradients,
    one ``step(indices) -> (loss, metrics)`` per batch, progress and cancellation.

    With ``selection`` the held-out score is logged as ``held_out_score`` on the steps it is
    taken, training may stop early, and the best-scoring weights are restored at the end.

    ``extra_params`` (a head outside the model) train at ``extra_learning_rate`` (default: the
    model's). Returns the per-step metrics history (each with step, total, epoch, loss, elapsed_s).
    """
    own = [p for p in model.parameters() if p.requires_grad]
    params = own + list(extra_params)
    if not own:
        raise ValueError("the model has no trainable parameters (is a LoRA adapter attached?)")
    groups = [{"params": own}]
    if extra_params:
        groups.append({"params": list(extra_params), "lr": extra_learning_rate or learning_rate})
    opt = torch.optim.AdamW(groups, lr=learning_rate, weight_decay=0.0)
    total = math.ceil(n_items / batch_size) * epochs
    model.train()
    history: list[dict] = []
    t0 = time.perf_counter()
    if selection is not None:
        selection.observe(model, 0, extra_params)
        model.train()
    for i, (epoch, idx) in enumerate(batches(n_items, batch_size, epochs, seed, lengths), start=1):
        if should_stop():
            raise InterruptedError("training cancelled")
        loss, metrics = step(idx)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {i}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        m = {"step": i, "total": total, "epoch": epoch, "loss": loss.item(), **metrics}
        if selection is not None and (i % selection.every == 0 or i == total):
            m["held_out_score"] = selection.observe(model, i, extra_params)
            model.train()
        m["elapsed_s"] = time.perf_counter() - t0
        history.append(m)
        on_step(m)
        if selection is not None and selection.exhausted:
            break
    if selection is not None:
        selection.restore(model, extra_params)
    model.eval()
    return history


@torch.no_grad()
def sample_replies(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, seed: int,
                   temperature: float = 1.0, top_p: float = 1.0, batch_size: int | None = None) -> list[list[int]]:
    """Sample one reply per prompt (token ids, ending with EOS when the model stopped), prompts
    left-padded together ``batch_size`` at a time; chunk k is seeded with ``seed + k * batch_size``."""
    device = next(model.parameters()).device
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    step = batch_size or max(len(prompts), 1)
    replies: list[list[int]] = []
    for start in range(0, len(prompts), step):
        chunk = prompts[start:start + step]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(chunk):  # left padding for generation
            ids[i, width - len(p):] = torch.tensor(p)
            attn[i, width - len(p):] = 1
        torch.manual_seed(seed + start)
        out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=True,
                             temperature=temperature, top_k=0, top_p=top_p, max_new_tokens=max_new_tokens,
                             pad_token_id=pad, eos_token_id=eos)
        for row in out[:, width:].tolist():
            reply = []
            for t in row:
                reply.append(t)
                if t == eos:
                    break
            replies.append(reply or [eos])
    return replies
