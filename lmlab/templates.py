"""Chat templates: render conversations as the one string a model reads, as transformers does.

**Templates.** A chat template is the Jinja program in ``tokenizer_config.json`` (``chat_template``)
that turns ``messages`` — ``[{"role": "system" | "user" | "assistant", "content": "…"}, …]`` — into
the one string the model reads. :func:`render` runs it as ``transformers``' ``apply_chat_template``
does (``transformers/utils/chat_template_utils.py``), so an exported checkpoint renders the same
text: an ``ImmutableSandboxedEnvironment`` (templates are untrusted code) with ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension and the ``{% generation %}`` block tag, a
``tojson`` filter that does not HTML-escape, the globals ``raise_exception``, ``strftime_now``,
``dict`` and ``namespace`` (which refuses ``_``-names), the tokenizer's special tokens as variables
(``bos_token``, ``eos_token`` …), and messages copied into plain JSON data with ``None`` fields
dropped. A tokenizer without a template gets :data:`DEFAULT_CHAT_TEMPLATE`. Each render has a budget
(:data:`TEMPLATE_MAX_CHARS` and its neighbours): an operator, call, filter or ``range()`` that would go
past it, or output or time that does, stops the render with an error naming the template's file.

**End of turn.** :func:`end_of_turn` finds the marker a template closes an assistant message with by
rendering a probe conversation and reading what follows the assistant's text (``<|im_end|>`` for
ChatML, ``<|eot_id|>`` for Llama 3, eos for the default); generation stops there, and fine-tuning
(:func:`lmlab.data.tasks.encode_conversation`) trains the model to emit it.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any, Callable

from lmlab.errors import LmlabError

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_CHAT_TEMPLATE", "chat_template", "render", "end_of_turn"]

#: The template of lmlab models that come without one: ChatML's layout (``<|im_start|>role\\n…``),
#: with the tokenizer's own eos token as the end-of-turn marker instead of ``<|im_end|>``, so no token
#: has to be added to the vocabulary. ``lmlab finetune --task chat`` writes it into the checkpoint's
#: ``tokenizer_config.json``, so ``lmlab chat`` and transformers use it too.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# -- the Jinja environment, as transformers builds it, with a budget ----------------------------------

#: What one render may spend. A template is untrusted code that can loop or allocate without end
#: (``{{ 'x' * 10**11 }}``, nested ``range(100000)``), so a render is cut off with an error past: this many
#: characters of output or of any string or list it builds (four characters a token for the longest
#: context lmlab builds, 2**24 positions), integers of more bits (Python prints at most 4300 digits),
#: this many ``range()`` items in all, and this many seconds.
TEMPLATE_MAX_CHARS = 2**26
TEMPLATE_MAX_INT_BITS = 4096
TEMPLATE_MAX_RANGE_ITEMS = 1_000_000
TEMPLATE_MAX_SECONDS = 10.0


class _Exceeded(Exception):
    """A render went past its budget (raised inside Jinja, which passes it through unchanged)."""


# a width or precision in a %-format (``%(key)-10.3s``) or a str.format spec (``{0:>10.3}``)
_FORMAT_WIDTHS = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\d*)(?:\.(\d*))?|\{[^{}:]*:[^{}\d]*(\d*)(?:[,_]?\.(\d*))?")


class _Budget:
    """The limits of one render (:data:`TEMPLATE_MAX_CHARS` …), checked by the sandbox's hooks."""

    def __init__(self) -> None:
        self.deadline = time.monotonic() + TEMPLATE_MAX_SECONDS
        self.range_items = TEMPLATE_MAX_RANGE_ITEMS

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _Exceeded(f"rendering exceeded {TEMPLATE_MAX_SECONDS:g} seconds")

    def size(self, n: int, what: str) -> None:
        if n > TEMPLATE_MAX_CHARS:
            raise _Exceeded(f"rendering exceeded {TEMPLATE_MAX_CHARS:,} characters ({what} of {n:,})")

    def bits(self, n: int, what: str) -> None:
        if n > TEMPLATE_MAX_INT_BITS:
            raise _Exceeded(
                f"rendering exceeded integers of {TEMPLATE_MAX_INT_BITS:,} bits ({what} of about {n:,} bits)"
            )

    def values(self, values: Any, widths: bool = False) -> None:
        """Arguments of a call or filter within the budget: their sizes, and with ``widths`` (the arguments
        of a str method such as ``ljust``, or of the ``center`` and ``indent`` filters) their integers too."""
        self.tick()
        for value in values:
            if isinstance(value, (str, list, tuple, dict)):
                self.size(len(value), "an argument")
            elif widths and isinstance(value, int) and not isinstance(value, bool):
                self.size(abs(value), "a width argument")

    def format(self, fmt: str) -> None:
        """Widths and precisions of a format string within the budget."""
        for match in _FORMAT_WIDTHS.finditer(fmt):
            for digits in filter(None, match.groups()):
                self.size(int(digits[:12]), "a format width")

    def binop(self, op: str, left: Any, right: Any) -> None:
        """What ``left op right`` would make, before it is made."""
        self.tick()
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (left, right))
        sequences = (str, list, tuple)
        if op == "*" and ints:
            self.bits(left.bit_length() + right.bit_length(), "a product")
        elif op == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, sequences) and isinstance(n, int):
                    self.size(len(seq) * max(n, 0), "a repetition")
        elif op == "**" and ints and right > 0:
            self.bits(max(left.bit_length(), 1) * right, "a power")
        elif op == "+" and isinstance(left, sequences) and isinstance(right, sequences):
            self.size(len(left) + len(right), "a concatenation")
        elif op == "%" and isinstance(left, str):
            self.format(left)
            self.values(right if isinstance(right, tuple) else (right,))

    def range(self, *args: int) -> "_Range":
        self.tick()
        items = range(*args)
        if len(items) > self.range_items:
            raise _Exceeded(
                f"rendering exceeded {TEMPLATE_MAX_RANGE_ITEMS:,} range() items (a range of {len(items):,})"
            )
        return _Range(items, self)


