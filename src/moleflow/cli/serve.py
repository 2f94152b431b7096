"""`moleflow serve`: an HTTP service (FastAPI + uvicorn) that routes, scores and decides images."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ..errors import MoleflowError
from ..serve.auth import ENV_TOKEN, exposure_warning, parse_tokens

log = logging.getLogger(__name__)

EXAMPLES = """examples:
  moleflow serve runs/real                              # http://127.0.0.1:8000 (review page), /docs (API)
  moleflow serve runs/real --host 0.0.0.0 --port 8080 --max-batch 16 --max-wait-ms 5
  moleflow serve runs/real --workers 2 --threads 1      # 2 processes, 1 onnxruntime thread each
  curl -F files=@part1.png -F files=@part2.png http://127.0.0.1:8000/predict
  curl --data-binary @part.png -H 'Content-Type: image/png' 'http://127.0.0.1:8000/predict?maps=true'
  moleflow serve runs/real --host 0.0.0.0 --token alice:$(openssl rand -hex 16),plc:$(openssl rand -hex 16)
  curl -H "Authorization: Bearer $TOKEN" -F files=@part1.png http://HOST:8000/predict
  moleflow serve runs/real --store postgresql://qa@db.local/line      # record verdicts in a shared database
  moleflow serve runs/real --token alice:$A,plc:$P --thumbnails --audit-rate 0.05   # the review queue at /

After `moleflow add-task`, `remove-task` or `calibrate` on the run, the service loads the new model by
itself (it watches RUN/model/manifest.json; or POST /reload); requests keep being answered meanwhile, and a
model that fails to load leaves the old one serving (GET /health shows the error). The onnx engine exports
the backbone and each product's expert to RUN/export/engine once (later starts reuse them).

