"""The serving engine: the only owner of the model in the service.

Owns: the model and its loaded LoRA adapters, the bounded request queue, the continuous batch
(one left-padded KV cache shared by all running requests), sampling, stop conditions, token
streaming, cancellation, and adapter load/activate/unload.

Does not own: HTTP, the store, the registry's files (it reads them through ``AdapterRegistry``).

Invariants:
- One engine thread touches the model. Other threads talk to it through the request queue and
  the control queue; ``activate`` blocks its caller until the engine thread has loaded the adapter.
- New requests join the running batch between decode steps (their prompts are prefilled
  together and their KV cache is merged in); finished or cancelled rows leave at the next step.
  A prompt longer than ``prefill_chunk`` that arrives while others decode is prefilled one chunk
  per step, so it never stalls them for its whole prefill; it joins the batch after its last
  chunk. Where the model allows (CPU, row-invariant attention), a chunk rides in the others'
  decode step, one forward for both (ragged.py); else it is a forward of its own between two of
  their decode steps. A chunk costs at most ``prefill_budget`` of a decode step (measured:
  pacing.py), at most ``prefill_chunk`` tokens.
- The KV cache is written in place into buffers with spare columns (kvcache.py), so a decode step
  never copies the whole cache, however long one row's conversation is.
- Each request is pinned to one adapter version when the engine starts it ('base' or vN). Rows
  of one batch may use different versions: each row gets its own adapter (PEFT's mixed-batch
  LoRA products, run by rowlora.py), so activation between decode steps never changes the
  adapter of a reply in flight, and the reply reports the version that produced it. While every row in flight uses
  one version, its LoRA is folded into the weights instead (``merged``): the base model's cost.
- Adapters live in LoRA "slots" (PEFT adapter names). A version that is neither active nor used
  by a running request frees its slot; a new version is hot-swapped into a free slot's weights
  when its shape allows, else gets a new slot. At most one free slot is kept, so memory does
  not grow with the number of activations. Given ``spare_lora`` (the shape training publishes),
  the engine keeps that free slot ready: built before serving starts and built again after an
  activation used it (at once when idle, else ``spare_wait_s`` later, between two steps), so an
  activation copies weights instead of building LoRA layers. A corrupt or mismatched adapter is
  refused and the active one keeps serving.
- Greedy decoding (temperature 0) equals ``model.generate(do_sample=False)`` token for token
  with the same repetition penalty, alone and inside a mixed batch; served folded, it equals the
  ``generate`` of PEFT's ``merge_and_unload`` model (tests check both). On a CPU each row's
  attention runs alone on its own keys (attention.py), so that holds bit for bit, not only
  where a rounding difference happens not to flip a token.
"""
from __future__ import annotations

import logging
import queue
import random
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable, Sequence

import torch
from peft import LoraConfig
from transformers.cache_utils import DynamicCache

from chatloop.adapters import BASE_VERSION, AdapterError, AdapterRegistry
from chatloop.engine.requests import (Completion, ContextTooLong, EngineBusy, GenerationFailed, GenerationParams,
                                      InvalidRequest, StreamHandle, _Request, _StopMatcher)
from chatloop.engine import kvcache, ragged
from chatloop.engine.attention import use_row_invariant_attention
from chatloop.engine.merged import MergedWeights
from chatloop.engine.rowlora import RowGroups
from chatloop.engine.pacing import PrefillPacer
from chatloop.engine.slots import AdapterSlots, read_adapter
from chatloop.engine.weights import row_block
from chatloop.models import LoadedModel
from chatloop.sampling import RowSampling, choose_tokens

__all__ = ["Completion", "ContextTooLong", "Engine", "EngineBusy", "GenerationFailed", "GenerationParams",
           "InvalidRequest", "StreamHandle"]

log = logging.getLogger(__name__)


class _Row:
    """One running request inside the batch: its sampling state and its place in the KV cache."""

    def __init__(self, req: _Request, version: str, device: torch.device):
        self.req, self.handle, self.params, self.version = req, req.handle, req.params, version
        p = req.params
        self.sampling = RowSampling(p.temperature, p.top_k, p.top_p, p.repetition_penalty)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(p.seed if p.seed is not None else random.SystemRandom().randrange(2**63))
        self.stops = _StopMatcher(p.stop)
        self.seen = torch.tensor(req.prompt, device=device)  # prompt + reply, for the penalty
        self.generated: list[int] = []
        self.emitted = 0
        self.text = ""
        self.ttft: float | None = None
        self.finish: str | None = None
        self.error: BaseException | None = None  # set with finish="error": this row alone failed
        self.last_token = -1  # sampled but not yet in the KV cache
        self.cached = 0  # real (non-padding) tokens of this row in the KV cache
        self.pad = 0  # padding columns on the left of this row in the KV cache


