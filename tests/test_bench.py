"""The bench's bookkeeping: rotating order and per-round ratios (its timings are not tested)."""

from __future__ import annotations

from tools.bench import _paired, _rounds, _spread


def test_rounds_rotate_the_order_and_keep_values_per_configuration() -> None:
    calls: list[str] = []

    def run(name: str, value: float) -> float:
        calls.append(name)
        return value

    results = _rounds({"a": lambda: run("a", 1.0), "b": lambda: run("b", 2.0), "c": lambda: run("c", 3.0)}, 3)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert results == {"a": [1.0] * 3, "b": [2.0] * 3, "c": [3.0] * 3}


def test_paired_ratios_are_taken_within_each_round() -> None:
    # The medians' ratio would be 20 / 10 = 2.0; within the rounds it is 1.5 and 3.0.
    assert _paired([15.0, 30.0, 20.0], [10.0, 10.0, 10.0]) == "1.50-3.00x"
    assert _paired([15.0], [10.0]) == ""  # one round: no range
    assert _paired(None, [10.0]) == ""
    assert _spread([8.04, 9.71]) == " (8.0-9.7)"
