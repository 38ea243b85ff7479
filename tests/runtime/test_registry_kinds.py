"""`tandem models add` for the four kinds — an ONNX file, a GGUF file, a transformers model
directory, an OpenAI-compatible server — each then served end to end by a real worker process
(and the server by the edge, as its local model); the errors that refuse a source and write
nothing; and concurrent adders, as real processes, sharing one manifest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from benchmarks.llm.llama_server import llama_server
from tandem.bench.ports import free_ports
from tandem.cli import app
from tandem.runtime.errors import BackendError, BadRequest, ConfigError, Unavailable
from tandem.runtime.generation import SamplingParams
from tandem.runtime.manifest import MANIFEST_NAME, load_manifest, sha256_file, verify_entry
from tandem.runtime.registry import add_model, detect_format
from tests.conftest import require
from tests.lm import tiny_lm
from tests.runtime.test_manifest import linear_onnx, weights

KEY_VAR = "TANDEM_TEST_REGISTRY_KEY"
KEY = "registry-test-key"  # the test server's key; not a secret
PROMPT = "hello world"
GREEDY = SamplingParams(max_tokens=8)


@pytest.fixture(scope="module")
def key_in_env() -> Iterator[None]:
    """The server's API key in ``KEY_VAR`` (worker processes started meanwhile inherit it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_VAR, KEY)
        yield


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder outside any models directory holding one model of each local kind."""
    require("transformers")
    out = tmp_path_factory.mktemp("src")
    tiny_lm(out / "tiny-llama", initializer_range=0.2)
    linear_onnx(out / "classifier.onnx", weights())
    return out


@pytest.fixture(scope="module")
def gguf_file(src: Path) -> Path:
    require("llama_cpp")
    require("gguf")
    from tandem.runtime.gguf import export_gguf

    return export_gguf(src / "tiny-llama", src / "edge.gguf", qtype="f32")


@pytest.fixture(scope="module")
def server(gguf_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A llama-cpp-python server of ``gguf_file`` that wants the API key ``KEY``."""
    require("openai")
    log = tmp_path_factory.mktemp("server") / "server.log"
    with llama_server(
        gguf_file, 1, log, n_ctx=256, logits_all=True, extra=("--api_key", KEY)
    ) as url:
        yield url.removesuffix("/v1")


@pytest.fixture(scope="module")
def registered(
    tmp_path_factory: pytest.TempPathFactory, src: Path, gguf_file: Path, server: str, key_in_env
) -> dict[str, Any]:
    """One models directory with one model of each kind: the GGUF file and the server added
    through the CLI, the others through the library. ``cli``: the CLI results by name."""
    models = tmp_path_factory.mktemp("registry") / "models"
    runner = CliRunner()
    base = ["models", "add", "--models-dir", str(models)]
    added = {
        "digits": add_model(models, src / "classifier.onnx", name="digits", labels=list("abc")),
        "lm-hf": add_model(models, src / "tiny-llama", name="lm-hf"),
    }
    cli = {
        "lm-gguf": runner.invoke(app, [*base, str(gguf_file), "--name", "lm-gguf"]),
        "lm-remote": runner.invoke(
            app, [*base, "--url", server, "--name", "lm-remote", "--api-key-env", KEY_VAR]
        ),
    }
    for name, result in cli.items():
        assert result.exit_code == 0, f"{name}: {result.output}"
    return {"models": models, "added": added, "cli": cli}


# ---------------------------------------------------------------- the four kinds


def test_the_kind_is_detected_from_the_source(src: Path, gguf_file: Path, tmp_path: Path) -> None:
    assert detect_format(src / "classifier.onnx") == "onnx"
    assert detect_format(gguf_file) == "gguf"
    assert detect_format(src / "tiny-llama") == "transformers"
    renamed = tmp_path / "model.bin"  # ONNX by its first bytes, whatever its name
    renamed.write_bytes((src / "classifier.onnx").read_bytes())
    assert detect_format(renamed) == "onnx"


