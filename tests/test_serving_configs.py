"""serving/*.config parse as TF Serving's protos; docker/ files agree with them and with each other.

tensorflow-serving-api ships ``ModelServerConfig`` (model_server_config_pb2) but not ``MonitoringConfig`` nor
``BatchingParameters``; those two are rebuilt here from their upstream .proto definitions
(tensorflow_serving/config/monitoring_config.proto, servables/tensorflow/session_bundle_config.proto), with
the same names, types and field numbers, so text-format parsing is as strict as the server's.
"""

import importlib.metadata
import json
import os
import pathlib
import re
import shlex

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
        # REST routes /labels/<label> only for [a-zA-Z0-9_]+ (serving_config.md, "REST Usage").
        for label in cfg.version_labels:
            assert re.fullmatch(r"[a-zA-Z0-9_]+", label), label
        assert re.fullmatch(r"[^/:]+", name), name  # http_rest_api_util.cc's model-name part of the path
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


# --------------------------------------------------------------------------------------------------------------
# The commands the READMEs give, checked against the configs and against how tensorflow_model_server starts
# --------------------------------------------------------------------------------------------------------------

DOCS = {name: REPO / name for name in ("README.md", "serving/README.md", "docker/README.md", "docs/export.md")}
SERVING_IMAGES = re.compile(r"^(tfemb-serving|tensorflow/serving)(:[\w.-]+)?$")
_DOCKER_VALUE_OPTIONS = {"-p", "--publish", "-v", "--volume", "-e", "--env", "--name", "--mount", "--network",
                         "-w", "--workdir", "--entrypoint", "--user", "-u"}


def _shell_commands(markdown):
    """The commands of a markdown file's sh/bash blocks as shlex token lists: continuation lines joined, a quoted
    argument spanning lines kept whole, comments dropped, ``for VAR in A B; do ... done`` unrolled."""
    commands = []
    for block in re.findall(r"```(?:sh|bash|shell)\n(.*?)```", markdown, flags=re.S):
        buf = ""
        for line in block.splitlines():
            buf += line + "\n"
            if buf.rstrip().endswith("\\"):
                continue
            try:
                tokens = shlex.split(buf.replace("\\\n", " "), comments=True)  # POSIX line continuations
            except ValueError:  # an open quote: the command goes on
                continue
            if tokens:
                commands.append(tokens)
            buf = ""
    unrolled, loop = [], None
    for tokens in commands:
        if tokens[0] == "for" and tokens[2] == "in":
            values = []
            for tok in tokens[3:]:
                values.append(tok.rstrip(";"))
                if tok.endswith(";"):
                    break
            body = tokens[3 + len(values):]
            loop = (tokens[1], values, [body[1:]] if body[:1] == ["do"] and len(body) > 1 else [])
        elif loop is not None and tokens == ["done"]:
            var, values, body = loop
            for value in values:
                unrolled += [[t.replace(f"${var}", value) for t in cmd] for cmd in body]
            loop = None
        elif loop is not None:
            loop[2].append(tokens)
        else:
            unrolled.append(tokens)
    return unrolled


def _docker_run(tokens):
    """``(options, image, args)`` of a ``docker run`` command, else None; options as (flag, value) pairs."""
    if tokens[:2] != ["docker", "run"]:
        return None
    options, i = [], 2
    while i < len(tokens) and tokens[i].startswith("-"):
        flag = tokens[i]
        if flag in _DOCKER_VALUE_OPTIONS:
            options.append((flag, tokens[i + 1]))
            i += 2
        else:
            options.append((flag, None))
            i += 1
    return options, tokens[i], tokens[i + 1:]


def _flag_values(args):
    return dict(re.fullmatch(r"--([\w]+)=(.*)", a).groups() for a in args if re.fullmatch(r"--[\w]+=.*", a))


def _documented():
    out = []
    for name, path in DOCS.items():
        for tokens in _shell_commands(path.read_text()):
            out.append((name, tokens))
    return out


def _serving_cmd_default_args():
    cmd = re.search(r"CMD \[(.*)\]", _dockerfile("Dockerfile.serving")).group(1)
    return re.findall(r'"([^"]*)"', cmd)


def test_the_markdown_command_parser_unrolls_loops_and_joins_lines():
    md = ("```sh\nfor name in a b; do\n  docker run --rm img \\\n    export /models/$name   # c\ndone\n"
          "curl -d '{\"x\": [1,\n  2]}' http://h:8501/v1/models/m:predict\n```\n")
    assert _shell_commands(md) == [["docker", "run", "--rm", "img", "export", "/models/a"],
                                   ["docker", "run", "--rm", "img", "export", "/models/b"],
                                   ["curl", "-d", '{"x": [1,\n  2]}', "http://h:8501/v1/models/m:predict"]]


