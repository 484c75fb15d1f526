"""``lmlab VERB``: a thin shell over the Python API.

Each verb's flags come from the signature of the public function it calls (``lmlab evaluate`` from
:func:`lmlab.evaluate`, ``lmlab pretrain`` from :func:`lmlab.pretrain` and :class:`lmlab.TrainConfig`,
``lmlab generate`` from :func:`lmlab.load`, :meth:`lmlab.LM.generate_records` and :class:`lmlab.GenerationConfig`
…): a parameter ``max_length: int = 128`` is the flag ``--max-length``, an int that defaults to 128; a
``verify: bool = True`` is the switch ``--no-verify``. What is written here is the help text (once for the flags
verbs share: ``--device``, ``--no-verify``, ``--overwrite``, ``--no-progress``, the data fields …), the flags
that are the command line's own (``--prompts-file``, ``--format`` …) and how results are printed. A verb is a
``_flags_*`` function, a ``cmd_*`` function whose docstring is its ``--help`` description, and a line of
:data:`VERBS`.

Arguments are parsed by jsonargparse (argparse plus ``--config file.yaml``: a YAML file supplies any
flag by its option name with underscores, e.g. ``max_steps: 2000``, and flags given after it
override it; an unknown key is an error). Usage errors print as one line and exit with code 2;
library errors (:class:`LmlabError`) print as one line and exit with code 1; tracebacks are kept
for bugs.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import os
import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter

import lmlab  # its names are imported on first use: a verb imports what it runs, and `--help` nothing heavy
from lmlab.errors import LmlabError

NO_DEFAULT = inspect.Parameter.empty
POSITIONAL = ("checkpoint",)  # a parameter of these names without a default is positional; others are --flags

# The help of flags several verbs share, written once; a verb may give its own (dest → help).
SHARED = {
    "checkpoint": "checkpoint folder (or run folder: its best checkpoint)",
    "device": "auto, cpu, cuda, cuda:1, …",
    "verify": "a Hugging Face folder: skip the one-time logits check against transformers",
    "overwrite": "write into an existing {} that is not lmlab's own output of this kind: lmlab replaces the files it "
    "writes and deletes nothing else (default: refuse such a folder)",
    "progress": "hide progress bars and messages",
    "resume": "continue the latest checkpoint in --out exactly where it stopped",
    "dry_run": "build and check everything the run would, train nothing, write nothing: print the predicted peak "
    "memory of a training step (parameters, gradients, optimizer state, activations, logits) and, when it does not "
    "fit the budget, what to change",
    "memory_budget": "GiB a training step may use, for --dry-run (default: the GPU's memory; none on a CPU)",
    "input": "text files, folders and globs (.txt .md .jsonl .csv .tsv .parquet)",
    "column": "CSV/TSV/Parquet column holding the text (default: --text-field)",
    "normalize": "Unicode normalisation: NFC, NFKC, NFD or NFKD (default: none)",
    "dedup": "keep exact duplicate documents (default: drop them)",
    "text_field": "the JSONL field (and default CSV/TSV/Parquet column) holding the text",
    "pair_field": "classify: the second text of a pair",
    "label_field": "classify: the label field/column (a name, a list of names, or a number)",
    "source_field": "seq2seq: the source field (records with prompt/completion work too)",
    "target_field": "seq2seq: the target field",
    "group_field": "the group/slice column for per-group metrics",
}
FIELDS = "text_field pair_field label_field source_field target_field"  # the data fields of a task file
CORPUS = "input text_field column normalize dedup"  # read_corpus's options
CRITIQUE_FIELDS = {"text_field": "text", "pair_field": "none", "label_field": "label", "group_field": "group"}
LENS_OPTIONS = {  # critique: each lens's options (dest → help); None lets the lens apply its own default
    "pairs": "bias: a CrowS-Pairs-format CSV (sent_more, sent_less, stereo_antistereo, bias_type) "
    "(default: the built-in set)",
    "swaps": "bias: a JSON of group terms to swap for counterfactuals (default: the built-in lists)",
    "prompts": "safety: extra prompts, one per line, added to the built-in set",
    "harmful": "safety: extra harmful requests, one per line, for the refusal rate",
    "toxicity_classifier": "safety: a local HF sequence-classification folder that scores toxicity "
    "(default: the built-in lexicon, labelled as such)",
    "samples": "safety: sampled continuations per prompt, for the expected maximum toxicity",
    "max_new_tokens": "safety: tokens per continuation or response",
    "canaries": "privacy: the canaries.json `lmlab prepare --canaries` wrote "
    "(default: found in --train-data or the run's data folder)",
    "extraction_prefix": "privacy: tokens of training text given as the prompt",
    "extraction_suffix": "privacy: tokens that must come back verbatim to count as extracted",
    "perturbations": "robustness: comma-separated edits: typos,case,punctuation,contractions,whitespace,names "
    "(default: all)",
    "power_watts": "efficiency: the training hardware's power draw, for the energy estimate "
    "(default: a stated assumption)",
    "grid_intensity": "efficiency: kg CO2e per kWh of the training electricity; the world average is about 0.4",
    "input": "interpret: the text to explain (default: the first test example, or a built-in sentence)",
}
# flag → parameter, where the command line's name is not the function's
LENS_RENAME = {"toxicity_classifier": "classifier", "input": "text"}
PREPARE_RENAME = {"input": "inputs", "out": "out_dir", "progress": "show_progress"}
LOAD_RENAME = {"checkpoint": "path"}


class _Help(DefaultHelpFormatter):
    """jsonargparse's help, minus its "(type: …, default: …)" suffix where our text already names the
    default, and on ``--no-…`` switches, whose stored default (True: the thing is on) would read as if
    the switch itself were on by default."""

    def _get_help_string(self, action) -> str:
        if action.help and ("(default" in action.help or isinstance(action, argparse._StoreFalseAction)):
            return action.help
        return super()._get_help_string(action)


def _parser(description: str | None, config: bool = True) -> ArgumentParser:
    parser = ArgumentParser(description=description, exit_on_error=False, formatter_class=_Help)
    if config:
        help = "YAML file with any of these options (keys use underscores: max_steps: 100)"
        parser.add_argument("--config", action=ActionConfigFile, help=help)
    return parser


# -- flags from signatures -----------------------------------------------------------------------


def _cli_type(annotation: Any) -> Any:
    """The type a flag parses for a parameter's annotation: ``str | Path`` → str, ``int | None`` → Optional[int],
    ``Sequence[int]`` → int (one item of ``nargs``)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    parts = {p.strip(" []") for p in text.replace("[", "|").split("|")}
    base = next((t for t in (bool, int, float) if t.__name__ in parts), str)
    return Optional[base] if "None" in parts and base is not bool else base


