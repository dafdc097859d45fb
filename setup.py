"""Packaging for amqproxy: `pip install .` gives the `amqproxy` console script.

The modules of the data path (amqproxy/accel.py's COMPILED) are compiled with Cython when it is
there (pyproject.toml lists it for the build; `python setup.py build_ext --inplace` compiles them
beside their sources). The .py files stay the reference and the fallback:
AMQPROXY_NO_COMPILE=1 skips the compilation, AMQPROXY_PURE_PYTHON=1 ignores compiled modules
at run time.
"""

import os

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

# Kept in step with amqproxy/accel.py (a unit test compares them).
COMPILED = [
    "amqproxy/protocol/codec.py",
    "amqproxy/protocol/frames.py",
    "amqproxy/protocol/content.py",
    "amqproxy/protocol/rules.py",
    "amqproxy/protocol/closing.py",
    "amqproxy/protocol/connection.py",
    "amqproxy/protocol/handshake.py",
    "amqproxy/protocol/errors.py",
    "amqproxy/channel.py",
    "amqproxy/outbox.py",
    "amqproxy/client.py",
    "amqproxy/client_channels.py",
    "amqproxy/client_handshake.py",
    "amqproxy/upstream.py",
    "amqproxy/upstream_handshake.py",
    "amqproxy/upstream_replies.py",
    "amqproxy/recovery.py",
]


def compiled_modules():
    if os.environ.get("AMQPROXY_NO_COMPILE"):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:  # no Cython: the pure-Python package, same behaviour
        return []
    # annotation_typing off: type hints stay hints, the compiled code behaves as the source does.
    directives = {"language_level": 3, "annotation_typing": False, "binding": True}
    return cythonize(COMPILED, compiler_directives=directives, quiet=True)


class OptionalBuildExt(build_ext):
    """A module that does not compile (no C compiler, no Python headers) stays pure Python."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure: the sources serve
            print(f"amqproxy: not compiling the data path ({exc}); the pure-Python modules are used")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            print(f"amqproxy: {ext.name} not compiled ({exc}); its pure-Python module is used")


setup(
    name="amqproxy",
    version="0.1.0",
    description="A pooling AMQP 0-9-1 proxy for RabbitMQ, on gevent",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["amqproxy", "amqproxy.*"]),
    # The status page's static files (GET / on the admin listener).
    package_data={"amqproxy": ["status/*.html", "status/*.js", "status/*.css"]},
    install_requires=[
        "gevent>=23.9",
        "prometheus-client>=0.17",
        "configargparse>=1.7",
        "python-json-logger>=2.0.7",
        "tomli>=2.0; python_version < '3.11'",
    ],
    extras_require={
        "test": [
            "pamqp>=3.2",
            "pytest>=7.4",
            "pytest-timeout>=2.2",
            "pytest-xdist>=3.5",  # tox runs the suite on two workers
            "pika>=1.3",
            "amqp>=5.2",
            "aio-pika>=9.3",
            "hypothesis>=6.90",
            "ruff>=0.4",
            "locust>=2.20",
            "toxiproxy-python>=0.1.1",
            "cryptography>=41",
            # Drives Debian's chromium through chromium-driver in the status page's browser test.
            "selenium>=4.20",
            "kubernetes-validate>=1.28",  # deploy/kubernetes/ validated offline (bundled schemas)
            "PyYAML>=6",
            "Cython>=3.0",  # tox compiles the data path in place (the integration tests run it)
        ],
    },
    ext_modules=compiled_modules(),
    cmdclass={"build_ext": OptionalBuildExt},
    entry_points={"console_scripts": ["amqproxy=amqproxy.cli:main"]},
)
