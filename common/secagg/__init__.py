"""SecAgg+ secure aggregation (Bonawitz et al. 2017, Bell et al. 2020), transport-free.

:mod:`.protocol` holds the client and server state machines of one round on integer vectors
in Z_{2^bits}; the caller moves their outputs between nodes (e.g. in Flower messages) and keeps
each client's state in its ``Context.state`` (``SecAggClient.to_bytes``/``from_bytes``).
Float updates must be quantised to integers first, and the true sum must fit the ring:
``n * max|x| < 2^(bits-1)`` for signed values (``from_signed``/``to_signed``).

What it protects, in the semi-honest server model of Flower's SecAgg+:

* The server learns only the sum of the survivors' vectors (mod 2^bits): each masked vector is
  uniform over the ring on its own, whoever drops out after sharing keys.
* With reconstruction threshold t, a server colluding with fewer than t of a node's neighbours
  learns nothing beyond the sum of the honest survivors' inputs (it cannot rebuild an honest
  node's self-mask seed or mask key); t - 1 colluding clients alone learn nothing.
* ``2 t > num_shares``, and a client gives for each peer either the self-mask share or the
  mask-key share, never both, answers one unmask request only and only as a survivor itself,
  so a server cannot rebuild both secrets of one node even by asking different neighbours
  different questions; a client also refuses to help unmask a sum of fewer than
  ``max(t, min_survivors)`` survivors and to mask with fewer than t - 1 neighbours.
* A tampered roster (own keys replaced), rosters larger than ``num_shares`` and tampered or
  misrouted share ciphertexts are refused.

What it does not protect against:

* A server that lies about who dropped, differently to different clients: there is no
  consistency round (the signed-survivor-list step of Bonawitz et al.); a client counts the
  survivor list it is shown and cannot check it, beyond its own neighbours.
* A server that simulates sybil clients (or colludes with t of a node's neighbours): the
  sum then reveals the honest input, or the shares of its secrets are in the server's hands.
* A server that swaps public keys in transit: key advertisement is not authenticated by
  long-term identity keys, so a man-in-the-middle server can read the shares sent "to" a
  neighbour whose keys it replaced.
* Integrity of the result: a malicious client can add any vector, and a bad share makes the
  round abort (a rebuilt mask key is checked against its pk2; a self-mask seed cannot be).
* Nothing about what the sum itself reveals: use differential privacy for that.
"""

from .protocol import (
    SecAggAborted,
    SecAggClient,
    SecAggError,
    SecAggParams,
    SecAggRefusal,
    SecAggServer,
    from_signed,
    to_signed,
)

__all__ = [
    "SecAggAborted",
    "SecAggClient",
    "SecAggError",
    "SecAggParams",
    "SecAggRefusal",
    "SecAggServer",
    "from_signed",
    "to_signed",
]
