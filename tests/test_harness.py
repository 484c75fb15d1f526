"""lmlab.evaluate.harness: the lm-evaluation-harness backend against lm-eval's own ``hf`` model on the same weights
(the ``lmlab.export_hf`` folder of the checkpoint), on the example tasks in examples/harness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from conftest import TINY_BART  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from lmlab.errors import LmlabError  # noqa: E402

TASKS = Path(__file__).resolve().parent.parent / "examples" / "harness"
LL_TOL = 1e-4  # per-example log-likelihood, lmlab against transformers


def _export(checkpoint, folder) -> Path:
    import lmlab

    lmlab.export_hf(checkpoint, folder)
    return folder


def _random_checkpoint(folder: Path, name: str, tokenizer_dir: Path) -> Path:
    """An untrained model (seed 0): its greedy continuations vary from prompt to prompt, unlike a barely trained
    one's, so generation is compared on many different tokens. ``name``: a preset, or ``bart``."""
    from lmlab.config import ModelConfig, preset
    from lmlab.io.checkpoint import save_checkpoint
    from lmlab.model import build_model
    from lmlab.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    if name == "bart":
        config = ModelConfig(**TINY_BART, vocab_size=tok.vocab_size, decoder_start_token_id=tok.eos_id or 0)
    else:
        config = preset(name, vocab_size=tok.vocab_size)
    return save_checkpoint(folder / name, build_model(config), tokenizer=tok)


def _hf(folder: Path, **options):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(folder), device="cpu", batch_size=8, **options)


def _lmlab(path: Path, **options):
    from lmlab.evaluate.harness import LmlabLM

    return LmlabLM(pretrained=str(path), device="cpu", **{"batch_size": 8, **options})


def _requests(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(arguments)]


@pytest.fixture(scope="module")
def hf_folder(trained_run, tmp_path_factory) -> Path:
    return _export(trained_run, tmp_path_factory.mktemp("harness-hf") / "hf")


@pytest.fixture(scope="module")
def both(trained_run, hf_folder) -> dict:
    """The two example tasks, 2-shot, through both backends: lm-eval's results with per-example samples."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    out = {}
    for name, model in (("lmlab", _lmlab(trained_run)), ("hf", _hf(hf_folder))):
        out[name] = lm_eval.simple_evaluate(
            model, tasks=["lmlab_mc", "lmlab_gen"], num_fewshot=2, task_manager=manager, log_samples=True
        )
    return out


@pytest.mark.slow
def test_multiple_choice_loglikelihoods_and_accuracy_match_hf(both):
    ours, theirs = both["lmlab"]["samples"]["lmlab_mc"], both["hf"]["samples"]["lmlab_mc"]
    assert len(ours) == len(theirs) == 24
    for a, b in zip(ours, theirs):
        assert a["arguments"] == b["arguments"]  # the same prompts, few-shot examples included
        for (ll_a, greedy_a), (ll_b, greedy_b) in zip(a["filtered_resps"], b["filtered_resps"]):
            assert ll_a == pytest.approx(ll_b, abs=LL_TOL)
            assert greedy_a == greedy_b
    for metric in ("acc,none", "acc_norm,none"):
        assert both["lmlab"]["results"]["lmlab_mc"][metric] == both["hf"]["results"]["lmlab_mc"][metric]


@pytest.mark.slow
def test_generation_task_matches_hf(both):
    ours, theirs = both["lmlab"]["samples"]["lmlab_gen"], both["hf"]["samples"]["lmlab_gen"]
    assert [s["resps"] for s in ours] == [s["resps"] for s in theirs]
    assert both["lmlab"]["results"]["lmlab_gen"] == both["hf"]["results"]["lmlab_gen"]


@pytest.mark.slow
def test_loglikelihood_rolling_matches_hf(trained_run, hf_folder, corpus_file):
    """Texts longer than the 128-token window: several disjoint windows each, scored in one batch."""
    docs = [json.loads(line)["text"] for line in corpus_file.read_text().splitlines()[:6]]
    texts = [d[:1500] for d in docs] + ["A short one."]
    requests = _requests("loglikelihood_rolling", [(t,) for t in texts])
    ours = _lmlab(trained_run).loglikelihood_rolling(requests)
    theirs = _hf(hf_folder).loglikelihood_rolling(requests)
    assert len(_lmlab(trained_run).tok_encode(texts[0])) > 256  # three windows or more
    assert ours == pytest.approx(theirs, rel=1e-5, abs=LL_TOL)


@pytest.mark.slow
def test_greedy_generate_until_matches_hf(tokenizer_dir, tmp_path):
    """Prompts of different lengths in one batch (left padding), stop strings, a length limit: what lmlab's
    KV-cached loop makes is what transformers' generate makes, cut the same way."""
    path = _random_checkpoint(tmp_path, "gpt2-tiny", tokenizer_dir)
    hf = _export(path, tmp_path / "hf")
    prompts = ["The", "Once upon a time there was", "A cat sat on the mat and then", "Why", "In the beginning"]
    options = [{"until": ["e"], "max_gen_toks": 20}, {"until": ["\n\n", "."], "max_gen_toks": 12, "do_sample": False}]
    requests = _requests("generate_until", [(p, o) for o in options for p in prompts])
    ours, theirs = _lmlab(path, batch_size=3).generate_until(requests), _hf(hf).generate_until(requests)
    assert ours == theirs
    assert len(set(ours)) > 3 and all("e" not in text for text in ours[: len(prompts)])


