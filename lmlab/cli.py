"""``lmlab VERB``: a thin shell over the Python API. A verb is ``_flags_<verb>`` (the flags :mod:`lmlab.clikit` builds
from the signature and docstring of the function it calls, and the command line's own), ``cmd_<verb>`` (its docstring
is the ``--help`` text; it calls the function and prints the result) and a line of :data:`VERBS`. Usage errors print
one line and exit 2, library errors (:class:`LmlabError`) exit 1; bugs keep their traceback."""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path

from jsonargparse import ArgumentParser

import lmlab  # its names are imported on first use: a verb imports what it runs, and `--help` nothing heavy
from lmlab import clikit
from lmlab.clikit import SHARED, Verb, add, dataclass_flags, flags, function_verb, kwargs_of
from lmlab.errors import LmlabError
from lmlab.function_verbs import CONSOLIDATE, DISTILL, MERGE_LORA, MERGE_LORA_FLAGS, PRUNE, QUANTIZE, SERVE

FIELDS = "text_field pair_field label_field source_field target_field"  # the data fields of a task file
CORPUS = "input text_field column normalize dedup"  # read_corpus's options
CRITIQUE_FIELDS = {"text_field": "text", "pair_field": "none", "label_field": "label", "group_field": "group"}
LENS_OPTIONS = (  # critique: the lenses' options, help from the function of the lens that takes them
    "pairs swaps prompts harmful toxicity_classifier samples max_new_tokens canaries extraction_prefix "
    "extraction_suffix perturbations power_watts grid_intensity input"
)
PERTURBATIONS = "comma-separated edits: typos,case,punctuation,contractions,whitespace,names (default: all)"
LENS_RENAME = {"toxicity_classifier": "classifier", "input": "text"}  # *_RENAME: flag → parameter where they differ
CANARY_RENAME = {"canary_repeats": "repeats", "canary_digits": "digits", "canary_template": "template"}
PREPARE_RENAME = {"input": "inputs", "out": "out_dir", "progress": "show_progress"}
LOAD_RENAME, FORMATS = {"checkpoint": "path"}, ("hf", "gguf", "onnx")  # FORMATS: lmlab export --format


def _flags_tokenizer(p: ArgumentParser) -> None:
    flags(p, lmlab.read_corpus, "", CORPUS, {"input": "inputs"}, input={"nargs": "+"})
    own = "kind vocab_size min_frequency special_tokens sentinels"
    flags(p, lmlab.train_tokenizer, own, special_tokens={"nargs": "+"})
    flags(p, lmlab.Tokenizer.save, "out", "overwrite", {"out": "directory"})


def _flags_prepare(p: ArgumentParser) -> None:
    from lmlab.data.canaries import plant_canaries

    own = "tokenizer out valid_fraction seed"
    flags(p, lmlab.prepare, own, CORPUS + " * progress overwrite", PREPARE_RENAME, input={"nargs": "+"})
    add(p, "canaries", clikit.doc_args(lmlab.prepare)["canaries"], "int | None", None)
    flags(p, plant_canaries, "canary_repeats canary_digits canary_template", rename=CANARY_RENAME)


def _flags_pretrain(p: ArgumentParser) -> None:
    own = "model data out objective init_from pad_vocab_multiple world_size"
    shared = "resume verify overwrite dry_run memory_budget"
    model, required = {"help": f"model preset: {', '.join(lmlab.PRESETS)}"}, {"required": True}
    flags(p, lmlab.pretrain, own, shared, model=model, data=required, out=required)
    add(p, "dropout", "override the preset's dropout", "float | None", None)
    add(p, "block_size", "override the preset's context length", "int | None", None)
    dataclass_flags(p, lmlab.TrainConfig)


def _flags_finetune(p: ArgumentParser) -> None:
    from lmlab.train.finetune import DERIVED_HELP, FLAG_DEFAULTS

    own = "checkpoint task train valid out max_length max_target_length class_weights patience show_masking pack lora"
    flags(p, lmlab.finetune, own + " epochs world_size", f"{FIELDS} resume verify overwrite dry_run memory_budget")
    dataclass_flags(p, lmlab.TrainConfig, skip=("seq_len",), defaults=FLAG_DEFAULTS, helps=DERIVED_HELP)


def _flags_evaluate(p: ArgumentParser) -> None:
    own = "data task out harness harness_include num_fewshot limit max_length max_target_length num_beams batch_size"
    flags(p, lmlab.evaluate, own + " n_resamples", f"checkpoint * {FIELDS} device verify overwrite")


