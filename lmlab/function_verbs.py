"""The verbs that are one API function each (:func:`lmlab.clikit.function_verb`), declared as data: the function's
module path, its own flags, the shared ones (``*``: where the own ones go among them) and the ``--help``
description. :data:`lmlab.cli.VERBS` gives each its line in ``lmlab --help``. Strings only: nothing here imports
the functions, so ``lmlab --help`` stays light."""

QUANTIZE = (
    "lmlab.compress.quantization:quantize",
    "out method group_size calibration_data calibration_samples eval_data",
    "checkpoint * device verify overwrite",
    "Quantize a checkpoint's block Linear layers (int8, int8-dynamic, int4, int4-gptq); print and write what it cost.",
)
PRUNE = (
    "lmlab.compress.pruning:prune",
    "out method sparsity data samples finetune_steps lr eval_data",
    "checkpoint * device verify overwrite",
    "Prune a checkpoint: zeros (magnitude, 2:4) or fewer heads and MLP neurons; print and write what it cost.",
)
MERGE_LORA = (
    "lmlab.train.lora:merge_checkpoint",
    "checkpoint out verify",
    "overwrite",
    "Fold a LoRA checkpoint's adapters into its base weights: a plain checkpoint, for export and fast inference.",
)
MERGE_VERIFY = "merge even when the checkpoint's tokenizer.json does not match the tokenizer_sha256 in its config.json"
MERGE_LORA_FLAGS = {
    "show": lambda out: f"lmlab: merged checkpoint {out}",
    "rename": {"checkpoint": "src"},
    "verify": {"help": MERGE_VERIFY + " (a warning instead of an error)"},
}
SERVE = (
    "lmlab.serve.server:serve",
    "host port api_key model_name max_batch_size max_queue max_prompt_tokens max_new_tokens timeout compile draft "
    "num_draft_tokens",
    "checkpoint * device verify",
    "Serve a checkpoint over OpenAI's HTTP API (continuous batching, streaming); /metrics, a playground at /.",
)
DISTILL = (
    "lmlab.compress.distillation:distill",
    "teacher data out student student_init alpha temperature valid eval_data lora max_length",
    "* text_field pair_field label_field resume verify overwrite dry_run memory_budget",
    "Train a smaller student on a teacher's softened distributions (Hinton et al.); print and write what it cost.",
)

CONSOLIDATE = ("lmlab.io.checkpoint:consolidate", "out", "checkpoint * verify overwrite", "One safetensors from DCP.")
