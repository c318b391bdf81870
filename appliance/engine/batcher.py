"""Continuous batching: many requests to one model decoded together, the way llama.cpp's server does it.

One thread per loaded model owns a llama.cpp context whose KV cache holds one sequence per
active request. Each step decodes one batch holding the next token of every generating
sequence plus prompt chunks of newly admitted ones, then samples each sequence's next token
from its own row of logits. Requests join and leave between steps; a cancelled request
(its client went away) is dropped from the KV cache at the next step and its slot reused.

Prompt reuse, as llama.cpp's server and Ollama do it: a sequence that ends keeps its tokens
(prompt and answer) in the KV cache. A new request takes the free sequence that shares the
longest prefix with its prompt, drops the cache past that prefix and decodes only the rest, so a
chat's next turn or a shared system prompt is not computed again. The last prompt token is
always decoded again: its logits are what the first answer token is sampled from. When another
sequence, free or busy, holds a much longer prefix (a system prompt many clients share), it is
copied into the new request's sequence; when that prefix is still being decoded for a request
admitted earlier (clients arriving together), the new request waits for it instead of decoding
the same tokens beside it.

Prefill is chunked: a step decodes at most one micro-batch (``n_ubatch``) of prompt tokens,
shortest remaining prompts first, beside the next token of every generating sequence, so a long
prompt neither stalls the others' answers nor delays the first token of short prompts. A step
takes a second prompt only while it stays within a quarter micro-batch: clients arriving together
then get their first tokens one small step after another instead of all after one big step
(shortest job first), while each step still spreads its fixed cost, reading the weights, over
enough tokens.

A request that asks for logprobs gets each token's from the logits row the step already made;
a token's logprob goes out on the TextChunk that completes its text, so one held back as the
possible start of a stop string waits with it (and one inside a stop string is dropped with it).
May import ``appliance.engine`` (base, llama) and ``appliance.errors`` only.
"""

from __future__ import annotations

import codecs
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from appliance.engine.base import Finished, SamplingParams, TextChunk, TokenLogprob
from appliance.engine.llama import LlamaContext, LlamaModel, Sampler
from appliance.errors import ApplianceError, EngineBusy, EngineFailure, PromptTooLong

__all__ = ["Batcher", "Event", "Finished", "GenerationRequest", "TextChunk"]

Event = TextChunk | Finished


@dataclass
class GenerationRequest:
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    emit: Callable[[Event], None]  # called on the batcher thread; must not block
    stop: tuple[str, ...] = ()
    cancelled: threading.Event = field(default_factory=threading.Event)


# A copy moves the source's whole KV stream (a memcpy of seq_ctx tokens' K and V), far cheaper a
# token than decoding one; below this many tokens gained it is not worth it.
_MIN_COPIED_TOKENS = 16


@dataclass
class _Slot:
    seq_id: int
    request: GenerationRequest
    sampler: Sampler
    prompt_offset: int = 0
    position: int = 0
    cached_tokens: int = 0  # prompt tokens found in the KV cache, not decoded again
    tokens: list[int] = field(default_factory=list)  # what the KV cache holds, position by position
    next_token: int | None = None
    # (an earlier request's slot still decoding its prompt, how many of its first tokens to copy
    # once they are in its cache): this prompt waits for them instead of decoding them too
    awaiting: tuple[_Slot, int] | None = None
    completion_tokens: int = 0
    held: str = ""  # text that may be the start of a stop string
    # logprobs of tokens whose text is not all sent yet, with where that text starts and ends
    # in the text not yet sent (held, then the newest piece)
    pending: list[tuple[TokenLogprob, int, int]] = field(default_factory=list)
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace")
    )

    @property
    def prefilling(self) -> bool:
        return self.prompt_offset < len(self.request.prompt)

    def logprobs_for(self, sent: int, *, cut: bool = False) -> tuple[TokenLogprob, ...]:
        """The logprobs of the tokens whose text the next ``sent`` characters complete; ``cut``:
        the text ends there for good, so a token that only began in it goes out too."""
        taken, kept = [], []
        for entry, start, end in self.pending:
            if start < sent and (cut or end <= sent):
                taken.append(entry)
            else:
                kept.append((entry, start - sent, end - sent))
        self.pending = kept
        return tuple(taken)


