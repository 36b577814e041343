"""The `kubetrain` command. Subcommands import their side lazily: the operator image has no torch."""

from __future__ import annotations

import argparse
import sys


def _run(args: argparse.Namespace) -> int:
    from kubetrain_trainer.launcher import run

    return run(args.manifest, args.output, args.nproc, args.prompt)


def _prepare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kubetrain_trainer import data as datamod
    from kubetrain_trainer.tokenizer import load_tokenizer, train_bpe

    files = [f for spec in args.input for f in datamod.resolve_inputs(spec, "--input")]
    val_files = [f for spec in args.validation for f in datamod.resolve_inputs(spec, "--validation")] or None
    split = None if val_files else args.validation_split
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    else:
        tokenizer = train_bpe(datamod.iter_training_texts(files, args.text_field, split, 500_000_000),
                              args.train_tokenizer)
    stats = datamod.prepare(files, tokenizer, Path(args.output), validation_files=val_files,
                            validation_split=split or 0.0, text_field=args.text_field,
                            min_document_chars=args.min_document_chars)
    print(f"wrote {args.output}: {stats.documents['train']} train / {stats.documents['validation']} validation "
          f"documents, {stats.tokens['train']:,} / {stats.tokens['validation']:,} tokens; dropped "
          f"{stats.documents_dropped_small} tiny and {stats.documents_duplicate} duplicate documents")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubetrain", description="Train Llama-style models from one manifest.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run an LLMTrainingJob manifest on this machine (no cluster)")
    p.add_argument("manifest", help="LLMTrainingJob YAML file")
    p.add_argument("--output", help="output directory (default ./runs/<job name>)")
    p.add_argument("--nproc", type=int, help="processes (default: spec.workers.procPerNode)")
    p.add_argument("--prompt", help="prompt for the sample (default: the start of the validation text)")
    p.set_defaults(func=_run)

    p = sub.add_parser("prepare", help="clean, de-duplicate and tokenise text into training shards")
    p.add_argument("--input", action="append", required=True, help="file, directory, glob or corpus://name")
    p.add_argument("--validation", action="append", default=[], help="validation inputs (else a split)")
    p.add_argument("--validation-split", type=float, default=0.01)
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", help="HF tokenizer dir, tokenizer.json or SentencePiece .model")
    tok.add_argument("--train-tokenizer", type=int, metavar="VOCAB", help="train a byte-level BPE of this size")
    p.add_argument("--text-field", default="text")
    p.add_argument("--min-document-chars", type=int, default=32)
    p.add_argument("--output", required=True)
    p.set_defaults(func=_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except Exception as exc:
        # Errors the user can fix get one clear line and exit code 2; anything else is a bug: traceback.
        from kubetrain_trainer.errors import ConfigError

        user_errors: tuple[type[BaseException], ...] = (ConfigError,)
        try:
            from kubetrain_operator.spec import ManifestError

            user_errors += (ManifestError,)
        except ImportError:
            pass
        if isinstance(exc, user_errors):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
