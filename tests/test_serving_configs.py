"""serving/*.config parse as TF Serving's protos; docker/ files agree with them and with each other.

tensorflow-serving-api ships ``ModelServerConfig`` (model_server_config_pb2) but not ``MonitoringConfig`` nor
``BatchingParameters``; those two are rebuilt here from their upstream .proto definitions
(tensorflow_serving/config/monitoring_config.proto, servables/tensorflow/session_bundle_config.proto), with
the same names, types and field numbers, so text-format parsing is as strict as the server's.
"""

import importlib.metadata
import os
import pathlib
import re

import pytest
import yaml
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format, wrappers_pb2

REPO = pathlib.Path(__file__).resolve().parents[1]
SERVING = REPO / "serving"
DOCKER = REPO / "docker"

_F = descriptor_pb2.FieldDescriptorProto


def _upstream_messages():
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    fd = descriptor_pb2.FileDescriptorProto(name="tfemb_tests/tf_serving_configs.proto",
                                            package="tensorflow.serving", syntax="proto3",
                                            dependency=["google/protobuf/wrappers.proto"])

    def message(name, fields):
        msg = fd.message_type.add(name=name)
        for fname, number, ftype, type_name, label in fields:
            field = msg.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                field.type_name = type_name

    opt, rep = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
    i64, sval = ".google.protobuf.Int64Value", ".google.protobuf.StringValue"
    message("PrometheusConfig", [("enable", 1, _F.TYPE_BOOL, None, opt), ("path", 2, _F.TYPE_STRING, None, opt)])
    message("MonitoringConfig", [("prometheus_config", 1, _F.TYPE_MESSAGE, ".tensorflow.serving.PrometheusConfig",
                                  opt)])
    message("BatchingParameters", [
        ("max_batch_size", 1, _F.TYPE_MESSAGE, i64, opt),
        ("batch_timeout_micros", 2, _F.TYPE_MESSAGE, i64, opt),
        ("max_enqueued_batches", 3, _F.TYPE_MESSAGE, i64, opt),
        ("num_batch_threads", 4, _F.TYPE_MESSAGE, i64, opt),
        ("thread_pool_name", 5, _F.TYPE_MESSAGE, sval, opt),
        ("allowed_batch_sizes", 6, _F.TYPE_INT64, None, rep),
        ("pad_variable_length_inputs", 7, _F.TYPE_BOOL, None, opt),
    ])
    pool.Add(fd)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"tensorflow.serving.{name}"))
            for name in ("MonitoringConfig", "BatchingParameters")}


MESSAGES = _upstream_messages()


def _parse(path, message):
    return text_format.Parse(path.read_text(), message)


def _models_config():
    from tensorflow_serving.config import model_server_config_pb2

    return _parse(SERVING / "models.config", model_server_config_pb2.ModelServerConfig())


def test_models_config_parses_with_several_models_versions_and_labels():
    config = _models_config()
    models = {c.name: c for c in config.model_config_list.config}
    assert len(models) >= 2 and len(models) == len(config.model_config_list.config)
    policies = {}
    for name, cfg in models.items():
        assert cfg.model_platform == "tensorflow"
        assert cfg.base_path == f"/models/{name}", "docker/ mounts the exports volume at /models"
        policies[name] = cfg.model_version_policy.WhichOneof("policy_choice")
        if policies[name] == "specific":
            versions = set(cfg.model_version_policy.specific.versions)
            assert len(versions) >= 2
            assert {"stable", "canary"} <= set(cfg.version_labels)
            assert set(cfg.version_labels.values()) <= versions, "labels must name served versions"
    assert {"specific", "latest"} <= set(policies.values())


def test_batching_config_parses_and_is_consistent():
    params = _parse(SERVING / "batching.config", MESSAGES["BatchingParameters"]())
    for field in ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads"):
        assert params.HasField(field), field
    sizes = list(params.allowed_batch_sizes)
    # BatchingParameters' contract: increasing, and the last one equals max_batch_size.
    assert sizes == sorted(set(sizes)) and sizes[-1] == params.max_batch_size.value
    assert params.num_batch_threads.value >= 1


def test_monitoring_config_enables_prometheus_on_the_path_tfemb_serve_answers():
    from tfemb.serving.server import PROMETHEUS_PATH

    config = _parse(SERVING / "monitoring.config", MESSAGES["MonitoringConfig"]())
    assert config.prometheus_config.enable
    assert config.prometheus_config.path == PROMETHEUS_PATH


def test_a_typo_in_a_config_is_caught():
    with pytest.raises(text_format.ParseError):
        text_format.Parse("max_batch_sise { value: 4 }", MESSAGES["BatchingParameters"]())


def _dockerfile(name):
    text = (DOCKER / name).read_text()
    return re.sub(r"\\\n", " ", text)  # join continuation lines


