"""explainer=openai against a real OpenAI-compatible server that this module starts and stops:
`transformers serve` (transformers 4.57's serving command; requirements.txt installs its extras)
serving the embedded SmolLM2-135M-Instruct's converted folder on 127.0.0.1. It streams every answer
and sends no logprobs: the explainer falls back to streaming and to judging by the answer's text,
and says so. The commands are docs/openai-explainer.md's, with this test's port and budget. The
last test checks the same bookkeeping against the stand-in server (tests/openai_server.py)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai_server import FakeOpenAIServer
from test_autointerp import PLANTED, dataset, planted  # noqa: F401  (fixtures: a tiny dataset, a planted CLT)
from test_explainers import KING, SILENT, king_evidence

from clt_forge.artifacts.features import FeatureStore
from clt_forge.autointerp.explainers import OpenAIExplainer, make_explainer
from clt_forge.autointerp.prompts import clean_explanation, detection_question, explanation_messages
from clt_forge.config.schema import ExplainerConfig

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "openai-explainer.md"
BIN = Path(sys.executable).parent
FEATURES = [PLANTED, (2, 6)]  # the planted feature ("e") and one that fires on "y" (3% of tokens)
PROTOCOL_LINE = re.compile(
    r"explainer endpoint (\S+): stream responses; questions judged by logprobs 0, by the answer's text (\d+) "
    r"\(no logprobs: the server sent none\)\."
)


def doc_line(prefix: str) -> str:
    """The one line of the doc's ```bash blocks that starts with `prefix`."""
    lines = [
        line
        for body in re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.DOTALL)
        for line in body.splitlines()
        if line.startswith(prefix)
    ]
    assert len(lines) == 1, f"{DOC.name}: expected one command starting {prefix!r}, found {lines}"
    return lines[0]


def doc_command(prefix: str) -> list[str]:
    return shlex.split(doc_line(prefix))


