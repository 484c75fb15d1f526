"""lmlab's command line, built from the API: flags from a function's signature and docstring, verbs as subcommands.

With jsonargparse: ``max_length: int = 128`` is ``--max-length``, an int that defaults to 128; ``verify: bool = True``
is the switch ``--no-verify``; a parameter without a default is a required flag (positional when named in
:data:`POSITIONAL`); the help is the parameter's entry in the docstring's ``Args:`` section (Google style), or
:data:`SHARED`'s for the flags several verbs share. ``--config file.yaml`` supplies any flag by its name with
underscores (``max_steps: 2000``; flags given after it override it; an unknown key is an error). :func:`run_verbs`
parses and runs a :class:`Verb`: usage errors print as one line and return 2, library errors (:class:`LmlabError`) 1;
tracebacks are kept for bugs. :mod:`lmlab.cli` holds lmlab's verbs.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter

from lmlab.errors import LmlabError, log_warnings_as_one_line

NO_DEFAULT = inspect.Parameter.empty
POSITIONAL = ("checkpoint",)  # a parameter of these names without a default is positional; others are --flags

# The help of the flags several verbs share, written once (a verb may give its own): dest → help
SHARED = {
    "checkpoint": "checkpoint folder (or run folder: its best checkpoint)",
    "device": "auto, cpu, cuda, cuda:1, …",
    "verify": "a Hugging Face folder: skip the one-time logits check against transformers",
    "overwrite": "write into an existing {} that is not lmlab's own output of this kind: lmlab replaces the files it "
    "writes and deletes nothing else (default: refuse such a folder)",
    "progress": "hide progress bars and messages",
    "resume": "continue the latest checkpoint in --out exactly where it stopped",
    "dry_run": "build and check everything the run would, train nothing, write nothing: print the predicted peak "
    "memory of a training step (parameters, gradients, optimizer state, activations, logits) and, when it does not "
    "fit the budget, what to change",
    "memory_budget": "GiB a training step may use, for --dry-run (default: the GPU's memory; none on a CPU)",
    "input": "text files, folders and globs (.txt .md .jsonl .csv .tsv .parquet)",
    "column": "CSV/TSV/Parquet column holding the text (default: --text-field)",
    "normalize": "Unicode normalisation: NFC, NFKC, NFD or NFKD (default: none)",
    "dedup": "keep exact duplicate documents (default: drop them)",
    "text_field": "the JSONL field (and default CSV/TSV/Parquet column) holding the text",
    "pair_field": "classify: the second text of a pair",
    "label_field": "classify: the label field/column (a name, a list of names, or a number)",
    "source_field": "seq2seq: the source field (records with prompt/completion work too)",
    "target_field": "seq2seq: the target field",
    "group_field": "the group/slice column for per-group metrics",
}


class Help(DefaultHelpFormatter):
    """jsonargparse's help, minus its "(type: …, default: …)" suffix where our text already names the
    default, and on ``--no-…`` switches, whose stored default (True: the thing is on) would read as if
    the switch itself were on by default."""

    def _get_help_string(self, action) -> str:
        if action.help and ("(default" in action.help or isinstance(action, argparse._StoreFalseAction)):
            return action.help
        return super()._get_help_string(action)


def new_parser(description: str | None, config: bool = True) -> ArgumentParser:
    parser = ArgumentParser(description=description, exit_on_error=False, formatter_class=Help)
    if config:
        help = "YAML file with any of these options (keys use underscores: max_steps: 100)"
        parser.add_argument("--config", action=ActionConfigFile, help=help)
    return parser


def cli_type(annotation: Any) -> Any:
    """The type a flag parses for a parameter's annotation: ``str | Path`` → str, ``int | None`` → Optional[int],
    ``Sequence[int]`` → int (one item of ``nargs``)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    parts = {p.strip(" []") for p in text.replace("[", "|").split("|")}
    base = next((t for t in (bool, int, float) if t.__name__ in parts), str)
    return Optional[base] if "None" in parts and base is not bool else base


def add(parser: ArgumentParser, dest: str, help: str, annotation: Any, default: Any = NO_DEFAULT, **kw: Any) -> None:
    """The flag of one parameter: a bool is a switch (``--no-x`` when on by default), a parameter without a
    default is required (positional when named in :data:`POSITIONAL`), any other names its default."""
    kind, flag = kw.pop("type", cli_type(annotation)), "--" + dest.replace("_", "-")
    if default is NO_DEFAULT and dest in POSITIONAL:
        parser.add_argument(dest, help=help, **kw)
    elif kind is bool:
        on = default is True
        names = ("--no-" + flag[2:] if on else flag, *kw.pop("aliases", ()))
        parser.add_argument(*names, dest=dest, action="store_false" if on else "store_true", help=help)
    else:
        if default is NO_DEFAULT:
            default, kw["required"] = None, True
        elif default is not None and "(default" not in help:
            help += f" (default: {default})"
        if "nargs" in kw:  # the type of one item
            kind = next((t for t in (int, float) if t.__name__ in str(kind)), str)
        typed = {} if kind is str else {"type": kind}  # a str is stored as given
        parser.add_argument(flag, dest=dest, default=default, help=help, **typed, **kw)


