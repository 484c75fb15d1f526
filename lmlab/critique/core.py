"""What every critique lens shares: the model under critique, what a lens reports, and figures.

A lens is a plain function ``lens(subject, **options) -> Section``. It measures, it does not assert:
every number in ``Section.metrics`` is computed from the model and the data, and every one of them
has a sentence in ``Section.explain`` saying what it means. ``Section.findings`` say what is good and
what is worrying, each tied to a number. A lens that lacks what it needs (no test data, a model
family it does not apply to) returns :func:`skipped` with a note saying what to provide; it never
raises for that.

    subject = load_subject("runs/cls/best", data="test.jsonl")
    section = bias(subject)                       # one lens, from Python
    section.metrics, section.findings, section.figures
"""

from __future__ import annotations

import base64
import dataclasses
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from lmlab.device import resolve_device
from lmlab.errors import LmlabError
from lmlab.tasks import TaskFields

LEVELS = ("good", "info", "warn", "bad")  # how a finding reads: fine, neutral, worth a look, a problem


@dataclass
class Finding:
    """One sentence a reader should take away, with how it reads (``good``, ``info``, ``warn``, ``bad``)."""

    level: str
    text: str

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"Finding level {self.level!r}: expected one of {LEVELS}")


@dataclass
class Figure:
    """A picture (PNG bytes) with a title and a caption that says how to read it."""

    title: str
    png: bytes
    caption: str

    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


@dataclass
class Table:
    """A small table: column names and rows of cells (numbers are formatted by the report)."""

    title: str
    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""


@dataclass
class Section:
    """What one lens found. ``metrics`` is JSON-able (it goes to report.json as is); ``explain`` maps
    a metric name to one sentence; ``method`` says in a paragraph what was measured and how."""

    lens: str
    title: str
    method: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    explain: dict[str, str] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    skipped: str | None = None  # why the lens did not run, and what to provide so that it does
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"title": self.title, "method": self.method, "seconds": round(self.seconds, 3)}
        if self.skipped is not None:
            out["skipped"] = self.skipped
            return out
        out.update(
            metrics=self.metrics,
            explain=self.explain,
            findings=[dataclasses.asdict(f) for f in self.findings],
            tables=[dataclasses.asdict(t) for t in self.tables],
            figures=[{"title": f.title, "caption": f.caption} for f in self.figures],
        )
        return out


def random_lm_head(subject: Subject) -> list[str]:
    """The language-modelling head's weights the checkpoint lacked and ``load_model`` initialised at random
    (``model.fresh_weights``; a sentence-transformers folder's MLM head): a lens that reads them reads noise."""
    return [name for name in getattr(subject.model, "fresh_weights", ()) if name.startswith(("mlm_", "lm_head"))]


def skipped(lens: str, title: str, why: str) -> Section:
    """A lens that could not run, and the note saying what to provide."""
    return Section(lens=lens, title=title, skipped=why)


@dataclass
class Subject:
    """The model under critique and the data the user gave for it.

    ``model`` is in eval mode, adapters merged; ``lm`` is the generation/scoring API for models that
    generate (None for encoders). Paths the user did not give are None. ``run_dir`` is the training
    run the checkpoint came from, when it is inside one (its ``log.jsonl`` feeds the efficiency lens).
    """

    path: Path
    model: nn.Module
    tokenizer: Any
    meta: dict[str, Any]
    device: torch.device
    lm: Any = None
    run_dir: Path | None = None
    data: Path | None = None  # labelled test file of the checkpoint's task (classify/tag/qa/seq2seq)
    text: Path | None = None  # held-out plain text (perplexity, the logit lens)
    train_data: Path | None = None  # the training corpus (memorisation, PII scan)
    task: str = ""  # the task ``data`` is scored on ("" when there is no labelled data)
    fields: dict[str, str] = field(default_factory=dict)  # text_field, pair_field, label_field, group_field, …
    seed: int = 0
    max_examples: int = 500  # lenses subsample larger files to this many examples (seeded)

    @property
    def config(self):
        return self.model.config

    @property
    def arch(self) -> str:
        return self.model.config.arch

    @property
    def task_fields(self) -> TaskFields:
        """The field names of ``data`` as the task layer takes them (:class:`~lmlab.tasks.TaskFields`)."""
        names = {f.name for f in dataclasses.fields(TaskFields)}
        return TaskFields(**{k: v for k, v in self.fields.items() if k in names})

    @property
    def name(self) -> str:
        return self.meta.get("lmlab_model_config", {}).get("name") or self.config.name or self.arch


