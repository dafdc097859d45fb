"""amqproxy: a pooling AMQP 0-9-1 proxy for RabbitMQ."""

from .accel import drop_enum_getattr_hook, install_source_finder

__version__ = "0.1.0"

drop_enum_getattr_hook()  # Python 3.11: enum members read as fast as class attributes
install_source_finder()  # AMQPROXY_PURE_PYTHON=1: the .py sources, not the compiled modules
