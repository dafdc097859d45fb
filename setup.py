"""Packaging for amqproxy: `pip install .` gives the `amqproxy` console script."""

from setuptools import find_packages, setup

setup(
    name="amqproxy",
    version="0.1.0",
    description="A pooling AMQP 0-9-1 proxy for RabbitMQ, on gevent",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["amqproxy", "amqproxy.*"]),
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
            "pika>=1.3",
            "amqp>=5.2",
            "aio-pika>=9.3",
            "hypothesis>=6.90",
            "ruff>=0.4",
            "locust>=2.20",
            "toxiproxy-python>=0.1.1",
            "cryptography>=41",
            "kubernetes-validate>=1.28",  # deploy/kubernetes/ validated offline (bundled schemas)
            "PyYAML>=6",
        ],
    },
    entry_points={"console_scripts": ["amqproxy=amqproxy.cli:main"]},
)
