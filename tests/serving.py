"""Runs an ASGI app with uvicorn in a thread on a free localhost port, for the HTTP tests."""
import contextlib
import threading
import time

import uvicorn

from cluster.serve_cmd import bind_socket


@contextlib.contextmanager
def serving(app):
    """Yields the running app's base URL; stops the server after."""
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="error"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
