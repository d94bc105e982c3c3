import os

import pytest

from nodulesynth.errors import NoduleSynthError
from nodulesynth.io import atomic_dir, atomic_file


def test_atomic_dir_replaces_only_on_success_and_accepts_dot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with atomic_dir(".", overwrite=False) as tmp:  # the current (empty) folder itself
        (tmp / "a.txt").write_text("x")
    assert (tmp_path / "a.txt").read_text() == "x"
    with pytest.raises(NoduleSynthError, match="not empty"):
        with atomic_dir(tmp_path, overwrite=False):
            pass
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "half.txt").write_text("half")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_atomic_file_has_normal_permissions(tmp_path):
    with atomic_file(tmp_path / "f.bin") as fh:
        fh.write(b"1")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o666 & ~mask