def _add(parser: ArgumentParser, dest: str, help: str, annotation: Any, default: Any = NO_DEFAULT, **kw: Any) -> None:
    """The flag of one parameter: a bool is a switch (``--no-x`` when on by default), a parameter without a
    default is required (positional when named in :data:`POSITIONAL`), any other names its default."""
    kind, flag = kw.pop("type", _cli_type(annotation)), "--" + dest.replace("_", "-")
    if default is NO_DEFAULT and dest in POSITIONAL:
        parser.add_argument(dest, help=help, **kw)
    elif kind is bool:
        on = default is True
        names = ("--no-" + flag[2:] if on else flag, *kw.pop("aliases", ()))
        parser.add_argument(*names, dest=dest, action="store_false" if on else "store_true", help=help)
    else:
        if default is NO_DEFAULT:
            default, kw["required"] = None, True
        elif default is not None and "(default" not in help:
            help += f" (default: {default})"
        if "nargs" in kw:  # the type of one item
            kind = next((t for t in (int, float) if t.__name__ in str(kind)), str)
        typed = {} if kind is str else {"type": kind}  # a str is stored as given
        parser.add_argument(flag, dest=dest, default=default, help=help, **typed, **kw)


def _doc_args(fn: Callable) -> dict[str, str]:
    """The ``Args:`` section of ``fn``'s docstring (Google style, as litgpt's and jsonargparse's): name → text."""
    lines, found, name = inspect.getdoc(fn).splitlines() if fn.__doc__ else [], {}, None
    for line in lines[lines.index("Args:") + 1 :] if "Args:" in lines else []:
        if line and not line.startswith(" "):
            break  # the next section
        head, _, text = line.strip().partition(":")
        if line.startswith("    ") and not line.startswith("     ") and head.isidentifier() and text:
            name, found[head] = head, text.strip()
        elif name and line.strip():
            found[name] += " " + line.strip()
    return found


def _flags(parser: ArgumentParser, fn: Callable, helps: dict, shared: str = "", rename: dict | None = None, **kw):
    """One flag per parameter of ``fn`` named in ``helps`` (dest → help) or ``shared`` (names whose help is in
    :data:`SHARED`; ``*`` among them: where ``helps`` go), typed and defaulted as ``fn`` says. A help of None is
    the parameter's text in ``fn``'s docstring (its ``Args:``). ``rename``: dest → parameter where they differ;
    ``kw``: dest → more :func:`_add` options (``required``, ``nargs``, ``what`` the --overwrite help names …)."""
    params, names, documented = inspect.signature(fn).parameters, shared.split(), _doc_args(fn)
    at = names.index("*") if "*" in names else 0  # where the verb's own flags go among the shared ones
    for dest in [*names[:at], *helps, *names[at + ("*" in names) :]]:
        p = params[(rename or {}).get(dest, dest)]
        options = {"default": p.default, **kw.get(dest, {})}
        what = options.pop("what", "--out")
        help = helps.get(dest) or (SHARED[dest].format(what) if dest in SHARED else documented[p.name])
        if options.pop("required", False):
            options["default"] = NO_DEFAULT
        _add(parser, dest, help, p.annotation, **options)


