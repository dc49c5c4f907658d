"""The command line every stage shares: CONFIG.yaml, key=value overrides, --dry-run, --help."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TypeVar

from pydantic import BaseModel

from lmforge.config.describe import config_help
from lmforge.config.loader import ConfigError, load_config

M = TypeVar("M", bound=BaseModel)


def parse_command(prog: str, schema: type[M], argv: Sequence[str] | None, description: str,
                  extra: dict[str, dict] | None = None, example: str = "split.val_fraction=0.05"
                  ) -> tuple[M, argparse.Namespace]:
    """Parse `CONFIG [key=value ...] [--dry-run]`; a bad config prints its errors and exits with 2."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=config_help(schema),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help=f"override a config value (validated like the file), e.g. {example}")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the fully resolved config and exit without doing any work")
    for flag, kwargs in (extra or {}).items():
        parser.add_argument(flag, **kwargs)
    args = parser.parse_intermixed_args(argv)  # `CONFIG --dry-run key=value` as well as `CONFIG key=value --dry-run`
    try:
        config = load_config(args.config, schema, args.overrides)
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return config, args