@pytest.mark.integration
def test_each_kind_gets_its_entry(
    registered: dict[str, Any], src: Path, gguf_file: Path, server: str
) -> None:
    models: Path = registered["models"]
    manifest = load_manifest(models)
    assert [m.name for m in manifest.models] == ["digits", "lm-hf", "lm-gguf", "lm-remote"]
    onnx, hf, gguf, remote = manifest.models
    assert (onnx.format, onnx.file, onnx.labels) == ("onnx", "classifier.onnx", ["a", "b", "c"])
    assert registered["added"]["digits"].n_classes == 3

    assert (hf.format, hf.file, hf.input, hf.labels) == ("transformers", "tiny-llama", None, None)
    assert hf.sha256 == sha256_file(src / "tiny-llama") == sha256_file(models / "tiny-llama")
    assert hf.version == hf.sha256[:12]
    assert hf.size_bytes == sum(p.stat().st_size for p in (src / "tiny-llama").iterdir())
    assert registered["added"]["lm-hf"].copied_from == src / "tiny-llama"

    assert (gguf.format, gguf.file, gguf.sha256) == ("gguf", "edge.gguf", sha256_file(gguf_file))
    assert gguf.size_bytes == gguf_file.stat().st_size
    for entry in (onnx, hf, gguf):
        assert verify_entry(models, entry) == (models / entry.file).resolve()

    assert (remote.format, remote.file, remote.sha256) == ("openai", None, None)
    assert remote.url == server
    assert remote.model == remote.version == str(gguf_file)  # the server's id for its model
    assert remote.api_key_env == KEY_VAR
    raw = (models / MANIFEST_NAME).read_text()
    assert KEY not in raw  # the key's name is written down, never the key
    with pytest.raises(ConfigError, match="has no file to verify"):
        verify_entry(models, remote)


@pytest.mark.integration
def test_the_cli_says_what_it_registered(registered: dict[str, Any], server: str) -> None:
    models: Path = registered["models"]
    gguf, remote = (load_manifest(models).get(n) for n in ("lm-gguf", "lm-remote"))
    out = registered["cli"]["lm-gguf"].stdout
    assert f"registered lm-gguf@{gguf.version} (gguf) in {models / MANIFEST_NAME}" in out
    assert "file    edge.gguf (copied from" in out and f"sha256  {gguf.sha256}" in out
    out = registered["cli"]["lm-remote"].stdout
    assert f"registered lm-remote@{remote.version} (openai)" in out
    assert f"url     {server}" in out and f"api key ${KEY_VAR}" in out and KEY not in out


@pytest.mark.integration
def test_a_worker_serves_every_kind(registered: dict[str, Any], src: Path, server: str) -> None:
    from tandem.cloud.config import WorkerConfig
    from tandem.cloud.process import WorkerProcess
    from tandem.runtime.backends import open_backend
    from tandem.runtime.backends.onnx import OnnxBackend
    from tandem.runtime.client import CloudClient

    models: Path = registered["models"]
    manifest = load_manifest(models)
    want = {}
    for name in ("lm-hf", "lm-gguf", "lm-remote"):
        e = manifest.get(name)
        path: Any = e.url if e.url else models / e.file
        options = {"model": e.model, "api_key": KEY} if e.url else {"threads": 1}
        backend = open_backend(e.format, path, **options)
        want[name] = "".join(s.text for s in backend.stream(PROMPT, GREEDY))
        backend.close()
    assert want["lm-hf"] == want["lm-gguf"] and want["lm-hf"]  # the same weights
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    cfg = WorkerConfig.model_validate(
        {"bind": "tcp://127.0.0.1:*", "models_dir": str(models), "threads": 1}
    )
    with WorkerProcess(cfg, startup_timeout_s=120) as w, CloudClient(w.endpoint) as client:
        reply = client.infer("digits", x, timeout_s=10)
        got = {}
        for name in want:
            with client.generate(name, PROMPT, GREEDY, timeout_s=30) as call:
                for _ in call:
                    pass
            got[name] = call.text
            assert call.end is not None and call.end["version"] == manifest.get(name).version
        health = client.health()
    np.testing.assert_allclose(
        reply["outputs"], OnnxBackend(src / "classifier.onnx").predict(x), rtol=1e-6
    )
    assert got == want
    assert {n: m["kind"] for n, m in health["models"].items()} == {
        "digits": "array",
        "lm-hf": "generation",
        "lm-gguf": "generation",
        "lm-remote": "generation",
    }


@pytest.mark.integration
def test_the_edge_runs_a_local_openai_server(server: str, gguf_file: Path, key_in_env) -> None:
    from tandem.edge import EdgeRuntime
    from tandem.router.policy import policy_from_dict
    from tandem.runtime.backends.openai_http import OpenAIBackend

    local = {"format": "openai", "url": server, "api_key_env": KEY_VAR, "threads": 1}
    policy = policy_from_dict(
        {
            "tasks": {
                "chat": {
                    "kind": "generate",
                    "local": local,
                    "gate": {"metric": "token_min", "threshold": 0.5},
                    "max_tokens": GREEDY.max_tokens,
                }
            }
        }
    )
    direct = OpenAIBackend(server, api_key=KEY)
    want = "".join(s.text for s in direct.stream(PROMPT, GREEDY))
    direct.close()
    with EdgeRuntime(policy) as rt:
        r = rt.generate(PROMPT)
    assert r.text == want and r.escalated_at is None  # no cloud: the local answer stands
    assert r.model_versions["edge"] == str(gguf_file)  # the server's model id