def load_subject(
    checkpoint: str | Path,
    *,
    data: str | Path | None = None,
    text: str | Path | None = None,
    train_data: str | Path | None = None,
    task: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    max_examples: int = 500,
    verify: bool = True,
    **fields: str,
) -> Subject:
    """Load a checkpoint (or run folder) for critique. ``fields`` name the columns of ``data``
    (``text_field``, ``pair_field``, ``label_field``, ``group_field``, ``source_field``, ``target_field``)."""
    from lmlab.api import LM
    from lmlab.io.checkpoint import load_model, load_tokenizer, read_meta, resolve_checkpoint
    from lmlab.tasks import trained_task

    device = resolve_device(device)
    path = resolve_checkpoint(checkpoint)
    for name, value in (("data", data), ("text", text), ("train_data", train_data)):
        if value is not None and not Path(value).exists():
            raise LmlabError(f"{name} {value}: no such file or folder", params=name)
    tokenizer = load_tokenizer(path, verify=verify)
    model = load_model(path, device=device, merge_lora=True, verify=verify).eval()
    meta = read_meta(path)
    config = model.config
    if task is None:
        task = trained_task(config, meta)
    run_dir = path.parent if (path.parent / "log.jsonl").is_file() else None
    return Subject(
        path=path,
        model=model,
        tokenizer=tokenizer,
        meta=meta,
        device=device,
        lm=LM(model, tokenizer, path) if config.arch != "encoder" else None,
        run_dir=run_dir,
        data=Path(data) if data is not None else None,
        text=Path(text) if text is not None else None,
        train_data=Path(train_data) if train_data is not None else None,
        task=task or "",
        fields={k: v for k, v in fields.items() if v is not None},
        seed=seed,
        max_examples=max_examples,
    )


# -- figures -----------------------------------------------------------------------------------------


def new_figure(width: float = 6.4, height: float = 3.6):
    """A matplotlib (figure, axes) on the file-only backend, sized for the report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=110)


def figure_png(fig) -> bytes:
    """The figure as PNG bytes (and closed)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def check_option(name: str, value: Any, minimum: float = 1, integer: bool = True) -> None:
    """A lens option (a parameter, a CLI flag) that must be an integer (else any number) at least ``minimum``: a
    one-line error naming it otherwise."""
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value < minimum:
        raise LmlabError(
            f"{name} is {value!r}: expected {'an integer' if integer else 'a number'} >= {minimum:g}", params=name
        )


# -- small statistics every lens needs -------------------------------------------------------------------


def proportion_ci(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (well-behaved at 0, 1 and small n)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact at the edges, not a rounding residue
    high = 1.0 if successes == n else min(1.0, centre + half)
    return (low, high)


def subsample(items: Sequence[Any], limit: int, seed: int) -> list[int]:
    """Indices of at most ``limit`` items, a seeded random subset in their original order."""
    n = len(items)
    if n <= limit:
        return list(range(n))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:limit].tolist())


def group_stats(groups: Sequence[Any], correct: Sequence[bool]) -> dict[str, Any]:
    """Accuracy per group (examples whose group is None or blank are left out), each with its Wilson
    95% interval, and the best and worst group, their gap, and whether their intervals are apart."""
    tally: dict[str, list[int]] = {}
    for group, right in zip(groups, correct):
        if group is None or str(group).strip() == "":
            continue
        counts = tally.setdefault(str(group), [0, 0])
        counts[0] += bool(right)
        counts[1] += 1
    by_group = {}
    for name, (right, n) in sorted(tally.items()):
        low, high = proportion_ci(right, n)
        by_group[name] = {"n": n, "accuracy": right / n, "ci_low": low, "ci_high": high}
    if len(by_group) < 2:
        return {"by_group": by_group}
    best = max(by_group, key=lambda g: by_group[g]["accuracy"])
    worst = min(by_group, key=lambda g: by_group[g]["accuracy"])
    return {
        "by_group": by_group,
        "best": best,
        "worst": worst,
        "gap": by_group[best]["accuracy"] - by_group[worst]["accuracy"],
        "separated": by_group[worst]["ci_high"] < by_group[best]["ci_low"],
    }


def ci_bars(
    title: str,
    names: list[str],
    values: list[float],
    lows: list[float],
    highs: list[float],
    xlabel: str,
    *,
    lines: list[tuple[float, str]],
    caption: str,
    percent: bool = True,
    high_bad: float | None = None,
    limits: tuple[float, float] | None = (0.0, 1.0),
) -> Figure:
    """Horizontal bars with 95% interval whiskers and labelled reference lines (``percent``: shares shown
    as %; ``limits``: the x range before scaling, None to fit); bars whose interval lies wholly above
    ``high_bad`` are red."""
    scale = 100 if percent else 1
    fig, ax = new_figure(6.4, 1.3 + 0.42 * len(names))
    colors = ["#c62828" if high_bad is not None and lo > high_bad else "#5c7cfa" for lo in lows]
    v = [x * scale for x in values]
    errors = [
        [max(0.0, (x - lo) * scale) for x, lo in zip(values, lows)],
        [max(0.0, (hi - x) * scale) for x, hi in zip(values, highs)],
    ]
    ax.barh(names, v, xerr=errors, color=colors, ecolor="#333", capsize=3)
    for x, label in lines:
        ax.axvline(x * scale, color="#555", linestyle="--", linewidth=1)
        ax.text(x * scale, -0.6, f" {label}", fontsize=8, color="#555", va="bottom")
    if limits is not None:
        ax.set_xlim(limits[0] * scale, limits[1] * scale)
    ax.set_xlabel(f"{xlabel} (%, 95% CI)" if percent else xlabel)
    ax.invert_yaxis()
    return Figure(title, figure_png(fig), caption)
