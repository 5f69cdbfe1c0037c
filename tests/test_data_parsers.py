"""Every parser on small files generated in the official formats, and bad input."""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest

from recsys_flowadam.data import DataError, load_dataset, make_low_rank_matrix, make_low_rank_tensor
from recsys_flowadam.data.registry import JESTER4_RATINGS

# (user, item, rating, timestamp), deliberately not sorted, IDs with different digit counts
ROWS = [(10, 5, 4.0, 881250949), (2, 5, 3.0, 891717742), (2, 100, 1.0, 878887116),
        (10, 7, 5.0, 880606923), (9, 100, 2.0, 886397596)]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RECSYS_FLOWADAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RECSYS_FLOWADAM_DATA", raising=False)


def write(path: Path, text: str, encoding: str = "utf-8", newline: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.replace("\n", newline).encode(encoding))
    return path


def ml100k(root: Path, rows=ROWS, newline="\n") -> Path:
    write(root / "ml-100k" / "u.data", "".join(f"{u}\t{i}\t{r:g}\t{t}\n" for u, i, r, t in rows), newline=newline)
    write(root / "ml-100k" / "u.item",
          "5|Copycat (1995)|01-Jan-1995||http://x|0|0\n7|Misérables, Les (1995)|01-Jan-1995||x|0|1\n"
          "100|Fargo (1996)|14-Feb-1997||x|0|0\n", encoding="latin-1")
    return root


def check_rows(r, rows=ROWS):
    """Each rating maps back to its raw (user, item, rating, timestamp) row, in file order."""
    got = [(int(r.user_ids[u]), int(r.item_ids[i]), float(v), int(t))
           for u, i, v, t in zip(r.users, r.items, r.values, r.timestamps)]
    assert got == [(u, i, float(v), t) for u, i, v, t in rows]


def test_ml100k_tab_and_latin1_titles(tmp_path):
    r = load_dataset("ml-100k", ml100k(tmp_path), offline=True)
    assert (r.n_users, r.n_items, r.n_ratings) == (3, 3, 5)
    assert r.user_ids.tolist() == ["2", "9", "10"]  # numeric order, not "10" < "2"
    assert r.item_ids.tolist() == ["5", "7", "100"]
    check_rows(r)
    assert r.item_titles.tolist() == ["Copycat (1995)", "Misérables, Les (1995)", "Fargo (1996)"]
    assert (r.scale.min, r.scale.max) == (1.0, 5.0)
    assert set(r.source_files) == {"u.data", "u.item"}


def test_crlf_line_endings(tmp_path):
    r = load_dataset("ml-100k", ml100k(tmp_path, newline="\r\n"), offline=True)
    check_rows(r)


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_ml1m_double_colon_dat_latin1(tmp_path, newline):
    folder = tmp_path / "ml-1m"
    write(folder / "ratings.dat", "".join(f"{u}::{i}::{int(r)}::{t}\n" for u, i, r, t in ROWS), newline=newline)
    write(folder / "movies.dat", "5::Amélie: the film (2001)::Comedy|Romance\n7::Seven (1995)::Crime\n",
          encoding="latin-1", newline=newline)
    r = load_dataset("ml-1m", tmp_path, offline=True)
    check_rows(r)
    assert r.item_titles.tolist() == ["Amélie: the film (2001)", "Seven (1995)", ""]  # 100 has no title


def test_ml10m_half_stars(tmp_path):
    rows = [(1, 122, 5.0, 838985046), (1, 185, 4.5, 838983525), (2, 122, 0.5, 868245777)]
    write(tmp_path / "ml-10m" / "ratings.dat", "".join(f"{u}::{i}::{r:g}::{t}\n" for u, i, r, t in rows))
    r = load_dataset("ml-10m", tmp_path, offline=True)
    check_rows(r, rows)
    assert (r.scale.min, r.scale.max) == (0.5, 5.0)


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_csv_with_header_and_quoted_titles(tmp_path, newline):
    folder = tmp_path / "ml-latest-small"
    write(folder / "ratings.csv", "userId,movieId,rating,timestamp\n"
          + "".join(f"{u},{i},{r:g},{t}\n" for u, i, r, t in ROWS), newline=newline)
    write(folder / "movies.csv", 'movieId,title,genres\n5,"American President, The (1995)",Comedy\n'
          '100,Fargo (1996),Crime\n7,"Sabrina (1995)",Romance\n', newline=newline)
    r = load_dataset("ml-latest-small", tmp_path, offline=True)
    check_rows(r)
    assert r.item_titles.tolist() == ["American President, The (1995)", "Sabrina (1995)", "Fargo (1996)"]