def test_documented_servers_with_models_config_allow_its_labels_at_start_up():
    """TF Serving applies a config's version_labels before it loads any version (server_core.cc: ReloadConfig
    calls UpdateModelVersionLabelMap first), so a labelled models.config needs
    --allow_version_labels_for_unavailable_models=true or the server refuses to start (serving_config.md)."""
    config = _models_config()
    if not any(c.version_labels for c in config.model_config_list.config):
        pytest.skip("models.config has no version labels")
    runs = []
    for doc, tokens in _documented():
        run = _docker_run(tokens)
        if run and SERVING_IMAGES.match(run[1]):
            args = run[2] or (_serving_cmd_default_args() if run[1].startswith("tfemb-serving") else [])
            runs.append((doc, " ".join(tokens), _flag_values(args)))
        elif tokens[0] == "tensorflow_model_server":
            runs.append((doc, " ".join(tokens), _flag_values(tokens[1:])))
    with_config = [r for r in runs if r[2].get("model_config_file", "").endswith("models.config")]
    assert len(with_config) >= 3, runs  # serving/README (binary, docker), docker/README (image, extra flags)
    for doc, command, flags in with_config:
        assert flags.get("allow_version_labels_for_unavailable_models") == "true", f"{doc}: {command}"


def test_documented_docker_runs_mount_the_exports_where_the_server_looks():
    """Each `docker run` of a TF Serving image mounts the exports at the base paths it serves: the parent of every
    models.config base_path, or MODEL_BASE_PATH/MODEL_NAME (the image's entrypoint) without a config file;
    a config file read from /etc/tfemb is baked into tfemb-serving or mounted; ports are the image's 8500 /
    8501 (tensorflow_serving/tools/docker/Dockerfile)."""
    config = _models_config()
    base_paths = [c.base_path for c in config.model_config_list.config]
    checked = 0
    for doc, tokens in _documented():
        run = _docker_run(tokens)
        if not run or not SERVING_IMAGES.match(run[1]):
            continue
        options, image, args = run
        command = f"{doc}: {' '.join(tokens)}"
        mounts = {}
        for flag, value in options:
            if flag in ("-v", "--volume"):
                src, dst = value.split(":")[:2]
                mounts[dst] = src
            if flag in ("-p", "--publish"):
                assert value.split(":")[-1] in ("8500", "8501"), command
        env = dict(v.split("=", 1) for f, v in options if f in ("-e", "--env"))
        if image.startswith("tfemb-serving") and not args:
            args = _serving_cmd_default_args()
        flags = _flag_values(args)
        if "model_config_file" in flags:
            for base in base_paths:
                assert any(base == d or base.startswith(d.rstrip("/") + "/") for d in mounts), (command, base)
            cfg_dir = os.path.dirname(flags["model_config_file"])
            assert image.startswith("tfemb-serving") or cfg_dir in mounts, command
            if cfg_dir in mounts:
                assert mounts[cfg_dir].rstrip("/").endswith("serving"), command
        else:
            name = env.get("MODEL_NAME")
            assert name in {c.name for c in config.model_config_list.config}, command
            target = f"{env.get('MODEL_BASE_PATH', '/models')}/{name}"
            assert mounts.get(target, "").endswith(f"exports/{name}") or mounts.get("/models") == "$PWD/exports", \
                command
        checked += 1
    assert checked >= 4


def test_docker_readme_exports_every_model_before_serving_them():
    """tensorflow_model_server opens its ports only once every configured model has a version, and one missing
    base path fails the file-system poll for all of them (file_system_storage_path_source.cc:
    PollFileSystemForConfig): the step-by-step commands must export every model models.config lists."""
    names = {c.name for c in _models_config().model_config_list.config}
    exported = set()
    for tokens in _shell_commands((DOCKER / "README.md").read_text()):
        run = _docker_run(tokens)
        if run and run[1] == "tfemb-train" and run[2][:1] == ["export"]:
            target = run[2][2]
            mounts = dict(reversed(v.split(":")[:2]) for f, v in run[0] if f in ("-v", "--volume"))
            assert mounts.get("/models", "").endswith("exports"), tokens
            m = re.fullmatch(r"/models/(\w+)", target)
            assert m, tokens
            exported.add(m.group(1))
        if run and run[1] == "tfemb-train" and run[2][:1] == ["train"]:
            recipe = run[2][run[2].index("--config") + 1]
            assert (REPO / recipe).is_file(), f"Dockerfile.train copies models/ to its WORKDIR; {recipe} is missing"
    assert names <= exported, f"docker/README.md exports {sorted(exported)}; models.config serves {sorted(names)}"