def _flags_critique(p: ArgumentParser) -> None:
    names = {"help": f"comma-separated: {','.join(lmlab.critique.LENSES)} (default: all)"}
    own = "out lenses data text train_data task max_examples seed compare"
    flags(p, lmlab.critique, own, "checkpoint * device verify progress overwrite", lenses=names)
    for name, usual in CRITIQUE_FIELDS.items():  # None: the task's own name
        add(p, name, f"--data: {SHARED[name]} (default: {usual})", "str | None", None)
    lenses = {lens: lmlab.critique.lens_function(lens) for lens in lmlab.critique.LENSES}
    for dest in LENS_OPTIONS.split():  # None: the lens applies its own default, which the help names
        lens = next(n for n, fn in lenses.items() if LENS_RENAME.get(dest, dest) in inspect.signature(fn).parameters)
        clikit.optional_flags(p, lenses[lens], dest, f"{lens}: ", LENS_RENAME, perturbations={"help": PERTURBATIONS})


def _flags_export(p: ArgumentParser) -> None:
    add(p, "format", "hf (a transformers folder), gguf (llama.cpp) or onnx (onnxruntime)", "str", "hf", choices=FORMATS)
    verify = {"help": "skip the export's check (hf: by transformers; gguf: read back, rebuilt; onnx: by onnxruntime)"}
    out = {"help": "hf, onnx: the folder to write (new or empty); gguf: the file to write (new)"}
    flags(p, lmlab.export_hf, "out lora verify", "checkpoint", verify=verify, out=out)
    flags(p, lmlab.export_gguf, "outtype")


def _flags_generate(p: ArgumentParser) -> None:
    flags(p, lmlab.load, "", "checkpoint device verify", LOAD_RENAME)
    add(p, "prompt", "one or more prompts", "str | None", None, nargs="+")
    add(p, "prompts_file", "a UTF-8 file, one prompt per line (or .jsonl with a 'prompt' field)", "str | None", None)
    add(p, "interactive", "a REPL: type a prompt, watch it stream; Ctrl-D or /quit ends", bool, False, aliases=("-i",))
    add(p, "stream", "print tokens as they are made (one prompt)", bool, False)
    formats = "text (prompt + continuation; an encoder–decoder's target alone) or jsonl (one object per output)"
    add(p, "format", formats, "str", "text")
    add(p, "output", "write the outputs to this file instead of stdout (atomically)", "str | None", None)
    add(p, "overwrite", SHARED["overwrite"].format("--output file"), bool, False)
    logprobs = {"help": "jsonl: " + clikit.doc_args(lmlab.LM.generate_records)["logprobs"]}
    flags(p, lmlab.LM.generate_records, "logprobs batch_size", logprobs=logprobs)
    dataclass_flags(p, lmlab.GenerationConfig)


def _flags_chat(p: ArgumentParser) -> None:
    from lmlab.chat import ChatSession

    flags(p, lmlab.load, "", "checkpoint device verify", LOAD_RENAME)
    flags(p, ChatSession, "system")
    skip = ("stop", "stop_token_ids", "num_return_sequences", "max_length", "truncate")
    dataclass_flags(p, lmlab.GenerationConfig, skip=skip)
    add(p, "stop", "also end a reply at these strings (the end-of-turn marker always ends it)", "str", [], nargs="+")


def _flags_info(p: ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="preset name or checkpoint folder")
    flags(p, lmlab.ModelConfig.flops_per_token, "seq_len")


def _flags_demo(p: ArgumentParser) -> None:
    own = "out max_steps model max_chars vocab_size seq_len micro_batch_size finetune_steps critique_examples"
    flags(p, lmlab.run_demo, own, "progress overwrite")


def cmd_tokenizer(args) -> int:
    """Train a tokenizer with the `tokenizers` library and save tokenizer.json."""
    from lmlab.tokenizer import check_tokenizer_folder

    a = args.train
    check_tokenizer_folder(a.out, a.overwrite)  # before the corpus is read and the tokenizer trained
    texts = lmlab.read_corpus(**kwargs_of(a, lmlab.read_corpus, {"input": "inputs"}))
    tok = lmlab.train_tokenizer(texts, show_progress=True, **kwargs_of(a, lmlab.train_tokenizer))
    tok.save(a.out, overwrite=a.overwrite)
    print(f"lmlab: {a.kind} tokenizer with {tok.vocab_size:,} tokens written to {Path(a.out) / 'tokenizer.json'}")
    return 0


def cmd_prepare(a) -> int:
    """Tokenize a corpus into memory-mapped token shards (train/valid) with a JSON manifest."""
    from lmlab.data.canaries import plant_canaries
    from lmlab.data.pack import describe_splits

    canaries = None if a.canaries is None else {"n": a.canaries, **kwargs_of(a, plant_canaries, CANARY_RENAME)}
    manifest = lmlab.prepare(**{**kwargs_of(a, lmlab.prepare, PREPARE_RENAME), "canaries": canaries})
    print(f"lmlab: {a.out} {manifest['_status']} — {describe_splits(manifest)}")
    return 0