class Engine(AdapterSlots, MergedWeights):
    def __init__(
        self,
        loaded: LoadedModel,
        registry: AdapterRegistry,
        max_context_tokens: int = 2048,
        queue_size: int = 64,
        max_batch: int = 16,
        probe_modules: Sequence[str] = ("q_proj", "v_proj"),
        merge_single_version: bool = True,
        prefill_chunk: int = 128,
        prefill_budget: float = 0.5,
        spare_lora: LoraConfig | None = None,
        spare_wait_s: float = 1.0,
        row_invariant_attention: bool = True,
        ragged_chunks: bool = True,
    ):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if prefill_chunk < 1:
            raise ValueError("prefill_chunk must be at least 1")
        self.loaded = loaded
        self.model = loaded.model
        if row_invariant_attention and loaded.device.type == "cpu":  # attention.py says why
            use_row_invariant_attention(self.model)
        self.tokenizer = loaded.tokenizer
        self.registry = registry
        self.max_context_tokens = max_context_tokens
        self.max_batch = max_batch
        self.probe_modules = tuple(probe_modules)  # what the self-check's probe adapters target
        self._requests: queue.Queue[_Request] = queue.Queue(maxsize=queue_size)
        self._control: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # LoRA slots in the model (PEFT adapter names) and the version each holds (None = spare).
        # A new version is hot-swapped into a spare slot's weights (about 4x faster than building
        # new LoRA modules); slots exist only for versions in use plus at most one spare.
        self._slots: dict[str, str | None] = {}
        self._slot_of: dict[str, str] = {}  # version -> slot
        self._slot_counter = 0
        self._slot_params: dict[str, dict[str, torch.nn.Parameter]] = {}  # slot -> its LoRA tensors by name
        # the LoRA settings of the spare slot kept ready (None: none kept); after an activation,
        # the settings of the version activated (the next one most likely has the same)
        self._spare_shape = spare_lora
        self.spare_wait_s = spare_wait_s
        self._spare_missing_since: float | None = None
        self.spare_build_ms: deque[float] = deque(maxlen=64)  # what each spare's build held the engine thread
        self._active = BASE_VERSION
        self._rows: list[_Row] = []
        self.peak_batch = 0  # the most rows that have shared one forward pass
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [rows, cached columns]; 0 marks left padding
        self._routing: RowGroups | None = None  # the forward's rows by adapter, read by the LoRA layers
        self._hooked: weakref.WeakSet = weakref.WeakSet()
        self._init_merged(merge_single_version)  # one version in flight: its LoRA folded in (merged.py)
        # a prompt longer than prefill_chunk that arrives while others decode is prefilled one
        # chunk per step, between their decode steps, so it does not stall them
        self.pacer = PrefillPacer(prefill_chunk, prefill_budget)
        self._long: list[_Row] = []  # waiting for a chunked prefill, first come first
        self._chunking: tuple[_Row, DynamicCache] | None = None  # the one being prefilled
        self.prefill_chunks = 0  # chunks prefilled so far
        # where the model allows, a chunk rides in the others' decode step (ragged.py); False: a
        # forward of its own between two of their steps (benchmarks and tests compare the two)
        self.ragged_chunks = ragged_chunks
        self.shared_chunks = 0  # chunks that rode in a decode step
        self._row_block = row_block(self.model)  # a shared chunk fills the packed kernels' last row block
        # Rust tokenizers raise "Already borrowed" when two threads use one at once
        self._tokenizer_lock = threading.Lock()
        eos = self.model.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        if self.tokenizer.eos_token_id is not None:
            eos_ids.append(self.tokenizer.eos_token_id)
        self.eos_ids = {int(e) for e in eos_ids if e is not None}
        self._pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._probe_ids = self._encode([{"role": "user", "content": "Hi"}])[-4:]

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self, initial_version: str | None = None) -> None:
        """Check the LoRA machinery, start the engine thread, and activate the registry's active
        version (or base if it is broken). Raises ``HotSwapUnavailable`` if the check fails.

        The check runs in the engine thread, as everything else the engine does with the model:
        each thread that runs torch's parallel CPU kernels keeps its own OpenMP team, and with
        more team threads than cores libgomp stops spin-waiting between kernels, which halved
        decode speed on this 2-core machine (docs/LOG.md). Load the model in a thread that ends
        (``chatloop.models.in_passing_thread``) so the engine's team is the only one.
        """
        checked: Future = Future()

        def run() -> None:
            try:
                self.check_hot_swap()
            except BaseException as exc:
                checked.set_exception(exc)
                return
            self._keep_spare(busy=False)  # before the first activation, the registry's own
            checked.set_result(None)
            self._loop()

        self._thread = threading.Thread(target=run, name="chatloop-engine", daemon=True)
        self._thread.start()
        try:
            checked.result()
        except BaseException:
            self._thread.join()
            self._thread = None  # not serving: the check failed before the loop began
            raise
        version = initial_version if initial_version is not None else self.registry.active()
        if version != BASE_VERSION:
            try:
                self.activate(version)
            except AdapterError as exc:
                log.error("active adapter %s cannot be loaded (%s); serving the base model", version, exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def active_version(self) -> str:
        return self._active

    @property
    def loaded_adapters(self) -> set[str]:
        return set(self._slot_of)

    @property
    def adapter_slots(self) -> int:
        """LoRA slots in the model: versions in use plus at most one spare."""
        return len(self._slots)

    @property
    def spare_ready(self) -> bool:
        """Whether a spare slot is ready for the next activation to hot-swap into."""
        return any(held is None for held in list(self._slots.values()))

    def queue_depth(self) -> int:
        return self._requests.qsize()

    def running(self) -> int:
        """Requests in the running batch."""
        return len(self._rows)

    # ---- public API --------------------------------------------------------------------------
    def submit(self, messages: list[dict[str, str]], params: GenerationParams,
               adapter: str | None = None) -> StreamHandle:
        """Queue a chat request; returns at once with a handle that streams the reply."""
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("engine is not running")
        if adapter is not None and adapter != BASE_VERSION:
            self.registry.check(adapter)  # unknown/corrupt -> AdapterError before queueing
        prompt = self._encode(messages)
        if len(prompt) + params.max_tokens > self.max_context_tokens:
            raise ContextTooLong(
                f"the conversation is {len(prompt)} tokens; with max_tokens={params.max_tokens} it "
                f"exceeds the {self.max_context_tokens}-token context limit: start a new "
                f"conversation or ask for fewer tokens")
        handle = StreamHandle()
        try:
            self._requests.put_nowait(_Request(prompt, params, adapter, handle, time.perf_counter()))
        except queue.Full:
            raise EngineBusy("the server is busy: too many requests are waiting") from None
        return handle

    def generate(self, messages: list[dict[str, str]], params: GenerationParams,
                 adapter: str | None = None, timeout: float | None = None) -> Completion:
        return self.submit(messages, params, adapter).result(timeout)

    def activate(self, version: str, timeout: float = 120) -> str:
        """Load ``version`` (if needed) and make it the adapter for new requests.

        Runs on the engine thread between decode steps; raises AdapterError if the adapter
        cannot be loaded, in which case the previous active version keeps serving.
        Returns the previously active version.
        """
        self.registry.check(version)
        # the files are read here, so the engine thread (and every reply in flight) waits only
        # for the copy into a slot
        # (a version already in a slot, a rollback say, needs none: the engine thread only re-checks)
        loaded = version == BASE_VERSION or version in self._slot_of
        files = None if loaded else read_adapter(str(self.registry.path(version)))
        return self._call(lambda: self._do_activate(version, files), timeout)

    def _call(self, fn: Callable[[], Any], timeout: float) -> Any:
        fut: Future = Future()
        self._control.put((fn, fut))
        return fut.result(timeout)

    def _run_control(self) -> None:
        while True:
            try:
                fn, fut = self._control.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as exc:  # delivered to the caller
                    fut.set_exception(exc)

    # ---- the batch loop (engine thread) ------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._run_control()
            joining = self._take_requests()
            if self._rows or self._long or self._chunking:  # others decode: long prompts go in chunks
                self._long += [r for r in joining if len(r.req.prompt) > self.prefill_chunk]
                joining = [r for r in joining if len(r.req.prompt) <= self.prefill_chunk]
            if not joining and not self._rows and not self._long and not self._chunking:
                self._keep_spare(busy=False)
                continue
            try:
                with torch.inference_mode():
                    if joining:
                        self._prefill(joining)
                    elif (self._long or self._chunking) and self._rows and self._can_share_forward():
                        self._ragged_step()  # their decode step and the next chunk, one forward
                    else:
                        if self._long or self._chunking:
                            self._prefill_chunk()
                        if self._rows:
                            self._decode_step()
            except Exception as exc:  # never kill the engine thread: fail this batch, keep serving
                log.exception("generation failed")
                for row in [*self._rows, *joining, *self._in_prefill()]:
                    if not row.handle.done:
                        row.handle._finish(None, exc)
                self._rows, self._cache, self._mask = [], None, None
                self._long, self._chunking = [], None
            self._reap()
            self._keep_spare(busy=True)
        # stopped: nobody will serve what is still queued, so say so instead of leaving callers waiting
        for row in [*self._rows, *self._in_prefill()]:
            row.handle._finish(None, RuntimeError("the engine has stopped"))
        self._rows, self._cache, self._mask = [], None, None
        self._long, self._chunking = [], None
        for slot in list(self._slots):  # leave the model as the engine found it
            self._drop_slot(slot)
        self._per_row_forward()
        while True:
            try:
                self._requests.get_nowait().handle._finish(None, RuntimeError("the engine has stopped"))
            except queue.Empty:
                break

    def _take_requests(self) -> list[_Row]:
        """New requests for the free batch slots (waits briefly only when nothing is running)."""
        joining: list[_Row] = []
        while len(self._rows) + len(self._in_prefill()) + len(joining) < self.max_batch:
            try:
                if self._rows or joining or self._in_prefill():
                    req = self._requests.get_nowait()
                else:
                    req = self._requests.get(timeout=0.05)
            except queue.Empty:
                break
            version = req.adapter if req.adapter is not None else self._active
            if req.handle.cancelled:
                self._finish_unstarted(req, version, "cancelled")
                continue
            if version != BASE_VERSION:
                try:
                    self._ensure_loaded(version)
                except AdapterError as exc:
                    req.handle._finish(None, exc)
                    continue
            req.handle.adapter_version = version
            joining.append(_Row(req, version, self.loaded.device))
        return joining

    def _finish_unstarted(self, req: _Request, version: str, reason: str) -> None:
        now = time.perf_counter()
        req.handle._finish(Completion("", reason, version, len(req.prompt), 0, None,
                                      (now - req.submitted) * 1000))

    @property
    def prefill_chunk(self) -> int:
        """The most tokens of one chunk; a longer prompt joining running replies goes in chunks."""
        return self.pacer.max_tokens

    @prefill_chunk.setter
    def prefill_chunk(self, tokens: int) -> None:
        self.pacer.max_tokens = tokens

    def _in_prefill(self) -> list[_Row]:
        """Rows started but not yet in the batch: waiting for, or in, a chunked prefill."""
        return self._long + ([self._chunking[0]] if self._chunking else [])

    def _next_chunk(self, shared: bool = False) -> tuple[_Row, DynamicCache, list[int]] | None:
        """The long prompt being prefilled (starting the next one if none is), its cache and the
        tokens of its next chunk (``shared``: one riding in the running rows' decode step, made as
        long as fills the packed kernels' last block of rows: those tokens cost next to nothing);
        None when that prompt turned out to be cancelled (then ended)."""
        if self._chunking is None:
            row = self._long.pop(0)
            if row.handle.cancelled:
                self._finish_unstarted(row.req, row.version, "cancelled")
                return None
            self._chunking = (row, kvcache.new_cache(self.model.config))
        row, cache = self._chunking
        if row.handle.cancelled:
            self._chunking = None
            self._finish_unstarted(row.req, row.version, "cancelled")
            return None
        tokens = self.pacer.next_tokens(shared)
        if shared:
            tokens = min(tokens + -(len(self._rows) + tokens) % self._row_block, self.pacer.max_tokens)
        return row, cache, row.req.prompt[row.cached:row.cached + tokens]

    def _chunk_prefilled(self, row: _Row, cache: DynamicCache, part: list[int], logits: torch.Tensor | None) -> None:
        """``part`` is in the prompt's cache; after its last chunk the row samples its first token
        (``logits``: its last position's) and joins the batch."""
        self.prefill_chunks += 1
        row.cached += len(part)
        if row.cached < len(row.req.prompt):
            return
        self._chunking = None
        row.pad = 0
        self._merge([row], cache, torch.ones((1, len(row.req.prompt)), dtype=torch.long, device=self.loaded.device))
        self._sample([row], logits)

    def _prefill_chunk(self) -> None:
        """The next chunk of the long prompt, a forward of its own (between two decode steps)."""
        chunk = self._next_chunk()
        if chunk is None:
            return
        row, cache, part = chunk
        device = self.loaded.device
        ids = torch.tensor([part], device=device)
        positions = torch.arange(row.cached, row.cached + len(part), device=device).unsqueeze(0)
        t0 = time.perf_counter()
        logits = self._forward([row], ids, positions, None, cache)
        self.pacer.prefilled(len(part), time.perf_counter() - t0)
        self._chunk_prefilled(row, cache, part, logits)

    def _can_share_forward(self) -> bool:
        """Whether the running rows' decode step can carry the next chunk (ragged.py)."""
        return self.ragged_chunks and self._cache is not None and ragged.supported(self.model, self._cache)

    def _ragged_step(self) -> None:
        """The running rows' decode step and the long prompt's next chunk in one forward, each
        token a row of one position: the chunk adds its tokens' cost to the step, not a second
        pass over the weights (ragged.py)."""
        chunk = self._next_chunk(shared=True)
        if chunk is None:
            self._decode_step()
            return
        row, cache, part = chunk
        rows, device, done = self._rows, self.loaded.device, row.cached
        ids = torch.tensor([r.last_token for r in rows] + part, device=device).unsqueeze(1)
        positions = torch.tensor([r.cached for r in rows] + list(range(done, done + len(part))),
                                 device=device).unsqueeze(1)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        last = done + len(part) == len(row.req.prompt)
        keep = torch.tensor(list(range(len(rows))) + ([len(rows) + len(part) - 1] if last else []), device=device)
        step = ragged.RaggedStep(self._cache, [r.pad for r in rows], cache, done, len(part))
        self._route([*rows, *[row] * len(part)])
        t0 = time.perf_counter()
        try:
            logits = ragged.ragged_forward(self.model, step, ids, positions, keep)
        finally:
            self._route_rows(None)
        self.pacer.shared(len(part), time.perf_counter() - t0)
        self.shared_chunks += 1
        for r in rows:
            r.cached += 1
        self._sample(rows, logits[:len(rows)])
        self._chunk_prefilled(row, cache, part, logits[len(rows):] if last else None)

    def _route(self, rows: list[_Row]) -> None:
        """The weights in place and each row's LoRA routing for a forward whose batch rows are
        ``rows``; ``_route_rows(None)`` once the forward is over."""
        in_flight = {r.version for r in (*self._rows, *self._in_prefill(), *rows)}
        uniform = self._uniform_forward(in_flight)
        self._route_rows(None if uniform else [r.version for r in rows])

    def _forward(self, rows: list[_Row], input_ids: torch.Tensor, position_ids: torch.Tensor,
                 mask: torch.Tensor | None, cache: DynamicCache) -> torch.Tensor:
        """One forward pass for ``rows``; returns float logits of each row's last position."""
        self._route(rows)
        try:
            out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask,
                             past_key_values=cache, use_cache=True, logits_to_keep=1)
        finally:
            self._route_rows(None)
        return out.logits[:, -1, :].float()

    def _prefill(self, joining: list[_Row]) -> None:
        """Run the prompts of new requests (left-padded together), sample their first tokens
        and merge their KV cache into the running batch's."""
        device = self.loaded.device
        width = max(len(r.req.prompt) for r in joining)
        ids = torch.full((len(joining), width), self._pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(joining), width), dtype=torch.long, device=device)
        for i, r in enumerate(joining):
            n = len(r.req.prompt)
            ids[i, width - n:] = torch.tensor(r.req.prompt, device=device)
            mask[i, width - n:] = 1
            r.pad, r.cached = width - n, n
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        padded = bool((mask == 0).any())
        cache = kvcache.new_cache(self.model.config)
        logits = self._forward(joining, ids, positions, mask if padded else None, cache)
        self._merge(joining, cache, mask)
        self._sample(joining, logits)

    def _merge(self, joining: list[_Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        if self._cache is None or not self._rows:
            self._rows, self._cache, self._mask = list(joining), cache, mask
            self.peak_batch = max(self.peak_batch, len(self._rows))
            return
        if not (kvcache.batchable(self._cache) and kvcache.batchable(cache)):
            raise RuntimeError("batching needs a plain dynamic KV cache; run this model with max_batch=1")
        old_len, new_len = self._mask.shape[1], mask.shape[1]
        width = max(old_len, new_len)
        kvcache.join(self._cache, cache, width)
        self._mask = kvcache.stack_rows(self._mask, mask, 1, width)
        for r in self._rows:
            r.pad += width - old_len
        for r in joining:
            r.pad += width - new_len
        self._rows.extend(joining)
        self.peak_batch = max(self.peak_batch, len(self._rows))

    def _decode_step(self) -> None:
        rows = self._rows
        device = self.loaded.device
        ids = torch.tensor([[r.last_token] for r in rows], device=device)
        positions = torch.tensor([[r.cached] for r in rows], device=device)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        padded = any(r.pad for r in rows)
        t0 = time.perf_counter()
        logits = self._forward(rows, ids, positions, self._mask if padded else None, self._cache)
        self.pacer.decoded(time.perf_counter() - t0)
        for r in rows:
            r.cached += 1
        self._sample(rows, logits)

    def _choose(self, rows: list[_Row], logits: torch.Tensor) -> list[int | None]:
        """Each row's next token; None for a row whose sampling failed (its ``error`` says why).

        The batch is sampled at once; if that raises, each row is retried alone, so one row's
        failure (non-finite logits, say) ends only that row, never the others in the batch.
        """
        try:
            return list(choose_tokens(logits, [r.sampling for r in rows], [r.seen for r in rows],
                                      [r.generator for r in rows]))
        except Exception:
            pass
        tokens: list[int | None] = []
        for i, r in enumerate(rows):
            try:
                tokens.append(choose_tokens(logits[i:i + 1], [r.sampling], [r.seen], [r.generator])[0])
            except Exception as exc:
                log.warning("sampling failed for one request (%s); ending that request only", exc)
                r.error = GenerationFailed(f"generation failed for this request: {exc}")
                r.finish = "error"
                tokens.append(None)
        return tokens

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Pick each row's next token with its own settings, stream it, and mark finished rows."""
        tokens = self._choose(rows, logits)
        now = time.perf_counter()
        for r, tok in zip(rows, tokens):
            if tok is None:
                continue  # failed alone (finish="error")
            if r.handle.cancelled:
                r.finish = "cancelled"
                continue
            if r.ttft is None:
                r.ttft = (now - r.req.submitted) * 1000
            if tok in self.eos_ids:
                r.finish = "stop"
                continue
            r.generated.append(tok)
            r.last_token = tok
            r.seen = torch.cat([r.seen, r.seen.new_tensor([tok])])
            text = self._decode(r.generated)
            at_limit = len(r.generated) >= r.params.max_tokens
            if text.endswith("\ufffd"):
                if not at_limit:
                    continue  # an incomplete UTF-8 sequence: wait for the next token
                text = text.rstrip("\ufffd")  # the reply ends inside a multi-byte character
            r.text = text
            cut = r.stops.find(text)
            if cut >= 0:
                r.text = text[:cut]
                r.finish = "stop"
                continue
            safe = r.stops.safe_len(text)
            if safe > r.emitted:
                r.handle._emit(text[r.emitted:safe])
                r.emitted = safe
            if at_limit:
                r.finish = "length"

    def _reap(self) -> None:
        """Answer finished rows, drop them from the batch, trim padding nobody needs, unload
        adapters nobody uses."""
        done = [r for r in self._rows if r.finish is not None or r.handle.cancelled]
        if not done:
            return
        keep = [i for i, r in enumerate(self._rows) if r.finish is None and not r.handle.cancelled]
        self._rows = [self._rows[i] for i in keep]
        if not self._rows:
            self._cache, self._mask = None, None
        else:
            index = torch.tensor(keep, device=self.loaded.device)
            trim = min(r.pad for r in self._rows)
            kvcache.keep_rows(self._cache, index, trim)
            self._mask = self._mask[index, trim:]
            for r in self._rows:
                r.pad -= trim
        try:
            self._unload_unused()  # before answering, so a caller that sees the reply sees it settled
        except Exception:
            log.exception("unloading adapters failed")
        now = time.perf_counter()
        for r in done:
            if r.error is not None:
                r.handle._finish(None, r.error)
                continue
            finish = r.finish if r.finish is not None else "cancelled"
            text = r.text
            r.handle._emit(text[r.emitted:])
            r.handle._finish(Completion(
                text=text, finish_reason=finish, adapter_version=r.version,
                prompt_tokens=len(r.req.prompt), completion_tokens=len(r.generated), ttft_ms=r.ttft,
                latency_ms=(now - r.req.submitted) * 1000, token_ids=r.generated))

    def _encode(self, messages: list[dict[str, str]]) -> list[int]:
        with self._tokenizer_lock:
            out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=True, return_dict=True)
        return list(out["input_ids"])

    def _decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
