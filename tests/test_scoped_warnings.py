"""``scoped_filter``: one block at a time across threads, and the filters restored after."""

from __future__ import annotations

import threading
import warnings

import pytest

from recsys_flowadam.scoped_warnings import scoped_filter


def test_the_filter_holds_in_its_block_and_is_gone_after():
    before = list(warnings.filters)
    with scoped_filter("error", UserWarning):
        with pytest.raises(UserWarning):
            warnings.warn("turned into an error", UserWarning)
    assert warnings.filters == before


def test_blocks_on_two_threads_run_one_after_the_other():
    before = list(warnings.filters)
    a_inside, b_inside = threading.Event(), threading.Event()
    seen: dict[str, bool] = {}

    def a() -> None:
        with scoped_filter("error", UserWarning):
            a_inside.set()
            seen["b entered while a was inside"] = b_inside.wait(0.3)
            try:  # a's filter is still in force, whatever b does meanwhile
                warnings.warn("a's", UserWarning)
                seen["a raised"] = False
            except UserWarning:
                seen["a raised"] = True

    def b() -> None:
        a_inside.wait(5)
        with scoped_filter("ignore", UserWarning):
            b_inside.set()

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == {"b entered while a was inside": False, "a raised": True}
    assert b_inside.is_set() and warnings.filters == before  # b ran after a; nothing left behind