def _dataclass_flags(parser: ArgumentParser, cls: type, skip: Sequence[str] = (), defaults: dict | None = None) -> None:
    """One flag per dataclass field, help from the field's metadata; ``defaults`` replaces some fields' defaults
    (fine-tuning starts from other values than pretraining)."""
    for f in dataclasses.fields(cls):
        if f.name not in skip:
            listed = f.default_factory is not dataclasses.MISSING  # a list field: one or more values
            default = (defaults or {}).get(f.name, f.default_factory() if listed else f.default)
            text = f.metadata.get("help", "")
            help = f"do not: {text}" if default is True else text
            _add(parser, f.name, help, f.type, default, **({"nargs": "+"} if listed else {}))


def _optional(parser: ArgumentParser, helps: dict[str, str], sources: Sequence[Callable], rename: dict) -> None:
    """Flags (dest → help) that default to None, so that the function which takes them (the first of ``sources``
    with such a parameter; ``rename``: dest → parameter) applies its own default, which the help names."""
    for dest, help in helps.items():
        name = rename.get(dest, dest)
        p = next(inspect.signature(fn).parameters[name] for fn in sources if name in inspect.signature(fn).parameters)
        if p.default is not None and "(default" not in help:
            help += f" (default: {p.default})"
        _add(parser, dest, help, f"{p.annotation} | None", None)


def _kwargs(a, fn: Callable, rename: dict | None = None) -> dict[str, Any]:
    """The parsed flags that are parameters of ``fn`` (``rename``: dest → parameter where they differ); never
    ``--config``, the YAML file the flags were read from."""
    params, rename = inspect.signature(fn).parameters, rename or {}
    return {rename.get(k, k): v for k, v in vars(a).items() if rename.get(k, k) in params and k != "config"}


# -- the verbs' flags ----------------------------------------------------------------------------


def _flags_tokenizer(p: ArgumentParser) -> None:
    _flags(p, lmlab.read_corpus, {}, CORPUS, {"input": "inputs"}, input={"nargs": "+"})
    _flags(p, lmlab.train_tokenizer, {
        "kind": "bpe (byte-level), wordpiece or unigram",
        "vocab_size": "vocabulary size including special tokens",
        "min_frequency": "minimum pair/word frequency to enter the vocabulary",
        "special_tokens": "special tokens (default: the kind's own, e.g. <|endoftext|> for bpe)",
    }, special_tokens={"nargs": "+"})
    out = "output folder for tokenizer.json and tokenizer_config.json"
    _flags(p, lmlab.Tokenizer.save, {"out": out}, "overwrite", {"out": "directory"})


def _flags_prepare(p: ArgumentParser) -> None:
    from lmlab.data.canaries import DEFAULTS

    _flags(p, lmlab.prepare, {
        "tokenizer": "folder (or tokenizer.json) of the tokenizer to use",
        "out": "output folder for the shards and manifest.json",
        "valid_fraction": "share of documents held out for validation",
        "seed": "seed of the train/validation split",
    }, CORPUS + " * progress overwrite", PREPARE_RENAME, input={"nargs": "+"})
    canaries = ("plant N random secrets ('canaries') in the training split, for `lmlab critique`'s memorisation "
                "test (The Secret Sharer); they are listed, with as many never-planted ones, in OUT/canaries.json")
    _add(p, "canaries", canaries, "int | None", None)
    for key, help in (("repeats", "copies of each canary in the training split"),
                      ("digits", "digits of each secret: 10^digits possible secrets"),
                      ("template", "the canary sentence; {} is the secret")):
        _add(p, f"canary_{key}", help, type(DEFAULTS[key]).__name__, DEFAULTS[key])


def _flags_pretrain(p: ArgumentParser) -> None:
    _flags(p, lmlab.pretrain, {
        "model": f"model preset: {', '.join(lmlab.PRESETS)}",
        "data": "folder made by `lmlab prepare`",
        "out": "run folder: checkpoints, log.jsonl, loss.png",
        "objective": "training objective: clm (causal LM, decoders), mlm, mlm+nsp or wwm (whole-word mlm) for encoders",
        "init_from": "start from this checkpoint's (or Hugging Face folder's) weights (fresh optimizer)",
        "pad_vocab_multiple": "round the model's vocabulary up to a multiple of this: 64 or 128 make the LM head's "
        "matmuls faster on GPUs (nanoGPT trains GPT-2's 50257 tokens as 50304); the extra rows are never inputs or "
        "targets and generation never emits them",
    }, "resume verify overwrite dry_run memory_budget", data={"required": True}, out={"required": True})
    _add(p, "dropout", "override the preset's dropout", "float | None", None)
    _add(p, "block_size", "override the preset's context length", "int | None", None)
    _dataclass_flags(p, lmlab.TrainConfig)


