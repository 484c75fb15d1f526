"""lmlab's top-level names (lmlab/__init__.py) and the packages that are also verbs (lmlab/verb.py)."""

import inspect
import subprocess
import sys

import pytest

import lmlab


def test_every_exported_name_resolves_and_every_verb_is_exported():
    for name in lmlab.__all__:
        assert getattr(lmlab, name) is not None, name
    for verb in (
        "prepare",
        "pretrain",
        "finetune",
        "evaluate",
        "critique",
        "export_hf",
        "merge_checkpoint",
        "load",
        "run_demo",
    ):
        assert callable(getattr(lmlab, verb)), verb


@pytest.mark.slow
def test_evaluate_and_critique_are_the_verbs_whatever_was_imported_first():
    """Importing a submodule binds the package to the name: the package itself must then be the verb."""
    code = (
        "import inspect, lmlab, lmlab.critique.core, lmlab.evaluate.runner\n"
        "from lmlab.critique import critique\nfrom lmlab.evaluate.runner import evaluate\n"
        "assert inspect.signature(lmlab.critique) == inspect.signature(critique)\n"
        "assert inspect.signature(lmlab.evaluate) == inspect.signature(evaluate)\n"
        "assert lmlab.critique.core.Section and lmlab.evaluate.runner.evaluate\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_calling_the_package_calls_the_function(tmp_path):
    from lmlab.errors import LmlabError

    with pytest.raises(LmlabError, match="n_resamples"):
        lmlab.evaluate(tmp_path, tmp_path, n_resamples=0)  # the verb's own first check, before any file is read
    assert "checkpoint" in inspect.signature(lmlab.critique).parameters
