"""The ``leadstream`` command line: one subcommand per job, each a thin call into a module."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from streams.settings import Settings, SettingsError, describe


def _up(args: argparse.Namespace, settings: Settings) -> int:
    from streams import stack

    stack.up(settings)
    return 0


def _down(args: argparse.Namespace, settings: Settings) -> int:
    from streams import stack

    stack.down(settings)
    return 0


def _run(func: Callable[[argparse.Namespace, Settings], int], args: argparse.Namespace, settings: Settings) -> int:
    """Known failures (a service that does not start, a bad scoring config) as one clear line, no traceback."""
    from models.rules import ConfigError
    from streams.clients import ConnectionCheckError
    from streams.settings import SettingsError
    from streams.stack import StackError

    try:
        return int(func(args, settings) or 0)
    except SettingsError as exc:
        print(f"leadstream {args.command}: bad setting: {exc}", file=sys.stderr)
        return 2
    except (StackError, ConnectionCheckError) as exc:
        print(f"leadstream {args.command}: {exc}", file=sys.stderr)
    except ConfigError as exc:
        print(f"leadstream {args.command}: {exc} (file {settings.scoring_config}, set by LEADSTREAM_SCORING_CONFIG)",
              file=sys.stderr)
    return 1


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from streams.worker import run_worker

    return run_worker(settings, loglevel=args.loglevel)


def _api(args: argparse.Namespace, settings: Settings) -> int:
    from streams.api import run_api

    return run_api(settings)


def _lead(args: argparse.Namespace, settings: Settings) -> int:
    from streams.reports import print_lead

    return print_lead(settings, args.lead_id)


def _simulate(args: argparse.Namespace, settings: Settings) -> int:
    from streams.publish import run_simulation

    return run_simulation(settings, leads=args.leads, rate=args.rate, seed=args.seed, speedup=args.speedup)


def _import(args: argparse.Namespace, settings: Settings) -> int:
    from streams.publish import run_import

    return run_import(settings, args.file, args.mapping, args.delimiter)


def _forget(args: argparse.Namespace, settings: Settings) -> int:
    from streams.publish import run_forget

    return run_forget(settings, args.lead_ids)


def _evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from streams.offline import run_evaluate

    if args.model_kind != "tournament":  # the default needs no check: importing the learners (River, SciPy,
        from models.learner import MODEL_KINDS  # ~2.5 s) here would hold back the replay, which starts first

        if args.model_kind not in MODEL_KINDS:
            print(f"leadstream evaluate: --model-kind {args.model_kind!r}: expected one of {', '.join(MODEL_KINDS)}",
                  file=sys.stderr)
            return 2
    if args.batch_every < 0:
        print(f"leadstream evaluate: --batch-every {args.batch_every}: expected a whole number >= 1", file=sys.stderr)
        return 2
    return run_evaluate(args.file, args.mapping, settings.scoring_config, as_json=args.json,
                        min_outcomes=settings.model_min_outcomes, model_kind=args.model_kind,
                        batch_every=args.batch_every or settings.model_batch_every, delimiter=args.delimiter)


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from streams.demo import run_demo

    return run_demo(settings, leads=args.leads, rate=args.rate, seed=args.seed)


def _model(args: argparse.Namespace, settings: Settings) -> int:
    from streams.reports import print_model

    return print_model(settings)


def _funnel(args: argparse.Namespace, settings: Settings) -> int:
    from streams.reports import print_funnel

    return print_funnel(settings, args.stall_days, args.json)


def _bench(args: argparse.Namespace, settings: Settings) -> int:
    from streams import bench

    return bench.main(args, settings)


def _rebuild_views(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from streams.clients import redis_client
    from streams.views import rebuild_views

    async def run() -> dict:
        client = redis_client(settings)
        try:
            return await rebuild_views(client, settings.rescore_every_s * 1000)
        finally:
            await client.aclose()

    result = asyncio.run(run())
    print(f"rebuilt the read models of {result['leads']} leads over {result['shards']} shards "
          f"({result['view_keys_deleted']} view keys replaced)")
    return 0


def _settings(args: argparse.Namespace, settings: Settings) -> int:
    print(describe())
    return 0


def _at_least_one(text: str) -> int:
    """An argparse type: a whole number >= 1 (argparse names the option in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leadstream", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable[[argparse.Namespace, Settings], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    add("up", _up, "Start the local Kafka (KRaft) and Redis unless LEADSTREAM_KAFKA / LEADSTREAM_REDIS point elsewhere.")
    add("down", _down, "Stop what `leadstream up` started (by its pid files).")
    w = add("worker", _worker, "Run the scoring and training agents.")
    w.add_argument("--loglevel", default="info")
    add("api", _api, "Serve the dashboard, the read API, webhook ingest (POST /events) and metrics "
                     "on LEADSTREAM_API_PORT (docs/api.md).")
    lead = add("lead", _lead, "Print a lead's state, score, grade and reasons from Redis.")
    lead.add_argument("lead_id")
    sim = add("simulate", _simulate, "Publish a realistic simulated event stream (deterministic for a seed).")
    sim.add_argument("--leads", type=int, default=200)
    sim.add_argument("--rate", type=float, default=200.0, help="events per second (0 = as fast as possible)")
    sim.add_argument("--seed", type=int, default=7)
    sim.add_argument("--speedup", type=float, default=0.0,
                     help="simulated seconds per real second (0 = use --rate only)")
    imp = add("import", _import, "Publish a historical export (CSV or JSON Lines) as contract events.")
    imp.add_argument("file")
    imp.add_argument("--mapping", required=True)
    imp.add_argument("--delimiter", default=",", help="CSV value separator: ',' (default), ';' (European CRM "
                                                       "exports), or 'tab'")
    fg = add("forget", _forget, "Erase leads (right to erasure): publish a lead_deleted for each; the worker removes "
                                "them from every Redis key, views included, and sends a tombstone to the scores topic.")
    fg.add_argument("lead_ids", nargs="+")
    ev = add("evaluate", _evaluate, "Replay a history offline through the stream's code, test-then-train.")
    ev.add_argument("file")
    ev.add_argument("--mapping", required=True)
    ev.add_argument("--json", action="store_true", help="print one machine-readable JSON object")
    ev.add_argument("--delimiter", default=",", help="CSV value separator: ',' (default), ';' or 'tab'")
    ev.add_argument("--model-kind", default="tournament",
                    help="tournament (every learner competes, the champion is served: what the stream runs), "
                         "or one learner alone: logreg, hoeffding, forest, naive_bayes")
    ev.add_argument("--batch-every", type=int, default=0,
                    help="deals between two refits of the batch learner batch_hgb (the vendors' cadence); "
                         "default LEADSTREAM_MODEL_BATCH_EVERY")
    demo = add("demo", _demo, "Start the stack and a worker, stream simulated traffic, and show scores.")
    demo.add_argument("--leads", type=int, default=300)
    demo.add_argument("--rate", type=float, default=500.0)
    demo.add_argument("--seed", type=int, default=None, help="default: a fresh seed each run")
    add("model", _model, "Print the model's version, prequential accuracy (rules vs model, per stage), "
                         "per-stage win rates, calibration table and drift count.")
    fun = add("funnel", _funnel, "Funnel diagnostics: leads per stage, where they stall, conversion to the next "
                                 "stage, learned win rates, reply rate, time to close.")
    fun.add_argument("--stall-days", type=float, default=14.0, help="no stage move for this long = stalled")
    fun.add_argument("--json", action="store_true")
    b = add("bench", _bench, "Measure throughput (against a plain aiokafka passthrough in the same run), latency, "
                             "the pure step, Redis memory per lead and read times, against the running stack.")
    b.add_argument("--leads", type=int, default=1000, help="simulated leads of the burst (about 30 events each)")
    b.add_argument("--rates", default="500,1000,2000,5000", help="steady offered rates (events/s) for the latency runs")
    b.add_argument("--seconds", type=float, default=8.0, help="length of each latency run")
    b.add_argument("--memory-leads", type=int, default=10_000, help="leads written for the memory and read runs")
    b.add_argument("--redis-db", type=int, default=14, help="Redis database the benchmark uses and flushes")
    b.add_argument("--reader-rate", type=float, default=1000.0,
                   help="offered events/s while a reader loads the dashboard every second (one of --rates)")
    b.add_argument("--promotion-rate", type=float, default=2000.0,
                   help="part 'promotion': offered events/s without and during a worker's model rescoring pass")
    b.add_argument("--rescore-rate", type=int, default=5000,
                   help="part 'promotion': the worker's LEADSTREAM_RESCORE_RATE (a high one shows its capacity; "
                        "5,000 leads/s is issue 9's target)")
    b.add_argument("--read-leads", type=int, default=1_000_000,
                   help="leads put in Redis for the read benchmark (part 'reads'; a million take about 3.5 GB: "
                        "point LEADSTREAM_REDIS at a scratch Redis)")
    b.add_argument("--only", default="step,pipeline,memory",
                   help="parts to run: step, pipeline, burst (passthrough and one worker only), memory, reads "
                        "(reads: populates --read-leads leads), rescoring (populates --read-leads leads and times "
                        "a model rescoring pass; Redis only), promotion (populates --read-leads leads; a worker's "
                        "model pass, and its event latency without and during one)")
    b.add_argument("--pairs", type=_at_least_one, default=1,
                   help="part 'burst': passthrough and burst alternated this many times; each pair's ratio, and "
                        "the lowest pair as the figures ('>= 20%% of the passthrough in every run')")
    b.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    add("rebuild-views", _rebuild_views, "Recompute every read model (leaderboards, funnel, owners) from the lead "
                                         "hashes: repair after a bug or a restore.")
    add("settings", _settings, "List every LEADSTREAM_* setting with its default.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"leadstream: bad setting: {exc}", file=sys.stderr)
        return 2
    return _run(args.func, args, settings)


if __name__ == "__main__":
    sys.exit(main())
