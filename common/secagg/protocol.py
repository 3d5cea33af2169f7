"""SecAgg+ client and server state machines on integer vectors in the ring Z_{2^bits}.

Follows Flower's legacy SecAgg+ (``secaggplus_mod.py`` / ``secaggplus_workflow.py``, after
Bonawitz et al. 2017 and Bell et al. 2020) stage by stage, on Flower's public primitives:

1. ``advertise_keys``  each client makes two P-384 key pairs: pk1/sk1 to encrypt shares,
   pk2/sk2 for pairwise masks. (Flower's legacy code names them the other way round.)
2. ``share_keys``      the server forwards each client its neighbours' public keys (the ring
   graph of ``num_shares`` nodes, itself included). The client draws the self-mask seed b,
   Shamir-splits b and its mask key sk2 with ``threshold``, and sends each neighbour its two
   shares encrypted (Fernet) under ECDH(sk1, pk1_peer).
3. ``masked_input``    y = x + PRG(b) + sum_j ±PRG(ECDH(sk2, pk2_j)) mod 2^bits, over the
   neighbours j whose shares arrived (+ when own id > j, − otherwise: the pair cancels).
4. ``unmask``          for each neighbour: the b-share if it survived, the sk2-share if it
   dropped. The server rebuilds b of every survivor and sk2 of every dropped node, removes
   those masks, and is left with the sum of the survivors' inputs.

Deviations from the legacy code, each for a reason:

* The mask PRG is ChaCha20 from ``cryptography`` keyed with the full 32-byte seed, not
  ``secaggplus_utils.pseudo_rand_gen``: that one XORs the seed down to 32 bits for
  ``np.random.RandomState`` (seeds a||b and b||a give the same mask; 2^32 guesses find b) and
  MT19937 is not a cryptographic generator. No primitive is written here: the keystream of a
  stream cipher is the standard PRG (Bell et al. use AES-CTR).
* sk2 is shared as its 48-byte private scalar, not as PEM (306 bytes): Shamir cost grows with
  the secret's length (pycryptodome splits per 16-byte chunk), so this is 4 chunks, not 20.
* The server only removes the pairwise masks that were actually added (survivor j masked with
  dropped d iff d's ciphertext was delivered to j), so a node that drops during ``share_keys``
  does not abort the round as it does in the legacy workflow.
* Every refusal ends the client's round: there is no retry of a stage, so a server cannot
  probe with a second request after a first one was refused.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
from cryptography.fernet import InvalidToken
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)

# Flower 1.42 keeps its key-pair helpers here (they moved out of symmetric_encryption.py).
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
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

log = logging.getLogger("fedvault.secagg")

_STATE_VERSION = 1
_SEED_BYTES = 32
_SCALAR_BYTES = 48  # P-384 private scalar
# ChaCha20 nonces (4-byte counter + 12-byte nonce), one per mask kind: a key is used once a round
# for one kind only, the distinct nonces just keep the two kinds of mask domain-separated.
_NONCE_SELF = bytes(4) + b"fv-secagg-sm"
_NONCE_PAIR = bytes(4) + b"fv-secagg-pm"

# Client stages, in order; ABORTED is terminal like DONE.
_NEW, _ADVERTISED, _SHARED, _MASKED, _DONE, _ABORTED = _STAGES = (
    "new",
    "advertised",
    "shared",
    "masked",
    "done",
    "aborted",
)


class SecAggError(ValueError):
    """Bad input or misuse by the caller of this module (a programming or config mistake)."""


class SecAggAborted(RuntimeError):
    """The round cannot complete: too few nodes are left to reconstruct what is needed."""


class SecAggRefusal(RuntimeError):
    """A client refused a request that is invalid or would expose an input; its round ends."""


@dataclass(frozen=True)
class SecAggParams:
    """The parameters every node and the server of one round agree on.

    ``num_shares`` is the neighbourhood size, the node itself included (Flower's meaning); a
    round with fewer nodes uses the complete graph. ``2 * threshold > num_shares`` so that no
    server can collect ``threshold`` shares of both b and sk2 of one node from its neighbours.
    """

    num_shares: int
    threshold: int
    vector_length: int
    modulus_bits: int = 32

    def __post_init__(self) -> None:
        for name in ("num_shares", "threshold", "vector_length", "modulus_bits"):
            value = getattr(self, name)
            if type(value) is not int:
                raise SecAggError(f"{name} must be an int, got {type(value).__name__}")
        if self.num_shares < 3 or self.num_shares % 2 == 0:
            raise SecAggError(
                f"num_shares={self.num_shares} must be odd and >= 3 (the node plus the same "
                "number of neighbours on each side of the ring); use e.g. 3, 5 or 7"
            )
        if not (self.num_shares // 2 < self.threshold <= self.num_shares):
            raise SecAggError(
                f"threshold={self.threshold} must be in {self.num_shares // 2 + 1}.."
                f"{self.num_shares} (more than half of num_shares={self.num_shares}, so b and "
                "sk2 of one node cannot both be rebuilt); raise or lower it into that range"
            )
        if self.vector_length < 1:
            raise SecAggError(f"vector_length={self.vector_length} must be >= 1")
        if not 1 <= self.modulus_bits <= 64:
            raise SecAggError(
                f"modulus_bits={self.modulus_bits} must be in 1..64 (the ring is held in "
                "uint64); use 32 unless the sum needs more"
            )

    @property
    def mask(self) -> np.uint64:
        """2^bits − 1: reducing mod 2^bits is an AND, and uint64 wrap-around is compatible."""
        return np.uint64((1 << self.modulus_bits) - 1)


# --------------------------------------------------------------------------------------------
# Signed integers in the ring (the one place that knows the two's complement convention)
# --------------------------------------------------------------------------------------------


def from_signed(vector: np.ndarray, bits: int) -> np.ndarray:
    """Embed signed ints in [−2^(bits−1), 2^(bits−1)) into Z_{2^bits} as uint64 (x mod 2^bits)."""
    arr = np.asarray(vector)
    if not np.issubdtype(arr.dtype, np.signedinteger):
        raise SecAggError(f"from_signed needs a signed integer array, got dtype {arr.dtype}")
    if not 1 <= bits <= 64:
        raise SecAggError(f"bits={bits} must be in 1..64")
    arr = arr.astype(np.int64)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if arr.size and (int(arr.min()) < lo or int(arr.max()) > hi):
        raise SecAggError(f"values must lie in [{lo}, {hi}] for bits={bits}; scale them down")
    return arr.view(np.uint64) & np.uint64((1 << bits) - 1)


def to_signed(vector: np.ndarray, bits: int) -> np.ndarray:
    """Read ring elements (e.g. ``SecAggServer.result()``) back as signed int64 values."""
    if not 1 <= bits <= 64:
        raise SecAggError(f"bits={bits} must be in 1..64")
    shift = np.uint64(64 - bits)
    arr = (np.asarray(vector).astype(np.uint64) << shift).view(np.int64)
    return arr >> np.int64(64 - bits)  # arithmetic shift sign-extends bit bits−1


# --------------------------------------------------------------------------------------------
# Helpers shared by client and server
# --------------------------------------------------------------------------------------------


def _prg(key: bytes, nonce: bytes, params: SecAggParams) -> np.ndarray:
    """A uniform mask over Z_{2^bits} of ``vector_length`` from a 32-byte key (ChaCha20)."""
    stream = (
        Cipher(algorithms.ChaCha20(key, nonce), mode=None)
        .encryptor()
        .update(bytes(8 * params.vector_length))
    )
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64) & params.mask


def _pair_key(private: ec.EllipticCurvePrivateKey, peer_public: bytes) -> bytes:
    """The 32-byte pairwise mask key both ends derive (Flower's ECDH + HKDF, base64 undone)."""
    return base64.urlsafe_b64decode(generate_shared_key(private, bytes_to_public_key(peer_public)))


def _ring_vector(vector: Any, params: SecAggParams, what: str) -> np.ndarray:
    """Check a vector is a ring element of the right length and return it as uint64."""
    if not isinstance(vector, np.ndarray) or vector.dtype not in (np.uint64, np.int64):
        raise SecAggError(f"{what} must be a numpy uint64 or int64 array (see from_signed)")
    if vector.shape != (params.vector_length,):
        raise SecAggError(f"{what} has shape {vector.shape}, expected ({params.vector_length},)")
    if vector.size and (
        (vector.dtype == np.int64 and int(vector.min()) < 0) or int(vector.max()) > int(params.mask)
    ):
        raise SecAggError(
            f"{what} must hold values in [0, 2^{params.modulus_bits}); use from_signed for "
            "signed values"
        )
    return vector.astype(np.uint64)


def _neighbourhoods(nodes: Sequence[int], num_shares: int) -> dict[int, set[int]]:
    """Flower's ring graph: node plus num_shares // 2 on each side of a shuffled order."""
    order = list(nodes)
    random.SystemRandom().shuffle(order)  # nobody chooses their neighbours
    n, half = len(order), num_shares // 2
    if n <= num_shares:
        return {node: set(order) for node in order}
    return {
        node: {order[(idx + off) % n] for off in range(-half, half + 1)}
        for idx, node in enumerate(order)
    }


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


# --------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------


class SecAggClient:
    """One node's side of one SecAgg+ round; make a new one for every round.

    Call ``advertise_keys``, ``share_keys``, ``masked_input``, ``unmask`` once each, in order.
    Anything else, and any request that could expose an input, raises ``SecAggRefusal`` and
    ends the round for this node (the server then treats it as dropped).

    Between Flower messages keep the state in ``Context.state`` with ``to_bytes`` and
    ``from_bytes`` (e.g. ``ConfigRecord({"blob": client.to_bytes()})``) and save it after
    *every* call, a refused one too: the one-unmask rule
    only holds if an old state is never reloaded. The blob holds sk1, sk2, the seed b and the
    neighbours' shares in the clear (PEM / raw bytes): it must stay in the node's own
    ``Context.state`` and never be sent anywhere. Secrets are dropped as soon as a stage no
    longer needs them (b, sk2 and the share keys after ``masked_input``, all after ``unmask``).
    """

    def __init__(self, node_id: int, params: SecAggParams, min_survivors: int | None = None):
        if type(node_id) is not int or node_id < 0:
            raise SecAggError(f"node_id={node_id!r} must be a non-negative int")
        if not isinstance(params, SecAggParams):
            raise SecAggError("params must be a SecAggParams")
        floor = params.threshold if min_survivors is None else min_survivors
        if type(floor) is not int or floor < 1:
            raise SecAggError(f"min_survivors={min_survivors!r} must be a positive int")
        self.node_id = node_id
        self.params = params
        self.min_survivors = floor
        self._stage = _NEW
        self._sk1 = self._pk1 = self._sk2 = self._pk2 = self._seed = b""
        self._roster: dict[int, tuple[bytes, bytes]] = {}
        self._enc_keys: dict[int, bytes] = {}
        self._b_shares: dict[int, bytes] = {}
        self._sk_shares: dict[int, bytes] = {}
        self._masked_with: list[int] = []

    @property
    def stage(self) -> str:
        """Where the round stands for this node: new/advertised/shared/masked/done/aborted."""
        return self._stage

    # -- stage 0 ---------------------------------------------------------------------------
    def advertise_keys(self) -> dict[str, bytes]:
        """Make this round's two key pairs; return ``{"pk1": enc key, "pk2": mask key}`` (PEM)."""
        self._enter(_NEW, "advertise_keys")
        sk1, pk1 = generate_key_pairs()
        sk2, pk2 = generate_key_pairs()
        self._sk1, self._pk1 = private_key_to_bytes(sk1), public_key_to_bytes(pk1)
        self._sk2, self._pk2 = private_key_to_bytes(sk2), public_key_to_bytes(pk2)
        self._stage = _ADVERTISED
        return {"pk1": self._pk1, "pk2": self._pk2}

    # -- stage 1 ---------------------------------------------------------------------------
    def share_keys(self, roster: Mapping[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        """Split b and sk2 over the neighbourhood ``roster`` (node id -> (pk1, pk2), self incl.).

        Returns one ciphertext per other neighbour, readable only with that neighbour's sk1.
        """
        self._enter(_ADVERTISED, "share_keys")
        p = self.params
        roster = {int(k): (bytes(v[0]), bytes(v[1])) for k, v in dict(roster).items()}
        if roster.get(self.node_id) != (self._pk1, self._pk2):
            self._refuse("the roster does not carry this node's own public keys unchanged")
        if not p.threshold <= len(roster) <= p.num_shares:
            self._refuse(
                f"the roster has {len(roster)} nodes, outside threshold..num_shares = "
                f"{p.threshold}..{p.num_shares}"
            )
        keys = [k for pair in roster.values() for k in pair]
        if len(set(keys)) != len(keys):
            self._refuse("the roster repeats a public key")
        try:
            for pair in roster.values():
                self._check_peer_keys(pair)
        except (ValueError, TypeError):
            self._refuse("the roster holds a public key that is not a P-384 key")

        self._seed = os.urandom(_SEED_BYTES)
        sk2 = bytes_to_private_key(self._sk2)
        scalar = sk2.private_numbers().private_value.to_bytes(_SCALAR_BYTES, "big")
        holders = sorted(roster)
        b_shares = create_shares(self._seed, p.threshold, len(holders))
        sk_shares = create_shares(scalar, p.threshold, len(holders))
        sk1 = bytes_to_private_key(self._sk1)
        out: dict[int, bytes] = {}
        for nid, b_share, sk_share in zip(holders, b_shares, sk_shares, strict=True):
            if nid == self.node_id:
                self._b_shares[nid], self._sk_shares[nid] = b_share, sk_share
                continue
            key = generate_shared_key(sk1, bytes_to_public_key(roster[nid][0]))
            self._enc_keys[nid] = key
            out[nid] = encrypt(
                key, share_keys_plaintext_concat(self.node_id, nid, b_share, sk_share)
            )
        self._roster = roster
        self._stage = _SHARED
        log.debug("node %d: shared keys with %d neighbours", self.node_id, len(out))
        return out

    # -- stage 2 ---------------------------------------------------------------------------
    def masked_input(self, ciphertexts: Mapping[int, bytes], vector: np.ndarray) -> np.ndarray:
        """Store the neighbours' shares from ``ciphertexts`` (src -> ciphertext); mask ``vector``.

        ``vector``: ``vector_length`` values in [0, 2^bits), uint64 or int64. Returns uint64.
        """
        x = _ring_vector(vector, self.params, "vector")  # a caller mistake: round not ended
        self._enter(_SHARED, "masked_input")
        p = self.params
        ciphertexts = {int(k): bytes(v) for k, v in dict(ciphertexts).items()}
        strangers = sorted(set(ciphertexts) - (set(self._roster) - {self.node_id}))
        if strangers:
            self._refuse(f"ciphertexts from nodes outside the neighbourhood: {strangers}")
        if len(ciphertexts) + 1 < p.threshold:
            self._refuse(
                f"only {len(ciphertexts)} neighbours' shares arrived; masking with fewer than "
                f"threshold-1 = {p.threshold - 1} would let too few nodes unmask this input"
            )
        for src, ciphertext in ciphertexts.items():
            try:
                plain = decrypt(self._enc_keys[src], ciphertext)
            except InvalidToken:
                self._refuse(f"the ciphertext from node {src} does not decrypt (tampered)")
            actual_src, dst, b_share, sk_share = share_keys_plaintext_separate(plain)
            if (actual_src, dst) != (src, self.node_id):
                self._refuse(f"the ciphertext routed from node {src} was not {src} -> this node")
            self._b_shares[src], self._sk_shares[src] = b_share, sk_share

        y = x + _prg(self._seed, _NONCE_SELF, p)
        sk2 = bytes_to_private_key(self._sk2)
        for peer in sorted(ciphertexts):
            pair = _prg(_pair_key(sk2, self._roster[peer][1]), _NONCE_PAIR, p)
            y = y + pair if self.node_id > peer else y - pair
        self._masked_with = sorted(ciphertexts)
        # Nothing below needs b, sk1, sk2 or the share keys any more: drop them from the state.
        self._seed = self._sk1 = self._sk2 = b""
        self._enc_keys = {}
        self._stage = _MASKED
        return y & p.mask

    # -- stage 3 ---------------------------------------------------------------------------
    def unmask(self, survivors: Sequence[int], dropped: Sequence[int]) -> dict[int, bytes]:
        """Return the b-share of each neighbour in ``survivors``, sk2-share of each in ``dropped``.

        ``survivors`` is the server's whole survivor list (it is counted); ``dropped`` names
        only this node's dropped neighbours. Refused: one peer in both lists, this node not a
        survivor, fewer survivors than ``max(threshold, min_survivors)``, a dropped peer this
        node holds no share of, a second call.
        """
        self._enter(_MASKED, "unmask")
        try:
            alive, dead = [int(n) for n in survivors], [int(n) for n in dropped]
        except (TypeError, ValueError):
            self._refuse("survivors and dropped must be lists of node ids")
        if len(set(alive)) != len(alive) or len(set(dead)) != len(dead):
            self._refuse("survivors or dropped lists a node twice")
        both = sorted(set(alive) & set(dead))
        if both:
            self._refuse(f"nodes {both} are named both survivor and dropped")
        if self.node_id not in alive:
            self._refuse("this node is not in the survivor list")
        floor = max(self.params.threshold, self.min_survivors)
        if len(alive) < floor:
            self._refuse(f"{len(alive)} survivors, fewer than this node's floor of {floor}")
        unknown = sorted(set(dead) - set(self._masked_with))
        if unknown:
            self._refuse(f"dropped nodes {unknown} are not neighbours whose shares this node holds")
        out = {nid: self._b_shares[nid] for nid in alive if nid in self._b_shares}
        out.update({nid: self._sk_shares[nid] for nid in dead})
        self._b_shares, self._sk_shares, self._roster = {}, {}, {}
        self._stage = _DONE
        log.debug("node %d: unmask: %d shares for %d survivors", self.node_id, len(out), len(alive))
        return out

    # -- persistence -----------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The whole state as one deterministic blob (JSON); see the class docstring."""
        state = {
            "v": _STATE_VERSION,
            "node_id": self.node_id,
            "params": [
                self.params.num_shares,
                self.params.threshold,
                self.params.vector_length,
                self.params.modulus_bits,
            ],
            "min_survivors": self.min_survivors,
            "stage": self._stage,
            "keys": [_b64(k) for k in (self._sk1, self._pk1, self._sk2, self._pk2, self._seed)],
            "roster": {str(n): [_b64(a), _b64(b)] for n, (a, b) in self._roster.items()},
            "enc_keys": {str(n): _b64(k) for n, k in self._enc_keys.items()},
            "b_shares": {str(n): _b64(s) for n, s in self._b_shares.items()},
            "sk_shares": {str(n): _b64(s) for n, s in self._sk_shares.items()},
            "masked_with": self._masked_with,
        }
        return json.dumps(state, sort_keys=True, separators=(",", ":")).encode("ascii")

    @classmethod
    def from_bytes(cls, blob: bytes) -> SecAggClient:
        """Rebuild a client from ``to_bytes`` output; SecAggError if it is not such a blob."""
        try:
            state = json.loads(bytes(blob).decode("ascii"))
            if state["v"] != _STATE_VERSION:
                raise SecAggError(f"secagg state version {state['v']} is not {_STATE_VERSION}")
            client = cls(state["node_id"], SecAggParams(*state["params"]), state["min_survivors"])
            if state["stage"] not in _STAGES:
                raise SecAggError(f"unknown secagg stage {state['stage']!r}")
            client._stage = state["stage"]
            (client._sk1, client._pk1, client._sk2, client._pk2, client._seed) = (
                _unb64(k) for k in state["keys"]
            )
            client._roster = {
                int(n): (_unb64(a), _unb64(b)) for n, (a, b) in state["roster"].items()
            }
            client._enc_keys = {int(n): _unb64(k) for n, k in state["enc_keys"].items()}
            client._b_shares = {int(n): _unb64(s) for n, s in state["b_shares"].items()}
            client._sk_shares = {int(n): _unb64(s) for n, s in state["sk_shares"].items()}
            client._masked_with = [int(n) for n in state["masked_with"]]
        except SecAggError:
            raise
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise SecAggError(f"not a secagg client state blob ({err})") from None
        return client

    # -- internals -------------------------------------------------------------------------
    def _enter(self, expected: str, call: str) -> None:
        if self._stage != expected:
            self._refuse(f"{call} called in stage {self._stage!r}, expected {expected!r}")

    def _refuse(self, reason: str) -> NoReturn:
        """End this node's round (its secrets are wiped) and raise."""
        self._stage = _ABORTED
        self._seed = self._sk1 = self._sk2 = b""
        self._enc_keys, self._b_shares, self._sk_shares = {}, {}, {}
        log.warning("node %d refuses: %s", self.node_id, reason)
        raise SecAggRefusal(f"node {self.node_id} refuses: {reason}")

    @staticmethod
    def _check_peer_keys(pair: tuple[bytes, bytes]) -> None:
        for pem in pair:
            key = bytes_to_public_key(pem)
            if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
                raise ValueError("not a P-384 public key")


# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------


class SecAggServer:
    """The server's bookkeeping for one round over ``node_ids``; it never sees an input.

    Order: ``add_keys`` for every reply, then ``roster_for`` (closes key collection and draws
    the neighbour graph); ``route`` for every reply, then ``ciphertexts_for`` (closes routing);
    ``add_masked`` for every reply, then ``unmask_request`` (closes collection; survivors =
    masked vector arrived, dropped = shared keys but no masked vector); ``add_unmask_shares``
    for every reply, then ``result``. ``SecAggAborted`` as soon as too few nodes are left.
    """

    def __init__(self, params: SecAggParams, node_ids: Sequence[int]):
        nodes = list(node_ids)
        if len(set(nodes)) != len(nodes) or any(type(n) is not int or n < 0 for n in nodes):
            raise SecAggError("node_ids must be distinct non-negative ints")
        self.params = params
        self._nodes = set(nodes)
        self._stage = "keys"
        self._keys: dict[int, tuple[bytes, bytes]] = {}
        self._graph: dict[int, set[int]] = {}
        self._sent: dict[int, dict[int, bytes]] = {}  # src -> dst -> ciphertext
        self._delivered: dict[int, set[int]] = {}  # dst -> srcs it got (and masked with)
        self._sum = np.zeros(params.vector_length, dtype=np.uint64)
        self._survivors: set[int] = set()
        self._dropped: set[int] = set()
        self._shares: dict[int, dict[int, bytes]] = {}  # responder -> owner -> share
        self._result: np.ndarray | None = None

    def add_keys(self, node: int, keys: Mapping[str, bytes]) -> None:
        """Record a node's advertised ``{"pk1", "pk2"}``."""
        self._expect("keys", "add_keys")
        if node not in self._nodes or node in self._keys:
            raise SecAggError(f"add_keys: node {node} is not in this round or already added")
        if set(keys) != {"pk1", "pk2"}:
            raise SecAggError(f"add_keys: node {node} sent keys {sorted(keys)}, not pk1, pk2")
        self._keys[node] = (bytes(keys["pk1"]), bytes(keys["pk2"]))

    def roster_for(self, node: int) -> dict[int, tuple[bytes, bytes]]:
        """The public keys of ``node``'s neighbourhood (itself included), to send it."""
        if self._stage == "keys":
            self._need(len(self._keys), "advertised keys")
            self._graph = _neighbourhoods(sorted(self._keys), self.params.num_shares)
            self._stage = "rosters"
        self._expect("rosters", "roster_for")
        if node not in self._graph:
            raise SecAggError(f"roster_for: node {node} advertised no keys")
        return {nid: self._keys[nid] for nid in sorted(self._graph[node])}

    def route(self, sender: int, ciphertexts: Mapping[int, bytes]) -> None:
        """Record ``sender``'s ciphertexts (dst -> ciphertext), one for each other neighbour."""
        self._expect("rosters", "route")
        if sender not in self._graph or sender in self._sent:
            raise SecAggError(f"route: node {sender} got no roster or already routed")
        if set(ciphertexts) != self._graph[sender] - {sender}:
            raise SecAggError(f"route: node {sender} did not send one ciphertext per neighbour")
        self._sent[sender] = {int(d): bytes(c) for d, c in ciphertexts.items()}

    def ciphertexts_for(self, node: int) -> dict[int, bytes]:
        """The ciphertexts addressed to ``node`` (src -> ciphertext), from nodes that routed."""
        if self._stage == "rosters":
            self._need(len(self._sent), "shared keys")
            self._stage = "routing"
        self._expect("routing", "ciphertexts_for")
        if node not in self._sent:
            raise SecAggError(f"ciphertexts_for: node {node} did not share keys")
        got = {src: sent[node] for src, sent in self._sent.items() if node in sent}
        self._delivered[node] = set(got)
        return got

    def add_masked(self, node: int, vector: np.ndarray) -> None:
        """Add a node's masked vector to the running sum (only the sum is kept)."""
        self._expect("routing", "add_masked")
        if node not in self._delivered or node in self._survivors:
            raise SecAggError(f"add_masked: node {node} got no ciphertexts or already sent")
        y = _ring_vector(vector, self.params, f"masked vector of node {node}")
        self._sum = (self._sum + y) & self.params.mask
        self._survivors.add(node)

    def unmask_request(self, node: int) -> tuple[list[int], list[int]]:
        """What to ask ``node``: (all survivors, its dropped neighbours).

        Aborts here, before any share is asked for, when some secret could not be rebuilt.
        """
        if self._stage == "routing":
            self._need(len(self._survivors), "masked vectors")
            # A node that shared keys and sent no vector matters only if some survivor masked
            # with it; one whose shares reached no survivor left no mask in the sum.
            self._dropped = {
                d
                for d in set(self._sent) - self._survivors
                if any(d in self._delivered[h] for h in self._survivors)
            }
            for owner in sorted(self._survivors | self._dropped):
                holders = self._holders(owner)
                if len(holders) < self.params.threshold:
                    what = "self-mask seed" if owner in self._survivors else "mask key"
                    self._abort(
                        f"only {len(holders)} surviving holders of node {owner}'s {what}, "
                        f"threshold is {self.params.threshold}"
                    )
            self._stage = "unmask"
        self._expect("unmask", "unmask_request")
        if node not in self._survivors:
            raise SecAggError(f"unmask_request: node {node} is not a survivor")
        mine = sorted(self._dropped & self._delivered[node])
        return sorted(self._survivors), mine

    def add_unmask_shares(self, node: int, shares: Mapping[int, bytes]) -> None:
        """Record a survivor's shares (owner -> share)."""
        self._expect("unmask", "add_unmask_shares")
        if node not in self._survivors or node in self._shares:
            raise SecAggError(f"add_unmask_shares: node {node} is no survivor or already sent")
        expected = (self._delivered[node] | {node}) & (self._survivors | self._dropped)
        if not set(shares) <= expected:
            raise SecAggError(f"add_unmask_shares: node {node} sent shares it cannot hold")
        self._shares[node] = {int(o): bytes(s) for o, s in shares.items()}

    def result(self) -> np.ndarray:
        """The sum of the survivors' vectors mod 2^bits (uint64); read signed with to_signed."""
        if self._result is not None:
            return self._result.copy()
        self._expect("unmask", "result")
        p, total = self.params, self._sum.copy()
        for owner in sorted(self._survivors):
            seed = self._combine(owner, "self-mask seed")
            total -= _prg(seed, _NONCE_SELF, p)
        for owner in sorted(self._dropped):
            scalar = int.from_bytes(self._combine(owner, "mask key"), "big")
            try:
                sk2 = ec.derive_private_key(scalar, ec.SECP384R1())
            except ValueError:
                self._abort(f"node {owner}'s mask key did not rebuild")
            if public_key_to_bytes(sk2.public_key()) != self._keys[owner][1]:
                self._abort(f"node {owner}'s rebuilt mask key does not match its pk2")
            for peer in sorted(self._survivors):
                if owner in self._delivered[peer]:  # peer masked with owner; owner never did
                    pair = _prg(_pair_key(sk2, self._keys[peer][1]), _NONCE_PAIR, p)
                    total = total - pair if peer > owner else total + pair
        self._result = total & p.mask
        self._stage = "done"
        log.info(
            "secagg: sum of %d survivors, %d dropped", len(self._survivors), len(self._dropped)
        )
        return self._result.copy()

    @property
    def survivors(self) -> list[int]:
        """Nodes whose masked vector is in the sum (known after the first unmask_request)."""
        return sorted(self._survivors)

    # -- internals -------------------------------------------------------------------------
    def _holders(self, owner: int) -> set[int]:
        """Survivors holding a share of ``owner``'s secrets (themselves for their own seed)."""
        held = {h for h in self._survivors if owner in self._delivered[h]}
        return held | ({owner} if owner in self._survivors else set())

    def _combine(self, owner: int, what: str) -> bytes:
        shares = [s[owner] for s in self._shares.values() if owner in s]
        if len(shares) < self.params.threshold:
            self._abort(
                f"only {len(shares)} shares of node {owner}'s {what} came back, "
                f"threshold is {self.params.threshold}"
            )
        try:  # exactly threshold shares: more cost more and add nothing
            return combine_shares(shares[: self.params.threshold])
        except ValueError:
            self._abort(f"node {owner}'s {what} did not rebuild from its shares")

    def _need(self, count: int, what: str) -> None:
        if count < self.params.threshold:
            self._abort(f"only {count} nodes {what}, threshold is {self.params.threshold}")

    def _abort(self, reason: str) -> NoReturn:
        """End the round: every later call is a SecAggError, the reason is logged once."""
        self._stage = "aborted"
        log.warning("secagg round aborted: %s", reason)
        raise SecAggAborted(reason)

    def _expect(self, stage: str, call: str) -> None:
        if self._stage != stage:
            raise SecAggError(f"{call} called in server stage {self._stage!r}, not {stage!r}")
