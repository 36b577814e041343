"""coerce.py: typed reads of untrusted JSON; here the strict digit check that the pod index label
(pods.replica_index) and status.tracking.replacing's keys (bookkeeping) go through."""

from __future__ import annotations

import pytest
from kubetrain_operator.bookkeeping import Bookkeeping
from kubetrain_operator.coerce import is_digits
from kubetrain_operator.pods import replica_index


@pytest.mark.parametrize("text", ["²", "٣", "1²", "", " 1", "-1", "1.0"])
def test_only_ascii_digits_are_digits(text: str) -> None:
    assert not is_digits(text)
    assert replica_index({"kubetrain.io/replica-index": text}) is None


def test_a_superscript_index_is_neither_a_pod_index_nor_a_counted_replacement() -> None:
    assert "²".isdigit()  # what the operator used to trust: int("²") raises ValueError
    assert replica_index({"kubetrain.io/replica-index": "12"}) == 12
    st = Bookkeeping.parse({"tracking": {"replacing": {"²": "uid-a", "1": "uid-b"}}})
    assert st.replacing == {"1": "uid-b"}
