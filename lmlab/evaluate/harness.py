"""An lm-evaluation-harness backend: lmlab models on EleutherAI's benchmarks (``pip install 'lmlab[harness]'``).

Importing this module registers the model type ``lmlab`` with lm-eval; lmlab also declares it in lm-eval's
``lm_eval.models`` entry-point group, which lm-eval reads once it has plugin entry points (merged upstream after
0.4.13; 0.4.13 finds third-party models only by import). It sets ``HF_DATASETS_OFFLINE``, ``HF_HUB_OFFLINE`` and
``TRANSFORMERS_OFFLINE`` to 1 unless already set: tasks come from local files. From the command line::

    lmlab evaluate runs/a --harness lmlab_mc,lmlab_gen --harness-include examples/harness/ --out eval/
    python -m lmlab.evaluate.harness --model lmlab --model_args pretrained=runs/a,batch_size=8 \\
        --tasks lmlab_mc --include_path examples/harness/

The second is lm-eval's own command line (every ``lm_eval`` flag) with the ``lmlab`` model type registered.

:class:`LmlabLM` answers lm-eval's three request kinds with lmlab's model:

- ``loglikelihood``: lm-eval's tokenization (:class:`~lm_eval.api.model.TemplateLM`); a context read once for all
  its continuations (packed in one row after it, each attending to the context and itself); rows sorted longest
  first and batched, right-padded; the LM head runs on the continuation positions only.
- ``loglikelihood_rolling``: lm-eval's disjoint rolling windows, scored by the same batched path.
- ``generate_until``: lmlab's decoding loop (:meth:`lmlab.api.LM.complete_ids`: KV cache, left-padded batches,
  stop strings from ``until``), requests grouped by their generation options and sorted by length.

An encoder–decoder (a t5 preset, or BART-style: what HF export holds) is scored and decoded as lm-eval's
``seq2seq`` backend does: the context is the source, the continuation the target.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmlab.api import LM, load
from lmlab.errors import LmlabError


def offline() -> None:
    """Keep lm-eval, datasets and transformers off the network: tasks come from local files. A variable
    already set is left as it is."""
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")


offline()  # before datasets is imported: it reads these once

try:
    import lm_eval.models  # noqa: F401  (lm-eval's own models first: its registry imports them only when empty)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import model_registry, register_model
    from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - the optional extra is missing
    raise LmlabError(
        f"the lm-evaluation-harness backend needs lm-eval ({e.name} is missing): `pip install 'lmlab[harness]'`"
    ) from None


Request = tuple[Any, list[int], list[int]]  # (key, context ids, continuation ids): TemplateLM's scoring unit
Packed = tuple[list[int], list[int], list[int], list[list[int]]]  # a context and its continuations: see _pack


def _positive_batch_size(batch_size: Any) -> int:
    try:
        value = int(batch_size)
    except (TypeError, ValueError):
        value = 0
    if value < 1 or isinstance(batch_size, bool):
        raise LmlabError(f"batch_size {batch_size!r}: expected a positive integer", params="batch_size")
    return value


class LmlabLM(TemplateLM):
    """lm-eval's ``LM`` for an lmlab checkpoint, run folder or Hugging Face folder (``pretrained``), or an
    :class:`lmlab.api.LM` already loaded (``lm``).

    Args:
        pretrained: checkpoint folder, run folder (its best checkpoint) or Hugging Face model folder
        batch_size: requests per forward pass (and prompts per decoding batch)
        device: auto, cpu, cuda, cuda:1, …
        max_length: context window in tokens (default: the model's block size)
        max_gen_toks: tokens to generate when a task does not say
        verify: check the checkpoint's tokenizer (and a Hugging Face folder against transformers)
        seed: seeds sampled generations (``do_sample`` with a temperature): each batch draws with its own
            generator, seeded in turn from this one, so a run is reproducible and its batches' draws independent
        lm: a loaded :class:`lmlab.api.LM` instead of ``pretrained``
    """

    def __init__(
        self,
        pretrained: str | Path | None = None,
        batch_size: int | str = 8,
        device: str = "auto",
        max_length: int | None = None,
        max_gen_toks: int = 256,
        verify: bool = True,
        seed: int = 1234,
        lm: LM | None = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(unused) - {"max_batch_size"})  # lm-eval passes max_batch_size (for batch_size=auto)
        if unknown:
            raise LmlabError(
                f"unknown model argument(s) {', '.join(unknown)}: the lmlab model type takes pretrained, batch_size, "
                "device, max_length, max_gen_toks, verify and seed"
            )
        if (pretrained is None) == (lm is None):
            raise LmlabError("the lmlab model type needs pretrained=FOLDER (a checkpoint, run or HF folder)")
        self.lm = lm if lm is not None else load(pretrained, device=device, verify=verify)
        if self.lm.model.config.arch == "encoder":
            raise LmlabError(f"{self.lm.path}: an encoder (BERT style) has no language model to score or generate")
        self.tokenizer = self.lm.tokenizer
        self.backend = "seq2seq" if self.lm.is_seq2seq else "causal"
        self._batch_size = _positive_batch_size(batch_size)
        self._max_length = int(max_length) if max_length else self.lm.block_size
        if not 0 < self._max_length <= self.lm.block_size:
            raise LmlabError(
                f"max_length {max_length}: expected 1 to {self.lm.block_size} (the model's context window)",
                params="max_length",
            )
        self._max_gen_toks = int(max_gen_toks)
        if isinstance(seed, bool) or not str(seed).lstrip("-").isdigit():
            raise LmlabError(f"seed {seed!r}: expected an integer", params="seed")
        self._seeds = random.Random(int(seed))  # one seed per sampled batch

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None):
        """lm-eval's constructor from ``--model_args`` and its own flags (``--batch_size``, ``--device``):
        a setting in ``--model_args`` wins (lm-eval's ``hf`` model would take it twice and fail)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        if str(extra.get("device", "")).startswith("cuda") and not torch.cuda.is_available():
            del extra["device"]  # lm-eval's default, cuda:0, on a machine without one: auto, as its hf model falls back
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # -- what lm-eval asks of a model ----------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_id
        return eos if eos is not None else self.lm._pad_id()

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self.lm.device

    @property
    def tokenizer_name(self) -> str:
        return str(self.lm.path or "lmlab").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of ``string``; the tokenizer's post-processor applies unless ``add_special_tokens`` is False
        (as a transformers tokenizer's ``encode`` does, which lm-eval's ``hf`` model calls)."""
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens is not False)

    # -- log-likelihoods -----------------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False, **kwargs: Any):
        """(log-probability, is greedy) of each request's continuation given its context, in the order given.

        A decoder reads each context once: the requests that share it (the choices of a multiple-choice question)
        are packed into one row, the context followed by each continuation, every continuation attending to the
        context and to itself only (:func:`_pack`); a continuation longer than its context (a rolling window) gains
        nothing from it and has a row of its own. Rows go longest first, ``batch_size`` at a time. An input
        longer than ``max_length`` loses tokens from the left first, as lm-eval's ``hf`` model does."""
        if self.lm.is_seq2seq:
            collator = Collator(requests, sort_fn=lambda r: (-len(r[1]) - len(r[2]), tuple(r[1] + r[2])))
            scored = [a for chunk in collator.get_batched(n=self.batch_size) for a in self._score_seq2seq(chunk)]
            return self._cached(requests, collator.get_original(scored))
        groups: dict[tuple[tuple[int, ...], int], list[int]] = {}
        for i, (_, ctx, cont) in enumerate(requests):
            row = (ctx + cont)[-(self.max_length + 1) :][:-1]
            context = tuple(row[: len(row) - len(cont) + 1])
            alone = -1 if len(cont) <= len(context) else i  # a continuation longer than its context: a row of its own
            groups.setdefault((context, alone), []).append(i)
        packed = {key: _pack(key[0], [requests[i][2] for i in members]) for key, members in groups.items()}
        order = sorted(groups, key=lambda key: (-len(packed[key][0]), key))
        answers: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            for key, logprobs in zip(batch, self._packed_logprobs([packed[key] for key in batch])):
                for i, lp in zip(groups[key], logprobs):
                    answers[i] = _answer(lp, requests[i][2])
        return self._cached(requests, answers)

    def _cached(self, requests: list[Request], answers: list[tuple[float, bool]]) -> list[tuple[float, bool]]:
        for (key, _, _), answer in zip(requests, answers):
            if key is not None:  # rolling windows are cached per text by loglikelihood_rolling
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers

    @torch.inference_mode()
    def _packed_logprobs(self, rows: list[Packed]) -> list[list[torch.Tensor]]:
        """One forward pass over packed rows (right-padded; a padding token sees only itself): per row, per
        continuation, the log-probabilities (its length, vocab) of its tokens; the LM head reads those only."""
        width = max(len(tokens) for tokens, _, _, _ in rows)
        ids = torch.tensor([t + [0] * (width - len(t)) for t, _, _, _ in rows], device=self.device)
        positions = torch.tensor([p + [0] * (width - len(p)) for _, p, _, _ in rows], device=self.device)
        branch = torch.tensor([b + [-2] * (width - len(b)) for _, _, b, _ in rows], device=self.device)
        if all(len(row_reads) == 1 for _, _, _, row_reads in rows):  # nothing shared: plain causal rows, SDPA's
            hidden = self.lm.model(ids, hidden_only=True)  # fast path; right padding is never attended
        else:
            index = torch.arange(width, device=self.device)
            causal = index[None, :] <= index[:, None]  # (T, T): query q sees key k ≤ q …
            visible = (branch[:, None, :] == -1) | (branch[:, None, :] == branch[:, :, None])  # … of context or own
            mask = (causal & visible) | (index[None, :] == index[:, None])
            hidden = self.lm.model(ids, position_ids=positions, attn_mask=mask[:, None], hidden_only=True)
        reads = [(b, r) for b, (_, _, _, row_reads) in enumerate(rows) for r in row_reads]
        picked = torch.cat([hidden[b, r] for b, r in reads])
        logprobs = F.log_softmax(self.lm.model.lm_logits(picked).float(), dim=-1).split([len(r) for _, r in reads])
        out, at = [], 0
        for _, _, _, row_reads in rows:
            out.append(list(logprobs[at : at + len(row_reads)]))
            at += len(row_reads)
        return out

    @torch.inference_mode()
    def _score_seq2seq(self, chunk: Sequence[Request]) -> list[tuple[float, bool]]:
        """An encoder–decoder's batch: the contexts are the sources (padded, masked), each target starts from the
        decoder's start token (as lm-eval's ``seq2seq`` backend does, which lets the model shift its labels)."""
        sources = [ctx[-self.max_length :] for _, ctx, _ in chunk]
        conts = [cont[-self.max_length :] for _, _, cont in chunk]
        start = self.lm.model.config.decoder_start_token_id
        targets = [[start] + c[:-1] for c in conts]
        src, mask = _right_padded(sources, self.lm._pad_id(), self.device)
        tgt, _ = _right_padded(targets, self.lm._pad_id(), self.device)
        hidden = self.lm.model(src, tgt, mask, hidden_only=True)
        picked = torch.cat([hidden[i, : len(c)] for i, c in enumerate(conts)])
        logprobs = F.log_softmax(self.lm.model.lm_head(picked).float(), dim=-1)
        return [_answer(lp, c) for lp, c in zip(logprobs.split([len(c) for c in conts]), conts)]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text: lm-eval's disjoint windows of ``max_length`` tokens (the first
        conditioned on the prefix token), scored together in batches and summed per text."""
        windows, owners = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(text)
            for window in get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1):
                windows.append((None, *make_disjoint_window(window)))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ----------------------------------------------------------------------------------------------

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Each request's continuation, cut before the first of its ``until`` strings: requests grouped by their
        generation options, longest first, decoded ``batch_size`` at a time with lmlab's KV-cached loop."""
        collator = Collator(
            [req.args for req in requests],
            sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
            group_by="gen_kwargs",
            group_fn=lambda r: r[1],
        )
        results = []
        for chunk in collator.get_batched(n=self.batch_size):
            contexts = [context for context, _ in chunk]
            texts = self._generate(contexts, chunk[0][1])
            for (context, options), text in zip(chunk, texts):
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, options), text)
        return collator.get_original(results)

    def _generate(self, contexts: list[str], options: dict) -> list[str]:
        """One batch of same-option requests through :meth:`lmlab.api.LM.complete_ids`."""
        kwargs = normalize_gen_kwargs(dict(options), self._max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tokenizer.decode([self.eot_token_id]))
        new = kwargs.pop("max_gen_toks")
        sample = bool(kwargs.pop("do_sample", False)) and float(kwargs.get("temperature", 0.0) or 0.0) > 0
        config: dict[str, Any] = dict(max_new_tokens=new, stop=[s for s in until if s])
        if sample:
            seed = self._seeds.randrange(2**31)
            config.update(strategy="sample", temperature=float(kwargs["temperature"]), seed=seed)
            config.update({k: kwargs[k] for k in ("top_k", "top_p") if k in kwargs})
        if self.lm.is_seq2seq:
            from lmlab.data.tasks import encode_sources

            ids = encode_sources(self.tokenizer, contexts, self.max_length)
        else:
            room = self.max_length - new
            if room < 1:
                raise LmlabError(f"max_gen_toks {new} leaves no room for a prompt in {self.max_length} tokens")
            ids = [self.tok_encode(c)[-room:] or [self.prefix_token_id] for c in contexts]
        return [row[0].text for row in self.lm.complete_ids(ids, **config)]


