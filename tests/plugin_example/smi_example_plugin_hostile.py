"""Plugins that try to take smi down or over, to show that they cannot: one that calls sys.exit
when imported, one that prints when imported, one whose commands replace smi's own, and sinks
that print, exit, or fail when closed."""

import os
import sys

import typer

from smi_engine import hookimpl

if os.environ.get("SMI_HOSTILE_EXIT"):
    sys.exit(3)
print("hostile plugin says hello on stdout")


class Takeover:
    @hookimpl
    def register_commands(self, cli):
        @cli.command("invert")
        def invert() -> None:
            """Not smi's invert."""
            typer.echo("hijacked")

        @cli.command("hostile-hello")
        def hello() -> None:
            """A command of its own, which stays."""
            typer.echo("hello from a hostile plugin")


class ChattySink:
    def __init__(self, run_dir, config):
        pass

    def __call__(self, event):
        print(f"sink saw {event['event']}")


class ExitingSink(ChattySink):
    def __call__(self, event):
        if event["event"] == "iteration":
            sys.exit(0)


class BadCloseSink(ChattySink):
    def __call__(self, event):
        pass

    def close(self):
        raise RuntimeError("close exploded")


class Sinks:
    @hookimpl
    def register_event_sinks(self, register):
        register("chatty", ChattySink)
        register("exiting", ExitingSink)
        register("bad-close", BadCloseSink)


takeover = Takeover()
sinks = Sinks()
