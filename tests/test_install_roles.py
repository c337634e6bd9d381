"""What each install role needs (issue 29, item 7 of the issue's list: extras): matplotlib
(and aiohttp, the load tester's openai backend) is only in the `bench` (and `test`) extra, nothing a server or the load tester imports at
start needs it, and the load tester without it prints its table and says how to get
plots. `cuda` and `tpu` extras pull the matching jax wheels."""
from __future__ import annotations

import os
import subprocess
import sys

import tomllib

from tests.conftest_server import REPO

NO_MPL = "import sys; sys.modules['matplotlib'] = None\n"  # any import of it now fails


def _project() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def test_matplotlib_is_an_extra_not_a_core_dependency():
    p = _project()
    assert not any(d.startswith("matplotlib") for d in p["dependencies"])
    extras = p["optional-dependencies"]
    assert "matplotlib" in extras["bench"] and "matplotlib" in extras["test"]
    assert not any(d.startswith("aiohttp") for d in p["dependencies"])
    assert any(d.startswith("aiohttp") for d in extras["bench"])
    assert any(d.startswith("aiohttp") for d in extras["test"])
    assert any(d.startswith("jax[cuda12]") for d in extras["cuda"])
    assert any(d.startswith("jax[tpu]") for d in extras["tpu"])


def test_cli_and_server_start_without_matplotlib(tmp_path):
    code = NO_MPL + (
        "from conserve_jax.entrypoints.cli import main\n"
        "sys.exit(main(['serve', '--model', 'mock', '--port', '0', '--http-port', 'free',\n"
        f"               '--data-dir', {str(tmp_path / 'd')!r}, '--drain-timeout', '0']))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("listening on "):
                break
        else:
            raise AssertionError("server did not start: " + proc.stderr.read()[-2000:])
    finally:
        proc.terminate()
        proc.wait(30)


def test_loadtest_without_matplotlib_prints_the_table_and_the_hint(tmp_path):
    png = tmp_path / "lt.png"
    code = NO_MPL + (
        "from conserve_jax.loadtest import cli\n"
        "from conserve_jax.loadtest.fake import FakeClient\n"
        "import argparse\n"
        "p = argparse.ArgumentParser(); cli.add_arguments(p)\n"
        "args = p.parse_args(['--target', 'fake:1', '--no-progress', '--rate', '20',\n"
        "                     '--duration', '1', '--plot', sys.argv[1]])\n"
        "sys.exit(cli.run(args, client_factory=lambda t, tok, ca: FakeClient(t, tok, ca)))\n")
    r = subprocess.run([sys.executable, "-c", code, str(png)], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "TTFT" in r.stdout  # the report table
    assert f"--plot {png} not written" in r.stderr
    assert "pip install 'conserve-jax[bench]'" in r.stderr
    assert not png.exists()


def test_loadtest_openai_backend_without_aiohttp_says_which_extra(monkeypatch, capsys):
    import argparse

    from conserve_jax.loadtest import cli
    monkeypatch.setitem(sys.modules, "aiohttp", None)  # any import of it now fails
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(["--backend", "openai", "--target", "127.0.0.1:1", "--no-progress",
                         "--rate", "1", "--duration", "1"])
    assert cli.run(args) == 2
    err = capsys.readouterr().err
    assert "needs aiohttp" in err and "pip install 'conserve-jax[bench]'" in err
