"""A ReAct-style agent (Yao et al. 2023, arXiv 2210.03629) with a Python tool: the model
writes Thought / Action lines, the program runs `python[expression]` actions through a
traced tool and feeds the Observation back, until an 'Answer:' or the step limit.

    python examples/prompts/react_agent.py [--trace agent.jsonl]
"""

from __future__ import annotations

import ast
import operator
import re

from executor.prompts import call_tool, gen, ppl

QUESTION = "What is 17 * 23 + 4, and is it a prime number?"
MAX_STEPS = 4
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow, ast.USub: operator.neg}


def python(expression: str) -> str:
    """Evaluate an arithmetic Python expression (numbers, + - * / // % **, parentheses)."""
    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"not arithmetic: {ast.dump(node)[:60]}")

    return str(ev(ast.parse(expression, mode="eval").body))


@ppl(ctx="same")
def step():
    return gen(max_tokens=64, stop=["Observation:"])


@ppl
def agent(question: str = QUESTION) -> str:
    """Solve the question. Use lines 'Thought: ...', then 'Action: python[<expression>]' to
    compute, or 'Answer: ...' when done."""
    f"Question: {question}"
    for _ in range(MAX_STEPS):
        reply = str(step())
        if "Answer:" in reply:
            return reply.split("Answer:", 1)[1].strip()
        action = re.search(r"python\[(.+?)\]", reply)
        if action is None:
            "Use an Action line or give the Answer."
            continue
        try:
            observation = call_tool(python, expression=action.group(1))
        except (ValueError, SyntaxError, ZeroDivisionError) as err:
            observation = f"error: {err}"
        f"Observation: {observation}"
    return "no answer within the step limit"


if __name__ == "__main__":
    from _common import run

    run(agent, __doc__.splitlines()[0])
