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
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F


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


def split_lm(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder stack, LM head) of a causal LM, through a PEFT wrapper if there is one.

    LoRA layers are injected into the wrapped modules, so calling the decoder applies them.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_decoder(), inner.get_output_embeddings()


def reply_logprobs(model: torch.nn.Module, batch: Batch, average: bool = False) -> torch.Tensor:
    """Sum (or mean) of log p(reply token | everything before it), one value per row.

    Runs the decoder over the whole sequence but the LM head only on the hidden states that
    predict reply tokens (position t predicts token t+1).
    """
    decoder, head = split_lm(model)
    hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    predict = batch.reply_mask[:, 1:]  # targets at t+1
    rows, cols = predict.nonzero(as_tuple=True)
    logits = head(hidden[rows, cols]).float()  # (N, V) only reply positions
    targets = batch.input_ids[rows, cols + 1]
    token_lp = torch.gather(F.log_softmax(logits, dim=-1), 1, targets[:, None]).squeeze(1)
    out = torch.zeros(batch.input_ids.shape[0], dtype=token_lp.dtype, device=token_lp.device)
    out = out.index_add(0, rows, token_lp)
    if average:
        out = out / predict.sum(dim=1).clamp(min=1)
    return out


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
) -> list[dict]:
    """The shared optimisation loop: AdamW on the trainable parameters, clipped gradients,
    one ``step(indices) -> (loss, metrics)`` per batch, progress and cancellation.

    Returns the per-step metrics history (each with step, total, epoch, loss, elapsed_s).
    """
    params = [p for p in model.parameters() if p.requires_grad] + list(extra_params)
    if not params:
        raise ValueError("the model has no trainable parameters (is a LoRA adapter attached?)")
    opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    total = math.ceil(n_items / batch_size) * epochs
    model.train()
    history: list[dict] = []
    t0 = time.perf_counter()
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
        m = {"step": i, "total": total, "epoch": epoch, "loss": loss.item(), **metrics,
             "elapsed_s": time.perf_counter() - t0}
        history.append(m)
        on_step(m)
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
