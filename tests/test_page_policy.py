"""numpy's huge-page request is turned off only where huge pages stall, and always restored."""

from __future__ import annotations

import numpy as np
import pytest

from recsys_flowadam import page_policy


@pytest.mark.parametrize("text, stalls", [("always defer defer+madvise [madvise] never\n", True),
                                          ("[always] defer defer+madvise madvise never\n", True),
                                          ("always [defer] defer+madvise madvise never\n", False),
                                          ("always defer [defer+madvise] madvise never\n", False),
                                          ("always defer defer+madvise madvise [never]\n", False)])
def test_which_defrag_modes_stall(tmp_path, text, stalls):
    f = tmp_path / "defrag"
    f.write_text(text)
    assert page_policy.huge_pages_stall(f) is stalls
    assert page_policy.huge_pages_stall(tmp_path / "absent") is False


@pytest.mark.parametrize("stalls", [True, False])
def test_small_pages_sets_numpys_request_only_where_it_stalls_and_restores_it(monkeypatch, stalls):
    seen = []
    state = {"on": True}

    def setter(flag):
        before, state["on"] = state["on"], flag
        seen.append(flag)
        return before

    monkeypatch.setattr(page_policy, "huge_pages_stall", lambda: stalls)
    monkeypatch.setattr(page_policy, "_numpy_setter", lambda: setter)
    with page_policy.small_pages():
        assert state["on"] is not stalls
        with page_policy.small_pages():  # nested: still off, and not restored early
            assert state["on"] is not stalls
        assert state["on"] is not stalls
    assert state["on"] is True and seen == ([False, True] if stalls else [])
    with pytest.raises(RuntimeError):
        with page_policy.small_pages():
            raise RuntimeError("a failure inside")
    assert state["on"] is True


def test_numpys_setter_exists_here():
    setter = page_policy._numpy_setter()
    assert setter is not None
    before = setter(False)
    assert setter(before) is False  # it reports the previous setting
    assert np.ones(3).sum() == 3
