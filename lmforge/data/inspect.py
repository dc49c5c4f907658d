"""`lmforge inspect DATA_DIR`: what a token folder holds, and a decoded sample, without writing a script.

    lmforge inspect runs/demo/data                      # counts, tokenizer, sources, a sample of train
    lmforge inspect runs/demo/data --split val --document 3 --tokens 200

Reads meta.json and one shard window (memory-mapped); decodes with the folder's own tokenizer.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmforge.data.shards import ShardError, TokenShards, read_meta
from lmforge.data.sources import describe_bytes


def report(data_dir: Path, split: str = "train", document: int = 0, tokens: int = 128) -> str:
    """The report as text; raises ShardError for a folder that is not a finished token folder."""
    meta = read_meta(data_dir)
    tok = meta["tokenizer"]
    lines = [f"{data_dir}: {meta['format']}, ids as {meta['dtype']}, {describe_bytes(meta.get('bytes', 0))} of text "
             "tokenized",
             f"tokenizer: {data_dir / tok['path']} (vocab {tok['vocab_size']:,}, EOS {tok['eos_token']!r} = "
             f"{tok['eos_id']}, hash {tok['hash']})",
             f"{'split':<8}{'documents':>14}{'tokens':>18}{'shards':>9}{'tokens/doc':>12}"]
    for name, info in meta["splits"].items():
        per_doc = info["tokens"] / info["documents"] if info["documents"] else 0
        lines.append(f"{name:<8}{info['documents']:>14,}{info['tokens']:>18,}{len(info['shards']):>9,}{per_doc:>12,.0f}")
    for entry in meta.get("per_source") or [{"source": s} for s in meta.get("sources", [])]:
        counts = (f": {entry['documents']:,} documents, {entry['tokens']:,} tokens" if "documents" in entry else "")
        lines.append(f"source {entry['source']}{counts}")
    skipped = ", ".join(f"{k} {v:,}" for k, v in meta.get("skipped", {}).items()) or "none"
    lines.append(f"skipped: {skipped}; long documents split: {meta.get('split_documents', 0):,}; invalid UTF-8 "
                 f"replaced in {meta.get('utf8_replaced_documents', 0):,} documents; dedup: {meta.get('dedup', 'none')}")
    for path, why in list(meta.get("skipped_files", {}).items())[:5]:
        lines.append(f"  skipped file {path}: {why}")

    data = TokenShards(data_dir, split)
    if data.num_documents == 0:
        lines.append(f"the {split} split is empty")
        return "\n".join(lines)
    if not 0 <= document < data.num_documents:
        raise ShardError(f"--document {document}: the {split} split has documents 0..{data.num_documents - 1}")
    ids = data.document(document)[:tokens].tolist()
    from tokenizers import Tokenizer

    lines += [f"sample: {split} document {document:,} of {data.num_documents:,}, its first {len(ids)} tokens:",
              f"ids: {ids[:24]}{' ...' if len(ids) > 24 else ''}"]
    path = data_dir / tok["path"] / "tokenizer.json"
    try:
        lines += ["text:", Tokenizer.from_file(str(path)).decode(ids, skip_special_tokens=False)]
    except Exception as e:  # tokenizers raises a bare Exception for a missing or unreadable file
        lines.append(f"(no decoded text: cannot load {path}: {e})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmforge inspect", description=__doc__.split("\n")[0])
    parser.add_argument("data_dir", type=Path, help="a token folder (`lmforge tokenize`'s out_dir)")
    parser.add_argument("--split", default="train", choices=["train", "val"], help="split to sample from")
    parser.add_argument("--document", type=int, default=0, help="which document of the split to decode")
    parser.add_argument("--tokens", type=int, default=128, help="how many of its tokens to decode")
    parser.add_argument("--json", action="store_true", help="print meta.json's counts as JSON instead")
    args = parser.parse_args(argv)
    try:
        if args.json:
            meta = read_meta(args.data_dir)
            print(json.dumps({k: meta.get(k) for k in ("dtype", "tokenizer", "bytes", "per_source", "skipped",
                                                       "dedup")}
                             | {"splits": {s: {k: v for k, v in i.items() if k != "shards"}
                                           for s, i in meta["splits"].items()}}, indent=1))
        else:
            print(report(args.data_dir, args.split, args.document, args.tokens))
    except (ShardError, OSError) as e:
        print(f"lmforge inspect: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