Every verdict is recorded in RUN/verdicts.sqlite (image SHA-256, product, score, threshold, decision, model,
latency; --store another database, --no-store none). With --token (or MOLEFLOW_TOKEN) every endpoint but
GET /health, GET /ready and the review page's files needs 'Authorization: Bearer TOKEN' (the page asks for
the token); listening beyond 127.0.0.1 without a token logs a warning. GET /health answers 503 until the
model is loaded, and lists the products in drift alert. The review page's queue shows every flagged and
unknown-product part and --audit-rate of the passed ones; reviews feed `moleflow calibrate --from-reviews`
and `moleflow status` (README "On the line").
"""


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="HTTP service: POST images, get product, score, decision, heat map",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Serve RUN_DIR's model over HTTP with dynamic batching and hot reload.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory (or its model folder)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 = all)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    g.add_argument("--workers", type=int, default=1,
                   help="uvicorn worker processes, each with its own model (default 1); see README 'Serving'")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    g = p.add_argument_group("model")
    g.add_argument("--engine", default="onnx", choices=["onnx", "torch"],
                   help="onnx: backbone and experts in onnxruntime (default); torch: the PyTorch inspector")
    g.add_argument("--threads", type=int, help="intra-op threads per worker (default: one per core)")
    g.add_argument("--optimization", default="all", choices=["disable", "basic", "extended", "all"],
                   help="onnxruntime graph optimisation level (default all)")
    g.add_argument("--cache-dir", type=Path, help="where the onnx engine keeps its graphs (default RUN/export/engine)")
    g.add_argument("--backbone-weights", help="backbone weights file, if the run's is not found here")
    g = p.add_argument_group("batching and limits")
    g.add_argument("--max-batch", type=int, default=16, help="images per model call (default 16)")
    g.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long a batch waits for more images (default 5 ms)")
    g.add_argument("--max-queue", type=int, default=256, help="images waiting at most; then 503 (default 256)")
    g.add_argument("--max-images", type=int, default=32, help="images per request at most (default 32)")
    g.add_argument("--max-pixels", type=int, default=25_000_000,
                   help="width x height of one image at most (default 25,000,000)")
    g.add_argument("--max-body-mb", type=float, default=64.0, help="request body size at most (default 64 MiB)")
    g.add_argument("--watch-interval", type=float, default=2.0,
                   help="seconds between checks of the run's manifest for a new model (default 2; 0 = off)")
    g.add_argument("--recent", type=int, default=100, help="recent verdicts kept for the review page (default 100)")
    g = p.add_argument_group("verdict store and access (README 'On the line')")
    g.add_argument("--store", metavar="URL|FILE",
                   help="record every verdict here: a SQLAlchemy URL (postgresql://user@host/db) or a SQLite file "
                        "(default RUN_DIR/verdicts.sqlite)")
    g.add_argument("--no-store", action="store_true", help="record nothing")
    g.add_argument("--token", metavar="TOKEN|NAME:TOKEN,...",
                   help="require 'Authorization: Bearer TOKEN' on every endpoint but /health and /ready; several as "
                        f"NAME:TOKEN pairs separated by commas (default: the environment variable {ENV_TOKEN})")
    g = p.add_argument_group("review and feedback (README 'On the line')")
    g.add_argument("--audit-rate", type=float, default=0.05,
                   help="share of passed parts sampled into the review queue (default 0.05; flagged and unknown "
                        "parts are always queued); give `calibrate --from-reviews` the same")
    g.add_argument("--thumbnails", action="store_true",
                   help="keep a small overlay PNG of every part the review queue shows in the verdict store")
    g.add_argument("--keep-images", type=Path, metavar="DIR",
                   help="keep every uploaded image in DIR (named by its SHA-256) and record that path: the review "
                        "page can redraw it, `calibrate --from-reviews` re-score it, `unknowns --export` copy it")
    g.add_argument("--drift-interval", type=float, default=60.0,
                   help="seconds between the drift checks /health reports (default 60; 0 = only GET /drift)")
    g.add_argument("--min-pile", type=int, default=10,
                   help="unknown-product parts needed before GET /unknowns clusters them (default 10)")
    p.set_defaults(run=run)


def settings_from_args(args: argparse.Namespace):
    from ..serve.settings import ServeSettings
    from ..store.checkpoint import find_model

    find_model(args.run_dir)  # a clear error now rather than a service that never becomes ready
    if args.no_store and args.store:
        raise MoleflowError("--store and --no-store contradict each other; give one")
    store = None
    if not args.no_store:
        try:
            from ..store.verdicts import VerdictStore, resolve_url
        except MoleflowError as exc:
            raise MoleflowError(f"{exc}; or start the service with --no-store (nothing recorded)") from None

        store = resolve_url(args.store, args.run_dir)
        VerdictStore(store).close()  # created or migrated once here, before any worker starts
    token_text = args.token if args.token is not None else os.environ.get(ENV_TOKEN)
    if args.keep_images:
        from ..store.atomic import check_writable

        check_writable(args.keep_images)
    return ServeSettings(run=str(args.run_dir), engine=args.engine, max_batch=args.max_batch,
                         max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, max_images=args.max_images,
                         max_pixels=args.max_pixels, max_body_mb=args.max_body_mb,
                         watch_interval=args.watch_interval, threads=args.threads, optimization=args.optimization,
                         cache_dir=str(args.cache_dir) if args.cache_dir else None,
                         backbone_weights=args.backbone_weights, recent=args.recent, store=store,
                         tokens=parse_tokens(token_text), audit_rate=args.audit_rate, thumbnails=args.thumbnails,
                         keep_images=str(args.keep_images.resolve()) if args.keep_images else None,
                         drift_interval=args.drift_interval, min_pile=args.min_pile)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serve.app import create_app
    except ImportError as exc:
        raise MoleflowError(f"the service needs FastAPI and uvicorn ({exc.name} is missing); "
                            'run `pip install "moleflow[serve]"`') from None
    if args.engine == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise MoleflowError('the onnx engine needs onnxruntime; run `pip install "moleflow[serve]"` '
                                "or use --engine torch") from None
    if args.workers < 1:
        raise MoleflowError("--workers must be at least 1")
    settings = settings_from_args(args)
    warning = exposure_warning(args.host, settings.tokens)
    if warning:
        log.warning(warning)
    print(f"moleflow serve: {settings.run} on http://{args.host}:{args.port} (engine {settings.engine}, "
          f"{args.workers} worker{'s' if args.workers > 1 else ''}); review page /, API docs /docs")
    if settings.store:
        from ..store.verdicts import describe_url

        print(f"recording every verdict in {describe_url(settings.store)}")
    if settings.tokens:
        print(f"access: bearer token required ({', '.join(settings.tokens)}); /health and /ready are open")
    if args.workers == 1:
        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level)
    else:  # each worker process builds its own app (and model) from the settings in its environment
        from ..serve.settings import ENV_VAR

        if settings.engine == "onnx":  # export once here, so that the workers only load the graphs
            from ..detector import MoleFlow
            from ..engine import export_graphs
            from ..serve.holder import ModelHolder

            model = MoleFlow.load(settings.run, backbone_weights=settings.backbone_weights)
            export_graphs(model, ModelHolder(settings).cache_dir())
            del model

        os.environ[ENV_VAR] = settings.to_json()
        # uvicorn's own command line starts the workers (its spawned children cannot re-run the `moleflow`
        # console script as their main module); this process becomes that uvicorn
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "uvicorn", "moleflow.serve.app:app_from_env", "--factory",
                                  "--host", args.host, "--port", str(args.port), "--workers", str(args.workers),
                                  "--log-level", args.log_level])
    return 0
