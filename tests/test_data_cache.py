"""The parsed-dataset cache: damaged or altered entries are rebuilt, never served; a source file
rewritten with the same size and mtime is never served stale; every file a parser reads is in the key."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
from test_data_parsers import JESTER, ROWS, ml100k, write, xls

from recsys_flowadam.data import load_dataset
from recsys_flowadam.data.registry import JESTER1_PARTS


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RECSYS_FLOWADAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RECSYS_FLOWADAM_DATA", raising=False)


def entry(tmp_path):
    """The one cache entry: (npz, json)."""
    (npz,) = sorted((tmp_path / "cache").glob("*.npz"))
    return npz, npz.with_suffix(".json")


def load_quietly(tmp_path, **options):
    """Load ml-100k, failing on any warning (a healthy cache entry warns about nothing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_dataset("ml-100k", tmp_path, **options)


def test_healthy_entry_is_served_without_parsing(tmp_path, monkeypatch):
    first = load_dataset("ml-100k", ml100k(tmp_path))
    from recsys_flowadam.data import registry

    def no_parse(*args, **kwargs):
        raise AssertionError("parsed again although the cache entry is healthy")

    import dataclasses
    monkeypatch.setitem(registry.DATASETS, "ml-100k", dataclasses.replace(registry.DATASETS["ml-100k"], parse=no_parse))
    again = load_quietly(tmp_path)
    np.testing.assert_array_equal(again.values, first.values)
    assert again.source_files == first.source_files


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_damaged_entry_is_ignored_and_rebuilt(tmp_path, damage):
    first = load_dataset("ml-100k", ml100k(tmp_path))
    npz, _ = entry(tmp_path)
    data = npz.read_bytes()
    npz.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"PK\x03\x04" + b"\0" * 64}[damage])
    with pytest.warns(RuntimeWarning, match=r"ignoring a damaged parsed-dataset cache entry .*parsing the source files"):
        again = load_dataset("ml-100k", tmp_path)
    np.testing.assert_array_equal(again.values, first.values)
    assert entry(tmp_path)[0].stat().st_size == len(data)  # rebuilt in place
    np.testing.assert_array_equal(load_quietly(tmp_path).values, first.values)  # and healthy again


def test_valid_but_altered_entry_is_not_served(tmp_path):
    first = load_dataset("ml-100k", ml100k(tmp_path))
    npz, meta = entry(tmp_path)
    with np.load(npz) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["values"] = np.full_like(arrays["values"], 1.0)  # a well-formed npz with other ratings
    with open(npz, "wb") as fh:
        np.savez(fh, **arrays)
    with pytest.warns(RuntimeWarning, match="does not match the digest"):
        again = load_dataset("ml-100k", tmp_path)
    np.testing.assert_array_equal(again.values, first.values)
    sidecar = json.loads(meta.read_text())
    sidecar["scale_max"] = 50.0  # the sidecar is covered as well
    meta.write_text(json.dumps(sidecar))
    with pytest.warns(RuntimeWarning, match="does not match the digest"):
        assert load_dataset("ml-100k", tmp_path).scale.max == 5.0


def test_source_rewritten_with_same_size_and_mtime_is_not_served_stale(tmp_path):
    path = ml100k(tmp_path) / "ml-100k" / "u.data"
    assert load_dataset("ml-100k", tmp_path).values[0] == 4.0
    st = path.stat()
    write(path, path.read_text().replace("\t4\t", "\t2\t", 1))  # same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    assert load_dataset("ml-100k", tmp_path).values[0] == 2.0


def test_source_changed_during_the_parse_is_not_cached(tmp_path, monkeypatch):
    from recsys_flowadam.data import loader

    ml100k(tmp_path)
    real = loader.hash_sources
    monkeypatch.setattr(loader, "hash_sources", lambda folder, names: {n: "0" * 64 for n in real(folder, names)})
    with pytest.warns(RuntimeWarning, match="changed while being read; the parsed copy is not cached"):
        assert load_dataset("ml-100k", tmp_path).n_ratings == len(ROWS)
    assert not list((tmp_path / "cache").glob("*.npz"))


def test_key_covers_the_joke_text_files(tmp_path):
    """jester_items.dat (read by the workbook datasets) and jester-1's init*.html are not in the
    dataset's file lists, but a change to them must change what is served."""
    import openpyxl

    from recsys_flowadam.data.registry import JESTER4_RATINGS

    book = openpyxl.Workbook()
    for row in np.pad(JESTER, ((0, 0), (0, 154)), constant_values=99).tolist():
        book.active.append(row)
    (tmp_path / "jester-4").mkdir()
    book.save(tmp_path / "jester-4" / JESTER4_RATINGS)
    items = write(tmp_path / "jester-4" / "jester_items.dat", "1:\n<p>Old one</p>\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the official count check: this file is tiny
        assert load_dataset("jester-4", tmp_path).item_titles[0] == "Old one"
        write(items, "1:\n<p>New one</p>\n")
        assert load_dataset("jester-4", tmp_path).item_titles[0] == "New one"

    m = np.pad(JESTER, ((0, 0), (0, 96)), constant_values=99)
    for name in JESTER1_PARTS:
        xls(tmp_path / "jester-1" / name, m)
    html = write(tmp_path / "jester-1" / "jokes" / "init1.html", "<html>Old joke</html>")
    assert load_dataset("jester-1", tmp_path).item_titles[0] == "Old joke"
    write(html, "<html>New joke</html>")
    assert load_dataset("jester-1", tmp_path).item_titles[0] == "New joke"
