"""Where results come from: the git commit of the code that produced them."""

import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


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