class Batcher:
    """Owns one context; ``submit`` from any thread, results come back through each request's ``emit``."""

    def __init__(
        self,
        model: LlamaModel,
        context: LlamaContext,
        *,
        n_seq: int,
        seq_ctx: int,
        queue_size: int,
        reuse_prompts: bool = True,
    ) -> None:
        self.model = model
        self.context = context
        self.seq_ctx = seq_ctx
        self.reuse_prompts = reuse_prompts
        self._free = set(range(n_seq))
        # the tokens each free sequence still holds in the KV cache, for the next prompt to reuse
        self._kept: dict[int, list[int]] = {}
        self._slots: dict[int, _Slot] = {}
        self._queue: queue.Queue[GenerationRequest] = queue.Queue(maxsize=queue_size)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._stop_error: ApplianceError | None = None
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._thread.start()

    # -- from other threads --------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> None:
        if len(request.prompt) >= self.seq_ctx:
            raise PromptTooLong(
                f"the prompt has {len(request.prompt)} tokens; this model's context holds {self.seq_ctx}"
            )
        try:
            self._queue.put_nowait(request)
        except queue.Full as exc:
            raise EngineBusy(f"{self._queue.maxsize} requests are already waiting for this model") from exc
        self._wake.set()

    def wake(self) -> None:
        """Look at the queue and the cancellations now rather than at the next step."""
        self._wake.set()

    @property
    def active(self) -> int:
        return len(self._slots)

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    @property
    def idle(self) -> bool:
        return not self._slots and self._queue.empty()

    def stop(self, error: ApplianceError) -> None:
        """Finish every request with ``error`` and end the thread."""
        self._stop_error = error
        self._stopping.set()
        self._wake.set()
        self._thread.join()

    # -- the batcher thread --------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._admit()
            self._drop_cancelled()
            self._copy_awaited()
            entries, samplers = self._plan()
            if not entries:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                self.context.decode(entries)
            except ApplianceError as exc:
                for slot in list(self._slots.values()):
                    self._finish(slot, "error", exc)
                continue
            for slot, batch_index in samplers:
                token = slot.sampler.sample(self.context, batch_index)
                top = slot.request.sampling.logprobs
                logprob = (
                    None
                    if top is None
                    else self.context.token_logprob(self.model, batch_index, token, top=top)
                )
                self._advance(slot, token, logprob)
        for slot in list(self._slots.values()):
            self._finish(slot, "error", self._stop_error)
        while not self._queue.empty():
            request = self._queue.get_nowait()
            request.emit(Finished("error", len(request.prompt), 0, self._stop_error))

    def _admit(self) -> None:
        while self._free and not self._queue.empty():
            request = self._queue.get_nowait()
            if request.cancelled.is_set():
                request.emit(Finished("cancelled", len(request.prompt), 0))
                continue
            try:
                sampler = Sampler(self.model, request.sampling, seq_ctx=self.seq_ctx)
            except Exception as exc:  # this request's to answer; the batcher thread must live on
                failure = (
                    exc if isinstance(exc, ApplianceError) else EngineFailure(f"sampler setup failed: {exc}")
                )
                request.emit(Finished("error", len(request.prompt), 0, failure))
                continue
            seq_id, reused = self._take_sequence(request.prompt)
            self._free.remove(seq_id)
            self._kept.pop(seq_id, None)
            if not (reused and self.context.keep_prefix(seq_id, reused)):
                self.context.forget(seq_id)
                reused = 0
            slot = _Slot(seq_id=seq_id, request=request, sampler=sampler)
            self._set_cached(slot, reused)
            if self.reuse_prompts:
                self._reuse_other_sequence(slot)
            self._slots[seq_id] = slot

    def _set_cached(self, slot: _Slot, length: int) -> None:
        """``slot``'s sequence holds its prompt's first ``length`` tokens: decode from there."""
        slot.prompt_offset = slot.position = slot.cached_tokens = length
        slot.tokens = slot.request.prompt[:length]

    def _reuse_other_sequence(self, slot: _Slot) -> None:
        """Copy a longer prefix of ``slot``'s prompt from another sequence's cache, or wait for an
        earlier request still decoding one; nothing when the gain is small."""
        prompt = slot.request.prompt
        usable = len(prompt) - 1
        # (tokens gained in the end, available now, source): a source already holding them first
        best: tuple[int, bool, int | _Slot] | None = None
        for seq_id in sorted(self._free):
            shared = min(_common_prefix(self._kept.get(seq_id, ()), prompt), usable)
            if best is None or (shared, True) > best[:2]:
                best = (shared, True, seq_id)
        for other in self._slots.values():
            ready = min(_common_prefix(other.tokens, prompt), usable)
            later = min(_common_prefix(other.request.prompt, prompt), usable) if other.prefilling else ready
            if best is None or (later, later == ready) > best[:2]:
                best = (later, later == ready, other)
        if best is None or best[0] - slot.cached_tokens < max(_MIN_COPIED_TOKENS, self.seq_ctx // 64):
            return
        length, ready, source = best
        if isinstance(source, _Slot) and not ready:
            slot.awaiting = (source, length)
        else:
            self._copy_into(slot, source.seq_id if isinstance(source, _Slot) else source, length)

    def _copy_into(self, slot: _Slot, source: int, length: int) -> None:
        copied = self.context.copy_prefix(source, slot.seq_id, length)
        self._set_cached(slot, length if copied else 0)

    def _copy_awaited(self) -> None:
        """Give each waiting prompt the prefix it waits for, once it is in the cache (in order of
        admission, so a copy of a copy follows its source); when the request decoding it ended
        first, take what its sequence kept, or decode the rest itself."""
        for slot in list(self._slots.values()):
            if slot.awaiting is None:
                continue
            source, length = slot.awaiting
            if self._slots.get(source.seq_id) is source:
                if len(source.tokens) < length:
                    continue
                self._copy_into(slot, source.seq_id, length)
            elif self._kept.get(source.seq_id) is source.tokens:
                kept = min(length, _common_prefix(source.tokens, slot.request.prompt))
                if kept > slot.cached_tokens:
                    self._copy_into(slot, source.seq_id, kept)
            slot.awaiting = None

    def _take_sequence(self, prompt: list[int]) -> tuple[int, int]:
        """The free sequence for ``prompt`` and how many of its first tokens that sequence's cache
        already holds (at most all but the last, whose logits must be made again).

        The lowest free sequence, unless another one holds a prefix longer by a tenth of the
        prompt or more (llama.cpp server's slot similarity): the lowest keeps the busy sequences a
        consecutive run, which llama.cpp decodes in one micro-batch, so a token or two of chat
        template in common is not worth a gap."""
        lowest = min(self._free)
        if not self.reuse_prompts:
            return lowest, 0
        usable = len(prompt) - 1
        shared = {
            seq_id: min(_common_prefix(self._kept.get(seq_id, ()), prompt), usable) for seq_id in self._free
        }
        best = max(sorted(self._free), key=lambda seq_id: shared[seq_id])
        if shared[best] - shared[lowest] >= max(1, len(prompt) // 10):
            return best, shared[best]
        return lowest, shared[lowest]

    def _drop_cancelled(self) -> None:
        for slot in list(self._slots.values()):
            if slot.request.cancelled.is_set():
                self._finish(slot, "cancelled")

    def _plan(self) -> tuple[list[tuple[int, int, int, bool]], list[tuple[_Slot, int]]]:
        """This step's batch: the next token of each generating sequence first, then prompt chunks
        of one micro-batch at most, shortest remaining prompts first, a second prompt only within a
        quarter micro-batch."""
        entries: list[tuple[int, int, int, bool]] = []
        samplers: list[tuple[_Slot, int]] = []
        budget = self.context.n_batch
        # In sequence order: llama.cpp puts a consecutive run of sequence ids in one micro-batch
        # (per-sequence KV streams), so a batch out of order would be decoded in several passes.
        slots = [self._slots[seq_id] for seq_id in sorted(self._slots)]
        for slot in slots:
            if slot.next_token is not None and budget > 0:
                samplers.append((slot, len(entries)))
                entries.append((slot.next_token, slot.position, slot.seq_id, True))
                slot.tokens.append(slot.next_token)
                slot.position += 1
                slot.next_token = None
                budget -= 1
        budget = min(budget, self.context.n_ubatch)
        shared_step = self.context.n_ubatch // 4
        chunk_sizes: dict[int, int] = {}
        taken = 0
        prefilling = [slot for slot in slots if slot.prefilling and slot.awaiting is None]
        for slot in sorted(prefilling, key=lambda slot: len(slot.request.prompt) - slot.prompt_offset):
            size = min(budget - taken, len(slot.request.prompt) - slot.prompt_offset)
            if size <= 0 or (chunk_sizes and taken + size > shared_step):
                break
            chunk_sizes[slot.seq_id] = size
            taken += size
        for slot in slots:
            if slot.seq_id not in chunk_sizes:
                continue
            prompt = slot.request.prompt
            chunk = prompt[slot.prompt_offset : slot.prompt_offset + chunk_sizes[slot.seq_id]]
            for token in chunk:
                slot.prompt_offset += 1
                last = not slot.prefilling
                if last:
                    samplers.append((slot, len(entries)))
                entries.append((token, slot.position, slot.seq_id, last))
                slot.position += 1
            slot.tokens.extend(chunk)
        return entries, samplers

    def _advance(self, slot: _Slot, token: int, logprob: TokenLogprob | None) -> None:
        slot.completion_tokens += 1
        if self.model.is_end_of_generation(token):
            self._finish(slot, "stop")
            return
        piece = slot.decoder.decode(self.model.piece(token))
        if logprob is not None:
            slot.pending.append((logprob, len(slot.held), len(slot.held) + len(piece)))
        text = slot.held + piece
        slot.held = ""
        request = slot.request
        for stop in request.stop:
            index = text.find(stop)
            if index >= 0:
                if index:
                    request.emit(TextChunk(text[:index], slot.logprobs_for(index, cut=True)))
                self._finish(slot, "stop", flush=False, stop_sequence=stop)
                return
        keep = _stop_prefix_length(text, request.stop)
        if keep:
            text, slot.held = text[:-keep], text[-keep:]
        if text:
            request.emit(TextChunk(text, slot.logprobs_for(len(text))))
        if slot.completion_tokens >= request.max_tokens or slot.position + 1 >= self.seq_ctx:
            self._finish(slot, "length")
            return
        slot.next_token = token

    def _finish(
        self,
        slot: _Slot,
        reason: str,
        error: ApplianceError | None = None,
        *,
        flush: bool = True,
        stop_sequence: str | None = None,
    ) -> None:
        request = slot.request
        if flush:
            tail = slot.held + slot.decoder.decode(b"", final=True)
            if (tail or slot.pending) and reason in ("stop", "length"):
                request.emit(TextChunk(tail, tuple(entry for entry, _, _ in slot.pending)))
        slot.sampler.close()
        # After a failed decode the cache may hold part of a batch: trust none of it.
        if error is None and self.reuse_prompts:
            self._kept[slot.seq_id] = slot.tokens
        else:
            self.context.forget(slot.seq_id)
        del self._slots[slot.seq_id]
        self._free.add(slot.seq_id)
        request.emit(
            Finished(
                reason,
                len(request.prompt),
                slot.completion_tokens,
                error,
                stop_sequence=stop_sequence,
                cached_tokens=slot.cached_tokens,
            )
        )


def _common_prefix(first: list[int] | tuple[()], second: list[int]) -> int:
    length = min(len(first), len(second))
    for index in range(length):
        if first[index] != second[index]:
            return index
    return length


def _stop_prefix_length(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` could still become a stop string."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-length:]):
                longest = length
                break
    return longest