# `python -m` runs this file as __main__ too: main() imports it, which registers it. An lm-eval that reads the
# `lm_eval.models` entry point (pyproject) already holds `lmlab` as a placeholder, which resolves to this class.
if __name__ != "__main__" and "lmlab" not in model_registry:
    register_model("lmlab")(LmlabLM)


def _pack(context: tuple[int, ...], conts: list[list[int]]) -> Packed:
    """One row for the continuations ``conts`` of one ``context``: the context's tokens, then each continuation's
    but its last (what predicts the next one), at the positions it would have after the context alone.

    Returns (tokens, position ids, branch: -1 for the context and k for the k-th continuation, and per continuation
    the row indices whose next-token predictions score it: the context's last token, then its own)."""
    tokens, positions, branch = list(context), list(range(len(context))), [-1] * len(context)
    reads = []
    for k, cont in enumerate(conts):
        start, n = len(tokens), len(cont) - 1
        tokens += cont[:-1]
        positions += range(len(context), len(context) + n)
        branch += [k] * n
        reads.append([len(context) - 1, *range(start, start + n)])
    return tokens, positions, branch, reads


def _answer(logprobs: torch.Tensor, cont: list[int]) -> tuple[float, bool]:
    """(the sum of the continuation's log-probabilities, whether each of its tokens is the most likely one)."""
    tokens = torch.tensor(cont, device=logprobs.device)
    chosen = logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    return float(chosen.sum()), bool((logprobs.argmax(-1) == tokens).all())


