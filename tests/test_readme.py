"""Every ```python sample of README.md runs, in order, in one namespace; every ```bash
command runs (the ```console ones need a key and the network, and are shown only)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from embedcache.cli import main
from embedcache.testing import FakeEmbeddingServer

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
LOCAL_URL = "http://localhost:8000/v1"
OPENAI_URL = "https://api.openai.com/v1"
EXAMPLES = "embedcache/examples/"


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def test_there_are_python_samples():
    assert len(blocks("python")) >= 8


def test_python_samples_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EMBEDCACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("IONOS_API_TOKEN", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-readme-test")
    namespace: dict = {"__name__": "readme"}
    # the OpenAI and local-server samples talk to real OpenAI-compatible servers on loopback
    with FakeEmbeddingServer(dimensions=8, api_key=None, models=("my-embedding-model",)) as server, \
            FakeEmbeddingServer(dimensions=16, api_key="sk-readme-test", models=("text-embedding-3-small",)) as openai:
        for k, code in enumerate(blocks("python")):
            code = code.replace(LOCAL_URL, server.base_url).replace(OPENAI_URL, openai.base_url)
            try:
                exec(compile(code, f"README.md python block {k + 1}", "exec"), namespace)
            except Exception as exc:  # pragma: no cover - the message names the block
                pytest.fail(f"README python block {k + 1} failed: {exc!r}\n{code}")
        assert len(server.embedding_requests) == 1 and len(openai.embedding_requests) == 1
    out = capsys.readouterr().out
    assert "(2, 8)" in out and "(2, 16)" in out
    assert "threshold must be in [-1, 1] for cosine, got 1.5" in out
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


def test_code_is_not_hidden_in_text_blocks():
    languages = set(re.findall(r"^```(\w*)$", README, flags=re.M)) - {""}
    assert languages <= {"python", "bash", "console", "text"}, languages
    for block in blocks("text"):
        assert not re.search(r"^\s*\w+ = |^\s*(import|print)\b|^\s*embedcache ", block, flags=re.M), block


def command_lines() -> list[list[str]]:
    """Each ``embedcache`` command of the ```bash blocks after the install and test ones."""
    commands = []
    for block in blocks("bash"):
        if block.startswith("python3 -m venv"):
            continue  # the quick start and the test command: checked above
        for line in block.splitlines():
            for part in line.split(" && "):
                args = shlex.split(part, comments=True)
                if args:
                    commands.append(args)
    return commands


def test_command_line_samples_run(tmp_path, monkeypatch, capsys):
    commands = command_lines()
    assert len(commands) >= 10 and all(args[0] == "embedcache" for args in commands)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EMBEDCACHE_DIR", str(tmp_path / "cache"))
    for key in ("IONOS_API_TOKEN", "OPENAI_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    for args in commands:
        args = [str(ROOT / a) if a.startswith(EXAMPLES) else a for a in args[1:]]
        for a in args:
            if a.startswith(str(ROOT)):
                assert Path(a).is_file(), f"the README names a file that does not ship: {a}"
        capsys.readouterr()
        code = main(args)
        out, err = capsys.readouterr()
        assert code == 0, f"embedcache {' '.join(args)} failed: {err}"
    for name in ("vectors.npy", "kept.jsonl", "report.csv", "clean.csv", "pairs.csv"):
        assert (tmp_path / name).is_file(), name
    assert len((tmp_path / "clean.csv").read_text().splitlines()) < len(
        (ROOT / EXAMPLES / "faq-test.csv").read_text().splitlines()
    )
