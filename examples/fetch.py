"""A program that opens connections, for `python -m dtrace where connect`.

    python examples/fetch.py               # one round
    python examples/fetch.py 100000        # rounds, 10 ms apart: a process to attach to (-p)

Each connection goes to a closed local port, so each connect() fails at once.
"""

import socket
import sys
import time


def connect(port):
    with socket.socket() as s:
        s.connect_ex(("127.0.0.1", port))


def fetch_all(ports):
    for port in ports:
        connect(port)


def health_check():
    connect(9)


def main(rounds):
    for _ in range(rounds):
        fetch_all([9, 7, 13])
        health_check()
        if rounds > 1:
            time.sleep(0.01)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