# ---------------------------------------------------------------- policies


def _local_problem(local: dict[str, Any], **task: Any) -> str:
    from tandem.router.policy import policy_from_dict

    spec = {"kind": "generate", "local": local, "gate": {"metric": "token_min", "threshold": 0.5}}
    with pytest.raises(ConfigError) as e:
        policy_from_dict({"tasks": {"t": {**spec, **task}}})
    return e.value.message


@pytest.mark.parametrize(
    ("local", "problem"),
    [
        ({"format": "gguf"}, "tasks.t.local.path: required for format 'gguf'"),
        ({"format": "openai"}, "tasks.t.local.url: required for format 'openai'"),
        (
            {"format": "openai", "url": "http://h:1", "path": "m.gguf"},
            "tasks.t.local.path: format 'openai' names a server (url), not a path",
        ),
        ({"format": "openai", "url": "file:///x"}, "tasks.t.local.url: must be an http://"),
        (
            {"format": "openai", "url": "http://h:1", "api_key_env": "sk-123"},
            "tasks.t.local.api_key_env: must be the NAME of the environment variable",
        ),
        ({"path": "m.gguf", "url": "http://h:1"}, "tasks.t.local.url: only format 'openai'"),
        ({"path": "m.gguf", "model": "m"}, "model: only format 'openai' has them"),
    ],
)
def test_a_policy_names_a_local_server_by_url(local: dict[str, Any], problem: str) -> None:
    assert problem in _local_problem(local)


def test_a_local_server_cannot_draft() -> None:
    from tandem.edge import EdgeRuntime
    from tandem.router.policy import policy_from_dict

    task = {
        "kind": "generate",
        "local": {"format": "openai", "url": f"http://127.0.0.1:{free_ports()[0]}"},
        "gate": {"metric": "token_min", "threshold": 0.5},
        "mode": "speculative",
    }
    with pytest.raises(ConfigError, match=r"tasks\.t: mode 'speculative' drafts on"):
        EdgeRuntime(policy_from_dict({"tasks": {"t": task}}))


# ---------------------------------------------------------------- refused, nothing written


def test_a_file_of_no_known_kind_is_refused(tmp_path: Path) -> None:
    models = tmp_path / "models"
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(ConfigError) as e:
        add_model(models, notes, name="x")
    assert e.value.message == (
        f"{notes}: not a model file Tandem recognises (starts with b'hell'); expected an ONNX "
        "file (.onnx), a GGUF file (starting with b'GGUF'), a transformers model directory (with "
        "config.json), or --url for an OpenAI-compatible server, or --format to say which"
    )
    fake = tmp_path / "edge.gguf"
    fake.write_bytes(b"GGML\0\0\0\0")
    with pytest.raises(ConfigError, match=r"edge\.gguf: not a GGUF file \(starts with b'GGML', "):
        add_model(models, fake, name="x")
    with pytest.raises(ConfigError, match=r"nope\.gguf: no such file or directory"):
        add_model(models, tmp_path / "nope.gguf", name="x")
    assert not models.exists()


def test_format_forces_the_kind_and_the_backend_says_why_it_fails(tmp_path: Path) -> None:
    require("llama_cpp")
    models = tmp_path / "models"
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(BackendError, match=r"cannot load GGUF model .*notes\.txt: not a GGUF"):
        add_model(models, notes, name="x", format="gguf")
    with pytest.raises(ConfigError, match="format 'transformers' expects a model directory"):
        add_model(models, notes, name="x", format="transformers")
    with pytest.raises(ConfigError, match="format 'gguf' expects a file, not a directory"):
        add_model(models, tmp_path, name="x", format="gguf")
    with pytest.raises(ConfigError, match="format: expected one of onnx, gguf, transformers"):
        add_model(models, notes, name="x", format="pickle")
    assert not models.exists()


def test_a_directory_needs_a_loadable_transformers_model(tmp_path: Path, src: Path) -> None:
    models = tmp_path / "models"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"empty: a directory is registered as a transformers"):
        add_model(models, empty, name="x")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in (src / "tiny-llama").iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(BackendError, match=r"broken"):
        add_model(models, broken, name="x")
    assert not models.exists()


