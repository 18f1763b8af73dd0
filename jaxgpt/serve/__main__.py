"""Serve a model over OpenAI's API, with a web page to chat in.

  python -m jaxgpt.serve --workdir=out/chat_run
  python -m jaxgpt.serve --init_from=HuggingFaceTB/SmolLM2-135M-Instruct --port=8000

then point any OpenAI client at http://127.0.0.1:8000/v1 (or open the page at
http://127.0.0.1:8000/). A model without a chat template (a base model)
answers chat requests as plain continuation of the messages' contents.
--slots requests decode together; --temperature, --top_p, --top_k and
--max_new_tokens are the defaults of requests that name none. The server
listens on 127.0.0.1 unless --host says otherwise (then set --api_key).
See docs/serve.md.
"""

from __future__ import annotations

from jaxgpt.run import stops

if __name__ == "__main__":  # Ctrl-C while JAX is imported ends quietly too.
    stops.quit_at_once()

import socket
import sys

from absl import logging

from jaxgpt.config import ConfigError
from jaxgpt.run import cache, cli, errors, quiet
from jaxgpt.run import checkpoint as ckpt
from jaxgpt.run.perf import cpu_speedups

EVERYWHERE = ("0.0.0.0", "::", "")


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (one error line if it cannot be)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise ConfigError(
            f"cannot listen on --host={host} --port={port} ({e.strerror or e}):"
            " choose another --port (or a --host of this machine)."
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def main(argv: list[str]) -> int:
    quiet.install()
    cpu_speedups()
    cache.enable_compilation_cache()
    del argv  # cli.run refuses words that are not flags.
    try:
        import uvicorn

        from jaxgpt.serve.app import Settings, make_app
    except ImportError as e:
        sys.exit(
            errors.needs_package_line(
                "python -m jaxgpt.serve", "starlette and uvicorn", e, "serve"
            )
        )
    from jaxgpt.chat import model as chat_model
    from jaxgpt.chat.engine import Engine
    from jaxgpt.serve.protocol import Defaults

    with stops.QuitAtOnce():  # Loading: a signal ends at once.
        try:
            cmd = cli.command()
            chat = cmd.chat
            sock = listen(chat.host, chat.port)  # Before minutes of loading.
            model = chat_model.load(cmd)
        except (ConfigError, ckpt.CheckpointError) as e:
            errors.exit_with(e)
        except OSError as e:
            errors.exit_with(e, cli.FLAGS.workdir)
    sample = cmd.sample
    settings = Settings(
        slots=chat.slots,
        max_waiting=chat.max_waiting,
        api_key=chat.api_key,
        max_request_bytes=chat.max_request_bytes,
        max_messages=chat.max_messages,
        defaults=Defaults(
            temperature=sample.temperature,
            top_p=sample.top_p,
            top_k=sample.top_k,
            max_tokens=sample.max_new_tokens,
        ),
        seed=cmd.run.seed,
        system=chat.system,
    )
    if chat.host in EVERYWHERE and not chat.api_key:
        logging.warning(
            "listening on every interface (--host=%s) with no --api_key: anyone who"
            " can reach this machine can use the model; set --api_key=<a secret>.",
            chat.host,
        )
    # uvicorn stops on SIGINT or SIGTERM, then raises the signal again: exit then.
    stops.install(lambda signum, frame: sys.exit(128 + signum))
    engine = Engine(model, slots=chat.slots)
    try:
        app = make_app(model, engine, settings)
        where = f"http://{chat.host}:{chat.port}"
        logging.info(
            "serving %s (%s, context %d) on %s/v1 with %d slots; the page: %s/",
            model.name,
            "chat template" if model.chat else "no chat template: plain continuation",
            model.context,
            where,
            chat.slots,
            where,
        )
        config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    cli.run(main)