@pytest.mark.slow
def test_encoder_decoder_matches_hf_seq2seq(tokenizer_dir, tmp_path):
    """A BART-style model: the context is the source, the continuation the target (lm-eval's seq2seq backend)."""
    path = _random_checkpoint(tmp_path, "bart", tokenizer_dir)
    hf = _export(path, tmp_path / "hf")
    ours, theirs = _lmlab(path, batch_size=3), _hf(hf, backend="seq2seq")
    assert ours.backend == "seq2seq"
    pairs = [("The cat sat on", " the mat"), ("Once upon a time", " there was a king"), ("Why", " not"), ("A", " b")]
    requests = _requests("loglikelihood", pairs)
    for (a, greedy_a), (b, greedy_b) in zip(ours.loglikelihood(requests), theirs.loglikelihood(requests)):
        assert a == pytest.approx(b, abs=LL_TOL) and greedy_a == greedy_b
    gen = _requests("generate_until", [(c, {"until": ["\n"], "max_gen_toks": 8}) for c, _ in pairs])
    assert ours.generate_until(gen) == theirs.generate_until(gen)


def test_the_choices_of_one_context_share_one_row(trained_run, monkeypatch):
    """Choices of one and several tokens after one context: one row, one forward pass; each choice's answer is
    what lmlab's own scorer gives it alone. (A choice longer than its context would get a row of its own.)"""
    lm = _lmlab(trained_run)
    context = "Once upon a time, in a quiet little house, the old cat sat on the"  # longer than every choice
    choices = [" mat", " cupboard by the window", " a", " river bank"]
    assert sorted(len(lm.tok_encode(context + c)) - len(lm.tok_encode(context)) for c in choices)[-1] > 2
    rows = []
    forward = lm.lm.model.forward
    monkeypatch.setattr(lm.lm.model, "forward", lambda ids, **kw: rows.append(ids.shape[0]) or forward(ids, **kw))
    shared = lm.loglikelihood(_requests("loglikelihood", [(context, c) for c in choices]))
    assert rows == [1]
    alone = [lm.lm.score(context, c).logprob for c in choices]
    assert [ll for ll, _ in shared] == pytest.approx(alone, abs=1e-5)


def test_batching_does_not_change_scores(trained_run):
    """Right padding is never attended: a request scores the same alone and in a padded batch."""
    pairs = [("The cat", " sat on the mat"), ("Once upon a time, in a land far away,", " a king"), ("A", " b c")]
    requests = _requests("loglikelihood", pairs)
    one, eight = _lmlab(trained_run, batch_size=1), _lmlab(trained_run, batch_size=8)
    batched = eight.loglikelihood(requests)
    assert [ll for ll, _ in one.loglikelihood(requests)] == pytest.approx([ll for ll, _ in batched], abs=1e-5)
    alone = one.lm.score("The cat", " sat on the mat")  # lmlab's own scorer, one request unbatched
    assert batched[0][0] == pytest.approx(alone.logprob, abs=1e-5)


@pytest.mark.slow
def test_evaluate_harness_writes_lm_evals_results(trained_run, tmp_path):
    import lmlab

    out = tmp_path / "eval"
    result = lmlab.evaluate(trained_run, harness="lmlab_mc,lmlab_gen", harness_include=TASKS, limit=6, out=out)
    harness = json.loads((out / "harness.json").read_text())
    assert result["lmlab_mc/acc"] == harness["results"]["lmlab_mc"]["acc,none"]
    assert result["lmlab_gen/exact_match/strip"] == harness["results"]["lmlab_gen"]["exact_match,strip"]
    low, high = result["ci"]["lmlab_mc/acc"]["low"], result["ci"]["lmlab_mc/acc"]["high"]
    assert low <= result["lmlab_mc/acc"] <= high
    samples = [json.loads(line) for line in (out / "harness_samples.jsonl").read_text().splitlines()]
    assert sorted({s["task"] for s in samples}) == ["lmlab_gen", "lmlab_mc"] and len(samples) == 12
    assert json.loads((out / "metrics.json").read_text())["lmlab_mc/acc"] == result["lmlab_mc/acc"]
    lmlab.evaluate(trained_run, harness="lmlab_mc", harness_include=TASKS, limit=2, out=out)  # its own folder again


