import pathlib
import re

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "tfemb" / "version.py").read_text()).group(1)


def requirements(name):
    lines = (HERE / name).read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


setup(
    name="tfemb",
    version=VERSION,
    description="Embedding-size search and compact embeddings for TensorFlow/Keras recommenders",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["tfemb", "tfemb.*"]),
    python_requires=">=3.10,<3.14",
    install_requires=requirements("requirements.txt"),
    extras_require={"test": requirements("requirements-test.txt"), "bench": requirements("requirements-bench.txt")},
    entry_points={"console_scripts": ["tfemb=tfemb.cli:main"]},
    include_package_data=True,
    package_data={"tfemb": ["recipes/*.yaml"]},
)
