"""The decoding loops: prefill the prompts once, then one token per step through the KV cache.

:func:`decode` (greedy and sampling) is a generator (docs/architecture.md, habit 13): it yields a :class:`Step` —
the next token of every sequence — as soon as it is chosen, so ``generate``, streaming, chat and the
server are thin wrappers around it. :class:`BeamSearch` keeps ``num_beams`` hypotheses per prompt
and yields, step by step, the tokens every surviving hypothesis agrees on (what a stream can show).

Prompts of different lengths share a batch by left padding: padding is masked out of attention and
each row's positions start at its first real token, so a prompt's output does not depend on its
batch. The token buffer handed to logits processors holds ``-1`` in padding slots.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from lmlab.errors import LmlabError
from lmlab.generate.processors import LogitsProcessorList

StopRule = Callable[[Sequence[int]], bool]  # generated token ids -> finished?


@dataclass
class Step:
    """One decoding step for a batch of B rows (read-only: when no row can finish, that is without stop
    ids or rules, every step shares the same ``active`` and ``finished`` tensors)."""

    tokens: Tensor  # (B,) the chosen token; ``pad_id`` in rows that had already finished
    active: Tensor  # (B,) bool: the row produced a real token this step
    finished: Tensor  # (B,) bool: the row is done after this step (stop id or stop rule)
    logprobs: Tensor | None = None  # (B,) the model's log-probability of the chosen token
    top_ids: Tensor | None = None  # (B, n) the n most likely tokens under the model
    top_logprobs: Tensor | None = None  # (B, n) and their log-probabilities


class _Batch:
    """Left-padded prompts in a token buffer, their attention mask, positions and KV cache.

    ``compile=True`` runs every one-token step through :func:`compiled_step`: the cache is then
    allocated with a bucketed length (a power of two, at most ``block_size``) so that generations of
    similar lengths share one compiled graph, and each step attends over all of it under a mask."""

    def __init__(
        self,
        model: nn.Module,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        use_cache: bool,
        compile: bool = False,
    ) -> None:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise LmlabError(
                "generation needs at least one token of prompt per sequence (an empty prompt encodes to nothing)"
            )
        if max_new_tokens < 1:
            raise LmlabError(
                f"max_new_tokens is {max_new_tokens}: expected a positive integer", params="max_new_tokens"
            )
        block_size = model.config.block_size
        self.model = model
        self.device = device = next(model.parameters()).device
        self.B, self.P = B, P = len(prompts), max(len(p) for p in prompts)
        self.total = total = P + max_new_tokens
        if total > block_size:
            raise LmlabError(
                f"prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the model's block_size "
                f"{block_size}"
            )
        self.step_fn = None
        if compile:
            if not use_cache or not hasattr(model, "lm_logits"):
                raise LmlabError(
                    "compile needs a decoder-only model decoding with its KV cache (encoder–decoders decode eagerly)",
                    params="compile",
                )
            self.step_fn = compiled_step(device)
            total = min(block_size, 1 << (total - 1).bit_length())  # the cache length: one graph per bucket
        self.tokens = torch.full((B, total), -1, dtype=torch.long, device=device)
        self.real = torch.ones((B, total), dtype=torch.bool, device=device)  # False in left padding
        for row, prompt in enumerate(prompts):
            self.tokens[row, P - len(prompt) : P] = torch.tensor(list(prompt), dtype=torch.long, device=device)
            self.real[row, : P - len(prompt)] = False
        self.padded = any(len(p) < P for p in prompts)
        self.positions = (self.real.long().cumsum(-1) - 1).clamp(min=0)  # (B, total): each row counts from 0
        self.slots = torch.arange(total, device=device)  # cache slots, sliced each step (no new tensor per step)
        self.cache = None
        if (
            use_cache
        ):  # only a decoder-only model (checked above) takes static=: an encoder–decoder's cache never compiles
            self.cache = model.new_kv_cache(B, total, static=True) if compile else model.new_kv_cache(B, total)
        self.length = P  # tokens in the buffer so far

    def select(self, rows: Tensor) -> None:
        """Keep batch rows ``rows`` (in that order): beam search expands and reorders its hypotheses."""
        self.tokens, self.real, self.positions = self.tokens[rows], self.real[rows], self.positions[rows]
        self.B = len(rows)
        if self.cache is not None:
            self.cache.select(rows)

    def prefill(self) -> Tensor:
        """Next-token logits (B, vocab_size) after the prompts."""
        if self.cache is None:
            return self._full_forward()
        P = self.P
        return self.model(
            self.tokens[:, :P].clamp(min=0),
            kv_cache=self.cache,
            input_pos=self.slots[:P],
            position_ids=self.positions[:, :P] if self.padded else None,  # unpadded: positions are the slots
            key_padding_mask=self.real if self.padded else None,
            cache_len=P,
            logits_to_keep=1,
        )[:, -1]

    def append(self, next_tokens: Tensor) -> Tensor:
        """Add one token per row; return the next-token logits (B, vocab_size)."""
        pos = self.length
        self.tokens[:, pos] = next_tokens
        self.length += 1
        if self.cache is None:
            return self._full_forward()
        if self.step_fn is not None:
            return self.step_fn(
                self.model,
                next_tokens.view(self.B, 1),
                self.slots[pos : pos + 1],
                self.positions[:, pos : pos + 1] if self.padded else None,
                self.real if self.padded else None,
                self.cache,
            )
        return self.model(
            next_tokens[:, None],
            kv_cache=self.cache,
            input_pos=self.slots[pos : pos + 1],
            position_ids=self.positions[:, pos : pos + 1] if self.padded else None,
            key_padding_mask=self.real if self.padded else None,
            cache_len=pos + 1,
        )[:, -1]

    def _full_forward(self) -> Tensor:
        """No cache: run the whole sequence again (the reference the cached path is tested against)."""
        n = self.length
        return self.model(
            self.tokens[:, :n].clamp(min=0),
            position_ids=self.positions[:, :n],
            key_padding_mask=self.real[:, :n] if self.padded else None,
            logits_to_keep=1,
        )[:, -1]

    def generated(self, row: int) -> list[int]:
        return self.tokens[row, self.P : self.length].tolist()


# -- the compiled decode step ----------------------------------------------------------------------


def _step_forward(
    model: nn.Module,
    idx: Tensor,
    input_pos: Tensor,
    position_ids,
    key_padding_mask,
    kv_cache,
    head: bool,
    attn_mask=None,
) -> Tensor:
    """Next-token logits (B, V) after one token per row, attending over the whole static cache under a
    mask (no ``cache_len``): every shape is fixed, so this traces into one graph per batch and cache size.
    ``head=False`` (CPU) returns the last hidden states (B, n_embd) instead: the caller applies the LM
    head eagerly, where it can take oneDNN's pre-packed kernel (see ``lmlab.kernels.cpu_decode_head``),
    which Inductor cannot trace. On GPU the head stays in the graph and reads its parameter, which a
    CUDA graph treats as static. ``attn_mask``: the continuous-batching engine's own mask (rows at their own
    positions), instead of the one built from the slots."""
    h = model(
        idx,
        kv_cache=kv_cache,
        input_pos=input_pos,
        position_ids=position_ids,
        key_padding_mask=key_padding_mask,
        hidden_only=True,
        attn_mask=attn_mask,
    )
    return model.lm_head(h[:, -1]) if head else h[:, -1]


_COMPILED: dict[str, Callable] = {}


def compiled_step(device: torch.device) -> Callable:
    """The decode step compiled by ``torch.compile`` (one per device type, made on first use), as gpt-fast
    runs it: on CUDA with ``mode="reduce-overhead"``, which captures the step as a CUDA graph (the
    KV cache's buffers are marked static, so the graph writes into them in place); on CPU with
    Inductor's default mode, which fuses the step's many small ops into a few C++ kernels. The first
    call of each (batch, cache length) compiles: seconds to a minute, cached on disk by Inductor.

    The returned callable takes ``(model, idx, input_pos, position_ids, key_padding_mask, kv_cache, attn_mask=None)``
    and returns logits (B, V); a compile failure becomes a one-line :class:`LmlabError`."""
    kind = device.type
    if kind not in _COMPILED:
        compiled = torch.compile(
            _step_forward, fullgraph=True, dynamic=False, mode="reduce-overhead" if kind == "cuda" else None
        )

        def step(model, idx, input_pos, position_ids, key_padding_mask, kv_cache, attn_mask=None):
            if kind == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
            try:  # costs nothing unless it raises (Python 3.11's zero-cost exceptions)
                out = compiled(
                    model, idx, input_pos, position_ids, key_padding_mask, kv_cache, kind != "cpu", attn_mask
                )
            except Exception as e:  # noqa: BLE001 - a missing C++ compiler, an unsupported op, …
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise LmlabError(
                    f"compile: torch.compile could not compile the decode step ({reason[:300]}); decode without "
                    "compile",
                    params="compile",
                ) from e
            if kind == "cpu":
                return model.lm_logits(out)
            return out.clone() if kind == "cuda" else out  # a CUDA graph's output is overwritten by its next replay

        _COMPILED[kind] = step
    return _COMPILED[kind]


def _sample(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One token per row from ``probs`` (B, V) by inverting the CDF: one uniform u per row, and the
    first token whose cumulative probability exceeds u × the row's total.

    The cumulative sums run in float64 over the flattened batch, so all rows share one cumsum and
    one binary search: row b's values lie in [start_b, end_b), the sums before and after it. Keeping
    each u strictly below end_b makes the search land inside row b, on a token with nonzero
    probability (a zero adds nothing to the sum, so the first sum above u never ends on one). This
    costs one pass over the probabilities, where an exponential race needs a random draw and a
    logarithm per token; a seeded ``generator`` reproduces the draws.
    """
    B, V = probs.shape
    cdf = probs.flatten().cumsum(0, dtype=torch.float64)
    end = cdf[V - 1 :: V]
    start = torch.cat((end.new_zeros(1), end[:-1]))
    u = start + torch.rand(B, generator=generator, dtype=torch.float64, device=probs.device) * (end - start)
    u = torch.minimum(u, end.nextafter(start))  # u·(end - start) can round up to end itself
    return torch.searchsorted(cdf, u, right=True) - torch.arange(B, device=probs.device) * V


def _argmax(scores: Tensor) -> Tensor:
    """The greedy choice per row of ``scores`` (B, V): the first maximum, as ``torch.argmax``. On CPU
    through NumPy, whose vectorised argmax is ~5× faster than PyTorch's on a 50k vocabulary (0.4 ms of
    a ~11 ms decode step at batch 8)."""
    if scores.device.type == "cpu":
        return torch.from_numpy(scores.numpy().argmax(axis=-1))
    return scores.argmax(dim=-1)


@torch.inference_mode()
def decode(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    processors: Sequence = (),
    sample: bool = False,
    generator: torch.Generator | None = None,
    stop_ids: Sequence[int] = (),
    stop_rules: Sequence[StopRule] = (),
    pad_id: int = 0,
    logprobs: int | None = None,
    use_cache: bool = True,
    compile: bool = False,
) -> Iterator[Step]:
    """Greedy or sampled decoding; yield one :class:`Step` per new token position.

    ``processors`` reshape the logits (see :mod:`lmlab.generate.processors`); ``sample`` draws from
    the result instead of taking its argmax. A row finishes when it emits one of ``stop_ids`` or
    when a stop rule says so; after that it yields ``pad_id`` with ``active`` False. The loop ends
    after ``max_new_tokens`` steps or when every row has finished. ``logprobs=n`` adds each chosen
    token's log-probability under the model (before any processor) and the n most likely tokens.
    ``compile=True`` runs the one-token steps through :func:`compiled_step` (decoder-only models).
    """
    batch = _Batch(model, prompts, max_new_tokens, use_cache, compile)
    processors = LogitsProcessorList(processors)
    processors.begin(batch.P)
    device, B = batch.device, batch.B
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    can_finish = bool(stop.numel() or stop_rules)  # if not, every step reuses the same all-True / all-False masks
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    active = ~finished
    logits = batch.prefill()
    for step in range(max_new_tokens):
        scores = processors(batch.tokens[:, : batch.length], logits.float()) if processors else logits.float()
        next_token = _sample(scores.softmax(dim=-1), generator) if sample else _argmax(scores)
        if can_finish:
            active = ~finished
            next_token = next_token.masked_fill(finished, pad_id)
        out = Step(next_token, active, finished)
        if logprobs is not None:
            model_logprobs = logits.float().log_softmax(dim=-1)
            out.logprobs = model_logprobs.gather(-1, next_token[:, None]).squeeze(-1)
            if logprobs > 0:
                out.top_logprobs, out.top_ids = model_logprobs.topk(min(logprobs, model_logprobs.shape[-1]), dim=-1)
        if stop.numel():
            finished = finished | torch.isin(next_token, stop)
        last = step == max_new_tokens - 1
        if not last:
            logits = batch.append(next_token)
        else:
            batch.tokens[:, batch.length] = next_token
            batch.length += 1
        if stop_rules:
            for row in range(B):
                if (
                    bool(active[row])
                    and not bool(finished[row])
                    and any(rule(batch.generated(row)) for rule in stop_rules)
                ):
                    finished[row] = True
        if can_finish:
            out.finished = finished.clone()
        yield out
        if last or (can_finish and bool(finished.all())):
            return


# -- beam search ---------------------------------------------------------------------------------


@dataclass(order=True)
class Hypothesis:
    """A finished beam: ``score`` is ``sum_logprob / len(tokens) ** length_penalty``."""

    score: float
    sum_logprob: float = field(compare=False)
    tokens: list[int] = field(compare=False)  # the generated tokens, the stop token included
    finish_reason: str = field(compare=False)  # "stop" or "length"


class BeamSearch:
    """Beam search over a batch of prompts, as Hugging Face runs it.

    Each step scores every (beam, next token) pair by the beam's summed log-probability plus the
    token's (processed) log-probability, and keeps the best ``2·num_beams`` candidates per prompt:
    a candidate that ends in a stop id (or trips a stop rule) becomes a finished hypothesis when it
    ranks among the top ``num_beams``; the best ``num_beams`` others continue. A prompt is done when
    it has ``num_beams`` finished hypotheses and, unless ``early_stopping``, no running beam can
    still beat the worst of them under the length penalty. ``length_penalty`` > 0 favours longer
    sequences, < 0 shorter ones.

    ``for committed in search.run(): ...`` yields, after every step, each prompt's tokens that all
    its surviving hypotheses share (they can be shown as final); ``search.results`` then holds the
    best ``num_return_sequences`` hypotheses per prompt, best first.
    """

    def __init__(
        self,
        model: nn.Module,
        prompts: Sequence[Sequence[int]],
        *,
        num_beams: int,
        max_new_tokens: int,
        processors: Sequence = (),
        stop_ids: Sequence[int] = (),
        stop_rules: Sequence[StopRule] = (),
        length_penalty: float = 1.0,
        early_stopping: bool = False,
        num_return_sequences: int = 1,
        pad_id: int = 0,
        use_cache: bool = True,
        compile: bool = False,
    ) -> None:
        if num_beams < 1:
            raise LmlabError(f"num_beams is {num_beams}: expected a positive integer", params="num_beams")
        if not 1 <= num_return_sequences <= num_beams:
            raise LmlabError(
                f"num_return_sequences is {num_return_sequences}: beam search returns 1 to num_beams "
                f"({num_beams}) sequences",
                params="num_return_sequences num_beams",
            )
        self.model, self.prompts, self.K, self.max_new_tokens = model, prompts, num_beams, max_new_tokens
        self.processors = LogitsProcessorList(processors)
        self.stop_ids, self.stop_rules = set(stop_ids), list(stop_rules)
        self.length_penalty, self.early_stopping = length_penalty, early_stopping
        self.num_return_sequences, self.pad_id, self.use_cache, self.compile = (
            num_return_sequences,
            pad_id,
            use_cache,
            compile,
        )
        self.results: list[list[Hypothesis]] = []

    def _score(self, sum_logprob: float, length: int) -> float:
        return sum_logprob / (length**self.length_penalty)

    def _add(self, kept: list[Hypothesis], hyp: Hypothesis) -> None:
        """Keep the best ``num_beams`` finished hypotheses (a min-heap on score)."""
        if len(kept) < self.K:
            heapq.heappush(kept, hyp)
        elif hyp.score > kept[0].score:
            heapq.heapreplace(kept, hyp)

    def _done(self, kept: list[Hypothesis], best_running: float, length: int) -> bool:
        if len(kept) < self.K:
            return False
        if self.early_stopping:
            return True
        # the best a running beam can still reach: HF's heuristic, its score at the current length
        return kept[0].score >= self._score(best_running, length)

    @torch.inference_mode()
    def run(self) -> Iterator[list[list[int]]]:
        K = self.K
        batch = _Batch(self.model, self.prompts, self.max_new_tokens, self.use_cache, self.compile)
        self.processors.begin(batch.P)
        B, device = batch.B, batch.device
        logits = batch.prefill()  # (B, V): the prompts run once, then each is copied to K beams
        rows = torch.arange(B, device=device).repeat_interleave(K)
        batch.select(rows)
        logits = logits[rows]
        beam_scores = torch.full((B, K), float("-inf"), device=device)
        beam_scores[:, 0] = 0.0  # at first all K beams are the same: expand beam 0 only
        kept: list[list[Hypothesis]] = [[] for _ in range(B)]
        done = [False] * B
        V = logits.shape[-1]
        for step in range(self.max_new_tokens):
            length = step + 1  # generated tokens once this step's token is added
            logprobs = self.processors(batch.tokens[:, : batch.length], logits.float().log_softmax(dim=-1))
            candidates = (logprobs + beam_scores.view(-1, 1)).view(B, K * V)
            top_scores, top_index = candidates.topk(min(2 * K, K * V), dim=-1)  # (B, 2K), best first
            top_scores, top_index = top_scores.tolist(), top_index.tolist()
            next_rows, next_tokens, next_scores = [], [], []
            for b in range(B):
                if done[b]:  # keep the batch rectangular: dummy beams that never matter again
                    next_rows += [b * K] * K
                    next_tokens += [self.pad_id] * K
                    next_scores += [float("-inf")] * K
                    continue
                chosen = 0
                for rank, (score, index) in enumerate(zip(top_scores[b], top_index[b])):
                    if score == float("-inf"):
                        break
                    beam, token = divmod(index, V)
                    row = b * K + beam
                    tokens = batch.generated(row) + [token]
                    if token in self.stop_ids or any(rule(tokens) for rule in self.stop_rules):
                        if rank < K:
                            self._add(kept[b], Hypothesis(self._score(score, length), score, tokens, "stop"))
                        continue
                    next_rows.append(row)
                    next_tokens.append(token)
                    next_scores.append(score)
                    chosen += 1
                    if chosen == K:
                        break
                while chosen < K:  # fewer live candidates than beams (tiny vocabularies)
                    next_rows.append(b * K)
                    next_tokens.append(self.pad_id)
                    next_scores.append(float("-inf"))
                    chosen += 1
                best_running = next_scores[b * K]
                done[b] = best_running == float("-inf") or self._done(kept[b], best_running, length)
            batch.select(torch.tensor(next_rows, device=device))
            beam_scores = torch.tensor(next_scores, device=device).view(B, K)
            next_tokens_t = torch.tensor(next_tokens, dtype=torch.long, device=device)
            if all(done) or step == self.max_new_tokens - 1:
                batch.tokens[:, batch.length] = next_tokens_t
                batch.length += 1
                yield self._committed(batch, kept, beam_scores)
                break
            logits = batch.append(next_tokens_t)
            yield self._committed(batch, kept, beam_scores)
        self._finish(batch, kept, beam_scores, done)

    def _committed(self, batch: _Batch, kept: list[list[Hypothesis]], beam_scores: Tensor) -> list[list[int]]:
        """Per prompt: the longest prefix shared by every running beam and every kept hypothesis."""
        committed = []
        for b in range(len(kept)):
            seqs = [h.tokens for h in kept[b]]
            seqs += [batch.generated(b * self.K + k) for k in range(self.K) if beam_scores[b, k] > float("-inf")]
            if not seqs:
                committed.append([])
                continue
            prefix = seqs[0]
            for s in seqs[1:]:
                n = 0
                while n < min(len(prefix), len(s)) and prefix[n] == s[n]:
                    n += 1
                prefix = prefix[:n]
            committed.append(prefix)
        return committed

    def _finish(self, batch: _Batch, kept: list[list[Hypothesis]], beam_scores: Tensor, done: list[bool]) -> None:
        """Running beams of unfinished prompts compete with the finished ones; keep the best."""
        scores = beam_scores.tolist()
        for b in range(len(kept)):
            if not done[b]:
                for k in range(self.K):
                    if scores[b][k] > float("-inf"):
                        tokens = batch.generated(b * self.K + k)
                        self._add(
                            kept[b], Hypothesis(self._score(scores[b][k], len(tokens)), scores[b][k], tokens, "length")
                        )
            self.results.append(sorted(kept[b], reverse=True)[: self.num_return_sequences])
