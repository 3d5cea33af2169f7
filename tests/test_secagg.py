"""SecAgg+ protocol core (common.secagg): privacy of one masked vector, exact sums, dropouts,
refusals of malicious requests, state round-trips and parameter checks. Fast: no Flower run."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from scipy import stats

from common.secagg import (
    SecAggAborted,
    SecAggClient,
    SecAggError,
    SecAggParams,
    SecAggRefusal,
    SecAggServer,
    from_signed,
    protocol,
    to_signed,
)


def complete(n: int, vector_length: int = 64, bits: int = 32) -> SecAggParams:
    """Parameters whose neighbourhood is every node (classic SecAgg), smallest valid t."""
    k = n if n % 2 else n + 1
    return SecAggParams(k, k // 2 + 1, vector_length=vector_length, modulus_bits=bits)


class Round:
    """Drives one round in memory: the 'transport' is a dict lookup; every client's state is
    saved and reloaded between stages when ``persist`` is set (as a ClientApp would)."""

    def __init__(self, params: SecAggParams, node_ids: list[int], persist: bool = False):
        self.params, self.ids, self.persist = params, node_ids, persist
        self.clients = {n: SecAggClient(n, params) for n in node_ids}
        self.server = SecAggServer(params, node_ids)

    def _reload(self) -> None:
        if self.persist:
            for n, c in self.clients.items():
                blob = c.to_bytes()
                self.clients[n] = SecAggClient.from_bytes(blob)
                assert self.clients[n].to_bytes() == blob  # exact round trip

    def keys(self, nodes: list[int]) -> None:
        for n in nodes:
            self.server.add_keys(n, self.clients[n].advertise_keys())
        self._reload()

    def share(self, nodes: list[int]) -> None:
        out = {n: self.clients[n].share_keys(self.server.roster_for(n)) for n in nodes}
        for n in nodes:
            self.server.route(n, out[n])
        self._reload()

    def mask(self, vectors: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        cts = {n: self.server.ciphertexts_for(n) for n in vectors}
        masked = {n: self.clients[n].masked_input(cts[n], v) for n, v in vectors.items()}
        for n, y in masked.items():
            self.server.add_masked(n, y)
        self._reload()
        return masked

    def unmask(self, nodes: list[int]) -> np.ndarray:
        requests = {n: self.server.unmask_request(n) for n in nodes}
        for n in nodes:
            self.server.add_unmask_shares(n, self.clients[n].unmask(*requests[n]))
        return self.server.result()

    def run(self, vectors: dict[int, np.ndarray], drop_after_share: set[int] = frozenset()):
        self.keys(self.ids)
        self.share(self.ids)
        alive = {n: v for n, v in vectors.items() if n not in drop_after_share}
        self.mask(alive)
        return self.unmask(sorted(alive))


def random_ring(rng: np.random.Generator, params: SecAggParams, n: int) -> dict[int, np.ndarray]:
    top = 1 << params.modulus_bits
    return {
        i: rng.integers(0, top, params.vector_length, dtype=np.uint64, endpoint=False)
        for i in range(n)
    }


def ring_sum(vectors, params: SecAggParams) -> np.ndarray:
    total = np.zeros(params.vector_length, dtype=np.uint64)
    for v in vectors:
        total += v.astype(np.uint64)
    return total & params.mask


# -- (1) one masked vector tells nothing about its input -------------------------------------


def test_masked_vector_is_uniform_and_uncorrelated_with_the_input():
    params = complete(3, vector_length=50_000, bits=32)
    # A very non-uniform input: small, ramp-like values; unmasked, every test below fails.
    x = (np.arange(params.vector_length, dtype=np.uint64) % 1000) * 7
    rnd = Round(params, [0, 1, 2])
    rnd.keys([0, 1, 2])
    rnd.share([0, 1, 2])
    zero = np.zeros(params.vector_length, dtype=np.uint64)
    masked = rnd.mask({0: x, 1: zero, 2: zero})
    y = masked[0]

    assert y.dtype == np.uint64 and y.shape == x.shape and int(y.max()) < 1 << 32
    r = np.corrcoef(x.astype(np.float64), y.astype(np.float64))[0, 1]
    assert abs(r) < 0.03  # sd of r is ~0.0045 at 50k independent samples
    top = (y >> np.uint64(28)).astype(np.int64)  # top 4 bits: 16 equally likely bins
    counts = np.bincount(top, minlength=16)
    assert stats.chisquare(counts).pvalue > 1e-6
    assert stats.kstest(y / 2.0**32, "uniform").pvalue > 1e-6
    # Masks differ per node: two nodes' masked zero vectors do not agree.
    assert not np.array_equal(masked[1], masked[2])


def test_mask_depends_on_every_seed_byte():
    """Why Flower's pseudo_rand_gen is not used: it XORs a seed down to 32 bits, so seeds
    with swapped 4-byte words give the same mask. Ours (ChaCha20) must not."""
    params = complete(3, vector_length=16)
    a = bytes(range(32))
    b = a[4:8] + a[0:4] + a[8:]
    ma = protocol._prg(a, protocol._NONCE_SELF, params)
    assert not np.array_equal(ma, protocol._prg(b, protocol._NONCE_SELF, params))
    assert not np.array_equal(ma, protocol._prg(a, protocol._NONCE_PAIR, params))


# -- (2) exact sums ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", range(5, 11))
def test_unmasked_sum_is_the_exact_sum(n):
    rng = np.random.default_rng(n)
    params = complete(n, vector_length=500, bits=32)
    vectors = random_ring(rng, params, n)
    result = Round(params, list(range(n))).run(vectors)
    assert result.dtype == np.uint64
    np.testing.assert_array_equal(result, ring_sum(vectors.values(), params))


def test_signed_values_sum_exactly_through_to_signed():
    rng = np.random.default_rng(7)
    n, bits = 6, 24
    params = complete(n, vector_length=300, bits=bits)
    lim = (1 << (bits - 1)) // n  # the true sum must fit the signed range
    signed = {i: rng.integers(-lim, lim, params.vector_length) for i in range(n)}
    result = Round(params, list(range(n))).run({i: from_signed(v, bits) for i, v in signed.items()})
    np.testing.assert_array_equal(to_signed(result, bits), sum(signed.values()))


def test_ring_neighbourhoods_larger_round_and_64_bit_ring():
    rng = np.random.default_rng(3)
    params = SecAggParams(num_shares=5, threshold=3, vector_length=200, modulus_bits=64)
    ids = [10 * i + 3 for i in range(12)]  # arbitrary node ids, 12 > num_shares: a ring
    vectors = dict(zip(ids, random_ring(rng, params, 12).values(), strict=True))
    result = Round(params, ids).run(vectors, drop_after_share={ids[0]})
    kept = [v for i, v in vectors.items() if i != ids[0]]
    np.testing.assert_array_equal(result, ring_sum(kept, params))


@pytest.mark.parametrize("bits", [1, 8, 33, 63, 64])
def test_signed_embedding_round_trips(bits):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    x = np.array([lo, -1, 0, hi] if bits > 1 else [lo, 0], dtype=np.int64)
    ring = from_signed(x, bits)
    assert ring.dtype == np.uint64 and (bits == 64 or int(ring.max()) < 1 << bits)
    np.testing.assert_array_equal(to_signed(ring, bits), x)
    if bits < 64:
        with pytest.raises(SecAggError, match="must lie in"):
            from_signed(np.array([hi + 1]), bits)
    with pytest.raises(SecAggError, match="signed integer array"):
        from_signed(np.array([1.0]), bits)


# -- (3) dropouts -----------------------------------------------------------------------------


def test_up_to_n_minus_threshold_dropouts_after_sharing_still_aggregate():
    n = 7
    params = complete(n, vector_length=400)  # t = 4
    rng = np.random.default_rng(11)
    vectors = random_ring(rng, params, n)
    dropped = set(range(n - params.threshold))  # 3 nodes
    result = Round(params, list(range(n))).run(vectors, drop_after_share=dropped)
    survivors = [v for i, v in vectors.items() if i not in dropped]
    np.testing.assert_array_equal(result, ring_sum(survivors, params))


def test_one_dropout_too_many_aborts_cleanly():
    n = 7
    params = complete(n, vector_length=50)
    rnd = Round(params, list(range(n)))
    vectors = random_ring(np.random.default_rng(1), params, n)
    with pytest.raises(SecAggAborted, match=r"only 3 nodes masked vectors, threshold is 4"):
        rnd.run(vectors, drop_after_share=set(range(n - params.threshold + 1)))


def test_dropouts_while_sharing_keys_and_while_unmasking():
    n = 7
    params = complete(n, vector_length=100)  # t = 4
    vectors = random_ring(np.random.default_rng(5), params, n)
    rnd = Round(params, list(range(n)))
    rnd.keys(list(range(n)))
    rnd.share([0, 1, 2, 3, 4, 5])  # node 6 drops before sending its shares: no mask with it
    rnd.mask({i: vectors[i] for i in range(5)})  # node 5 drops before masking
    result = rnd.unmask([0, 1, 2, 3])  # node 4 masked but drops while unmasking
    np.testing.assert_array_equal(result, ring_sum([vectors[i] for i in range(5)], params))


def test_ring_neighbourhood_that_loses_too_many_aborts_before_asking_for_shares():
    params = SecAggParams(num_shares=3, threshold=2, vector_length=10)
    rnd = Round(params, list(range(6)))
    rnd.keys(list(range(6)))
    rnd.share(list(range(6)))
    victim = 0
    neighbours = set(rnd.server.roster_for(victim)) - {victim}
    vectors = random_ring(np.random.default_rng(2), params, 6)
    rnd.mask({i: v for i, v in vectors.items() if i not in neighbours})
    with pytest.raises(SecAggAborted, match=rf"holders of node {victim}'s self-mask seed"):
        rnd.server.unmask_request(victim)


def test_server_aborts_when_too_few_nodes_advertise_keys():
    params = complete(5)
    rnd = Round(params, list(range(5)))
    rnd.keys([0, 1])
    with pytest.raises(SecAggAborted, match="only 2 nodes advertised keys, threshold is 3"):
        rnd.server.roster_for(0)


# -- (4) malicious unmask requests ------------------------------------------------------------


def _masked_round(n: int = 5) -> Round:
    params = complete(n, vector_length=20)
    rnd = Round(params, list(range(n)))
    rnd.keys(list(range(n)))
    rnd.share(list(range(n)))
    rnd.mask(random_ring(np.random.default_rng(0), params, n))
    return rnd


def test_a_peer_named_survivor_and_dropped_is_refused():
    rnd = _masked_round()
    client = rnd.clients[0]
    with pytest.raises(SecAggRefusal, match=r"nodes \[3\] are named both survivor and dropped"):
        client.unmask([0, 1, 2, 3, 4], [3])
    assert client.stage == "aborted"  # and no second try: the round is over for it
    with pytest.raises(SecAggRefusal, match="expected 'masked'"):
        client.unmask([0, 1, 2, 3, 4], [])


def test_a_second_unmask_is_refused():
    rnd = _masked_round()
    client = rnd.clients[0]
    shares = client.unmask([0, 1, 2, 4], [3])
    assert set(shares) == {0, 1, 2, 3, 4}
    with pytest.raises(SecAggRefusal, match="unmask called in stage 'done'"):
        client.unmask([0, 1, 2, 3], [4])


@pytest.mark.parametrize(
    ("survivors", "dropped", "reason"),
    [
        ([1, 2, 3], [0], "not in the survivor list"),
        ([0, 1], [2, 3, 4], r"2 survivors, fewer than this node's floor of 3"),
        ([0, 1, 2, 3], [99], r"dropped nodes \[99\] are not neighbours"),
        ([0, 1, 1, 2], [], "twice"),
    ],
)
def test_invalid_unmask_requests_are_refused(survivors, dropped, reason):
    rnd = _masked_round()
    with pytest.raises(SecAggRefusal, match=reason):
        rnd.clients[0].unmask(survivors, dropped)


def test_min_survivors_is_the_holders_own_floor():
    params = complete(5, vector_length=8)
    rnd = Round(params, list(range(5)))
    rnd.clients[0] = SecAggClient(0, params, min_survivors=5)
    rnd.keys(list(range(5)))
    rnd.share(list(range(5)))
    rnd.mask(random_ring(np.random.default_rng(0), params, 4))  # node 4 drops
    with pytest.raises(SecAggRefusal, match="4 survivors, fewer than this node's floor of 5"):
        rnd.clients[0].unmask(*rnd.server.unmask_request(0))


def test_stages_out_of_order_are_refused():
    params = complete(3, vector_length=4)
    client = SecAggClient(0, params)
    with pytest.raises(SecAggRefusal, match="share_keys called in stage 'new'"):
        client.share_keys({})
    rnd = _masked_round()
    with pytest.raises(SecAggRefusal, match="masked_input called in stage 'masked'"):
        rnd.clients[1].masked_input({}, np.zeros(20, dtype=np.uint64))  # a second masking


# -- (5) tampered rosters and ciphertexts ------------------------------------------------------


def test_a_roster_with_own_keys_replaced_is_refused():
    params = complete(3, vector_length=4)
    rnd = Round(params, [0, 1, 2])
    rnd.keys([0, 1, 2])
    roster = rnd.server.roster_for(0)
    roster[0] = (roster[0][0], roster[1][1])  # server swaps in another node's pk2
    with pytest.raises(SecAggRefusal, match="own public keys unchanged"):
        rnd.clients[0].share_keys(roster)
    assert rnd.clients[0].stage == "aborted"


def test_a_roster_larger_than_num_shares_is_refused():
    params = SecAggParams(num_shares=3, threshold=2, vector_length=4)
    rnd = Round(params, list(range(5)))
    rnd.keys(list(range(5)))
    roster = {n: rnd.server._keys[n] for n in range(5)}  # a cheating server
    with pytest.raises(SecAggRefusal, match=r"outside threshold\.\.num_shares"):
        rnd.clients[0].share_keys(roster)


def test_a_tampered_or_misrouted_ciphertext_is_refused():
    params = complete(3, vector_length=4)
    rnd = Round(params, [0, 1, 2])
    rnd.keys([0, 1, 2])
    rnd.share([0, 1, 2])
    cts = rnd.server.ciphertexts_for(0)
    cts[1] = cts[1][:-4] + b"AAAA"
    with pytest.raises(SecAggRefusal, match="does not decrypt"):
        rnd.clients[0].masked_input(cts, np.zeros(4, dtype=np.uint64))
    with pytest.raises(SecAggRefusal, match="fewer than threshold-1"):
        rnd.clients[1].masked_input({}, np.zeros(4, dtype=np.uint64))


# -- (6) state persistence --------------------------------------------------------------------


def test_state_round_trips_between_every_stage_and_the_round_completes():
    n = 5
    params = complete(n, vector_length=256)
    vectors = random_ring(np.random.default_rng(9), params, n)
    result = Round(params, list(range(n)), persist=True).run(vectors, drop_after_share={4})
    np.testing.assert_array_equal(result, ring_sum([vectors[i] for i in range(4)], params))


def test_state_drops_secrets_once_masked_and_rejects_garbage():
    rnd = _masked_round()
    blob = rnd.clients[0].to_bytes()
    assert base64.b64encode(b"-----BEGIN PRIVATE KEY-----")[:24] not in blob  # sk1, sk2 gone
    assert json.loads(blob)["keys"][4] == ""  # and so is the seed b
    with pytest.raises(SecAggError, match="not a secagg client state blob"):
        SecAggClient.from_bytes(b"{}")
    with pytest.raises(SecAggError, match="not a secagg client state blob"):
        SecAggClient.from_bytes(b"\xff")


# -- (7) parameter validation -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_shares": 4, "threshold": 3}, r"num_shares=4 must be odd and >= 3"),
        ({"num_shares": 1, "threshold": 1}, r"num_shares=1 must be odd and >= 3"),
        ({"num_shares": 5, "threshold": 2}, r"threshold=2 must be in 3..5"),
        ({"num_shares": 5, "threshold": 6}, r"threshold=6 must be in 3..5"),
        ({"vector_length": 0}, r"vector_length=0 must be >= 1"),
        ({"modulus_bits": 65}, r"modulus_bits=65 must be in 1..64"),
        ({"threshold": 2.0}, r"threshold must be an int, got float"),
    ],
)
def test_parameter_validation_names_the_problem(kwargs, message):
    full = {"num_shares": 3, "threshold": 2, "vector_length": 10, **kwargs}
    with pytest.raises(SecAggError, match=message) as err:
        SecAggParams(**full)
    assert "\n" not in str(err.value) and isinstance(err.value, ValueError)


def test_bad_vectors_are_caller_errors_and_do_not_end_the_round():
    rnd = Round(complete(3, vector_length=4), [0, 1, 2])
    rnd.keys([0, 1, 2])
    rnd.share([0, 1, 2])
    cts = rnd.server.ciphertexts_for(0)
    for bad, msg in [
        (np.zeros(5, dtype=np.uint64), r"shape \(5,\), expected \(4,\)"),
        (np.full(4, -1, dtype=np.int64), "values in"),
        (np.full(4, 1 << 32, dtype=np.uint64), "values in"),
        (np.zeros(4, dtype=np.float64), "uint64 or int64"),
    ]:
        with pytest.raises(SecAggError, match=msg):
            rnd.clients[0].masked_input(cts, bad)
    assert rnd.clients[0].stage == "shared"
    rnd.clients[0].masked_input(cts, np.zeros(4, dtype=np.int64))


def test_server_misuse_is_an_error():
    params = complete(3, vector_length=4)
    server = SecAggServer(params, [0, 1, 2])
    with pytest.raises(SecAggError, match="not in this round"):
        server.add_keys(9, {"pk1": b"", "pk2": b""})
    with pytest.raises(SecAggError, match="result called in server stage 'keys'"):
        server.result()
    with pytest.raises(SecAggError, match="distinct"):
        SecAggServer(params, [1, 1])
