"""`lmforge ...`: the front door. The one core module that hands work to a stage.

Training stages run as modules (`torchrun -m pretrain ...`) so that launchers can start them; the
commands here are the ones that are not training processes.
"""

from __future__ import annotations

import argparse
import sys

COMMANDS = {
    "tokenize": ("pretrain.tokenize", "train or load a tokenizer and write token shards"),
    "inspect": ("lmforge.data.inspect", "what a token folder holds: counts, tokenizer, sources, a decoded sample"),
    "export": ("lmforge.checkpoint", "build a Hugging Face folder from a training run's checkpoint"),
    "push": ("lmforge.hub", "upload an exported Hugging Face folder to the Hub (a branch per --revision)"),
    "run": ("lmforge.pipeline", "run a pipeline's stages on this machine, skipping finished ones"),
    "submit": ("lmforge.slurm", "submit a pipeline to Slurm: one job per stage, chained with afterok"),
    "status": ("lmforge.pipeline:status_main", "each stage of a pipeline: done, running, waiting or failed"),
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
    name, _, function = COMMANDS[args.command][0].partition(":")
    module = __import__(name, fromlist=["main"])
    return getattr(module, function or "main")(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
