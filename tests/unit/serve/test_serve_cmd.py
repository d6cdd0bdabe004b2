"""`deltatune serve`: bad arguments fail on one line before loading anything; a real server process answers."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from deltatune.cli.main import main

pytest.importorskip("uvicorn")


def test_bad_arguments_fail_with_one_line(tmp_path, capsys):
    assert main(["serve", "--model", "x", "--api-key-file", str(tmp_path / "missing.txt")]) == 2
    assert "--api-key-file" in capsys.readouterr().err
    (tmp_path / "key.txt").write_text("two words\n")
    assert main(["serve", "--model", "x", "--api-key-file", str(tmp_path / "key.txt")]) == 2
    assert "one key without spaces" in capsys.readouterr().err
    assert main(["serve", "--model", "x", "--adapters", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_serve_process_answers_with_key(served, tmp_path):
    base, adapters = served
    (tmp_path / "key.txt").write_text("s3cret\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "deltatune", "serve", "--model", str(base), "--adapters", str(adapters), "--port", str(port),
                             "--api-key-file", str(tmp_path / "key.txt"), "--max-len", "64", "--lora-dtype", "bfloat16"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    assert json.loads(r.read()) == {"status": "ok"}
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, proc.stdout.read().decode()
                assert time.time() < deadline, "server did not come up"
                time.sleep(0.3)
        req = urllib.request.Request(url + "/v1/models", headers={"Authorization": "Bearer s3cret"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert [m["id"] for m in json.loads(r.read())["data"]] == [str(base), "all8", "down2", "qv4"]
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url + "/v1/models", timeout=10)
        assert err.value.code == 401 and json.loads(err.value.read())["error"]["type"] == "authentication_error"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
