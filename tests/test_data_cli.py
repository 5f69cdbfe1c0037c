"""`recsys-flowadam data list | fetch | info` in-process."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from recsys_flowadam.cli import main
from recsys_flowadam.data import DATASETS

U_DATA = "1\t10\t5\t100\n1\t20\t3\t200\n2\t10\t1\t300\n3\t30\t4\t400\n"
INFO_KEYS = {"name", "n_users", "n_items", "n_ratings", "density", "rating_min", "rating_max", "rating_mean",
             "out_of_scale"}


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("RECSYS_FLOWADAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RECSYS_FLOWADAM_DATA", raising=False)
    (tmp_path / "data" / "ml-100k").mkdir(parents=True)
    (tmp_path / "data" / "ml-100k" / "u.data").write_text(U_DATA)
    return tmp_path / "data"


def test_list_json_marks_present_datasets(root, capsys):
    assert main(["data", "list", "--data-dir", str(root), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in out["datasets"]}
    assert set(rows) == set(DATASETS)
    assert rows["ml-100k"]["present"] == "yes" and rows["jester-4"]["present"] == "no"
    assert all(r["licence"] and r["size"] and r["description"] for r in rows.values())


def test_list_table(root, capsys):
    assert main(["data", "list", "--data-dir", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    ml = next(l for l in lines if l.startswith("ml-100k "))
    assert " yes " in ml and next(l for l in lines if l.startswith("ml-25m ")).split()[3] == "no"


def test_info_json(root, capsys):
    assert main(["data", "info", "ml-100k", "--data-dir", str(root), "--json", "--offline"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert INFO_KEYS <= set(info)
    assert (info["name"], info["n_users"], info["n_items"], info["n_ratings"]) == ("ml-100k", 3, 3, 4)
    assert info["density"] == pytest.approx(4 / 9)
    assert (info["rating_min"], info["rating_max"], info["rating_mean"]) == (1.0, 5.0, pytest.approx(13 / 4))
    assert info["out_of_scale"] == 0


def test_info_text_with_split_and_synthetic_options(root, capsys):
    assert main(["data", "info", "ml-100k", "--data-dir", str(root), "--split", "random:0.5,0.25,0.25"]) == 0
    out = capsys.readouterr().out
    assert "3 users x 3 items, 4 ratings" in out and '"n_train": 2' in out
    assert "the official release has 100,000 ratings" in out
    assert main(["data", "info", "synthetic", "-o", "n_users=7", "-o", "n_items=5", "-o", "rank=2",
                 "-o", "density=1", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["n_users"], info["n_items"], info["n_ratings"]) == (7, 5, 35)


def test_info_clip(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RECSYS_FLOWADAM_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "r.csv"
    path.write_text("u,i,r\na,x,-12\nb,x,3\n")
    args = ["data", "info", f"csv:{path}", "-o", "scale_min=-20", "-o", "scale_max=20", "--json"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["rating_min"] == -12


def test_user_errors_exit_2_without_traceback(root, capsys):
    assert main(["data", "info", "jester-4", "--data-dir", str(root), "--offline"]) == 2
    err = capsys.readouterr().err
    assert "jester-4" in err and "JesterDataset4.zip" in err and "Traceback" not in err
    assert main(["data", "info", "nope", "--data-dir", str(root)]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err
    assert main(["data", "fetch", "nope", "--data-dir", str(root)]) == 2
    assert main(["data", "info", "synthetic", "-o", "rank"]) == 2
    (root / "ml-100k" / "u.data").write_text(U_DATA.replace("\t3\t", "\tx\t"))
    assert main(["data", "info", "ml-100k", "--data-dir", str(root)]) == 2
    assert "u.data:2: field 'rating' is not a number" in capsys.readouterr().err


def test_console_entry_point_runs(root):
    proc = subprocess.run([sys.executable, "-m", "recsys_flowadam", "data", "list", "--data-dir", str(root)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "ml-100k" in proc.stdout


def _command(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` (which calls the command's entry point) in a fresh interpreter with an exit
    handler registered first, as a library's would be."""
    prelude = "import atexit, sys; atexit.register(lambda: sys.stderr.write('exit handler ran\\n'))\n"
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=60)


# the command's entry point, with main replaced by one that prints a megabyte (more than a pipe holds)
PRINTS_A_MEGABYTE = ("import recsys_flowadam.cli as cli\n"
                     "cli.main = lambda argv=None: print('x' * 1_000_000) or 0\n"
                     "cli.run()\n")


