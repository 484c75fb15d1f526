"""``lmlab VERB``: a thin shell over the Python API.

Arguments are parsed by jsonargparse (argparse plus ``--config file.yaml``: a YAML file supplies any
flag by its option name with underscores, e.g. ``max_steps: 2000``, and flags given after it
override it; an unknown key is an error). Usage errors print as one line and exit with code 2;
library errors (:class:`LmlabError`) print as one line and exit with code 1; tracebacks are kept
for bugs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Optional, Sequence, get_type_hints

from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter

from lmlab.errors import LmlabError


class _Help(DefaultHelpFormatter):
    """jsonargparse's help, minus its "(type: …, default: …)" suffix where our text already names the
    default, and on ``--no-…`` switches, whose stored default (True: the thing is on) would read as if
    the switch itself were on by default."""

    def _get_help_string(self, action) -> str:
        if action.help and ("(default" in action.help or isinstance(action, argparse._StoreFalseAction)):
            return action.help
        return super()._get_help_string(action)


def _parser(description: str) -> ArgumentParser:
    parser = ArgumentParser(description=description, exit_on_error=False, formatter_class=_Help)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of these options (keys use underscores: max_steps: 100)")
    return parser


def _add_dataclass_flags(parser: ArgumentParser, cls: type, skip: Sequence[str] = (), defaults: dict | None = None) -> None:
    """One flag per dataclass field: ``max_steps`` → ``--max-steps``, help from the field's metadata;
    ``defaults`` replaces some fields' defaults (fine-tuning starts from other values than pretraining)."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = defaults[f.name] if defaults and f.name in defaults else f.default
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if hints[f.name] is bool:
            if default:
                parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false", help=f"do not: {help_text}")
            else:
                parser.add_argument(flag, dest=f.name, action="store_true", help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=hints[f.name], default=default, help=f"{help_text} (default: {default})")


def _input_flags(parser: ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, help="text files, folders and globs (.txt .md .jsonl .csv .tsv .parquet)")
    parser.add_argument("--text-field", default="text", help="JSONL field (and default CSV/Parquet column) holding the text (default: text)")
    parser.add_argument("--column", type=Optional[str], default=None, help="CSV/TSV/Parquet column holding the text (default: --text-field)")
    parser.add_argument("--normalize", type=Optional[str], default=None, help="Unicode normalisation: NFC, NFKC, NFD or NFKD (default: none)")
    parser.add_argument("--no-dedup", dest="dedup", action="store_false", help="keep exact duplicate documents (default: drop them)")


def _overwrite_flag(parser: ArgumentParser, what: str = "--out") -> None:
    parser.add_argument(
        "--overwrite", action="store_true",
        help=f"write into an existing {what} that is not lmlab's own output of this kind: lmlab replaces the files it writes "
        "and deletes nothing else (default: refuse such a folder)",
    )


def _memory_flags(parser: ArgumentParser) -> None:
    parser.add_argument(
        "--dry-run", action="store_true",
        help="build and check everything the run would, train nothing, write nothing: print the predicted peak memory "
        "of a training step (parameters, gradients, optimizer state, activations, logits) and, when it does not fit "
        "the budget, what to change",
    )
    parser.add_argument(
        "--memory-budget", type=Optional[float], default=None,
        help="GiB a training step may use, for --dry-run (default: the GPU's memory; none on a CPU)",
    )


