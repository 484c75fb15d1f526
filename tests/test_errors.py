"""LmlabError: library messages name parameters, the CLI shows them as flags; warnings as one line."""

from __future__ import annotations

import logging
import pickle

from lmlab.errors import LmlabError, log_warnings_as_one_line

FLAGS = {"out": "--out", "max_length": "--max-length", "overwrite": "--overwrite", "lr": "--lr"}


def test_each_named_parameter_is_shown_as_its_flag():
    e = LmlabError("max_length 9 exceeds the model's block_size 8: lower max_length", params="max_length")
    assert str(e) == "max_length 9 exceeds the model's block_size 8: lower max_length"
    assert e.naming(FLAGS.get) == "--max-length 9 exceeds the model's block_size 8: lower --max-length"


def test_a_parameter_inside_a_path_or_a_longer_word_is_left_alone():
    e = LmlabError("out runs/out/x.out exists and is not an lmlab run: choose another out", params="out")
    assert e.naming(FLAGS.get) == "--out runs/out/x.out exists and is not an lmlab run: choose another --out"
    e = LmlabError("out out.txt: outputs 'out' here", params="out")
    assert e.naming(FLAGS.get) == "--out out.txt: outputs 'out' here"


def test_a_parameter_without_a_flag_keeps_its_name_and_unnamed_words_are_never_swapped():
    e = LmlabError("seed is -1 and lr is 0", params="seed")
    assert e.naming(FLAGS.get) == "seed is -1 and lr is 0"  # seed: no flag; lr: not named by the error


def test_the_parameters_survive_a_trip_between_processes():
    e = pickle.loads(pickle.dumps(LmlabError("lr is 0: expected a positive number", params="lr")))
    assert e.params == ("lr",) and e.naming(FLAGS.get) == "--lr is 0: expected a positive number"


def test_library_warnings_reach_the_terminal_as_one_line(capsys):
    log_warnings_as_one_line()
    logging.getLogger("lmlab.test").warning("a %s thing", "noted")
    assert capsys.readouterr().err == "lmlab: warning: a noted thing\n"
