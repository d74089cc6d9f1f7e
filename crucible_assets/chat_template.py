"""A chat template's renders of a conversation's prefixes, which the span finder in
rendering.py reads loss weights from, at the least rendering the template allows.

Every template renders each prefix exactly as `apply_chat_template` does for messages of plain
strings: the compiled template with the variables apply_chat_template passes, through a
context built from one dict (jinja's own `render` merges the template's globals into a new
dict on every call, half the cost of a short render).

A turn-local template (one loop over `messages` whose body reads only the loop's message and
the tokenizer's special tokens, then at most a constant generation prompt) renders any prefix
as its messages' pieces joined, so one render of the whole conversation, with a separator
written after each piece, yields every prefix: one render per record where rendering
prefixes costs two per assistant turn, each as long as the conversation so far. Whether a
template is turn-local is read once from its syntax tree; every other template renders each
prefix it is asked for, as does a conversation holding the separator itself."""

from __future__ import annotations

import functools
import itertools
from typing import TYPE_CHECKING, Callable

from jinja2 import nodes

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Prefixes = Callable[[int, bool], str]  # (n, add_generation_prompt) -> the text of messages[:n]
SEPARATOR = "\x00"
# what a turn-local loop body may hold: reading fields, constants, joining, and branching on them
_LOCAL_NODES = (nodes.Output, nodes.TemplateData, nodes.Const, nodes.Name, nodes.Getitem, nodes.Getattr, nodes.Add,
                nodes.Concat, nodes.If, nodes.CondExpr, nodes.Compare, nodes.Operand, nodes.And, nodes.Or, nodes.Not)


class Compiled:
    """One template and its render variables: `render(messages, add_generation_prompt)`, and
    the same template with a separator after each message where it is turn-local."""

    def __init__(self, source: str, variables: dict[str, object]) -> None:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        self.template = _compile_jinja_template(source)
        self.base = dict(self.template.globals, tools=None, documents=None, **variables)
        tree = self.template.environment.parse(source)
        self.separated = None
        if _turn_local(tree, set(variables)):
            tree.body[0].body.append(nodes.Output([nodes.TemplateData(SEPARATOR)]))
            self.separated = self.template.environment.from_string(tree)
            self.generation_prompt = self.render([], True)

    def render(self, messages: list[dict], add_generation_prompt: bool, template=None) -> str:
        template = template or self.template
        context = template.new_context(dict(self.base, messages=messages, add_generation_prompt=add_generation_prompt),
                                       shared=True)
        try:
            return template.environment.concat(template.root_render_func(context))
        except Exception:
            template.environment.handle_exception()  # as Template.render: the error points into the template

    def prefixes(self, messages: list[dict]) -> Prefixes:
        """The renders of messages' prefixes: composed from one render where it is turn-local,
        each prefix rendered once on demand otherwise."""
        if self.separated is not None:
            pieces = self.render(messages, False, self.separated).split(SEPARATOR)
            if len(pieces) == len(messages) + 1 and pieces[-1] == "":  # no separator inside a message
                text, ends = "".join(pieces), list(itertools.accumulate(map(len, pieces), initial=0))
                gen = self.generation_prompt
                return lambda n, add_generation_prompt: text[: ends[n]] + (gen if add_generation_prompt else "")
        return functools.cache(lambda n, add_generation_prompt: self.render(messages[:n], add_generation_prompt))


def _turn_local(tree: nodes.Template, variables: set[str]) -> bool:
    """The template is `{% for m in messages %}BODY{% endfor %}` then, optionally,
    `{% if add_generation_prompt %}CONSTANT{% endif %}`, and BODY depends on `m` and the
    special tokens alone: so messages[:n] renders as BODY of each of them, joined."""
    loop, *rest = tree.body or [None]
    if not (isinstance(loop, nodes.For) and isinstance(loop.target, nodes.Name) and isinstance(loop.iter, nodes.Name)
            and loop.iter.name == "messages" and loop.test is None and not loop.else_ and not loop.recursive):
        return False
    allowed = variables | {loop.target.name}
    for body_node in loop.body:
        for node in itertools.chain([body_node], body_node.find_all(nodes.Node)):
            if not isinstance(node, _LOCAL_NODES) or (isinstance(node, nodes.Name) and node.name not in allowed):
                return False
    return not rest or len(rest) == 1 and _constant_generation_prompt(rest[0])


def _constant_generation_prompt(gen: nodes.Node) -> bool:
    """`{% if add_generation_prompt %}CONSTANT{% endif %}`."""
    return (isinstance(gen, nodes.If) and isinstance(gen.test, nodes.Name) and gen.test.name == "add_generation_prompt"
            and not gen.elif_ and not gen.else_
            and all(isinstance(n, (nodes.Output, nodes.TemplateData, nodes.Const)) for b in gen.body
                    for n in itertools.chain([b], b.find_all(nodes.Node))))


_COMPILED: dict[tuple[str, str], Compiled] = {}  # (template, its variables' repr): one per tokenizer in use


def compiled(tok: PreTrainedTokenizerBase) -> Compiled:
    """The tokenizer's template as it renders now (a template or special token set since is a new entry)."""
    source, variables = tok.get_chat_template(), tok.special_tokens_map
    key = (source, repr(variables))
    if key not in _COMPILED:
        _COMPILED[key] = Compiled(source, variables)
    return _COMPILED[key]


def prefix_renders(tok: PreTrainedTokenizerBase, messages: list[dict]) -> Prefixes:
    """The prefix renders of a conversation whose messages hold only strings."""
    return compiled(tok).prefixes(messages)
