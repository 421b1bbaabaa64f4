"""Where results come from: the git commit of the code that produced them, and the hash of a file they read."""

import hashlib
import os
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str, repo_dir: str | Path) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo_dir, capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()


def git_info(repo_dir: str | Path = REPO_ROOT) -> dict:
    """{"git_commit": `git rev-parse HEAD` or "unknown", "git_dirty": tracked files modified (None if unknown)}."""
    try:
        commit = _git("rev-parse", "HEAD", repo_dir=repo_dir)
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no", repo_dir=repo_dir))
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": None}
    return {"git_commit": commit or "unknown", "git_dirty": dirty}


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
