import errno
import os
import shutil
import subprocess
import sys
import textwrap


import pytest

from nodulesynth.cli import main
from nodulesynth.errors import NoduleSynthError
from nodulesynth.io import MARKER, atomic_dir, atomic_file, check_out_dir, is_ours


def test_atomic_dir_replaces_only_on_success_and_accepts_dot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with atomic_dir(".", overwrite=False) as tmp:  # the current (empty) folder itself
        (tmp / "a.txt").write_text("x")
    assert (tmp_path / "a.txt").read_text() == "x" and is_ours(tmp_path)
    with pytest.raises(NoduleSynthError, match="not empty"):
        with atomic_dir(tmp_path, overwrite=False):
            pass
    monkeypatch.chdir(tmp_path)  # the old '.' was renamed away (as a new process would see it)
    with atomic_dir(".", overwrite=True) as tmp:  # '.' written by us may be replaced
        (tmp / "b.txt").write_text("y")
    assert sorted(p.name for p in tmp_path.iterdir()) == [MARKER, "b.txt"]
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "half.txt").write_text("half")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == [MARKER, "b.txt"]


def test_atomic_file_has_normal_permissions(tmp_path):
    with atomic_file(tmp_path / "f.bin") as fh:
        fh.write(b"1")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o666 & ~mask


def test_overwrite_never_deletes_a_folder_nodulesynth_did_not_write(tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(NoduleSynthError, match="not written by nodulesynth"):
        with atomic_dir(mine, overwrite=True):
            pass
    assert (mine / "thesis.tex").read_text() == "years of work"
    monkeypatch.chdir(mine)  # `--out ""` (an unset variable) must not mean the current folder
    for empty in ("", "  "):
        with pytest.raises(NoduleSynthError, match="empty path"):
            check_out_dir(empty, overwrite=True)
    with pytest.raises(NoduleSynthError, match="filesystem root"):
        check_out_dir("/", overwrite=True)
    assert (mine / "thesis.tex").is_file()


@pytest.mark.parametrize("rel, word", [("data", "is the input"), (".", "contains the input"),
                                       ("data/sub/out", "lies inside the input")])
def test_out_must_stay_clear_of_inputs(tmp_path, rel, word):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "scan.mhd").write_text("x")
    with pytest.raises(NoduleSynthError, match=word):
        check_out_dir(tmp_path / rel, overwrite=True, inputs=[("--luna16", data)])
    assert (data / "scan.mhd").is_file()


def test_cli_refuses_input_as_out_and_empty_out(tmp_path, capsys):
    luna = tmp_path / "luna"
    (luna / "subset0").mkdir(parents=True)
    (luna / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n")
    for out in (luna, tmp_path):
        assert main(["prepare", "--luna16", str(luna), "--out", str(out), "--overwrite"]) == 2
        assert "input --luna16" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["prepare", "--luna16", str(luna), "--out", "", "--overwrite"])
    assert e.value.code == 2 and "empty path" in capsys.readouterr().err
    weights = tmp_path / "w"
    weights.mkdir()
    (weights / "tsgan.json").write_text("{}")
    assert main(["generate", "--n", "1", "--weights", str(weights), "--out", str(weights), "--overwrite"]) == 2
    assert "input --weights" in capsys.readouterr().err
    assert main(["generate", "--masks", str(weights), "--out", str(weights / "o")]) == 2
    assert "lies inside the input --masks" in capsys.readouterr().err
    assert main(["train", "translator", "--data", str(luna), "--out", str(luna / "run")]) == 2
    assert "lies inside the input --data" in capsys.readouterr().err
    assert (luna / "annotations.csv").is_file() and (weights / "tsgan.json").is_file()


def test_train_probes_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "masks", "--data", str(tmp_path / "nope"), "--out", str(blocker / "run")]) == 2
    assert "--out" in capsys.readouterr().err


def _stale(parent, name, pid):
    d = parent / f".{name}.tmp-{pid}-abc"
    d.mkdir()
    (d / "half.npy").write_bytes(b"0" * 100)
    (d / MARKER).write_text("{}")
    return d


def test_stale_temp_folders_of_dead_runs_are_swept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = _stale(tmp_path, "ds", dead.pid)
    live = _stale(tmp_path, "ds", os.getpid())  # a running writer's: kept
    other = tmp_path / f".ds.tmp-{dead.pid}-xyz"  # no marker: not ours, kept
    other.mkdir()
    unrelated = _stale(tmp_path, "other", dead.pid)  # another --out's: kept
    with atomic_dir(tmp_path / "ds") as tmp:
        (tmp / "a").write_text("1")
    assert not stale.exists() and live.exists() and other.exists() and unrelated.exists()


def test_sigterm_cleans_up_like_ctrl_c(tmp_path):
    """A subprocess inside atomic_dir gets SIGTERM (what `timeout` and schedulers send): no temp
    folder is left behind and the exit status says so."""
    script = textwrap.dedent(f"""
        import sys, time
        from nodulesynth import cli
        from nodulesynth.io import atomic_dir
        class Cmd:
            @staticmethod
            def add_arguments(p): pass
            @staticmethod
            def run(args):
                with atomic_dir({str(tmp_path / 'out')!r}) as tmp:
                    (tmp / "half.bin").write_bytes(b"0" * 1000)
                    print("ready", flush=True)
                    time.sleep(60)
        cli.COMMANDS = {{"slow": ("__main__", "test")}}
        import __main__
        __main__.add_arguments, __main__.run = Cmd.add_arguments, Cmd.run
        sys.exit(cli.main(["slow"]))
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    assert any(tmp_path.iterdir())
    p.terminate()
    _, err = p.communicate(timeout=30)
    assert p.returncode == 128 + 15 and "terminated" in err, err
    assert list(tmp_path.iterdir()) == []


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))

    with pytest.raises(NoduleSynthError, match=r"disk full .*1,000 bytes free.*about 1,99\d,\d{3} more needed"):
        with atomic_dir(tmp_path / "out", progress=lambda: 0.5) as tmp:  # half done: 2 MB in all
            (tmp / "part").write_bytes(b"0" * 10**6)
            full()
    assert list(tmp_path.iterdir()) == []