def build_parser() -> ArgumentParser:
    from lmlab.config import PRESETS
    from lmlab.generate import GenerationConfig
    from lmlab.train.loop import TrainConfig

    root = ArgumentParser(
        prog="lmlab", description="Train, generate, evaluate and critique Transformer language models.", exit_on_error=False, formatter_class=_Help
    )
    commands = root.add_subcommands(dest="command", required=True)

    # -- tokenizer train --------------------------------------------------------------------
    tokenizer = ArgumentParser(description="Tokenizer commands.", exit_on_error=False, formatter_class=_Help)
    commands.add_subcommand("tokenizer", tokenizer, help="train a tokenizer (BPE, WordPiece, Unigram)")

    prepare = _parser("Tokenize a corpus into memory-mapped token shards (train/valid) with a JSON manifest.")
    _input_flags(prepare)
    prepare.add_argument("--tokenizer", required=True, help="folder (or tokenizer.json) of the tokenizer to use")
    prepare.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
    prepare.add_argument("--valid-fraction", type=float, default=0.05, help="share of documents held out for validation (default: 0.05)")
    prepare.add_argument("--seed", type=int, default=0, help="seed of the train/validation split (default: 0)")
    prepare.add_argument(
        "--canaries", type=Optional[int], default=None,
        help="plant N random secrets ('canaries') in the training split, for `lmlab critique`'s memorisation test "
        "(The Secret Sharer); they are listed, with as many never-planted ones, in OUT/canaries.json",
    )
    prepare.add_argument("--canary-repeats", type=int, default=50, help="copies of each canary in the training split (default: 50)")
    prepare.add_argument("--canary-digits", type=int, default=6, help="digits of each secret: 10^digits possible secrets (default: 6)")
    prepare.add_argument("--canary-template", default="the secret code is {}", help="the canary sentence; {} is the secret (default: 'the secret code is {}')")
    prepare.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    _overwrite_flag(prepare)
    commands.add_subcommand("prepare", prepare, help="tokenize and pack a corpus into token shards")

    pretrain = _parser("Pretrain a model on a prepared data folder. Every training option is also a key of --config.")
    pretrain.add_argument("--model", default="gpt2-tiny", help=f"model preset: {', '.join(PRESETS)} (default: gpt2-tiny)")
    pretrain.add_argument("--data", required=True, help="folder made by `lmlab prepare`")
    pretrain.add_argument("--out", required=True, help="run folder: checkpoints, log.jsonl, loss.png")
    pretrain.add_argument("--objective", default="clm", help="training objective: clm (causal LM, decoders), mlm, mlm+nsp or wwm (whole-word mlm) for encoders (default: clm)")
    pretrain.add_argument("--resume", action="store_true", help="continue the latest checkpoint in --out exactly where it stopped")
    pretrain.add_argument("--init-from", type=Optional[str], default=None, help="start from this checkpoint's (or Hugging Face folder's) weights (fresh optimizer)")
    pretrain.add_argument("--no-verify", dest="verify", action="store_false", help="a Hugging Face folder: skip the one-time logits check against transformers")
    pretrain.add_argument("--dropout", type=Optional[float], default=None, help="override the preset's dropout")
    pretrain.add_argument("--block-size", type=Optional[int], default=None, help="override the preset's context length")
    pretrain.add_argument(
        "--pad-vocab-multiple", type=int, default=1,
        help="round the model's vocabulary up to a multiple of this: 64 or 128 make the LM head's matmuls faster on GPUs "
        "(nanoGPT trains GPT-2's 50257 tokens as 50304); the extra rows are never inputs or targets and generation never "
        "emits them (default: 1, no padding)",
    )
    _add_dataclass_flags(pretrain, TrainConfig)
    _overwrite_flag(pretrain)
    _memory_flags(pretrain)
    commands.add_subcommand("pretrain", pretrain, help="pretrain a model (causal LM, masked LM, next-sentence prediction)")

    finetune = _parser(
        "Fine-tune a checkpoint on a labelled task: classify (text or text pair → label(s)), tag (a label per word), "
        "qa (extractive answer spans), seq2seq or chat (conversations; the loss on assistant turns only). The task metric "
        "on --valid (chat: the validation loss) picks best/ and drives --patience."
    )
    finetune.add_argument("checkpoint", help="the pretrained checkpoint (or run folder) to start from")
    finetune.add_argument("--task", required=True, help="classify, tag, qa, seq2seq or chat")
    finetune.add_argument(
        "--train", required=True,
        help="training file: classify .jsonl/.csv/.tsv, tag CoNLL or .jsonl (tokens, tags), qa SQuAD .json, seq2seq .jsonl (source, target), chat .jsonl (messages, or prompt and response)",
    )
    finetune.add_argument("--valid", type=Optional[str], default=None, help="validation file of the same kind (metrics, best checkpoint)")
    finetune.add_argument("--out", required=True, help="run folder: checkpoints, best/, log.jsonl, loss.png")
    finetune.add_argument("--max-length", type=int, default=128, help="tokens per example, special tokens included; seq2seq: per source or prompt; chat: per conversation (default: 128)")
    finetune.add_argument("--max-target-length", type=int, default=128, help="seq2seq: tokens per target, end-of-text included; also the generation length when scoring (default: 128)")
    finetune.add_argument("--source-field", default="source", help="seq2seq: the source field (records with prompt/completion work too) (default: source)")
    finetune.add_argument("--target-field", default="target", help="seq2seq: the target field (default: target)")
    finetune.add_argument("--text-field", default="text", help="classify: the text field/column (default: text)")
    finetune.add_argument("--pair-field", type=Optional[str], default=None, help="classify: the second text of a pair (default: none)")
    finetune.add_argument("--label-field", default="label", help="classify: the label field/column (a name, a list of names, or a number) (default: label)")
    finetune.add_argument("--class-weights", action="store_true", help="classify: weight classes by inverse frequency (imbalanced data)")
    finetune.add_argument("--patience", type=Optional[int], default=None, help="stop after this many evaluations without a better validation metric")
    finetune.add_argument("--resume", action="store_true", help="continue the latest checkpoint in --out exactly where it stopped")
    finetune.add_argument("--show-masking", action="store_true", help="chat: print the first training conversation with the trained tokens marked, and exit")
    finetune.add_argument("--no-verify", dest="verify", action="store_false", help="a Hugging Face folder: skip the one-time logits check against transformers")
    finetune.add_argument("--pack", action="store_true", help="chat: pack several conversations into each --max-length row; each attends only to itself (less padding, same loss)")
    finetune.add_argument(
        "--lora", type=Optional[str], default=None,
        help="train LoRA adapters (peft) instead of all weights: r=8,alpha=16,dropout=0.05,targets=qkv (targets: module "
        "names such as qkv, proj, attn.proj, mlp.fc, mlp.proj; several as targets=qkv,proj); 'default' for those defaults",
    )
    from lmlab.train.finetune import FINETUNE_DEFAULTS

    _add_dataclass_flags(finetune, TrainConfig, skip=("seq_len",), defaults=FINETUNE_DEFAULTS)
    _overwrite_flag(finetune)
    _memory_flags(finetune)
    commands.add_subcommand("finetune", finetune, help="fine-tune on classify, tag, qa, seq2seq or chat")

    evaluate = _parser(
        "Evaluate a checkpoint on a labelled file: the task's metrics with bootstrap 95% confidence intervals, "
        "calibration for classifiers, per-example predictions; --task lm: a decoder's perplexity on text."
    )
    evaluate.add_argument("checkpoint", help="checkpoint folder (or run folder: its best checkpoint)")
    evaluate.add_argument("--data", required=True, help="the test file (as for finetune; text files for --task lm)")
    evaluate.add_argument(
        "--task", type=Optional[str], default=None,
        help="classify, tag, qa, seq2seq or lm (default: the checkpoint's task; seq2seq for an encoder–decoder; lm for a plain decoder)",
    )
    evaluate.add_argument("--out", type=Optional[str], default=None, help="folder for metrics.json and predictions.jsonl")
    evaluate.add_argument("--max-length", type=int, default=128, help="tokens per example; seq2seq: per source or prompt (default: 128)")
    evaluate.add_argument("--max-target-length", type=int, default=128, help="seq2seq: tokens to generate at most (default: 128)")
    evaluate.add_argument("--num-beams", type=int, default=1, help="seq2seq: beam search with this many beams (default: 1, greedy)")
    evaluate.add_argument("--source-field", default="source", help="seq2seq: the source field (default: source)")
    evaluate.add_argument("--target-field", default="target", help="seq2seq: the target field (default: target)")
    evaluate.add_argument("--batch-size", type=int, default=32, help="examples per forward pass (default: 32)")
    evaluate.add_argument("--n-resamples", type=int, default=1000, help="bootstrap resamples for the confidence intervals (default: 1000)")
    evaluate.add_argument("--text-field", default="text", help="the text field/column (default: text)")
    evaluate.add_argument("--pair-field", type=Optional[str], default=None, help="classify: the second text of a pair")
    evaluate.add_argument("--label-field", default="label", help="classify: the label field/column (default: label)")
    evaluate.add_argument("--device", default="cpu", help="cpu, cuda (default: cpu)")
    evaluate.add_argument("--no-verify", dest="verify", action="store_false", help="a Hugging Face folder: skip the one-time logits check against transformers")
    _overwrite_flag(evaluate)
    commands.add_subcommand("evaluate", evaluate, help="task metrics with confidence intervals, or perplexity")

    crit = _parser(
        "Critique a model: a report on performance, interpretability, bias, safety, privacy, robustness and efficiency "
        "(report.html to read, report.json for scripts). Lenses that lack the data they need are skipped with a note "
        "saying what to give them."
    )
    crit.add_argument("checkpoint", help="checkpoint folder (or run folder: its best checkpoint)")
    crit.add_argument("--out", required=True, help="folder for report.html and report.json")
    crit.add_argument("--lenses", default=None, help="comma-separated: performance,interpret,bias,safety,privacy,robustness,efficiency (default: all)")
    crit.add_argument("--data", type=Optional[str], default=None, help="a labelled test file of the checkpoint's task (metrics, slices, counterfactuals, robustness)")
    crit.add_argument("--text", type=Optional[str], default=None, help="held-out plain text (a decoder's perplexity and robustness)")
    crit.add_argument("--train-data", type=Optional[str], default=None, help="the training corpus (verbatim extraction, PII scan)")
    crit.add_argument("--task", type=Optional[str], default=None, help="what --data is scored as (default: the checkpoint's task)")
    crit.add_argument("--text-field", type=Optional[str], default=None, help="--data's text field/column (default: text)")
    crit.add_argument("--pair-field", type=Optional[str], default=None, help="--data's second text of a pair")
    crit.add_argument("--label-field", type=Optional[str], default=None, help="--data's label field (default: label)")
    crit.add_argument("--group-field", type=Optional[str], default=None, help="--data's group/slice column for per-group metrics (default: group)")
    crit.add_argument("--pairs", type=Optional[str], default=None, help="bias: a CrowS-Pairs-format CSV (sent_more, sent_less, stereo_antistereo, bias_type) (default: the built-in set)")
    crit.add_argument("--swaps", type=Optional[str], default=None, help="bias: a JSON of group terms to swap for counterfactuals (default: the built-in lists)")
    crit.add_argument("--prompts", type=Optional[str], default=None, help="safety: extra prompts, one per line, added to the built-in set")
    crit.add_argument("--harmful", type=Optional[str], default=None, help="safety: extra harmful requests, one per line, for the refusal rate")
    crit.add_argument("--toxicity-classifier", type=Optional[str], default=None, help="safety: a local HF sequence-classification folder that scores toxicity (default: the built-in lexicon, labelled as such)")
    crit.add_argument("--samples", type=Optional[int], default=None, help="safety: sampled continuations per prompt, for the expected maximum toxicity (default: 5)")
    crit.add_argument("--max-new-tokens", type=Optional[int], default=None, help="safety: tokens per continuation or response (default: 40)")
    crit.add_argument("--canaries", type=Optional[str], default=None, help="privacy: the canaries.json `lmlab prepare --canaries` wrote (default: found in --train-data or the run's data folder)")
    crit.add_argument("--extraction-prefix", type=Optional[int], default=None, help="privacy: tokens of training text given as the prompt (default: 32)")
    crit.add_argument("--extraction-suffix", type=Optional[int], default=None, help="privacy: tokens that must come back verbatim to count as extracted (default: 32)")
    crit.add_argument("--perturbations", default=None, help="robustness: comma-separated edits: typos,case,punctuation,contractions,whitespace,names (default: all)")
    crit.add_argument("--power-watts", type=Optional[float], default=None, help="efficiency: the training hardware's power draw, for the energy estimate (default: a stated assumption)")
    crit.add_argument("--grid-intensity", type=Optional[float], default=None, help="efficiency: kg CO2e per kWh of the training electricity (default: 0.4, about the world average)")
    crit.add_argument("--input", type=Optional[str], default=None, help="interpret: the text to explain (default: the first test example, or a built-in sentence)")
    crit.add_argument("--max-examples", type=int, default=500, help="examples each lens reads at most (a seeded sample) (default: 500)")
    crit.add_argument("--seed", type=int, default=0, help="seed of every sample and perturbation (default: 0)")
    crit.add_argument("--device", default="cpu", help="cpu, cuda (default: cpu)")
    crit.add_argument("--no-verify", dest="verify", action="store_false", help="a Hugging Face folder: skip the one-time logits check against transformers")
    crit.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress messages")
    _overwrite_flag(crit)
    commands.add_subcommand("critique", crit, help="a report on a model: performance, interpretability, bias, safety, privacy, robustness, efficiency")

    export = _parser(
        "Export a checkpoint for the Hugging Face ecosystem (transformers, vLLM, TGI): config.json, model.safetensors, the tokenizer "
        "and generation_config.json, which transformers' Auto classes load without missing or unexpected weights. The folder is "
        "loaded back with transformers and its logits compared with lmlab's before the export counts as done."
    )
    export.add_argument("checkpoint", help="checkpoint folder (or run folder: its best checkpoint)")
    export.add_argument("--format", default="hf", help="hf: a Hugging Face model folder (default: hf)")
    export.add_argument("--out", required=True, help="the folder to write (new or empty; written atomically)")
    export.add_argument("--lora", default="merge", help="a LoRA checkpoint: merge (adapters folded into the weights) or adapter (a PEFT adapter folder, the base in OUT/base) (default: merge)")
    export.add_argument("--no-verify", dest="verify", action="store_false", help="skip the logits check of the written folder")
    commands.add_subcommand("export", export, help="export a checkpoint as a Hugging Face folder (checked by logits parity)")

    merge = _parser("Fold a LoRA checkpoint's adapters into its base weights: a plain checkpoint, for export and fast inference.")
    merge.add_argument("checkpoint", help="a LoRA checkpoint (or run folder: its best checkpoint)")
    merge.add_argument("--out", required=True, help="folder for the merged checkpoint (written atomically)")
    _overwrite_flag(merge)
    merge.add_argument("--no-verify", dest="verify", action="store_false", help="merge even when the checkpoint's tokenizer.json does not match the tokenizer_sha256 in its config.json (a warning instead of an error)")
    commands.add_subcommand("merge-lora", merge, help="merge LoRA adapters into the base weights")

    generate = _parser(
        "Generate text from a checkpoint: greedy, sampling (temperature, top-k, top-p, min-p, typical-p) or beam "
        "search, with penalties and stop strings. A prompt longer than the context window keeps its last tokens "
        "(a warning says so) unless --truncate error."
    )
    generate.add_argument("checkpoint", help="checkpoint folder (or run folder: its best checkpoint)")
    generate.add_argument("--prompt", nargs="+", default=None, help="one or more prompts")
    generate.add_argument("--prompts-file", type=Optional[str], default=None, help="a UTF-8 file with one prompt per line (or .jsonl with a 'prompt' field)")
    generate.add_argument("--interactive", "-i", action="store_true", help="a REPL: type a prompt, watch the continuation stream; Ctrl-D or /quit ends")
    generate.add_argument("--stream", action="store_true", help="print tokens as they are made (one prompt)")
    generate.add_argument("--format", default="text", help="text (prompt + continuation; an encoder–decoder's target alone) or jsonl (one object per output) (default: text)")
    generate.add_argument("--output", type=Optional[str], default=None, help="write the outputs to this file instead of stdout (atomically)")
    _overwrite_flag(generate, "--output file")
    generate.add_argument("--logprobs", type=Optional[int], default=None, help="jsonl: add each token's log-probability and its N most likely alternatives")
    generate.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default: 8)")
    generate.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    generate.add_argument("--no-verify", dest="verify", action="store_false", help="a Hugging Face folder: skip the one-time logits check against transformers")
    _add_dataclass_flags(generate, GenerationConfig, skip=("stop", "stop_token_ids"))
    generate.add_argument("--stop", nargs="+", default=[], help="stop when the output contains one of these strings; the text is cut before it")
    generate.add_argument("--stop-token-ids", nargs="+", type=int, default=[], help="stop on these token ids (besides the end-of-text ids: the tokenizer's, and the eos_token_id of the folder's generation_config.json)")
    commands.add_subcommand("generate", generate, help="generate text from a checkpoint (all decoding strategies, streaming, REPL)")

    chat = _parser(
        "Chat with a decoder: each turn renders the conversation with the checkpoint's chat template (lmlab's default when it "
        "has none) and streams the reply until the end-of-turn marker. /reset clears the history, /system TEXT sets the "
        "system prompt, /quit or Ctrl-D ends. When the conversation outgrows the context window its oldest turns are dropped."
    )
    chat.add_argument("checkpoint", help="checkpoint folder (or run folder: its best checkpoint)")
    chat.add_argument("--system", type=Optional[str], default=None, help="the system prompt (default: none)")
    chat.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    chat.add_argument("--no-verify", dest="verify", action="store_false", help="a Hugging Face folder: skip the one-time logits check against transformers")
    _add_dataclass_flags(chat, GenerationConfig, skip=("stop", "stop_token_ids", "num_return_sequences", "max_length", "truncate"))
    chat.add_argument("--stop", nargs="+", default=[], help="also end a reply at these strings (the end-of-turn marker always ends it)")
    commands.add_subcommand("chat", chat, help="chat with a model: a multi-turn REPL with streaming")

    info = _parser("Parameter count and FLOPs per token of a preset or a checkpoint (all presets when none is named).")
    info.add_argument("model", nargs="?", default=None, help="preset name or checkpoint folder")
    info.add_argument("--seq-len", type=Optional[int], default=None, help="sequence length for the FLOPs (default: block_size)")
    commands.add_subcommand("info", info, help="model sizes: parameters and FLOPs per token")

    demo = _parser("Run the whole pipeline on the embedded corpus (Python's own documentation), offline.")
    demo.add_argument("--out", default="lmlab-demo", help="output folder (default: lmlab-demo)")
    demo.add_argument("--max-steps", type=int, default=300, help="pretraining steps (default: 300)")
    demo.add_argument("--model", default="gpt2-mini", help="model preset (default: gpt2-mini)")
    demo.add_argument("--max-chars", type=int, default=3_000_000, help="characters of the embedded corpus to use (default: 3,000,000)")
    demo.add_argument("--vocab-size", type=int, default=4096, help="tokenizer vocabulary size (default: 4096)")
    demo.add_argument("--finetune-steps", type=int, default=150, help="fine-tuning steps of the demo classifier (default: 150)")
    demo.add_argument("--critique-examples", type=int, default=200, help="examples each critique lens reads at most (default: 200)")
    demo.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    _overwrite_flag(demo)
    commands.add_subcommand("demo", demo, help="the end-to-end demo: corpus → tokenizer → pretrain → generate → fine-tune → evaluate")

    # second level: `lmlab tokenizer train` (jsonargparse adds nested levels after the first)
    tok_commands = tokenizer.add_subcommands(dest="action", required=True)
    tok_train = _parser("Train a tokenizer with the `tokenizers` library and save tokenizer.json.")
    _input_flags(tok_train)
    tok_train.add_argument("--kind", default="bpe", help="bpe (byte-level), wordpiece or unigram (default: bpe)")
    tok_train.add_argument("--vocab-size", type=int, default=8000, help="vocabulary size including special tokens (default: 8000)")
    tok_train.add_argument("--min-frequency", type=int, default=2, help="minimum pair/word frequency to enter the vocabulary (default: 2)")
    tok_train.add_argument("--special-tokens", nargs="+", default=None, help="special tokens (default: the kind's own, e.g. <|endoftext|> for bpe)")
    tok_train.add_argument("--out", required=True, help="output folder for tokenizer.json and tokenizer_config.json")
    _overwrite_flag(tok_train)
    tok_commands.add_subcommand("train", tok_train, help="train a tokenizer on a corpus")
    return root


