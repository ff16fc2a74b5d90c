"""The Bytewax streaming pipeline: transaction events -> the declared streamed views, live.

``events`` validates raw events, ``aggregates`` is the keyed window state (pure),
``sources`` and ``sinks`` connect it to Redis Streams / files / Kafka and to the online
and offline stores (``retry``: both ride through a Redis that stops answering for a
while), ``flow`` chains them into a dataflow.
"""