def _flags_finetune(p: ArgumentParser) -> None:
    from lmlab.train.finetune import FINETUNE_DEFAULTS

    _flags(p, lmlab.finetune, {
        "checkpoint": "the pretrained checkpoint (or run folder) to start from",
        "task": "classify, tag, qa, seq2seq or chat",
        "train": "training file: classify .jsonl/.csv/.tsv, tag CoNLL or .jsonl (tokens, tags), qa SQuAD .json, "
        "seq2seq .jsonl (source, target), chat .jsonl (messages, or prompt and response)",
        "valid": "validation file of the same kind (metrics, best checkpoint)",
        "out": "run folder: checkpoints, best/, log.jsonl, loss.png",
        "max_length": "tokens per example, special tokens included; seq2seq: per source or prompt; "
        "chat: per conversation",
        "max_target_length": "seq2seq: tokens per target, end-of-text included; also the generation length when "
        "scoring",
        "class_weights": "classify: weight classes by inverse frequency (imbalanced data)",
        "patience": "stop after this many evaluations without a better validation metric",
        "show_masking": "chat: print the first training conversation with the trained tokens marked, and exit",
        "pack": "chat: pack several conversations into each --max-length row; each attends only to itself "
        "(less padding, same loss)",
        "lora": "train LoRA adapters (peft) instead of all weights: r=8,alpha=16,dropout=0.05,targets=qkv (targets: "
        "module names such as qkv, proj, attn.proj, mlp.fc, mlp.proj; several as targets=qkv,proj); 'default' for "
        "those defaults",
    }, f"{FIELDS} resume verify overwrite dry_run memory_budget")
    _dataclass_flags(p, lmlab.TrainConfig, skip=("seq_len",), defaults=FINETUNE_DEFAULTS)


def _flags_evaluate(p: ArgumentParser) -> None:
    _flags(p, lmlab.evaluate, {
        "data": "the test file (as for finetune; text files for --task lm)",
        "task": "classify, tag, qa, seq2seq or lm (default: the checkpoint's task; seq2seq for an encoder–decoder; "
        "lm for a plain decoder)",
        "out": "folder for metrics.json and predictions.jsonl",
        "max_length": "tokens per example; seq2seq: per source or prompt",
        "max_target_length": "seq2seq: tokens to generate at most",
        "num_beams": "seq2seq: beam search with this many beams (1: greedy)",
        "batch_size": "examples per forward pass",
        "n_resamples": "bootstrap resamples for the confidence intervals",
    }, f"checkpoint * {FIELDS} device verify overwrite")


def _flags_critique(p: ArgumentParser) -> None:
    _flags(p, lmlab.critique, {
        "out": "folder for report.html and report.json",
        "lenses": f"comma-separated: {','.join(lmlab.critique.LENSES)} (default: all)",
        "data": "a labelled test file of the checkpoint's task (metrics, slices, counterfactuals, robustness)",
        "text": "held-out plain text (a decoder's perplexity and robustness)",
        "train_data": "the training corpus (verbatim extraction, PII scan)",
        "task": "what --data is scored as (default: the checkpoint's task)",
        "max_examples": "examples each lens reads at most (a seeded sample)",
        "seed": "seed of every sample and perturbation",
    }, "checkpoint * device verify progress overwrite")
    for name, usual in CRITIQUE_FIELDS.items():  # None: the task's own name
        _add(p, name, f"--data: {SHARED[name]} (default: {usual})", "str | None", None)
    _optional(p, LENS_OPTIONS, [lmlab.critique.lens_function(name) for name in lmlab.critique.LENSES], LENS_RENAME)


def _flags_export(p: ArgumentParser) -> None:
    _add(p, "format", "hf: a Hugging Face model folder", "str", "hf")
    _flags(p, lmlab.export_hf, {
        "out": "the folder to write (new or empty; written atomically)",
        "lora": "a LoRA checkpoint: merge (adapters folded into the weights) or adapter (a PEFT adapter folder, the "
        "base in OUT/base)",
        "verify": "skip the logits check of the written folder",
    }, "checkpoint")


def _flags_merge_lora(p: ArgumentParser) -> None:
    _flags(p, lmlab.merge_checkpoint, {
        "checkpoint": "a LoRA checkpoint (or run folder: its best checkpoint)",
        "out": "folder for the merged checkpoint (written atomically)",
        "verify": "merge even when the checkpoint's tokenizer.json does not match the tokenizer_sha256 in its "
        "config.json (a warning instead of an error)",
    }, "overwrite", {"checkpoint": "src"})


def _flags_generate(p: ArgumentParser) -> None:
    _flags(p, lmlab.load, {}, "checkpoint device verify", LOAD_RENAME)
    _add(p, "prompt", "one or more prompts", "str | None", None, nargs="+")
    prompts_file = "a UTF-8 file with one prompt per line (or .jsonl with a 'prompt' field)"
    _add(p, "prompts_file", prompts_file, "str | None", None)
    _add(p, "interactive", "a REPL: type a prompt, watch the continuation stream; Ctrl-D or /quit ends", bool, False,
         aliases=("-i",))
    _add(p, "stream", "print tokens as they are made (one prompt)", bool, False)
    formats = "text (prompt + continuation; an encoder–decoder's target alone) or jsonl (one object per output)"
    _add(p, "format", formats, "str", "text")
    _add(p, "output", "write the outputs to this file instead of stdout (atomically)", "str | None", None)
    _add(p, "overwrite", SHARED["overwrite"].format("--output file"), bool, False)
    logprobs = "jsonl: " + _doc_args(lmlab.LM.generate_records)["logprobs"]
    _flags(p, lmlab.LM.generate_records, {"logprobs": logprobs, "batch_size": None})
    _dataclass_flags(p, lmlab.GenerationConfig)