def doc_args(fn: Callable) -> dict[str, str]:
    """The ``Args:`` section of ``fn``'s docstring (Google style, as litgpt's and jsonargparse's): name → text."""
    fn = inspect.unwrap(fn)  # lmlab.evaluate and lmlab.critique are packages that call their function
    lines, found, name = inspect.getdoc(fn).splitlines() if fn.__doc__ else [], {}, None
    for line in lines[lines.index("Args:") + 1 :] if "Args:" in lines else []:
        if line and not line.startswith(" "):
            break  # the next section
        head, _, text = line.strip().partition(":")
        if line.startswith("    ") and not line.startswith("     ") and head.isidentifier() and text:
            name, found[head] = head, text.strip()
        elif name and line.strip():
            found[name] += " " + line.strip()
    return found


def flags(
    parser: ArgumentParser,
    fn: Callable,
    own: str,
    shared: str = "",
    rename: dict | None = None,
    **kw: Any,
) -> None:
    """One flag per parameter of ``fn`` named in ``own`` (help: the parameter's text in ``fn``'s docstring, its
    ``Args:``) or in ``shared`` (help: :data:`SHARED`'s; ``*`` among them: where ``own`` go), typed and defaulted
    as ``fn`` says. ``rename``: dest → parameter where they differ; ``kw``: dest → more :func:`add` options
    (``help`` instead of the docstring's, ``required``, ``nargs``, ``what`` the --overwrite help names …)."""
    params, names, own, documented = inspect.signature(fn).parameters, shared.split(), own.split(), doc_args(fn)
    at = names.index("*") if "*" in names else 0  # where the verb's own flags go among the shared ones
    for dest in [*names[:at], *own, *names[at + ("*" in names) :]]:
        p = params[(rename or {}).get(dest, dest)]
        options = {"default": p.default, **kw.get(dest, {})}
        what = options.pop("what", "--out")
        help = options.pop("help", None) or (documented[p.name] if dest in own else SHARED[dest].format(what))
        if options.pop("required", False):
            options["default"] = NO_DEFAULT
        add(parser, dest, help, p.annotation, **options)


def dataclass_flags(
    parser: ArgumentParser,
    cls: type,
    skip: Sequence[str] = (),
    defaults: dict | None = None,
    helps: dict | None = None,
) -> None:
    """One flag per dataclass field, help from the field's metadata; ``defaults`` replaces some fields' defaults
    (fine-tuning starts from other values than pretraining), ``helps`` some fields' help (a default of None
    that the verb works out, which the help explains)."""
    for f in dataclasses.fields(cls):
        if f.name not in skip:
            listed = f.default_factory is not dataclasses.MISSING  # a list field: one or more values
            default = (defaults or {}).get(f.name, f.default_factory() if listed else f.default)
            text = (helps or {}).get(f.name, f.metadata.get("help", ""))
            help = f"do not: {text}" if default is True else text
            add(parser, f.name, help, f.type, default, **({"nargs": "+"} if listed else {}))


def optional_flags(
    parser: ArgumentParser, fn: Callable, names: str, prefix: str = "", rename: dict | None = None, **kw: Any
) -> None:
    """Flags for parameters of ``fn`` (``names``; ``rename``: dest → parameter) that default to None, so that ``fn``
    applies its own default, which the help names; the help is ``prefix`` and the parameter's docstring text (or
    ``kw``: dest → {"help": …})."""
    params, documented = inspect.signature(fn).parameters, doc_args(fn)
    for dest in names.split():
        p = params[(rename or {}).get(dest, dest)]
        help = prefix + kw.get(dest, {}).get("help", documented.get(p.name, ""))
        if p.default is not None and "(default" not in help:
            help += f" (default: {p.default})"
        add(parser, dest, help, f"{p.annotation} | None", None)


def kwargs_of(a, fn: Callable, rename: dict | None = None) -> dict[str, Any]:
    """The parsed flags that are parameters of ``fn`` (``rename``: dest → parameter where they differ); never
    ``--config``, the YAML file the flags were read from."""
    params, rename = inspect.signature(fn).parameters, rename or {}
    return {rename.get(k, k): v for k, v in vars(a).items() if rename.get(k, k) in params and k != "config"}


# -- verbs: a subcommand each, one-line errors -------------------------------------------------------------