class _Range(Sequence):
    """``range()`` in a template: lazy as Python's, each item counted against the render's budget."""

    def __init__(self, inner: range, budget: _Budget) -> None:
        self._inner, self._budget = inner, budget

    def __len__(self) -> int:
        return len(self._inner)

    def __getitem__(self, index):
        item = self._inner[index]
        return _Range(item, self._budget) if isinstance(index, slice) else item

    def __contains__(self, value: Any) -> bool:
        return value in self._inner

    def __iter__(self) -> Iterator[int]:
        return self._count(iter(self._inner))

    def __reversed__(self) -> Iterator[int]:
        return self._count(reversed(self._inner))

    def _count(self, items: Iterator[int]) -> Iterator[int]:
        for item in items:
            self._budget.range_items -= 1
            if self._budget.range_items < 0:
                raise _Exceeded(f"rendering exceeded {TEMPLATE_MAX_RANGE_ITEMS:,} range() items")
            self._budget.tick()
            yield item

    def __repr__(self) -> str:
        return repr(self._inner)


@lru_cache(maxsize=1)
def _environment_class():
    """The sandbox every template renders in (built on first use: jinja2 is imported only for chat)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if tuple(int(part) for part in re.findall(r"\d+", jinja2.__version__)[:3]) < (3, 1, 6):
        # as transformers: older versions have known sandbox escapes, and templates from the Hub are untrusted code
        raise LmlabError(
            f"chat templates need jinja2 >= 3.1.6 (installed: {jinja2.__version__}); pip install -U jinja2"
        )

    Generation = _generation_extension(jinja2)

    Namespace = _namespace_class(jinja2)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Sandbox(ImmutableSandboxedEnvironment):
        """transformers' sandbox, with every operator, call, filter and range that could grow without
        end checked against one render's :class:`_Budget`."""

        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def __init__(self, budget: _Budget) -> None:
            super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
            self.budget = budget
            self.filters["tojson"] = tojson
            self.filters = _Filters(self.filters, budget)
            namespace = type("namespace", (Namespace,), {"_budget": budget})
            self.globals.update(
                raise_exception=raise_exception,
                strftime_now=lambda fmt: datetime.now().strftime(fmt),
                dict=_Dict(),
                namespace=namespace,
                range=budget.range,
            )

        def call_binop(self, context, operator, left, right):
            self.budget.binop(operator, left, right)
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 — Jinja's own signature
            __self.budget.values(
                (*args, *kwargs.values()), widths=isinstance(getattr(__obj, "__self__", None), (str, list))
            )
            return super().call(__context, __obj, *args, **kwargs)

        def wrap_str_format(self, value):
            wrapped = super().wrap_str_format(value)
            if wrapped is not None:
                self.budget.format(value.__self__)
            return wrapped

    return Sandbox


