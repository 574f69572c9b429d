"""Provenance: a commit is '-dirty' only when the code under the given source folder changed."""
import subprocess

from kdprune.utils.meta import git_commit


def _git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


def test_dirty_only_when_the_source_changed(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("x = 1\n")
    (tmp_path / "results.jsonl").write_text("{}\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "c")
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    (tmp_path / "results.jsonl").write_text("{}\n{}\n")  # a bench appending its lines
    (tmp_path / "pkg" / "new.py").write_text("")  # untracked: not what the commit names as code
    assert git_commit(tmp_path / "pkg") == sha
    (tmp_path / "pkg" / "m.py").write_text("x = 2\n")
    assert git_commit(tmp_path / "pkg") == sha + "-dirty"
    assert git_commit(tmp_path) == sha + "-dirty"


def test_outside_git_is_none(tmp_path):
    assert git_commit(tmp_path) is None
