"""`microserve <command> --help`: every flag of every subcommand says what it does and its default."""

from __future__ import annotations

import argparse

import pytest

from microserve.cli import HelpFormatter, build_parser


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _documented(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def _shown_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The action's help as `--help` prints it, defaults filled in."""
    return parser._get_formatter()._expand_help(action)


def test_every_subcommand_is_covered():
    assert {"generate", "engine", "router", "serve", "bench"} <= set(_subparsers())


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_every_flag_says_what_it_does_and_its_default(command):
    parser = _subparsers()[command]
    assert issubclass(parser.formatter_class, HelpFormatter)
    parser.format_help()  # a stray % in a help text would raise here
    for action in _documented(parser):
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{command} {name} has no help"
        if not action.option_strings or action.nargs == 0:
            continue  # positionals are required; a switch's default is "not given"
        shown = _shown_help(parser, action)
        assert "default" in shown.lower(), f"{command} {name} does not say its default: {shown!r}"
        if "default" not in action.help.lower():  # the formatter added it: the real value
            assert f"(default: {action.default})" in shown, shown


def test_the_formatter_adds_a_default_only_where_the_text_lacks_one():
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    plain = parser.add_argument("--n", type=int, default=3, help="how many")
    worded = parser.add_argument("--m", default=None, help="a model (default: the built-in one)")
    switch = parser.add_argument("--x", action="store_true", help="turn it on")
    assert _shown_help(parser, plain) == "how many (default: 3)"
    assert _shown_help(parser, worded) == "a model (default: the built-in one)"
    assert _shown_help(parser, switch) == "turn it on"