def converted_folder() -> Path:
    """The embedded model's Hugging Face folder (converted from its GGUF on first use)."""
    from clt_forge.models.gguf import convert_gguf, converted_dir, find_gguf
    from clt_forge.models.loading import model_config

    cfg = model_config("smollm2_135m")
    gguf = find_gguf(cfg)
    folder = converted_dir(cfg, gguf)
    if not (folder / "config.json").is_file():
        convert_gguf(cfg, gguf, folder)
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_up(process: subprocess.Popen, port: int, log: Path, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"transformers serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    pytest.fail(f"transformers serve did not answer on port {port} within {timeout_s} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (it has its own session), SIGKILL if it lingers."""
    for sig, wait_s in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        if process.poll() is not None:
            return
        os.killpg(process.pid, sig)
        try:
            process.wait(wait_s)
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    """The doc's `transformers serve` command on a free port; its base URL. Stopped at teardown."""
    folder = converted_folder()
    if not os.environ.get("CLT_FORGE_CACHE") and not os.environ.get("XDG_CACHE_HOME"):
        assignment = doc_line("MODEL=")  # the doc's way of finding the folder finds it
        found = subprocess.run(["bash", "-c", f'{assignment}; printf %s "$MODEL"'], capture_output=True, text=True)
        assert found.stdout == str(folder), found.stderr
    words = doc_command(".venv/bin/transformers serve")
    port = free_port()
    args = [str(BIN / "transformers"), *(str(folder) if word == "$MODEL" else word for word in words[1:])]
    args[args.index("--port") + 1] = str(port)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1")
    log = tmp_path_factory.mktemp("transformers-serve") / "serve.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [*args, "--log_level", "warning"], stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        wait_until_up(process, port, log)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop(process)
    assert process.returncode is not None, "transformers serve outlived its test"
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers after the server stopped"


@pytest.mark.slow
def test_openai_explainer_falls_back_to_streams_and_text_answers(server, capsys):
    cfg = ExplainerConfig(kind="openai", model="smollm2", base_url=server, concurrency=2, timeout_s=60.0)
    evidence = king_evidence()
    questions = [
        detection_question('the word "king"', e) for e in evidence.activating[:2] + evidence.non_activating[:2]
    ]
    explainer = make_explainer(cfg)
    assert isinstance(explainer, OpenAIExplainer)  # built from the config, as `clt autointerp` does
    with explainer:
        (raw,) = explainer.explain([explanation_messages(evidence)])
        explanation = clean_explanation(raw)
        scores = explainer.judge(questions)
        protocol = explainer.protocol
    assert explanation and len(explanation.split()) <= 12, raw  # SmolLM2 answers 'the word "king"'
    assert all(score in (0.0, 0.5, 1.0) for score in scores), scores  # read off a yes / no answer
    assert protocol == {
        "responses": "stream",
        "judged_by": {"logprobs": 0, "text": 4},
        "no_logprobs": "the server sent none",
    }
    line = PROTOCOL_LINE.search(capsys.readouterr().out)
    assert line is not None and line.group(1) == server and line.group(2) == "4"


@pytest.mark.slow
def test_clt_autointerp_explainer_openai_against_transformers_serve(server, dataset, planted, tmp_path):  # noqa: F811
    graph = tmp_path / "graph.json"  # features_from: only these features are explained and scored
    kind = "cross layer transcoder"
    nodes = [
        {"node_id": f"{layer}_{feature}_0", "layer": str(layer), "feature_type": kind} for layer, feature in FEATURES
    ]
    graph.write_text(json.dumps({"nodes": nodes}))
    words = doc_command(".venv/bin/clt autointerp")
    overrides = dict(word.split("=", 1) for word in words[2:])
    assert overrides["explainer"] == "openai" and overrides["explainer.base_url"].startswith("http://127.0.0.1:")
    out = tmp_path / "features"
    overrides |= {
        "checkpoint": str(planted),
        "activations": str(dataset),
        "tokens": "4000",
        "out": str(out),
        "explainer.base_url": server,
        # the budget: tests/test_autointerp.py's text; 5 top contexts, 8 held-out (4 firing, 4 silent); the
        # token scorer marks the 4 peaks and one silent token of each context holding one (4-8), each judged
        # with the label and with its control: 16-24 questions per feature
        "data": "classic",
        "data.context_size": "32",
        "top_k": "5",
        "score_examples": "8",
        "silent_every": "64",  # enough silent windows to score on (4000 tokens hold few)
        "features_from": str(graph),
        "threads": "1",
    }
    args = [str(BIN / "clt"), words[1], *(f"{key}={value}" for key, value in overrides.items())]
    result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    line = PROTOCOL_LINE.search(result.stdout)
    assert line is not None and line.group(1) == server, result.stdout[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["explained"] == len(FEATURES), summary
    with FeatureStore(out / "features.db", create=False) as store:
        records = [store.feature(*key) for key in FEATURES]
    for record in records:
        assert record is not None and record["status"] == "scored", record
        assert record["explanation"].strip(), record
        assert 0.0 <= record["score"] <= 1.0 and 0.0 <= record["score_control"] <= 1.0, record
    assert 2 * 2 * (4 + 4) <= int(line.group(2)) <= 2 * 2 * (4 + 8), result.stdout[-2000:]  # all went to the server


def test_protocol_is_reported_against_the_stand_in(capsys):
    """The same bookkeeping against tests/openai_server.py (fast): whole JSON responses, and
    logprobs used, ignored or refused."""
    questions = [detection_question("the word king", e) for e in KING[:2] + SILENT[:2]]
    expected = {  # judged by, why not logprobs, which requests asked for them
        "logprobs": ({"logprobs": 4, "text": 0}, None, [True] * 4),
        "ignored": ({"logprobs": 0, "text": 4}, "the server sent none", [True, False, False, False]),
        "refused": ({"logprobs": 0, "text": 4}, "the server refused them: HTTP 400", [True] + [False] * 4),
    }
    for case, (judged, why, asked) in expected.items():
        stand_in = FakeOpenAIServer(logprobs=case == "logprobs", refuse_logprobs=case == "refused")
        with stand_in as fake:
            cfg = ExplainerConfig(kind="openai", model="fake", base_url=fake.base_url, concurrency=1)
            explainer = OpenAIExplainer(cfg)
            with explainer:
                explainer.judge(questions)
                assert explainer.protocol == {"responses": "json", "judged_by": judged, "no_logprobs": why}, case
        assert [bool(body.get("logprobs")) for body in fake.bodies] == asked, case  # refused: asked again without
        line = f"explainer endpoint {fake.base_url}: json responses; questions judged by logprobs {judged['logprobs']}"
        assert line in capsys.readouterr().out
