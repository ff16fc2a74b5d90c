"""The ceiling for ``load.py``: a bare FastAPI app, one POST route with a pydantic body
shaped like ``/predict``'s, answering a small JSON dict (no features, no model)::

    .venv/bin/python -m uvicorn benchmarks.bare_app:app --host 127.0.0.1 --port 8090 \\
        --workers 1 --log-level warning
"""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel


class Transaction(BaseModel):
    user_id: int
    merchant_id: int
    amount: float


app = FastAPI(title="bare ceiling")


@app.post("/predict")
async def predict(tx: Transaction) -> dict[str, int | float | str]:
    return {"user_id": tx.user_id, "score": 0.0, "decision": "approve"}
