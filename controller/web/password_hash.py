"""``python -m controller.web.password_hash``: print the hash of a dashboard user's password.

A module of its own, not a ``__main__`` in passwords.py: the web package
imports passwords.py itself, and running an imported module as a script
would load it twice.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from .passwords import hash_password


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m controller.web.password_hash",
        description="Print the password hash of a dashboard user, for password_hash in the controller "
                    "configuration's [[users]] table. Asks for the password twice on a terminal; "
                    "otherwise reads one line from standard input.",
        epilog='example:\n  [[users]]\n  name = "alice"\n  password_hash = "scrypt$n=16384,r=8,p=1$..."\n'
               '  role = "admin"      # or "reader": sees everything, changes nothing',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("error: the two passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    try:
        print(hash_password(password))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
