"""A bounded load check of the web UI with gradio_client on loopback.

    python pipelines/ui_load_check.py RUN FILE [--users 10] [--requests 5]

Starts the app for RUN on a free loopback port, then USERS concurrent clients each upload FILE
REQUESTS times through the page's own endpoint. Prints the number of errors and the p50/p95
latency; exits 1 if any request failed.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("file", type=Path)
    p.add_argument("--users", type=int, default=10)
    p.add_argument("--requests", type=int, default=5)
    args = p.parse_args(argv)
    # (heavy: the web app and its client, imported when the check runs, not for --help)
    from gradio_client import Client, handle_file

    from medtl_ui.app import launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app, _, _ = launch(args.run, port=port, prevent_thread_lock=True)
    url = f"http://127.0.0.1:{port}/"
    run_name = args.run.name

    def user(k: int) -> list[tuple[float, str | None]]:
        client = Client(url, verbose=False)
        out = []
        for _ in range(args.requests):
            t0 = time.perf_counter()
            try:
                result = client.predict(run_name, [handle_file(str(args.file))], "gradcam", 0.45, api_name="/on_upload")
                message = result[3]
                error = None if "Predicted class" in str(message) else f"unexpected message: {str(message)[:80]}"
            except Exception as e:  # a server error or a refused request
                error = f"{type(e).__name__}: {str(e)[:80]}"
            out.append((time.perf_counter() - t0, error))
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.users) as pool:
        results = [r for rs in pool.map(user, range(args.users)) for r in rs]
    wall = time.perf_counter() - t0
    app.get_blocks().close()  # this check's own server only (close_all would stop every app in the process)
    latencies = np.array([t for t, _ in results])
    errors = [e for _, e in results if e]
    print(f"{args.users} users x {args.requests} requests = {len(results)} requests in {wall:.1f} s")
    print(f"errors: {len(errors)}" + (f" (first: {errors[0]})" if errors else ""))
    print(
        f"latency p50 {np.percentile(latencies, 50):.2f} s, p95 {np.percentile(latencies, 95):.2f} s, "
        f"max {latencies.max():.2f} s"
    )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