# -- commands ------------------------------------------------------------------------------------


def cmd_tokenizer(args) -> int:
    from lmlab.data import read_corpus
    from lmlab.tokenizer import check_tokenizer_folder, train_tokenizer

    a = args.train
    check_tokenizer_folder(a.out, a.overwrite)  # before the corpus is read and the tokenizer trained
    texts = read_corpus(a.input, text_field=a.text_field, column=a.column, normalize=a.normalize, dedup=a.dedup)
    tok = train_tokenizer(texts, kind=a.kind, vocab_size=a.vocab_size, min_frequency=a.min_frequency, special_tokens=a.special_tokens, show_progress=True)
    tok.save(a.out, overwrite=a.overwrite)
    print(f"lmlab: {a.kind} tokenizer with {tok.vocab_size:,} tokens written to {Path(a.out) / 'tokenizer.json'}")
    return 0


def cmd_prepare(a) -> int:
    from lmlab.data.pack import prepare

    manifest = prepare(
        a.input, a.tokenizer, a.out, valid_fraction=a.valid_fraction, seed=a.seed, text_field=a.text_field,
        column=a.column, normalize=a.normalize, dedup=a.dedup, show_progress=a.progress, overwrite=a.overwrite,
        canaries=None if a.canaries is None else {"n": a.canaries, "repeats": a.canary_repeats, "digits": a.canary_digits, "template": a.canary_template},
    )
    splits = ", ".join(f"{name}: {s['tokens']:,} tokens in {s['documents']:,} documents" for name, s in manifest["splits"].items())
    print(f"lmlab: {a.out} {manifest['_status']} — {splits}")
    return 0