def _flags_chat(p: ArgumentParser) -> None:
    from lmlab.chat import ChatSession

    _flags(p, lmlab.load, {}, "checkpoint device verify", LOAD_RENAME)
    _flags(p, ChatSession, {"system": "the system prompt (default: none)"})
    skip = ("stop", "stop_token_ids", "num_return_sequences", "max_length", "truncate")
    _dataclass_flags(p, lmlab.GenerationConfig, skip=skip)
    _add(p, "stop", "also end a reply at these strings (the end-of-turn marker always ends it)", "str", [], nargs="+")


def _flags_info(p: ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="preset name or checkpoint folder")
    _flags(p, lmlab.ModelConfig.flops_per_token, {"seq_len": "sequence length for the FLOPs (default: block_size)"})


def _flags_demo(p: ArgumentParser) -> None:
    _flags(p, lmlab.run_demo, {
        "out": "output folder",
        "max_steps": "pretraining steps",
        "model": "model preset",
        "max_chars": "characters of the embedded corpus to use",
        "vocab_size": "tokenizer vocabulary size",
        "finetune_steps": "fine-tuning steps of the demo classifier",
        "critique_examples": "examples each critique lens reads at most",
    }, "progress overwrite")


# -- the verbs -----------------------------------------------------------------------------------


def cmd_tokenizer(args) -> int:
    """Train a tokenizer with the `tokenizers` library and save tokenizer.json."""
    from lmlab.tokenizer import check_tokenizer_folder

    a = args.train
    check_tokenizer_folder(a.out, a.overwrite)  # before the corpus is read and the tokenizer trained
    texts = lmlab.read_corpus(**_kwargs(a, lmlab.read_corpus, {"input": "inputs"}))
    tok = lmlab.train_tokenizer(texts, show_progress=True, **_kwargs(a, lmlab.train_tokenizer))
    tok.save(a.out, overwrite=a.overwrite)
    print(f"lmlab: {a.kind} tokenizer with {tok.vocab_size:,} tokens written to {Path(a.out) / 'tokenizer.json'}")
    return 0


def cmd_prepare(a) -> int:
    """Tokenize a corpus into memory-mapped token shards (train/valid) with a JSON manifest."""
    canaries = {"n": a.canaries, "repeats": a.canary_repeats, "digits": a.canary_digits, "template": a.canary_template}
    kwargs = {**_kwargs(a, lmlab.prepare, PREPARE_RENAME), "canaries": None if a.canaries is None else canaries}
    manifest = lmlab.prepare(**kwargs)
    splits = manifest["splits"].items()
    splits = ", ".join(f"{k}: {s['tokens']:,} tokens in {s['documents']:,} documents" for k, s in splits)
    print(f"lmlab: {a.out} {manifest['_status']} — {splits}")
    return 0


def _report_run(result, dry_run: bool) -> bool:
    """Print a dry run's prediction; True when there is nothing more to report (a dry run, or a rank other than 0)."""
    if dry_run:
        print(result.report())
    return dry_run or os.environ.get("RANK", "0") != "0"  # under torchrun, rank 0 reports


def _checkpoints(result) -> str:
    best = f", best {result.best_checkpoint}" if result.best_checkpoint else ""
    return f"lmlab: last checkpoint {result.last_checkpoint}{best}"


def cmd_pretrain(a) -> int:
    """Pretrain a model on a prepared data folder. Every training option is also a key of --config."""
    overrides = {k: v for k, v in (("dropout", a.dropout), ("block_size", a.block_size)) if v is not None}
    result = lmlab.pretrain(**_kwargs(a, lmlab.pretrain), **_kwargs(a, lmlab.TrainConfig), model_overrides=overrides)
    if _report_run(result, a.dry_run):
        return 0
    if result.val_loss is not None:
        print(f"lmlab: step {result.step}, validation loss {result.val_loss:.4f}")
    print(_checkpoints(result))
    print(f"lmlab: log {result.log_file}, loss curve {Path(result.log_file).with_name('loss.png')}")
    return 0


