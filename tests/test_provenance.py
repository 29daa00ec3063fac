"""karma.provenance: a result JSON names its command, code commit, config and data files."""

import hashlib
import json
import subprocess

from conftest import ROOT
from karma.config import DataConfig, load_config
from karma.provenance import git_state, hash_folder, provenance


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _git(cwd, *args) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_data_files_are_named_with_their_hashes_and_follow_changes(tmp_path):
    data = tmp_path / "scientific"
    (data / "meta").mkdir(parents=True)
    files = {"Scientific.inter": b"user_id:token\titem_id:token\n1\t2\n", "Scientific.item": b"item_id:token\n2\n",
             "meta/README.md": b"# notes\n"}
    for name, blob in files.items():
        (data / name).write_bytes(blob)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["data.source=recbole", f"data.path={data}"])
    p = provenance(cfg, "python jobs/train_plain.py --config configs/tiny.yaml")
    assert set(p) == {"command", "git_commit", "git_dirty", "config", "data_files"}
    assert p["command"] == "python jobs/train_plain.py --config configs/tiny.yaml"
    assert p["config"] == cfg.to_dict() and json.loads(json.dumps(p)) == p  # plain data
    assert p["data_files"] == {name: _sha(blob) for name, blob in files.items()}
    (data / "Scientific.item").write_bytes(b"item_id:token\n3\n")
    again = provenance(cfg)["data_files"]
    assert again["Scientific.item"] == _sha(b"item_id:token\n3\n") != p["data_files"]["Scientific.item"]
    assert {k: v for k, v in again.items() if k != "Scientific.item"} == {
        k: v for k, v in p["data_files"].items() if k != "Scientific.item"}
    # the data section alone (what bench/text_knn.py has) reads the same folder
    assert provenance(DataConfig(source="recbole", path=str(data)))["data_files"] == again


def test_large_files_hash_in_blocks(tmp_path):
    blob = bytes(range(256)) * 1000 + b"tail"
    (tmp_path / "big.bin").write_bytes(blob)
    assert hash_folder(tmp_path, block=4096) == hash_folder(tmp_path) == {"big.bin": _sha(blob)}


def test_synthetic_and_missing_data(tmp_path):
    synthetic = provenance(load_config(ROOT / "configs" / "tiny.yaml"))
    assert synthetic["data_files"] == {} and synthetic["config"]["data"]["synthetic_users"] == 300
    missing = provenance({"data": {"source": "parquet", "path": str(tmp_path / "gone")}})
    assert missing["data_files"] is None  # not there: unknown, not "no files"
    assert provenance()["config"] is None and provenance()["command"].startswith("python ")


def test_git_commit_and_dirt_of_a_checkout(tmp_path):
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "mod.py").write_text("x = 1\n")
    (repo / ".gitignore").write_text("venv/\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "first")
    head = _git(repo, "rev-parse", "HEAD")
    assert git_state(repo / "pkg") == (head, False)
    (repo / "new.txt").write_text("untracked\n")
    assert git_state(repo / "pkg") == (head, True)
    (repo / "new.txt").unlink()
    (repo / "pkg" / "mod.py").write_text("x = 2\n")
    assert git_state(repo / "pkg") == (head, True)
    # an installed copy inside some checkout's ignored folder is not that checkout's code
    (repo / "venv" / "karma").mkdir(parents=True)
    assert git_state(repo / "venv" / "karma") == (None, None)
    outside = tmp_path / "plain"
    outside.mkdir()
    assert git_state(outside) == (None, None)


def test_no_git_executable_is_no_commit(monkeypatch):
    monkeypatch.setenv("PATH", "")
    p = provenance(load_config(ROOT / "configs" / "tiny.yaml"))
    assert p["git_commit"] is None and p["git_dirty"] is None


def test_this_package_reports_its_own_checkout():
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT / "platform" / "karma", capture_output=True,
                          text=True)
    expected = head.stdout.strip() if head.returncode == 0 else None  # a copy without .git has none
    assert provenance()["git_commit"] == expected
