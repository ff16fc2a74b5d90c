"""A shadow candidate's scorer in a process of its own: ``python -m serving.shadow_scorer
MODEL_ONNX``, driven by :class:`serving.shadow.CandidateProcess` over stdin/stdout.

In the serving process the candidate's ONNX Runtime call would share the GIL with the
event loop (each call hands the GIL back and forth with it: measured +40 % p50 at one
connection); here it has a CPU and an interpreter of its own.

Frames both ways: a 4-byte little-endian length, then that many bytes. In: a 4-byte
little-endian row width, then the rows as float32. Out: one float32 score per row. An
empty frame out says the model is loaded. EOF on stdin: exit.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import BinaryIO

import numpy as np

from serving.model_backend import OnnxBackend

HEADER = 4  # bytes of a frame's length, and of a request's row width


def frame(out: BinaryIO, payload: bytes) -> None:
    out.write(len(payload).to_bytes(HEADER, "little") + payload)
    out.flush()


def serve(model: Path, inp: BinaryIO, out: BinaryIO) -> None:
    backend = OnnxBackend(model)
    frame(out, b"")  # ready
    while len(head := inp.read(HEADER)) == HEADER:
        payload = inp.read(int.from_bytes(head, "little"))
        width = int.from_bytes(payload[:HEADER], "little")
        x = np.frombuffer(payload, np.float32, offset=HEADER).reshape(-1, width)
        frame(out, np.asarray(backend.score(x), np.float32).tobytes())


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server's Ctrl-C: it closes our stdin
    # buffered both ways whatever PYTHONUNBUFFERED says: read(n) and write() are whole
    with os.fdopen(0, "rb") as inp, os.fdopen(1, "wb") as out:
        serve(Path(sys.argv[1]), inp, out)