# --- bad input: every case names the file and the line -----------------------------------
GOOD = "".join(f"{u}\t{i}\t{r:g}\t{t}\n" for u, i, r, t in ROWS)
BAD_CASES = {
    "truncated": (GOOD[:-9], r"u\.data(:\d+)?: .*(truncated|newline)"),
    "truncated-mid-line": (GOOD + "3\t4\n", r"u\.data:6: expected 4 fields"),
    "wrong-delimiter": (GOOD.replace("\t", ","), r"u\.data:1: expected 4 fields.*delimiter ','"),
    "non-numeric": (GOOD.replace("\t3\t", "\tthree\t"), r"u\.data:2: field 'rating' is not a number: 'three'"),
    "non-integer-id": (GOOD.replace("9\t100", "9x\t100"), r"u\.data:5: field 'user' is not an integer"),
    "out-of-scale": (GOOD.replace("\t5\t", "\t6\t"), r"u\.data:4: rating 6 is outside the scale 1\.\.5"),
    "empty-file": ("", r"u\.data: is empty"),
    "blank-line": (GOOD.replace("\n", "\n\n", 1), r"u\.data:2: empty line"),
    "extra-field": (GOOD.replace("878887116", "878887116\t7"), r"u\.data:3: expected 4 fields .* found 5"),
    "nan-rating": (GOOD.replace("\t3\t", "\tnan\t"), r"u\.data:2: field 'rating' is not a finite number: 'nan'"),
    "huge-user-id": (GOOD.replace("9\t100", "99999999999999999999999\t100"),
                     r"u\.data:5: field 'user' is outside the 64-bit integer range: '99999999999999999999999'"),
    "huge-timestamp": (GOOD.replace("878887116", "-99999999999999999999999"),
                       r"u\.data:3: field 'timestamp' is outside the 64-bit integer range"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_names_file_and_line(tmp_path, case):
    text, pattern = BAD_CASES[case]
    write(tmp_path / "ml-100k" / "u.data", text)
    with pytest.raises(DataError, match=pattern):
        load_dataset("ml-100k", tmp_path, offline=True, cache=False)


def test_csv_header_checked(tmp_path):
    write(tmp_path / "ml-25m" / "ratings.csv", "user,movie,rating,timestamp\n1,2,3.5,4\n")
    with pytest.raises(DataError, match=r"ratings\.csv:1: header"):
        load_dataset("ml-25m", tmp_path, offline=True)


def test_duplicates_policy(tmp_path):
    rows = ROWS + [(2, 100, 5.0, 899999999)]  # user 2, item 100 again (first at line 3)
    ml100k(tmp_path, rows)
    with pytest.raises(DataError, match=r"u\.data:6: duplicated rating of user '2', item '100' \(first given at .*u\.data:3\)"):
        load_dataset("ml-100k", tmp_path, offline=True)
    expected_value = {"first": 1.0, "last": 5.0, "mean": 3.0}
    for policy, value in expected_value.items():
        r = load_dataset("ml-100k", tmp_path, offline=True, duplicates=policy)
        assert r.n_ratings == 5 and r.n_duplicates == 1
        k = np.flatnonzero((r.user_ids[r.users] == "2") & (r.item_ids[r.items] == "100"))
        assert r.values[k].tolist() == [value]
    with pytest.raises(DataError, match="unknown policy"):
        load_dataset("ml-100k", tmp_path, offline=True, duplicates="sum")


def test_unknown_dataset_and_option(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'ml-7m'"):
        load_dataset("ml-7m", tmp_path)
    with pytest.raises(DataError, match="unknown option"):
        load_dataset("ml-100k", ml100k(tmp_path), offline=True, colour="red")


def test_offline_error_says_which_file_goes_where(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("ml-25m", tmp_path, offline=True)
    msg = str(err.value)
    assert str(tmp_path / "ml-25m" / "ratings.csv") in msg
    assert "https://files.grouplens.org/datasets/movielens/ml-25m.zip" in msg
    assert "8b21cfb7eb1706b4ec0aac894368d90acf26ebdfb6aced3ebd4ad5bd1eb9c6aa" in msg


def test_offline_env_switch(tmp_path, monkeypatch):
    monkeypatch.setenv("RECSYS_FLOWADAM_OFFLINE", "1")
    with pytest.raises(DataError, match="offline"):
        load_dataset("jester-4", tmp_path)


def test_data_root_from_environment(tmp_path, monkeypatch):
    ml100k(tmp_path)
    monkeypatch.setenv("RECSYS_FLOWADAM_DATA", str(tmp_path))
    assert load_dataset("ml-100k", offline=True).n_ratings == len(ROWS)


# --- parsed-dataset cache -----------------------------------------------------------------
def test_cache_reused_and_invalidated_by_content(tmp_path):
    ml100k(tmp_path)
    first = load_dataset("ml-100k", tmp_path, offline=True)
    entries = sorted((tmp_path / "cache").glob("*.npz"))
    assert len(entries) == 1
    again = load_dataset("ml-100k", tmp_path, offline=True)
    for field in ("users", "items", "values", "timestamps", "user_ids", "item_ids", "item_titles"):
        np.testing.assert_array_equal(getattr(first, field), getattr(again, field))
    assert again.source_files == first.source_files and again.source_dir == tmp_path / "ml-100k"
    # same size, different content: the cache must not serve the old ratings
    text = (tmp_path / "ml-100k" / "u.data").read_text().replace("\t4\t", "\t2\t", 1)
    write(tmp_path / "ml-100k" / "u.data", text)
    st = (tmp_path / "ml-100k" / "u.data").stat()  # a new mtime even on coarse-clock file systems
    os.utime(tmp_path / "ml-100k" / "u.data", ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    changed = load_dataset("ml-100k", tmp_path, offline=True)
    assert changed.values[0] == 2.0 and first.values[0] == 4.0
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2


# --- values float32 cannot hold: refused with file and line, never stored as inf ---------
FLOAT32_TOO_LARGE = r"is too large for a 32-bit float \(magnitude at most 3\.402823e\+38\)"


def test_float32_overflow_in_text_files_is_refused(tmp_path):
    csv = write(tmp_path / "r.csv", "u,i,r\na,x,3\nb,x,1e39\n")
    with pytest.raises(DataError, match=rf"r\.csv:3: field 'rating' {FLOAT32_TOO_LARGE}: 1e\+39"):
        load_dataset(f"csv:{csv}")
    csv = write(tmp_path / "s.csv", "u,i,r\na,x,3\nb,x,-inf\n")
    with pytest.raises(DataError, match=r"s\.csv:3: field 'rating' is not a finite number: -inf"):
        load_dataset(f"csv:{csv}")
    write(tmp_path / "jester-2" / "jester_ratings.dat", "1\t\t5\t\t0.5\n2\t\t5\t\t-1e39\n")
    with pytest.raises(DataError, match=rf"jester_ratings\.dat:2: field 'rating' {FLOAT32_TOO_LARGE}: -1e\+39"):
        load_dataset("jester-2", tmp_path)


@pytest.mark.parametrize("suffix", [".xlsx", ".xls"])
def test_float32_overflow_in_a_jester_cell_is_refused(tmp_path, suffix):
    from recsys_flowadam.data.jester import load_workbooks
    from recsys_flowadam.data.registry import JESTER as SCALE

    m = JESTER.copy()
    m[2, 3] = 1e39
    (xlsx if suffix == ".xlsx" else xls)(tmp_path / f"j{suffix}", m)
    with pytest.raises(DataError, match=rf"j{suffix}:3: cell D3 {FLOAT32_TOO_LARGE}: 1e\+39"):
        load_workbooks(tmp_path, "j", SCALE, [f"j{suffix}"], n_jokes=None)


def test_build_refuses_values_float32_cannot_hold():
    from recsys_flowadam.data.build import build_ratings
    from recsys_flowadam.data.ratings import Ratings, RatingScale

    with pytest.raises(DataError, match=rf"frame row 2: rating 1e\+39 {FLOAT32_TOO_LARGE}"):
        build_ratings("f", np.array([1, 2]), np.array([1, 1]), np.array([3.0, 1e39]), RatingScale(1, 5),
                      describe_row=lambda k: f"frame row {k + 1}")
    with pytest.raises(ValueError, match=r"value 1e\+39 at position 1 overflows float32"):
        Ratings("r", [0, 0], [0, 1], np.array([3.0, 1e39]), ["u"], ["a", "b"], RatingScale(1, 5))


# --- user CSV -----------------------------------------------------------------------------
def test_custom_csv_string_ids_and_options(tmp_path):
    path = write(tmp_path / "mine.csv", "who;what;stars;when\nbob;x1;4;100\nann;x2;2.5;50\nbob;x2;1;70\n")
    r = load_dataset(f"csv:{path}", sep=";", user_col="who", item_col="what", rating_col="stars",
                     timestamp_col="when", scale_min=1, scale_max=5)
    assert r.user_ids.tolist() == ["ann", "bob"] and r.item_ids.tolist() == ["x1", "x2"]
    assert [(r.user_ids[u], r.item_ids[i], v) for u, i, v in zip(r.users, r.items, r.values)] == [
        ("bob", "x1", 4.0), ("ann", "x2", 2.5), ("bob", "x2", 1.0)]
    assert r.timestamps.tolist() == [100, 50, 70]
    bad = write(tmp_path / "bad.csv", "1,2,3\n1,3,9\n")
    with pytest.raises(DataError, match=r"bad\.csv:2: rating 9 is outside the scale 1\.\.5"):
        load_dataset(f"csv:{bad}", scale_min=1, scale_max=5)
    r = load_dataset(f"csv:{bad}")  # no header detected, scale = observed range
    assert (r.scale.min, r.scale.max) == (3.0, 9.0) and r.n_ratings == 2
    with pytest.raises(DataError, match="file not found"):
        load_dataset(f"csv:{tmp_path / 'nope.csv'}")
    quoted = write(tmp_path / "quoted.csv", 'user,item,rating\n"Smith, J",x,3\nann,"y",4\n')
    r = load_dataset(f"csv:{quoted}")
    assert r.user_ids.tolist() == ["Smith, J", "ann"] and r.item_ids.tolist() == ["x", "y"]


# --- Jester -------------------------------------------------------------------------------
JESTER = np.array([
    [2, 99, 5.5, 99, -3.25],
    [1, 99, 99, 99, -42.28],  # out of the documented scale: kept
    [3, 9.875, 0.0, 99, 10.0],
])


def xlsx(path: Path, matrix: np.ndarray) -> Path:
    import openpyxl

    book = openpyxl.Workbook()
    for row in matrix.tolist():
        book.active.append([int(v) if float(v).is_integer() and abs(v) == 99 else v for v in row])
    path.parent.mkdir(parents=True, exist_ok=True)
    book.save(path)
    return path


def xls(path: Path, matrix: np.ndarray) -> Path:
    """A minimal BIFF8 workbook stream (BOF, BOUNDSHEET, NUMBER records) that xlrd reads.

    Hand-written because no maintained library writes .xls any more; the official Jester 1-3
    files are .xls, so the xlrd path must be exercised on real BIFF records.
    """
    def rec(rid: int, data: bytes) -> bytes:
        return struct.pack("<HH", rid, len(data)) + data

    bof = lambda kind: rec(0x0809, struct.pack("<HHHHII", 0x0600, kind, 0, 0, 0, 0))
    eof = rec(0x000A, b"")
    sheet = lambda off: rec(0x0085, struct.pack("<IBBBB", off, 0, 0, 6, 0) + b"Sheet1")
    head = bof(0x0005) + sheet(0) + eof
    body = [bof(0x0010), rec(0x0200, struct.pack("<IIHHH", 0, matrix.shape[0], 0, matrix.shape[1], 0))]
    body += [rec(0x0203, struct.pack("<HHHd", r, c, 0, float(v))) for (r, c), v in np.ndenumerate(matrix)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bof(0x0005) + sheet(len(head)) + eof + b"".join(body) + eof)
    return path


def check_jester(r, matrix=JESTER, user_prefix=""):
    rated = matrix[:, 1:] != 99
    assert r.n_ratings == rated.sum()
    assert r.item_ids.tolist() == [str(j) for j in range(1, matrix.shape[1])]
    got = {(r.user_ids[u], int(r.item_ids[i])): float(v) for u, i, v in zip(r.users, r.items, r.values)}
    want = {(f"{user_prefix}{row + 1}", col + 1): float(np.float32(matrix[row, col + 1]))
            for row, col in zip(*np.nonzero(rated))}
    assert got == want


def test_jester4_xlsx_keeps_out_of_scale_and_clip_is_explicit(tmp_path):
    xlsx(tmp_path / "jester-4" / JESTER4_RATINGS, np.pad(JESTER, ((0, 0), (0, 154)), constant_values=99))
    import openpyxl
    book = openpyxl.Workbook()
    for k in range(158):
        book.active.append([f"<p>Joke &quot;{k + 1}&quot;</p>"])
    book.save(tmp_path / "jester-4" / "Dataset4JokeSet.xlsx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the official count check: this file is tiny
        r = load_dataset("jester-4", tmp_path, offline=True)
        check_jester(r, np.pad(JESTER, ((0, 0), (0, 154)), constant_values=99))
        assert r.n_items == 158 and r.out_of_scale == 1 and r.observed_min == pytest.approx(-42.28)
        assert r.item_titles[2] == 'Joke "3"'
        c = load_dataset("jester-4", tmp_path, offline=True, clip=True)
    assert c.out_of_scale == 0 and c.observed_min == -10.0
    np.testing.assert_array_equal(c.users, r.users)


def test_jester1_xls_parts(tmp_path):
    from recsys_flowadam.data.registry import JESTER1_PARTS
    parts = [np.pad(JESTER, ((0, 0), (0, 96)), constant_values=99),
             np.pad(JESTER[:2], ((0, 0), (0, 96)), constant_values=99),
             np.pad(JESTER[1:], ((0, 0), (0, 96)), constant_values=99)]
    for name, m in zip(JESTER1_PARTS, parts):
        xls(tmp_path / "jester-1" / name, m)
    both = load_dataset("jester-1", tmp_path, offline=True)
    assert both.n_users == 7 and both.user_ids.tolist()[:4] == ["p1-1", "p1-2", "p1-3", "p2-1"]
    assert both.n_ratings == sum(int((m[:, 1:] != 99).sum()) for m in parts)
    two = load_dataset("jester-1", tmp_path, offline=True, part=2)
    check_jester(two, parts[1], user_prefix="p2-")
    with pytest.raises(DataError, match="part must be 1, 2 or 3"):
        load_dataset("jester-1", tmp_path, offline=True, part=4)


def test_jester_workbook_errors(tmp_path):
    m = np.pad(JESTER, ((0, 0), (0, 146)), constant_values=99)
    import openpyxl
    book = openpyxl.Workbook()
    for row in m.tolist():
        book.active.append(row)
    book.active["C2"] = "n/a"
    (tmp_path / "jester-2plus").mkdir()
    book.save(tmp_path / "jester-2plus" / "x.xlsx")
    (tmp_path / "jester-2plus" / "x.xlsx").rename(tmp_path / "jester-2plus" / "jesterfinal151cols.xlsx")
    xls(tmp_path / "jester-2plus" / "jesterfinal151cols.xls", m[:, :100])
    with pytest.raises(DataError, match=r"jesterfinal151cols\.xls: expected 151 columns"):
        load_dataset("jester-2plus", tmp_path, offline=True)
    from recsys_flowadam.data.jester import read_matrix_workbook
    with pytest.raises(DataError, match=r"jesterfinal151cols\.xlsx:2: cell C2 is not a number: 'n/a'"):
        read_matrix_workbook(tmp_path / "jester-2plus" / "jesterfinal151cols.xlsx")
    (tmp_path / "jester-2plus" / "jesterfinal151cols.xls").write_bytes(b"not a workbook at all")
    with pytest.raises(DataError, match="cannot be read as a .xls workbook"):
        load_dataset("jester-2plus", tmp_path, offline=True)


def test_jester2_double_tab_dat_and_html_texts(tmp_path):
    folder = tmp_path / "jester-2"
    write(folder / "jester_ratings.dat", "1\t\t5\t\t0.219\n1\t\t7\t\t-9.281\n63978\t\t150\t\t9.5\n")
    write(folder / "jester_items.dat", "1:\n<p>A joke &#039;one&#039;<br />\nline two</p>\n\n5:\n<p>Five</p>\n")
    r = load_dataset("jester-2", tmp_path, offline=True)
    assert r.n_items == 150 and r.user_ids.tolist() == ["1", "63978"]
    got = [(r.user_ids[u], r.item_ids[i], round(float(v), 3)) for u, i, v in zip(r.users, r.items, r.values)]
    assert got == [("1", "5", 0.219), ("1", "7", -9.281), ("63978", "150", 9.5)]
    assert r.item_titles[0] == "A joke 'one' line two" and r.item_titles[4] == "Five"
    write(folder / "jester_ratings.dat", "1\t5\t0.219\n")
    with pytest.raises(DataError, match=r"jester_ratings\.dat:1: expected 3 fields separated by '\\t\\t'"):
        load_dataset("jester-2", tmp_path, offline=True, cache=False)


# --- synthetic ----------------------------------------------------------------------------
def test_synthetic_matrix_statistics_and_seed():
    p = make_low_rank_matrix(300, 200, rank=4, density=0.2, noise=0.1, seed=3)
    r = p.ratings
    assert np.linalg.matrix_rank(p.truth, tol=1e-8) == 4
    assert p.mask.sum() == r.n_ratings and abs(r.density - 0.2) < 0.01
    assert abs(p.truth.var() - 1 / 4) < 0.04  # U, V ~ N(0, 1/r): entries of U V^T have variance 1/r
    residual = r.values - p.truth[r.users, r.items]
    assert abs(residual.std() - 0.1) < 0.005 and abs(residual.mean()) < 0.005
    assert np.all(p.mask[r.users, r.items])
    assert r.out_of_scale == 0 and r.scale.min == r.observed_min and r.scale.max == r.observed_max
    q = make_low_rank_matrix(300, 200, rank=4, density=0.2, noise=0.1, seed=3)
    np.testing.assert_array_equal(q.ratings.values, r.values)
    assert not np.array_equal(make_low_rank_matrix(300, 200, 4, 0.2, 0.1, seed=4).truth, p.truth)


def test_synthetic_tensor_and_load_dataset():
    p = make_low_rank_tensor((20, 15, 6), rank=3, density=0.5, noise=0.0, seed=1)
    r = p.ratings
    assert r.n_contexts == 6 and r.contexts is not None
    np.testing.assert_allclose(r.values, p.truth[r.users, r.items, r.contexts], rtol=1e-6, atol=1e-6)
    unfolded = p.truth.reshape(20, -1)
    assert np.linalg.matrix_rank(unfolded, tol=1e-8) == 3
    t = load_dataset("synthetic", n_users=20, n_items=15, n_contexts=6, rank=3, density=0.5, noise=0.0, seed=1)
    np.testing.assert_array_equal(t.values, r.values)
    m = load_dataset("synthetic", n_users=30, n_items=10, rank=2, density=0.3, noise=0.05, seed=0)
    assert (m.n_users, m.n_items, m.n_contexts) == (30, 10, 0)
    with pytest.raises(DataError, match="density"):
        load_dataset("synthetic", density=1.5)


def test_fast_xlsx_reader_matches_openpyxl(tmp_path):
    from recsys_flowadam.data.jester import _xlsx_rows
    from recsys_flowadam.data.xlsx import read_numeric_sheet
    import openpyxl
    import pandas as pd

    m = np.pad(JESTER, ((0, 1), (0, 30)), constant_values=99)
    book = openpyxl.Workbook()
    for row in m.tolist():
        book.active.append(row)
    book.active["AD4"] = None  # an empty cell inside the sheet
    book.active["B4"] = None
    book.save(tmp_path / "num.xlsx")
    fast = read_numeric_sheet(tmp_path / "num.xlsx")
    slow = pd.DataFrame.from_records(_xlsx_rows(tmp_path / "num.xlsx")).to_numpy(dtype=float, na_value=np.nan)
    assert fast is not None and fast.shape == slow.shape == m.shape
    np.testing.assert_array_equal(fast, slow)
    assert np.isnan(fast[3, 1]) and fast[1, 4] == -42.28
    book.active["C2"] = "text"  # a string cell: the fast reader declines, openpyxl reports it
    book.save(tmp_path / "text.xlsx")
    assert read_numeric_sheet(tmp_path / "text.xlsx") is None