def cmd_finetune(a) -> int:
    """Fine-tune a checkpoint on a labelled task: classify (text or text pair → label(s)), tag (a label per word),
    qa (extractive answer spans), seq2seq or chat (conversations; the loss on assistant turns only). The task
    metric on --valid (chat: the validation loss) picks best/ and drives --patience."""
    result = lmlab.finetune(**_kwargs(a, lmlab.finetune), **_kwargs(a, lmlab.TrainConfig))
    if a.show_masking or _report_run(result, a.dry_run):
        return 0
    if result.val_scores:
        scores = ", ".join(f"{k} {v:.4f}" for k, v in result.val_scores.items())
        print(f"lmlab: validation {scores}" + (" (stopped early)" if result.stopped_early else ""))
    print(_checkpoints(result))
    return 0


def cmd_evaluate(a) -> int:
    """Evaluate a checkpoint on a labelled file: the task's metrics with bootstrap 95% confidence intervals,
    calibration for classifiers, per-example predictions; --task lm: a decoder's perplexity on text."""
    if a.batch_size < 1 or a.n_resamples < 1 or a.num_beams < 1 or a.max_target_length < 1:
        raise LmlabError("--batch-size, --n-resamples, --num-beams and --max-target-length must be positive integers")
    result = lmlab.evaluate(**_kwargs(a, lmlab.evaluate))
    skip = {"task", "checkpoint", "data", "ci", "per_class", "confusion_matrix", "calibration", "labels", "per_type",
            "num_examples"}
    for name, value in result.items():
        if name in skip or not isinstance(value, (int, float)):
            continue
        ci = result.get("ci", {}).get(name)
        print(f"{name:>16}: {value:.4f}" + (f"  (95% CI {ci['low']:.4f} – {ci['high']:.4f})" if ci else ""))
    if "calibration" in result:
        print(f"{'ECE':>16}: {result['calibration']['ece']:.4f}  (expected calibration error, 10 equal-mass bins)")
    if a.out:
        print(f"lmlab: {Path(a.out) / 'metrics.json'}, {Path(a.out) / 'predictions.jsonl'}")
    return 0


def cmd_critique(a) -> int:
    """Critique a model: a report on performance, interpretability, bias, safety, privacy, robustness and
    efficiency (report.html to read, report.json for scripts). Lenses that lack the data they need are skipped
    with a note saying what to give them."""
    fields = {k: getattr(a, k) for k in CRITIQUE_FIELDS if getattr(a, k) is not None}
    options = {LENS_RENAME.get(k, k): getattr(a, k) for k in LENS_OPTIONS}
    options["perturbations"] = [n.strip() for n in a.perturbations.split(",") if n.strip()] if a.perturbations else None
    options = {k: v for k, v in options.items() if v is not None}
    report = lmlab.critique(**_kwargs(a, lmlab.critique), fields=fields, options=options)
    for name, lens in report["lenses"].items():
        if "skipped" in lens:
            print(f"{name:>12}: skipped — {lens['skipped']}")
            continue
        worst = [f for f in lens["findings"] if f["level"] in ("bad", "warn")]
        summary = "; ".join(f"{f['level']}: {f['text']}" for f in worst[:2]) if worst else "nothing worrying"
        print(f"{name:>12}: {summary}")
    print(f"lmlab: {report['_paths']['html']}  (and report.json)")
    return 0


def cmd_export(a) -> int:
    """Export a checkpoint for the Hugging Face ecosystem (transformers, vLLM, TGI): config.json,
    model.safetensors, the tokenizer and generation_config.json, which transformers' Auto classes load without
    missing or unexpected weights. The folder is loaded back with transformers and its logits compared with
    lmlab's before the export counts as done."""
    if a.format != "hf":
        raise LmlabError(f"--format {a.format!r}: expected hf (GGUF and ONNX are not written yet)")
    out = lmlab.export_hf(**_kwargs(a, lmlab.export_hf))
    print(f"lmlab: exported {out}" + ("" if a.verify else " (not verified)"))
    return 0


def cmd_merge_lora(a) -> int:
    """Fold a LoRA checkpoint's adapters into its base weights: a plain checkpoint, for export and fast inference."""
    out = lmlab.merge_checkpoint(**_kwargs(a, lmlab.merge_checkpoint, {"checkpoint": "src"}))
    print(f"lmlab: merged checkpoint {out}")
    return 0


def _read_prompts(path: Path) -> list[str]:
    """The prompts of ``--prompts-file``: one per non-blank line, or the ``prompt`` field of each JSON Lines object."""
    from lmlab.config import json_line_object

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        why = f"cannot read it ({type(e).__name__}); expected a UTF-8 text file"
        raise LmlabError(f"--prompts-file {path}: {why}") from None
    if path.suffix != ".jsonl":
        return [line for line in lines if line.strip()]
    records = [(n, json_line_object(path, n, line)) for n, line in enumerate(lines, 1) if line.strip()]
    for number, record in records:
        if not isinstance(record.get("prompt"), str):
            raise LmlabError(f"--prompts-file {path}:{number}: expected an object with a string field 'prompt'")
    return [record["prompt"] for _, record in records]


def _stream(lm, prompt: str, config, out) -> None:
    out.write("" if lm.is_seq2seq else prompt)  # an encoder–decoder's output is no continuation: the target alone
    for piece in lm.stream(prompt, config):
        out.write(piece)
        out.flush()
    out.write("\n")


