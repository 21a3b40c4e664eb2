"""A redeploy clones the live release on the host and patches the clone (clonepatch.py):
the new release must be the artifact exactly, and the live release must not change."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import time
from pathlib import Path

from project import Project, local_target, spare_unlocked

T0 = 1_700_000_000


def tree(root: Path) -> dict[str, tuple]:
    """Everything rsync -a sets, per path (the root itself aside: moving the release into
    place may touch its times). A directory's time in whole seconds: rsync leaves one that
    differs by less than that alone (its default --modify-window), cloned or not."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath, name)
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_mtime_ns // 10**9)
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_mtime_ns,
                            hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def write(p: Path, text: str, mtime: int, mode: int = 0o644) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    p.chmod(mode)
    os.utime(p, (mtime, mtime))


def pin_dirs(root: Path) -> None:
    """Directory times as a build would leave them (set last: writing changes them)."""
    for dirpath, dirnames, _ in os.walk(root, topdown=False):
        for name in dirnames:
            d = Path(dirpath, name)
            if not d.is_symlink():
                os.utime(d, (T0 + 7, T0 + 7))


def release_dir(p: Project, host: str, release: str | None) -> Path:
    assert release is not None
    return p.root(host) / "releases" / release


def test_a_redeploy_is_the_artifact_exactly_and_the_live_release_is_untouched(project: Project):
    redeploy_is_exact(project)


def redeploy_is_exact(p: Project, host_user: tuple[int, int] | None = None) -> None:
    """Deploy, drift the live release by hand, redeploy with every kind of change: the new
    release is the artifact exactly and the live one keeps every byte, mode and time.
    `host_user`: the (uid, gid) the hosts log in as, when not root (drift is made as it)."""
    app = p.app
    shutil.rmtree(app)
    write(app / "index.html", "v1\n", T0)
    write(app / "pinned.txt", "aaaa\n", T0)  # changes content, keeps size and mtime
    write(app / "sub/pinned.txt", "cccc\n", T0)  # the same, deeper
    write(app / "mode.sh", "#!/bin/sh\n", T0)  # changes mode only
    write(app / "touched.txt", "same\n", T0)  # changes mtime only
    write(app / "gone.txt", "bye\n", T0)
    write(app / "docs/old.txt", "old\n", T0)  # removed: its directory's time changes there
    write(app / "docs/keep.txt", "keep\n", T0)
    write(app / "olddir/a/b.txt", "deep\n", T0)
    write(app / "becomes_dir", "file\n", T0)
    write(app / "becomes_file/x.txt", "x\n", T0)
    write(app / "drifted.txt", "as uploaded\n", T0)  # edited on the host, same in v2
    write(app / "chmodded.txt", "as uploaded\n", T0)  # chmod-ed on the host, same in v2
    for i in range(30):
        write(app / "static" / f"asset{i}.js", f"// {i}\n" * 50, T0)
    write(app / "#hash.txt", "v1\n", T0)  # rsync reads # and ; at the start of a list
    os.symlink("static/asset1.js", app / "retarget")  # entry as a comment
    os.symlink("static/asset2.js", app / "link_to_file")
    write(app / "sealed/conf.txt", "v1\n", T0)  # in a read-only directory; changes in v2
    (app / "sealed").chmod(0o555)
    pin_dirs(app)
    p.ok("deploy", "test")
    hosts = p.target.hosts

    # drift on every host, in the live release: the next release must not carry it
    for h in hosts:
        live = release_dir(p, h, p.current(h))
        (live / "drifted.txt").write_text("hotfixed!!!\n")
        (live / "chmodded.txt").chmod(0o600)
        (live / "stray.txt").write_text("left by hand\n")
        if host_user is not None:  # made by hand on the host, as its user
            for name in ("drifted.txt", "stray.txt"):
                os.chown(live / name, *host_user)
    before = {h: tree(release_dir(p, h, p.current(h))) for h in hosts}
    first = {h: p.current(h) for h in hosts}

    write(app / "pinned.txt", "bbbb\n", T0)
    write(app / "sub/pinned.txt", "dddd\n", T0)
    (app / "mode.sh").chmod(0o755)
    os.utime(app / "touched.txt", (T0 + 60, T0 + 60))
    (app / "gone.txt").unlink()
    (app / "docs/old.txt").unlink()
    shutil.rmtree(app / "olddir")
    (app / "becomes_dir").unlink()
    write(app / "becomes_dir/inner.txt", "now a dir\n", T0)
    shutil.rmtree(app / "becomes_file")
    write(app / "becomes_file", "now a file\n", T0)
    (app / "retarget").unlink()
    os.symlink("static/asset3.js", app / "retarget")
    (app / "link_to_file").unlink()
    write(app / "link_to_file", "was a link\n", T0)
    os.symlink("index.html", app / "new_link")
    write(app / "new/deeper/file.txt", "new\n", T0 + 3)
    (app / "empty_dir").mkdir()
    write(app / "static/asset5.js", "// changed\n", T0 + 9)
    write(app / "#hash.txt", "v2\n", T0 + 1)
    write(app / ";semi/x.txt", "new\n", T0)
    (app / "sealed").chmod(0o755)
    write(app / "sealed/conf.txt", "v2\n", T0 + 5)
    (app / "sealed").chmod(0o555)
    pin_dirs(app)
    app.chmod(0o750)  # the release directory itself takes the artifact's mode
    expected = tree(app)

    r = p.ok("-vv", "deploy", "test")
    assert "as a clone of" in r.stderr  # the path under test was taken
    for h in hosts:
        new = p.current(h)
        assert new != first[h]
        assert tree(release_dir(p, h, new)) == expected, h
        assert stat.S_IMODE(release_dir(p, h, new).stat().st_mode) == 0o750
        assert tree(release_dir(p, h, first[h])) == before[h], h  # not a byte, mode or time
        assert stat.S_IMODE(release_dir(p, h, first[h]).stat().st_mode) == 0o755
    p.ok("verify", "test")