def _report_run(result, a, finetuned: bool = False) -> int:
    """Print what a training run returned: a dry run's prediction, or (on rank 0 under torchrun) its summary."""
    if a.dry_run:
        print(result.report())
    elif os.environ.get("RANK", "0") == "0":
        print("\n".join(f"lmlab: {line}" for line in result.summary(finetuned).splitlines()))
    return 0


def cmd_pretrain(a) -> int:
    """Pretrain a model on a prepared data folder. Every training option is also a key of --config."""
    overrides = {k: v for k, v in (("dropout", a.dropout), ("block_size", a.block_size)) if v is not None}
    train = {**kwargs_of(a, lmlab.pretrain), **kwargs_of(a, lmlab.TrainConfig)}
    return _report_run(lmlab.pretrain(**train, model_overrides=overrides), a)


def cmd_finetune(a) -> int:
    """Fine-tune a checkpoint on a labelled task: classify (text or text pair → label(s)), tag (a label per word),
    qa (extractive answer spans), seq2seq or chat (conversations; the loss on assistant turns only). The task
    metric on --valid (chat: the validation loss) picks best/ and drives --patience."""
    result = lmlab.finetune(**kwargs_of(a, lmlab.finetune), **kwargs_of(a, lmlab.TrainConfig))
    return 0 if a.show_masking else _report_run(result, a, finetuned=True)


def cmd_evaluate(a) -> int:
    """Evaluate a checkpoint on a labelled file: the task's metrics with bootstrap 95% confidence intervals,
    calibration for classifiers, per-example predictions; --task lm: a decoder's perplexity on text;
    --harness: lm-evaluation-harness tasks (local task files through --harness-include)."""
    from lmlab.evaluate.runner import summary

    if a.batch_size < 1 or a.n_resamples < 1 or a.num_beams < 1 or a.max_target_length < 1:
        raise LmlabError("--batch-size, --n-resamples, --num-beams and --max-target-length must be positive integers")
    print(summary(lmlab.evaluate(**kwargs_of(a, lmlab.evaluate))))
    if a.out:
        second = "harness.json" if a.harness else "predictions.jsonl"
        print(f"lmlab: {Path(a.out) / 'metrics.json'}, {Path(a.out) / second}")
    return 0


def cmd_critique(a) -> int:
    """Critique a model: a report on performance, interpretability, bias, safety, privacy, robustness and
    efficiency (report.html to read, report.json for scripts). Lenses that lack the data they need are skipped
    with a note saying what to give them."""
    from lmlab.critique.report import summary

    fields = {k: getattr(a, k) for k in CRITIQUE_FIELDS if getattr(a, k) is not None}
    options = {LENS_RENAME.get(k, k): getattr(a, k) for k in LENS_OPTIONS.split()}
    options["perturbations"] = [n.strip() for n in a.perturbations.split(",") if n.strip()] if a.perturbations else None
    options = {k: v for k, v in options.items() if v is not None}
    report = lmlab.critique(**kwargs_of(a, lmlab.critique), fields=fields, options=options)
    print(summary(report))
    print(f"lmlab: {report['_paths']['html']}  (and report.json)")
    return 0


def cmd_export(a) -> int:
    """Export a checkpoint: hf, a folder for transformers, vLLM, TGI (loaded back by transformers, logits compared);
    gguf, one file for llama.cpp, tokenizer inside (read back, the model rebuilt from it compared); onnx, a graph for
    onnxruntime (run by onnxruntime, compared). An export is moved into place only once its check passed."""
    fn = {"hf": lmlab.export_hf, "gguf": lmlab.export_gguf, "onnx": lmlab.export_onnx}[a.format]
    out = fn(**kwargs_of(a, fn))
    print(f"lmlab: exported {out}" + ("" if a.verify else " (not verified)"))
    return 0


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
        raise LmlabError("--stream prints one prompt as it is made: give one --prompt, --format text and no --output")
    if a.output:
        from lmlab.io.outputs import check_output_file

        check_output_file(a.output, overwrite=a.overwrite)


