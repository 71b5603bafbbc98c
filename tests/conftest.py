import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib  # noqa: E402

import tensorflow as tf  # noqa: E402

# Two logical CPU devices for the tf.distribute tests (MirroredStrategy on one machine). This must happen
# before TensorFlow initialises its devices, so it lives here, imported before any test module.
try:
    _cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        _cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )
except RuntimeError:  # already initialised (e.g. a plugin touched TF first): the distribute tests skip
    pass

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def shared_data_dir():
    """The real datasets: $TFEMB_DATA_DIR, else ../shared/data beside the repository."""
    return pathlib.Path(os.environ.get("TFEMB_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture
def data_dir():
    return shared_data_dir()


def require_shared(subdir):
    path = shared_data_dir() / subdir
    if not path.exists():
        pytest.skip(f"real dataset {path} is absent (set TFEMB_DATA_DIR to the folder holding {subdir}/)")
    return path
