"""Loads a task's JSON Lines files from this folder, whatever the working directory (lm-eval's own
``dataset_path: json`` reads ``data_files`` relative to the working directory instead)."""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def local_jsonl(data_files, **_metadata):
    """A DatasetDict of ``data_files`` (split name -> a file name in this folder); no hub, no cache."""
    splits = {}
    for split, name in data_files.items():
        lines = (HERE / name).read_text(encoding="utf-8").splitlines()
        splits[split] = datasets.Dataset.from_list([json.loads(line) for line in lines if line.strip()])
    return datasets.DatasetDict(splits)
