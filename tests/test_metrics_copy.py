"""Reported metrics are a copy as JSON gives it back, whichever way ``_check_metrics`` takes."""

from __future__ import annotations

import enum
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from statemachine.rank import _check_metrics


class Level(enum.IntEnum):
    LOW = 1


class Name(str):
    pass


class Ratio(float):
    pass


scalars = st.one_of(
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(),
    st.booleans(),
    st.none(),
    st.just(Level.LOW),
    st.floats(allow_nan=False).map(Ratio),
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3), max_leaves=6
)
keys = st.text() | st.text().map(Name)


def _shape(value: Any) -> Any:
    """Types and JSON text together: equal only if the values and their exact types are."""
    if isinstance(value, dict):
        return ("dict", [(type(k).__name__, k, _shape(v)) for k, v in value.items()])
    if isinstance(value, list):
        return ("list", [_shape(v) for v in value])
    return (type(value).__name__, json.dumps(value))


@given(st.dictionaries(keys, values, max_size=6))
def test_the_copy_is_what_a_json_round_trip_gives(metrics: dict[str, Any]) -> None:
    expected = json.loads(json.dumps(metrics))
    copied = _check_metrics(metrics)
    assert _shape(copied) == _shape(expected)
    assert copied is not metrics


def test_changing_the_reported_dict_afterwards_changes_nothing() -> None:
    metrics: dict[str, Any] = {"loss": 0.5, "step": 3}
    copied = _check_metrics(metrics)
    metrics["loss"] = 9.0
    assert copied == {"loss": 0.5, "step": 3}