def test_command_ends_without_teardown_but_with_exit_handlers_and_all_output(root):
    ok = _command(f"from recsys_flowadam.cli import run; run(['data', 'list', '--data-dir', {str(root)!r}])")
    assert ok.returncode == 0 and ok.stdout.splitlines()[1].split()[:2] == ["NAME", "SIZE"]
    assert ok.stderr == "exit handler ran\n"  # the handlers ran, and no teardown printed anything
    big = _command(PRINTS_A_MEGABYTE)  # all of it arrives, though the process ends right after
    assert big.returncode == 0 and big.stdout == "x" * 1_000_000 + "\n" and big.stderr == "exit handler ran\n"
    err = _command("from recsys_flowadam.cli import run; "
                   f"run(['data', 'info', 'nosuch', '--data-dir', {str(root)!r}])")
    assert err.returncode == 2 and "unknown dataset 'nosuch'" in err.stderr and "exit handler ran" in err.stderr


def test_the_command_does_not_wait_on_the_interpreter_s_teardown():
    # a thread left running by the command (a stand-in for the teardown's cost): normal
    # interpreter exit would wait the minute out; the command ends once its exit handlers ran
    leaves_a_thread = ("import threading, time\n"
                       "import recsys_flowadam.cli as cli\n"
                       "cli.main = lambda argv=None: threading.Thread(target=time.sleep, args=(60,)).start() or 3\n"
                       "cli.run()\n")
    t0 = time.perf_counter()
    proc = _command(leaves_a_thread)
    assert proc.returncode == 3 and proc.stderr == "exit handler ran\n"
    assert time.perf_counter() - t0 < 30


def test_a_reader_that_goes_away_ends_the_command_quietly():
    reader = ("import subprocess, sys\n"
              f"p = subprocess.Popen([sys.executable, '-c', {PRINTS_A_MEGABYTE!r}], stdout=subprocess.PIPE,"
              " stderr=subprocess.PIPE)\n"
              "p.stdout.read(10)\n"
              "p.stdout.close()  # (as head does)\n"
              "err = p.stderr.read().decode()\n"
              "print(p.wait(), repr(err))\n")
    proc = subprocess.run([sys.executable, "-c", reader], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "1 ''"  # status 1, and not a word on stderr (no traceback)


def test_missing_dataset_says_which_root_was_searched_and_creates_nothing(root, capsys, monkeypatch, tmp_path):
    before = sorted(p.name for p in root.iterdir())
    assert main(["data", "info", "jester-4", "--data-dir", str(root)]) == 2
    err = capsys.readouterr().err
    assert f"data root searched: {root} (from --data-dir)" in err and "Traceback" not in err
    assert f"recsys-flowadam data fetch jester-4 --data-dir {root}" in err and "RECSYS_FLOWADAM_DATA=DIR" in err
    assert sorted(p.name for p in root.iterdir()) == before  # no download started, no empty jester-4/
    # a forgotten export: the message says the default root was used
    from recsys_flowadam.data import paths
    monkeypatch.setattr(paths.platformdirs, "user_cache_path", lambda app: tmp_path / "user-cache")
    assert main(["data", "info", "jester-4"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'user-cache' / 'datasets'} (the default: neither --data-dir nor $RECSYS_FLOWADAM_DATA is set)" in err
    assert not (tmp_path / "user-cache").exists()
    monkeypatch.setenv("RECSYS_FLOWADAM_DATA", str(root))
    assert main(["data", "info", "jester-4"]) == 2
    assert f"data root searched: {root} (from $RECSYS_FLOWADAM_DATA)" in capsys.readouterr().err


def test_data_dir_naming_the_dataset_folder_itself(root, capsys):
    assert main(["data", "info", "ml-100k", "--data-dir", str(root / "ml-100k"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_ratings"] == 4
    assert main(["data", "list", "--data-dir", str(root / "ml-100k"), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["datasets"]}
    assert rows["ml-100k"]["present"] == "yes" and rows["ml-100k"]["path"] == str(root / "ml-100k")


def test_root_holding_a_dataset_s_files_directly(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RECSYS_FLOWADAM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "mydata").mkdir()
    (tmp_path / "mydata" / "u.data").write_text(U_DATA)
    assert main(["data", "info", "ml-100k", "--data-dir", str(tmp_path / "mydata")]) == 2
    err = capsys.readouterr().err
    assert (f"note: {tmp_path / 'mydata'} itself holds the files of ml-100k; a data root holds one folder per "
            f"dataset: move them into {tmp_path / 'mydata' / 'ml-100k'}/") in err
