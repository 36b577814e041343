"""The `kubetrain` command. Subcommands import their side lazily: the operator image has no torch."""

from __future__ import annotations

import argparse
import sys


def _run(args: argparse.Namespace) -> int:
    from kubetrain_api.manifest import load_manifest

    job = load_manifest(args.manifest)  # a bad manifest is reported before torch takes its seconds to load
    from kubetrain_trainer.run.pipeline import run

    return run(job, args.output, args.nproc, args.prompt)


def _prepare(args: argparse.Namespace) -> int:
    import shutil
    import tempfile
    from pathlib import Path

    from kubetrain_trainer import preparation as datamod
    from kubetrain_trainer.tokenizer import load_tokenizer, train_bpe

    files = [f for spec in args.input for f in datamod.resolve_inputs(spec, "--input")]
    val_files = [f for spec in args.validation for f in datamod.resolve_inputs(spec, "--validation")] or None
    split = None if val_files else args.validation_split
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    else:
        tokenizer = train_bpe(datamod.iter_training_texts(files, args.text_field, split, 500_000_000),
                              args.train_tokenizer)
    remote = args.output.startswith("s3://")  # prepare locally, then upload (endpoint: AWS_ENDPOINT_URL_S3)
    local = Path(tempfile.mkdtemp(prefix="kubetrain-prepare-")) / "data" if remote else Path(args.output)
    stats = datamod.prepare(files, tokenizer, local, validation_files=val_files,
                            validation_split=split or 0.0, text_field=args.text_field,
                            min_document_chars=args.min_document_chars)
    if remote:
        from kubetrain_api.config import S3Spec

        datamod.upload_prepared(local, args.output, S3Spec())
        shutil.rmtree(local.parent, ignore_errors=True)
    print(f"wrote {args.output}: {stats.documents['train']} train / {stats.documents['validation']} validation "
          f"documents, {stats.tokens['train']:,} / {stats.tokens['validation']:,} tokens; dropped "
          f"{stats.documents_dropped_small} tiny and {stats.documents_duplicate} duplicate documents")
    return 0


