"""``--filter`` expressions over a record's source metadata: a small language, parsed, never eval'd.

    expression := disjunction
    disjunction := conjunction ("or" conjunction)*
    conjunction := negation ("and" negation)*
    negation := "not" negation | comparison | "(" expression ")"
    comparison := operand ("<" | "<=" | ">" | ">=" | "==" | "!=") operand
    operand := field name | number | 'text' | "text" | true | false

A record lacking a field the expression reads (or holding null there) fails the filter, whatever
the operators around it; so does a comparison of a number with text.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .errors import ConfigError

# Bounds on what a user's expression may cost: its length, and its nesting (parentheses, not).
MAX_LENGTH = 1000
MAX_DEPTH = 32

_TOKEN = re.compile(r"""
    \s*(?:
      (?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
    | (?P<string>'[^']*'|"[^"]*")
    | (?P<op><=|>=|==|!=|<|>)
    | (?P<paren>[()])
    | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
    )""", re.VERBOSE)
_COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne,
}
_KEYWORDS = {"and", "or", "not", "true", "false"}


class _Missing(Exception):
    """The record lacks a field the expression reads: the filter fails."""


@dataclass(frozen=True)
class _Token:
    kind: str  # number | string | op | paren | name | keyword
    text: str
    column: int


def _tokens(text: str) -> list[_Token]:
    tokens, position = [], 0
    while position < len(text):
        if text[position:].strip() == "":
            break
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            column = position + len(text[position:]) - len(text[position:].lstrip()) + 1
            raise ConfigError(f"--filter {text!r}: cannot read {text[column - 1:column + 9]!r} at column {column}; "
                              f"write comparisons like \"aesthetic >= 5\" joined by and/or")
        group = match.lastgroup
        value = match.group(group)
        kind = "keyword" if group == "name" and value in _KEYWORDS else group
        tokens.append(_Token(kind, value, match.start(group) + 1))
        position = match.end()
    return tokens


# A parsed expression is a tree of tuples: ("or"|"and", left, right), ("not", inner),
# ("cmp", op, left, right), and operands ("field", name) or ("value", constant).
Node = tuple


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = _tokens(text)
        self.position = 0
        self.depth = 0

    def fail(self, message: str) -> ConfigError:
        token = self.tokens[self.position] if self.position < len(self.tokens) else None
        where = f"at column {token.column} ({token.text!r})" if token else "at the end"
        return ConfigError(f"--filter {self.text!r}: {message} {where}")

    def peek(self, *texts: str) -> bool:
        return self.position < len(self.tokens) and self.tokens[self.position].text in texts

    def take(self) -> _Token:
        if self.position >= len(self.tokens):
            raise ConfigError(f"--filter {self.text!r}: the expression ends early; complete the comparison")
        token = self.tokens[self.position]
        self.position += 1
        return token

    def parse(self) -> Node:
        if not self.tokens:
            raise ConfigError("--filter needs an expression, e.g. \"aesthetic >= 5\"")
        node = self.disjunction()
        if self.position != len(self.tokens):
            raise self.fail("expected and/or")
        return node

    def nested(self, parse: Callable[[], Node]) -> Node:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.fail(f"nesting deeper than {MAX_DEPTH}")
        try:
            return parse()
        finally:
            self.depth -= 1

    def disjunction(self) -> Node:
        return self.chain("or", self.conjunction)

    def conjunction(self) -> Node:
        return self.chain("and", self.negation)

    def chain(self, word: str, parse: Callable[[], Node]) -> Node:
        """``parse (word parse)*``, grouped from the left."""
        node = parse()
        while self.peek(word):
            self.take()
            node = (word, node, parse())
        return node

    def negation(self) -> Node:
        if self.peek("not"):
            self.take()
            return ("not", self.nested(self.negation))
        if self.peek("("):
            self.take()
            node = self.nested(self.disjunction)
            if not self.peek(")"):
                raise self.fail("expected ')'")
            self.take()
            return node
        return self.comparison()

    def comparison(self) -> Node:
        left = self.operand()
        if not (self.position < len(self.tokens) and self.tokens[self.position].kind == "op"):
            raise self.fail("expected a comparison (<, <=, >, >=, ==, !=)")
        op = self.take().text
        return ("cmp", op, left, self.operand())

    def operand(self) -> Node:
        token = self.take()
        if token.kind == "number":
            return ("value", float(token.text))
        if token.kind == "string":
            return ("value", token.text[1:-1])
        if token.kind == "keyword" and token.text in ("true", "false"):
            return ("value", token.text == "true")
        if token.kind == "name":
            return ("field", token.text)
        self.position -= 1
        raise self.fail("expected a field name, a number or 'text'")


@dataclass(frozen=True)
class Filter:
    """One ``--filter`` expression, parsed."""

    text: str
    tree: Node

    @property
    def reason(self) -> str:
        return f"filtered: {self.text}"

    def fields(self) -> set[str]:
        found: set[str] = set()

        def walk(node: Node) -> None:
            if node[0] == "field":
                found.add(node[1])
            elif node[0] in ("and", "or"):
                walk(node[1]), walk(node[2])
            elif node[0] == "not":
                walk(node[1])
            elif node[0] == "cmp":
                walk(node[2]), walk(node[3])

        walk(self.tree)
        return found

    def holds(self, fields: Mapping[str, Any]) -> bool:
        try:
            return _evaluate(self.tree, fields)
        except _Missing:
            return False


def parse_filter(text: str) -> Filter:
    """A Filter, or a ConfigError naming the column where ``text`` goes wrong."""
    text = text.strip()
    if len(text) > MAX_LENGTH:
        raise ConfigError(f"--filter is longer than {MAX_LENGTH} characters; split it into several --filter options")
    return Filter(text, _Parser(text).parse())


def _evaluate(node: Node, fields: Mapping[str, Any]) -> bool:
    kind = node[0]
    if kind == "and":
        return _evaluate(node[1], fields) and _evaluate(node[2], fields)
    if kind == "or":
        # Both sides are evaluated: a missing field fails the filter even when the other side holds.
        left, right = _evaluate(node[1], fields), _evaluate(node[2], fields)
        return left or right
    if kind == "not":
        return not _evaluate(node[1], fields)
    _, op, left, right = node
    a, b = _operand(left, fields), _operand(right, fields)
    if _is_number(a) and _is_number(b):
        return _COMPARISONS[op](a, b)
    if type(a) is type(b) and isinstance(a, (str, bool)):
        return _COMPARISONS[op](a, b) if op in ("==", "!=") or isinstance(a, str) else False
    raise _Missing()  # a number against text (or a list, an object): not comparable, the filter fails


def _operand(node: Node, fields: Mapping[str, Any]) -> Any:
    if node[0] == "value":
        return node[1]
    value = fields.get(node[1])
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise _Missing()
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