class Verb(NamedTuple):
    """A subcommand: its line in ``PROG --help``; ``flags`` adds its flags to its parser; ``run`` runs it with the
    parsed flags, and its docstring is the description ``PROG VERB --help`` shows."""

    summary: str
    flags: Callable[[ArgumentParser], None]
    run: Callable[[Any], int]
    action: tuple[str, str, str] | None = None  # a second level (`lmlab tokenizer train`): name, description, summary


def _target(target: str) -> Callable:
    """The function a ``"module:name"`` string names, imported on first use (``--help`` of another verb imports
    nothing)."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def function_verb(
    summary: str,
    target: str,
    own: str,
    shared: str = "",
    help: str = "",
    show: Callable[[Any], str | int] = lambda result: result.summary(),
    rename: dict | None = None,
    options: str = "",
    **kw: Any,
) -> Verb:
    """A verb that calls one API function, ``target`` (``"lmlab.compress.quantization:quantize"``): its flags are
    the function's parameters named in ``own`` and ``shared`` (see :func:`flags`; ``rename`` and ``kw`` as there),
    and with ``options`` (``"lmlab.train.loop:TrainConfig"``) a flag per field of that dataclass, passed to the
    function as keyword arguments (its ``**train_args``); ``help`` the description ``PROG VERB --help`` shows; it
    runs the function with the parsed flags and passes the result to ``show``, which returns the text to print
    (exit status 0) or an exit status."""

    def run(a) -> int:
        fn = _target(target)
        extra = kwargs_of(a, _target(options)) if options else {}
        shown = show(fn(**kwargs_of(a, fn, rename), **extra))
        return shown if isinstance(shown, int) else print(shown) or 0

    def add_flags(parser: ArgumentParser) -> None:
        flags(parser, _target(target), own, shared, rename, **kw)
        if options:
            dataclass_flags(parser, _target(options))

    run.__doc__ = help
    return Verb(summary, add_flags, run)


def verbs_parser(verbs: dict[str, Verb], prog: str, description: str, only: str | None = None) -> ArgumentParser:
    """The parser of every verb; ``only``: the flags of that verb alone (the others list their names and
    summaries), so that a command imports no more than it runs."""
    root = ArgumentParser(prog=prog, description=description, exit_on_error=False, formatter_class=Help)
    commands = root.add_subcommands(dest="command", required=True)
    for name, verb in verbs.items():
        parser = flagged = new_parser(inspect.getdoc(verb.run))
        if verb.action:  # a second level (jsonargparse adds levels after the first)
            action, action_description, action_summary = verb.action
            parser = new_parser(action_description, config=False)
        commands.add_subcommand(name, parser, help=verb.summary)
        if verb.action:
            parser.add_subcommands(dest="action", required=True).add_subcommand(action, flagged, help=action_summary)
        if only in (None, name):
            verb.flags(flagged)
    return root


def _flags_by_dest(parser: ArgumentParser) -> dict[str, str]:
    """Each parameter's flag (``max_length`` → ``--max-length``) in ``parser`` and its verbs' parsers, so that a
    library error naming a parameter (:class:`LmlabError`'s ``params``) shows the flag the user typed."""
    found: dict[str, str] = {}
    for action in parser._actions:
        for sub in getattr(action, "_name_parser_map", {}).values():
            found.update(_flags_by_dest(sub))
        longs = [o for o in action.option_strings if o.startswith("--") and not o.startswith("--no-")]
        flag = longs[0] if longs else next(iter(action.option_strings), None)
        if flag and action.dest not in ("help", "config", "print_config"):
            found.setdefault(action.dest, flag)
    return found


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
                why = f"not a readable UTF-8 YAML file ({type(e).__name__})"
                raise ArgumentError(None, f"--config {name}: {why}") from None


def run_verbs(verbs: dict[str, Verb], prog: str, description: str, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's) and run its verb. A usage error prints as one line and returns 2,
    an :class:`LmlabError` as one line and returns 1, an interrupt returns 130; tracebacks are kept for bugs."""
    argv = list(argv) if argv is not None else sys.argv[1:]
    log_warnings_as_one_line()
    try:
        _check_config_files(argv)
        parser = verbs_parser(verbs, prog, description, only=argv[0] if argv and argv[0] in verbs else None)
        args = parser.parse_args(argv)
    except ArgumentError as e:
        # one line: what was wrong, and where the options are listed
        names = {*verbs, *(v.action[0] for v in verbs.values() if v.action)}
        verb = " ".join(a for a in argv[:2] if not a.startswith("-") and a in names)
        message = " ".join(line.strip() for line in str(e).splitlines())
        print(f"{prog}: error: {message} (see `{prog} {verb + ' ' if verb else ''}--help`)", file=sys.stderr)
        return 2
    try:
        return verbs[args.command].run(args[args.command])
    except LmlabError as e:
        print(f"{prog}: error: {e.naming(_flags_by_dest(parser).get)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
