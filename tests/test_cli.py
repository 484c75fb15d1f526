"""The command line: every verb, YAML config + flag overrides, one-line errors, and the demo at a tiny size."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lmlab.cli import main
from lmlab.data import unigram_perplexity
from lmlab.train.loop import TrainConfig


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code != 0
    errors = [line for line in err.splitlines() if line.startswith("lmlab: error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.mark.parametrize(
    "verb",
    [
        ["tokenizer", "train"],
        ["prepare"],
        ["pretrain"],
        ["finetune"],
        ["evaluate"],
        ["generate"],
        ["critique"],
        ["merge-lora"],
        ["serve"],
        ["info"],
        ["demo"],
    ],
)
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*verb, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out
    assert "(default: True)" not in out  # a --no-… switch is off unless given


def test_pretrain_help_documents_every_training_option(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in out or "--no-" + f.name.replace("_", "-") in out, flag
        assert f.metadata["help"].split()[0] in out


def test_the_whole_pipeline_through_the_cli(corpus_file, tmp_path, capsys):
    tok, data, runs = tmp_path / "tok", tmp_path / "data", tmp_path / "runs" / "a"
    code, out, _ = run(
        capsys,
        "tokenizer",
        "train",
        "--input",
        str(corpus_file),
        "--kind",
        "bpe",
        "--vocab-size",
        "400",
        "--out",
        str(tok),
    )
    assert code == 0 and (tok / "tokenizer.json").is_file()
    code, out, _ = run(
        capsys, "prepare", "--input", str(corpus_file), "--tokenizer", str(tok), "--out", str(data), "--no-progress"
    )
    assert code == 0 and "train:" in out and (data / "manifest.json").is_file()

    config = tmp_path / "run.yaml"
    config.write_text(
        "max_steps: 100\nmicro_batch_size: 4\nseq_len: 32\neval_interval: 3\nwarmup_steps: 1\nprogress: "
        "false\ntensorboard: false\n"
    )
    argv = [
        "pretrain",
        "--config",
        str(config),
        "--model",
        "llama-tiny",
        "--data",
        str(data),
        "--out",
        str(runs),
        "--max-steps",
        "6",
    ]
    code, out, _ = run(capsys, *argv)  # the flag after --config overrides it: 6 steps, not 100
    assert code == 0
    assert "step-00000006" in out and (runs / "step-00000006" / "train_state.pt").is_file()
    assert not (runs / "step-00000009").exists()
    code, out, err = run(capsys, *argv, "--resume")  # already complete: nothing to do, still fine
    assert code == 0

    code, out, _ = run(
        capsys,
        "generate",
        str(runs / "step-00000006"),
        "--prompt",
        "The",
        "A list",
        "--max-new-tokens",
        "5",
        "--format",
        "jsonl",
    )
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["prompt"] for r in rows] == ["The", "A list"]
    code, out, _ = run(
        capsys,
        "generate",
        str(runs),
        "--prompt",
        "The",
        "--max-new-tokens",
        "5",
        "--strategy",
        "sample",
        "--top-k",
        "5",
        "--seed",
        "1",
        "--stream",
    )
    assert code == 0 and out.startswith("The")
    code, out, _ = run(capsys, "info", str(runs))
    assert code == 0 and "GFLOPs/tok" in out


def test_bad_input_gets_one_line_errors_and_writes_nothing(corpus_file, tokenizer_dir, data_dir, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, _, err = run(capsys, "tokenizer", "train", "--input", str(tmp_path / "missing.txt"), "--out", str(out_dir))
    assert_one_line_error(code, err, "missing.txt", "no such file")

    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    code, _, err = run(
        capsys,
        "prepare",
        "--input",
        str(tmp_path / "empty.txt"),
        "--tokenizer",
        str(tokenizer_dir),
        "--out",
        str(out_dir),
    )
    assert_one_line_error(code, err, "empty corpus")

    code, _, err = run(
        capsys, "tokenizer", "train", "--input", str(corpus_file), "--vocab-size", "10", "--out", str(out_dir)
    )
    assert_one_line_error(code, err, "--vocab-size")

    code, _, err = run(capsys, "pretrain", "--model", "gpt-9", "--data", str(data_dir), "--out", str(out_dir))
    assert_one_line_error(code, err, "unknown model preset 'gpt-9'", "gpt2-tiny")

    code, _, err = run(capsys, "generate", str(tmp_path), "--prompt", "x")
    assert_one_line_error(code, err, str(tmp_path), "is not a checkpoint")

    bad = tmp_path / "bad.yaml"
    bad.write_text("max_stepz: 3\n")
    code, _, err = run(capsys, "pretrain", "--config", str(bad), "--data", str(data_dir), "--out", str(out_dir))
    assert_one_line_error(code, err, "max_stepz")

    code, _, err = run(capsys, "pretrain", "--data", str(data_dir), "--out", str(out_dir), "--max-steps", "many")
    assert_one_line_error(code, err, "max_steps")
    assert not out_dir.exists()


def test_console_script_entry_point_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "lmlab.cli", "info", "gpt2-124m"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "124,439,808" in proc.stdout


def test_demo_runs_end_to_end_at_a_tiny_size(tmp_path, capsys):
    code, out, _ = run(
        capsys,
        "demo",
        "--out",
        str(tmp_path / "demo"),
        "--model",
        "gpt2-tiny",
        "--max-steps",
        "4",
        "--max-chars",
        "60000",
        "--vocab-size",
        "300",
        "--seq-len",
        "64",
        "--micro-batch-size",
        "4",
        "--finetune-steps",
        "2",
        "--critique-examples",
        "10",
        "--no-progress",
    )
    assert code == 0
    for name in (
        "corpus.jsonl",
        "heldout.jsonl",
        "tokenizer/tokenizer.json",
        "data/manifest.json",
        "data/canaries.json",
        "run/loss.png",
        "run/log.jsonl",
        "samples.txt",
        "classify/train.jsonl",
        "classify/eval/metrics.json",
        "classify/eval/predictions.jsonl",
        "critique/lm/report.html",
        "critique/lm/report.json",
        "critique/classifier/report.html",
    ):
        assert (tmp_path / "demo" / name).is_file(), name
    assert "[greedy] The for statement" in out and "[sample]" in out and "[beam×4]" in out
    from lmlab.io.checkpoint import latest_checkpoint, load_train_state

    trained = load_train_state(latest_checkpoint(tmp_path / "demo" / "run"))["train_config"]
    assert (trained["seq_len"], trained["micro_batch_size"]) == (64, 4)  # the demo's sizes are its flags
    assert "accuracy" in out and "95% CI" in out
    # the model's validation perplexity beside the unigram baseline's, on the same split and tokenizer
    assert re.search(
        r"validation perplexity [\d.]+ \(loss [\d.]+\) on [\d,]+ tokens; a unigram model of the train "
        r"split's token frequencies: [\d.]+; a uniform guess: 300",
        out,
    )
    assert f"frequencies: {unigram_perplexity(tmp_path / 'demo' / 'data'):.1f};" in out
    lm = json.loads((tmp_path / "demo" / "critique" / "lm" / "report.json").read_text())["lenses"]
    assert (
        "canary_space_size" in json.dumps(lm["privacy"]) and "skipped" not in lm["bias"]
    )  # the planted canaries are measured


def test_generate_help_documents_every_decoding_option(capsys):
    from lmlab.generate import GenerationConfig

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(GenerationConfig):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "--interactive" in out and "--logprobs" in out and "last tokens" in out  # truncation is stated


def test_generate_strategies_formats_files_and_the_repl(trained_run, tmp_path, capsys, monkeypatch):
    code, out, _ = run(
        capsys,
        "generate",
        str(trained_run),
        "--prompt",
        "Once",
        "--strategy",
        "beam",
        "--num-beams",
        "4",
        "--repetition-penalty",
        "1.2",
        "--stream",
        "--max-new-tokens",
        "8",
    )
    assert code == 0 and out.startswith("Once")

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "The"}\n\n{"prompt": "大语言"}\n', encoding="utf-8")
    target = tmp_path / "out" / "samples.jsonl"
    code, out, err = run(
        capsys,
        "generate",
        str(trained_run),
        "--prompts-file",
        str(prompts),
        "--strategy",
        "sample",
        "--temperature",
        "0.8",
        "--top-k",
        "50",
        "--top-p",
        "0.95",
        "--seed",
        "1",
        "--num-return-sequences",
        "2",
        "--format",
        "jsonl",
        "--logprobs",
        "2",
        "--max-new-tokens",
        "4",
        "--output",
        str(target),
    )
    assert code == 0 and out == "" and "4 output(s)" in err
    rows = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    assert [(r["prompt"], r["index"]) for r in rows] == [("The", 0), ("The", 1), ("大语言", 0), ("大语言", 1)]
    assert all(len(r["logprobs"]) == len(r["token_ids"]) == len(r["top_logprobs"]) for r in rows)
    assert all(
        len(alts) == 2 and {"id", "token", "logprob"} <= set(alts[0]) for r in rows for alts in r["top_logprobs"]
    )
    assert not list(target.parent.glob(".*tmp*"))

    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("The\n\n/quit\nnever read\n"))
    code, out, err = run(capsys, "generate", str(trained_run), "--interactive", "--max-new-tokens", "3")
    assert code == 0 and out.startswith("» The") and out.count("» ") == 3 and "Ctrl-D" in err  # ends at /quit


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--strategy", "sample", "--top-p", "1.5"], "--top-p is 1.5"),
        (["--strategy", "sample", "--num-beams", "4"], "--num-beams 4 needs --strategy beam"),
        (["--strategy", "sample", "--temperature", "-1"], "--temperature is -1.0"),
        (["--top-k", "-3", "--strategy", "sample"], "--top-k is -3"),
        (["--prompt", "a", "b", "--stream"], "--stream prints one prompt"),
        (["--logprobs", "2"], "--logprobs N needs --format jsonl"),
        (["--truncate", "middle"], "--truncate is 'middle'"),
    ],
)
def test_generate_bad_flags_are_one_line_errors(trained_run, capsys, flags, needle):
    argv = ["generate", str(trained_run), *(["--prompt", "x"] if "--prompt" not in flags else []), *flags]
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, needle)


def test_generate_prompts_file_with_a_draft_batches_and_prints_the_plain_output(trained_run, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The\nOnce upon a time\nThe the the\n", encoding="utf-8")
    argv = ["generate", str(trained_run), "--prompts-file", str(prompts), "--max-new-tokens", "6", "--ignore-eos"]
    code, plain, _ = run(capsys, *argv, "--format", "jsonl")
    assert code == 0
    code, drafted, _ = run(capsys, *argv, "--format", "jsonl", "--draft", "prompt-lookup", "--batch-size", "2")
    assert code == 0 and drafted == plain and len(drafted.splitlines()) == 3


def test_generate_an_empty_prompt_is_a_one_line_error(trained_run, capsys):
    code, _, err = run(capsys, "generate", str(trained_run), "--prompt", "")
    assert_one_line_error(code, err, "prompt 0 is empty")


def test_prepare_plants_canaries_and_critique_measures_them(corpus_file, tokenizer_dir, trained_run, tmp_path, capsys):
    code, out, _ = run(
        capsys,
        "prepare",
        "--input",
        str(corpus_file),
        "--tokenizer",
        str(tokenizer_dir),
        "--out",
        str(tmp_path / "data"),
        "--canaries",
        "2",
        "--canary-digits",
        "3",
        "--canary-repeats",
        "5",
        "--no-progress",
    )
    assert code == 0
    record = json.loads((tmp_path / "data" / "canaries.json").read_text())
    assert record["space_size"] == 1000 and len(record["planted"]) == 2
    code, out, err = run(
        capsys,
        "critique",
        str(trained_run),
        "--lenses",
        "privacy,efficiency,robustness",
        "--train-data",
        str(tmp_path / "data"),
        "--text",
        str(corpus_file),
        "--perturbations",
        "case,typos",
        "--power-watts",
        "100",
        "--grid-intensity",
        "0.5",
        "--max-examples",
        "8",
        "--extraction-prefix",
        "8",
        "--extraction-suffix",
        "8",
        "--out",
        str(tmp_path / "c"),
        "--no-progress",
    )
    assert code == 0, err
    assert "privacy:" in out and "efficiency:" in out and "report.html" in out
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert report["lenses"]["privacy"]["metrics"]["canary_space_size"] == 1000
    efficiency = report["lenses"]["efficiency"]["metrics"]
    assert efficiency["power_watts"] == 100 and efficiency["co2_kg"] == pytest.approx(efficiency["energy_kwh"] * 0.5)
    assert "case" in json.dumps(report["lenses"]["robustness"]["metrics"]) and "whitespace" not in json.dumps(
        report["lenses"]["robustness"]["metrics"]
    )
    code, _, err = run(capsys, "critique", str(trained_run), "--lenses", "privacy,speed", "--out", str(tmp_path / "d"))
    assert_one_line_error(code, err, "unknown lens 'speed'")


def test_damaged_files_and_absurd_sizes_are_one_line_errors(corpus_file, trained_run, tmp_path, capsys):
    import shutil

    code, _, err = run(
        capsys,
        "tokenizer",
        "train",
        "--input",
        str(corpus_file),
        "--vocab-size",
        "10000000000",
        "--out",
        str(tmp_path / "tok"),
    )
    assert_one_line_error(
        code, err, "--vocab-size 10,000,000,000: expected at most 16,777,216"
    )  # was a Rust abort (exit 134)

    code, _, err = run(capsys, "evaluate", str(trained_run), "--data", str(corpus_file), "--n-resamples", "1000000000")
    assert_one_line_error(code, err, "--n-resamples: expected a positive integer up to 100,000")

    checkpoint = shutil.copytree(trained_run / "best", tmp_path / "ck")
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, _, err = run(capsys, "generate", str(checkpoint), "--prompt", "x")
    assert_one_line_error(
        code, err, "model.safetensors: damaged or not a safetensors file (Error while deserializing header"
    )


def test_a_verbs_flags_take_their_defaults_from_the_function_it_calls():
    import inspect

    from lmlab.api import LM, load
    from lmlab.cli import build_parser
    from lmlab.critique import critique
    from lmlab.demo import run_demo
    from lmlab.evaluate.runner import evaluate
    from lmlab.generate import GenerationConfig
    from lmlab.train.finetune import DERIVED, FINETUNE_DEFAULTS, finetune

    def flags(verb):
        sub = next(a for a in build_parser(only=verb)._actions if a.dest == "command").choices[verb]
        return {a.dest: a for a in sub._actions}

    fields = [f for f in dataclasses.fields(TrainConfig) if f.name != "seq_len"]
    # max_steps and lr: None, the library works them out (--epochs, LoRA's rate, a resumed run's own)
    train_defaults = {f.name: None if f.name in DERIVED else FINETUNE_DEFAULTS.get(f.name, f.default) for f in fields}
    cases = {
        "evaluate": [evaluate],
        "critique": [critique],
        "demo": [run_demo],
        "finetune": [finetune, train_defaults],
        "generate": [load, LM.generate_records, GenerationConfig],
    }
    for verb, sources in cases.items():
        actions, checked = flags(verb), 0
        for source in sources:
            if dataclasses.is_dataclass(source):
                fields = dataclasses.fields(source)
                source = {f.name: f.default_factory() if callable(f.default_factory) else f.default for f in fields}
            if not isinstance(source, dict):
                params = inspect.signature(source).parameters.items()
                source = {k: p.default for k, p in params if p.default is not inspect.Parameter.empty}
            defaults = source
            for name, default in defaults.items():
                if name in actions:
                    assert actions[name].default == default, (verb, name)
                    checked += 1
        assert checked >= 8, verb
    assert flags("evaluate")["device"].default == "cpu"  # each verb's own, as its function says
    assert flags("generate")["device"].default == "auto"


# -------------------------------------------------------------------------------- the README's examples
README = Path(__file__).resolve().parents[1] / "README.md"
# what the README's sizes become here; every other word of its commands is run as written
TINY_VALUES = {"--vocab-size": "600", "--max-steps": "4"}
TINY_PRETRAIN = "--micro-batch-size 4 --seq-len 64 --eval-interval 4 --eval-batches 1 --warmup-steps 1 --no-progress"


def readme_commands(needle: str) -> list[list[str]]:
    """The ``lmlab`` command lines of the README's bash block that holds ``needle``, split as a shell would."""
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S) if needle in b]
    assert len(blocks) == 1, f"expected one bash block of README.md with {needle!r}"
    return [shlex.split(line, comments=True) for line in blocks[0].splitlines() if line.startswith("lmlab ")]


