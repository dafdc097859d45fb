"""amqproxy: a pooling AMQP 0-9-1 proxy for RabbitMQ."""

__version__ = "0.1.0"