@pytest.mark.parametrize(
    "options, names",
    [
        (dict(data="x.jsonl", harness="lmlab_mc"), "data"),
        (dict(), "data"),
        (dict(data="x.jsonl", limit=3), "limit"),
        (dict(harness="lmlab_mc", num_fewshot=-1), "num_fewshot"),
        (dict(harness="lmlab_mc", limit=0), "limit"),
    ],
)
def test_evaluate_harness_refuses_bad_options(trained_run, options, names):
    import lmlab

    with pytest.raises(LmlabError) as e:
        lmlab.evaluate(trained_run, **options)
    assert names in e.value.params


def test_a_missing_task_folder_is_a_one_line_error(trained_run, tmp_path):
    from lmlab.api import load
    from lmlab.evaluate.harness import run_harness

    with pytest.raises(LmlabError, match="not a folder"):
        run_harness(load(trained_run, device="cpu"), "lmlab_mc", include=tmp_path / "missing")


@pytest.mark.slow
def test_an_unknown_task_is_a_one_line_error(trained_run):
    """Not in the folder: lm-eval's own tasks are indexed too (half a minute), and the name is in neither."""
    from lmlab.api import load
    from lmlab.evaluate.harness import run_harness

    with pytest.raises(LmlabError, match="no_such_task"):
        run_harness(load(trained_run, device="cpu"), "lmlab_mc,no_such_task", include=TASKS)


def test_model_args_win_over_lm_evals_flags(trained_run):
    """`--model_args batch_size=8` with lm-eval's own --batch_size default: the model's setting is kept (lm-eval's
    hf model would get it twice and fail); lm-eval's default cuda:0 on a machine without one falls back."""
    from lmlab.evaluate.harness import LmlabLM

    extra = {"batch_size": 1, "device": "cuda:0" if not torch.cuda.is_available() else None}
    lm = LmlabLM.create_from_arg_string(f"pretrained={trained_run},batch_size=4", extra)
    assert lm.batch_size == 4 and lm.device.type in ("cpu", "cuda", "mps")
    with pytest.raises(LmlabError, match="batch_size"):
        LmlabLM(pretrained=str(trained_run), batch_size="auto")
    with pytest.raises(LmlabError, match="unknown model argument.*batchsize"):
        LmlabLM.create_from_arg_string(f"pretrained={trained_run},batchsize=4")


@pytest.mark.slow
def test_lmlab_evaluate_harness_on_the_command_line(trained_run, tmp_path, capsys):
    from lmlab.cli import main

    out = tmp_path / "eval"
    argv = ["evaluate", str(trained_run), "--harness", "lmlab_mc", "--harness-include", str(TASKS), "--limit", "3"]
    assert main([*argv, "--num-fewshot", "1", "--batch-size", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "lmlab_mc/acc:" in printed and f"{out / 'harness.json'}" in printed
    assert json.loads((out / "harness.json").read_text())["n-shot"]["lmlab_mc"] == 1
    assert main([*argv, "--data", "test.jsonl"]) == 1  # one line naming both flags
    assert "--data" in capsys.readouterr().err


def test_lmlab_is_declared_in_lm_evals_model_entry_points():
    """The `lm_eval.models` entry point names the class lm-eval's registry holds, and resolves lazily the way
    lm-eval's plugin discovery registers it (an EntryPoint placeholder, materialised on first lookup)."""
    from importlib.metadata import entry_points

    from lm_eval.api.registry import Registry, get_model

    from lmlab.evaluate.harness import LmlabLM

    (point,) = [ep for ep in entry_points(group="lm_eval.models") if ep.name == "lmlab"]
    assert point.load() is LmlabLM is get_model("lmlab")
    registry = Registry("model")
    registry.register("lmlab", target=point)
    assert registry.get("lmlab") is LmlabLM


def test_sampled_generations_are_seeded_per_batch(trained_run):
    """Sampling: one prompt in two batches draws differently (each batch its own generator), and the same seed
    repeats the run exactly while another seed changes it."""
    options = {"until": ["\n\n"], "max_gen_toks": 16, "do_sample": True, "temperature": 1.0}
    requests = _requests("generate_until", [("The", options)] * 2)

    def run(seed):
        return _lmlab(trained_run, batch_size=1, seed=seed).generate_until(requests)

    first = run(7)
    assert first[0] != first[1]
    assert run(7) == first and run(8) != first
    with pytest.raises(LmlabError, match="seed 'x': expected an integer") as e:
        _lmlab(trained_run, seed="x")
    assert e.value.params == ("seed",)
