"""amqproxy: a pooling AMQP 0-9-1 proxy for RabbitMQ."""

from .accel import install_source_finder

__version__ = "0.1.0"

install_source_finder()  # AMQPROXY_PURE_PYTHON=1: the .py sources, not the compiled modules