def spare_of_live(p: Project, host: str) -> Path:
    """The spare clone the last deploy started making of the live release, once it is made
    (it is built in the background after the deploy returns)."""
    spare = p.root(host) / ".switchover" / "spare" / str(p.current(host))
    deadline = time.monotonic() + 30
    while not spare.is_dir() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert spare.is_dir(), f"{host}: no spare clone of the live release"
    spare_unlocked(spare.parent)  # else the next deploy may find it still locked, and copy
    return spare


def test_the_next_deploy_starts_from_the_spare_and_still_sees_drift(project: Project):
    app = project.app
    shutil.rmtree(app)
    write(app / "index.html", "v1\n", T0)
    write(app / "edited.txt", "as uploaded\n", T0)  # edited in place by hand: size changes
    write(app / "deleted.txt", "kept\n", T0)  # deleted by hand after the spare was made
    write(app / "chmodded.txt", "same\n", T0)  # chmod-ed by hand: the spare shares the inode
    write(app / "sub/deep.txt", "deep\n", T0)
    pin_dirs(app)
    project.ok("deploy", "test")
    hosts = project.target.hosts
    for h in hosts:
        spare = spare_of_live(project, h)
        live = release_dir(project, h, project.current(h))
        assert (spare / "sub/deep.txt").stat().st_ino == (live / "sub/deep.txt").stat().st_ino
        with (live / "edited.txt").open("a") as f:  # the same inode: the spare has it too
            f.write("hotfix\n")
        (live / "deleted.txt").unlink()  # the spare still has it
        (live / "chmodded.txt").chmod(0o600)
        (live / "stray.txt").write_text("left by hand\n")  # the spare lacks it
    before = {h: tree(release_dir(project, h, project.current(h))) for h in hosts}
    first = {h: project.current(h) for h in hosts}
    write(app / "index.html", "v2\n", T0 + 60)
    write(app / "sub/new.txt", "new\n", T0)
    pin_dirs(app)
    expected = tree(app)
    r = project.ok("-vv", "deploy", "test")
    assert r.stderr.count("(from the spare made after the last deploy)") == len(hosts)
    for h in hosts:
        new = project.current(h)
        assert tree(release_dir(project, h, new)) == expected, h
        assert tree(release_dir(project, h, first[h])) == before[h], h  # untouched
        assert not (project.root(h) / ".switchover" / "spare" / first[h]).exists()
        spare_of_live(project, h)  # and one is made of the new live release
    project.ok("verify", "test")


