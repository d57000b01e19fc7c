"""The small expressions of a rollout's analysis conditions: `canary <= stable * 1.2 + 0.05`.

Parsed once with Python's ast (at config load, so a bad one is refused before any rollout starts) and
evaluated by walking the tree here, never by eval: the only names are `canary` and `stable`, the only
values numbers, the only operations + - * / (and unary minus), comparisons (< <= > >= == !=, chained
as in Python) and `and` / `or` / `not`. Anything else (a call, an attribute, a subscript, another name)
is refused with the part that is not allowed.

Division by zero gives inf (or nan for 0/0) as floats do rather than an error: a condition like
`canary / stable <= 1.2` with a stable that had no errors at all then fails, or with nan is simply
false, instead of breaking the analysis.
"""

from __future__ import annotations

import ast
import math
import operator
from dataclasses import dataclass, field

NAMES = ("canary", "stable")

_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: None}
_CMP = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
        ast.Eq: operator.eq, ast.NotEq: operator.ne}


class ExpressionError(ValueError):
    """A condition that is not one of the allowed small expressions."""


def _div(a: float, b: float) -> float:
    if b != 0:
        return a / b
    return math.nan if a == 0 else math.copysign(math.inf, a) * math.copysign(1.0, b)


def _check(node: ast.AST, text: str) -> None:
    def refuse(what: str) -> ExpressionError:
        part = ast.get_source_segment(text, node) or type(node).__name__
        return ExpressionError(f"condition {text!r}: {what} ({part!r}); write a comparison of canary and stable "
                               "with numbers, + - * /, and/or, e.g. 'canary <= stable * 1.2 + 0.05'")

    if isinstance(node, ast.Expression):
        return _check(node.body, text)
    if isinstance(node, ast.BoolOp):
        for v in node.values:
            _check(v, text)
        return
    if isinstance(node, ast.UnaryOp):
        if not isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)):
            raise refuse("only unary - and not are allowed")
        return _check(node.operand, text)
    if isinstance(node, ast.BinOp):
        if type(node.op) not in _BIN:
            raise refuse("only + - * / are allowed")
        _check(node.left, text)
        _check(node.right, text)
        return
    if isinstance(node, ast.Compare):
        if any(type(op) not in _CMP for op in node.ops):
            raise refuse("only < <= > >= == != compare")
        for v in (node.left, *node.comparators):
            _check(v, text)
        return
    if isinstance(node, ast.Name):
        if node.id not in NAMES:
            raise refuse(f"unknown name '{node.id}', only {' and '.join(NAMES)}")
        return
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise refuse("only numbers are allowed as constants")
        return
    raise refuse(f"{type(node).__name__} is not allowed")


def _eval(node: ast.AST, env: dict[str, float]) -> float | bool:
    if isinstance(node, ast.Expression):
        return _eval(node.body, env)
    if isinstance(node, ast.BoolOp):
        values = (_eval(v, env) for v in node.values)
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.UnaryOp):
        v = _eval(node.operand, env)
        return (not v) if isinstance(node.op, ast.Not) else (-v if isinstance(node.op, ast.USub) else +v)
    if isinstance(node, ast.BinOp):
        a, b = _eval(node.left, env), _eval(node.right, env)
        return _div(a, b) if isinstance(node.op, ast.Div) else _BIN[type(node.op)](a, b)
    if isinstance(node, ast.Compare):
        left = _eval(node.left, env)
        for op, right_node in zip(node.ops, node.comparators):
            right = _eval(right_node, env)
            if not _CMP[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.Name):
        return env[node.id]
    if isinstance(node, ast.Constant):
        return float(node.value)
    raise AssertionError(f"unchecked node {node!r}")  # _check refused it at parse time


@dataclass(frozen=True)
class Condition:
    """A parsed condition; `holds(canary, stable)` evaluates it."""

    text: str
    tree: ast.Expression = field(repr=False, compare=False)

    def holds(self, canary: float, stable: float) -> bool:
        return bool(_eval(self.tree, {"canary": float(canary), "stable": float(stable)}))


def parse_condition(text: str) -> Condition:
    """Parse a condition, or raise ExpressionError saying what is not allowed."""
    if not isinstance(text, str) or not text.strip():
        raise ExpressionError("a condition is an expression such as 'canary <= stable + 0.01'")
    if len(text) > 500:
        raise ExpressionError(f"condition {text[:40]!r}...: longer than 500 characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as err:
        raise ExpressionError(f"condition {text!r}: not an expression ({err.msg})") from None
    _check(tree, text.strip())
    return Condition(text.strip(), tree)
