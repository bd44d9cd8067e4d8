"""The calculator tool: arithmetic by an ast walk; anything else, and runaway values, are refused."""

import pytest

from treegrpo.tools.calculator import CalculatorError, calculate, calculator


@pytest.mark.parametrize(
    ("expr", "value"),
    [
        ("12*7", "84"),
        ("(3 + 4) ** 2", "49"),
        ("7 / 2", "3.5"),
        ("7 // 2", "3"),
        ("-5 % 3", "1"),
        ("2^10", "1024"),
        ("1/3", "0.333333"),
    ],
)
def test_arithmetic(expr, value):
    assert calculator(expr) == value


@pytest.mark.parametrize(
    ("expr", "why"),
    [
        ("__import__('os').system('true')", "unsupported syntax: Call"),
        ("x + 1", "unsupported syntax: Name"),
        ("(1).real", "unsupported syntax: Attribute"),
        ("[1][0]", "unsupported syntax"),
        ("'a' * 3", "unsupported syntax: Constant"),
        ("9 ** 9 ** 9", "exponent larger than"),
        ("10 ** 60", "larger than"),
        ("1 / 0", "division by zero"),
        ("1 +", "not a valid arithmetic expression"),
        ("", "empty expression"),
        ("1+" * 200 + "1", "longer than"),
    ],
)
def test_refusals(expr, why):
    with pytest.raises(CalculatorError, match=why.replace("(", r"\(").replace("*", r"\*")):
        calculate(expr)
