"""`lmforge ...`: the front door. The one core module that hands work to a stage.

Training stages run as modules (`torchrun -m pretrain ...`) so that launchers can start them; the
commands here are the ones that are not training processes.
"""

from __future__ import annotations

import argparse
import sys

COMMANDS = {
    "tokenize": ("pretrain.tokenize", "train or load a tokenizer and write token shards"),
    "export": ("lmforge.checkpoint", "build a Hugging Face folder from a training run's checkpoint"),
    "push": ("lmforge.hub", "upload an exported Hugging Face folder to the Hub (a branch per --revision)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="lmforge", description="Raw text to published language models. `lmforge COMMAND --help` for more.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {name:10s} {doc}" for name, (_, doc) in COMMANDS.items())
        + "\n\ntraining stages run under a launcher: torchrun --nproc_per_node=N -m pretrain CONFIG.yaml",
    )
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args = parser.parse_args(argv[:1])
    module = __import__(COMMANDS[args.command][0], fromlist=["main"])
    return module.main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