def test_compose_serving_healthcheck_works_in_an_image_without_curl(tmp_path):
    """The tensorflow/serving image is Ubuntu + tensorflow_model_server (+ bash for its entrypoint script), no
    curl or wget (tensorflow_serving/tools/docker/Dockerfile): the healthcheck speaks HTTP through bash's
    /dev/tcp. Run it here against a stub that answers like GET /v1/models/<name>."""
    import http.server
    import subprocess
    import threading

    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    check = compose["services"]["serving"]["healthcheck"]
    test = check["test"]
    assert test[:3] == ["CMD", "bash", "-c"], test
    script = test[3]
    assert not re.search(r"\b(curl|wget|python)\b", script), script
    assert "127.0.0.1/8501" in script
    model = re.search(r"GET /v1/models/(\w+) ", script).group(1)
    assert model in {c.name for c in _models_config().model_config_list.config}
    assert check.get("start_period"), "loading and warming up takes a while"

    state = {"body": None, "code": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.path == f"/v1/models/{model}"
            body = json.dumps(state["body"] if ok else {"error": "Malformed request"}, indent=1).encode()
            self.send_response(state["code"] if ok else 400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]

    def run():
        cmd = script.replace("127.0.0.1/8501", f"127.0.0.1/{port}")
        return subprocess.run(["bash", "-c", cmd], capture_output=True, timeout=20).returncode

    def status(state_name):  # GetModelStatusResponse as TF Serving prints it
        return {"model_version_status": [{"version": "1", "state": state_name,
                                          "status": {"error_code": "OK", "error_message": ""}}]}

    try:
        state["body"] = status("AVAILABLE")
        assert run() == 0
        state["body"] = status("LOADING")
        assert run() != 0
        state["body"], state["code"] = {"error": f"Could not find any versions of model {model}"}, 404
        assert run() != 0
    finally:
        server.shutdown()
        server.server_close()
    assert run() != 0  # nothing listening yet


def test_warmup_requests_fit_the_batching_limit():
    """TF Serving replays assets.extra/tf_serving_warmup_requests through the model's (batching) session when a
    version loads; a record with more rows than max_batch_size fails with "Task size N is larger than maximum
    input batch size" and with it the load."""
    from tfemb.export.warmup import MAX_WARMUP_BATCH

    params = _parse(SERVING / "batching.config", MESSAGES["BatchingParameters"]())
    assert MAX_WARMUP_BATCH <= params.max_batch_size.value
    assert f"max_batch_size {params.max_batch_size.value}" in (SERVING / "README.md").read_text()


def _synthetic_features():
    from tfemb.data import make_synthetic_ctr, synthetic_ctr_schema

    recipe = yaml.safe_load((REPO / "models" / "deepfm_synthetic.yaml").read_text())
    params = dict(recipe["data"]["params"], num_rows=500)
    df, _ = make_synthetic_ctr(**params)
    return {f.name: type(f).__name__ for f in synthetic_ctr_schema(df).features}


def test_documented_requests_are_valid_for_the_served_models():
    """Every documented curl is a request TF Serving accepts (api_rest.md): a known model, version or label,
    valid JSON with exactly the export's raw inputs (the synthetic recipe's features) in the right JSON types."""
    config = _models_config()
    models = {c.name: c for c in config.model_config_list.config}
    features = _synthetic_features()
    url_re = re.compile(r"http://(?:localhost|127\.0\.0\.1):8501/v1/models/(\w+)"
                        r"(?:/versions/(\d+)|/labels/(\w+))?(/metadata|:predict)?")
    posts = 0
    for doc, tokens in _documented():
        if tokens[0] != "curl":
            continue
        url = next(t for t in tokens if t.startswith("http"))
        m = url_re.fullmatch(url)
        assert m, f"{doc}: {url}"
        name, version, label, api = m.groups()
        if doc in ("serving/README.md", "docker/README.md"):  # served under models.config's names
            assert name in models, f"{doc}: {url}"
            if version:
                assert int(version) in models[name].model_version_policy.specific.versions, url
            if label:
                assert label in models[name].version_labels, url
        if "-d" not in tokens:
            assert api != ":predict", url
            continue
        assert api == ":predict", url
        body = json.loads(tokens[tokens.index("-d") + 1])
        rows = [body["inputs"]] if "inputs" in body else body["instances"]
        for row in rows:
            assert set(row) == set(features), f"{doc}: {sorted(row)}"
            for key, value in row.items():
                values = value if isinstance(value, list) else [value]
                kind = (int, float) if features[key] == "NumericFeature" else str
                assert values and all(isinstance(v, kind) for v in values), (doc, key, value)
        posts += 1
    assert posts >= 3


def test_train_image_reads_real_datasets_from_a_mount_point():
    """tfemb's default data folder is <folder holding the tfemb package>/../shared/data: in the image that is
    site-packages/../shared/data, which no one mounts. The image sets TFEMB_DATA_DIR; the README mounts it."""
    text = _dockerfile("Dockerfile.train")
    data = re.search(r"\bTFEMB_DATA_DIR=(\S+)", text)
    assert data and data.group(1).startswith("/"), "Dockerfile.train must set TFEMB_DATA_DIR"
    real = []
    for tokens in _shell_commands((DOCKER / "README.md").read_text()):
        run = _docker_run(tokens)
        if run and run[1] == "tfemb-train" and run[2][:1] == ["train"]:
            recipe = yaml.safe_load((REPO / run[2][run[2].index("--config") + 1]).read_text())
            if not recipe["data"]["source"].startswith("synthetic"):
                mounts = [v.split(":")[1] for f, v in run[0] if f in ("-v", "--volume")]
                assert data.group(1) in mounts, tokens
                real.append(tokens)
    assert real, "docker/README.md shows how to train on a real dataset"
