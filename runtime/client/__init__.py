"""The client side of the wire: calls from the edge (or an MoE dispatcher) to cloud workers.

* :mod:`~tandem.runtime.client.pool` — socket sets, the choice of worker, and the one
  failover loop (:class:`~tandem.runtime.client.pool.Failover`) every call runs;
* :mod:`~tandem.runtime.client.requests` — :class:`CloudClient`: one request, one reply
  (``infer``, ``health``, ``echo``), the entry to streams, and :class:`Connection`: calls
  that must reach a worker as one peer (the rounds of a speculative ``verify`` session);
* :mod:`~tandem.runtime.client.streams` — :class:`RemoteStream`: one generation streamed
  from a worker as :class:`RemoteChunk` s.
"""

from tandem.runtime.client.requests import CloudClient, Connection
from tandem.runtime.client.streams import RemoteChunk, RemoteStream

__all__ = ["CloudClient", "Connection", "RemoteChunk", "RemoteStream"]