def test_a_spare_changed_since_it_was_made_is_not_patched(tmp_path: Path):
    p = Project(tmp_path / "proj", local_target(tmp_path))
    p.ok("deploy", "test")
    spare = spare_of_live(p, "localhost")
    os.utime(spare / "static", (T0, T0))  # a directory no longer at time 0
    (p.app / "index.html").write_text("v2, a different size\n")
    r = p.ok("-vv", "deploy", "test")
    assert "the clone cannot be listed faithfully (a directory of the clone is not as the" \
        " clone script leaves it" in r.stderr
    assert tree(release_dir(p, "localhost", p.current())) == tree(p.app)


def test_a_host_without_gnu_find_gets_the_whole_tree(tmp_path: Path):
    # BusyBox find has no -printf: the upload falls back to rsync of the whole tree.
    p = Project(tmp_path / "proj", local_target(tmp_path))
    p.ok("deploy", "test")
    first = p.current()
    fake = tmp_path / "bin"
    fake.mkdir()
    real = shutil.which("find")
    (fake / "find").write_text(
        f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -printf ] && exit 1; done\nexec {real} "$@"\n')
    (fake / "find").chmod(0o755)
    index = p.app / "index.html"
    stamp = index.stat().st_mtime
    index.write_text("v2\n")  # same size and mtime: rsync's quick check would miss it
    os.utime(index, (stamp, stamp))
    (p.app / "static" / "asset3.js").unlink()
    r = p.ok("-vv", "deploy", "test", env={"PATH": f"{fake}:{os.environ['PATH']}"})
    assert "cannot clone the live release (no GNU find or cp on the host)" in r.stderr
    assert "as a clone of" not in r.stderr
    assert "(quick check;" in r.stderr  # and the file it would miss is sent again
    assert "sync again, ignoring size and mtime: 1 file(s)" in r.stderr
    new = release_dir(p, "localhost", p.current())
    assert p.current() != first
    assert (new / "index.html").read_text() == "v2\n"
    assert not (new / "static" / "asset3.js").exists()
    assert tree(new) == tree(p.app)


def test_a_clone_that_fails_halfway_is_removed_before_the_whole_tree_is_synced(tmp_path: Path):
    # cp -l refused part way (a full disk, fs.protected_hardlinks): a whole-tree rsync into a
    # staging dir still holding hard links to the live release would take them for its own
    # and chmod them in place: the live release's files.
    p = Project(tmp_path / "proj", local_target(tmp_path))
    mode_only = p.app / "static" / "asset4.js"
    p.ok("deploy", "test")
    shutil.rmtree(spare_of_live(p, "localhost"))  # so that this deploy clones with `cp`
    first = p.current()
    live = release_dir(p, "localhost", first)
    before = tree(live)
    fake = tmp_path / "bin"
    fake.mkdir()
    real = shutil.which("cp")
    (fake / "cp").write_text(f'#!/bin/sh\n{real} "$@"\necho "cp: cannot create hard link: '
                             f'Operation not permitted" >&2\nexit 1\n')
    (fake / "cp").chmod(0o755)
    mode_only.chmod(0o600)  # same size, same mtime: only the mode differs
    r = p.ok("-vv", "deploy", "test", env={"PATH": f"{fake}:{os.environ['PATH']}"})
    assert "cannot clone the live release (cp: cannot create hard link" in r.stderr
    assert "(quick check;" in r.stderr
    new = release_dir(p, "localhost", p.current())
    assert p.current() != first and tree(new) == tree(p.app)
    assert tree(live) == before  # asset4.js there is still 0644
