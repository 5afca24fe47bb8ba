"""The `dlpipe` console script's user-facing errors (no Ray needed to reach them)."""

import socket
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

DLPIPE = str(Path(sys.executable).with_name("dlpipe"))


def test_help_lists_the_subcommands():
    result = subprocess.run([DLPIPE, "--help"], capture_output=True, text=True, check=True)
    for command in ("run", "serve", "predict", "ui"):
        assert command in result.stdout


def test_serve_without_a_model_says_what_to_run(tmp_path):
    result = subprocess.run(
        [DLPIPE, "serve", "--model", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 2
    assert "expected model.onnx and model_card.json" in result.stderr
    assert "Traceback" not in result.stderr


def test_predict_against_no_server_is_one_clear_line(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    image = tmp_path / "x.png"
    image.write_bytes(b"not even an image")
    result = subprocess.run(
        [DLPIPE, "predict", str(image), "--url", f"http://127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "cannot reach" in result.stderr and "Traceback" not in result.stderr