def _right_padded(rows: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return ids, mask


def task_list(tasks: str | Sequence[str]) -> list[str]:
    """Task names from a comma-separated string or a list."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t and t.strip()]
    if not names:
        raise LmlabError("harness: expected one or more lm-evaluation-harness task names", params="harness")
    return names


def run_harness(
    lm: LM,
    tasks: str | Sequence[str],
    *,
    include: str | Path | None = None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` of ``tasks`` (names, or a comma-separated string) on ``lm``, with the tasks
    of the folder ``include`` besides lm-eval's own: its results as plain JSON (per-example ``samples`` too)."""
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    names = task_list(tasks)
    if include is not None and not Path(include).is_dir():
        raise LmlabError(f"harness_include {include}: not a folder of lm-eval task files", params="harness_include")
    manager = _task_manager(names, include)
    unknown = [n for n in names if not manager.match_tasks([n])]
    if unknown:
        raise LmlabError(
            f"harness task(s) {', '.join(unknown)} not found: expected lm-eval task names, or tasks in the "
            "harness_include folder",
            params="harness harness_include",
        )
    model = LmlabLM(lm=lm, batch_size=batch_size)
    results = simple_evaluate(
        model, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager, log_samples=True
    )
    return json.loads(json.dumps(results, default=handle_non_serializable))


def _task_manager(names: list[str], include: str | Path | None):
    """lm-eval's task index: the ``include`` folder's alone when it holds every task named (indexing lm-eval's
    own thousands of task files takes half a minute), else lm-eval's tasks as well."""
    from lm_eval.tasks import TaskManager

    if include is not None:
        local = TaskManager(include_path=str(include), include_defaults=False)
        if all(local.match_tasks([n]) for n in names):
            return local
    return TaskManager(include_path=str(include) if include is not None else None)


def figures(results: dict[str, Any]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """lm-eval's metrics as ``{"task/metric": value}`` (the filter's name after the metric's unless it is
    ``none``), and a 95% interval for each from lm-eval's standard error (normal approximation)."""
    values, cis = {}, {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, kept = key.partition(",")
            if not kept or "_stderr" in metric or not isinstance(value, (int, float)):
                continue
            name = f"{task}/{metric}" + ("" if kept == "none" else f"/{kept}")
            values[name] = float(value)
            se = metrics.get(f"{metric}_stderr,{kept}")
            if isinstance(se, (int, float)):
                cis[name] = {"low": value - 1.96 * se, "high": value + 1.96 * se}
    return values, cis


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line with the ``lmlab`` model type registered (``python -m lmlab.evaluate.harness``)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    import lmlab.evaluate.harness  # noqa: F401  (registers the lmlab model type)

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