def _generation_extension(jinja2):
    """The ``{% generation %}`` block tag, as a jinja2 extension class."""

    class Generation(jinja2.ext.Extension):
        """``{% generation %}…{% endgeneration %}`` marks assistant text (transformers uses it for
        ``return_assistant_tokens_mask``); rendering keeps the body, in its own scope as there."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    return Generation


def _namespace_class(jinja2):
    """jinja2's ``namespace`` with the sandbox's limits."""

    class Namespace(jinja2.utils.Namespace):
        """``namespace(...)`` that refuses underscore attributes (no way into CPython internals) and values
        past the render's budget (a string doubled in a loop)."""

        _budget: _Budget  # set per sandbox; underscore: out of the template's reach

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            type(self)._budget.values((value,))  # a namespace's own attributes are its template's variables
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace: {name!r}"
                )

    return Namespace


class _Dict:
    """``dict(...)`` and ``dict.fromkeys(...)``, and nothing else of the type."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Filters(dict):
    """A sandbox's filters, each wrapped by :func:`_budgeted_filter` when a template looks it up."""

    def __init__(self, filters: dict[str, Callable], budget: _Budget) -> None:
        super().__init__(filters)
        self.budget = budget

    def __getitem__(self, name: str) -> Callable:
        return _budgeted_filter(name, super().__getitem__(name), self.budget)

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self else default


def _budgeted_filter(name: str, f: Callable, budget: _Budget) -> Callable:
    """Filter ``name`` with its arguments checked before and its result after, against ``budget``."""

    @functools.wraps(f)  # keeps Jinja's pass_context / pass_environment marks
    def checked(*args, **kwargs):
        budget.values((*args, *kwargs.values()), widths=name in ("center", "indent"))
        if name == "format":
            budget.format(next((a for a in args if isinstance(a, str)), ""))
        result = f(*args, **kwargs)
        if isinstance(result, (str, list)):
            budget.size(len(result), f"the result of |{name}")
        return result

    return checked


@lru_cache
def _compile(source: str):
    """The compiled code of a template (one per source; each render gets its own sandbox and budget)."""
    import jinja2

    try:
        return _environment_class()(_Budget()).compile(source)
    except jinja2.TemplateError as err:
        raise LmlabError(
            f"chat template: {err.__class__.__name__} at line {getattr(err, 'lineno', '?')}: {err}"
        ) from None


def _render(source: str, variables: dict[str, Any]) -> str:
    """Render ``source`` in a fresh sandbox, streaming its output against the budget."""
    budget = _Budget()
    env = _environment_class()(budget)
    template = env.template_class.from_code(env, _compile(source), env.make_globals(None), None)
    out, size = [], 0
    for piece in template.generate(**variables):
        size += len(piece)
        budget.size(size, "output")
        budget.tick()
        out.append(piece)
    return "".join(out)