def _crd(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kubetrain_operator.crd import crd_yaml

    text = crd_yaml()
    if not args.write:
        sys.stdout.write(text)
        return 0
    for path in args.write:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _render(args: argparse.Namespace) -> int:
    import yaml
    from kubetrain_api.manifest import ManifestError, load_manifest
    from kubetrain_operator.render import JobRef, render_objects
    from kubetrain_operator.validate import validate_job

    job = load_manifest(args.manifest)
    checked = validate_job(job.metadata.name, job.spec.to_wire())
    if checked.spec is None or checked.error is not None:
        raise ManifestError(f"{args.manifest}: the operator would fail this job (InvalidSpec)\n{checked.error}")
    for warning in checked.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    extra = job.metadata.model_extra or {}
    labels: dict[str, str] = extra["labels"] if isinstance(extra.get("labels"), dict) else {}
    uid: str = extra["uid"] if isinstance(extra.get("uid"), str) else "00000000-0000-0000-0000-000000000000"
    ref = JobRef(job.metadata.name, args.namespace or job.metadata.namespace or "default", uid, labels)
    sys.stdout.write(f"# What the kubetrain operator creates for LLMTrainingJob {ref.namespace}/{ref.name}"
                     f" (uid {uid}).\n")
    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:  # the trainer config reads as JSON
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    Dumper.add_representer(str, text)
    sys.stdout.write(yaml.dump_all(render_objects(ref, checked.spec), Dumper=Dumper, sort_keys=False, width=120))
    return 0


def _operator(args: argparse.Namespace) -> int:
    from kubetrain_operator.runner import main as run_operator

    if not args.namespace and not args.all_namespaces:
        raise SystemExit("kubetrain operator: give --namespace NS (repeatable) or --all-namespaces")
    election = None
    if args.leader_elect:
        from kubetrain_operator.leader import ElectionConfig, default_namespace

        try:
            election = ElectionConfig(name=args.lease_name, namespace=args.lease_namespace or default_namespace(),
                                      lease_seconds=args.lease_duration,
                                      renew_deadline_seconds=args.lease_duration * 2 / 3,
                                      retry_seconds=max(0.2, args.lease_duration / 7.5))
        except ValueError as exc:
            raise SystemExit(f"kubetrain operator: --lease-duration: {exc}") from None
    return run_operator(args.namespace, args.all_namespaces, args.liveness_port, args.metrics_port, args.verbose,
                        election, args.unhealthy_after)


def _operator_uninstall(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from kubetrain_operator.leader import default_namespace
    from kubetrain_operator.runner import StartupError
    from kubetrain_operator.uninstall import uninstall

    if not args.namespace and not args.all_namespaces:
        raise SystemExit("kubetrain operator-uninstall: give --namespace NS (repeatable) or --all-namespaces")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(uninstall(args.deployment_namespace or default_namespace(), args.deployment,
                                     args.lease_name, None if args.all_namespaces else args.namespace, args.timeout))
    except StartupError as exc:
        raise SystemExit(str(exc)) from None


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

    p = sub.add_parser("crd", help="print the LLMTrainingJob CustomResourceDefinition (generated from the models)")
    p.add_argument("--write", action="append", metavar="PATH", help="write it to PATH instead (repeatable)")
    p.set_defaults(func=_crd)

    p = sub.add_parser("render", help="print the objects the operator would create for a manifest")
    p.add_argument("manifest", help="LLMTrainingJob YAML file")
    p.add_argument("--namespace", help="namespace (default: metadata.namespace, else default)")
    p.set_defaults(func=_render)

    p = sub.add_parser("operator", help="run the Kubernetes operator (Kopf)")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[], help="namespace to serve (repeatable)")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="serve every namespace")
    # The chart's defaults too; not 9090, Prometheus' own port (an operator beside it could not start).
    p.add_argument("--metrics-port", type=int, default=8080,
                   help="the operator's /metrics and /healthz (503 once the API server stops answering)")
    p.add_argument("--liveness-port", type=int, default=8081, help="Kopf liveness endpoint /healthz (0: off)")
    p.add_argument("--unhealthy-after", type=float, default=60.0, metavar="SECONDS",
                   help="/healthz says 503 after the API server has not answered for this long")
    p.add_argument("--leader-elect", action="store_true",
                   help="high availability: only the replica holding a coordination.k8s.io Lease is active")
    p.add_argument("--lease-name", default="kubetrain-operator", help="the Lease's name")
    p.add_argument("--lease-namespace", help="the Lease's namespace (default: $POD_NAMESPACE, else the pod's own)")
    p.add_argument("--lease-duration", type=int, default=15,
                   help="seconds a standby waits for an unrenewed Lease before taking over (renewal: every 2 s)")
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=_operator)

    p = sub.add_parser("operator-uninstall", help="stop the operator's Deployment and remove its finalizer from "
                       "the jobs (the Helm chart's pre-delete hook)")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[], help="namespace served (repeatable)")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="the operator serves every namespace")
    p.add_argument("--deployment", required=True, help="the operator's Deployment")
    p.add_argument("--deployment-namespace", help="its namespace (default: $POD_NAMESPACE, else the pod's own)")
    p.add_argument("--lease-name", default="kubetrain-operator", help="the operator's Lease, beside the Deployment")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the replicas to stop")
    p.set_defaults(func=_operator_uninstall)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except Exception as exc:
        # Errors the user can fix get one clear line and exit code 2; anything else is a bug: traceback.
        from kubetrain_api.exit_codes import EXIT_CONFIG
        from kubetrain_api.manifest import ManifestError

        user_errors: tuple[type[BaseException], ...] = (ManifestError,)
        try:  # the operator's image has no trainer
            from kubetrain_trainer.errors import ConfigError

            user_errors += (ConfigError,)
        except ImportError:
            pass
        if isinstance(exc, user_errors):
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        raise


if __name__ == "__main__":
    sys.exit(main())
