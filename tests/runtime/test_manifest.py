"""The models directory: manifest paths stay inside it; `tandem models add` registers a
user's ONNX model so that a worker serves it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from tandem.cli import app
from tandem.cloud.config import WorkerConfig
from tandem.cloud.process import WorkerProcess
from tandem.runtime.backends.onnx import OnnxBackend
from tandem.runtime.client import CloudClient
from tandem.runtime.errors import BackendError, ConfigError
from tandem.runtime.manifest import (
    MANIFEST_NAME,
    load_manifest,
    sha256_file,
    verify_entry,
)
from tandem.runtime.registry import add_onnx_model, class_count


def linear_onnx(
    path: Path, w: np.ndarray, *, dynamic_classes: bool = False, batch: str | int = "N"
) -> Path:
    """``logits = x @ w``, x shaped (N, w.shape[0]). ``dynamic_classes``: the output is declared
    (N, ?) and reshaped to its own shape at run time, so ONNX Runtime cannot fix the axis."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    if dynamic_classes:
        nodes += [
            helper.make_node("Shape", ["y"], ["s"]),
            helper.make_node("Reshape", ["y", "s"], ["logits"]),
        ]
    else:
        nodes += [helper.make_node("Identity", ["y"], ["logits"])]
    out_shape = [batch, "C" if dynamic_classes else w.shape[1]]
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, w.shape[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(w.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def weights(seed: int = 0, n_in: int = 4, n_out: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n_in, n_out))


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """A 4 → 3 classifier outside the models directory."""
    (tmp_path / "src").mkdir()
    return linear_onnx(tmp_path / "src" / "mine.onnx", weights())


def entry_dict(file: str, **kw) -> dict:
    return {
        "name": "m",
        "version": "1",
        "file": file,
        "sha256": "0" * 64,
        "size_bytes": 0,
        "input": {"name": "x", "shape": [None, 4]},
        "output": {"name": "logits", "shape": [None, 3]},
        **kw,
    }


def write_raw_manifest(models_dir: Path, *entries: dict) -> Path:
    models_dir.mkdir(parents=True, exist_ok=True)
    path = models_dir / MANIFEST_NAME
    path.write_text(json.dumps({"models": list(entries)}))
    return path


# ---------------------------------------------------------------- paths stay inside


@pytest.mark.parametrize(
    "bad",
    ["../x.onnx", "a/../../x.onnx", "sub/..", "/etc/x.onnx", "", "  ", ".", "..\\x.onnx", "C:x"],
)
def test_manifest_file_outside_the_models_directory_is_refused(tmp_path: Path, bad: str) -> None:
    path = write_raw_manifest(tmp_path / "models", entry_dict("ok.onnx"), entry_dict(bad, name="b"))
    with pytest.raises(ConfigError) as e:
        load_manifest(tmp_path / "models")
    assert e.value.message == (
        f"{path}: models.1.file: must be a path inside the models directory, got {bad!r}"
    )


def test_symlink_out_of_the_models_directory_is_refused(tmp_path: Path, src: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "inside.onnx").write_bytes(src.read_bytes())
    (models / "alias.onnx").symlink_to(models / "inside.onnx")  # stays inside: fine
    (models / "escape.onnx").symlink_to(src)
    digest = sha256_file(src)
    path = write_raw_manifest(
        models,
        entry_dict("alias.onnx", name="alias", sha256=digest),
        entry_dict("escape.onnx", name="escape", sha256=digest),
    )
    manifest = load_manifest(models)  # no disk access at validation: the link passes here
    assert verify_entry(models, manifest.get("alias")) == (models / "inside.onnx").resolve()
    with pytest.raises(ConfigError) as e:
        verify_entry(models, manifest.get("escape"))
    assert e.value.message.startswith(
        f"{path}: models.1.file: must be a path inside the models directory, got 'escape.onnx' "
        f"(model 'escape'; it resolves to {src.resolve()})"
    )


# ---------------------------------------------------------------- models add


def test_add_copies_the_model_and_writes_its_entry(tmp_path: Path, src: Path) -> None:
    models = tmp_path / "models"  # does not exist yet
    added = add_onnx_model(models, src, name="mine", labels=["a", "b", "c"], description="d")
    e = added.entry
    assert added.copied_from == src and not added.replaced and added.n_classes == 3
    assert (models / "mine.onnx").read_bytes() == src.read_bytes()
    assert e.file == "mine.onnx" and e.sha256 == sha256_file(src)
    assert e.version == e.sha256[:12] and e.size_bytes == src.stat().st_size
    assert e.input.model_dump() == {"name": "x", "dtype": "float32", "shape": [None, 4]}
    assert e.output.model_dump() == {"name": "logits", "dtype": "float32", "shape": [None, 3]}
    assert e.labels == ["a", "b", "c"] and e.format == "onnx" and e.description == "d"
    assert load_manifest(models).get("mine") == e
    assert verify_entry(models, e) == (models / "mine.onnx").resolve()


def test_add_a_file_already_inside_does_not_copy_it(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    model = linear_onnx(models / "sub" / "m.onnx", weights())
    add_onnx_model(models, linear_onnx(tmp_path / "first.onnx", weights(1)), name="first")
    added = add_onnx_model(models, model, name="m", version="v2")
    assert added.copied_from is None and added.entry.file == "sub/m.onnx"
    assert sorted(p.name for p in models.iterdir()) == ["first.onnx", MANIFEST_NAME, "sub"]
    assert [m.name for m in load_manifest(models).models] == ["first", "m"]
    assert load_manifest(models).get("m").version == "v2"


def test_a_name_already_registered_needs_replace(tmp_path: Path, src: Path) -> None:
    models = tmp_path / "models"
    add_onnx_model(models, src, name="mine")
    add_onnx_model(models, linear_onnx(tmp_path / "other.onnx", weights(1)), name="other")
    newer = tmp_path / "v2"
    newer.mkdir()
    linear_onnx(newer / "mine.onnx", weights(2))  # same file name, different weights
    with pytest.raises(ConfigError, match=r"models\.0\.name: a model named 'mine' is already"):
        add_onnx_model(models, newer / "mine.onnx", name="mine")
    assert (models / "mine.onnx").read_bytes() == src.read_bytes()  # untouched
    added = add_onnx_model(models, newer / "mine.onnx", name="mine", replace=True)
    assert added.replaced
    manifest = load_manifest(models)
    assert [m.name for m in manifest.models] == ["mine", "other"]  # replaced in place
    assert manifest.get("mine").sha256 == sha256_file(newer / "mine.onnx")
    assert verify_entry(models, manifest.get("mine"))


def test_a_different_file_of_the_same_name_is_never_overwritten(tmp_path: Path, src: Path) -> None:
    models = tmp_path / "models"
    add_onnx_model(models, src, name="mine")
    clash = tmp_path / "elsewhere"
    clash.mkdir()
    linear_onnx(clash / "mine.onnx", weights(3))
    for replace in (False, True):  # "mine.onnx" belongs to the model "mine", not "new"
        with pytest.raises(ConfigError, match="already exists and differs from"):
            add_onnx_model(models, clash / "mine.onnx", name="new", replace=replace)
    assert (models / "mine.onnx").read_bytes() == src.read_bytes()
    assert [m.name for m in load_manifest(models).models] == ["mine"]
    # the same bytes under the same name are simply reused
    same = add_onnx_model(models, src, name="again")
    assert same.copied_from is None and same.entry.file == "mine.onnx"


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (["a", "b"], r"2 labels given, but output 'logits' has 3 classes$"),
        (["a", "b", "c", "d"], "4 labels given, but output 'logits' has 3 classes"),
        (["a", "", "c"], "a label is empty"),
        (["a", "b", "a"], "'a' appears more than once"),
    ],
)
def test_bad_labels_are_refused(tmp_path: Path, src: Path, labels, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        add_onnx_model(tmp_path / "models", src, name="mine", labels=labels)
    assert not (tmp_path / "models").exists()  # nothing written


def test_dynamic_class_axis_is_counted_on_a_zero_row(tmp_path: Path) -> None:
    model = linear_onnx(tmp_path / "dyn.onnx", weights(n_out=5), dynamic_classes=True)
    backend = OnnxBackend(model)
    assert backend.output_spec.shape == [None, None]
    assert class_count(backend) == 5
    with pytest.raises(ConfigError, match="has 5 classes on an all-zeros row"):
        add_onnx_model(tmp_path / "models", model, name="dyn", labels=["a", "b"])
    added = add_onnx_model(tmp_path / "models", model, name="dyn", labels=list("abcde"))
    assert added.n_classes == 5 and added.entry.output.shape == [None, None]


def test_not_a_model_missing_file_and_fixed_batch_are_clear_errors(tmp_path: Path) -> None:
    models = tmp_path / "models"
    text = tmp_path / "notes.onnx"
    text.write_text("not a model")
    with pytest.raises(BackendError, match=r"cannot load ONNX model .*notes\.onnx"):
        add_onnx_model(models, text, name="x")
    with pytest.raises(ConfigError, match=r"nope\.onnx: no such file"):
        add_onnx_model(models, tmp_path / "nope.onnx", name="x")
    fixed = linear_onnx(tmp_path / "fixed.onnx", weights(), batch=1)
    with pytest.raises(ConfigError, match=r"first \(batch\) axis must be dynamic"):
        add_onnx_model(models, fixed, name="x")
    assert not models.exists()


def test_cli_models_add(tmp_path: Path, src: Path) -> None:
    models = tmp_path / "models"
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("cat\ndog\nbird\n")
    runner = CliRunner()
    args = ["models", "add", str(src), "--name", "mine", "--models-dir", str(models)]
    ok = runner.invoke(app, [*args, "--labels-file", str(labels_file), "--version", "1.0"])
    assert ok.exit_code == 0, ok.output
    assert "registered mine@1.0" in ok.stdout and "cat, dog, bird" in ok.stdout
    assert load_manifest(models).get("mine").labels == ["cat", "dog", "bird"]

    again = runner.invoke(app, [*args, "--labels", "a, b"])
    assert again.exit_code == 1
    assert again.stderr.startswith("error: ") and "2 labels given" in again.stderr
    dup = runner.invoke(app, args)
    assert dup.exit_code == 1 and "replace it with --replace" in dup.stderr
    both = runner.invoke(app, [*args, "--labels", "a", "--labels-file", str(labels_file)])
    assert both.exit_code == 1 and "not both" in both.stderr
    replaced = runner.invoke(app, [*args, "--labels", "x,y,z", "--replace"])
    assert replaced.exit_code == 0 and "replaced mine@" in replaced.stdout
    assert load_manifest(models).get("mine").labels == ["x", "y", "z"]


@pytest.mark.integration
def test_an_added_model_is_served_by_a_worker(tmp_path: Path, src: Path) -> None:
    models = tmp_path / "models"
    add_onnx_model(models, src, name="mine", labels=["a", "b", "c"])
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    cfg = WorkerConfig.model_validate(
        {"bind": "tcp://127.0.0.1:*", "models_dir": str(models), "threads": 1}
    )
    with WorkerProcess(cfg) as w, CloudClient(w.endpoint) as client:
        assert w.endpoint is not None
        reply = client.infer("mine", x, timeout_s=10)
        health = client.health()
    np.testing.assert_allclose(reply["outputs"], OnnxBackend(src).predict(x), rtol=1e-6)
    assert reply["version"] == load_manifest(models).get("mine").version
    assert health["models"]["mine"]["output"]["shape"] == [None, 3]


def test_a_bad_entry_field_writes_nothing(tmp_path: Path, src: Path) -> None:
    with pytest.raises(ConfigError, match=r"model 'mine': version: string should have at least"):
        add_onnx_model(tmp_path / "models", src, name="mine", version="")
    assert not (tmp_path / "models").exists()


def test_a_model_name_listed_twice_is_refused(tmp_path: Path) -> None:
    entry = {"name": "m", "version": "1", "file": "m.onnx", "sha256": "0" * 64, "size_bytes": 1,
             "input": {"name": "x", "shape": [None, 2]}, "output": {"name": "y", "shape": [None, 2]}}  # fmt: skip
    (tmp_path / "manifest.json").write_text(json.dumps({"models": [entry, entry]}))
    with pytest.raises(ConfigError, match=r"listed more than once: \['m'\]"):
        load_manifest(tmp_path)


# ---------------------------------------------------------------- servers, atomic writes


def server_entry(**kw) -> dict:
    return {"name": "r", "version": "1", "format": "openai", "url": "http://127.0.0.1:8080", **kw}


@pytest.mark.parametrize(
    ("kw", "problem"),
    [
        ({"url": None}, "models.0.url: required for format 'openai'"),
        ({"file": "m.gguf"}, "models.0.file: format 'openai' names a server (url), not a file"),
        ({"url": "ws://h:1"}, "models.0.url: must be an http:// or https:// URL"),
        ({"url": "https://k:s@h/v1"}, "models.0.url: must not hold credentials"),
        ({"url": "http://h:1/v1?key=s"}, "models.0.url: must be the server's base URL, without"),
        ({"api_key_env": "sk-abc"}, "models.0.api_key_env: must be the NAME of the environment"),
    ],
)
def test_an_openai_entry_is_a_server_not_a_file(tmp_path: Path, kw: dict, problem: str) -> None:
    write_raw_manifest(tmp_path, {k: v for k, v in server_entry(**kw).items() if v is not None})
    with pytest.raises(ConfigError) as e:
        load_manifest(tmp_path)
    assert f"{tmp_path / MANIFEST_NAME}: {problem}" in e.value.message


def test_server_fields_belong_to_openai_entries_only(tmp_path: Path) -> None:
    write_raw_manifest(tmp_path, entry_dict("m.onnx", url="http://h:1"))
    with pytest.raises(ConfigError, match=r"models\.0\.url: only format 'openai' has a url"):
        load_manifest(tmp_path)
    write_raw_manifest(tmp_path, entry_dict("m.onnx", api_key_env="K"))
    with pytest.raises(ConfigError, match=r"api_key_env: only format 'openai' has them"):
        load_manifest(tmp_path)
    write_raw_manifest(tmp_path, {**entry_dict("m.onnx"), "sha256": None})
    with pytest.raises(ConfigError, match=r"models\.0\.sha256: required for format 'onnx'"):
        load_manifest(tmp_path)
    write_raw_manifest(tmp_path, server_entry(model="m", api_key_env="MY_KEY"))
    entry = load_manifest(tmp_path).get("r")
    assert (entry.file, entry.sha256, entry.model, entry.api_key_env) == (None, None, "m", "MY_KEY")


def test_write_manifest_replaces_through_a_private_temp_file(tmp_path: Path, src: Path) -> None:
    from tandem.runtime.manifest import Manifest, write_manifest

    add_onnx_model(tmp_path, src, name="mine")
    (tmp_path / "manifest.tmp").write_text("another writer's file")  # the old fixed temp name
    manifest = load_manifest(tmp_path)
    write_manifest(tmp_path, Manifest(models=[*manifest.models], workload="w"))
    assert load_manifest(tmp_path).workload == "w"
    assert (tmp_path / "manifest.tmp").read_text() == "another writer's file"
    assert not list(tmp_path.glob(".manifest.json.*"))
    assert (tmp_path / MANIFEST_NAME).stat().st_mode & 0o777 == 0o644