def cmd_pretrain(a) -> int:
    from lmlab.train.loop import TrainConfig
    from lmlab.train.pretrain import pretrain

    train_args = {f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig)}
    overrides = {k: v for k, v in (("dropout", a.dropout), ("block_size", a.block_size)) if v is not None}
    result = pretrain(
        a.model, a.data, a.out, objective=a.objective, resume=a.resume, init_from=a.init_from, model_overrides=overrides,
        pad_vocab_multiple=a.pad_vocab_multiple, verify=a.verify,
        dry_run=a.dry_run, memory_budget=a.memory_budget, overwrite=a.overwrite, **train_args,
    )
    if a.dry_run:
        print(result.report())
        return 0
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun, rank 0 reports
    if result.val_loss is not None:
        print(f"lmlab: step {result.step}, validation loss {result.val_loss:.4f}")
    print(f"lmlab: last checkpoint {result.last_checkpoint}" + (f", best {result.best_checkpoint}" if result.best_checkpoint else ""))
    print(f"lmlab: log {result.log_file}, loss curve {Path(result.log_file).with_name('loss.png')}")
    return 0


def _read_prompts(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LmlabError(f"--prompts-file {path}: cannot read it ({e.__class__.__name__}); expected a UTF-8 text file") from None
    if path.suffix != ".jsonl":
        return [line for line in lines if line.strip()]
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LmlabError(f"--prompts-file {path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise LmlabError(f"--prompts-file {path}:{number}: expected an object with a string field 'prompt'")
        prompts.append(record["prompt"])
    return prompts


def _stream(lm, prompt: str, config, out) -> None:
    for piece in lm.stream(prompt, config):
        out.write(piece)
        out.flush()
    out.write("\n")


def _interactive(lm, config) -> int:
    print(f"lmlab: {lm!r}; {config.strategy} decoding, {config.max_new_tokens} new tokens. Type a prompt; Ctrl-D or /quit ends.", file=sys.stderr)
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
            sys.stdout.write("" if lm.is_seq2seq else prompt)
            _stream(lm, prompt, config, sys.stdout)
        except LmlabError as e:  # a bad prompt ends that turn, not the session
            print(f"\nlmlab: error: {e}", file=sys.stderr)


def cmd_generate(a) -> int:
    from lmlab.api import load
    from lmlab.generate import GenerationConfig

    config = GenerationConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(GenerationConfig)})
    prompts = list(a.prompt or [])
    if a.prompts_file:
        prompts += _read_prompts(Path(a.prompts_file))
    if not prompts and not a.interactive:
        raise LmlabError("no prompt: give --prompt TEXT, --prompts-file FILE or --interactive")
    if a.format not in ("text", "jsonl"):
        raise LmlabError(f"--format is '{a.format}': expected text or jsonl")
    if a.logprobs is not None and (a.logprobs < 0 or a.format != "jsonl"):
        raise LmlabError("--logprobs N needs --format jsonl and N ≥ 0")
    if a.batch_size < 1:
        raise LmlabError(f"--batch-size is {a.batch_size}: expected a positive integer")
    if a.stream and (len(prompts) != 1 or a.format != "text" or a.output):
        raise LmlabError("--stream prints one prompt's text as it is made: give one --prompt, --format text and no --output")
    if a.output:
        from lmlab.io.outputs import check_output_file

        check_output_file(a.output, overwrite=a.overwrite)  # before the model loads
    lm = load(a.checkpoint, device=a.device, verify=a.verify)
    if a.interactive:
        return _interactive(lm, config)
    echo = "" if lm.is_seq2seq else None  # an encoder–decoder's output is no continuation: print the target alone
    if a.stream:
        sys.stdout.write(prompts[0] if echo is None else echo)
        _stream(lm, prompts[0], config, sys.stdout)
        return 0
    lines: list[str] = []
    for start in range(0, len(prompts), a.batch_size):
        chunk = prompts[start : start + a.batch_size]
        results = lm.generate(chunk, config, details=True, logprobs=a.logprobs)
        for prompt, outputs in zip(chunk, results):
            for index, c in enumerate(outputs if isinstance(outputs, list) else [outputs]):
                if a.format == "text":
                    lines.append((prompt if echo is None else echo) + c.text)
                    continue
                record = {"prompt": prompt, "index": index, "completion": c.text, "finish_reason": c.finish_reason}
                if c.score is not None:
                    record["score"] = c.score
                if a.logprobs is not None:
                    record.update(tokens=c.tokens, token_ids=c.token_ids, logprobs=c.logprobs)
                    if c.top_logprobs is not None:
                        record["top_logprobs"] = [[{"id": i, "token": lm.tokenizer.decode([i]), "logprob": lp} for i, lp in alts] for alts in c.top_logprobs]
                lines.append(json.dumps(record, ensure_ascii=False))
    separator = "\n" if a.format == "jsonl" else "\n\n"
    text = separator.join(lines) + "\n"
    if a.output:
        from lmlab.config import write_text_atomic

        write_text_atomic(a.output, text)
        print(f"lmlab: {len(lines)} output(s) written to {a.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def cmd_chat(a) -> int:
    from lmlab.api import load
    from lmlab.chat import ChatSession, repl
    from lmlab.generate import GenerationConfig

    config = GenerationConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(GenerationConfig) if hasattr(a, f.name)})
    return repl(ChatSession(load(a.checkpoint, device=a.device, verify=a.verify), system=a.system, config=config))


