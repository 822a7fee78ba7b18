"""Every ```python sample of README.md runs, in order, in one namespace; the commands it
shows are the ones that work."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from embedcache.cli import main
from fakeserver import FakeEmbeddingServer

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
LOCAL_URL = "http://localhost:8000/v1"


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def test_there_are_python_samples():
    assert len(blocks("python")) >= 8


def test_python_samples_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EMBEDCACHE_DIR", str(tmp_path / "cache"))
    for key in ("IONOS_API_TOKEN", "OPENAI_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    namespace: dict = {"__name__": "readme"}
    # the local-server sample talks to a real OpenAI-compatible server on loopback
    with FakeEmbeddingServer(dim=8, api_key=None, models=("my-embedding-model",)) as server:
        for k, code in enumerate(blocks("python")):
            code = code.replace(LOCAL_URL, server.base_url)
            try:
                exec(compile(code, f"README.md python block {k + 1}", "exec"), namespace)
            except Exception as exc:  # pragma: no cover - the message names the block
                pytest.fail(f"README python block {k + 1} failed: {exc!r}\n{code}")
    out = capsys.readouterr().out
    assert "threshold must be in [-1, 1], got 1.5" in out
    assert (tmp_path / "pairs.csv").is_file()


def test_test_command_is_what_ci_runs():
    command = next(b for b in blocks("bash") if "pytest" in b).strip()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    ci_steps = [line.strip() for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    ci_text = " && ".join(s for s in ci_steps if not s.startswith(("set ", "cd ")))
    normalize = lambda s: " ".join(t for t in shlex.split(s) if t != "--quiet")  # noqa: E731
    assert normalize(command) == normalize(ci_text)


def test_quick_start_runs_and_prints_what_the_readme_shows(tmp_path, monkeypatch, capsys):
    quick = blocks("bash")[0].strip()
    assert quick.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install -e . && ")
    args = shlex.split(quick.split(" && ")[-1])
    assert args[0] == "embedcache"
    example = ROOT / args[2]
    assert example.is_file()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EMBEDCACHE_DIR", str(tmp_path / "cache"))
    for key in ("IONOS_API_TOKEN", "OPENAI_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    assert main([args[1], str(example), *args[3:]]) == 0
    out = capsys.readouterr().out.splitlines()
    shown = blocks("text")[0]
    for line in out[:4] + out[-1:]:
        assert line in shown, line
    assert (tmp_path / "kept.jsonl").is_file()
