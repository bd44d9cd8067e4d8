"""`treegrpo` command line: train, eval, rollout, report, credit, serve-retriever, serve-policy, config show.

User-facing errors (bad config, data, paths, unreachable services) print one line and exit 2;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from treegrpo.errors import UserError
from treegrpo.runlock import is_main_launch_process, run_dir_lock


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (merged over the preset)")
    p.add_argument("--preset", help="built-in preset (default: quickstart)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, e.g. --set rollout.m=4 --set trainer.lr=1e-5 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="treegrpo", description="Tree-GRPO for tool-using LLM agents")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("train", help="train an agent (default: the quickstart preset)")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the run's latest complete checkpoint")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of progress bars")

    p = sub.add_parser("eval", help="greedy exact-match evaluation of a model on the eval split")
    _add_config_args(p)
    p.add_argument("--checkpoint", help="checkpoint or model directory (default: the run's latest)")
    p.add_argument(
        "--backend", choices=["hf", "vllm", "openai"], help="generation backend (= --set policy.backend=…)"
    )
    p.add_argument("--base-url", help="openai backend: the server, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-model", help="openai backend: served model name (default: the first one listed)")

    p = sub.add_parser("rollout", help="sample trees and write them as JSON lines")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="output .jsonl path")
    p.add_argument("--prompts", type=int, default=4, help="number of prompts to sample trees for")
    p.add_argument("--checkpoint", help="checkpoint or model directory (default: the warm-started model)")

    p = sub.add_parser("report", help="write RUN_DIR/report.html and print a text summary")
    p.add_argument("run_dir", help="a run directory (runs/<name>)")

    p = sub.add_parser(
        "credit", help="measure per-step credit against Monte-Carlo truth; writes RUN_DIR/credit.json"
    )
    p.add_argument("run_dir", help="a run directory (runs/<name>); its latest checkpoint is used")
    p.add_argument("--k", type=int, default=16, help="extra rollouts per node for its value (default 16)")
    p.add_argument(
        "--prompts", type=int, default=8, help="training prompts to sample forests for (default 8)"
    )
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("serve-retriever", help="serve a BM25 index over the Search-R1 retrieval protocol")
    p.add_argument("--corpus", required=True, help="jsonl corpus ({id,title,text} or {id,contents})")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0 = any free port)")
    p.add_argument("--cache-dir", default=".cache/treegrpo", help="where the BM25 index is cached")
    p.add_argument("--max-queries", type=int, default=4096, help="queries per request (more: 413)")
    p.add_argument("--max-topk", type=int, default=100, help="largest topk a request may ask for (more: 400)")
    p.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024, help="request body limit (413)")
    p.add_argument("--body-timeout", type=float, default=10.0, help="seconds to receive a body (else 408)")

    p = sub.add_parser("serve-policy", help="serve the policy over an OpenAI-compatible completions API")
    _add_config_args(p)
    p.add_argument("--checkpoint", help="checkpoint or model directory (default: the run's latest)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (0 = any free port, printed at start)")
    p.add_argument("--prefix-cache-tokens", type=int, help="KV prefix cache size in tokens (default 32768)")
    p.add_argument("--max-batch-rows", type=int, help="prompts batched into one generate call (default 64)")

    p = sub.add_parser("config", help="configuration helpers")
    csub = p.add_subparsers(dest="config_command")
    show = csub.add_parser("show", help="print the effective config as YAML")
    _add_config_args(show)
    return parser


def _check_explicit_checkpoint(checkpoint: str | None) -> None:
    """`--checkpoint DIR` of a treegrpo checkpoint (it has a manifest) must be intact: no fallback here,
    the user named this one. Plain model directories (no manifest) are loaded as they are."""
    from treegrpo.checkpoint import MANIFEST, CheckpointError, verify_checkpoint

    if checkpoint and (Path(checkpoint) / MANIFEST).is_file():
        problem = verify_checkpoint(Path(checkpoint))
        if problem:
            raise CheckpointError(f"--checkpoint {checkpoint}: damaged ({problem})")


def _run(args: argparse.Namespace) -> int:
    from treegrpo.config import load_config

    if args.command in (None, "train"):
        cfg = load_config(
            getattr(args, "config", None), getattr(args, "overrides", []), getattr(args, "preset", None)
        )
        with contextlib.ExitStack() as stack:
            if is_main_launch_process():  # before anything (warm start, config.yaml) is written
                stack.enter_context(run_dir_lock(cfg.run_dir))
            from treegrpo.trainer import train  # after the lock: a refused run exits before heavy imports

            train(
                cfg, resume=getattr(args, "resume", False), progress=not getattr(args, "no_progress", False)
            )
        return 0
    if args.command == "eval":
        from treegrpo.commands import evaluate_cli

        flags = [("backend", args.backend), ("base_url", args.base_url), ("api_model", args.api_model)]
        extra = [f"policy.{k}={v}" for k, v in flags if v is not None]
        cfg = load_config(args.config, [*args.overrides, *extra], args.preset)
        _check_explicit_checkpoint(args.checkpoint)
        evaluate_cli(cfg, checkpoint=args.checkpoint)
        return 0
    if args.command == "rollout":
        from treegrpo.commands import rollout_cli

        cfg = load_config(args.config, args.overrides, args.preset)
        _check_explicit_checkpoint(args.checkpoint)
        rollout_cli(cfg, out=args.out, num_prompts=args.prompts, checkpoint=args.checkpoint)
        return 0
    if args.command == "report":
        from treegrpo.report import report_cli

        return report_cli(args.run_dir)
    if args.command == "credit":
        from treegrpo.credit.report import credit_cli

        return credit_cli(args.run_dir, k=args.k, prompts=args.prompts, seed=args.seed)
    if args.command == "serve-retriever":
        from treegrpo.retrievers import BM25Retriever
        from treegrpo.retrievers.server import ServerLimits, bind_socket, serve

        limits = ServerLimits(
            max_body_bytes=args.max_body_bytes,
            max_queries=args.max_queries,
            max_topk=args.max_topk,
            body_timeout=args.body_timeout,
        )
        for name in ("max_body_bytes", "max_queries", "max_topk", "body_timeout"):
            if not getattr(limits, name) > 0:
                raise UserError(f"--{name.replace('_', '-')}: must be > 0, got {getattr(limits, name)}")
        if not 0 <= args.port <= 65535:
            raise UserError(f"--port: must be in [0, 65535], got {args.port}")
        if not Path(args.corpus).is_file():
            raise UserError(f"--corpus: {args.corpus} does not exist")
        sock = bind_socket(args.host, args.port)  # a busy port fails now, not after indexing
        retriever = BM25Retriever(corpus_path=args.corpus, cache_dir=args.cache_dir)
        serve(retriever, host=args.host, port=args.port, limits=limits, label=args.corpus, sock=sock)
        return 0
    if args.command == "serve-policy":
        from treegrpo.policy_server import serve_policy_cli

        cfg = load_config(args.config, args.overrides, args.preset)
        serve_policy_cli(
            cfg,
            args.checkpoint,
            host=args.host,
            port=args.port,
            prefix_cache_tokens=args.prefix_cache_tokens,
            max_batch_rows=args.max_batch_rows,
        )
        return 0
    if args.command == "config":
        if args.config_command != "show":
            raise UserError("config: use `treegrpo config show [--config FILE] [--set KEY=VALUE]`")
        cfg = load_config(args.config, args.overrides, args.preset)
        sys.stdout.write(cfg.to_yaml())
        return 0
    raise UserError(f"unknown command {args.command!r}")


def _one_line_warning(message: Warning | str, category: type[Warning], *args: object, **kw: object) -> str:
    """Warnings (e.g. a skipped non-finite step) as `warning: ...` lines, not source excerpts."""
    return f"warning: {str(message).strip().splitlines()[0] if str(message).strip() else category.__name__}\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    saved_format = warnings.formatwarning
    if not args.debug:
        warnings.formatwarning = _one_line_warning
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place that turns errors into exit codes
        if args.debug:
            raise
        if isinstance(e, UserError | FileNotFoundError | PermissionError):
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"error: {msg}", file=sys.stderr)
            return 2
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"error: {type(e).__name__}: {first} (run with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = saved_format


if __name__ == "__main__":
    sys.exit(main())