def cmd_finetune(a) -> int:
    from lmlab.train.finetune import finetune
    from lmlab.train.loop import TrainConfig

    train_args = {f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "seq_len"}
    result = finetune(
        a.checkpoint, a.task, a.train, a.out, valid=a.valid, max_length=a.max_length, text_field=a.text_field,
        pair_field=a.pair_field, label_field=a.label_field, source_field=a.source_field, target_field=a.target_field,
        max_target_length=a.max_target_length, class_weights=a.class_weights, patience=a.patience, resume=a.resume, lora=a.lora,
        show_masking=a.show_masking, pack=a.pack, verify=a.verify, dry_run=a.dry_run, memory_budget=a.memory_budget,
        overwrite=a.overwrite, **train_args,
    )
    if a.dry_run and not a.show_masking:
        print(result.report())
        return 0
    if a.show_masking or os.environ.get("RANK", "0") != "0":
        return 0
    if result.val_scores:
        print("lmlab: validation " + ", ".join(f"{k} {v:.4f}" for k, v in result.val_scores.items()) + (" (stopped early)" if result.stopped_early else ""))
    print(f"lmlab: last checkpoint {result.last_checkpoint}" + (f", best {result.best_checkpoint}" if result.best_checkpoint else ""))
    return 0


def cmd_critique(a) -> int:
    from lmlab.critique import critique

    fields = {k: getattr(a, k) for k in ("text_field", "pair_field", "label_field", "group_field") if getattr(a, k) is not None}
    options = {"pairs": a.pairs, "swaps": a.swaps, "prompts": a.prompts, "harmful": a.harmful, "classifier": a.toxicity_classifier,
               "samples": a.samples, "max_new_tokens": a.max_new_tokens, "canaries": a.canaries, "extraction_prefix": a.extraction_prefix,
               "extraction_suffix": a.extraction_suffix, "text": a.input, "power_watts": a.power_watts, "grid_intensity": a.grid_intensity,
               "perturbations": [n.strip() for n in a.perturbations.split(",") if n.strip()] if a.perturbations else None}
    report = critique(
        a.checkpoint, a.out, lenses=a.lenses, data=a.data, text=a.text, train_data=a.train_data, task=a.task, device=a.device,
        seed=a.seed, max_examples=a.max_examples, fields=fields, options={k: v for k, v in options.items() if v is not None}, progress=a.progress,
        verify=a.verify, overwrite=a.overwrite,
    )
    for name, lens in report["lenses"].items():
        if "skipped" in lens:
            print(f"{name:>12}: skipped — {lens['skipped']}")
            continue
        worst = [f for f in lens["findings"] if f["level"] in ("bad", "warn")]
        print(f"{name:>12}: " + ("; ".join(f"{f['level']}: {f['text']}" for f in worst[:2]) if worst else "nothing worrying"))
    print(f"lmlab: {report['_paths']['html']}  (and report.json)")
    return 0