def _copy_sources(text):
    sources = []
    for line in text.splitlines():
        if line.strip().startswith("COPY") and "--from" not in line:
            parts = line.split()[1:]
            sources += [p for p in parts[:-1] if not p.startswith("--")]
    return sources


def test_serving_dockerfile_matches_tf_serving_api_and_the_configs():
    text = _dockerfile("Dockerfile.serving")
    version = re.search(r"ARG TF_SERVING_VERSION=(\S+)", text).group(1)
    assert re.search(r"FROM tensorflow/serving:\$\{TF_SERVING_VERSION\}", text)
    assert version == importlib.metadata.version("tensorflow-serving-api")
    for src in _copy_sources(text):
        assert (REPO / src).exists(), f"Dockerfile.serving copies {src}, which does not exist"
    dest = re.search(r"COPY serving/\S+ .* (\S+)/\n", text + "\n").group(1)
    cmd = re.search(r"CMD \[(.*)\]", text).group(1)
    flags = dict(re.findall(r'"--([a-z_]+)=([^"]*)"', cmd))
    assert flags["model_config_file"] == f"{dest}/models.config"
    assert flags["batching_parameters_file"] == f"{dest}/batching.config"
    assert flags["monitoring_config_file"] == f"{dest}/monitoring.config"
    assert flags["enable_batching"] == "true"
    assert int(flags["model_config_file_poll_wait_seconds"]) > 0
    # models.config labels a version that may not be loaded yet.
    assert flags["allow_version_labels_for_unavailable_models"] == "true"
    assert re.search(r"EXPOSE 8500 8501", text)


def test_train_dockerfile_installs_the_project_with_tfemb_as_entrypoint():
    text = _dockerfile("Dockerfile.train")
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    for src in _copy_sources(text):
        assert (REPO / src).exists(), f"Dockerfile.train copies {src}, which does not exist"
    setup = (REPO / "setup.py").read_text()
    for needed in re.findall(r'"([\w.-]+\.(?:txt|md))"', setup):  # files setup.py reads at install time
        assert needed in _copy_sources(text), f"setup.py reads {needed}; Dockerfile.train must copy it"
    assert 'ENTRYPOINT ["tfemb"]' in text


def test_compose_wires_train_exports_into_serving():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    train, serving = services["train"], services["serving"]
    for svc, dockerfile in ((train, "docker/Dockerfile.train"), (serving, "docker/Dockerfile.serving")):
        context = (DOCKER / svc["build"]["context"]).resolve()
        assert context == REPO
        assert svc["build"]["dockerfile"] == dockerfile and (context / dockerfile).exists()
    assert set(serving["ports"]) == {"8500:8500", "8501:8501"}
    assert serving["depends_on"]["train"]["condition"] == "service_completed_successfully"
    mounts = {v.split(":")[0]: v.split(":")[1] for v in serving["volumes"]}
    assert mounts["exports"] == "/models"
    assert "exports:/models" in train["volumes"] and "exports" in compose["volumes"]
    script, *jobs = train["command"]
    names = {c.name for c in _models_config().model_config_list.config}
    assert {job.split("=")[1] for job in jobs} == names, "train must export every model models.config serves"
    for job in jobs:
        assert (REPO / job.split("=")[0]).exists()
    compile(script, "compose.yaml:train", "exec")
    assert 'export_saved_model(result["_model"], f"/models/{name}")' in script


def test_readmes_give_the_commands():
    serving_readme = (SERVING / "README.md").read_text()
    for flag in ("--model_config_file=", "--rest_api_port=8501", "--port=8500", "--enable_batching",
                 "--batching_parameters_file=", "--monitoring_config_file=", "--model_config_file_poll_wait_seconds=",
                 "tfemb serve", "MODEL_NAME="):
        assert flag in serving_readme, flag
    docker_readme = (DOCKER / "README.md").read_text()
    for command in ("docker build -f docker/Dockerfile.serving", "docker build -f docker/Dockerfile.train",
                    "docker compose -f docker/compose.yaml up", "-p 8500:8500 -p 8501:8501"):
        assert command in docker_readme, command
    assert "cannot" in docker_readme.lower() or "does not run" in docker_readme.lower()


def test_tfemb_serve_reads_the_models_config(tmp_path):
    """The same models.config drives the local server (absolute /models paths remapped for the test)."""
    from tfemb.serving.server import ModelRegistry

    text = (SERVING / "models.config").read_text().replace('base_path: "/models/', 'base_path: "')
    path = tmp_path / "models.config"
    path.write_text(text)
    registry = ModelRegistry(str(tmp_path), model_config=str(path), poll_seconds=0)
    names = {c.name for c in _models_config().model_config_list.config}
    assert set(registry.model_names) == names
    model = registry._models["deepfm_synthetic"]
    assert model.base_path == os.path.join(str(tmp_path), "deepfm_synthetic")
    assert model.policy == ("specific", frozenset({1, 2})) and model.labels == {"stable": 1, "canary": 2}
