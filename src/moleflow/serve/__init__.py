"""`moleflow serve`: an HTTP service that routes, scores and decides images for every learned product.

    settings = ServeSettings(run="runs/real")           # engine, batching, limits, hot reload
    app = create_app(settings)                          # a FastAPI app; uvicorn serves it

    app.py        the FastAPI routes: POST /predict, GET /tasks /health /ready /verdicts, POST /reload, / (page)
    settings.py   every option of the service, one dataclass (also passed to uvicorn workers as JSON)
    holder.py     the model being served: load, hot reload (POST /reload or a changed manifest), errors kept
    batcher.py    dynamic batching: concurrent requests gathered into batches for one model thread
    uploads.py    request bodies -> checked RGB images (one-line 4xx errors naming the problem)
    verdicts.py   an inspection -> JSON verdicts (product, score, threshold, decision, heat map PNG)
    auth.py       bearer tokens (--token / MOLEFLOW_TOKEN) and the open-network warning
    static/       the review page (plain HTML + JavaScript)

Every score comes from an `engine.Engine`: the inspection pipeline (pipeline.py) with its PyTorch backend,
or with its neural pieces in ONNX Runtime.
Every verdict is recorded in the verdict store (`store.verdicts`) when `settings.store` is set.
Import `moleflow.serve.app` only where FastAPI is installed (`pip install "moleflow[serve]"`).
"""

from .settings import ServeSettings

__all__ = ["ServeSettings"]