def cmd_export(a) -> int:
    from lmlab.io.export import export_hf

    if a.format != "hf":
        raise LmlabError(f"--format {a.format!r}: expected hf (GGUF and ONNX are not written yet)")
    print(f"lmlab: exported {export_hf(a.checkpoint, a.out, verify=a.verify, lora=a.lora)}" + ("" if a.verify else " (not verified)"))
    return 0


def cmd_merge_lora(a) -> int:
    from lmlab.train.lora import merge_checkpoint

    print(f"lmlab: merged checkpoint {merge_checkpoint(a.checkpoint, a.out, verify=a.verify, overwrite=a.overwrite)}")
    return 0


def cmd_evaluate(a) -> int:
    from lmlab.evaluate.runner import evaluate

    if a.batch_size < 1 or a.n_resamples < 1 or a.num_beams < 1 or a.max_target_length < 1:
        raise LmlabError("--batch-size, --n-resamples, --num-beams and --max-target-length must be positive integers")
    result = evaluate(
        a.checkpoint, a.data, task=a.task, out=a.out, max_length=a.max_length, batch_size=a.batch_size,
        n_resamples=a.n_resamples, device=a.device, text_field=a.text_field, pair_field=a.pair_field, label_field=a.label_field,
        source_field=a.source_field, target_field=a.target_field, max_target_length=a.max_target_length, num_beams=a.num_beams,
        verify=a.verify, overwrite=a.overwrite,
    )
    skip = {"task", "checkpoint", "data", "ci", "per_class", "confusion_matrix", "calibration", "labels", "per_type", "num_examples"}
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