def _plain(value: Any) -> Any:
    """A copy of ``value`` in plain JSON types: the template sees no object with methods of its own."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for kind in (str, int, float):  # subclasses (enums, numpy scalars) back to the base type
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    return f"<{type(value).__name__}>"


def chat_template(tokenizer) -> str:
    """The template ``tokenizer`` renders with: its own (the ``"default"`` one of several named
    templates, as transformers picks), else :data:`DEFAULT_CHAT_TEMPLATE`."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, list):  # tokenizer_config.json's form of named templates
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    if isinstance(template, dict):
        if "default" not in template:
            raise LmlabError(
                f"the tokenizer has several chat templates ({', '.join(map(str, template))}) and none named 'default'"
            )
        template = template["default"]
    if template is None:
        return DEFAULT_CHAT_TEMPLATE
    if not isinstance(template, str):
        raise LmlabError(f"chat_template is {type(template).__name__}; expected a Jinja template string")
    return template


def render(
    tokenizer,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    template: str | None = None,
    **variables,
) -> str:
    """``messages`` rendered by ``template`` (default: :func:`chat_template` of ``tokenizer``) with the
    tokenizer's special tokens and ``variables`` as template variables — the text transformers'
    ``apply_chat_template(messages, tokenize=False)`` makes."""
    import jinja2

    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise LmlabError("a chat needs a non-empty list of messages ({'role': ..., 'content': ...})")
    if not all(isinstance(m, Mapping) for m in messages):
        raise LmlabError("chat messages must be objects such as {'role': 'user', 'content': 'Hi'}")
    source = template if template is not None else chat_template(tokenizer)
    special = {f"{role}_token": token for role, token in tokenizer.special_tokens.items()}
    chat = _plain([{k: v for k, v in m.items() if v is not None} for m in messages])
    variables = dict(
        messages=chat,
        tools=None,
        documents=None,
        add_generation_prompt=add_generation_prompt,
        **_plain({**special, **variables}),
    )
    try:
        return _render(source, variables)
    except (
        jinja2.TemplateError,
        _Exceeded,
        RecursionError,
        MemoryError,
        ArithmeticError,
        TypeError,
        ValueError,
    ) as err:
        raise LmlabError(f"{_template_name(tokenizer, source)}: {_one_line(err)}") from None


def _template_name(tokenizer, source: str) -> str:
    """How an error names the template: its file when it is the tokenizer's own (from a folder)."""
    file = getattr(tokenizer, "chat_template_file", None)
    try:
        own = file is not None and source == chat_template(tokenizer)
    except LmlabError:
        own = False
    return f"chat template of {file}" if own else "chat template"


def _one_line(err: BaseException) -> str:
    """A template's error on one line; Python's own errors (recursion, overflow) keep their type's name."""
    text = " ".join(str(err).split())
    ours = isinstance(err, _Exceeded) or type(err).__module__.startswith("jinja2")
    return text if ours and text else f"{type(err).__name__}: {text}".rstrip(": ")


def end_of_turn(tokenizer, template: str | None = None) -> str:
    """The marker ``template`` ends an assistant message with: the text it renders after the
    assistant's content (whitespace stripped), or the tokenizer's eos token when it renders none."""
    probe = "\x00reply\x00"
    before = render(tokenizer, [{"role": "user", "content": "Hi"}], add_generation_prompt=True, template=template)
    through = render(
        tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": probe}], template=template
    )
    at = through.find(probe, len(before) if through.startswith(before) else 0)
    marker = through[at + len(probe) :].strip() if at >= 0 else ""
    if not marker:
        marker = tokenizer.special_tokens.get("eos", "")
    if not marker:
        raise LmlabError(
            "the chat template ends an assistant message with nothing and the tokenizer has no eos token: nothing "
            "marks the end of a turn"
        )
    return marker