def test_labels_are_for_onnx_only(tmp_path: Path, src: Path) -> None:
    with pytest.raises(ConfigError, match="labels are for ONNX classifiers"):
        add_model(tmp_path / "m", src / "tiny-llama", name="x", labels=["a"])


@pytest.mark.parametrize("value", ["sk-live-0123456789abcdef", "my key", "1ABC", "$KEY"])
def test_api_key_env_takes_a_name_never_a_key(tmp_path: Path, value: str) -> None:
    models = tmp_path / "models"
    with pytest.raises(ConfigError) as e:
        add_model(models, url="http://127.0.0.1:1", name="r", api_key_env=value)
    assert "expected the NAME of the environment variable" in e.value.message
    assert value not in e.value.message  # it may be the key: never echoed
    result = CliRunner().invoke(
        app, ["models", "add", "--url", "http://127.0.0.1:1", "--name", "r",
              "--models-dir", str(models), "--api-key-env", value],
    )  # fmt: skip
    assert result.exit_code == 1 and value not in result.output
    assert not models.exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"url": "ftp://example.com"}, "url: must be an http:// or https:// URL"),
        ({"url": "http://user:pw@example.com"}, "url: must not hold credentials"),
        ({"url": "http://h:1", "source": "m.gguf"}, "not both"),
        ({"url": "http://h:1", "format": "gguf"}, "--url registers format 'openai'"),
        ({"source": "m.gguf", "model": "m"}, "--model and --api-key-env go with --url"),
        ({"format": "openai"}, "format 'openai' needs --url"),
        ({}, "nothing to register; expected an ONNX file"),
    ],
)
def test_bad_server_arguments(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    source = kwargs.pop("source", None)
    with pytest.raises(ConfigError, match=match):
        add_model(tmp_path / "models", source, name="r", **kwargs)
    assert not (tmp_path / "models").exists()


def test_an_unreachable_server_is_refused(tmp_path: Path) -> None:
    require("openai")
    url = f"http://127.0.0.1:{free_ports()[0]}"
    with pytest.raises(Unavailable, match=f"{url}/v1: cannot connect"):
        add_model(tmp_path / "models", url=url, name="r", timeout_s=5)
    result = CliRunner().invoke(
        app,
        ["models", "add", "--url", url, "--name", "r", "--models-dir", str(tmp_path / "models")],
    )
    assert result.exit_code == 1 and "cannot connect" in result.stderr
    assert not (tmp_path / "models").exists()


@pytest.mark.integration
def test_a_server_wanting_a_key_refuses_an_unset_variable(
    tmp_path: Path, server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TANDEM_TEST_UNSET_KEY", raising=False)
    with pytest.raises(BadRequest, match=f"{server}/v1: HTTP 401"):
        add_model(tmp_path / "models", url=server, name="r")  # no key
    with pytest.raises(ConfigError, match="the environment variable it names is not set") as e:
        add_model(tmp_path / "models", url=server, name="r", api_key_env="TANDEM_TEST_UNSET_KEY")
    assert "TANDEM_TEST_UNSET_KEY" not in str(e.value)  # a pasted key is never echoed
    assert not (tmp_path / "models").exists()
    monkeypatch.setenv("TANDEM_TEST_UNSET_KEY", KEY)
    added = add_model(
        tmp_path / "models", url=server, name="r", api_key_env="TANDEM_TEST_UNSET_KEY"
    )
    assert added.entry.api_key_env == "TANDEM_TEST_UNSET_KEY"


@pytest.mark.integration
def test_a_transformers_directory_is_replaced_whole(tmp_path: Path, src: Path) -> None:
    models = tmp_path / "models"
    first = add_model(models, src / "tiny-llama", name="lm")
    newer = tiny_lm(tmp_path / "v2" / "tiny-llama", seed=1)
    with pytest.raises(ConfigError, match="already registered"):
        add_model(models, newer, name="lm")
    with pytest.raises(ConfigError, match="tiny-llama already exists and differs"):
        add_model(models, newer, name="other")  # the directory belongs to "lm"
    again = add_model(models, newer, name="lm", replace=True)
    assert again.replaced and again.entry.sha256 == sha256_file(newer) != first.entry.sha256
    assert sha256_file(models / "tiny-llama") == again.entry.sha256
    assert sorted(p.name for p in models.iterdir()) == [MANIFEST_NAME, "tiny-llama"]


# ---------------------------------------------------------------- concurrent adders

ADDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from tandem.runtime.errors import ConfigError
    from tandem.runtime.registry import add_model

    models, source, name, go = sys.argv[1:]
    while not Path(go).exists():
        time.sleep(0.002)
    try:
        add_model(models, source, name=name)
    except ConfigError as e:
        print(e.message)
        sys.exit(3)
    """
)


@pytest.mark.integration
def test_concurrent_adders_keep_the_manifest_whole(tmp_path: Path) -> None:
    models, go = tmp_path / "models", tmp_path / "go"
    jobs = [(f"m{i}", linear_onnx(tmp_path / f"m{i}.onnx", weights(i))) for i in range(4)]
    jobs += [("same", linear_onnx(tmp_path / f"same{i}.onnx", weights(10 + i))) for i in range(4)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", ADDER, str(models), str(path), name, str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            text=True,
        )
        for name, path in jobs
    ]
    time.sleep(1.0)  # most have imported by now; the rest start adding as they arrive
    go.touch()
    results = [(p.wait(120), p.stdout.read()) for p in procs]  # type: ignore[union-attr]
    for p in procs:
        p.stdout.close()  # type: ignore[union-attr]
    assert [rc for rc, _ in results[:4]] == [0] * 4, results
    same = results[4:]
    assert sorted(rc for rc, _ in same) == [0, 3, 3, 3], same
    assert all("a model named 'same' is already registered" in out for rc, out in same if rc)
    raw = json.loads((models / MANIFEST_NAME).read_text())  # valid JSON
    names = [m["name"] for m in raw["models"]]
    assert sorted(names) == ["m0", "m1", "m2", "m3", "same"]
    manifest = load_manifest(models)
    winner = next(i for i, (rc, _) in enumerate(same) if rc == 0)
    assert manifest.get("same").file == f"same{winner}.onnx"
    for entry in manifest.models:
        verify_entry(models, entry)
    left = sorted(p.name for p in models.iterdir())  # no temporary files, no loser's copy
    assert left == sorted([MANIFEST_NAME, f"same{winner}.onnx"] + [f"m{i}.onnx" for i in range(4)])
    assert os.access(models / MANIFEST_NAME, os.R_OK)


def test_an_unset_key_variable_means_no_key_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from tandem.runtime.manifest import api_key_from_env

    monkeypatch.setenv("TANDEM_TEST_SET_KEY", "k")
    monkeypatch.delenv("TANDEM_TEST_UNSET_KEY", raising=False)
    assert api_key_from_env(None, where="w") is None
    assert api_key_from_env("TANDEM_TEST_SET_KEY", where="w") == "k"
    with caplog.at_level("WARNING", logger="tandem.runtime.manifest"):
        assert api_key_from_env("TANDEM_TEST_UNSET_KEY", where="m.json: model 'r'") is None
    assert "m.json: model 'r': environment variable TANDEM_TEST_UNSET_KEY is not set" in caplog.text


@pytest.mark.integration
def test_a_directory_from_the_hugging_face_cache_is_copied_whole(tmp_path: Path, src: Path) -> None:
    """HF cache snapshots are links into ``blobs/``: the copy holds the files themselves, and
    its digest is the one checked."""
    snap, blobs = tmp_path / "hub" / "snapshots" / "abc", tmp_path / "hub" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in (src / "tiny-llama").iterdir():
        (blobs / f.name).write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(blobs / f.name)
    models = tmp_path / "models"
    added = add_model(models, snap, name="cached")
    copy = models / added.entry.file
    assert added.entry.format == "transformers" and not any(p.is_symlink() for p in copy.iterdir())
    assert added.entry.sha256 == sha256_file(src / "tiny-llama")  # the same files, same digest
    verify_entry(models, added.entry)


@pytest.mark.integration
def test_chat_continuation_is_opt_in_per_server(tmp_path: Path, server: str, key_in_env) -> None:
    from tandem.cloud.config import WorkerConfig
    from tandem.cloud.loading import load_backends

    models = tmp_path / "models"
    result = CliRunner().invoke(
        app,
        [
            "models", "add", "--url", server, "--api-key-env", KEY_VAR, "--name", "vllm",
            "--continue-final-message", "--models-dir", str(models),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    add_model(models, url=server, name="plain", api_key_env=KEY_VAR)
    entries = {m.name: m for m in load_manifest(models).models}
    assert entries["vllm"].continue_final_message and not entries["plain"].continue_final_message
    config = WorkerConfig.model_validate({"models_dir": str(models)})
    backends = load_backends(config)
    assert backends["vllm"].continue_final_message and not backends["plain"].continue_final_message