def cmd_info(a) -> int:
    from lmlab.config import PRESETS, preset
    from lmlab.io.checkpoint import load_config, resolve_checkpoint

    if a.seq_len is not None and a.seq_len < 1:
        raise LmlabError(f"--seq-len is {a.seq_len}: expected a positive number of tokens")
    if a.model is None:
        configs = [preset(name) for name in PRESETS]
    elif a.model in PRESETS:
        configs = [preset(a.model)]
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
    from lmlab.demo import run_demo

    run_demo(
        out=a.out, max_steps=a.max_steps, model=a.model, max_chars=a.max_chars, vocab_size=a.vocab_size,
        finetune_steps=a.finetune_steps, critique_examples=a.critique_examples, progress=a.progress, overwrite=a.overwrite,
    )
    return 0


COMMANDS = {
    "tokenizer": cmd_tokenizer,
    "prepare": cmd_prepare,
    "pretrain": cmd_pretrain,
    "finetune": cmd_finetune,
    "evaluate": cmd_evaluate,
    "critique": cmd_critique,
    "export": cmd_export,
    "merge-lora": cmd_merge_lora,
    "generate": cmd_generate,
    "chat": cmd_chat,
    "info": cmd_info,
    "demo": cmd_demo,
}


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
                raise ArgumentError(None, f"--config {name}: not a readable UTF-8 YAML file ({type(e).__name__})") from None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(argv) if argv is not None else sys.argv[1:]
    _log_warnings_as_one_line()
    try:
        _check_config_files(argv)
        args = build_parser().parse_args(argv)
    except ArgumentError as e:
        # one line: what was wrong, and where the options are listed
        verb = " ".join(a for a in argv[:2] if not a.startswith("-") and a in ("tokenizer", "train", *COMMANDS))
        message = " ".join(line.strip() for line in str(e).splitlines())
        print(f"lmlab: error: {message} (see `lmlab {verb + ' ' if verb else ''}--help`)", file=sys.stderr)
        return 2
    try:
        return COMMANDS[args.command](args[args.command])
    except LmlabError as e:
        print(f"lmlab: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lmlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