def cmd_generate(a) -> int:
    """Generate text from a checkpoint: greedy, sampling (temperature, top-k, top-p, min-p, typical-p) or beam
    search, with penalties and stop strings. A prompt longer than the context window keeps its last tokens (a
    warning says so) unless --truncate error."""
    from lmlab.api import generate_repl, read_prompts, write_stream
    from lmlab.config import write_text_atomic

    config = lmlab.GenerationConfig(**kwargs_of(a, lmlab.GenerationConfig))
    prompts = list(a.prompt or []) + (read_prompts(Path(a.prompts_file)) if a.prompts_file else [])
    _check_generate(a, prompts)
    lm = lmlab.load(**kwargs_of(a, lmlab.load, LOAD_RENAME))
    if a.interactive or a.stream:
        return generate_repl(lm, config) if a.interactive else write_stream(lm, prompts[0], config, sys.stdout)
    records = lm.generate_records(prompts, config, batch_size=a.batch_size, logprobs=a.logprobs)
    text = lm.format_records(records, a.format)
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

    config = lmlab.GenerationConfig(**kwargs_of(a, lmlab.GenerationConfig))
    return repl(ChatSession(lmlab.load(**kwargs_of(a, lmlab.load, LOAD_RENAME)), system=a.system, config=config))


def cmd_info(a) -> int:
    """Parameter count and FLOPs per token of a preset or a checkpoint (all presets when none is named)."""
    from lmlab.config import size_table
    from lmlab.io.checkpoint import load_config, resolve_checkpoint

    if a.seq_len is not None and a.seq_len < 1:
        raise LmlabError(f"--seq-len is {a.seq_len}: expected a positive number of tokens")
    names = lmlab.PRESETS if a.model is None else [a.model]
    configs = [lmlab.preset(n) if n in lmlab.PRESETS else load_config(resolve_checkpoint(n)) for n in names]
    print(size_table(configs, a.seq_len))
    return 0


def cmd_demo(a) -> int:
    """Run the whole pipeline on the embedded corpus (Python's own documentation), offline."""
    lmlab.run_demo(**kwargs_of(a, lmlab.run_demo))
    return 0


TOKENIZER_TRAIN = ("train", "Tokenizer commands.", "train a tokenizer on a corpus")  # `lmlab tokenizer train`
DESCRIPTION = "Train, generate, evaluate and critique Transformer language models."
VERBS = {  # name → Verb(its line in `lmlab --help`, flags, run), in the order `lmlab --help` lists them
    "tokenizer": Verb("train a tokenizer (BPE, WordPiece, Unigram)", _flags_tokenizer, cmd_tokenizer, TOKENIZER_TRAIN),
    "prepare": Verb("tokenize and pack a corpus into token shards", _flags_prepare, cmd_prepare),
    "pretrain": Verb("pretrain a model: causal LM, masked LM, next-sentence prediction", _flags_pretrain, cmd_pretrain),
    "finetune": Verb("fine-tune on classify, tag, qa, seq2seq or chat", _flags_finetune, cmd_finetune),
    "evaluate": Verb("task metrics with confidence intervals, or perplexity", _flags_evaluate, cmd_evaluate),
    "critique": Verb("a report: performance, bias, safety, privacy, robustness, …", _flags_critique, cmd_critique),
    "quantize": function_verb("int8, dynamic int8, int4, GPTQ: measured before and after", *QUANTIZE),
    "prune": function_verb("prune weights, heads or MLP neurons, measured before and after", *PRUNE),
    "distill": function_verb("a smaller student taught by a teacher", *DISTILL, options="lmlab.train.loop:TrainConfig"),
    "export": Verb("export a checkpoint: HF folder, GGUF or ONNX, each checked by logits", _flags_export, cmd_export),
    "consolidate": function_verb("one safetensors checkpoint from a sharded (fsdp) one", *CONSOLIDATE, show=str),
    "merge-lora": function_verb("merge LoRA adapters into the base weights", *MERGE_LORA, **MERGE_LORA_FLAGS),
    "generate": Verb("generate text: every decoding strategy, streaming, a REPL", _flags_generate, cmd_generate),
    "chat": Verb("chat with a model: a multi-turn REPL with streaming", _flags_chat, cmd_chat),
    "serve": function_verb("serve a model over OpenAI's HTTP API, with a web playground", *SERVE, show=int),
    "info": Verb("model sizes: parameters and FLOPs per token", _flags_info, cmd_info),
    "demo": Verb("the end-to-end demo: corpus → tokenizer → pretrain → … → critique", _flags_demo, cmd_demo),
}


def build_parser(only: str | None = None) -> ArgumentParser:
    """The parser of every verb; ``only``: that verb's flags alone (a command imports no more than it runs)."""
    return clikit.verbs_parser(VERBS, "lmlab", DESCRIPTION, only)


def main(argv: list[str] | None = None) -> int:
    return clikit.run_verbs(VERBS, "lmlab", DESCRIPTION, argv)


if __name__ == "__main__":
    raise SystemExit(main())