def _interactive(lm, config) -> int:
    print(f"lmlab: {lm!r}; {config.strategy} decoding, {config.max_new_tokens} new tokens. "
          "Type a prompt; Ctrl-D or /quit ends.", file=sys.stderr)
    while True:
        try:
            prompt = input("» ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if prompt.strip() in ("/quit", "/exit"):
            return 0
        if not prompt.strip():
            continue
        try:
            _stream(lm, prompt, config, sys.stdout)
        except LmlabError as e:  # a bad prompt ends that turn, not the session
            print(f"\nlmlab: error: {e}", file=sys.stderr)


def _check_generate(a, prompts: list[str]) -> None:
    """The generate flags that do not fit together: one-line errors before the model loads."""
    if not prompts and not a.interactive:
        raise LmlabError("no prompt: give --prompt TEXT, --prompts-file FILE or --interactive")
    if a.format not in ("text", "jsonl"):
        raise LmlabError(f"--format is '{a.format}': expected text or jsonl")
    if a.logprobs is not None and (a.logprobs < 0 or a.format != "jsonl"):
        raise LmlabError("--logprobs N needs --format jsonl and N ≥ 0")
    if a.batch_size < 1:
        raise LmlabError(f"--batch-size is {a.batch_size}: expected a positive integer")
    if a.stream and (len(prompts) != 1 or a.format != "text" or a.output):
        raise LmlabError(
            "--stream prints one prompt's text as it is made: give one --prompt, --format text and no --output"
        )
    if a.output:
        from lmlab.io.outputs import check_output_file

        check_output_file(a.output, overwrite=a.overwrite)


def cmd_generate(a) -> int:
    """Generate text from a checkpoint: greedy, sampling (temperature, top-k, top-p, min-p, typical-p) or beam
    search, with penalties and stop strings. A prompt longer than the context window keeps its last tokens (a
    warning says so) unless --truncate error."""
    from lmlab.config import write_text_atomic

    config = lmlab.GenerationConfig(**_kwargs(a, lmlab.GenerationConfig))
    prompts = list(a.prompt or []) + (_read_prompts(Path(a.prompts_file)) if a.prompts_file else [])
    _check_generate(a, prompts)
    lm = lmlab.load(**_kwargs(a, lmlab.load, LOAD_RENAME))
    if a.interactive:
        return _interactive(lm, config)
    if a.stream:
        _stream(lm, prompts[0], config, sys.stdout)
        return 0
    records = lm.generate_records(prompts, config, batch_size=a.batch_size, logprobs=a.logprobs)
    if a.format == "jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    else:
        text = "\n\n".join(("" if lm.is_seq2seq else r["prompt"]) + r["completion"] for r in records) + "\n"
    if a.output:
        write_text_atomic(a.output, text)
        print(f"lmlab: {len(records)} output(s) written to {a.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def cmd_chat(a) -> int:
    """Chat with a decoder: each turn renders the conversation with the checkpoint's chat template (lmlab's default
    when it has none) and streams the reply until the end-of-turn marker. /reset clears the history, /system TEXT
    sets the system prompt, /quit or Ctrl-D ends. When the conversation outgrows the context window its oldest
    turns are dropped."""
    from lmlab.chat import ChatSession, repl

    config = lmlab.GenerationConfig(**_kwargs(a, lmlab.GenerationConfig))
    return repl(ChatSession(lmlab.load(**_kwargs(a, lmlab.load, LOAD_RENAME)), system=a.system, config=config))


def cmd_info(a) -> int:
    """Parameter count and FLOPs per token of a preset or a checkpoint (all presets when none is named)."""
    from lmlab.io.checkpoint import load_config, resolve_checkpoint

    if a.seq_len is not None and a.seq_len < 1:
        raise LmlabError(f"--seq-len is {a.seq_len}: expected a positive number of tokens")
    if a.model is None:
        configs = [lmlab.preset(name) for name in lmlab.PRESETS]
    elif a.model in lmlab.PRESETS:
        configs = [lmlab.preset(a.model)]
    else:
        configs = [load_config(resolve_checkpoint(a.model))]
    print(f"{'model':<12} {'layers':>6} {'d_model':>7} {'heads':>8} {'params':>14} {'non-emb':>14} {'GFLOPs/tok':>10}")
    for c in configs:
        heads = f"{c.n_head}/{c.n_kv_heads}" if c.n_kv_heads != c.n_head else str(c.n_head)
        print(
            f"{c.name or 'custom':<12} {c.n_layer:>6} {c.n_embd:>7} {heads:>8} {c.num_params():>14,} "
            f"{c.num_params(include_embeddings=False):>14,} {c.flops_per_token(a.seq_len) / 1e9:>10.3f}"
        )
    print("GFLOPs/tok: one training step (forward + backward) per token, 6·N + 12·L·d·T (nanoGPT / PaLM).")
    return 0


def cmd_demo(a) -> int:
    """Run the whole pipeline on the embedded corpus (Python's own documentation), offline."""
    lmlab.run_demo(**_kwargs(a, lmlab.run_demo))
    return 0


class Verb(NamedTuple):
    summary: str  # its line in `lmlab --help`; the description of `lmlab VERB --help` is run's docstring
    flags: Callable[[ArgumentParser], None]
    run: Callable[[Any], int]


VERBS = {
    "tokenizer": Verb("train a tokenizer (BPE, WordPiece, Unigram)", _flags_tokenizer, cmd_tokenizer),
    "prepare": Verb("tokenize and pack a corpus into token shards", _flags_prepare, cmd_prepare),
    "pretrain": Verb("pretrain a model (causal LM, masked LM, next-sentence prediction)", _flags_pretrain,
                     cmd_pretrain),
    "finetune": Verb("fine-tune on classify, tag, qa, seq2seq or chat", _flags_finetune, cmd_finetune),
    "evaluate": Verb("task metrics with confidence intervals, or perplexity", _flags_evaluate, cmd_evaluate),
    "critique": Verb("a report on a model: performance, interpretability, bias, safety, privacy, robustness, "
                     "efficiency", _flags_critique, cmd_critique),
    "export": Verb("export a checkpoint as a Hugging Face folder (checked by logits parity)", _flags_export,
                   cmd_export),
    "merge-lora": Verb("merge LoRA adapters into the base weights", _flags_merge_lora, cmd_merge_lora),
    "generate": Verb("generate text from a checkpoint (all decoding strategies, streaming, REPL)", _flags_generate,
                     cmd_generate),
    "chat": Verb("chat with a model: a multi-turn REPL with streaming", _flags_chat, cmd_chat),
    "info": Verb("model sizes: parameters and FLOPs per token", _flags_info, cmd_info),
    "demo": Verb("the end-to-end demo: corpus → tokenizer → pretrain → generate → fine-tune → evaluate", _flags_demo,
                 cmd_demo),
}


def build_parser(only: str | None = None) -> ArgumentParser:
    """The parser of every verb; ``only``: the flags of that verb alone (the others list their names and
    summaries), so that a command imports no more of lmlab than it runs."""
    description = "Train, generate, evaluate and critique Transformer language models."
    root = ArgumentParser(prog="lmlab", description=description, exit_on_error=False, formatter_class=_Help)
    commands = root.add_subcommands(dest="command", required=True)
    for name, verb in VERBS.items():
        parser = _parser(inspect.getdoc(verb.run))
        if name == "tokenizer":  # a second level, `lmlab tokenizer train` (jsonargparse adds levels after the first)
            parser, train = _parser("Tokenizer commands.", config=False), parser
            commands.add_subcommand(name, parser, help=verb.summary)
            actions = parser.add_subcommands(dest="action", required=True)
            actions.add_subcommand("train", train, help="train a tokenizer on a corpus")
        else:
            commands.add_subcommand(name, parser, help=verb.summary)
        if only in (None, name):
            verb.flags(train if name == "tokenizer" else parser)
    return root


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"lmlab: {record.levelname.lower()}: {record.getMessage()}"


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (a redirected or captured one included), not to
    the stream that was current when the handler was made."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _log_warnings_as_one_line() -> None:
    """Library warnings (``logging``) reach the terminal as ``lmlab: warning: …``."""
    root = logging.getLogger("lmlab")
    if not any(getattr(h, "_lmlab", False) for h in root.handlers):
        handler = _Stderr()
        handler.setFormatter(_OneLine())
        handler._lmlab = True
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
        root.propagate = False


def _config_files(argv: Sequence[str]) -> list[str]:
    """The files given to ``--config`` (``--config FILE`` or ``--config=FILE``)."""
    files = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    return files + [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]


def _check_config_files(argv: Sequence[str]) -> None:
    """A ``--config`` file that is not UTF-8 text: one line naming it, before the parser reads it."""
    for name in _config_files(argv):
        path = Path(name)
        if path.is_file():
            try:
                path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError) as e:
                why = f"not a readable UTF-8 YAML file ({type(e).__name__})"
                raise ArgumentError(None, f"--config {name}: {why}") from None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(argv) if argv is not None else sys.argv[1:]
    _log_warnings_as_one_line()
    try:
        _check_config_files(argv)
        args = build_parser(only=argv[0] if argv and argv[0] in VERBS else None).parse_args(argv)
    except ArgumentError as e:
        # one line: what was wrong, and where the options are listed
        verb = " ".join(a for a in argv[:2] if not a.startswith("-") and a in ("tokenizer", "train", *VERBS))
        message = " ".join(line.strip() for line in str(e).splitlines())
        print(f"lmlab: error: {message} (see `lmlab {verb + ' ' if verb else ''}--help`)", file=sys.stderr)
        return 2
    try:
        return VERBS[args.command].run(args[args.command])
    except LmlabError as e:
        print(f"lmlab: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lmlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