def test_the_readme_span_pretraining_example_runs_as_written_from_a_text_file(tmp_path, monkeypatch, capsys):
    from lmlab.data import builtin_corpus
    from lmlab.io.checkpoint import load_model
    from lmlab.model.seq2seq import Seq2SeqLM
    from lmlab.tokenizer import Tokenizer

    monkeypatch.chdir(tmp_path)
    Path("corpus.txt").write_text("\n\n".join(builtin_corpus(max_chars=40_000)), encoding="utf-8")  # one document
    commands = readme_commands("--objective span")
    assert [argv[1] for argv in commands] == ["tokenizer", "prepare", "pretrain"]
    for argv in commands:
        argv = [TINY_VALUES.get(flag, word) for flag, word in zip(["", *argv], argv)][1:]
        argv += TINY_PRETRAIN.split() if argv[0] == "pretrain" else []
        code = main(argv)
        assert code == 0, capsys.readouterr().err
    tok = Tokenizer.load("tok-t5")
    assert tok.token_to_id("<extra_id_99>") is not None and tok.token_to_id("<extra_id_100>") is None
    manifest = json.loads(Path("data-t5/manifest.json").read_text())
    assert manifest["split_by"] == "tokens" and manifest["splits"]["valid"]["tokens"] > 0
    records = [json.loads(line) for line in Path("runs/t5/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [4]
    assert isinstance(load_model("runs/t5"), Seq2SeqLM)
