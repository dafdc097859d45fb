"""Command line entry point: parse options (exit 2 on a bad one), set up logging, run the proxy."""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from .config import ConfigError, fail, parse_config  # noqa: E402
from .logsetup import set_static_fields, setup_logging  # noqa: E402
from .supervisor import WORKER_ADMIN_ENV, WORKER_ENV  # noqa: E402


def check_config(argv: list[str]) -> int:
    """`amqproxy check-config [options]`: validate flags, env vars and config file; print every problem."""
    try:
        parse_config(argv)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"amqproxy: error: {problem}", file=sys.stderr)
        return 2
    print("configuration ok")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--version"]:
        from . import __version__
        from .accel import implementation

        print(f"amqproxy {__version__} ({implementation()} data path)")
        return 0
    if args[:1] == ["check-config"]:
        return check_config(args[1:])
    if args[:1] == ["hash-password"]:  # an --auth-file entry; see amqproxy/auth.py
        from .auth import hash_password_main

        return hash_password_main(args[1:])
    try:
        config = parse_config(args)
    except ConfigError as exc:
        fail(str(exc))
    worker = os.environ.get(WORKER_ENV)  # set by the supervisor in its workers
    if worker is not None:
        set_static_fields(worker=int(worker))
    setup_logging(config.log_level, config.log_format)
    if config.workers > 1 and worker is None:
        from .supervisor import Supervisor

        return Supervisor(config).run()
    from .server import Proxy

    proxy = Proxy(config, admin_socket=os.environ.get(WORKER_ADMIN_ENV) if worker is not None else None)
    try:
        proxy.start()
    except OSError as exc:
        logging.getLogger("amqproxy").error("cannot listen", extra={"event": "listen_failed", "error": str(exc)})
        print(f"amqproxy: error: cannot listen: {exc}", file=sys.stderr)
        return 2
    proxy.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
