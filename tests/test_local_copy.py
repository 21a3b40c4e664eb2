"""The rsync-less copier used by the local target when rsync is not installed."""

import os

from switchover.transport.local import copy_tree


def test_copy_tree_links_unchanged_and_copies_changed_even_with_equal_mtime(tmp_path):
    src, old, new = tmp_path / "src", tmp_path / "old", tmp_path / "new"
    (src / "d").mkdir(parents=True)
    (src / "same.txt").write_text("same")
    (src / "d" / "changed.txt").write_text("v2")
    (src / "skip.log").write_text("x")
    os.symlink("same.txt", src / "link")
    old.mkdir()
    (old / "d").mkdir()
    (old / "same.txt").write_text("same")
    (old / "d" / "changed.txt").write_text("v1")
    for p in ("same.txt", "d/changed.txt"):
        st = (src / p).stat()
        os.utime(old / p, (st.st_atime, st.st_mtime))
        os.chmod(old / p, st.st_mode)
    stats = copy_tree(src, new, old, ["*.log"])
    assert (new / "same.txt").stat().st_ino == (old / "same.txt").stat().st_ino
    assert (new / "d" / "changed.txt").read_text() == "v2"
    assert (new / "d" / "changed.txt").stat().st_ino != (old / "d" / "changed.txt").stat().st_ino
    assert os.readlink(new / "link") == "same.txt"
    assert not (new / "skip.log").exists()
    assert stats.files_transferred == 1


def test_large_stdin_reaches_a_slow_reader_whole():
    """Regression: input must keep flowing after the first poll window (0.2 s) has passed."""
    from switchover.transport.base import run_process

    data = b"x" * (4 << 20)
    cp = run_process(["sh", "-c", "sleep 1; wc -c"], timeout=30, host="local", what="test",
                     input=data)
    assert cp.returncode == 0
    assert cp.stdout.strip() == str(len(data))


def test_excludes_match_what_rsync_excludes(tmp_path):
    """The manifest must list exactly what rsync uploads, or verify reports phantom drift."""
    import shutil
    import subprocess

    import pytest

    from switchover import manifest

    if not shutil.which("rsync"):
        pytest.skip("rsync not installed")
    src = tmp_path / "src"
    for rel in ("logs/a.log", "app/logs/b.log", "app/logs/keep.txt", "other/c.txt",
                "x/other/d.txt", "top.log", "deep/er/top.log", "cache/f", "app/cache"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(rel)
    (src / "lnk").mkdir()
    (src / "lnk" / "cache").symlink_to("../x")  # a link to a directory is not a directory
    patterns = ["logs/*.log", "/other", "cache/", "*.tmp"]
    dest = tmp_path / "dest"
    subprocess.run(["rsync", "-a", *(f"--exclude={p}" for p in patterns), f"{src}/", f"{dest}/"],
                   check=True)
    uploaded = {str(p.relative_to(dest)) for p in dest.rglob("*")
                if p.is_symlink() or p.is_file()}
    assert set(manifest.scan(src, patterns)) == uploaded
    assert "app/logs/keep.txt" in uploaded and "x/other/d.txt" in uploaded
    # "cache/" is for directories only: a file or a link of that name is uploaded.
    assert {"app/cache", "lnk/cache"} <= uploaded and "cache/f" not in uploaded
