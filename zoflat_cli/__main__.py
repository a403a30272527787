"""The `zoflat` entry point. The signal policy (signals.py) is installed before anything heavy is
imported, so a Ctrl-C at start-up is one line too; output that the terminal's encoding cannot hold
degrades to escapes; `--version` answers without importing torch."""

import sys

from zoflat_cli import signals, version_line


def main():
    signals.install()
    for stream in (sys.stdout, sys.stderr):  # a terminal that cannot show λ gets \u03bb, not an error
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):  # not a text stream of io's
            pass
    try:
        if sys.argv[1:] == ["--version"]:
            print(version_line())
            return
        from zoflat_cli.cli import main as cli_main

        cli_main()
    except KeyboardInterrupt:  # while importing, before the CLI's error boundary stands
        print("interrupted", file=sys.stderr)
        sys.exit(signals.EXIT_INTERRUPTED)
    finally:
        signals.ignore()  # the interpreter's exit (atexit, flushes) is not interrupted


if __name__ == "__main__":
    main()
